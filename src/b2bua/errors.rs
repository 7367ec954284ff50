//! Errors callvault decides itself carry a JSON body and a Warning (PROTOCOL.md §2.2, §5).
//! The codes themselves are [`ErrorCode`]s.

use std::sync::OnceLock;

use bytes::Bytes;

use crate::error_code::ErrorCode;
use crate::sip::message::Response;

pub(crate) const ERROR_CONTENT_TYPE: &str = "application/vnd.callvault.error+json";

static WARN_AGENT: OnceLock<String> = OnceLock::new();

/// Sets the warn-agent written in `Warning: 399 <agent> "CODE"` (the public address).
pub(crate) fn set_warn_agent(agent: &str) {
    let _ = WARN_AGENT.set(agent.to_string());
}

fn warn_agent() -> &'static str {
    WARN_AGENT.get().map(String::as_str).unwrap_or("callvault")
}

/// `{"error": code, "detail": detail}`.
pub(crate) fn error_json(code: ErrorCode, detail: &str) -> String {
    serde_json::json!({ "error": code.as_str(), "detail": detail }).to_string()
}

/// Adds the error body and the Warning header to a response callvault itself decided.
pub(crate) fn with_error_body(mut resp: Response, code: ErrorCode, detail: &str) -> Response {
    resp.headers
        .push("Warning", format!("399 {} \"{}\"", warn_agent(), code));
    resp.headers.set("Content-Type", ERROR_CONTENT_TYPE);
    resp.body = Bytes::from(error_json(code, detail));
    resp
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sip::message::HeaderAccess;

    #[test]
    fn body_and_warning() {
        let resp = Response {
            status: 403,
            reason: "Forbidden".into(),
            headers: Default::default(),
            body: Bytes::new(),
        };
        let r = with_error_body(resp, ErrorCode::BadPin, "wrong \"PIN\"");
        assert_eq!(r.content_type().as_deref(), Some(ERROR_CONTENT_TYPE));
        let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
        assert_eq!(v["error"], "bad-pin");
        assert_eq!(v["detail"], "wrong \"PIN\"");
        assert!(r.headers.get("Warning").unwrap().ends_with("\"bad-pin\""));
    }
}
