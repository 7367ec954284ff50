//! Who is calling (PROTOCOL 5, HTTP authentication): a capability token, the account's SIP
//! user and password by HTTP Basic or Digest (RFC 7616, MD5 or SHA-256, `qop=auth`, the
//! stateless nonces of [`crate::sip::auth`]), or the admin token.
//!
//! This module only authenticates. What a token opens is decided by the handler that knows
//! the resource (see [`crate::http`]).
//!
//! Guessing and floods (issue 10, finding 4): failures of Basic and Digest are counted per user
//! and per source ([`crate::guard::AuthGuard`]); a locked user or source gets `429 locked-out`
//! with `Retry-After` before any password work (RFC 6585 4: the client sent too many requests).
//! Argon2 for Basic runs in one of [`crate::storage::accounts::HASHING_SLOTS`] slots; when all
//! are busy the attempt gets `503 overloaded` with `Retry-After` instead of queueing. A right
//! password is remembered for [`VERIFIED_TTL`] under a key that includes the stored hash, so a
//! changed password (new hash) is never answered from the cache.

use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::http::header::AUTHORIZATION;
use axum::http::{HeaderMap, Method, Uri};
use base64::Engine as _;
use subtle::ConstantTimeEq;

use super::errors::ApiError;
use super::HttpState;
use crate::error_code::ErrorCode;
use crate::guard::{Admit, AuthGuard, ExpiringMap, GuardPolicy};
use crate::metrics::{AuthProto, DEFENCE};
use crate::sip::auth::{hmac_sha256, Credentials, Verdict};

/// How long a right Basic password is remembered (no Argon2 for repeated requests).
pub(crate) const VERIFIED_TTL: Duration = Duration::from_secs(60);
/// Remembered Basic successes at most.
const VERIFIED_CAPACITY: usize = 4096;

/// Lockout tables and the cache of verified Basic credentials, shared by every request.
pub(crate) struct AuthLimits {
    guard: Mutex<AuthGuard>,
    verified: Mutex<ExpiringMap<[u8; 32], ()>>,
    /// Random per process: cache keys reveal nothing about passwords.
    cache_secret: [u8; 32],
}

impl AuthLimits {
    pub(crate) fn new() -> AuthLimits {
        AuthLimits {
            guard: Mutex::new(AuthGuard::new(AuthProto::Http, GuardPolicy::default())),
            verified: Mutex::new(ExpiringMap::new(VERIFIED_CAPACITY)),
            cache_secret: rand::random(),
        }
    }

    fn guard(&self) -> std::sync::MutexGuard<'_, AuthGuard> {
        // Every operation is one call: the tables stay consistent even after a panic.
        self.guard.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn verified(&self) -> std::sync::MutexGuard<'_, ExpiringMap<[u8; 32], ()>> {
        self.verified.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn cache_key(&self, user: &str, password: &str, stored_hash: &str) -> [u8; 32] {
        let mut msg = Vec::with_capacity(user.len() + password.len() + stored_hash.len() + 2);
        for part in [user, password, stored_hash] {
            msg.extend_from_slice(part.as_bytes());
            msg.push(0);
        }
        hmac_sha256(&self.cache_secret, &msg)
    }

    /// `429 login-locked-out` when `user` or `source` is locked out.
    fn admit(&self, user: &str, source: Option<IpAddr>) -> Result<(), ApiError> {
        match self.guard().check(user, source, Instant::now()) {
            Admit::Go => Ok(()),
            locked => Err(ApiError::new(
                ErrorCode::LoginLockedOut,
                "too many failed logins; retry later",
            )
            .with_retry_after(u32::try_from(locked.retry_after_secs()).unwrap_or(u32::MAX))),
        }
    }

    fn outcome(&self, user: &str, source: Option<IpAddr>, ok: bool) {
        let now = Instant::now();
        if ok {
            self.guard().success(user, now);
        } else {
            self.guard().failure(user, source, now);
        }
    }
}

impl std::fmt::Debug for AuthLimits {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuthLimits").finish_non_exhaustive()
    }
}

/// An authenticated caller.
#[derive(Clone, PartialEq, Eq)]
pub(crate) enum Caller {
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
pub(crate) fn aor_of(user: &str, realm: &str) -> String {
    format!("sip:{user}@{realm}")
}

/// Does the stored party `aor` (e.g. `sip:1001@example.com`, maybe `<...>`-wrapped or with
/// parameters) name `user` at `realm`? User part exact, host case-insensitive.
pub(crate) fn is_party(aor: &str, user: &str, realm: &str) -> bool {
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
pub(crate) fn challenges(state: &HttpState, stale: bool) -> Vec<String> {
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
pub(crate) fn unauthorized(state: &HttpState, detail: &str) -> ApiError {
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
pub(crate) async fn authenticate(
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
    let db_error = |e: crate::storage::AccountError| {
        tracing::error!(error = %e, "HTTP Basic check failed");
        ApiError::internal("account database error")
    };
    let limits = &state.auth_limits;
    let source = super::serve::peer_ip();
    let hash = state.accounts.password_hash(user).await.map_err(db_error)?;
    // A remembered success skips the lockout too: the password is proven, a guesser's
    // failures against the same name must not lock its owner's working client out.
    let key = hash.as_deref().map(|h| limits.cache_key(user, password, h));
    if key.is_some_and(|k| limits.verified().get(&k, Instant::now()).is_some()) {
        DEFENCE.auth_cache_hits.inc();
        return Ok(Caller::User(user.to_string()));
    }
    limits.admit(user, source)?;
    let Some(slot) = state.accounts.try_hashing_slot() else {
        DEFENCE.auth_hash_busy.inc();
        return Err(ApiError::new(
            ErrorCode::Overloaded,
            "too many password checks at once; retry later",
        )
        .with_retry_after(1));
    };
    // Argon2 runs on the blocking pool, in the slot; unknown users cost the same.
    let ok = state
        .accounts
        .verify_password_hash(slot, hash, password)
        .await
        .map_err(db_error)?;
    limits.outcome(user, source, ok);
    match key {
        Some(k) if ok => {
            let now = Instant::now();
            limits.verified().insert(k, (), now + VERIFIED_TTL, now);
            Ok(Caller::User(user.to_string()))
        }
        _ => Err(unauthorized(state, "wrong user or password")),
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
    // RFC 7616 3.4: `uri` must name this request's target, query included (else a response
    // computed for `/x?a` would open `/x?b`).
    let target = uri.path_and_query().map_or(uri.path(), |p| p.as_str());
    if creds.uri != target {
        return Err(unauthorized(state, "digest uri does not match the request"));
    }
    let source = super::serve::peer_ip();
    state.auth_limits.admit(&creds.username, source)?;
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
        Verdict::Ok | Verdict::BadResponse | Verdict::UnknownUser => {
            let ok = verdict == Verdict::Ok;
            state.auth_limits.outcome(&creds.username, source, ok);
        }
        _ => {}
    }
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
