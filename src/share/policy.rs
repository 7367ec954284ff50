//! Who may fetch a shared file (PROTOCOL 5, Shares): `public` (anyone), `subscribers` (any
//! authenticated subscriber, the default) or a list of AORs. The owner may always fetch.
//!
//! AORs are compared in a normal form `sip:user@host`: scheme `sip`/`sips` dropped to `sip`,
//! angle brackets, parameters, headers and the port removed, host lowercased, user exact.

use std::fmt;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("bad policy {0:?}: public, subscribers or a comma-separated list of AORs")]
pub struct PolicyError(pub String);

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Policy {
    Public,
    #[default]
    Subscribers,
    /// Normalized AORs (`sip:user@host`), in the order given, without duplicates.
    Aors(Vec<String>),
}

/// Who asks: an identity (normal-form AOR) and whether it is one of our subscribers,
/// authenticated (HTTP credentials, SIP digest or a trusted peer's From of a local account).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Requester {
    pub aor: String,
    pub subscriber: bool,
}

impl Requester {
    /// An authenticated local account.
    pub fn subscriber(user: &str, realm: &str) -> Requester {
        Requester {
            aor: format!("sip:{user}@{}", realm.to_ascii_lowercase()),
            subscriber: true,
        }
    }

    /// Any identity (e.g. a SIP From URI); None when it is not an AOR.
    pub fn from_uri(uri: &str, subscriber: bool, realm: &str) -> Option<Requester> {
        Some(Requester {
            aor: normalize_aor(uri, realm)?,
            subscriber,
        })
    }
}

/// `sip:1002@example.com`, `<sips:1002@Example.COM:5061;transport=tls>`, `1002@example.com`
/// all give `sip:1002@example.com`; a bare user `1002` is taken in `realm`.
pub fn normalize_aor(s: &str, realm: &str) -> Option<String> {
    let s = s.trim();
    // A display name before `<...>` is not part of the identity.
    let s = match (s.find('<'), s.rfind('>')) {
        (Some(a), Some(b)) if a < b => &s[a + 1..b],
        _ => s,
    };
    let s = s.trim();
    let rest = strip_prefix_ci(s, "sips:")
        .or_else(|| strip_prefix_ci(s, "sip:"))
        .unwrap_or(s);
    let rest = rest.split([';', '?']).next().unwrap_or("");
    let (user, host) = match rest.rsplit_once('@') {
        Some((u, h)) => (u, h),
        None => (rest, realm),
    };
    let host = if let Some(end) = host.strip_prefix('[').and_then(|h| h.find(']')) {
        &host[..end + 2]
    } else {
        host.split(':').next().unwrap_or("")
    };
    let user_ok = !user.is_empty()
        && user.len() <= 128
        && !user
            .chars()
            .any(|c| c.is_whitespace() || c.is_control() || "<>,@\"".contains(c));
    let host_ok = !host.is_empty()
        && host.len() <= 253
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b".-_[]:".contains(&b));
    (user_ok && host_ok).then(|| format!("sip:{user}@{}", host.to_ascii_lowercase()))
}

/// `s` without the ASCII prefix `p`, compared case-insensitively by bytes (a `str` slice of
/// the first bytes could end inside a multi-byte character: `sip:ñ` was not seen as `sip:`).
fn strip_prefix_ci<'a>(s: &'a str, p: &str) -> Option<&'a str> {
    let head = s.as_bytes().get(..p.len())?;
    // Equal to ASCII bytes, so p.len() is a character boundary of s.
    head.eq_ignore_ascii_case(p.as_bytes())
        .then(|| s.get(p.len()..))
        .flatten()
}

impl Policy {
    /// Parses the `--policy` / `?policy=` value; empty means the default (`subscribers`).
    pub fn parse(s: &str, realm: &str) -> Result<Policy, PolicyError> {
        let t = s.trim();
        if t.is_empty() || t.eq_ignore_ascii_case("subscribers") {
            return Ok(Policy::Subscribers);
        }
        if t.eq_ignore_ascii_case("public") {
            return Ok(Policy::Public);
        }
        let mut aors: Vec<String> = Vec::new();
        for item in t.split(',') {
            let a = normalize_aor(item, realm).ok_or_else(|| PolicyError(s.to_string()))?;
            if !aors.contains(&a) {
                aors.push(a);
            }
        }
        if aors.len() > 1000 {
            return Err(PolicyError(format!("{} AORs (at most 1000)", aors.len())));
        }
        Ok(Policy::Aors(aors))
    }

    /// The stored and displayed form (parses back to the same policy).
    pub fn as_string(&self) -> String {
        match self {
            Policy::Public => "public".into(),
            Policy::Subscribers => "subscribers".into(),
            Policy::Aors(a) => a.join(","),
        }
    }

    /// May `requester` (None: anonymous) fetch a file of `owner_aor` under this policy?
    pub fn allows(&self, owner_aor: &str, requester: Option<&Requester>) -> bool {
        if matches!(self, Policy::Public) {
            return true;
        }
        let Some(r) = requester else {
            return false;
        };
        if r.aor == owner_aor {
            return true;
        }
        match self {
            Policy::Public => true,
            Policy::Subscribers => r.subscriber,
            Policy::Aors(list) => list.contains(&r.aor),
        }
    }
}

impl fmt::Display for Policy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.as_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const R: &str = "example.com";

    #[test]
    fn aor_normal_form() {
        for s in [
            "sip:1002@example.com",
            "1002@example.com",
            "1002",
            " <sips:1002@Example.COM:5061;transport=tls> ",
            "\"Bob\" <sip:1002@example.com>",
            "sip:1002@example.com?subject=x",
        ] {
            assert_eq!(
                normalize_aor(s, R).as_deref(),
                Some("sip:1002@example.com"),
                "{s}"
            );
        }
        assert_eq!(
            normalize_aor("sip:a@[::1]:5060", R).as_deref(),
            Some("sip:a@[::1]")
        );
        // Found by the http_head fuzz target: a non-ASCII first character after `sip:` hid
        // the scheme, so the stored policy did not parse back.
        assert_eq!(
            normalize_aor("sip:\u{28c}1002@example.com", R).as_deref(),
            Some("sip:\u{28c}1002@example.com")
        );
        let p = Policy::parse(&format!("\u{28c}{}", "w".repeat(125)), R).unwrap();
        assert_eq!(Policy::parse(&p.to_string(), R), Ok(p));
        assert_eq!(normalize_aor("", R), None);
        assert_eq!(normalize_aor("sip:@example.com", R), None);
        assert_eq!(normalize_aor("a b@example.com", R), None);
        assert_eq!(normalize_aor("a@", R), None);
        assert_eq!(normalize_aor("a@ex/ample", R), None);
    }

    #[test]
    fn parse_and_round_trip() {
        assert_eq!(Policy::parse("", R).unwrap(), Policy::Subscribers);
        assert_eq!(Policy::parse("Public", R).unwrap(), Policy::Public);
        assert_eq!(
            Policy::parse("subscribers", R).unwrap(),
            Policy::Subscribers
        );
        let p = Policy::parse("sip:1002@example.com, 1003@Example.com,1002", R).unwrap();
        assert_eq!(
            p,
            Policy::Aors(vec![
                "sip:1002@example.com".into(),
                "sip:1003@example.com".into()
            ])
        );
        assert_eq!(p.as_string(), "sip:1002@example.com,sip:1003@example.com");
        assert_eq!(Policy::parse(&p.as_string(), R).unwrap(), p);
        assert!(Policy::parse("sip:1002@example.com,,", R).is_err());
        assert!(Policy::parse("friends only", R).is_err());
    }

    #[test]
    fn who_may_fetch() {
        let owner = "sip:1001@example.com";
        let sub = Requester::subscriber("1002", R);
        let other_sub = Requester::subscriber("1003", R);
        let outsider = Requester::from_uri("sip:carol@elsewhere.org", false, R).unwrap();
        let me = Requester::subscriber("1001", "Example.com");

        assert!(Policy::Public.allows(owner, None));
        assert!(Policy::Public.allows(owner, Some(&outsider)));

        assert!(!Policy::Subscribers.allows(owner, None));
        assert!(Policy::Subscribers.allows(owner, Some(&sub)));
        assert!(!Policy::Subscribers.allows(owner, Some(&outsider)));

        let list = Policy::parse("1002,sip:carol@elsewhere.org", R).unwrap();
        assert!(list.allows(owner, Some(&sub)));
        assert!(list.allows(owner, Some(&outsider)));
        assert!(!list.allows(owner, Some(&other_sub)));
        assert!(!list.allows(owner, None));
        // The owner is never locked out of its own file.
        assert!(list.allows(owner, Some(&me)));
        assert!(Policy::Aors(vec![]).allows(owner, Some(&me)));
    }
}
