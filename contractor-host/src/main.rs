//! `contractor-host`: `build` is the build host's side of `contractor build --host` (run
//! over SSH); `resolve`, `hosts`, `send` and `vm` are the front end's side, run by
//! `contractor` on its own machine (docs/protocol.md).

fn main() -> std::process::ExitCode {
    use contractor_protocol::fleet::{HOSTS_COMMAND, RESOLVE_COMMAND, SEND_COMMAND, VM_COMMAND};
    use contractor_protocol::hosted::HOSTED_COMMAND;
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    // The requests always answer errors in JSON; the flag the front end adds is accepted.
    if args.first().is_some_and(|c| c != VM_COMMAND)
        && args.last().is_some_and(|a| a == "--json-errors")
    {
        args.pop();
    }
    let code = match args.split_first() {
        Some((command, [])) if command == HOSTED_COMMAND => contractor_host::serve(),
        Some((command, [])) if command == SEND_COMMAND => contractor_host::send::send(),
        Some((command, [])) if command == RESOLVE_COMMAND => contractor_host::queries::resolve(),
        Some((command, [])) if command == HOSTS_COMMAND => contractor_host::queries::hosts(),
        Some((command, rest)) if command == VM_COMMAND => {
            return contractor_host::queries::vm(rest)
        }
        _ => {
            eprintln!(
                "usage: contractor-host {HOSTED_COMMAND}|{SEND_COMMAND}|{RESOLVE_COMMAND}|{HOSTS_COMMAND}  \
                 (requests on stdin, answers on stdout, docs/protocol.md), or \
                 contractor-host {VM_COMMAND} --host HOST check [--uri URI]"
            );
            contractor_protocol::ExitCode::BadInput
        }
    };
    code.into()
}
