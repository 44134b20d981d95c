//! `contractor-attest`: one request (JSON) on stdin, one answer on stdout; see `cli`.

fn main() -> std::process::ExitCode {
    contractor_attest::cli::run()
}
