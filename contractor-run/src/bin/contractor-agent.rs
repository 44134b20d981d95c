//! The guest agent: init (PID 1) of the builder VM, or `contractor-agent serve` under
//! another init.

use contractor_run::guest;

fn main() -> std::process::ExitCode {
    if std::process::id() == 1 {
        if guest::initrd::is_stage1() {
            guest::initrd::switch_to_root();
        }
        guest::init::run_as_init();
    }
    if let Err(err) = contractor_protocol::limits::raise_open_files() {
        eprintln!("contractor-agent: warning: cannot raise the open-files limit: {err}");
    }
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("contractor-agent: cannot start the async runtime: {err}");
            return std::process::ExitCode::from(3);
        }
    };
    match runtime.block_on(guest::agent::serve()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            eprintln!(
                "contractor-agent: {}",
                contractor_protocol::result::joined_chain(&err)
            );
            std::process::ExitCode::from(3)
        }
    }
}
