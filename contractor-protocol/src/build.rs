//! `contractor build --json`: the build's event stream (stdout, JSON Lines).

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::agent::Phase;
use crate::result::BuildResult;
use crate::vm::Accel;

/// One event of `contractor build --json`. `started` comes first and `finished` last,
/// exactly once each, unless the build could not start (then an error object is printed
/// instead, see [`crate::error::ErrorObject`]).
///
/// `agent_ready`, `phase`, `output` and `artifact` repeat [`RunEvent`](crate::run::RunEvent)'s
/// variants of those names on purpose: with serde's derive, one enum holding them inside
/// both would need an `#[serde(untagged)]` variant, which cannot sit beside the
/// `#[serde(other)]` that keeps unknown types readable (both must be last), and with the
/// unknown fallback moved inside the shared enum a `finished` with a value this reader does
/// not know would read as an unknown event instead of an error, and every malformed event's
/// error would shrink to "data did not match any variant". A test keeps the two spellings
/// byte for byte the same on the wire.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum BuildEvent {
    /// The build has an id and a record directory.
    Started {
        /// Protocol version, 1.
        version: u32,
        /// The build's id.
        id: String,
        /// The build's record directory (`.contractor/builds/<id>`).
        record: PathBuf,
    },
    /// The builder image is ready (built now or before).
    ImageReady {
        /// Its name.
        name: String,
    },
    /// The source was packed into the record's `source.tar`.
    SourcePacked {
        /// Entries in the tar.
        entries: u64,
        /// Bytes of file content.
        bytes: u64,
        /// Which rule chose the files and how many each left out (none when the source was
        /// packed elsewhere).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        selection: Option<crate::store::SourceSelection>,
    },
    /// libvirt started the VM; it is booting.
    VmStarted {
        /// The VM's name.
        name: String,
        /// The accelerator it runs with.
        accel: Accel,
        /// Whether it was restored from a snapshot of a booted builder, or why not; none
        /// when no snapshot was asked for.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        snapshot: Option<crate::vm::SnapshotReport>,
    },
    /// The guest agent answered: the VM has booted.
    AgentReady {
        /// The agent's version.
        agent_version: String,
    },
    /// A phase began in the guest.
    Phase {
        /// Which phase.
        phase: Phase,
    },
    /// Build output (lossy UTF-8; the build log has the exact bytes).
    Output {
        /// The text.
        text: String,
    },
    /// One artifact was stored.
    Artifact {
        /// Path relative to the source root.
        path: String,
        /// Size in bytes.
        size: u64,
    },
    /// The build is over: the record's `result.json`, as written. Last event.
    Finished {
        /// The result.
        result: BuildResult,
    },
    /// An event type this reader does not know (from a newer writer); skip it.
    #[serde(other)]
    Unknown,
}

impl BuildEvent {
    /// The build event that shows a run event, if it is one a build shows (`started` and
    /// `finished` of the run are the build's own business).
    pub fn shown(event: crate::run::RunEvent) -> Option<BuildEvent> {
        use crate::run::RunEvent;
        Some(match event {
            RunEvent::AgentReady { agent_version } => BuildEvent::AgentReady { agent_version },
            RunEvent::Phase { phase } => BuildEvent::Phase { phase },
            RunEvent::Output { text } => BuildEvent::Output { text },
            RunEvent::Artifact { path, size } => BuildEvent::Artifact { path, size },
            RunEvent::Started { .. } | RunEvent::Finished { .. } | RunEvent::Unknown => {
                return None
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_read_back_and_unknown_types_are_skipped() {
        let events = [
            BuildEvent::Started {
                version: 1,
                id: "20261125-160000-abcdef".into(),
                record: "/p/.contractor/builds/20261125-160000-abcdef".into(),
            },
            BuildEvent::VmStarted {
                name: "contractor-0123456789ab".into(),
                accel: Accel::Tcg,
                snapshot: None,
            },
            BuildEvent::Phase {
                phase: Phase::Script,
            },
        ];
        for event in events {
            let text = serde_json::to_string(&event).expect("json");
            let back: BuildEvent = serde_json::from_str(&text).expect("read back");
            assert_eq!(back, event, "{text}");
        }
        let text = serde_json::to_string(&BuildEvent::SourcePacked {
            entries: 4,
            bytes: 5120,
            selection: None,
        })
        .expect("json");
        assert_eq!(text, r#"{"type":"source_packed","entries":4,"bytes":5120}"#);
        let later: BuildEvent =
            serde_json::from_str(r#"{"type":"cache_restored","bytes":1}"#).expect("unknown");
        assert_eq!(later, BuildEvent::Unknown);
    }

    #[test]
    fn a_run_event_a_build_shows_is_the_same_message_on_the_wire() {
        use crate::run::RunEvent;
        let events = [
            RunEvent::AgentReady {
                agent_version: "0.1.0".into(),
            },
            RunEvent::Phase {
                phase: Phase::Artifacts,
            },
            RunEvent::Output {
                text: "cc -o hello hello.c\n".into(),
            },
            RunEvent::Artifact {
                path: "hello".into(),
                size: 15960,
            },
        ];
        for event in events {
            let run = serde_json::to_string(&event).expect("json");
            let shown = BuildEvent::shown(event).expect("a build shows it");
            assert_eq!(serde_json::to_string(&shown).expect("json"), run);
            let read: BuildEvent = serde_json::from_str(&run).expect("a build event");
            assert_eq!(read, shown);
        }
    }
}
