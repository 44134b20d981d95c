//! contractor-run.
