//! Builder images, as the front end sees them: `contractor-vm image build|import|list|rm`
//! builds, imports, lists and removes them (docs/protocol.md, "contractor-vm image"); this
//! module runs it as a child process and reads its one JSON answer. The progress of a build
//! is contractor-vm's stderr, which is ours.
//!
//! The invariant: the front end never reads or writes an image directory itself; what it
//! knows of an image is what contractor-vm printed.

use std::ffi::OsStr;
use std::path::Path;

use contractor_protocol::image::ImageResult;
pub use contractor_protocol::image::{ImageInfo, Manifest, IMPORTED};
use contractor_protocol::ExitCode;

use crate::tools::{self, ToolError};

/// Why an image could not be had.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// contractor-vm could not be run, or reported a failure.
    #[error(transparent)]
    Tool(#[from] ToolError),
    /// contractor-vm answered with another message than the one asked for.
    #[error("contractor-vm answered `image {command}` with a {got:?} message")]
    Unexpected {
        /// The subcommand.
        command: &'static str,
        /// The type of its answer.
        got: &'static str,
    },
}

impl ImageError {
    /// The exit code for this error: `BadInput` when contractor-vm refused its input (a bad
    /// or unknown name, a bad file to import), `Infrastructure` otherwise.
    pub fn exit_code(&self) -> ExitCode {
        match self {
            ImageError::Tool(e) => e.exit_code(),
            ImageError::Unexpected { .. } => ExitCode::Infrastructure,
        }
    }
}

/// Runs `contractor-vm image <command> <args>` and takes from its answer what `pick` finds
/// there; any other message than the one asked for is [`ImageError::Unexpected`].
fn image_tool<T>(
    command: &'static str,
    args: &[&OsStr],
    pick: impl FnOnce(ImageResult) -> Result<T, ImageResult>,
) -> Result<T, ImageError> {
    let mut all: Vec<&OsStr> = vec![OsStr::new("image"), OsStr::new(command)];
    all.extend_from_slice(args);
    pick(tools::answer::<ImageResult>(tools::VM, &all)?).map_err(|other| ImageError::Unexpected {
        command,
        got: other.kind(),
    })
}

/// The image of an `image` answer (`image build`, `image import`).
fn one_image(result: ImageResult) -> Result<ImageInfo, ImageResult> {
    match result {
        ImageResult::Image { image, .. } => Ok(*image),
        other => Err(other),
    }
}

/// Returns the image `name`, which contractor-vm builds first if it is missing or carries
/// another agent.
pub fn ensure(name: &str) -> Result<ImageInfo, ImageError> {
    image_tool("build", &[OsStr::new(name)], one_image)
}

/// The image derived from `base` with `packages` (`[image]` of a spec), built first when
/// missing.
pub fn ensure_derived(
    base: &str,
    packages: &[String],
    check_valid_until: bool,
) -> Result<ImageInfo, ImageError> {
    let mut args = vec![OsStr::new("--base"), OsStr::new(base)];
    for package in packages {
        args.push(OsStr::new("--package"));
        args.push(OsStr::new(package));
    }
    if !check_valid_until {
        args.push(OsStr::new("--no-check-valid-until"));
    }
    image_tool("build", &args, one_image)
}

/// Imports `disk` as the image `name`, with `boot` (kernel, initrd) when given, else with
/// the kernel and initrd contractor-vm finds in the disk.
pub fn import(
    name: &str,
    disk: &Path,
    boot: Option<(&Path, &Path)>,
) -> Result<ImageInfo, ImageError> {
    let mut args = vec![OsStr::new(name), OsStr::new("--disk"), disk.as_os_str()];
    if let Some((kernel, initrd)) = boot {
        args.extend([
            OsStr::new("--kernel"),
            kernel.as_os_str(),
            OsStr::new("--initrd"),
            initrd.as_os_str(),
        ]);
    }
    image_tool("import", &args, one_image)
}

/// The images contractor-vm has, by name.
pub fn list() -> Result<Vec<ImageInfo>, ImageError> {
    image_tool("list", &[], |result| match result {
        ImageResult::Images { images, .. } => Ok(images),
        other => Err(other),
    })
}

/// Removes the image `name`.
pub fn remove(name: &str) -> Result<(), ImageError> {
    image_tool("rm", &[OsStr::new(name)], |result| match result {
        ImageResult::Removed { .. } => Ok(()),
        other => Err(other),
    })
}

/// Removes the derived images no build used for `days` days; returns their names.
pub fn gc(days: u32) -> Result<Vec<String>, ImageError> {
    let days = days.to_string();
    let args = [OsStr::new("--days"), OsStr::new(&days)];
    image_tool("gc", &args, |result| match result {
        ImageResult::Collected { removed, .. } => Ok(removed),
        other => Err(other),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_answer_becomes_an_image_that_boots_as_reported() {
        let line = r#"{"type":"image","version":1,"image":{"name":"x","dir":"/d/images/x",
            "boot":{"disk":"/d/images/x/disk.qcow2","kernel":"/d/images/x/vmlinuz",
            "initrd":"/d/images/x/initramfs.img","cmdline":"root=/dev/vda"},"size":3,
            "manifest":{"version":2,"name":"x","suite":"bookworm","created":1,
            "disk_sha256":"d","agent_version":"0.1.0","agent_sha256":"a",
            "cmdline":"root=/dev/vda"}}}"#;
        let result: ImageResult = serde_json::from_str(line).expect("an image answer");
        let image = one_image(result).expect("an image");
        assert_eq!(image.dir, Path::new("/d/images/x"));
        assert_eq!(
            image.boot.initrd.as_deref(),
            Some(Path::new("/d/images/x/initramfs.img"))
        );
        let removed = ImageResult::Removed {
            version: 1,
            name: "x".into(),
        };
        let other = one_image(removed).expect_err("not an image");
        assert_eq!(other.kind(), "removed");
    }
}
