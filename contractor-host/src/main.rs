//! `contractor-host build`: the build host's side of `contractor build --host` (see the
//! library's documentation and docs/protocol.md). Run by the front end over SSH.

fn main() -> std::process::ExitCode {
    let mut args = std::env::args_os().skip(1);
    match (args.next(), args.next()) {
        (Some(command), None) if command == contractor_protocol::hosted::HOSTED_COMMAND => {
            contractor_host::serve().into()
        }
        _ => {
            eprintln!(
                "usage: contractor-host {}  (run by `contractor build --host` over SSH; \
                 the protocol is on stdin and stdout, docs/protocol.md)",
                contractor_protocol::hosted::HOSTED_COMMAND
            );
            contractor_protocol::ExitCode::BadInput.into()
        }
    }
}
