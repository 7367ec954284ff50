//! HTTP error responses (PROTOCOL 5): a status, the JSON body `{"error","detail"}` and, for
//! `401`, one `WWW-Authenticate` header per offered scheme. No `Warning` header (that is SIP's).

use axum::http::header::{CONTENT_TYPE, RETRY_AFTER, WWW_AUTHENTICATE};
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};

use crate::error_code::{ErrorCode, Refusal};
use crate::storage::stores::StoreError;
use crate::storage::AccountError;

/// An HTTP API failure, rendered by [`IntoResponse`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{status} {code}: {detail}")]
pub struct ApiError {
    pub status: StatusCode,
    /// The `error` field: a stable machine-readable code (which also sets `status`).
    pub code: ErrorCode,
    /// The `detail` field: human text.
    pub detail: String,
    /// `WWW-Authenticate` values (401 only), in order.
    pub challenges: Vec<String>,
    /// `Retry-After` seconds (503 not-ready).
    pub retry_after: Option<u32>,
}

impl ApiError {
    pub fn new(code: ErrorCode, detail: impl Into<String>) -> ApiError {
        ApiError {
            status: StatusCode::from_u16(code.http_status())
                .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
            code,
            detail: detail.into(),
            challenges: Vec::new(),
            retry_after: None,
        }
    }

    /// `401 unauthorized`; the caller adds the challenges ([`ApiError::with_challenges`]).
    pub fn unauthorized(detail: impl Into<String>) -> ApiError {
        ApiError::new(ErrorCode::Unauthorized, detail)
    }

    pub fn forbidden(detail: impl Into<String>) -> ApiError {
        ApiError::new(ErrorCode::Forbidden, detail)
    }

    pub fn not_found(detail: impl Into<String>) -> ApiError {
        ApiError::new(ErrorCode::NotFound, detail)
    }

    pub fn bad_request(detail: impl Into<String>) -> ApiError {
        ApiError::new(ErrorCode::BadRequest, detail)
    }

    pub fn internal(detail: impl Into<String>) -> ApiError {
        ApiError::new(ErrorCode::Internal, detail)
    }

    pub fn with_challenges(mut self, challenges: Vec<String>) -> ApiError {
        self.challenges = challenges;
        self
    }

    pub fn with_retry_after(mut self, secs: u32) -> ApiError {
        self.retry_after = Some(secs);
        self
    }
}

#[derive(serde::Serialize)]
struct Body<'a> {
    error: &'a str,
    detail: &'a str,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = serde_json::to_vec(&Body {
            error: self.code.as_str(),
            detail: &self.detail,
        })
        // Two strings cannot fail to serialize; keep a fallback rather than a panic.
        .unwrap_or_default();
        let mut resp = (self.status, body).into_response();
        let h = resp.headers_mut();
        h.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        for c in &self.challenges {
            if let Ok(v) = HeaderValue::from_str(c) {
                h.append(WWW_AUTHENTICATE, v);
            }
        }
        if let Some(s) = self.retry_after {
            h.insert(RETRY_AFTER, HeaderValue::from(s));
        }
        resp
    }
}

impl From<AccountError> for ApiError {
    fn from(e: AccountError) -> ApiError {
        match e {
            AccountError::NotFound(u) => ApiError::not_found(format!("no account {u}")),
            AccountError::InvalidUser(_) => ApiError::bad_request(e.to_string()),
            other => {
                tracing::error!(error = %other, "account lookup failed");
                ApiError::internal("account database error")
            }
        }
    }
}

impl From<Refusal> for ApiError {
    fn from(r: Refusal) -> ApiError {
        ApiError {
            retry_after: r.retry_after,
            ..ApiError::new(r.code, r.detail)
        }
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> ApiError {
        match e {
            StoreError::UnknownStore(id) => ApiError::new(
                ErrorCode::UnknownStore,
                format!("unknown, used or expired store {id}"),
            ),
            StoreError::NotSender { .. } => ApiError::new(ErrorCode::NotSender, e.to_string()),
            StoreError::QuotaExceeded { .. } => {
                ApiError::new(ErrorCode::QuotaExceeded, e.to_string())
            }
            StoreError::TooLarge(_) => ApiError::new(ErrorCode::TooLarge, e.to_string()),
            StoreError::InvalidId(_) => ApiError::not_found(e.to_string()),
            StoreError::WrongState { .. } => ApiError::new(ErrorCode::WrongState, e.to_string()),
            other => {
                tracing::error!(error = %other, "store operation failed");
                ApiError::internal("store database error")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_json_challenges_and_retry_after() {
        let e = ApiError::unauthorized("no credentials").with_challenges(vec![
            "Basic realm=\"x\"".into(),
            "Digest realm=\"x\"".into(),
        ]);
        let r = e.into_response();
        assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
        let v: Vec<_> = r.headers().get_all(WWW_AUTHENTICATE).iter().collect();
        assert_eq!(v.len(), 2);
        assert_eq!(r.headers()[CONTENT_TYPE], "application/json");
        let r = ApiError::new(ErrorCode::NotReady, "wait")
            .with_retry_after(1)
            .into_response();
        assert_eq!(r.headers()[RETRY_AFTER], "1");
    }

    #[test]
    fn store_errors_map_to_protocol_codes() {
        let e: ApiError = StoreError::UnknownStore("st_x".into()).into();
        assert_eq!(
            (e.status, e.code),
            (StatusCode::NOT_FOUND, ErrorCode::UnknownStore)
        );
        let e: ApiError = StoreError::NotSender {
            id: "a".into(),
            caller: "b".into(),
        }
        .into();
        assert_eq!(
            (e.status, e.code),
            (StatusCode::FORBIDDEN, ErrorCode::NotSender)
        );
        let e: ApiError = StoreError::QuotaExceeded {
            id: "a".into(),
            bytes: 1,
        }
        .into();
        assert_eq!(
            (e.status, e.code),
            (StatusCode::FORBIDDEN, ErrorCode::QuotaExceeded)
        );
        let e: ApiError = StoreError::TooLarge(u64::MAX).into();
        assert_eq!(e.status, StatusCode::PAYLOAD_TOO_LARGE);
    }
}
