//! contractor-proxy: a filtering HTTP/HTTPS forward proxy, the build's only way to the
//! internet, also usable on its own.
//!
//! Clients send `CONNECT host:port` (HTTPS and any other TCP) or plain HTTP requests with
//! an absolute URI. A request goes through only if no deny rule covers its host, an allow
//! rule on the [`Allowlist`] does, its port is allowed, and the host's address is public
//! (or in an allowed network): never loopback, private, link-local or the like, so an
//! allowed name cannot lead back into the host's own network. Every request yields one
//! [`Decision`](contractor_protocol::proxy::Decision). [`allowlist`] and [`address`] parse
//! and classify, [`policy`] decides, [`dialer`] resolves and connects in a process of
//! its own, [`names`] remembers its answers, [`config`] reads configuration files, [`server`]
//! speaks HTTP, [`metrics`] counts.

#![warn(missing_docs)]

pub mod address;
pub mod allowlist;
pub mod cache;
pub mod config;
pub mod confinement;
pub mod dialer;
mod gate;
pub mod inspect;
mod meter;
pub mod metrics;
pub mod names;
pub mod policy;
pub mod pool;
pub mod record;
mod relay;
pub mod server;
pub mod stage;
mod sys;
pub mod urlrule;

pub use address::{IpNet, NetError, Restriction};
pub use allowlist::{Allowlist, HostProblem, HostRule, Rule, RuleError, RuleProblem};
pub use config::{ConfigError, ConfigFile};
pub use metrics::{serve_metrics, AccessEntry, Metrics, Summary};
pub use policy::{
    Denial, Limits, Mode, ProxyConfig, Resolution, Resolver, DEFAULT_LISTEN, DEFAULT_PORTS,
};
pub use server::{serve, CONNECT_TIMEOUT, ERROR_HEADER, SHUTDOWN_GRACE};
pub use urlrule::{UrlRule, UrlRuleError};
