//! The download cache that the builds' proxies share (`contractor-proxy --cache`), as every
//! program that starts a proxy for a build finds it: its directory (`downloads/` in the data
//! directory), the most bytes it may hold (`CONTRACTOR_DOWNLOAD_CACHE_SIZE`, the proxy's
//! `--cache-size`), the most one build may add (the proxy's `--cache-max`) and the key of a
//! project's index in it (the proxy's `--cache-project`). The proxy keeps the cache under
//! those bounds itself (docs/proxy.md, "The download cache").

use std::path::{Path, PathBuf};

use sha2::Digest;

/// The download cache's size unless `CONTRACTOR_DOWNLOAD_CACHE_SIZE` says otherwise.
pub const DEFAULT_MAX_BYTES: u64 = 10 << 30;

/// The variable that sets the download cache's size (`20GiB`, `512MiB`, `0` for none kept).
pub const SIZE_VARIABLE: &str = "CONTRACTOR_DOWNLOAD_CACHE_SIZE";

/// The most bytes one build adds to the cache (`contractor-proxy --cache-max`): half its
/// size, so that one build never pushes out more than half of what others kept, and
/// never what their locks pin.
pub fn build_quota(size: u64) -> u64 {
    size / 2
}

/// The download cache directory: `downloads/` in the data directory
/// ([`crate::image::data_dir`]).
pub fn dir() -> Result<PathBuf, crate::image::NoDataDir> {
    Ok(crate::image::data_dir()?.join("downloads"))
}

/// The key of the project directory `dir` (`--cache-project`): the first 16 bytes, in hex,
/// of the SHA-256 of this machine's id (`/etc/machine-id`, else its host name), a zero byte
/// and the directory's path. The same for every build of the project from this machine, so
/// that its index (and on a build host its build cache) is reused; another machine's project
/// of the same path gets another.
pub fn project_key(dir: &Path) -> String {
    let machine = std::fs::read("/etc/machine-id")
        .or_else(|_| std::fs::read("/proc/sys/kernel/hostname"))
        .unwrap_or_default();
    let mut hash = sha2::Sha256::new();
    hash.update(&machine);
    hash.update([0]);
    hash.update(dir.as_os_str().as_encoded_bytes());
    hash.finalize()
        .iter()
        .take(16)
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The most bytes the cache may hold: `CONTRACTOR_DOWNLOAD_CACHE_SIZE`, else
/// [`DEFAULT_MAX_BYTES`]. The error names the variable and what is accepted.
pub fn max_bytes() -> Result<u64, String> {
    match std::env::var(SIZE_VARIABLE) {
        Err(std::env::VarError::NotPresent) => Ok(DEFAULT_MAX_BYTES),
        Err(std::env::VarError::NotUnicode(_)) => Err(format!("{SIZE_VARIABLE} is not text")),
        Ok(text) => parse_max(&text),
    }
}

/// The size `text` of [`SIZE_VARIABLE`]: a size with a unit, or `0`.
fn parse_max(text: &str) -> Result<u64, String> {
    let has_unit = text.trim().ends_with(|c: char| c.is_ascii_alphabetic());
    match crate::units::parse_size(text) {
        _ if text.trim() == "0" => Ok(0),
        Ok(bytes) if has_unit => Ok(bytes),
        _ => Err(format!(
            "{SIZE_VARIABLE}={text:?} is not a size; write it with a unit (\"20GiB\", \
             \"512MiB\") or 0 to keep nothing"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_size_needs_a_unit_or_zero() {
        // Moved with the setting from contractor-cli's downloads.rs.
        assert_eq!(parse_max("20GiB"), Ok(20 << 30));
        assert_eq!(parse_max("0"), Ok(0));
        for bad in ["20", "lots", "-1GiB", ""] {
            let error = parse_max(bad).expect_err(bad);
            assert!(
                error.contains(SIZE_VARIABLE) && error.contains("20GiB"),
                "{error}"
            );
        }
    }

    #[test]
    fn a_projects_key_is_its_path_on_this_machine() {
        // Moved with the key from contractor-cli's paths.rs; examples/pipeline.sh makes the
        // same key with sha256sum.
        let key = project_key(Path::new("/src/app"));
        assert_eq!(key.len(), 32);
        assert!(key
            .bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()));
        assert_eq!(key, project_key(Path::new("/src/app")));
        assert_ne!(key, project_key(Path::new("/src/other")));
        let machine = std::fs::read("/etc/machine-id")
            .or_else(|_| std::fs::read("/proc/sys/kernel/hostname"))
            .unwrap_or_default();
        let mut hash = sha2::Sha256::new();
        hash.update([machine.as_slice(), b"\0/src/app"].concat());
        let whole: String = hash.finalize().iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(key, whole[..32]);
    }

    #[test]
    fn one_build_adds_at_most_half_of_the_cache() {
        assert_eq!(build_quota(DEFAULT_MAX_BYTES), 5 << 30);
        assert_eq!(build_quota(0), 0);
    }
}
