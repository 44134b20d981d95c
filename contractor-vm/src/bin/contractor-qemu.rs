//! `contractor-qemu`: libvirt's `<emulator>` for builder domains under `qemu:///session`.
//! It confines itself and executes the real QEMU; see `contractor_vm::launcher`.

fn main() -> std::process::ExitCode {
    let Err(error) = contractor_vm::launcher::run();
    let mut message = format!("contractor-qemu: {error}");
    let mut source = std::error::Error::source(&error);
    while let Some(cause) = source {
        message.push_str(&format!(": {cause}"));
        source = cause.source();
    }
    eprintln!("{message}");
    std::process::ExitCode::from(1)
}
