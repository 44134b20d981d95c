//! The error object a tool prints on stdout with `--json-errors` when it cannot do what it
//! was asked: `{"type":"error","version":1,"code":"...","chain":["...","..."]}`. Every tool
//! prints the same shape, so a pipeline reads failures the way it reads results.

use serde::{Deserialize, Serialize};

use crate::PROTOCOL_VERSION;

/// `{"type":"error","version":1,"code":"listen","chain":["cannot listen on ...","..."]}`
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ErrorObject {
    /// Always `error`.
    #[serde(rename = "type")]
    pub kind: ErrorTag,
    /// Protocol version, 1.
    pub version: u32,
    /// A short machine-readable code, e.g. `bad_json`, `listen`, `libvirt_unreachable`.
    pub code: String,
    /// The error and its causes, outermost first.
    pub chain: Vec<String>,
}

impl ErrorObject {
    /// The object for `error` and its causes.
    pub fn from_error(code: &str, error: &dyn std::error::Error) -> ErrorObject {
        ErrorObject::with_chain(code, crate::result::error_chain(error))
    }

    /// Reports a failure the way every tool does: one line `TOOL: a: b: c` on stderr and,
    /// when `json` (`--json-errors`), this object as one line on stdout.
    pub fn report(tool: &str, code: &str, chain: Vec<String>, json: bool) {
        eprintln!("{tool}: {}", chain.join(": "));
        if json {
            let object = ErrorObject::with_chain(code, chain);
            // Best effort: stdout may be what failed.
            let _ = crate::jsonl::write_line(&mut std::io::stdout(), &object);
        }
    }

    /// The object for an error already turned into its chain of messages.
    pub fn with_chain(code: &str, chain: Vec<String>) -> ErrorObject {
        ErrorObject {
            kind: ErrorTag::Error,
            version: PROTOCOL_VERSION,
            code: code.to_string(),
            chain,
        }
    }
}

/// The `"type"` of an [`ErrorObject`] (a one-value field, see `service::ReadyTag`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorTag {
    /// `"error"`
    Error,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serializes_in_the_documented_shape() {
        let object =
            ErrorObject::with_chain("listen", vec!["cannot listen".into(), "in use".into()]);
        let text = serde_json::to_string(&object).expect("json");
        assert_eq!(
            text,
            r#"{"type":"error","version":1,"code":"listen","chain":["cannot listen","in use"]}"#
        );
        let back: ErrorObject = serde_json::from_str(&text).expect("parse");
        assert_eq!(back, object);
    }
}
