//! `contractor-vm`: the builder VM lifecycle tool. All the work is in the library; see
//! `contractor_vm::cli` for the flags and the JSON rule.

fn main() -> std::process::ExitCode {
    contractor_vm::cli::run()
}
