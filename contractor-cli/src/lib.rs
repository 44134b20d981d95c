//! contractor.
