//! The one line a long-running service (`contractor-proxy`, `contractor-store`) prints on
//! stdout once it listens, so that the caller learns the port it picked.

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

use crate::PROTOCOL_VERSION;

/// `{"type":"ready","version":1,"service":"proxy","addr":"127.0.0.1:40123"}`
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Ready {
    /// Always `ready`.
    #[serde(rename = "type")]
    pub kind: ReadyTag,
    /// Protocol version, always 1 today.
    pub version: u32,
    /// Which service is ready: `proxy` or `store`.
    pub service: String,
    /// The address it listens on.
    pub addr: SocketAddr,
    /// What confines the service now that it serves (absent from services that predate
    /// it: readers must accept a line without it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub confinement: Option<Confinement>,
    /// A proxy that inspects TLS (`--inspect`): the PEM certificate of its throwaway
    /// authority, which clients must trust.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_certificate: Option<String>,
}

/// What holds a service once it serves: `no_new_privs`, Landlock (the kernel's ABI and
/// whether file-system and TCP rules are enforced), seccomp, rlimits.
///
/// `{"enforced":true,"no_new_privs":true,"landlock_abi":7,"landlock_fs":true,
/// "landlock_net":true,"seccomp":true,"rlimits":true,"warnings":[]}`
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Confinement {
    /// False only when confinement was turned off on purpose (a debugging flag).
    pub enforced: bool,
    /// `PR_SET_NO_NEW_PRIVS` is set: no execve can gain privileges.
    pub no_new_privs: bool,
    /// The kernel's Landlock ABI version; 0 when the kernel has no Landlock.
    pub landlock_abi: u32,
    /// Landlock file-system rules are enforced.
    pub landlock_fs: bool,
    /// Landlock TCP bind/connect rules are enforced (ABI 4 and later).
    pub landlock_net: bool,
    /// A seccomp filter is installed.
    pub seccomp: bool,
    /// The resource limits (open files, file size) were set.
    pub rlimits: bool,
    /// What does not hold and why, one sentence each (also printed on stderr).
    #[serde(default)]
    pub warnings: Vec<String>,
}

impl Ready {
    /// A ready line for `service` listening on `addr`.
    pub fn new(service: &str, addr: SocketAddr) -> Self {
        Ready {
            kind: ReadyTag::Ready,
            version: PROTOCOL_VERSION,
            service: service.to_string(),
            addr,
            confinement: None,
            ca_certificate: None,
        }
    }

    /// This ready line, saying what confines the service.
    pub fn confined(mut self, confinement: Confinement) -> Self {
        self.confinement = Some(confinement);
        self
    }

    /// This ready line, with the authority certificate clients must trust.
    pub fn with_ca_certificate(mut self, pem: Option<String>) -> Self {
        self.ca_certificate = pem;
        self
    }
}

/// The `"type"` of a [`Ready`] line. (serde cannot combine an internal tag with
/// `deny_unknown_fields` on a struct, so the tag is a one-value field.)
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReadyTag {
    /// `"ready"`
    Ready,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ready_line_without_confinement_still_reads_and_one_with_it_round_trips() {
        let old = r#"{"type":"ready","version":1,"service":"store","addr":"127.0.0.1:1"}"#;
        let ready: Ready = serde_json::from_str(old).expect("an old ready line");
        assert_eq!(ready.confinement, None);
        assert_eq!(serde_json::to_string(&ready).expect("encode"), old);
        let new = r#"{"type":"ready","version":1,"service":"proxy","addr":"127.0.0.1:2","confinement":{"enforced":true,"no_new_privs":true,"landlock_abi":2,"landlock_fs":true,"landlock_net":false,"seccomp":true,"rlimits":true,"warnings":["no TCP rules"]}}"#;
        let ready: Ready = serde_json::from_str(new).expect("a new ready line");
        assert_eq!(ready.confinement.as_ref().map(|c| c.landlock_abi), Some(2));
        assert_eq!(serde_json::to_string(&ready).expect("encode"), new);
    }
}
