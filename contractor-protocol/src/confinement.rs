//! What a tool's confinement report ([`Confinement`], in its `ready` line) means for the
//! host: the `confinement` finding of `contractor doctor`, beside the VM host's findings of
//! `contractor-vm check` ([`Finding`]). It names the level that holds, what does not (the
//! tool's own warnings) and the kernel that would give the rest, so that every program that
//! is told a confinement judges it alike.

use crate::service::Confinement;
use crate::vm::{Finding, FindingStatus};

/// What a finding about confinement is about.
const WHAT: &str = "confinement";

/// The most confinement warnings shown per service.
pub const MAX_SHOWN_WARNINGS: usize = 16;

/// The warning lines to show for the confinement service `name` reported in its `ready`
/// line: each of its warnings (at most [`MAX_SHOWN_WARNINGS`]), or, when it reported none
/// at all (a tool of another release), that it may run unconfined.
pub fn warning_lines(name: &str, confinement: Option<&Confinement>) -> Vec<String> {
    match confinement {
        Some(confinement) => confinement
            .warnings
            .iter()
            .take(MAX_SHOWN_WARNINGS)
            .map(|warning| format!("{name}: {warning}"))
            .collect(),
        None => vec![format!(
            "{name} did not report its confinement; it may run unconfined"
        )],
    }
}

impl Confinement {
    /// The finding for this report: ok when everything holds, else a warning that says what
    /// does not hold and what would make it hold.
    pub fn finding(&self) -> Finding {
        let landlock = match (self.landlock_abi, self.landlock_fs, self.landlock_net) {
            (0, _, _) => "no Landlock".to_string(),
            (abi, true, true) => format!("Landlock ABI {abi} (files and TCP)"),
            (abi, true, false) => format!("Landlock ABI {abi} (files only)"),
            (abi, false, _) => format!("Landlock ABI {abi} (not enforced)"),
        };
        let seccomp = if self.seccomp {
            "seccomp"
        } else {
            "no seccomp"
        };
        let level = format!("{landlock}, {seccomp}, no_new_privs, rlimits");
        if self.enforced && self.warnings.is_empty() {
            return Finding::new(
                FindingStatus::Ok,
                WHAT,
                format!(
                    "{level}: the store, proxy and relay each reach only their own files and \
                     ports"
                ),
            );
        }
        let mut fixes = Vec::new();
        if self.landlock_abi == 0 {
            fixes.push(
                "Landlock needs Linux 5.13 or later with `landlock` in the lsm= boot parameter \
                 (or CONFIG_LSM)",
            );
        } else if !self.landlock_net {
            fixes.push("Landlock's TCP rules need Linux 6.7 or later (ABI 4)");
        }
        if !self.seccomp {
            fixes.push("seccomp filters need a kernel with CONFIG_SECCOMP_FILTER");
        }
        let fix = if fixes.is_empty() {
            String::new()
        } else {
            format!(". {}", fixes.join("; "))
        };
        Finding::new(
            FindingStatus::Warn,
            WHAT,
            format!(
                "{level}; what does not hold: {}{fix}",
                self.warnings.join("; ")
            ),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn confinement(abi: u32, net: bool, seccomp: bool, warnings: &[&str]) -> Confinement {
        Confinement {
            enforced: true,
            no_new_privs: true,
            landlock_abi: abi,
            landlock_fs: abi > 0,
            landlock_net: net,
            seccomp,
            rlimits: true,
            warnings: warnings.iter().map(ToString::to_string).collect(),
        }
    }

    #[test]
    fn the_finding_names_the_level_and_what_is_missing() {
        // Moved with the judgment from contractor-cli's doctor.rs.
        let full = confinement(7, true, true, &[]).finding();
        assert_eq!(full.status, FindingStatus::Ok);
        assert_eq!(full.what, "confinement");
        assert_eq!(
            full.detail,
            "Landlock ABI 7 (files and TCP), seccomp, no_new_privs, rlimits: the store, proxy \
             and relay each reach only their own files and ports"
        );

        let debian = confinement(2, false, true, &["TCP is NOT confined"]).finding();
        assert_eq!(debian.status, FindingStatus::Warn);
        assert_eq!(
            debian.detail,
            "Landlock ABI 2 (files only), seccomp, no_new_privs, rlimits; what does not hold: \
             TCP is NOT confined. Landlock's TCP rules need Linux 6.7 or later (ABI 4)"
        );

        let bare = confinement(0, false, false, &["no Landlock", "no seccomp"]).finding();
        assert_eq!(bare.status, FindingStatus::Warn);
        assert!(bare.detail.contains("lsm="), "{}", bare.detail);
        assert!(
            bare.detail.contains("CONFIG_SECCOMP_FILTER"),
            "{}",
            bare.detail
        );

        // Turned off on purpose: a warning even when the tool reported nothing else.
        let off = Confinement {
            enforced: false,
            ..confinement(7, true, true, &[])
        };
        assert_eq!(off.finding().status, FindingStatus::Warn);
    }

    #[test]
    fn warning_lines_name_the_service_and_are_bounded() {
        let many: Vec<String> = (0..40).map(|i| format!("w{i}")).collect();
        let many: Vec<&str> = many.iter().map(String::as_str).collect();
        let report = confinement(2, false, true, &many);
        let lines = warning_lines("contractor-proxy", Some(&report));
        assert_eq!(lines.len(), MAX_SHOWN_WARNINGS);
        assert_eq!(lines[0], "contractor-proxy: w0");
        assert!(
            warning_lines("contractor-store", Some(&confinement(7, true, true, &[]))).is_empty()
        );
        assert_eq!(
            warning_lines("contractor-store", None),
            ["contractor-store did not report its confinement; it may run unconfined"]
        );
    }
}
