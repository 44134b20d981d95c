//! `contractor`: the Contractor front end.

fn main() -> std::process::ExitCode {
    contractor_cli::app::main()
}
