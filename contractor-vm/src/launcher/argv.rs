//! What the launcher reads from the QEMU command line libvirt gives it: whether it starts a
//! real domain (`-name`) or a capability probe, and the files QEMU must read that only the
//! command line names (libvirt's master-key file, `-object secret,...,file=PATH`).
//!
//! The invariant: the command line is only read, never changed; QEMU gets it as it came.

use std::ffi::OsString;
use std::path::PathBuf;

/// True when the command line starts a domain (libvirt passes `-name guest=...`), false for
/// libvirt's capability probe (`-machine none ... -qmp unix:...`).
pub fn starts_a_domain(args: &[OsString]) -> bool {
    args.iter().any(|a| a == "-name" || a == "--name")
}

/// The files of `-object secret` objects (libvirt's master key): QEMU reads them at start.
/// Both spellings are understood: JSON (`{"qom-type":"secret",...,"file":"..."}`, what
/// libvirt 9 writes) and keyval (`secret,id=masterKey0,format=raw,file=...`).
pub fn files_to_read(args: &[OsString]) -> Vec<PathBuf> {
    args.windows(2)
        .filter(|pair| pair[0] == "-object" || pair[0] == "--object")
        .filter_map(|pair| pair[1].to_str())
        .filter_map(secret_file)
        .collect()
}

fn secret_file(object: &str) -> Option<PathBuf> {
    if object.trim_start().starts_with('{') {
        let value: serde_json::Value = serde_json::from_str(object).ok()?;
        if value.get("qom-type")?.as_str()? != "secret" {
            return None;
        }
        return value.get("file")?.as_str().map(PathBuf::from);
    }
    let fields = keyval(object);
    let mut fields = fields.iter();
    let kind = fields.next()?;
    if kind != "secret" && kind != "qom-type=secret" {
        return None;
    }
    fields
        .find_map(|f| f.strip_prefix("file="))
        .map(PathBuf::from)
}

/// QEMU's keyval list split at single commas (`,,` is a literal comma).
fn keyval(text: &str) -> Vec<String> {
    let mut fields = Vec::new();
    let mut field = String::new();
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if c != ',' {
            field.push(c);
        } else if chars.peek() == Some(&',') {
            chars.next();
            field.push(',');
        } else {
            fields.push(std::mem::take(&mut field));
        }
    }
    fields.push(field);
    fields
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(list: &[&str]) -> Vec<OsString> {
        list.iter().map(OsString::from).collect()
    }

    #[test]
    fn a_domain_has_a_name_a_probe_does_not() {
        assert!(starts_a_domain(&args(&[
            "-name",
            "guest=contractor-x,debug-threads=on",
            "-S"
        ])));
        assert!(!starts_a_domain(&args(&[
            "-S",
            "-no-user-config",
            "-machine",
            "none,accel=kvm:tcg",
            "-qmp",
            "unix:/home/u/.cache/libvirt/qemu/qmp-1/qmp.monitor,server=on,wait=off",
        ])));
    }

    #[test]
    fn the_master_key_file_is_found_in_either_spelling() {
        let json = r#"{"qom-type":"secret","id":"masterKey0","format":"raw","file":"/home/u/.config/libvirt/qemu/lib/domain-3-contractor-x/master-key.aes"}"#;
        let found = files_to_read(&args(&[
            "-object",
            r#"{"qom-type":"memory-backend-ram","id":"pc.ram","size":805306368}"#,
            "-object",
            json,
            "-object",
            "secret,id=k,format=raw,file=/a,,b/key",
            "-object",
            "rng-random,id=objrng0,filename=/dev/urandom",
            "-name",
            "file=/not/this",
        ]));
        assert_eq!(
            found,
            vec![
                PathBuf::from(
                    "/home/u/.config/libvirt/qemu/lib/domain-3-contractor-x/master-key.aes"
                ),
                PathBuf::from("/a,b/key"),
            ]
        );
        assert!(files_to_read(&args(&["-object", "{bad json", "-object"])).is_empty());
    }
}
