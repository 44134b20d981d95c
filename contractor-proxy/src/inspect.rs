//! TLS inspection: the proxy terminates a client's TLS to an allowed host with a
//! certificate of its own throwaway authority, and opens its own TLS to the real host,
//! verified against the host's trust store. What goes through is then plain HTTP to the
//! proxy, which records each response ([`contractor_protocol::proxy::Download`]).
//!
//! The authority ([`Authority`]) is made when the proxy starts:
//! - its key is generated in memory and never leaves the process (nothing is written);
//! - its certificate is name-constrained (RFC 5280) to the DNS names of the allow rules:
//!   a client that trusts it accepts its certificates for those names only, even if the
//!   proxy were made to sign another;
//! - it signs a certificate only for a host the allow list covers ([`Authority::server_config`]
//!   refuses any other), one per host, kept for the proxy's life (at most [`MAX_LEAVES`]).
//!
//! Upstream certificates are verified by rustls with the roots of the host's trust store
//! ([`load_roots`]: `SSL_CERT_FILE`, else Debian's bundle), read before the proxy is
//! confined.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, GeneralSubtree, IsCa, Issuer,
    KeyPair, KeyUsagePurpose, NameConstraints,
};
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio_rustls::rustls::{ClientConfig, RootCertStore, ServerConfig};

use crate::allowlist::{Allowlist, HostRule};

/// The most host certificates an authority keeps (a `*.example.org` rule covers any
/// number of names); past it, the oldest-made one is dropped and made again when needed.
pub const MAX_LEAVES: usize = 1024;

/// The trust store read when `SSL_CERT_FILE` is not set (Debian's, from ca-certificates).
pub const DEFAULT_ROOTS: &str = "/etc/ssl/certs/ca-certificates.crt";

/// The most bytes of a trust store file that are read.
const MAX_ROOTS_FILE: u64 = 16 << 20;

/// What can go wrong with inspection.
#[derive(Debug, thiserror::Error)]
pub enum InspectError {
    /// The authority or a host certificate could not be made.
    #[error("cannot make a certificate: {0}")]
    Certificate(#[from] rcgen::Error),
    /// rustls refused a configuration.
    #[error("cannot set up TLS: {0}")]
    Tls(#[from] tokio_rustls::rustls::Error),
    /// A host the allow list does not cover.
    #[error("{0} is not on the allowlist: the build's authority signs for allowed hosts only")]
    NotAllowed(String),
    /// The trust store could not be read.
    #[error("cannot read the trust store {path}: {reason}")]
    Roots {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
}

/// A throwaway certificate authority for one proxy's life.
pub struct Authority {
    certificate_pem: String,
    certificate: CertificateDer<'static>,
    issuer: Issuer<'static, KeyPair>,
    allowlist: Allowlist,
    leaves: Mutex<Leaves>,
}

#[derive(Default)]
struct Leaves {
    configs: HashMap<String, Arc<ServerConfig>>,
    order: std::collections::VecDeque<String>,
}

impl std::fmt::Debug for Authority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authority")
            .field("permitted", &permitted_names(&self.allowlist))
            .finish_non_exhaustive()
    }
}

/// The DNS names an authority for `allowlist` is constrained to: each rule's host, and
/// for `*.example.org` the domain `example.org` (a name constraint covers the name and
/// every name below it). Address rules have none: their connections are tunnelled.
fn permitted_names(allowlist: &Allowlist) -> Vec<String> {
    let mut names: Vec<String> = allowlist
        .rules()
        .iter()
        .filter_map(|rule| match &rule.host {
            HostRule::Exact(host) | HostRule::Subdomains(host) => {
                (host.parse::<std::net::IpAddr>().is_err()).then(|| host.clone())
            }
        })
        .collect();
    names.sort();
    names.dedup();
    names
}

impl Authority {
    /// A new authority for the DNS names of `allowlist`; `None` when it has none (nothing
    /// to inspect).
    pub fn new(allowlist: &Allowlist) -> Result<Option<Authority>, InspectError> {
        let names = permitted_names(allowlist);
        if names.is_empty() {
            return Ok(None);
        }
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "Contractor");
        dn.push(
            DnType::CommonName,
            "Contractor build authority (this build only)",
        );
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.name_constraints = Some(NameConstraints {
            permitted_subtrees: names.into_iter().map(GeneralSubtree::DnsName).collect(),
            excluded_subtrees: Vec::new(),
        });
        let certificate = params.self_signed(&key)?;
        Ok(Some(Authority {
            certificate_pem: certificate.pem(),
            certificate: certificate.der().clone(),
            issuer: Issuer::new(params, key),
            allowlist: allowlist.clone(),
            leaves: Mutex::new(Leaves::default()),
        }))
    }

    /// The authority's certificate, PEM: what the guest trusts.
    pub fn certificate_pem(&self) -> &str {
        &self.certificate_pem
    }

    /// The authority's certificate, DER.
    pub fn certificate(&self) -> &CertificateDer<'static> {
        &self.certificate
    }

    /// Whether connections to `host` are inspected: a DNS name an allow rule covers.
    pub fn covers(&self, host: &str) -> bool {
        host.parse::<std::net::IpAddr>().is_err() && self.allowlist.find(host).is_some()
    }

    /// The TLS server configuration that answers as `host` (ALPN `http/1.1`), made once
    /// per host; refused for a host the allow list does not cover.
    pub fn server_config(&self, host: &str) -> Result<Arc<ServerConfig>, InspectError> {
        if !self.covers(host) {
            return Err(InspectError::NotAllowed(host.to_string()));
        }
        if let Some(config) = self
            .leaves
            .lock()
            .ok()
            .and_then(|leaves| leaves.configs.get(host).cloned())
        {
            return Ok(config);
        }
        let config = Arc::new(self.sign(host)?);
        if let Ok(mut leaves) = self.leaves.lock() {
            if leaves.configs.len() >= MAX_LEAVES {
                if let Some(oldest) = leaves.order.pop_front() {
                    leaves.configs.remove(&oldest);
                }
            }
            leaves.order.push_back(host.to_string());
            leaves.configs.insert(host.to_string(), Arc::clone(&config));
        }
        Ok(config)
    }

    /// A server configuration with a certificate for `host` (ALPN `http/1.1`).
    fn sign(&self, host: &str) -> Result<ServerConfig, InspectError> {
        let (chain, key) = self.issue(host)?;
        let mut config = ServerConfig::builder()
            .with_no_client_auth()
            .with_single_cert(chain, key)?;
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(config)
    }

    /// A certificate for `host` and its key, unchecked: the caller has checked the name
    /// (tests use it to show that the name constraints hold for others).
    fn issue(
        &self,
        host: &str,
    ) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), InspectError> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(vec![host.to_string()])?;
        params.distinguished_name = DistinguishedName::new();
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
        let certificate = params.signed_by(&key, &self.issuer)?;
        let chain = vec![certificate.der().clone(), self.certificate.clone()];
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        Ok((chain, key))
    }
}

/// The roots of the host's trust store: the PEM file `SSL_CERT_FILE` names, else
/// [`DEFAULT_ROOTS`]. A store with no certificate rustls accepts is an error.
pub fn load_roots() -> Result<RootCertStore, InspectError> {
    let path = std::env::var_os("SSL_CERT_FILE")
        .filter(|p| !p.is_empty())
        .map_or_else(|| PathBuf::from(DEFAULT_ROOTS), PathBuf::from);
    load_roots_from(&path)
}

/// The roots in the PEM file `path`.
pub fn load_roots_from(path: &Path) -> Result<RootCertStore, InspectError> {
    let error = |reason: String| InspectError::Roots {
        path: path.to_path_buf(),
        reason,
    };
    let bytes = contractor_protocol::file::read_regular(path, MAX_ROOTS_FILE)
        .map_err(|e| error(e.to_string()))?;
    let mut roots = RootCertStore::empty();
    let certificates = CertificateDer::pem_slice_iter(&bytes).filter_map(Result::ok);
    let (added, _ignored) = roots.add_parsable_certificates(certificates);
    if added == 0 {
        return Err(error("it holds no certificate".into()));
    }
    Ok(roots)
}

/// The TLS client configuration for upstreams: `roots`, ALPN `h2` then `http/1.1`.
pub fn client_config(roots: RootCertStore) -> ClientConfig {
    let mut config = ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    config
}

/// What the server needs to inspect: the authority and the upstream TLS configuration.
#[derive(Debug, Clone)]
pub struct Inspection {
    /// The build's authority.
    pub authority: Arc<Authority>,
    /// How upstreams are verified.
    pub upstream: Arc<ClientConfig>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio_rustls::rustls::client::danger::ServerCertVerifier;
    use tokio_rustls::rustls::client::WebPkiServerVerifier;
    use tokio_rustls::rustls::pki_types::{ServerName, UnixTime};

    fn authority(rules: &[&str]) -> Authority {
        Authority::new(&Allowlist::parse(rules).expect("rules"))
            .expect("authority")
            .expect("names to constrain to")
    }

    /// Whether a client trusting only `authority` accepts `chain` as `name`.
    fn verifies(
        authority: &Authority,
        chain: &[CertificateDer<'static>],
        name: &str,
    ) -> Result<(), String> {
        let mut roots = RootCertStore::empty();
        roots
            .add(authority.certificate().clone())
            .expect("the authority as a root");
        let verifier = WebPkiServerVerifier::builder(Arc::new(roots))
            .build()
            .expect("verifier");
        let (leaf, rest) = chain.split_first().expect("a chain");
        verifier
            .verify_server_cert(
                leaf,
                rest,
                &ServerName::try_from(name.to_string()).expect("name"),
                &[],
                UnixTime::now(),
            )
            .map(|_| ())
            .map_err(|e| e.to_string())
    }

    #[test]
    fn it_signs_for_allowed_hosts_only() {
        let authority = authority(&["index.crates.io", "*.example.org"]);
        assert!(authority.server_config("index.crates.io").is_ok());
        assert!(authority.server_config("a.example.org").is_ok());
        for refused in ["evil.test", "example.org", "crates.io"] {
            let err = authority.server_config(refused).expect_err(refused);
            assert!(
                matches!(err, InspectError::NotAllowed(_)),
                "{refused}: {err}"
            );
        }
        // One certificate per host, kept.
        let first = authority.server_config("index.crates.io").expect("config");
        let again = authority.server_config("index.crates.io").expect("config");
        assert!(Arc::ptr_eq(&first, &again));
    }

    #[test]
    fn a_client_trusting_the_authority_accepts_allowed_names_only() {
        let authority = authority(&["index.crates.io", "*.example.org"]);
        let (chain, _) = authority.issue("index.crates.io").expect("issue");
        assert_eq!(verifies(&authority, &chain, "index.crates.io"), Ok(()));
        let (chain, _) = authority.issue("b.example.org").expect("issue");
        assert_eq!(verifies(&authority, &chain, "b.example.org"), Ok(()));
        // Were the proxy made to sign for another name, the name constraints of its own
        // certificate make clients refuse it.
        let (chain, _) = authority.issue("evil.test").expect("issue");
        let refused = verifies(&authority, &chain, "evil.test").expect_err("constrained");
        assert!(refused.to_lowercase().contains("name"), "{refused}");
        // And a certificate is for its own name only.
        let (chain, _) = authority.issue("index.crates.io").expect("issue");
        assert!(verifies(&authority, &chain, "static.crates.io").is_err());
    }

    /// What OpenSSL (the library of the guest's curl, apt, pip and cargo) says of `chain`
    /// as a server certificate for `name`, trusting only `authority`.
    fn openssl_verifies(
        authority: &Authority,
        chain: &[CertificateDer<'static>],
        name: &str,
    ) -> Result<(), String> {
        let dir = tempfile::tempdir().expect("tempdir");
        let (ca, der, leaf) = (
            dir.path().join("ca.pem"),
            dir.path().join("leaf.der"),
            dir.path().join("leaf.pem"),
        );
        std::fs::write(&ca, authority.certificate_pem()).expect("write");
        std::fs::write(&der, &chain[0]).expect("write");
        let openssl = |args: &[&std::ffi::OsStr]| {
            std::process::Command::new("openssl")
                .args(args)
                .output()
                .expect("openssl (scripts/setup installs it)")
        };
        let converted = openssl(&[
            "x509".as_ref(),
            "-inform".as_ref(),
            "DER".as_ref(),
            "-in".as_ref(),
            der.as_os_str(),
            "-out".as_ref(),
            leaf.as_os_str(),
        ]);
        assert!(converted.status.success(), "{converted:?}");
        let verified = openssl(&[
            "verify".as_ref(),
            "-CAfile".as_ref(),
            ca.as_os_str(),
            "-purpose".as_ref(),
            "sslserver".as_ref(),
            "-verify_hostname".as_ref(),
            name.as_ref(),
            leaf.as_os_str(),
        ]);
        let said = String::from_utf8_lossy(&verified.stdout).into_owned()
            + &String::from_utf8_lossy(&verified.stderr);
        match verified.status.success() {
            true => Ok(()),
            false => Err(said),
        }
    }

    #[test]
    fn openssl_like_the_guest_refuses_a_certificate_for_a_name_outside_the_allow_list() {
        let authority = authority(&["deb.debian.org", "*.crates.io"]);
        for allowed in ["deb.debian.org", "index.crates.io", "crates.io"] {
            let (chain, _) = authority.issue(allowed).expect("issue");
            assert_eq!(
                openssl_verifies(&authority, &chain, allowed),
                Ok(()),
                "{allowed}"
            );
        }
        for outside in ["evil.test", "debian.org", "deb.debian.org.evil.test"] {
            let (chain, _) = authority.issue(outside).expect("issue");
            let refused = openssl_verifies(&authority, &chain, outside).expect_err(outside);
            assert!(
                refused.contains("permitted subtree violation"),
                "{outside}: {refused}"
            );
        }
    }

    #[test]
    fn an_address_only_allow_list_has_no_authority() {
        let none = Authority::new(&Allowlist::parse(["192.0.2.7"]).expect("rules")).expect("ok");
        assert!(none.is_none());
        let empty = Authority::new(&Allowlist::default()).expect("ok");
        assert!(empty.is_none());
    }

    #[test]
    fn the_trust_store_is_read_from_pem_and_an_empty_one_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let authority = authority(&["a.test"]);
        let file = dir.path().join("roots.pem");
        std::fs::write(&file, authority.certificate_pem()).expect("write");
        assert_eq!(load_roots_from(&file).expect("roots").len(), 1);
        std::fs::write(&file, "no certificates here\n").expect("write");
        let err = load_roots_from(&file).expect_err("empty").to_string();
        assert!(err.contains("holds no certificate"), "{err}");
    }
}
