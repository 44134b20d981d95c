//! Calendar dates of Unix times, in UTC: `contractor_protocol::clock`, shared with the tools.

pub use contractor_protocol::clock::{civil_date, format_utc};
