//! Digest authentication (RFC 7616 with SIP's use of it, RFC 8760 for SHA-256), `qop=auth`.
//!
//! Sans-IO: works on header *values*, takes `now` in seconds, never reads a clock. Nonces are
//! stateless — `base64url(timestamp || random || HMAC-SHA256(secret, timestamp || random))` —
//! so any nonce this server issued can be checked without remembering it; only the nonce-count
//! replay guard ([`NonceTracker`]) keeps (bounded) state.

use std::collections::HashMap;
use std::fmt;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use rand::RngCore;
use sha2::Sha256;
use subtle::ConstantTimeEq;

/// How long an issued nonce stays fresh, by default.
pub const DEFAULT_NONCE_TTL_SECS: u64 = 300;

/// A nonce claiming to come from further in the future than this is not ours.
const MAX_CLOCK_SKEW_SECS: u64 = 5;

const NONCE_RANDOM_LEN: usize = 12;
const NONCE_MAC_LEN: usize = 16;
const NONCE_LEN: usize = 8 + NONCE_RANDOM_LEN + NONCE_MAC_LEN;

pub use crate::digest::{ha1, Algorithm, UnsupportedAlgorithm};

impl From<UnsupportedAlgorithm> for AuthError {
    fn from(e: UnsupportedAlgorithm) -> AuthError {
        AuthError::UnsupportedAlgorithm(e.0)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("not a Digest header")]
    NotDigest,
    #[error("malformed digest parameters at byte {0}")]
    Syntax(usize),
    #[error("digest parameter {0} given twice")]
    Duplicate(String),
    #[error("digest parameter {0} missing")]
    Missing(&'static str),
    #[error("unsupported digest algorithm {0:?} (MD5 or SHA-256)")]
    UnsupportedAlgorithm(String),
    #[error("unsupported qop {0:?} (auth)")]
    UnsupportedQop(String),
    #[error("invalid nonce count {0:?}")]
    BadNonceCount(String),
}

/// The `response` parameter for `qop=auth`: H(HA1:nonce:nc:cnonce:qop:H(method:uri)).
pub fn compute_response(
    alg: Algorithm,
    ha1: &str,
    nonce: &str,
    nc: u32,
    cnonce: &str,
    method: &str,
    uri: &str,
) -> String {
    let ha2 = alg.hash_hex(format!("{method}:{uri}").as_bytes());
    alg.hash_hex(format!("{ha1}:{nonce}:{nc:08x}:{cnonce}:auth:{ha2}").as_bytes())
}

// ---------------------------------------------------------------------------------------------
// Header parameter parsing

/// Splits `Digest a=b, c="d\"e"` into lowercase names and unescaped values. Names are
/// case-insensitive (RFC 7616 section 3.3); unknown names are kept for the caller to ignore.
fn parse_params(value: &str) -> Result<Vec<(String, String)>, AuthError> {
    let value = value.trim_start();
    let scheme_end = value
        .find(|c: char| c.is_ascii_whitespace())
        .unwrap_or(value.len());
    if !value[..scheme_end].eq_ignore_ascii_case("Digest") {
        return Err(AuthError::NotDigest);
    }
    let bytes = value.as_bytes();
    let mut i = scheme_end;
    let mut out: Vec<(String, String)> = Vec::new();
    let skip_ws = |i: &mut usize| {
        while *i < bytes.len() && bytes[*i].is_ascii_whitespace() {
            *i += 1;
        }
    };
    loop {
        // Separators: any run of whitespace and commas (empty list elements are allowed).
        while i < bytes.len() && (bytes[i].is_ascii_whitespace() || bytes[i] == b',') {
            i += 1;
        }
        if i >= bytes.len() {
            break;
        }
        let start = i;
        while i < bytes.len() && is_token_char(bytes[i]) {
            i += 1;
        }
        if i == start {
            return Err(AuthError::Syntax(i));
        }
        let name = value[start..i].to_ascii_lowercase();
        skip_ws(&mut i);
        if i >= bytes.len() || bytes[i] != b'=' {
            return Err(AuthError::Syntax(i));
        }
        i += 1;
        skip_ws(&mut i);
        let val = if i < bytes.len() && bytes[i] == b'"' {
            i += 1;
            let mut s = String::new();
            let mut closed = false;
            let mut chars = value[i..].char_indices();
            while let Some((off, c)) = chars.next() {
                match c {
                    '"' => {
                        i += off + 1;
                        closed = true;
                        break;
                    }
                    '\\' => match chars.next() {
                        Some((_, e)) => s.push(e),
                        None => break,
                    },
                    c => s.push(c),
                }
            }
            if !closed {
                return Err(AuthError::Syntax(bytes.len()));
            }
            s
        } else {
            let vstart = i;
            while i < bytes.len() && is_token_char(bytes[i]) {
                i += 1;
            }
            if i == vstart {
                return Err(AuthError::Syntax(i));
            }
            value[vstart..i].to_string()
        };
        if out.iter().any(|(n, _)| *n == name) {
            return Err(AuthError::Duplicate(name));
        }
        out.push((name, val));
        skip_ws(&mut i);
        if i < bytes.len() && bytes[i] != b',' {
            return Err(AuthError::Syntax(i));
        }
    }
    Ok(out)
}

fn is_token_char(b: u8) -> bool {
    // RFC 7230 tchar, plus '/' because some UAs send base64 values (nonce, cnonce) unquoted.
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~/".contains(&b)
}

fn quote(s: &str) -> String {
    let mut q = String::with_capacity(s.len() + 2);
    q.push('"');
    for c in s.chars() {
        if c == '"' || c == '\\' {
            q.push('\\');
        }
        q.push(c);
    }
    q.push('"');
    q
}

fn take(params: &mut Vec<(String, String)>, name: &str) -> Option<String> {
    let pos = params.iter().position(|(n, _)| n == name)?;
    Some(params.swap_remove(pos).1)
}

// ---------------------------------------------------------------------------------------------
// Challenge (WWW-Authenticate / Proxy-Authenticate)

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Challenge {
    pub realm: String,
    pub nonce: String,
    pub opaque: Option<String>,
    pub algorithm: Algorithm,
    pub stale: bool,
    /// Offered qop values; callvault always offers `auth`.
    pub qop: Vec<String>,
}

impl Challenge {
    /// `Digest realm="..", nonce="..", opaque="..", algorithm=MD5, qop="auth"[, stale=true]`.
    pub fn to_header_value(&self) -> String {
        let mut s = format!(
            "Digest realm={}, nonce={}",
            quote(&self.realm),
            quote(&self.nonce)
        );
        if let Some(o) = &self.opaque {
            s.push_str(&format!(", opaque={}", quote(o)));
        }
        s.push_str(&format!(", algorithm={}, qop=\"auth\"", self.algorithm));
        if self.stale {
            s.push_str(", stale=true");
        }
        s
    }

    pub fn parse(value: &str) -> Result<Challenge, AuthError> {
        let mut p = parse_params(value)?;
        let realm = take(&mut p, "realm").ok_or(AuthError::Missing("realm"))?;
        let nonce = take(&mut p, "nonce").ok_or(AuthError::Missing("nonce"))?;
        let algorithm = match take(&mut p, "algorithm") {
            Some(a) => a.parse()?,
            None => Algorithm::Md5,
        };
        let qop = take(&mut p, "qop")
            .map(|q| {
                q.split(',')
                    .map(|s| s.trim().to_string())
                    .filter(|s| !s.is_empty())
                    .collect()
            })
            .unwrap_or_default();
        let stale = take(&mut p, "stale").is_some_and(|s| s.eq_ignore_ascii_case("true"));
        Ok(Challenge {
            realm,
            nonce,
            opaque: take(&mut p, "opaque"),
            algorithm,
            stale,
            qop,
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Credentials (Authorization / Proxy-Authorization)

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credentials {
    pub username: String,
    pub realm: String,
    pub nonce: String,
    pub uri: String,
    pub response: String,
    pub algorithm: Algorithm,
    pub cnonce: Option<String>,
    pub nc: Option<u32>,
    pub qop: Option<String>,
    pub opaque: Option<String>,
}

impl Credentials {
    pub fn parse(value: &str) -> Result<Credentials, AuthError> {
        let mut p = parse_params(value)?;
        let username = take(&mut p, "username").ok_or(AuthError::Missing("username"))?;
        let realm = take(&mut p, "realm").ok_or(AuthError::Missing("realm"))?;
        let nonce = take(&mut p, "nonce").ok_or(AuthError::Missing("nonce"))?;
        let uri = take(&mut p, "uri").ok_or(AuthError::Missing("uri"))?;
        let response = take(&mut p, "response").ok_or(AuthError::Missing("response"))?;
        let algorithm = match take(&mut p, "algorithm") {
            Some(a) => a.parse()?,
            None => Algorithm::Md5,
        };
        let nc = match take(&mut p, "nc") {
            Some(s) => {
                let ok = !s.is_empty() && s.len() <= 8 && s.bytes().all(|b| b.is_ascii_hexdigit());
                let n = if ok {
                    u32::from_str_radix(&s, 16).ok()
                } else {
                    None
                };
                Some(n.ok_or(AuthError::BadNonceCount(s))?)
            }
            None => None,
        };
        Ok(Credentials {
            username,
            realm,
            nonce,
            uri,
            response: response.to_ascii_lowercase(),
            algorithm,
            cnonce: take(&mut p, "cnonce"),
            nc,
            qop: take(&mut p, "qop"),
            opaque: take(&mut p, "opaque"),
        })
    }
}

/// Builds an `Authorization` value answering `challenge` (the test UA and `callvault peer`).
/// `nc` is the count of requests sent with this nonce, starting at 1.
pub fn respond(
    challenge: &str,
    username: &str,
    password: &str,
    method: &str,
    uri: &str,
    cnonce: &str,
    nc: u32,
) -> Result<String, AuthError> {
    let ch = Challenge::parse(challenge)?;
    if !ch.qop.is_empty() && !ch.qop.iter().any(|q| q.eq_ignore_ascii_case("auth")) {
        return Err(AuthError::UnsupportedQop(ch.qop.join(",")));
    }
    let h1 = ha1(ch.algorithm, username, &ch.realm, password);
    let response = compute_response(ch.algorithm, &h1, &ch.nonce, nc, cnonce, method, uri);
    let mut s = format!(
        "Digest username={}, realm={}, nonce={}, uri={}, response=\"{response}\", algorithm={}, cnonce={}, nc={nc:08x}, qop=auth",
        quote(username),
        quote(&ch.realm),
        quote(&ch.nonce),
        quote(uri),
        ch.algorithm,
        quote(cnonce),
    );
    if let Some(o) = &ch.opaque {
        s.push_str(&format!(", opaque={}", quote(o)));
    }
    Ok(s)
}

// ---------------------------------------------------------------------------------------------
// Nonces

/// HMAC-SHA256 (RFC 2104) through the `hmac` crate. Also the MAC of share offer tokens
/// ([`crate::share::Shares::issue_offer_token`]).
pub(crate) fn hmac_sha256(key: &[u8], msg: &[u8]) -> [u8; 32] {
    use hmac::Mac as _;
    // HMAC takes keys of any length: `new_from_slice` cannot fail for it.
    let Ok(mut mac) = hmac::Hmac::<Sha256>::new_from_slice(key) else {
        unreachable!("HMAC accepts keys of every length")
    };
    mac.update(msg);
    mac.finalize().into_bytes().into()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NonceStatus {
    /// Issued by us and fresh; carries the issue time.
    Fresh { issued_at: u64 },
    /// Issued by us but older than the TTL.
    Expired { issued_at: u64 },
    /// Not ours (bad MAC, wrong length, from another secret, or from the future).
    Invalid,
}

/// The secret that signs nonces. Random per process by default: after a restart old nonces
/// fail the MAC, and [`Verifier::verify`] turns a correct answer to such a nonce into `Stale`.
#[derive(Clone)]
pub struct NonceKey {
    secret: [u8; 32],
}

impl fmt::Debug for NonceKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("NonceKey(..)")
    }
}

impl NonceKey {
    pub fn random() -> NonceKey {
        let mut secret = [0u8; 32];
        rand::thread_rng().fill_bytes(&mut secret);
        NonceKey { secret }
    }

    pub fn from_bytes(secret: [u8; 32]) -> NonceKey {
        NonceKey { secret }
    }

    /// A nonce issued at `now` with caller-chosen randomness (deterministic tests).
    pub fn issue_with(&self, now: u64, random: [u8; NONCE_RANDOM_LEN]) -> String {
        let mut raw = [0u8; NONCE_LEN];
        raw[..8].copy_from_slice(&now.to_be_bytes());
        raw[8..8 + NONCE_RANDOM_LEN].copy_from_slice(&random);
        let mac = hmac_sha256(&self.secret, &raw[..8 + NONCE_RANDOM_LEN]);
        raw[8 + NONCE_RANDOM_LEN..].copy_from_slice(&mac[..NONCE_MAC_LEN]);
        URL_SAFE_NO_PAD.encode(raw)
    }

    pub fn issue(&self, now: u64) -> String {
        let mut random = [0u8; NONCE_RANDOM_LEN];
        rand::thread_rng().fill_bytes(&mut random);
        self.issue_with(now, random)
    }

    pub fn check(&self, nonce: &str, now: u64, ttl: u64) -> NonceStatus {
        let Ok(raw) = URL_SAFE_NO_PAD.decode(nonce) else {
            return NonceStatus::Invalid;
        };
        if raw.len() != NONCE_LEN {
            return NonceStatus::Invalid;
        }
        let body = &raw[..8 + NONCE_RANDOM_LEN];
        let mac = hmac_sha256(&self.secret, body);
        if !bool::from(mac[..NONCE_MAC_LEN].ct_eq(&raw[8 + NONCE_RANDOM_LEN..])) {
            return NonceStatus::Invalid;
        }
        let mut ts = [0u8; 8];
        ts.copy_from_slice(&raw[..8]);
        let issued_at = u64::from_be_bytes(ts);
        if issued_at > now.saturating_add(MAX_CLOCK_SKEW_SECS) {
            NonceStatus::Invalid
        } else if now.saturating_sub(issued_at) > ttl {
            NonceStatus::Expired { issued_at }
        } else {
            NonceStatus::Fresh { issued_at }
        }
    }
}

/// Highest nonce-count seen per nonce. Bounded: when full, expired nonces are dropped first,
/// then the oldest; a dropped nonce that comes back is refused as a replay (its client gets a
/// fresh challenge), which errs on the safe side.
#[derive(Debug)]
pub struct NonceTracker {
    seen: HashMap<String, (u32, u64)>,
    capacity: usize,
    /// Nonces issued before this time were possibly evicted while fresh.
    evicted_before: u64,
}

impl NonceTracker {
    pub fn new(capacity: usize) -> NonceTracker {
        NonceTracker {
            seen: HashMap::new(),
            capacity: capacity.max(1),
            evicted_before: 0,
        }
    }

    pub fn len(&self) -> usize {
        self.seen.len()
    }

    pub fn is_empty(&self) -> bool {
        self.seen.is_empty()
    }

    /// Records `nc` for `nonce` if it is above every count seen before; false = replay.
    pub fn accept(&mut self, nonce: &str, issued_at: u64, nc: u32, now: u64, ttl: u64) -> bool {
        if let Some((last, _)) = self.seen.get_mut(nonce) {
            if nc <= *last {
                return false;
            }
            *last = nc;
            return true;
        }
        if issued_at < self.evicted_before {
            return false;
        }
        if self.seen.len() >= self.capacity {
            self.evict(now, ttl);
        }
        self.seen.insert(nonce.to_string(), (nc, issued_at));
        true
    }

    fn evict(&mut self, now: u64, ttl: u64) {
        self.seen
            .retain(|_, (_, issued)| now.saturating_sub(*issued) <= ttl);
        if self.seen.len() >= self.capacity {
            // Still full of fresh nonces: drop the oldest half and refuse them from now on.
            let mut times: Vec<u64> = self.seen.values().map(|(_, t)| *t).collect();
            times.sort_unstable();
            let cut = times[(times.len() - 1) / 2];
            self.evicted_before = self.evicted_before.max(cut + 1);
            let before = self.evicted_before;
            self.seen.retain(|_, (_, issued)| *issued >= before);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Verification

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Ok,
    /// Right password, but the nonce expired or predates a restart: challenge with stale=true.
    Stale,
    /// Wrong password (or a nonce that is not ours answered wrongly).
    BadResponse,
    /// nc not above the highest seen for this nonce.
    Replay,
    /// No stored HA1 for this user and algorithm.
    UnknownUser,
    /// `realm` is not ours.
    WrongRealm,
    /// qop other than `auth`, or missing nc/cnonce.
    Unsupported,
}

/// Issues challenges and checks answers. Holds the nonce key and the replay tracker; one per
/// server, behind whatever lock the caller uses.
#[derive(Debug)]
pub struct Verifier {
    key: NonceKey,
    nonce_ttl: u64,
    tracker: NonceTracker,
}

impl Verifier {
    pub fn new(key: NonceKey, nonce_ttl: u64) -> Verifier {
        Verifier {
            key,
            nonce_ttl,
            tracker: NonceTracker::new(65_536),
        }
    }

    pub fn with_tracker_capacity(mut self, capacity: usize) -> Verifier {
        self.tracker = NonceTracker::new(capacity);
        self
    }

    pub fn nonce_key(&self) -> &NonceKey {
        &self.key
    }

    pub fn challenge(&self, realm: &str, algorithm: Algorithm, stale: bool, now: u64) -> Challenge {
        Challenge {
            realm: realm.to_string(),
            nonce: self.key.issue(now),
            opaque: None,
            algorithm,
            stale,
            qop: vec!["auth".into()],
        }
    }

    /// One challenge per algorithm, in the order given (strongest first, RFC 8760); each
    /// becomes its own WWW-Authenticate / Proxy-Authenticate header.
    pub fn challenges(
        &self,
        realm: &str,
        algorithms: &[Algorithm],
        stale: bool,
        now: u64,
    ) -> Vec<Challenge> {
        algorithms
            .iter()
            .map(|a| self.challenge(realm, *a, stale, now))
            .collect()
    }

    /// Checks `creds` for a request with `method`. `ha1` is the stored H(user:realm:password)
    /// for `creds.algorithm` (None: no such user). The caller should also check that
    /// `creds.uri` names the request target where the topology allows it.
    pub fn verify(
        &mut self,
        creds: &Credentials,
        realm: &str,
        ha1: Option<&str>,
        method: &str,
        now: u64,
    ) -> Verdict {
        if creds.realm != realm {
            return Verdict::WrongRealm;
        }
        let (Some(qop), Some(nc), Some(cnonce)) = (&creds.qop, creds.nc, &creds.cnonce) else {
            return Verdict::Unsupported;
        };
        if !qop.eq_ignore_ascii_case("auth") {
            return Verdict::Unsupported;
        }
        let Some(ha1) = ha1 else {
            return Verdict::UnknownUser;
        };
        let expected = compute_response(
            creds.algorithm,
            ha1,
            &creds.nonce,
            nc,
            cnonce,
            method,
            &creds.uri,
        );
        let matches: bool = expected.as_bytes().ct_eq(creds.response.as_bytes()).into();
        if !matches {
            return Verdict::BadResponse;
        }
        match self.key.check(&creds.nonce, now, self.nonce_ttl) {
            NonceStatus::Fresh { issued_at } => {
                if self
                    .tracker
                    .accept(&creds.nonce, issued_at, nc, now, self.nonce_ttl)
                {
                    Verdict::Ok
                } else {
                    Verdict::Replay
                }
            }
            NonceStatus::Expired { .. } | NonceStatus::Invalid => Verdict::Stale,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NONCE: &str = "7ypf/xlj9XXwfDPEoM4URrv/xwf94BcCAzFZH4GiTo0v";
    const CNONCE: &str = "f2/wE4q74E6zIJEtWaHKaf5wv/H5QzzpXusqGemxURZJ";
    const OPAQUE: &str = "FQhe/qaU925kfnzjCev0ciny7QMkPqMAFRtzCUYo5tdS";
    const REALM: &str = "http-auth@example.org";

    #[test]
    fn rfc7616_vectors() {
        let md5 = ha1(Algorithm::Md5, "Mufasa", REALM, "Circle of Life");
        assert_eq!(
            compute_response(
                Algorithm::Md5,
                &md5,
                NONCE,
                1,
                CNONCE,
                "GET",
                "/dir/index.html"
            ),
            "8ca523f5e9506fed4657c9700eebdbec"
        );
        let sha = ha1(Algorithm::Sha256, "Mufasa", REALM, "Circle of Life");
        assert_eq!(
            compute_response(
                Algorithm::Sha256,
                &sha,
                NONCE,
                1,
                CNONCE,
                "GET",
                "/dir/index.html"
            ),
            "753927fa0e85d155564e2e272a28d1802ca10daf4496794697cf8db5856cb6c1"
        );
    }

    #[test]
    fn respond_reproduces_rfc_example() {
        let challenge = format!(
            "Digest realm=\"{REALM}\", qop=\"auth, auth-int\", algorithm=SHA-256, nonce=\"{NONCE}\", opaque=\"{OPAQUE}\""
        );
        let auth = respond(
            &challenge,
            "Mufasa",
            "Circle of Life",
            "GET",
            "/dir/index.html",
            CNONCE,
            1,
        )
        .unwrap();
        let c = Credentials::parse(&auth).unwrap();
        assert_eq!(
            c.response,
            "753927fa0e85d155564e2e272a28d1802ca10daf4496794697cf8db5856cb6c1"
        );
        assert_eq!(c.opaque.as_deref(), Some(OPAQUE));
        assert_eq!(c.nc, Some(1));
        assert!(auth.contains("nc=00000001"));
        assert_eq!(c.algorithm, Algorithm::Sha256);
    }

    #[test]
    fn parses_rfc_authorization_header() {
        let v = format!(
            "Digest username=\"Mufasa\",\r\n realm=\"{REALM}\",\r\n uri=\"/dir/index.html\",\r\n algorithm=MD5,\r\n nonce=\"{NONCE}\",\r\n nc=00000001,\r\n cnonce=\"{CNONCE}\",\r\n qop=auth,\r\n response=\"8ca523f5e9506fed4657c9700eebdbec\",\r\n opaque=\"{OPAQUE}\""
        );
        let c = Credentials::parse(&v).unwrap();
        assert_eq!(c.username, "Mufasa");
        assert_eq!(c.realm, REALM);
        assert_eq!(c.uri, "/dir/index.html");
        assert_eq!(c.algorithm, Algorithm::Md5);
        assert_eq!(c.qop.as_deref(), Some("auth"));
        assert_eq!(c.cnonce.as_deref(), Some(CNONCE));
    }

    #[test]
    fn parsing_quirks() {
        // Odd case, quoted algorithm/qop, escapes, empty list elements, unknown params, order.
        let v = r#"digest  RESPONSE="ABCDEF" ,, nc=1a, Username="a\"b\\c", qop="auth", algorithm="sha-256",uri="sip:example.com", userhash=false, realm="r", nonce=n0, cnonce=xyz"#;
        let c = Credentials::parse(v).unwrap();
        assert_eq!(c.username, "a\"b\\c");
        assert_eq!(c.response, "abcdef");
        assert_eq!(c.nc, Some(0x1a));
        assert_eq!(c.algorithm, Algorithm::Sha256);
        assert_eq!(c.nonce, "n0");
        assert_eq!(c.qop.as_deref(), Some("auth"));
        assert_eq!(c.opaque, None);

        assert_eq!(
            Credentials::parse("Basic Zm9vOmJhcg=="),
            Err(AuthError::NotDigest)
        );
        assert_eq!(
            Credentials::parse(r#"Digest username="a", realm="r", nonce="n", uri="u""#),
            Err(AuthError::Missing("response"))
        );
        assert!(matches!(
            Credentials::parse(r#"Digest username="a", username="b""#),
            Err(AuthError::Duplicate(_))
        ));
        assert!(matches!(
            Credentials::parse(r#"Digest username="unterminated"#),
            Err(AuthError::Syntax(_))
        ));
        assert!(matches!(
            Credentials::parse(r#"Digest username"#),
            Err(AuthError::Syntax(_))
        ));
        assert!(matches!(
            Credentials::parse(r#"Digest username="a" realm="r""#),
            Err(AuthError::Syntax(_))
        ));
        let base = r#"Digest username="a", realm="r", nonce="n", uri="u", response="0""#;
        assert!(matches!(
            Credentials::parse(&format!("{base}, algorithm=MD5-sess")),
            Err(AuthError::UnsupportedAlgorithm(_))
        ));
        assert!(matches!(
            Credentials::parse(&format!("{base}, nc=123456789")),
            Err(AuthError::BadNonceCount(_))
        ));
        assert!(matches!(
            Credentials::parse(&format!("{base}, nc=zz")),
            Err(AuthError::BadNonceCount(_))
        ));
        // Missing algorithm means MD5.
        assert_eq!(Credentials::parse(base).unwrap().algorithm, Algorithm::Md5);
    }

    #[test]
    fn challenge_round_trip() {
        let v = Verifier::new(NonceKey::from_bytes([7; 32]), 300);
        let ch = v.challenge("example.com", Algorithm::Sha256, true, 1000);
        let text = ch.to_header_value();
        assert!(text.starts_with("Digest realm=\"example.com\", nonce=\""));
        assert!(text.contains("algorithm=SHA-256, qop=\"auth\", stale=true"));
        let back = Challenge::parse(&text).unwrap();
        assert_eq!(back, ch);
        let both = v.challenges(
            "example.com",
            &[Algorithm::Sha256, Algorithm::Md5],
            false,
            1000,
        );
        assert_eq!(both.len(), 2);
        assert_eq!(both[0].algorithm, Algorithm::Sha256);
        assert_eq!(both[1].algorithm, Algorithm::Md5);
        assert!(both[1].to_header_value().contains("algorithm=MD5"));
        assert!(!both[0].to_header_value().contains("stale"));
    }

    #[test]
    fn hmac_rfc4231_case2() {
        assert_eq!(
            hex::encode(hmac_sha256(b"Jefe", b"what do ya want for nothing?")),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
        // Case 6: key longer than the block size.
        assert_eq!(
            hex::encode(hmac_sha256(
                &[0xaa; 131],
                b"Test Using Larger Than Block-Size Key - Hash Key First"
            )),
            "60e431591ee0b67f0d8a26aacbf5b77f8e0bc6213728c5140546040f0ee37f54"
        );
    }

    #[test]
    fn nonce_lifecycle() {
        let key = NonceKey::from_bytes([1; 32]);
        let n = key.issue_with(1000, [9; NONCE_RANDOM_LEN]);
        assert_eq!(
            key.check(&n, 1000, 300),
            NonceStatus::Fresh { issued_at: 1000 }
        );
        assert_eq!(
            key.check(&n, 1300, 300),
            NonceStatus::Fresh { issued_at: 1000 }
        );
        assert_eq!(
            key.check(&n, 1301, 300),
            NonceStatus::Expired { issued_at: 1000 }
        );
        assert_eq!(key.check(&n, 900, 300), NonceStatus::Invalid);
        assert_eq!(
            NonceKey::from_bytes([2; 32]).check(&n, 1000, 300),
            NonceStatus::Invalid
        );
        let mut tampered = URL_SAFE_NO_PAD.decode(&n).unwrap();
        tampered[7] ^= 1; // move the timestamp
        assert_eq!(
            key.check(&URL_SAFE_NO_PAD.encode(tampered), 1000, 300),
            NonceStatus::Invalid
        );
        assert_eq!(key.check("short", 1000, 300), NonceStatus::Invalid);
        assert_eq!(key.check("!!!", 1000, 300), NonceStatus::Invalid);
        assert_ne!(key.issue(1000), key.issue(1000));
    }

    fn answer(v: &Verifier, alg: Algorithm, password: &str, nc: u32, now: u64) -> Credentials {
        let ch = v
            .challenge("example.com", alg, false, now)
            .to_header_value();
        let auth = respond(
            &ch,
            "1001",
            password,
            "REGISTER",
            "sip:example.com",
            "c0ffee",
            nc,
        )
        .unwrap();
        Credentials::parse(&auth).unwrap()
    }

    #[test]
    fn verify_ok_wrong_password_unknown_user_realm() {
        let mut v = Verifier::new(NonceKey::from_bytes([3; 32]), 300);
        for alg in [Algorithm::Md5, Algorithm::Sha256] {
            let stored = ha1(alg, "1001", "example.com", "secret");
            let c = answer(&v, alg, "secret", 1, 50);
            assert_eq!(
                v.verify(&c, "example.com", Some(&stored), "REGISTER", 60),
                Verdict::Ok
            );
            let c = answer(&v, alg, "wrong", 1, 50);
            assert_eq!(
                v.verify(&c, "example.com", Some(&stored), "REGISTER", 60),
                Verdict::BadResponse
            );
            let c = answer(&v, alg, "secret", 1, 50);
            assert_eq!(
                v.verify(&c, "example.com", None, "REGISTER", 60),
                Verdict::UnknownUser
            );
            assert_eq!(
                v.verify(&c, "other.org", Some(&stored), "REGISTER", 60),
                Verdict::WrongRealm
            );
            // Answer computed for another method does not pass.
            assert_eq!(
                v.verify(&c, "example.com", Some(&stored), "INVITE", 60),
                Verdict::BadResponse
            );
        }
    }

    #[test]
    fn verify_stale_after_ttl_or_restart() {
        let mut v = Verifier::new(NonceKey::from_bytes([4; 32]), 300);
        let stored = ha1(Algorithm::Md5, "1001", "example.com", "secret");
        let c = answer(&v, Algorithm::Md5, "secret", 1, 1000);
        assert_eq!(
            v.verify(&c, "example.com", Some(&stored), "REGISTER", 1301),
            Verdict::Stale
        );
        // Wrong password on an expired nonce is still just wrong.
        let c2 = answer(&v, Algorithm::Md5, "bad", 1, 1000);
        assert_eq!(
            v.verify(&c2, "example.com", Some(&stored), "REGISTER", 1301),
            Verdict::BadResponse
        );
        // A "restarted" server (new secret) treats a right answer to an old nonce as stale.
        let mut restarted = Verifier::new(NonceKey::from_bytes([5; 32]), 300);
        assert_eq!(
            restarted.verify(&c, "example.com", Some(&stored), "REGISTER", 1001),
            Verdict::Stale
        );
    }

    #[test]
    fn verify_replay() {
        let mut v = Verifier::new(NonceKey::from_bytes([6; 32]), 300);
        let stored = ha1(Algorithm::Md5, "1001", "example.com", "secret");
        let ch = v
            .challenge("example.com", Algorithm::Md5, false, 0)
            .to_header_value();
        let with_nc = |nc| {
            Credentials::parse(
                &respond(
                    &ch,
                    "1001",
                    "secret",
                    "REGISTER",
                    "sip:example.com",
                    "cn",
                    nc,
                )
                .unwrap(),
            )
            .unwrap()
        };
        assert_eq!(
            v.verify(&with_nc(1), "example.com", Some(&stored), "REGISTER", 1),
            Verdict::Ok
        );
        assert_eq!(
            v.verify(&with_nc(1), "example.com", Some(&stored), "REGISTER", 2),
            Verdict::Replay
        );
        assert_eq!(
            v.verify(&with_nc(3), "example.com", Some(&stored), "REGISTER", 3),
            Verdict::Ok
        );
        assert_eq!(
            v.verify(&with_nc(2), "example.com", Some(&stored), "REGISTER", 4),
            Verdict::Replay
        );
        assert_eq!(
            v.verify(&with_nc(4), "example.com", Some(&stored), "REGISTER", 5),
            Verdict::Ok
        );
        // A bad answer with a huge nc does not burn the counter for the real client.
        let mut forged = with_nc(0xffff_ffff);
        forged.response = "00".into();
        assert_eq!(
            v.verify(&forged, "example.com", Some(&stored), "REGISTER", 6),
            Verdict::BadResponse
        );
        assert_eq!(
            v.verify(&with_nc(5), "example.com", Some(&stored), "REGISTER", 7),
            Verdict::Ok
        );
    }

    #[test]
    fn verify_requires_qop_auth() {
        let mut v = Verifier::new(NonceKey::from_bytes([8; 32]), 300);
        let stored = ha1(Algorithm::Md5, "1001", "example.com", "secret");
        let mut c = answer(&v, Algorithm::Md5, "secret", 1, 0);
        c.qop = None;
        assert_eq!(
            v.verify(&c, "example.com", Some(&stored), "REGISTER", 1),
            Verdict::Unsupported
        );
        let mut c = answer(&v, Algorithm::Md5, "secret", 1, 0);
        c.qop = Some("auth-int".into());
        assert_eq!(
            v.verify(&c, "example.com", Some(&stored), "REGISTER", 1),
            Verdict::Unsupported
        );
        let mut c = answer(&v, Algorithm::Md5, "secret", 1, 0);
        c.cnonce = None;
        assert_eq!(
            v.verify(&c, "example.com", Some(&stored), "REGISTER", 1),
            Verdict::Unsupported
        );
    }

    #[test]
    fn tracker_is_bounded() {
        let mut t = NonceTracker::new(4);
        for i in 0..4u64 {
            assert!(t.accept(&format!("n{i}"), i, 1, 10, 300));
        }
        assert_eq!(t.len(), 4);
        // Full of fresh nonces: the oldest half goes, and is refused afterwards.
        assert!(t.accept("n4", 4, 1, 10, 300));
        assert!(t.len() <= 4);
        assert!(!t.accept("n0", 0, 2, 10, 300));
        assert!(t.accept("n3", 3, 2, 10, 300));
        // Later, expired entries are what gets evicted.
        let mut t = NonceTracker::new(2);
        assert!(t.accept("a", 0, 1, 0, 300));
        assert!(t.accept("b", 0, 1, 0, 300));
        assert!(t.accept("c", 1000, 1, 1000, 300));
        assert_eq!(t.len(), 1);
        assert!(t.accept("d", 1000, 1, 1000, 300));
    }
}
