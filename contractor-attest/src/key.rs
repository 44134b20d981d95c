//! The signing key: read (or made on first use, mode 0600, never over a file) from the path
//! the front end names, and its public half as PEM with its key id. Keys are read before
//! the tool confines itself; nothing here reads a record.

use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use ed25519_dalek::pkcs8::spki::der::pem::LineEnding;
use ed25519_dalek::pkcs8::{DecodePrivateKey, DecodePublicKey, EncodePrivateKey, EncodePublicKey};
use ed25519_dalek::{SigningKey, VerifyingKey};
use sha2::{Digest, Sha256};

use crate::{hex, io, AttestError};

/// Most bytes of a key file read.
pub const MAX_KEY_BYTES: u64 = 64 << 10;

/// The key id: lower-case hex SHA-256 of the public key's SubjectPublicKeyInfo (DER), as
/// openssl computes it.
pub fn key_id(key: &VerifyingKey) -> String {
    match key.to_public_key_der() {
        Ok(der) => hex(&Sha256::digest(der.as_bytes())),
        Err(_) => hex(&Sha256::digest(key.as_bytes())),
    }
}

/// The public key as PEM (SubjectPublicKeyInfo).
pub fn public_pem(key: &VerifyingKey) -> Result<String, AttestError> {
    key.to_public_key_pem(LineEnding::LF)
        .map_err(|e| AttestError::Encode(e.to_string()))
}

/// Reads the PKCS#8 PEM key at `path`; when it does not exist and `create` is set, makes
/// one (32 bytes of `/dev/urandom`) and writes it there, mode 0600, never over a file.
pub fn load_or_create_key(path: &Path, create: bool) -> Result<SigningKey, AttestError> {
    match contractor_protocol::file::read_regular(path, MAX_KEY_BYTES) {
        Ok(bytes) => {
            let text = String::from_utf8_lossy(&bytes);
            SigningKey::from_pkcs8_pem(&text).map_err(|e| AttestError::BadKey {
                path: path.to_path_buf(),
                what: "private key (PKCS#8)",
                detail: e.to_string(),
            })
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && create => create_key(path),
        Err(source) => Err(AttestError::Io {
            action: "read",
            path: path.to_path_buf(),
            source,
        }),
    }
}

fn create_key(path: &Path) -> Result<SigningKey, AttestError> {
    let mut seed = [0u8; 32];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut seed))
        .map_err(io("read", Path::new("/dev/urandom")))?;
    let key = SigningKey::from_bytes(&seed);
    // PKCS#8 v1 (RFC 8410, no public key inside): what OpenSSL 3.0 reads too.
    let pem = ed25519_dalek::pkcs8::KeypairBytes {
        secret_key: seed,
        public_key: None,
    }
    .to_pkcs8_pem(LineEnding::LF)
    .map_err(|e| AttestError::Encode(e.to_string()))?;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(io("create", dir))?;
    }
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(io("create", path))?;
    file.write_all(pem.as_bytes())
        .and_then(|()| file.sync_all())
        .map_err(io("write", path))?;
    Ok(key)
}

/// Reads a public key (SubjectPublicKeyInfo PEM) from `path`; a PKCS#8 private key is
/// accepted too (its public half is used).
pub fn load_public_key(path: &Path) -> Result<VerifyingKey, AttestError> {
    let bytes =
        contractor_protocol::file::read_regular(path, MAX_KEY_BYTES).map_err(io("read", path))?;
    let text = String::from_utf8_lossy(&bytes);
    if let Ok(key) = VerifyingKey::from_public_key_pem(&text) {
        return Ok(key);
    }
    SigningKey::from_pkcs8_pem(&text)
        .map(|k| k.verifying_key())
        .map_err(|e| AttestError::BadKey {
            path: path.to_path_buf(),
            what: "public key (SubjectPublicKeyInfo)",
            detail: e.to_string(),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_is_made_once_mode_0600_and_a_given_one_never() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let key_file = dir.path().join("data/signing-key");
        let key = load_or_create_key(&key_file, true).expect("make");
        let mode = std::fs::metadata(&key_file)
            .expect("meta")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let again = load_or_create_key(&key_file, true).expect("load");
        let pem = std::fs::read_to_string(&key_file).expect("pem");
        assert!(
            pem.starts_with("-----BEGIN PRIVATE KEY-----\nMC4CAQAw"),
            "PKCS#8 v1: {pem}"
        );
        assert_eq!(key.to_bytes(), again.to_bytes(), "made once, then read");
        assert!(
            load_or_create_key(&dir.path().join("given"), false).is_err(),
            "a key given by path is never made"
        );
        let public = dir.path().join("key.pub");
        std::fs::write(&public, public_pem(&key.verifying_key()).expect("pem")).expect("write");
        assert_eq!(
            load_public_key(&public).expect("public"),
            key.verifying_key()
        );
        assert_eq!(
            load_public_key(&key_file).expect("private"),
            key.verifying_key()
        );
    }
}
