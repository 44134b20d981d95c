//! contractor-store.
