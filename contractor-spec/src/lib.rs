//! A project's contract with Contractor: its `contractor.toml` (what to build, in which
//! image, with which hosts, under which limits) and its `contractor.lock` (the downloads a
//! build may take, each pinned by SHA-256), read and checked in one place for every tool
//! that needs them (the front end, and the build host's side of `contractor build --host`),
//! and written: the first spec of a project (`contractor init`), hosts added to its allow
//! list with its comments and layout kept (`contractor allow`), the lock (`contractor pin`);
//! and changed for one build by `contractor build`'s flags (`--script-file`, `--allow`,
//! `--timeout`, `--no-artifacts`), each checked as the field it replaces. Beside them, the
//! facts of the project directory a build needs: its store directory (`.contractor`,
//! checked before a build writes into it) and its key on build hosts.
//! Reading never follows a link and is bounded; an error names the file, the field and
//! what is accepted.

#![warn(missing_docs)]

pub mod allow;
pub mod external;
pub mod init;
pub mod lock;
pub mod overrides;
pub mod project;
pub mod spec;
