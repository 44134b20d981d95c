//! `contractor-cli`: the Contractor front end (the design card's name for `contractor`).

fn main() -> std::process::ExitCode {
    contractor_cli::app::main()
}
