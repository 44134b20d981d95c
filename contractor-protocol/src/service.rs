//! The one line a long-running service (`contractor-proxy`, `contractor-store`) prints on
//! stdout once it listens, so that the caller learns the port it picked.

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

use crate::PROTOCOL_VERSION;

/// `{"type":"ready","version":1,"service":"proxy","addr":"127.0.0.1:40123"}`
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename = "ready", deny_unknown_fields)]
pub struct Ready {
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
        Ready { version: PROTOCOL_VERSION, service: service.to_string(), addr }
    }
}
