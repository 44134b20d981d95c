//! The proxy's side of its dialer when the proxy has no free file descriptor: the kernel
//! cannot hand it the connected socket (`SCM_RIGHTS` cut, `MSG_CTRUNC`), that one
//! connection fails saying so, and the next one, once a descriptor is free, is answered —
//! the dialer is not taken for gone. A stand-in dialer on the other end of the socket pair
//! answers as the real one does; this file holds one test because it lowers the
//! process's own file limit.

use std::io::IoSlice;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, OwnedFd};
use std::time::Duration;

use contractor_proxy::dialer::Dialer;
use nix::sys::resource::{getrlimit, setrlimit, Resource};
use nix::sys::socket::{
    recv, sendmsg, socketpair, AddressFamily, ControlMessage, MsgFlags, SockFlag, SockType,
};

/// Answers every `connect` request on `socket` with a connection to `upstream`, the socket
/// attached, as the dialer process does. (The connections are made up front: this stand-in
/// lives in the process whose descriptors the test takes.)
fn stand_in_dialer(socket: OwnedFd, upstream: SocketAddr) {
    let mut connections: Vec<TcpStream> = (0..3)
        .map(|_| TcpStream::connect(upstream).expect("connect upstream"))
        .collect();
    std::thread::spawn(move || {
        // Kept open after sending, so that no descriptor of this process frees up.
        let mut sent = Vec::new();
        let mut buf = [0u8; 8192];
        loop {
            let n = match recv(socket.as_raw_fd(), &mut buf, MsgFlags::empty()) {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            let request: serde_json::Value = serde_json::from_slice(&buf[..n]).expect("request");
            assert_eq!(request["op"], "connect", "{request}");
            let answer = serde_json::json!({"op": "connected", "id": request["id"]}).to_string();
            let stream = connections.pop().expect("a connection made up front");
            let fds = [stream.as_raw_fd()];
            sendmsg::<()>(
                socket.as_raw_fd(),
                &[IoSlice::new(answer.as_bytes())],
                &[ControlMessage::ScmRights(&fds)],
                MsgFlags::empty(),
                None,
            )
            .expect("send the answer");
            sent.push(stream);
        }
    });
}

#[tokio::test]
async fn a_socket_the_proxy_has_no_descriptor_for_fails_that_connection_not_the_dialer() {
    let upstream = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = upstream.local_addr().expect("addr");
    let (ours, theirs) = socketpair(
        AddressFamily::Unix,
        SockType::SeqPacket,
        None,
        SockFlag::SOCK_CLOEXEC,
    )
    .expect("socket pair");
    stand_in_dialer(theirs, addr);
    let dialer = Dialer::start(ours).expect("start");
    let patience = Duration::from_secs(10);
    dialer
        .connect(addr, patience)
        .await
        .expect("a first connection");

    // Every descriptor taken: lower the soft limit and fill up to it.
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).expect("getrlimit");
    let mut filler = Vec::new();
    setrlimit(Resource::RLIMIT_NOFILE, 256, hard).expect("setrlimit");
    while let Ok(file) = std::fs::File::open("/dev/null") {
        filler.push(file);
    }
    let failed = dialer
        .connect(addr, patience)
        .await
        .expect_err("no descriptor for the socket");
    let reason = failed.to_string();
    assert!(reason.contains("no free file descriptor"), "{reason}");

    drop(filler);
    setrlimit(Resource::RLIMIT_NOFILE, soft, hard).expect("setrlimit");
    let again = dialer.connect(addr, patience).await;
    assert!(again.is_ok(), "after descriptors were freed: {again:?}");
}
