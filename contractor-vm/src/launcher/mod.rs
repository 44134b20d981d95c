//! `contractor-qemu`, the launcher libvirt runs as a builder domain's `<emulator>` under
//! `qemu:///session`: it confines itself with `contractor-confine` to what this VM's QEMU
//! needs ([`policy`]: no new socket either), then executes the
//! real QEMU with the same arguments, so that QEMU,
//! which parses everything the hostile guest sends, runs confined (Firecracker's jailer does
//! the same for Firecracker). Under `qemu:///system` it is not used: QEMU runs as libvirt's
//! unprivileged `libvirt-qemu` user there.
//!
//! The invariant: QEMU is executed either under the full policy from [`POLICY_ENV`], or,
//! for libvirt's capability probe only (a command line without `-name`), under
//! `no_new_privs` and the seccomp filter with a warning. A domain without a policy, a
//! policy that does not parse, or a confinement that fails ends the launcher with an error
//! and QEMU is not started: never unconfined in silence.

pub mod argv;
pub mod policy;

use std::convert::Infallible;
use std::ffi::OsString;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};

pub use policy::{QemuPolicy, POLICY_ENV};

/// The launcher's file name, looked for beside `contractor-vm` (or in `$CONTRACTOR_BIN`).
pub const LAUNCHER_NAME: &str = contractor_protocol::tool::names::QEMU_LAUNCHER;

/// Where the real QEMU is looked for when no policy names it (libvirt's probe).
pub const QEMU_CANDIDATES: &[&str] = &["/usr/bin/qemu-system-x86_64", "/usr/libexec/qemu-kvm"];

/// Why the launcher did not execute QEMU.
#[derive(Debug, thiserror::Error)]
pub enum LauncherError {
    /// The policy is bad.
    #[error("refusing to start QEMU")]
    Policy(#[source] policy::PolicyError),
    /// The policy is not UTF-8.
    #[error("refusing to start QEMU: {} is not valid UTF-8", POLICY_ENV)]
    PolicyNotUtf8,
    /// A domain's command line came without a policy.
    #[error(
        "refusing to start QEMU for a domain (its command line has -name) without {}: \
         this launcher only runs domains that contractor-vm created, which sets it in the \
         domain XML (<qemu:env>)",
        POLICY_ENV
    )]
    NoPolicy,
    /// No QEMU found for the probe.
    #[error("no QEMU found: tried {}", QEMU_CANDIDATES.join(", "))]
    NoQemu,
    /// Confinement failed.
    #[error("cannot confine QEMU; not starting it")]
    Confine(#[source] contractor_confine::ConfineError),
    /// `execve` failed.
    #[error("cannot execute {}", path.display())]
    Exec {
        /// The QEMU tried.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// What the launcher is going to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Launch {
    /// A domain: the full confinement, then `qemu`.
    Confined {
        /// The real QEMU.
        qemu: PathBuf,
        /// Its confinement.
        policy: contractor_confine::Policy,
    },
    /// libvirt's capability probe: `no_new_privs` and seccomp only (the probe creates its
    /// QMP socket and pid file in libvirt's cache directory), then `qemu`.
    Probe {
        /// The real QEMU.
        qemu: PathBuf,
    },
}

/// Decides what to do for QEMU arguments `args` (without `argv[0]`) and the value of
/// [`POLICY_ENV`]. `exists` tells whether a QEMU candidate exists.
pub fn plan(
    args: &[OsString],
    policy: Option<&OsString>,
    exists: impl Fn(&Path) -> bool,
) -> Result<Launch, LauncherError> {
    match policy {
        Some(text) => {
            let text = text.to_str().ok_or(LauncherError::PolicyNotUtf8)?;
            let policy = QemuPolicy::parse(text).map_err(LauncherError::Policy)?;
            let confinement = policy.confinement(&argv::files_to_read(args));
            Ok(Launch::Confined {
                qemu: policy.qemu,
                policy: confinement,
            })
        }
        None if argv::starts_a_domain(args) => Err(LauncherError::NoPolicy),
        None => QEMU_CANDIDATES
            .iter()
            .map(PathBuf::from)
            .find(|p| exists(p))
            .map(|qemu| Launch::Probe { qemu })
            .ok_or(LauncherError::NoQemu),
    }
}

/// Confines this process as `launch` says and executes QEMU with `args`. Returns only on
/// failure.
pub fn launch(launch: Launch, args: &[OsString]) -> Result<Infallible, LauncherError> {
    let qemu = match launch {
        Launch::Confined { qemu, policy } => {
            contractor_confine::confine(LAUNCHER_NAME, &policy).map_err(LauncherError::Confine)?;
            qemu
        }
        Launch::Probe { qemu } => {
            eprintln!(
                "{LAUNCHER_NAME}: warning: no {POLICY_ENV} and no -name: treating this as \
                 libvirt's capability probe; QEMU runs with no_new_privs and seccomp only, \
                 without file-system or network rules"
            );
            nix::sys::prctl::set_no_new_privs().map_err(|e| {
                LauncherError::Confine(contractor_confine::ConfineError::NoNewPrivs(e))
            })?;
            let mut warnings = Vec::new();
            let probe = contractor_confine::Policy {
                allow_exec: true,
                ..contractor_confine::Policy::default()
            };
            contractor_confine::seccomp::apply(&probe, &mut warnings)
                .map_err(LauncherError::Confine)?;
            for warning in warnings {
                eprintln!("{LAUNCHER_NAME}: warning: {warning}");
            }
            qemu
        }
    };
    let source = std::process::Command::new(&qemu)
        .arg0(&qemu)
        .args(args)
        .exec();
    Err(LauncherError::Exec { path: qemu, source })
}

/// The launcher's whole run: arguments and environment in, QEMU executed (or an error).
pub fn run() -> Result<Infallible, LauncherError> {
    let args: Vec<OsString> = std::env::args_os().skip(1).collect();
    let policy = std::env::var_os(POLICY_ENV);
    let plan = plan(&args, policy.as_ref(), Path::exists)?;
    launch(plan, &args)
}

/// Where `contractor-vm` finds the launcher: in `$CONTRACTOR_BIN` when set, else beside its
/// own executable (the convention of the front end's tools).
pub fn launcher_path() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("CONTRACTOR_BIN").filter(|d| !d.is_empty()) {
        return Some(PathBuf::from(dir).join(LAUNCHER_NAME));
    }
    let exe = std::env::current_exe().ok()?;
    let mut dir = exe.parent()?.to_path_buf();
    // A unit test runs from target/<profile>/deps/; the binaries are one level up.
    if cfg!(test) && dir.file_name().is_some_and(|n| n == "deps") {
        dir.pop();
    }
    Some(dir.join(LAUNCHER_NAME))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(list: &[&str]) -> Vec<OsString> {
        list.iter().map(OsString::from).collect()
    }

    fn policy_json() -> OsString {
        OsString::from(
            r#"{"version":1,"qemu":"/opt/qemu/bin/qemu-system-x86_64","accel":"tcg","memory_mib":1024,
            "image_disk":"/i/d.qcow2","kernel":"/i/k","overlay":{"path":"/w/o.qcow2","max_bytes":100}}"#,
        )
    }

    #[test]
    fn a_domain_with_a_policy_is_confined_and_runs_the_policys_qemu() {
        let a = args(&[
            "-name",
            "guest=contractor-x",
            "-object",
            r#"{"qom-type":"secret","id":"masterKey0","format":"raw","file":"/k/master-key.aes"}"#,
        ]);
        let Launch::Confined { qemu, policy } =
            plan(&a, Some(&policy_json()), |_| false).expect("plan")
        else {
            panic!("not confined")
        };
        assert_eq!(qemu, Path::new("/opt/qemu/bin/qemu-system-x86_64"));
        assert!(policy.read.contains(&PathBuf::from("/k/master-key.aes")));
        assert!(policy.read_write.contains(&PathBuf::from("/w/o.qcow2")));
        assert_eq!(policy.max_file_size, Some(100));
    }

    #[test]
    fn a_domain_without_a_policy_is_refused() {
        let e = plan(&args(&["-name", "guest=x"]), None, |_| true).expect_err("refused");
        assert!(matches!(e, LauncherError::NoPolicy));
        assert!(e.to_string().contains("CONTRACTOR_QEMU_POLICY"));
    }

    #[test]
    fn a_bad_policy_is_refused_even_for_a_probe() {
        let bad = OsString::from(r#"{"version":1}"#);
        let e = plan(&args(&["-machine", "none"]), Some(&bad), |_| true).expect_err("bad");
        let chain = format!("{e}: {}", std::error::Error::source(&e).expect("source"));
        assert!(chain.contains("missing field"), "{chain}");
    }

    #[test]
    fn the_probe_finds_qemu_in_the_fixed_list() {
        let a = args(&[
            "-machine",
            "none,accel=kvm:tcg",
            "-qmp",
            "unix:/x,server=on",
        ]);
        assert_eq!(
            plan(&a, None, |p| p == Path::new("/usr/libexec/qemu-kvm")).expect("plan"),
            Launch::Probe {
                qemu: PathBuf::from("/usr/libexec/qemu-kvm")
            }
        );
        assert!(matches!(
            plan(&a, None, |_| false),
            Err(LauncherError::NoQemu)
        ));
    }
}
