//! Location service for REGISTER (RFC 3261 §10.3), sans-IO.
//!
//! The registrar only keeps bindings: authentication, the To tag and sending happen in the
//! engine. Time comes in as `now`, so expiry is tested with simulated clocks. Each binding
//! remembers the transport and address the REGISTER arrived from: a UA behind NAT is reached by
//! sending to that address (RFC 3581 style), not to the private address in its Contact.
//!
//! Path (RFC 3327 §5.3): the Path header values of a REGISTER (the proxies between the UA and
//! us, nearest to us first) are stored with every binding it creates or refreshes, whether or
//! not the UA listed `path` in Supported (the proxies asked for them). Requests to the contact
//! then carry them as a preloaded route set (RFC 3327 §5.3, RFC 3261 §8.1.2). The 200 echoes
//! them (and the engine adds `Supported: path`) only to a UA that listed `path`.
//!
//! Cluster (PROTOCOL.md 6): bindings other nodes took live in the shared database. The
//! registrar keeps them as a cache beside its own ([`Registrar::set_remote`], replaced per AOR
//! by the edge after an async read, before the request that needs them is handled);
//! [`Registrar::lookup`] merges both, its own first for the same contact. What it changes of
//! its own goes out as [`BindingRecord`]s (plain data the edge writes to the table).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use thiserror::Error;

use crate::sip::message::{HeaderAccess, Method, Request, Response};
use crate::sip::transport::Transport;
use crate::sip::uri::{split_outside_quotes, unescape, NameAddr, Uri};

/// Most bindings one AOR may hold; more is refused so one account cannot grow the table
/// without bound.
pub(crate) const MAX_BINDINGS_PER_AOR: usize = 32;

/// Most bytes of a REGISTER's User-Agent kept with its bindings (longer is cut at a character
/// boundary): the value is only shown to operators, and a UA must not grow the table with it.
pub(crate) const MAX_USER_AGENT_BYTES: usize = 256;

/// Where a REGISTER came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct Source {
    pub transport: Transport,
    pub addr: SocketAddr,
}

/// One contact registered for an address-of-record.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Binding {
    /// The Contact value as registered, without its `expires` parameter.
    pub contact: NameAddr,
    /// Where the REGISTER that created or last refreshed it came from.
    pub source: Source,
    /// That REGISTER's Path values in order (empty when it came straight from the UA): the
    /// preloaded route set of requests to this contact.
    pub path: Vec<NameAddr>,
    /// `q` in thousandths (1000 = 1.0; absent counts as 1.0).
    pub q: u16,
    pub expires_at: Instant,
    pub call_id: String,
    pub cseq: u32,
    /// When it was last registered or refreshed (orders equal-q bindings, newest first).
    pub updated_at: Instant,
    /// The User-Agent of that REGISTER, at most [`MAX_USER_AGENT_BYTES`] (shown in the admin
    /// API's registration listing).
    pub user_agent: Option<String>,
}

/// A binding as plain data, for the shared database (PROTOCOL.md 6): what the engine reports
/// after a REGISTER, and what the edge hands back from other nodes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BindingRecord {
    /// The Contact value without `expires`.
    pub contact: String,
    /// The Contact's URI: the key of the binding within its AOR.
    pub contact_uri: String,
    /// Path values in order (the preloaded route set), empty when none.
    pub path: Vec<String>,
    pub transport: Transport,
    pub source: SocketAddr,
    /// `q` in thousandths.
    pub q: u16,
    pub call_id: String,
    pub cseq: u32,
    pub user_agent: Option<String>,
    /// Time left at the moment of the report.
    pub expires_in: Duration,
}

impl Binding {
    /// This binding as plain data at `now`.
    pub(crate) fn record(&self, now: Instant) -> BindingRecord {
        BindingRecord {
            contact: self.contact.to_string(),
            contact_uri: self.contact.uri.to_string(),
            path: self.path.iter().map(ToString::to_string).collect(),
            transport: self.source.transport,
            source: self.source.addr,
            q: self.q,
            call_id: self.call_id.clone(),
            cseq: self.cseq,
            user_agent: self.user_agent.clone(),
            expires_in: self.expires_at.saturating_duration_since(now),
        }
    }

    /// A binding from a record read at `now`; None when its contact or Path does not parse.
    pub(crate) fn from_record(r: &BindingRecord, now: Instant) -> Option<Binding> {
        let path = r
            .path
            .iter()
            .map(|p| NameAddr::parse(p).ok())
            .collect::<Option<Vec<_>>>()?;
        Some(Binding {
            contact: NameAddr::parse(&r.contact).ok()?,
            source: Source {
                transport: r.transport,
                addr: r.source,
            },
            path,
            q: r.q,
            expires_at: now + r.expires_in,
            call_id: r.call_id.clone(),
            cseq: r.cseq,
            // Other nodes' bindings sort after ours of the same q.
            updated_at: now.checked_sub(Duration::from_secs(1)).unwrap_or(now),
            user_agent: r.user_agent.clone(),
        })
    }

    #[cfg(test)]
    pub(crate) fn uri(&self) -> &Uri {
        &self.contact.uri
    }

    /// Seconds left, rounded up (a binding registered for 3600 s says 3600, not 3599).
    pub(crate) fn expires_in(&self, now: Instant) -> u32 {
        let left = self.expires_at.saturating_duration_since(now);
        let secs = left.as_secs() + u64::from(left.subsec_nanos() > 0);
        u32::try_from(secs).unwrap_or(u32::MAX)
    }

    /// The Contact value echoed in a 200 to REGISTER: the contact with `;expires=N` (§10.3 step 8).
    pub(crate) fn contact_value(&self, now: Instant) -> String {
        let mut c = self.contact.clone();
        c.set_param("expires", Some(&self.expires_in(now).to_string()));
        c.to_string()
    }

    fn is_live(&self, now: Instant) -> bool {
        self.expires_at > now
    }
}

/// What a successful REGISTER did, and the bindings to echo.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct RegisterOutcome {
    /// Every live binding of the AOR after the update, in lookup order.
    pub bindings: Vec<Binding>,
    pub added: usize,
    pub refreshed: usize,
    pub removed: usize,
    /// When the REGISTER was applied (the `expires` echoed are counted from here).
    at: Instant,
    /// The REGISTER's Path values to echo in the 200 (RFC 3327 §5.3): set only when the UA
    /// listed `path` in Supported.
    pub echo_path: Vec<NameAddr>,
    /// Contact URIs the REGISTER asked to remove (`expires=0`), whether or not we held them
    /// (another node may: the shared table drops them too).
    pub removed_uris: Vec<String>,
    /// `Contact: *`: every binding of the AOR goes, on every node.
    pub all_removed: bool,
}

impl RegisterOutcome {
    /// The Contact values for the 200, one per binding, each with `;expires=N`.
    pub(crate) fn contacts(&self) -> Vec<String> {
        self.bindings
            .iter()
            .map(|b| b.contact_value(self.at))
            .collect()
    }

    /// `200 OK` carrying one Contact per current binding with its remaining `expires`.
    /// The engine adds the To tag (and anything else it owns).
    #[cfg(test)]
    pub(crate) fn response(&self, req: &Request, now: Instant) -> Response {
        let mut resp = req.response(200, None);
        for b in &self.bindings {
            resp.headers.push("Contact", b.contact_value(now));
        }
        for p in &self.echo_path {
            resp.headers.push("Path", p.to_string());
        }
        resp
    }
}

#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub(crate) enum RegisterError {
    #[error("not a REGISTER request")]
    NotRegister,
    #[error("missing or bad {0} header")]
    BadHeader(&'static str),
    #[error("Contact: * must be the only Contact")]
    StarWithOthers,
    #[error("Contact: * requires Expires: 0")]
    StarWithoutZeroExpires,
    #[error("bad Contact: {0}")]
    BadContact(String),
    #[error("interval too brief, minimum is {min} s")]
    IntervalTooBrief { min: u32 },
    #[error("Call-ID reused with a CSeq not above the binding's (out of order)")]
    OutOfOrder,
    #[error("too many contacts for this address-of-record (max {max})")]
    TooManyBindings { max: usize },
}

impl RegisterError {
    pub(crate) fn status(&self) -> u16 {
        match self {
            RegisterError::IntervalTooBrief { .. } => 423,
            // §10.3 step 7 only says the request "fails"; 500 tells the UA to retry later.
            RegisterError::OutOfOrder => 500,
            RegisterError::TooManyBindings { .. } => 403,
            _ => 400,
        }
    }

    /// The error response: the reason names the fault; a 423 carries `Min-Expires`.
    pub(crate) fn response(&self, req: &Request) -> Response {
        let status = self.status();
        let reason = match self {
            RegisterError::IntervalTooBrief { .. } => "Interval Too Brief".to_string(),
            _ => {
                let base = match status {
                    403 => "Forbidden",
                    500 => "Server Internal Error",
                    _ => "Bad Request",
                };
                format!("{base} - {self}")
            }
        };
        let mut resp = req.response(status, Some(&reason));
        if let RegisterError::IntervalTooBrief { min } = self {
            resp.headers.push("Min-Expires", min.to_string());
        }
        resp
    }
}

/// The location service: AOR -> bindings.
#[derive(Debug, Clone)]
pub(crate) struct Registrar {
    min_expires: u32,
    max_expires: u32,
    default_expires: u32,
    aors: HashMap<String, Vec<Binding>>,
    /// Other nodes' bindings per AOR (cluster), as the edge last read them.
    remote: HashMap<String, Vec<Binding>>,
}

/// One Contact of a REGISTER, validated, before anything is changed.
struct Update {
    contact: NameAddr,
    expires: u32,
    q: u16,
}

impl Registrar {
    /// `default_expires` applies when neither the contact nor the request says (3600 in
    /// RFC 3261 §10.2.1.1); it is clamped into `[min_expires, max_expires]`.
    pub(crate) fn new(min_expires: u32, max_expires: u32, default_expires: u32) -> Registrar {
        let max_expires = max_expires.max(min_expires).max(1);
        Registrar {
            min_expires,
            max_expires,
            default_expires: default_expires.clamp(min_expires.max(1), max_expires),
            aors: HashMap::new(),
            remote: HashMap::new(),
        }
    }

    /// Replaces the cached bindings other nodes hold for `aor` (an empty list forgets it).
    pub(crate) fn set_remote(&mut self, aor: &str, bindings: Vec<Binding>) {
        if bindings.is_empty() {
            self.remote.remove(aor);
        } else {
            self.remote.insert(aor.to_string(), bindings);
        }
    }

    /// Applies a REGISTER for `aor` (the caller's canonical key, e.g. `Uri::aor()` of the To
    /// URI, after authentication). Every Contact is validated before anything changes, so a
    /// failed request leaves the bindings as they were (§10.3 step 7). A REGISTER without
    /// Contact is a query and only returns the current bindings.
    pub(crate) fn register(
        &mut self,
        aor: &str,
        req: &Request,
        source: Source,
        now: Instant,
    ) -> Result<RegisterOutcome, RegisterError> {
        if req.method != Method::Register {
            return Err(RegisterError::NotRegister);
        }
        let call_id = req
            .call_id()
            .ok_or(RegisterError::BadHeader("Call-ID"))?
            .to_string();
        let cseq = req.cseq().ok_or(RegisterError::BadHeader("CSeq"))?.seq;
        let path = path_of(req)?;
        let user_agent = user_agent_of(req);
        let header_expires = match req.headers.get("Expires") {
            Some(v) => Some(parse_delta(v).ok_or(RegisterError::BadHeader("Expires"))?),
            None => None,
        };
        let mut values = Vec::new();
        for line in req.headers.get_all("Contact") {
            let parts = split_outside_quotes(line, b',')
                .map_err(|e| RegisterError::BadContact(e.to_string()))?;
            values.extend(parts.into_iter().map(|p| p.trim_matches([' ', '\t'])));
        }

        if values.contains(&"*") {
            if values.len() != 1 {
                return Err(RegisterError::StarWithOthers);
            }
            if header_expires != Some(0) {
                return Err(RegisterError::StarWithoutZeroExpires);
            }
            return self.remove_all(aor, &call_id, cseq, now);
        }
        let echo_path = if supports_path(req) {
            path.clone()
        } else {
            Vec::new()
        };

        let updates = values
            .into_iter()
            .map(|v| self.validate(v, header_expires))
            .collect::<Result<Vec<_>, _>>()?;
        let existing = self.aors.get(aor).map(Vec::as_slice).unwrap_or(&[]);
        // Ordering is checked against the bindings as they were, so listing one contact
        // twice in a request is not mistaken for a replay.
        for u in &updates {
            if let Some(b) = existing
                .iter()
                .find(|b| b.is_live(now) && uri_matches(&b.contact.uri, &u.contact.uri))
            {
                if b.call_id == call_id && cseq <= b.cseq {
                    return Err(RegisterError::OutOfOrder);
                }
            }
        }

        let live: Vec<Binding> = existing
            .iter()
            .filter(|b| b.is_live(now))
            .cloned()
            .collect();
        let (mut added, mut refreshed, mut removed) = (0, 0, 0);
        let mut removed_uris = Vec::new();
        let mut next = live.clone();
        for u in updates {
            let pos = next
                .iter()
                .position(|b| uri_matches(&b.contact.uri, &u.contact.uri));
            if u.expires == 0 {
                removed_uris.push(u.contact.uri.to_string());
            }
            match (pos, u.expires) {
                (Some(i), 0) => {
                    next.remove(i);
                    removed += 1;
                }
                (None, 0) => {}
                (Some(i), _) => {
                    next[i] =
                        new_binding(u, &call_id, cseq, source, &path, user_agent.clone(), now);
                    refreshed += 1;
                }
                (None, _) => {
                    next.push(new_binding(
                        u,
                        &call_id,
                        cseq,
                        source,
                        &path,
                        user_agent.clone(),
                        now,
                    ));
                    added += 1;
                }
            }
        }
        if next.len() > MAX_BINDINGS_PER_AOR && next.len() > live.len() {
            return Err(RegisterError::TooManyBindings {
                max: MAX_BINDINGS_PER_AOR,
            });
        }
        if next.is_empty() {
            self.aors.remove(aor);
        } else {
            self.aors.insert(aor.to_string(), next);
        }
        Ok(RegisterOutcome {
            bindings: self.lookup(aor, now),
            added,
            refreshed,
            removed,
            at: now,
            echo_path,
            removed_uris,
            all_removed: false,
        })
    }

    /// `Contact: *` with `Expires: 0` (§10.3 step 6): every binding goes, unless one has the
    /// same Call-ID with a CSeq not below the request's, which fails the whole request.
    fn remove_all(
        &mut self,
        aor: &str,
        call_id: &str,
        cseq: u32,
        now: Instant,
    ) -> Result<RegisterOutcome, RegisterError> {
        let list = self.aors.get(aor).map(Vec::as_slice).unwrap_or(&[]);
        if list
            .iter()
            .any(|b| b.is_live(now) && b.call_id == call_id && cseq <= b.cseq)
        {
            return Err(RegisterError::OutOfOrder);
        }
        let removed = list.iter().filter(|b| b.is_live(now)).count();
        self.aors.remove(aor);
        self.remote.remove(aor);
        Ok(RegisterOutcome {
            bindings: Vec::new(),
            added: 0,
            refreshed: 0,
            removed,
            at: now,
            echo_path: Vec::new(),
            removed_uris: Vec::new(),
            all_removed: true,
        })
    }

    fn validate(&self, value: &str, header_expires: Option<u32>) -> Result<Update, RegisterError> {
        let mut contact =
            NameAddr::parse(value).map_err(|e| RegisterError::BadContact(e.to_string()))?;
        if !contact.uri.is_sip() {
            return Err(RegisterError::BadContact(format!(
                "{} URI",
                contact.uri.scheme
            )));
        }
        let param_expires = match contact.param("expires") {
            Some(Some(v)) => {
                Some(parse_delta(v).ok_or_else(|| RegisterError::BadContact("expires".into()))?)
            }
            Some(None) => return Err(RegisterError::BadContact("expires".into())),
            None => None,
        };
        let q = match contact.param("q") {
            Some(Some(v)) => parse_q(v).ok_or_else(|| RegisterError::BadContact("q".into()))?,
            Some(None) => return Err(RegisterError::BadContact("q".into())),
            None => 1000,
        };
        // The contact's own expires wins over the Expires header (§10.2.1.1).
        let asked = param_expires
            .or(header_expires)
            .unwrap_or(self.default_expires);
        let expires = match asked {
            0 => 0,
            n if n < self.min_expires => {
                return Err(RegisterError::IntervalTooBrief {
                    min: self.min_expires,
                })
            }
            n => n.min(self.max_expires),
        };
        contact
            .params
            .retain(|(n, _)| !n.eq_ignore_ascii_case("expires"));
        Ok(Update {
            contact,
            expires,
            q,
        })
    }

    /// Live bindings of `aor`, highest q first, then most recently refreshed first.
    pub(crate) fn lookup(&self, aor: &str, now: Instant) -> Vec<Binding> {
        let mut out: Vec<Binding> = self
            .aors
            .get(aor)
            .map(|l| l.iter().filter(|b| b.is_live(now)).cloned().collect())
            .unwrap_or_default();
        if let Some(remote) = self.remote.get(aor) {
            for b in remote.iter().filter(|b| b.is_live(now)) {
                if !out
                    .iter()
                    .any(|o| uri_matches(&o.contact.uri, &b.contact.uri))
                {
                    out.push(b.clone());
                }
            }
        }
        out.sort_by(|a, b| b.q.cmp(&a.q).then(b.updated_at.cmp(&a.updated_at)));
        out
    }

    /// This node's live bindings of `aor` that a REGISTER at `at` created or refreshed.
    pub(crate) fn changed_at(&self, aor: &str, at: Instant) -> Vec<&Binding> {
        self.aors
            .get(aor)
            .map(|l| {
                l.iter()
                    .filter(|b| b.updated_at == at && b.is_live(at))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Every live binding with its AOR (the admin listing), in no particular order.
    pub(crate) fn all_live(&self, now: Instant) -> Vec<(&str, &Binding)> {
        self.aors
            .iter()
            .flat_map(|(aor, l)| l.iter().map(move |b| (aor.as_str(), b)))
            .filter(|(_, b)| b.is_live(now))
            .collect()
    }

    /// Drops every binding expired at `now`; returns how many went.
    pub(crate) fn expire(&mut self, now: Instant) -> usize {
        let mut gone = 0;
        self.remote.retain(|_, list| {
            list.retain(|b| b.is_live(now));
            !list.is_empty()
        });
        self.aors.retain(|_, list| {
            let before = list.len();
            list.retain(|b| b.is_live(now));
            gone += before - list.len();
            !list.is_empty()
        });
        gone
    }

    /// Bindings held (live ones after [`Registrar::expire`]); feeds `callvault_registrations_active`.
    pub(crate) fn count(&self) -> usize {
        self.aors.values().map(Vec::len).sum()
    }

    /// When the next binding expires: the engine arms its sweep timer for this.
    #[cfg(test)]
    pub(crate) fn next_expiry(&self) -> Option<Instant> {
        self.aors.values().flatten().map(|b| b.expires_at).min()
    }
}

fn new_binding(
    u: Update,
    call_id: &str,
    cseq: u32,
    source: Source,
    path: &[NameAddr],
    user_agent: Option<String>,
    now: Instant,
) -> Binding {
    Binding {
        contact: u.contact,
        source,
        path: path.to_vec(),
        q: u.q,
        expires_at: now + Duration::from_secs(u64::from(u.expires)),
        call_id: call_id.to_string(),
        cseq,
        updated_at: now,
        user_agent,
    }
}

/// The REGISTER's User-Agent (RFC 3261 §20.41), cut to [`MAX_USER_AGENT_BYTES`] at a character
/// boundary; `None` when absent or blank.
fn user_agent_of(req: &Request) -> Option<String> {
    let v = req.headers.get("User-Agent")?.trim_matches([' ', '\t']);
    if v.is_empty() {
        return None;
    }
    let mut end = v.len().min(MAX_USER_AGENT_BYTES);
    while !v.is_char_boundary(end) {
        end -= 1;
    }
    Some(v[..end].to_string())
}

/// Every Path value of a REGISTER in order (RFC 3327 §4: name-addrs, comma-separated or on
/// several lines); one that does not parse fails the request.
fn path_of(req: &Request) -> Result<Vec<NameAddr>, RegisterError> {
    let list = req
        .headers
        .list("Path")
        .map_err(|_| RegisterError::BadHeader("Path"))?;
    list.into_iter()
        .map(|v| NameAddr::parse(v).map_err(|_| RegisterError::BadHeader("Path")))
        .collect()
}

/// The UA listed the `path` option tag in Supported (RFC 3327 §5.3).
fn supports_path(req: &Request) -> bool {
    req.headers
        .list("Supported")
        .is_ok_and(|l| l.iter().any(|t| t.eq_ignore_ascii_case("path")))
}

/// delta-seconds that fit in 32 bits (RFC 4475 scalar02: larger is malformed).
fn parse_delta(v: &str) -> Option<u32> {
    let v = v.trim_matches([' ', '\t']);
    if v.is_empty() || !v.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    v.parse().ok()
}

/// qvalue = ( "0" [ "." 0*3DIGIT ] ) / ( "1" [ "." 0*3("0") ] ), in thousandths.
fn parse_q(v: &str) -> Option<u16> {
    let (int, frac) = v.split_once('.').unwrap_or((v, ""));
    if frac.len() > 3 || !frac.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let frac_val: u16 = format!("{frac:0<3}").parse().ok()?;
    match int {
        "0" => Some(frac_val),
        "1" if frac_val == 0 => Some(1000),
        _ => None,
    }
}

/// SIP URI equivalence for binding lookup (§19.1.4), close enough for contacts: scheme, user
/// (unescaped, case-sensitive), password, host (case-insensitive) and port compare; the
/// `transport`, `user`, `ttl`, `method` and `maddr` parameters must agree when either side
/// has them; other parameters only when both have them.
pub(crate) fn uri_matches(a: &Uri, b: &Uri) -> bool {
    let unesc = |u: &Option<String>| {
        u.as_deref()
            .map(|s| unescape(s).unwrap_or_else(|_| s.to_string()))
    };
    if !a.scheme.eq_ignore_ascii_case(&b.scheme)
        || unesc(&a.user) != unesc(&b.user)
        || a.password != b.password
        || !a.host.eq_ignore_ascii_case(&b.host)
        || a.port != b.port
    {
        return false;
    }
    let norm = |v: Option<Option<&str>>| v.map(|v| v.map(str::to_ascii_lowercase));
    for name in ["transport", "user", "ttl", "method", "maddr"] {
        if norm(a.param(name)) != norm(b.param(name)) {
            return false;
        }
    }
    a.params.iter().all(|(n, v)| match b.param(n) {
        Some(bv) => v.as_deref().map(str::to_ascii_lowercase) == bv.map(str::to_ascii_lowercase),
        None => true,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sip::message::{parse, SipMessage};

    fn src(port: u16) -> Source {
        Source {
            transport: Transport::Udp,
            addr: SocketAddr::from(([198, 51, 100, 7], port)),
        }
    }

    /// A REGISTER for 1001@example.com with extra header lines.
    fn register(call_id: &str, cseq: u32, extra: &str) -> Request {
        let text = format!(
            "REGISTER sip:example.com SIP/2.0\r\n\
             Via: SIP/2.0/UDP 10.0.0.5:5060;branch=z9hG4bK{cseq}{call_id};rport\r\n\
             Max-Forwards: 70\r\n\
             From: <sip:1001@example.com>;tag=a{cseq}\r\n\
             To: <sip:1001@example.com>\r\n\
             Call-ID: {call_id}\r\n\
             CSeq: {cseq} REGISTER\r\n\
             {extra}\
             Content-Length: 0\r\n\r\n"
        );
        match parse(text.as_bytes()).unwrap() {
            SipMessage::Request(r) => r,
            SipMessage::Response(_) => unreachable!(),
        }
    }

    const AOR: &str = "1001@example.com";

    fn reg() -> Registrar {
        Registrar::new(60, 7200, 3600)
    }

    #[test]
    fn user_agent_kept_bounded_and_replaced_on_refresh() {
        let mut r = reg();
        let t0 = Instant::now();
        let c = "Contact: <sip:1001@10.0.0.5:5060>\r\n";
        let out = r
            .register(
                AOR,
                &register("u1", 1, &format!("{c}User-Agent: Linphone/5.2\r\n")),
                src(1),
                t0,
            )
            .unwrap();
        assert_eq!(out.bindings[0].user_agent.as_deref(), Some("Linphone/5.2"));
        // A refresh without User-Agent forgets the old one (the binding is the new REGISTER's).
        let out = r.register(AOR, &register("u1", 2, c), src(1), t0).unwrap();
        assert_eq!(out.bindings[0].user_agent, None);
        // Too long: cut at MAX_USER_AGENT_BYTES on a character boundary ('é' is 2 bytes).
        let long = format!("x{}", "é".repeat(300));
        let out = r
            .register(
                AOR,
                &register("u1", 3, &format!("{c}User-Agent: {long}\r\n")),
                src(1),
                t0,
            )
            .unwrap();
        let ua = out.bindings[0].user_agent.as_deref().unwrap();
        assert_eq!(ua.len(), MAX_USER_AGENT_BYTES - 1);
        assert!(long.starts_with(ua));
    }

    #[test]
    fn several_contacts_param_over_header_and_echo() {
        let mut r = reg();
        let t0 = Instant::now();
        let req = register(
            "c1",
            1,
            "Contact: <sip:1001@10.0.0.5:5060>;expires=120;q=0.5, <sip:1001@10.0.0.5:5070>\r\nExpires: 1800\r\n",
        );
        let out = r.register(AOR, &req, src(40000), t0).unwrap();
        assert_eq!((out.added, out.refreshed, out.removed), (2, 0, 0));
        // q 1.0 (absent) before q 0.5.
        assert_eq!(out.bindings[0].uri().port, Some(5070));
        assert_eq!(out.bindings[0].expires_in(t0), 1800);
        assert_eq!(out.bindings[1].q, 500);
        assert_eq!(out.bindings[1].expires_in(t0), 120);
        let resp = out.response(&req, t0 + Duration::from_secs(10));
        assert_eq!(resp.status, 200);
        let contacts: Vec<&str> = resp.headers.get_all("Contact").collect();
        assert_eq!(
            contacts,
            [
                "<sip:1001@10.0.0.5:5070>;expires=1790",
                "<sip:1001@10.0.0.5:5060>;q=0.5;expires=110"
            ]
        );
        assert_eq!(
            out.contacts(),
            [
                "<sip:1001@10.0.0.5:5070>;expires=1800",
                "<sip:1001@10.0.0.5:5060>;q=0.5;expires=120"
            ]
        );
        assert_eq!(r.count(), 2);
    }

    #[test]
    fn default_and_cap() {
        let mut r = reg();
        let t0 = Instant::now();
        let out = r
            .register(
                AOR,
                &register("c1", 1, "Contact: <sip:a@10.0.0.5>\r\n"),
                src(1),
                t0,
            )
            .unwrap();
        assert_eq!(out.bindings[0].expires_in(t0), 3600);
        let out = r
            .register(
                AOR,
                &register("c1", 2, "Contact: <sip:a@10.0.0.5>;expires=99999\r\n"),
                src(1),
                t0,
            )
            .unwrap();
        assert_eq!(out.bindings[0].expires_in(t0), 7200);
        assert_eq!(out.refreshed, 1);
        // A default above the maximum is clamped at construction.
        let r2 = Registrar::new(60, 600, 3600);
        assert_eq!(r2.default_expires, 600);
    }

    #[test]
    fn too_brief_is_423_with_min_expires_and_changes_nothing() {
        let mut r = reg();
        let t0 = Instant::now();
        r.register(
            AOR,
            &register("c1", 1, "Contact: <sip:a@10.0.0.5>\r\n"),
            src(1),
            t0,
        )
        .unwrap();
        let req = register(
            "c1",
            2,
            "Contact: <sip:a@10.0.0.5>, <sip:b@10.0.0.5>;expires=30\r\n",
        );
        let err = r.register(AOR, &req, src(1), t0).unwrap_err();
        assert_eq!(err, RegisterError::IntervalTooBrief { min: 60 });
        let resp = err.response(&req);
        assert_eq!(
            (resp.status, resp.headers.get("Min-Expires")),
            (423, Some("60"))
        );
        let left = r.lookup(AOR, t0);
        assert_eq!(left.len(), 1);
        assert_eq!(left[0].cseq, 1);
    }

    #[test]
    fn expires_zero_removes_one_and_star_removes_all() {
        let mut r = reg();
        let t0 = Instant::now();
        r.register(
            AOR,
            &register("c1", 1, "Contact: <sip:a@10.0.0.5>, <sip:b@10.0.0.5>\r\n"),
            src(1),
            t0,
        )
        .unwrap();
        // The contact's expires=0 wins over Expires: 3600.
        let out = r
            .register(
                AOR,
                &register(
                    "c1",
                    2,
                    "Contact: <sip:a@10.0.0.5>;expires=0\r\nExpires: 3600\r\n",
                ),
                src(1),
                t0,
            )
            .unwrap();
        assert_eq!(out.removed, 1);
        assert_eq!(out.bindings.len(), 1);
        assert_eq!(out.bindings[0].uri().user.as_deref(), Some("b"));
        // Expires: 0 header for a contact without its own expires.
        r.register(
            AOR,
            &register("c1", 3, "Contact: <sip:c@10.0.0.5>\r\n"),
            src(1),
            t0,
        )
        .unwrap();
        let out = r
            .register(
                AOR,
                &register("c1", 4, "Contact: <sip:c@10.0.0.5>\r\nExpires: 0\r\n"),
                src(1),
                t0,
            )
            .unwrap();
        assert_eq!(out.bindings.len(), 1);
        let out = r
            .register(
                AOR,
                &register("other", 1, "Contact: *\r\nExpires: 0\r\n"),
                src(1),
                t0,
            )
            .unwrap();
        assert_eq!((out.removed, out.bindings.len(), r.count()), (1, 0, 0));
    }

    #[test]
    fn star_rules() {
        let mut r = reg();
        let t0 = Instant::now();
        let e = r
            .register(AOR, &register("c", 1, "Contact: *\r\n"), src(1), t0)
            .unwrap_err();
        assert_eq!(
            (e.clone(), e.status()),
            (RegisterError::StarWithoutZeroExpires, 400)
        );
        let e = r
            .register(
                AOR,
                &register("c", 1, "Contact: *\r\nExpires: 5\r\n"),
                src(1),
                t0,
            )
            .unwrap_err();
        assert_eq!(e, RegisterError::StarWithoutZeroExpires);
        let e = r
            .register(
                AOR,
                &register("c", 1, "Contact: *, <sip:a@h>\r\nExpires: 0\r\n"),
                src(1),
                t0,
            )
            .unwrap_err();
        assert_eq!(e, RegisterError::StarWithOthers);
        let resp = e.response(&register("c", 1, ""));
        assert_eq!(resp.status, 400);
        assert!(resp.reason.contains("only Contact"), "{}", resp.reason);
        // Same Call-ID, CSeq not higher: the whole removal fails.
        r.register(AOR, &register("c", 5, "Contact: <sip:a@h>\r\n"), src(1), t0)
            .unwrap();
        let e = r
            .register(
                AOR,
                &register("c", 5, "Contact: *\r\nExpires: 0\r\n"),
                src(1),
                t0,
            )
            .unwrap_err();
        assert_eq!((e.clone(), e.status()), (RegisterError::OutOfOrder, 500));
        assert_eq!(r.count(), 1);
    }

    #[test]
    fn call_id_cseq_ordering() {
        let mut r = reg();
        let t0 = Instant::now();
        r.register(
            AOR,
            &register("c1", 10, "Contact: <sip:a@h>\r\n"),
            src(1),
            t0,
        )
        .unwrap();
        for stale in [9, 10] {
            let e = r
                .register(
                    AOR,
                    &register("c1", stale, "Contact: <sip:a@h>;expires=300\r\n"),
                    src(1),
                    t0,
                )
                .unwrap_err();
            assert_eq!(e, RegisterError::OutOfOrder);
        }
        assert_eq!(r.lookup(AOR, t0)[0].expires_in(t0), 3600);
        // A new Call-ID (the UA restarted) may start with a lower CSeq.
        let out = r
            .register(
                AOR,
                &register("c2", 1, "Contact: <sip:a@h>;expires=300\r\n"),
                src(1),
                t0,
            )
            .unwrap();
        assert_eq!((out.refreshed, out.bindings[0].call_id.as_str()), (1, "c2"));
        // The same contact twice in one request is not a replay of itself.
        let out = r
            .register(
                AOR,
                &register("c2", 2, "Contact: <sip:a@h>, <sip:a@h>;expires=400\r\n"),
                src(1),
                t0,
            )
            .unwrap();
        assert_eq!(out.bindings.len(), 1);
        assert_eq!(out.bindings[0].expires_in(t0), 400);
    }

    #[test]
    fn expiry_with_simulated_time() {
        let mut r = reg();
        let t0 = Instant::now();
        r.register(
            AOR,
            &register(
                "c1",
                1,
                "Contact: <sip:a@h>;expires=60, <sip:b@h>;expires=120\r\n",
            ),
            src(1),
            t0,
        )
        .unwrap();
        assert_eq!(r.next_expiry(), Some(t0 + Duration::from_secs(60)));
        let t1 = t0 + Duration::from_secs(60);
        assert_eq!(r.lookup(AOR, t1).len(), 1, "expired at exactly expires_at");
        assert_eq!(r.count(), 2, "not swept yet");
        assert_eq!(r.expire(t1), 1);
        assert_eq!(r.count(), 1);
        assert_eq!(r.expire(t0 + Duration::from_secs(121)), 1);
        assert_eq!((r.count(), r.next_expiry()), (0, None));
        assert!(r.lookup(AOR, t1).is_empty());
        // An expired binding with the same Call-ID does not block a lower CSeq.
        r.register(
            AOR,
            &register("c1", 1, "Contact: <sip:a@h>\r\n"),
            src(1),
            t1,
        )
        .unwrap();
    }

    #[test]
    fn query_source_and_refresh_moves_source() {
        let mut r = reg();
        let t0 = Instant::now();
        r.register(
            AOR,
            &register("c1", 1, "Contact: <sip:a@10.0.0.5>\r\n"),
            src(40000),
            t0,
        )
        .unwrap();
        let out = r.register(AOR, &register("c1", 2, ""), src(1), t0).unwrap();
        assert_eq!((out.bindings.len(), out.added, out.refreshed), (1, 0, 0));
        assert_eq!(
            out.bindings[0].source,
            src(40000),
            "a query changes nothing"
        );
        let t1 = t0 + Duration::from_secs(5);
        r.register(
            AOR,
            &register("c1", 3, "Contact: <sip:a@10.0.0.5>\r\n"),
            src(40001),
            t1,
        )
        .unwrap();
        let b = &r.lookup(AOR, t1)[0];
        assert_eq!((b.source, b.cseq, b.updated_at), (src(40001), 3, t1));
    }

    #[test]
    fn other_nodes_bindings_round_trip_and_merge_after_ours() {
        let mut r = reg();
        let t0 = Instant::now();
        let req = register(
            "c1",
            1,
            "Path: <sip:10.0.0.9:5070;lr>\r\nContact: <sip:1001@10.0.0.5>;q=0.5\r\n",
        );
        r.register(AOR, &req, src(5080), t0).unwrap();
        let rec = r.lookup(AOR, t0)[0].record(t0);
        assert_eq!(rec.path, ["<sip:10.0.0.9:5070;lr>"]);
        assert_eq!(
            (rec.q, rec.cseq, rec.expires_in),
            (500, 1, Duration::from_secs(3600))
        );
        // Another node's registrar reads the record back: same contact, Path, source, expiry.
        let mut other = reg();
        let t1 = t0 + Duration::from_secs(10);
        let b = Binding::from_record(&rec, t1).unwrap();
        assert_eq!(b.path, r.lookup(AOR, t0)[0].path);
        assert_eq!(
            (b.source, b.expires_at),
            (src(5080), t1 + Duration::from_secs(3600))
        );
        other.set_remote(AOR, vec![b.clone()]);
        assert_eq!(other.lookup(AOR, t1).len(), 1);
        assert_eq!(other.count(), 0, "the cache is not our registrations");
        // Our own binding of the same contact wins over the cached one; others merge by q.
        other
            .register(
                AOR,
                &register("c9", 1, "Contact: <sip:1001@10.0.0.5>\r\n"),
                src(1),
                t1,
            )
            .unwrap();
        let got = other.lookup(AOR, t1);
        assert_eq!(got.len(), 1);
        assert!(got[0].path.is_empty());
        let mut far = rec.clone();
        far.contact = "<sip:1001@10.0.0.6>".into();
        far.q = 1000;
        other.set_remote(AOR, vec![Binding::from_record(&far, t1).unwrap()]);
        let got = other.lookup(AOR, t1);
        assert_eq!(got.len(), 2);
        assert_eq!(
            got[0].contact.uri.host, "10.0.0.5",
            "ours first among equal q"
        );
        assert_eq!(got[1].contact.uri.host, "10.0.0.6");
        // Expired cache entries go with the sweep; an empty list forgets the AOR.
        assert_eq!(other.lookup(AOR, t1 + Duration::from_secs(4000)).len(), 0);
        other.set_remote(AOR, Vec::new());
        assert_eq!(other.lookup(AOR, t1).len(), 1);
        // A record that does not parse is refused, not half-used.
        let mut bad = rec;
        bad.path = vec!["<sip:broken".into()];
        assert!(Binding::from_record(&bad, t1).is_none());
    }

    #[test]
    fn newest_first_among_equal_q() {
        let mut r = reg();
        let t0 = Instant::now();
        r.register(
            AOR,
            &register("x", 1, "Contact: <sip:old@h>\r\n"),
            src(1),
            t0,
        )
        .unwrap();
        let t1 = t0 + Duration::from_secs(1);
        r.register(
            AOR,
            &register("y", 1, "Contact: <sip:new@h>\r\n"),
            src(2),
            t1,
        )
        .unwrap();
        let users: Vec<_> = r
            .lookup(AOR, t1)
            .iter()
            .map(|b| b.uri().user.clone().unwrap())
            .collect();
        assert_eq!(users, ["new", "old"]);
    }

    #[test]
    fn uri_comparison_rules() {
        let u = |s: &str| Uri::parse(s).unwrap();
        assert!(uri_matches(
            &u("sip:%61lice@Example.COM"),
            &u("sip:alice@example.com")
        ));
        assert!(!uri_matches(
            &u("sip:Alice@example.com"),
            &u("sip:alice@example.com")
        ));
        assert!(!uri_matches(&u("sip:a@h:5060"), &u("sip:a@h")));
        assert!(!uri_matches(&u("sip:a@h;transport=tcp"), &u("sip:a@h")));
        assert!(uri_matches(
            &u("sip:a@h;transport=TCP;ob"),
            &u("sip:a@h;transport=tcp")
        ));
        assert!(!uri_matches(&u("sip:a@h;x=1"), &u("sip:a@h;x=2")));
    }

    #[test]
    fn bad_contacts_and_limits() {
        let mut r = reg();
        let t0 = Instant::now();
        for extra in [
            "Contact: <tel:+15551234>\r\n",
            "Contact: <sip:a@h>;expires=280297596632815\r\n",
            "Contact: <sip:a@h>;expires=soon\r\n",
            "Contact: <sip:a@h>;q=2\r\n",
            "Contact: <sip:a@h>;q\r\n",
        ] {
            let e = r
                .register(AOR, &register("c", 1, extra), src(1), t0)
                .unwrap_err();
            assert!(matches!(e, RegisterError::BadContact(_)), "{extra}: {e:?}");
            assert_eq!(e.status(), 400);
        }
        let many: Vec<String> = (0..=MAX_BINDINGS_PER_AOR)
            .map(|i| format!("<sip:u{i}@h>"))
            .collect();
        let extra = format!("Contact: {}\r\n", many.join(", "));
        let e = r
            .register(AOR, &register("c", 1, &extra), src(1), t0)
            .unwrap_err();
        assert_eq!(e.status(), 403);
        assert_eq!(r.count(), 0);
        let mut not_reg = register("c", 1, "");
        not_reg.method = Method::Options;
        assert_eq!(
            r.register(AOR, &not_reg, src(1), t0),
            Err(RegisterError::NotRegister)
        );
    }

    #[test]
    fn path_is_stored_with_the_binding_and_echoed_only_when_supported() {
        let mut r = reg();
        let t0 = Instant::now();
        let path = "Path: <sip:edge2.example;lr>, <sip:edge1.example;lr;ob>\r\nPath: <sip:10.0.0.9:5070;lr>\r\n";
        // Without Supported: path the Path is stored (the proxies need it) but not echoed.
        let req = register("c1", 1, &format!("{path}Contact: <sip:1001@10.0.0.5>\r\n"));
        let out = r.register(AOR, &req, src(1), t0).unwrap();
        let hosts: Vec<String> = out.bindings[0]
            .path
            .iter()
            .map(|p| p.uri.host.clone())
            .collect();
        assert_eq!(hosts, ["edge2.example", "edge1.example", "10.0.0.9"]);
        assert!(out.echo_path.is_empty());
        assert!(!out.response(&req, t0).headers.has("Path"));
        assert_eq!(r.lookup(AOR, t0)[0].path.len(), 3);
        // A refresh with Supported: path replaces the Path and gets it back in order.
        let req = register(
            "c1",
            2,
            "Supported: replaces, path\r\nPath: <sip:edge3.example;lr>\r\nContact: <sip:1001@10.0.0.5>\r\n",
        );
        let out = r.register(AOR, &req, src(1), t0).unwrap();
        assert_eq!(out.refreshed, 1);
        assert_eq!(r.lookup(AOR, t0)[0].path[0].uri.host, "edge3.example");
        assert_eq!(r.lookup(AOR, t0)[0].path.len(), 1);
        let resp = out.response(&req, t0);
        assert_eq!(
            resp.headers.get_all("Path").collect::<Vec<_>>(),
            ["<sip:edge3.example;lr>"]
        );
        // Straight from the UA: no Path, so none stored.
        let req = register("c1", 3, "Contact: <sip:1001@10.0.0.5>\r\n");
        r.register(AOR, &req, src(1), t0).unwrap();
        assert!(r.lookup(AOR, t0)[0].path.is_empty());
        // A Path that is not a name-addr list fails the request and changes nothing.
        let bad = register(
            "c1",
            4,
            "Path: <sip:edge;lr\r\nContact: <sip:1001@10.0.0.6>\r\n",
        );
        assert_eq!(
            r.register(AOR, &bad, src(1), t0),
            Err(RegisterError::BadHeader("Path"))
        );
        assert_eq!(r.count(), 1);
    }

    #[test]
    fn qvalues() {
        assert_eq!(parse_q("0.33"), Some(330));
        assert_eq!(parse_q("1"), Some(1000));
        assert_eq!(parse_q("1.000"), Some(1000));
        assert_eq!(parse_q("0"), Some(0));
        assert_eq!(parse_q("1.5"), None);
        assert_eq!(parse_q("0.1234"), None);
        assert_eq!(parse_q(".5"), None);
    }
}
