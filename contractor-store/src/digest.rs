//! SHA-256 digests: hex and base64 forms, the request headers that carry an expected digest,
//! and hashing of files on disk.
//!
//! The invariant: a [`Sha256`] value is always exactly 32 bytes, and every header that
//! claims one is either decoded to those 32 bytes or refused with a message naming the
//! header and the value, so an upload is never verified against a half-parsed digest.

use std::collections::HashMap;
use std::fmt;
use std::io::{self, Read};
use std::path::Path;
use std::sync::Mutex;

use sha2::Digest as _;

/// Request header carrying the expected SHA-256 of a PUT body, as 64 hex digits.
pub const SHA256_HEADER: &str = "x-content-sha256";

/// A SHA-256 digest.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Sha256(pub [u8; 32]);

impl Sha256 {
    /// Parses 64 hex digits (either case).
    pub fn from_hex(text: &str) -> Option<Sha256> {
        let bytes = text.as_bytes();
        if bytes.len() != 64 {
            return None;
        }
        let mut out = [0u8; 32];
        for (i, pair) in bytes.chunks_exact(2).enumerate() {
            out[i] = hex_value(pair[0])? << 4 | hex_value(pair[1])?;
        }
        Some(Sha256(out))
    }

    /// Lower-case hex, 64 digits.
    pub fn to_hex(&self) -> String {
        const DIGITS: &[u8; 16] = b"0123456789abcdef";
        let mut out = String::with_capacity(64);
        for b in self.0 {
            out.push(char::from(DIGITS[usize::from(b >> 4)]));
            out.push(char::from(DIGITS[usize::from(b & 15)]));
        }
        out
    }

    /// The digest of `data`.
    pub fn of(data: &[u8]) -> Sha256 {
        Sha256(sha2::Sha256::digest(data).into())
    }
}

impl fmt::Debug for Sha256 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", self.to_hex())
    }
}

impl fmt::Display for Sha256 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

/// A running SHA-256 computation.
#[derive(Clone, Default)]
pub struct Hasher(sha2::Sha256);

impl Hasher {
    /// Adds `data`.
    pub fn update(&mut self, data: &[u8]) {
        self.0.update(data);
    }

    /// The digest of everything added.
    pub fn finish(self) -> Sha256 {
        Sha256(self.0.finalize().into())
    }
}

impl fmt::Debug for Hasher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Hasher")
    }
}

/// Hashes the file at `path` (blocking).
pub fn hash_file(path: &Path) -> io::Result<(Sha256, u64)> {
    hash_reader(std::fs::File::open(path)?)
}

/// Hashes everything `reader` yields (blocking); returns the digest and the byte count.
pub fn hash_reader(mut reader: impl Read) -> io::Result<(Sha256, u64)> {
    let mut hasher = Hasher::default();
    let mut buffer = vec![0u8; 1 << 20];
    let mut total = 0u64;
    loop {
        match reader.read(&mut buffer) {
            Ok(0) => return Ok((hasher.finish(), total)),
            Ok(n) => {
                hasher.update(&buffer[..n]);
                total += n as u64;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

/// The expected digest named by a request's `X-Content-SHA256` and `Digest` headers, if any.
/// `sha256_header` is the value of `X-Content-SHA256`, `digest_headers` the values of every
/// `Digest` header. When both are given they must agree. The error is the message for a
/// 400 answer.
pub fn expected_digest<'a>(
    sha256_header: Option<&[u8]>,
    digest_headers: impl Iterator<Item = &'a [u8]>,
) -> Result<Option<Sha256>, String> {
    let mut expected = None;
    if let Some(value) = sha256_header {
        let text = String::from_utf8_lossy(value);
        let digest = Sha256::from_hex(text.trim()).ok_or_else(|| {
            format!("X-Content-SHA256: {text:?} is not a SHA-256; send 64 hex digits")
        })?;
        expected = Some(digest);
    }
    for value in digest_headers {
        let text = String::from_utf8_lossy(value);
        for item in text.split(',') {
            let Some((algorithm, encoded)) = item.trim().split_once('=') else {
                continue;
            };
            // RFC 3230 names it SHA-256; other algorithms are ignored, as that RFC allows.
            if !algorithm.trim().eq_ignore_ascii_case("sha-256") {
                continue;
            }
            let encoded = encoded.trim();
            let digest = base64_decode(encoded)
                .and_then(|bytes| <[u8; 32]>::try_from(bytes).ok())
                .map(Sha256)
                .ok_or_else(|| {
                    format!(
                        "Digest: sha-256={encoded:?} is not a SHA-256; send the 32-byte \
                         digest in base64 (44 characters ending in '=')"
                    )
                })?;
            match expected {
                Some(other) if other != digest => {
                    return Err(format!(
                        "the request names two different SHA-256 digests ({other} and \
                         {digest}); send one"
                    ))
                }
                _ => expected = Some(digest),
            }
        }
    }
    Ok(expected)
}

/// Decodes standard base64 (with or without `=` padding); `None` if it is not base64.
pub fn base64_decode(text: &str) -> Option<Vec<u8>> {
    let text = text.trim_end_matches('=');
    let mut out = Vec::with_capacity(text.len() * 3 / 4);
    let mut accumulator = 0u32;
    let mut bits = 0u32;
    for c in text.bytes() {
        let value = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        };
        accumulator = accumulator << 6 | u32::from(value);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((accumulator >> bits & 0xff) as u8);
        }
    }
    // Leftover bits must be padding zeros of a whole encoding.
    if bits >= 6 || accumulator & ((1 << bits) - 1) != 0 {
        return None;
    }
    Some(out)
}

/// Encodes standard base64 with padding.
pub fn base64_encode(data: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = u32::from(b[0]) << 16 | u32::from(b[1]) << 8 | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(ALPHABET[(n >> (18 - 6 * i) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Remembers the digests of files the store has hashed or written, keyed by what identifies
/// one version of a file on disk: device, inode, size and modification time. The store
/// replaces files only by renaming a new inode into place, so a key never names two
/// different contents; a file changed in place by someone else gets a new mtime and misses.
#[derive(Debug, Default)]
pub struct DigestCache {
    entries: Mutex<HashMap<FileVersion, Sha256>>,
}

/// One version of a file on disk, as [`DigestCache`] keys it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FileVersion {
    dev: u64,
    ino: u64,
    len: u64,
    mtime_ns: i128,
}

impl FileVersion {
    /// The version `metadata` describes.
    pub fn of(metadata: &std::fs::Metadata) -> FileVersion {
        use std::os::unix::fs::MetadataExt;
        FileVersion {
            dev: metadata.dev(),
            ino: metadata.ino(),
            len: metadata.len(),
            mtime_ns: i128::from(metadata.mtime()) * 1_000_000_000
                + i128::from(metadata.mtime_nsec()),
        }
    }

    /// A strong HTTP entity tag for this version (quoted): inode, size and mtime in hex.
    pub fn etag(&self) -> String {
        format!("\"{:x}-{:x}-{:x}\"", self.ino, self.len, self.mtime_ns)
    }
}

/// Entries kept before the cache starts over; each is about 80 bytes.
const DIGEST_CACHE_LIMIT: usize = 100_000;

impl DigestCache {
    /// Remembers that `version` holds `digest`.
    pub fn record(&self, version: FileVersion, digest: Sha256) {
        if let Ok(mut entries) = self.entries.lock() {
            if entries.len() >= DIGEST_CACHE_LIMIT {
                entries.clear();
            }
            entries.insert(version, digest);
        }
    }

    /// The digest of the file at `path`, whose metadata is `metadata`: remembered, or
    /// computed now (blocking) and remembered.
    pub fn digest(&self, path: &Path, metadata: &std::fs::Metadata) -> io::Result<Sha256> {
        let version = FileVersion::of(metadata);
        if let Some(digest) = self
            .entries
            .lock()
            .ok()
            .and_then(|entries| entries.get(&version).copied())
        {
            return Ok(digest);
        }
        let file = std::fs::File::open(path)?;
        // Hash what was opened, and remember it only if it is still the version asked about.
        let opened = FileVersion::of(&file.metadata()?);
        let (digest, _) = hash_reader(file)?;
        if opened == version {
            self.record(version, digest);
        }
        Ok(digest)
    }
}

fn hex_value(digit: u8) -> Option<u8> {
    match digit {
        b'0'..=b'9' => Some(digit - b'0'),
        b'a'..=b'f' => Some(digit - b'a' + 10),
        b'A'..=b'F' => Some(digit - b'A' + 10),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HELLO_HEX: &str = "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824";

    #[test]
    fn hex_round_trips_and_rejects_bad_input() {
        let digest = Sha256::of(b"hello");
        assert_eq!(digest.to_hex(), HELLO_HEX);
        assert_eq!(Sha256::from_hex(HELLO_HEX), Some(digest));
        assert_eq!(
            Sha256::from_hex(&HELLO_HEX.to_uppercase()),
            Some(digest),
            "upper case is accepted"
        );
        assert_eq!(Sha256::from_hex(&HELLO_HEX[1..]), None);
        assert_eq!(Sha256::from_hex(&format!("{}g", &HELLO_HEX[1..])), None);
    }

    #[test]
    fn base64_round_trips() {
        for data in [&b""[..], b"f", b"fo", b"foo", b"foob", b"fooba", b"foobar"] {
            let encoded = base64_encode(data);
            assert_eq!(base64_decode(&encoded).as_deref(), Some(data), "{encoded}");
        }
        assert_eq!(base64_encode(b"foobar"), "Zm9vYmFy");
        assert_eq!(base64_encode(b"fo"), "Zm8=");
        assert_eq!(base64_decode("Zm8"), Some(b"fo".to_vec()), "unpadded");
        assert_eq!(base64_decode("Zm9=x"), None);
        assert_eq!(base64_decode("Z"), None);
        assert_eq!(base64_decode("Zm9-"), None);
    }

    #[test]
    fn expected_digest_reads_both_headers() {
        let digest = Sha256::of(b"hello");
        let b64 = base64_encode(&digest.0);
        assert_eq!(expected_digest(None, std::iter::empty()), Ok(None));
        assert_eq!(
            expected_digest(Some(HELLO_HEX.as_bytes()), std::iter::empty()),
            Ok(Some(digest))
        );
        let header = format!("md5=abc, SHA-256={b64}");
        assert_eq!(
            expected_digest(None, [header.as_bytes()].into_iter()),
            Ok(Some(digest))
        );
        assert_eq!(
            expected_digest(Some(HELLO_HEX.as_bytes()), [header.as_bytes()].into_iter()),
            Ok(Some(digest))
        );
    }

    #[test]
    fn expected_digest_refuses_bad_or_conflicting_values() {
        let err = expected_digest(Some(b"abc"), std::iter::empty()).expect_err("short hex");
        assert!(
            err.contains("X-Content-SHA256") && err.contains("64 hex"),
            "{err}"
        );
        let err = expected_digest(None, [&b"sha-256=AAAA"[..]].into_iter()).expect_err("short");
        assert!(err.contains("sha-256=\"AAAA\""), "{err}");
        let other = format!("sha-256={}", base64_encode(&Sha256::of(b"other").0));
        let err = expected_digest(Some(HELLO_HEX.as_bytes()), [other.as_bytes()].into_iter())
            .expect_err("conflict");
        assert!(err.contains("two different"), "{err}");
    }

    #[test]
    fn hash_reader_counts_and_hashes() {
        let data = vec![7u8; 3 << 20];
        let (digest, len) = hash_reader(&data[..]).expect("hash");
        assert_eq!(len, data.len() as u64);
        assert_eq!(digest, Sha256::of(&data));
    }
}
