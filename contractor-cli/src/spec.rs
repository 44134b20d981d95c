//! `contractor.toml` as contractor-spec reads it, with the images this machine has
//! imported (`contractor image import`, which contractor-vm lists) as valid names too.

use std::path::Path;

pub use contractor_spec::spec::*;

/// The names of the images imported here; none when contractor-vm cannot list them (then
/// only the built images are valid names).
pub fn imported_images() -> Vec<String> {
    crate::image::list()
        .unwrap_or_default()
        .into_iter()
        .filter(|i| i.manifest.suite == crate::image::IMPORTED)
        .map(|i| i.manifest.name)
        .collect()
}

/// Reads and checks the spec file at `path` and the project's contractor.lock.
pub fn load(path: &Path) -> Result<BuildSpec, SpecError> {
    load_with_images(path, &imported_images())
}
