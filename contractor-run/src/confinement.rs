//! What the relay (`contractor-run`) may still reach once it confines itself
//! ([`policy`]): nothing on the file system (the VM's two channel sockets and the build log
//! are open before), no TCP bind, and TCP connect only to the proxy's and the store's
//! ports, the two places a guest stream can be relayed to.

use contractor_confine::Policy;
use contractor_protocol::run::RunRequest;

/// The most files the relay holds open: 1024, room for the [`crate::tunnel::MAX_TUNNEL_STREAMS`]
/// relayed streams (one TCP connection each) and its channels, log and runtime.
pub const MAX_OPEN_FILES: u64 = 1024;

/// The confinement policy of a relay that runs `request`.
pub fn policy(request: &RunRequest) -> Policy {
    let mut ports = vec![request.proxy.port(), request.store.port()];
    ports.dedup();
    Policy {
        read: Vec::new(),
        read_write: Vec::new(),
        bind_ports: Vec::new(),
        connect_ports: Some(ports),
        max_open_files: Some(MAX_OPEN_FILES),
        // No RLIMIT_FSIZE: the relay bounds the log itself (`max_log_bytes`), and the limit
        // would also cap the file its stderr is appended to.
        max_file_size: None,
        max_address_space: Some(contractor_confine::TOOL_ADDRESS_SPACE),
        allow_exec: false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_relay_reaches_no_file_and_only_the_proxy_and_the_store() {
        let request: RunRequest = serde_json::from_value(serde_json::json!({
            "version": 1, "control_socket": "/c", "tunnel_socket": "/t",
            "proxy": "127.0.0.1:4001", "store": "127.0.0.1:4002", "log": "/l",
            "timeout_secs": 1, "boot_timeout_secs": 1,
            "job": {"script": "true", "source": "/s", "artifacts_dest": "/a/"}
        }))
        .expect("request");
        let policy = policy(&request);
        assert!(policy.read.is_empty() && policy.read_write.is_empty());
        assert!(policy.bind_ports.is_empty() && !policy.allow_exec);
        assert_eq!(policy.connect_ports, Some(vec![4001, 4002]));
    }
}
