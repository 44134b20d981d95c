//! The error object a tool prints on stdout with `--json-errors` when it cannot do what it
//! was asked: `{"type":"error","version":1,"code":"...","chain":["...","..."]}`. Every tool
//! prints the same shape, so a pipeline reads failures the way it reads results. Its `code`
//! is a [`ToolCode`]: one name per failure, the same string on the wire as before it was an
//! enum, and a code this reader does not know still parses (as [`ToolCode::Other`]).

use serde::{Deserialize, Serialize};

use crate::PROTOCOL_VERSION;

/// Declares [`ToolCode`] from one table of variants and their wire strings, so that the
/// name a tool writes and the name a reader matches cannot drift apart.
macro_rules! tool_codes {
    ($($(#[$doc:meta])* $variant:ident = $wire:literal,)*) => {
        /// The `code` of a tool's error object (docs/protocol.md, "Errors as data"), as the
        /// tools write it and the front end matches it. On the wire it is the snake_case
        /// string shown with each variant. A code not in this list (from a newer tool, or
        /// the front end's own [`crate::result::BuildCode`] strings that are no tool's) reads
        /// as [`ToolCode::Other`] with its string and is written back unchanged, so adding
        /// a code stays a compatible change.
        #[derive(Debug, Clone, PartialEq, Eq, Hash)]
        pub enum ToolCode {
            $($(#[$doc])* $variant,)*
            /// A code this reader does not know, as it was written.
            Other(String),
        }

        impl ToolCode {
            /// The code as written on the wire.
            pub fn as_str(&self) -> &str {
                match self {
                    $(ToolCode::$variant => $wire,)*
                    ToolCode::Other(code) => code,
                }
            }

            /// The code written as `code`: a known one, or [`ToolCode::Other`].
            pub fn parse(code: &str) -> ToolCode {
                match code {
                    $($wire => ToolCode::$variant,)*
                    other => ToolCode::Other(other.to_string()),
                }
            }
        }
    };
}

tool_codes! {
    // Every tool.
    /// Bad flags (the chain holds clap's first line); exit 2.
    Usage = "usage",
    /// An empty stdin where a request was expected; exit 2.
    NoRequest = "no_request",
    /// stdin is not JSON, or not a valid request; exit 2.
    BadJson = "bad_json",
    /// The request's `version` (or a feature it asks for) is not supported; exit 2.
    Unsupported = "unsupported",
    /// stdin could not be read; exit 3.
    Stdin = "stdin",
    /// The answer could not be written to stdout; exit 3.
    Stdout = "stdout",
    /// The async runtime could not start; exit 3.
    Runtime = "runtime",
    /// A service could not listen, or stopped serving; exit 3.
    Serve = "serve",
    /// A service's `--ready-fd N` names stdin, stdout, stderr or no open descriptor; exit 2.
    BadReadyFd = "bad_ready_fd",
    // contractor-vm.
    /// The request's `type` does not match the subcommand; exit 2.
    WrongRequestType = "wrong_request_type",
    /// An invalid VM name; exit 2.
    BadName = "bad_name",
    /// An invalid VM spec; exit 2.
    BadSpec = "bad_spec",
    /// A missing kernel, initrd or disk; exit 2.
    MissingFile = "missing_file",
    /// No such VM; exit 2.
    NotFound = "not_found",
    /// libvirt cannot be reached at the URI; exit 3.
    LibvirtUnreachable = "libvirt_unreachable",
    /// libvirt refused an operation; exit 3.
    Libvirt = "libvirt",
    /// The overlay could not be made or removed; exit 3.
    Overlay = "overlay",
    /// libvirt's XML was unreadable; exit 3.
    DomainXml = "domain_xml",
    /// `contractor-qemu` is not beside `contractor-vm` (`qemu:///session`); exit 3.
    MissingLauncher = "missing_launcher",
    /// No real QEMU for the launcher to execute; exit 3.
    NoQemu = "no_qemu",
    /// `accel: kvm` where KVM cannot work (no vmx/svm flag, no `/dev/kvm`, the user cannot
    /// open it under `qemu:///session`, libvirt offers no KVM); exit 2 (3 when libvirt did
    /// not report its capabilities).
    KvmUnusable = "kvm_unusable",
    // contractor-vm image.
    /// Not an image name; exit 2.
    BadImageName = "bad_image_name",
    /// No such image, and no recipe for it; exit 2.
    NoImage = "no_image",
    /// An import under a built image's name; exit 2.
    BuiltImageName = "built_image_name",
    /// An import's disk, kernel or initrd is not what an image needs; exit 2.
    BadImport = "bad_import",
    /// A bad base or package of a derived image, or one the mirror lacks; exit 2.
    BadPackages = "bad_packages",
    /// No data directory; exit 2.
    DataDir = "data_dir",
    /// The guest agent binary is missing; exit 3.
    NoAgent = "no_agent",
    /// mmdebstrap, debugfs, qemu-img … failed; exit 3.
    ImageTool = "image_tool",
    /// mmdebstrap failed for another reason than a missing package; exit 3.
    ImageApt = "image_apt",
    /// An image tool is not installed; exit 3.
    ImageToolMissing = "image_tool_missing",
    /// File work on an image failed; exit 3.
    ImageFile = "image_file",
    /// The built root has no kernel or a needed module; exit 3.
    ImageContents = "image_contents",
    /// An image's manifest is unreadable; exit 3.
    Manifest = "manifest",
    // contractor-proxy.
    /// A flag or the config file; exit 2.
    BadConfig = "bad_config",
    /// A bad allow rule; exit 2.
    BadRule = "bad_rule",
    /// A bad `--pins` file; exit 2.
    BadPins = "bad_pins",
    /// A bad `--cache-project`; exit 2.
    BadCacheProject = "bad_cache_project",
    /// The download cache could not be opened or read; exit 3.
    Cache = "cache",
    /// The proxy's resolver and dialer could not start; exit 3.
    Dialer = "dialer",
    /// TLS inspection could not be set up; exit 3.
    Inspect = "inspect",
    // contractor-store.
    /// The store's root is not a usable directory; exit 2.
    BadRoot = "bad_root",
    /// The token file is unreadable or invalid; exit 2.
    BadTokenFile = "bad_token_file",
    /// `index` failed; exit 2.
    Index = "index",
    /// `gc` failed; exit 2.
    Gc = "gc",
    /// `token` failed; exit 2.
    Token = "token",
    /// `pack`: the project has more entries than the store packs; exit 2.
    SourceTooManyEntries = "source_too_many_entries",
    /// `pack`: a file or directory of the project cannot be read; exit 2.
    SourceUnreadable = "source_unreadable",
    /// `pack`: the tar cannot be written; exit 3.
    SourcePack = "source_pack",
    /// `record receive`: the stream ended before its `end` line (the build host went
    /// away); exit 2.
    RecordCut = "record_cut",
    /// `record receive`: the stream breaks a rule or a limit of the record stream; exit 2.
    RecordRefused = "record_refused",
    /// `record receive`: the record cannot be written; exit 3.
    RecordWrite = "record_write",
    /// `record receive`: failed otherwise (its arguments); exit 2.
    RecordReceive = "record_receive",
    /// `record follow`: the build host's stream ended before its `finished` event; exit 2.
    HostedCut = "hosted_cut",
    /// `record follow`: the build host's stream before its record breaks the hosted build
    /// protocol (no hello first, a malformed line, the record before `finished`); exit 2.
    HostedStream = "hosted_stream",
    /// `record open`: the build id given has a record already; exit 2.
    RecordExists = "record_exists",
    /// `record open`: `--owner` names no running process; exit 2.
    BadOwner = "bad_owner",
    /// `record open`: the record could not be made; exit 3.
    RecordOpen = "record_open",
    // contractor-host (the front end's side).
    /// `resolve`, `hosts`, `send`: a build host name (or the configuration file naming
    /// them) is not valid; exit 2.
    BadHost = "bad_host",
    /// `send`: the session request names a record or a source that is not there; exit 2.
    BadSession = "bad_session",
    /// `record close-abandoned`, `record close`: a record could not be closed; exit 3.
    RecordClose = "record_close",
    /// `record close`: no such record, or it is closed already (it has a `result.json`);
    /// exit 2.
    RecordNotOpen = "record_not_open",
    /// `cache`, `record open`, `record show|list|downloads|log`: not a build id; exit 2.
    BadBuild = "bad_build",
    /// `record show|downloads|log`: the store has no builds yet (no `--build` given); exit 2.
    NoBuilds = "no_builds",
    /// `record show|downloads|log`: no record of that build id; exit 2.
    NoSuchBuild = "no_such_build",
    /// `record show --kept-vm`: the record has no `vm.json` (its VM was not kept); exit 2.
    NoKeptVm = "no_kept_vm",
    /// `record list|show|downloads|log`: a file of a record cannot be read: a link, a FIFO,
    /// too big, not valid; exit 3.
    RecordRead = "record_read",
    /// `record source`: the record has no `source.tar` that can be read; exit 2.
    NoSource = "no_source",
    /// `record source`: the copy cannot be written; exit 3.
    SourceCopy = "source_copy",
    /// `cache`: not a path the cache may keep; exit 2.
    BadCachePath = "bad_cache_path",
    /// `cache`: file work failed; exit 3.
    CacheIo = "cache_io",
    /// `cache`: the build uploaded something else than a file as its cache; exit 3.
    CacheNotRegular = "cache_not_regular",
    // contractor-run.
    /// The relay could not confine itself; exit 3.
    Confine = "confine",
    /// `--vm-answer`: stdin is not contractor-vm's `vm` answer with both channel sockets,
    /// or the request file is not a request without them; exit 2.
    BadVmAnswer = "bad_vm_answer",
    // contractor-run shell.
    /// The request line passed its bound; exit 2.
    RequestTooLong = "request_too_long",
    /// The VM's control channel could not be reached; exit 3.
    Connect = "connect",
    /// The agent closed the channel before the shell started; exit 3.
    ChannelClosed = "channel_closed",
    /// A line of the agent's passed its bound; exit 3.
    ControlLineTooLong = "control_line_too_long",
    /// Reading or writing the channel failed; exit 3.
    Channel = "channel",
    // contractor-attest.
    /// A signing or public key file is not a key of ours; exit 2.
    BadKey = "bad_key",
    /// A provenance envelope or statement is not one of ours; exit 2.
    BadEnvelope = "bad_envelope",
    /// Signing or checking failed on the host (a file, the key); exit 3.
    Attest = "attest",
    /// `plan`: the spec says something else than the record's statement (the chain names
    /// the spec file and the fields); exit 2.
    SpecChanged = "spec_changed",
    /// `plan`: the image the statement names is gone or has other bytes, and the request
    /// did not say `any_image`; exit 2.
    ImageChanged = "image_changed",
    // The front end's own, for a tool's answer it could not use (never written by a tool).
    /// A tool answered with another message than the one asked for.
    WrongAnswer = "wrong_answer",
}

impl std::fmt::Display for ToolCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl From<crate::result::BuildCode> for ToolCode {
    fn from(code: crate::result::BuildCode) -> ToolCode {
        ToolCode::parse(code.as_str())
    }
}

impl Serialize for ToolCode {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for ToolCode {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<ToolCode, D::Error> {
        let code = String::deserialize(deserializer)?;
        Ok(ToolCode::parse(&code))
    }
}

/// `{"type":"error","version":1,"code":"listen","chain":["cannot listen on ...","..."]}`
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ErrorObject {
    /// Always `error`.
    #[serde(rename = "type")]
    pub kind: ErrorTag,
    /// Protocol version, 1.
    pub version: u32,
    /// A short machine-readable code, e.g. `bad_json`, `serve`, `libvirt_unreachable`.
    pub code: ToolCode,
    /// The error and its causes, outermost first.
    pub chain: Vec<String>,
}

impl ErrorObject {
    /// The object for `error` and its causes.
    pub fn from_error(code: impl Into<ToolCode>, error: &dyn std::error::Error) -> ErrorObject {
        ErrorObject::with_chain(code, crate::result::error_chain(error))
    }

    /// Reports a failure the way every tool does: one line `TOOL: a: b: c` on stderr and,
    /// when `json` (`--json-errors`), this object as one line on stdout.
    pub fn report(tool: &str, code: impl Into<ToolCode>, chain: Vec<String>, json: bool) {
        eprintln!("{tool}: {}", chain.join(": "));
        if json {
            let object = ErrorObject::with_chain(code, chain);
            // Best effort: stdout may be what failed.
            let _ = crate::jsonl::write_line(&mut std::io::stdout(), &object);
        }
    }

    /// The object for an error already turned into its chain of messages.
    pub fn with_chain(code: impl Into<ToolCode>, chain: Vec<String>) -> ErrorObject {
        ErrorObject {
            kind: ErrorTag::Error,
            version: PROTOCOL_VERSION,
            code: code.into(),
            chain,
        }
    }
}

/// The `"type"` of an [`ErrorObject`] (a one-value field, see `service::ReadyTag`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorTag {
    /// `"error"`
    Error,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serializes_in_the_documented_shape() {
        let object = ErrorObject::with_chain(
            ToolCode::Serve,
            vec!["cannot listen".into(), "in use".into()],
        );
        let text = serde_json::to_string(&object).expect("json");
        assert_eq!(
            text,
            r#"{"type":"error","version":1,"code":"serve","chain":["cannot listen","in use"]}"#
        );
        let back: ErrorObject = serde_json::from_str(&text).expect("parse");
        assert_eq!(back, object);
    }

    #[test]
    fn every_code_reads_back_as_itself_and_an_unknown_one_as_other() {
        for code in [
            ToolCode::NotFound,
            ToolCode::SourceTooManyEntries,
            ToolCode::LibvirtUnreachable,
            ToolCode::Other("from_a_newer_tool".into()),
        ] {
            let text = serde_json::to_string(&code).expect("json");
            assert_eq!(text, format!("\"{}\"", code.as_str()));
            let back: ToolCode = serde_json::from_str(&text).expect("parse");
            assert_eq!(back, code);
        }
        assert_eq!(ToolCode::NotFound.as_str(), "not_found");
        let newer: ErrorObject = serde_json::from_str(
            r#"{"type":"error","version":1,"code":"quota","chain":["over quota"]}"#,
        )
        .expect("an unknown code parses");
        assert_eq!(newer.code, ToolCode::Other("quota".into()));
        assert_eq!(ToolCode::parse("not_found"), ToolCode::NotFound);
        assert_eq!(
            ToolCode::from(crate::result::BuildCode::BadSpec),
            ToolCode::BadSpec
        );
        assert_eq!(
            ToolCode::from(crate::result::BuildCode::BuildSetup),
            ToolCode::Other("build_setup".into())
        );
    }
}
