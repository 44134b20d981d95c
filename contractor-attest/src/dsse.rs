//! DSSE: the pre-authentication encoding (PAE) that is signed, and the envelope that
//! carries the statement and its signature. Reading an envelope is
//! `contractor_protocol::attest::read_envelope` (one reader for every tool).

use base64::Engine;
use contractor_protocol::attest::{Envelope, PAYLOAD_TYPE};
use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};
use serde_json::{json, Value};

use crate::key::key_id;

/// DSSE's pre-authentication encoding: `DSSEv1 SP len(type) SP type SP len(body) SP body`.
pub fn pae(payload_type: &str, body: &[u8]) -> Vec<u8> {
    let mut out = format!(
        "DSSEv1 {} {} {} ",
        payload_type.len(),
        payload_type,
        body.len()
    )
    .into_bytes();
    out.extend_from_slice(body);
    out
}

/// The DSSE envelope of `statement`, signed with `key`.
pub fn envelope(statement: &Value, key: &SigningKey) -> Value {
    let body = serde_json::to_vec(statement).unwrap_or_default();
    let signature = key.sign(&pae(PAYLOAD_TYPE, &body));
    let b64 = base64::engine::general_purpose::STANDARD;
    json!({
        "payloadType": PAYLOAD_TYPE,
        "payload": b64.encode(&body),
        "signatures": [{
            "keyid": key_id(&key.verifying_key()),
            "sig": b64.encode(signature.to_bytes()),
        }],
    })
}

/// Whether one of the envelope's signatures is `key`'s over its PAE.
pub fn signed_by(envelope: &Envelope, key: &VerifyingKey) -> bool {
    let message = pae(&envelope.payload_type, &envelope.body);
    envelope.signatures.iter().any(|sig| {
        Signature::from_slice(sig).is_ok_and(|signature| key.verify(&message, &signature).is_ok())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pae_is_dsse_v1() {
        // The example of the DSSE protocol document.
        assert_eq!(
            pae("http://example.com/HelloWorld", b"hello world"),
            b"DSSEv1 29 http://example.com/HelloWorld 11 hello world"
        );
        assert_eq!(pae("", b""), b"DSSEv1 0  0 ");
    }
}
