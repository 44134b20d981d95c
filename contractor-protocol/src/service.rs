//! The one line a long-running service (`contractor-proxy`, `contractor-store`) prints once
//! it listens, so that the caller learns the port it picked: on stdout, or with
//! `--ready-fd N` on descriptor N, which is closed after it ([`ReadyOut`]), so that a
//! shell reads it from a pipe of its own while stdout goes elsewhere.

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
    /// A store serving one build that made that build's token itself (`contractor-store
    /// serve --only-build ID --own-token`): the token the build's agent presents. It is
    /// never written to a file; [`is_token`] is its form.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
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
            token: None,
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

    /// This ready line, with the build token the store made (`--own-token`).
    pub fn with_token(mut self, token: Option<String>) -> Self {
        self.token = token;
        self
    }
}

/// The most bytes of a build token a ready line may carry (the store's are 64).
pub const MAX_TOKEN_BYTES: usize = 256;

/// Whether `text` has the form of a build token on a ready line: 1 to [`MAX_TOKEN_BYTES`]
/// ASCII letters and digits (a store makes 64 hex digits), so that it can travel in the
/// job and in an HTTP header as it is.
pub fn is_token(text: &str) -> bool {
    !text.is_empty()
        && text.len() <= MAX_TOKEN_BYTES
        && text.bytes().all(|b| b.is_ascii_alphanumeric())
}

/// Where a service writes its [`Ready`] line: stdout, or the descriptor `--ready-fd N`
/// names (inherited from the caller: a pipe, a FIFO or a file), closed once the line is
/// written, so that its reader sees the line and then the end of the stream. A service that
/// fails before it is ready closes it too (by exiting): its reader sees no line.
#[derive(Debug)]
pub enum ReadyOut {
    /// Standard output, as without `--ready-fd`.
    Stdout,
    /// The inherited descriptor.
    Descriptor(std::fs::File),
}

/// Why `--ready-fd N` cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ReadyFdError {
    /// 0, 1 and 2 are stdin, stdout and stderr.
    #[error("--ready-fd {0}: descriptors 0, 1 and 2 are stdin, stdout and stderr; name another (3 or more), or leave --ready-fd out for the ready line on stdout")]
    Standard(i32),
    /// No such descriptor is open.
    #[error(
        "--ready-fd {fd}: descriptor {fd} is not open (open it for the tool, e.g. `3>FILE` in sh)"
    )]
    NotOpen {
        /// The descriptor.
        fd: i32,
        /// What the system said.
        #[source]
        source: std::io::Error,
    },
}

impl ReadyOut {
    /// Stdout without `fd`; else descriptor `fd`, taken over by this process. Call it first
    /// thing in `main`, before the process opens any file (see `sys::take_inherited`).
    pub fn open(fd: Option<i32>) -> Result<ReadyOut, ReadyFdError> {
        match fd {
            None => Ok(ReadyOut::Stdout),
            Some(fd @ 0..=2) => Err(ReadyFdError::Standard(fd)),
            Some(fd) => {
                let owned = crate::sys::take_inherited(fd)
                    .map_err(|source| ReadyFdError::NotOpen { fd, source })?;
                // Inherited across exec, it is not close-on-exec; a process this service
                // starts (the proxy's dialer) must not keep it open after the line.
                use nix::fcntl::{fcntl, FcntlArg, FdFlag};
                fcntl(&owned, FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC)).map_err(|errno| {
                    ReadyFdError::NotOpen {
                        fd,
                        source: errno.into(),
                    }
                })?;
                Ok(ReadyOut::Descriptor(std::fs::File::from(owned)))
            }
        }
    }

    /// Writes `ready` as one line, flushed; a descriptor is closed after it.
    pub fn write(self, ready: &Ready) -> Result<(), crate::jsonl::JsonlError> {
        match self {
            ReadyOut::Stdout => crate::jsonl::write_line(&mut std::io::stdout(), ready),
            ReadyOut::Descriptor(mut file) => crate::jsonl::write_line(&mut file, ready),
        }
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

#[cfg(test)]
mod ready_out_tests {
    use super::*;
    use std::io::Read;
    use std::os::fd::IntoRawFd;

    #[test]
    fn a_ready_line_on_a_named_descriptor_is_one_line_and_then_the_end() {
        let (mut reader, writer) = std::io::pipe().expect("pipe");
        // Handed over by number, as a caller's `3>FILE` does.
        let fd = std::os::fd::OwnedFd::from(writer).into_raw_fd();
        let out = ReadyOut::open(Some(fd)).expect("an open descriptor");
        out.write(&Ready::new("store", "127.0.0.1:9".parse().expect("addr")))
            .expect("write");
        // The descriptor was closed after the line: the read ends, with that one line.
        let mut text = String::new();
        reader.read_to_string(&mut text).expect("read to the end");
        assert_eq!(
            text,
            "{\"type\":\"ready\",\"version\":1,\"service\":\"store\",\"addr\":\"127.0.0.1:9\"}\n"
        );
    }

    #[test]
    fn the_standard_descriptors_and_closed_ones_are_refused_by_name() {
        let err = ReadyOut::open(Some(1)).expect_err("stdout by number");
        assert!(err.to_string().contains("--ready-fd 1"), "{err}");
        let err = ReadyOut::open(Some(987_654)).expect_err("not open");
        assert!(
            err.to_string()
                .contains("--ready-fd 987654: descriptor 987654 is not open"),
            "{err}"
        );
        assert!(matches!(ReadyOut::open(None), Ok(ReadyOut::Stdout)));
    }
}
