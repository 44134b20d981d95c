//! contractor-proxy.
