//! Who is calling (PROTOCOL 5, HTTP authentication): a capability token, the account's SIP
//! user and password by HTTP Basic or Digest (RFC 7616, MD5 or SHA-256, `qop=auth`, the
//! stateless nonces of [`crate::sip::auth`]), or the admin token.
//!
//! This module only authenticates. What a token opens is decided by the handler that knows
//! the resource (see [`crate::http`]).

use std::time::{SystemTime, UNIX_EPOCH};

use axum::http::header::AUTHORIZATION;
use axum::http::{HeaderMap, Method, Uri};
use base64::Engine as _;
use subtle::ConstantTimeEq;

use super::errors::ApiError;
use super::HttpState;
use crate::sip::auth::{Credentials, Verdict};

/// An authenticated caller.
#[derive(Clone, PartialEq, Eq)]
pub enum Caller {
    /// `Authorization: Bearer <admin_token>`.
    Admin,
    /// An account, proven by Basic or Digest.
    User(String),
    /// A capability token (`?token=` or a Bearer that is not the admin token), not checked
    /// yet: only the addressed store can say whether it opens it.
    Token(String),
}

// Hand-written so tokens never reach logs.
impl std::fmt::Debug for Caller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Caller::Admin => f.write_str("Admin"),
            Caller::User(u) => f.debug_tuple("User").field(u).finish(),
            Caller::Token(_) => f.write_str("Token(..)"),
        }
    }
}

/// `sip:<user>@<realm>`, an account's AOR.
pub fn aor_of(user: &str, realm: &str) -> String {
    format!("sip:{user}@{realm}")
}

/// Does the stored party `aor` (e.g. `sip:1001@example.com`, maybe `<...>`-wrapped or with
/// parameters) name `user` at `realm`? User part exact, host case-insensitive.
pub fn is_party(aor: &str, user: &str, realm: &str) -> bool {
    let s = aor.trim().trim_start_matches('<').trim_end_matches('>');
    let rest = s
        .strip_prefix("sip:")
        .or_else(|| s.strip_prefix("sips:"))
        .unwrap_or(s);
    let rest = rest.split([';', '?', '>']).next().unwrap_or("");
    let Some((u, host)) = rest.split_once('@') else {
        return false;
    };
    let host = host.split(':').next().unwrap_or("");
    u == user && host.eq_ignore_ascii_case(realm)
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The `WWW-Authenticate` values of a 401: one Digest per offered algorithm (in order), then
/// Basic.
pub fn challenges(state: &HttpState, stale: bool) -> Vec<String> {
    let now = now_secs();
    let v = state.digest.lock().unwrap_or_else(|e| e.into_inner());
    let mut out: Vec<String> = v
        .challenges(&state.realm, &state.digest_algorithms, stale, now)
        .iter()
        .map(|c| c.to_header_value())
        .collect();
    drop(v);
    out.push(format!(
        "Basic realm=\"{}\", charset=\"UTF-8\"",
        state.realm.replace(['"', '\\'], "")
    ));
    out
}

/// `401 unauthorized` with fresh challenges.
pub fn unauthorized(state: &HttpState, detail: &str) -> ApiError {
    ApiError::unauthorized(detail).with_challenges(challenges(state, false))
}

fn token_from_query(uri: &Uri) -> Option<String> {
    let q = uri.query()?;
    for pair in q.split('&') {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        if k == "token" {
            // Tokens are URL-safe (base62 / hex); anything percent-encoded simply won't match.
            return Some(v.to_string());
        }
    }
    None
}

/// Authenticates the request. `Ok(None)`: no credentials at all (the handler answers 401
/// or lets a public resource through). Credentials that are present but wrong are a 401 here.
pub async fn authenticate(
    state: &HttpState,
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
) -> Result<Option<Caller>, ApiError> {
    let Some(value) = headers.get(AUTHORIZATION) else {
        return Ok(token_from_query(uri).map(Caller::Token));
    };
    let Ok(value) = value.to_str() else {
        return Err(unauthorized(state, "Authorization header is not ASCII"));
    };
    let value = value.trim();
    let (scheme, rest) = value.split_once(' ').unwrap_or((value, ""));
    let rest = rest.trim();
    if scheme.eq_ignore_ascii_case("bearer") {
        if rest.is_empty() {
            return Err(unauthorized(state, "empty bearer token"));
        }
        let admin = !state.admin_token.is_empty()
            && state.admin_token.len() == rest.len()
            && bool::from(state.admin_token.as_bytes().ct_eq(rest.as_bytes()));
        return Ok(Some(if admin {
            Caller::Admin
        } else {
            Caller::Token(rest.to_string())
        }));
    }
    if scheme.eq_ignore_ascii_case("basic") {
        return basic(state, rest).await.map(Some);
    }
    if scheme.eq_ignore_ascii_case("digest") {
        return digest(state, method, uri, value).await.map(Some);
    }
    Err(unauthorized(
        state,
        "unsupported authorization scheme (Bearer, Basic or Digest)",
    ))
}

async fn basic(state: &HttpState, b64: &str) -> Result<Caller, ApiError> {
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(b64)
        .ok()
        .and_then(|b| String::from_utf8(b).ok());
    let Some((user, password)) = decoded.as_deref().and_then(|s| s.split_once(':')) else {
        return Err(unauthorized(state, "malformed Basic credentials"));
    };
    // Argon2 runs on the blocking pool inside verify_password; unknown users cost the same.
    match state.accounts.verify_password(user, password).await {
        Ok(true) => Ok(Caller::User(user.to_string())),
        Ok(false) => Err(unauthorized(state, "wrong user or password")),
        Err(e) => {
            tracing::error!(error = %e, "HTTP Basic check failed");
            Err(ApiError::internal("account database error"))
        }
    }
}

async fn digest(
    state: &HttpState,
    method: &Method,
    uri: &Uri,
    value: &str,
) -> Result<Caller, ApiError> {
    let creds = match Credentials::parse(value) {
        Ok(c) => c,
        Err(e) => return Err(unauthorized(state, &format!("bad Digest credentials: {e}"))),
    };
    if !state.digest_algorithms.contains(&creds.algorithm) {
        return Err(unauthorized(state, "digest algorithm not offered"));
    }
    // RFC 7616 3.4: `uri` must name this request's target.
    let target = uri.path_and_query().map_or(uri.path(), |p| p.as_str());
    if creds.uri != target && creds.uri != uri.path() {
        return Err(unauthorized(state, "digest uri does not match the request"));
    }
    let ha1 = match state.accounts.ha1(&creds.username, creds.algorithm).await {
        Ok(h) => h,
        Err(e) => {
            tracing::error!(error = %e, "HTTP Digest lookup failed");
            return Err(ApiError::internal("account database error"));
        }
    };
    let now = now_secs();
    let verdict = state
        .digest
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .verify(&creds, &state.realm, ha1.as_deref(), method.as_str(), now);
    match verdict {
        Verdict::Ok => Ok(Caller::User(creds.username)),
        Verdict::Stale => {
            Err(ApiError::unauthorized("stale nonce").with_challenges(challenges(state, true)))
        }
        Verdict::Replay => Err(unauthorized(state, "nonce count replayed")),
        Verdict::WrongRealm => Err(unauthorized(state, "wrong realm")),
        Verdict::Unsupported => Err(unauthorized(state, "qop=auth with nc and cnonce required")),
        Verdict::BadResponse | Verdict::UnknownUser => {
            Err(unauthorized(state, "wrong user or password"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn party_matching() {
        assert!(is_party("sip:1001@example.com", "1001", "example.com"));
        assert!(is_party(
            "<sip:1001@Example.COM:5060;transport=udp>",
            "1001",
            "example.com"
        ));
        assert!(is_party("sips:1001@example.com", "1001", "example.com"));
        assert!(!is_party("sip:1001@example.com", "100", "example.com"));
        assert!(!is_party("sip:1001@other.com", "1001", "example.com"));
        assert!(!is_party("sip:example.com", "1001", "example.com"));
        assert!(!is_party("", "1001", "example.com"));
        assert_eq!(aor_of("1001", "example.com"), "sip:1001@example.com");
    }

    #[test]
    fn query_token() {
        let u: Uri = "/v1/stores/x?format=wav&token=abc".parse().unwrap();
        assert_eq!(token_from_query(&u).as_deref(), Some("abc"));
        let u: Uri = "/v1/stores/x?format=wav".parse().unwrap();
        assert_eq!(token_from_query(&u), None);
        let u: Uri = "/v1/stores/x?token".parse().unwrap();
        assert_eq!(token_from_query(&u).as_deref(), Some(""));
    }
}
