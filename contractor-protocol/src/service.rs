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
}

impl Ready {
    /// A ready line for `service` listening on `addr`.
    pub fn new(service: &str, addr: SocketAddr) -> Self {
        Ready {
            kind: ReadyTag::Ready,
            version: PROTOCOL_VERSION,
            service: service.to_string(),
            addr,
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
