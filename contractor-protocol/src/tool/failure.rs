//! A tool's failure as the program that asked it reports it ([`ToolFailure`]): when the tool
//! wrote its error object, its own messages, as if the work had been done in the asking
//! process (so a user reads "contractor.toml is not what build … was built with", not "the
//! tool failed"), and whether that was a refusal of the input (exit code 2) or a failure;
//! else the failure to run it, to talk to it, or to get the answer asked for.

use super::{ToolError, ToolMessages};

/// Why a tool did not give the answer asked for, as the asking program reports it.
#[derive(Debug, thiserror::Error)]
pub enum ToolFailure {
    /// The tool refused its input (exit code 2) and said why.
    #[error(transparent)]
    Refused(ToolMessages),
    /// The tool failed and said why.
    #[error(transparent)]
    Failed(ToolMessages),
    /// The tool could not be run or talked to, or ended without saying why.
    #[error(transparent)]
    Tool(ToolError),
    /// The tool answered a request with another kind of answer than the one asked for.
    #[error("{name} answered a `{request}` request with another kind of answer")]
    WrongAnswer {
        /// The tool.
        name: &'static str,
        /// The request.
        request: &'static str,
    },
}

impl ToolFailure {
    /// True when the input is at fault (the tool refused it): exit code 2.
    pub fn is_bad_input(&self) -> bool {
        matches!(self, ToolFailure::Refused(_))
    }
}

impl From<ToolError> for ToolFailure {
    fn from(error: ToolError) -> Self {
        match error.messages() {
            Some(messages) if error.is_bad_input() => ToolFailure::Refused(messages),
            Some(messages) => ToolFailure::Failed(messages),
            None => ToolFailure::Tool(error),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::{ErrorObject, ToolCode};
    use crate::result::error_chain;

    fn failed(exit_code: Option<i32>, chain: Option<&[&str]>) -> ToolError {
        ToolError::Failed {
            name: "contractor-attest",
            exit_code,
            error: chain.map(|c| {
                ErrorObject::with_chain(ToolCode::Attest, c.iter().map(|m| m.to_string()).collect())
            }),
        }
    }

    #[test]
    fn a_tools_own_messages_are_reported_as_its_and_a_refusal_is_bad_input() {
        let refused = ToolFailure::from(failed(Some(2), Some(&["spec changed", "script"])));
        assert!(refused.is_bad_input());
        assert_eq!(error_chain(&refused), ["spec changed", "script"]);
        let failed_here = ToolFailure::from(failed(Some(3), Some(&["cannot read"])));
        assert!(!failed_here.is_bad_input());
        assert_eq!(error_chain(&failed_here), ["cannot read"]);
        // Without its error object, the failure to run it is what is said.
        let silent = ToolFailure::from(failed(Some(2), None));
        assert!(matches!(silent, ToolFailure::Tool(_)) && !silent.is_bad_input());
        assert!(error_chain(&silent)[0].starts_with("contractor-attest failed (exit code 2)"));
        let wrong = ToolFailure::WrongAnswer {
            name: "contractor-attest",
            request: "plan",
        };
        assert_eq!(
            wrong.to_string(),
            "contractor-attest answered a `plan` request with another kind of answer"
        );
    }
}
