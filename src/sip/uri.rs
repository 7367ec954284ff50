//! SIP URIs (RFC 3261 §19.1), name-addr values (§20.10/§25) and Via (§20.42).
//!
//! Parsing keeps the text as received (user part still %-escaped) so re-serialising a URI
//! changes nothing; comparisons that the RFC defines on unescaped values use the helpers.

use std::fmt;
use std::net::IpAddr;

use thiserror::Error;

#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum UriError {
    #[error("URI has no scheme")]
    NoScheme,
    #[error("URI has an empty host")]
    EmptyHost,
    #[error("URI port is not a number")]
    BadPort,
    #[error("unterminated quoted string")]
    UnterminatedQuote,
    #[error("unterminated <...>")]
    UnterminatedAngle,
    #[error("bad %-escape in URI")]
    BadEscape,
    #[error("malformed Via")]
    BadVia,
    #[error("bad host")]
    BadHost,
    #[error("malformed parameter")]
    BadParam,
    #[error("bad display name")]
    BadDisplayName,
    #[error("URI with `,`, `;` or `?` must be enclosed in <>")]
    NeedsAngleBrackets,
    #[error("whitespace or forbidden character in URI")]
    BadChar,
}

const LWS: [char; 2] = [' ', '\t'];

/// token (§25.1).
fn is_token_char(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"-.!%*_+`'~".contains(&b)
}

/// `;name[=value]` parameters, in order, value as received.
pub type Params = Vec<(String, Option<String>)>;

fn find_param<'a>(params: &'a Params, name: &str) -> Option<Option<&'a str>> {
    params
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_deref())
}

fn set_param(params: &mut Params, name: &str, value: Option<&str>) {
    let value = value.map(str::to_string);
    match params
        .iter_mut()
        .find(|(n, _)| n.eq_ignore_ascii_case(name))
    {
        Some(slot) => slot.1 = value,
        None => params.push((name.to_string(), value)),
    }
}

fn write_params(f: &mut fmt::Formatter<'_>, params: &Params) -> fmt::Result {
    for (name, value) in params {
        match value {
            Some(v) => write!(f, ";{name}={v}")?,
            None => write!(f, ";{name}")?,
        }
    }
    Ok(())
}

/// Parses `a=b;c` (the text after the first `;`). Quoted values keep their quotes. LWS around
/// `;` and `=` is allowed (§25.1 SEMI, EQUAL); an empty parameter (`;;`, trailing `;`), LWS
/// inside a name or unquoted value, or `,` `<` `>` outside quotes is malformed: that is how a
/// comma-joined list handed in as one value shows up (RFC 4475 badinv01).
fn parse_params(s: &str) -> Result<Params, UriError> {
    let mut out = Params::new();
    for part in split_outside_quotes(s, b';')? {
        let part = part.trim_matches(LWS);
        let (name, value) = match part.split_once('=') {
            Some((n, v)) => (n.trim_matches(LWS), Some(v.trim_matches(LWS))),
            None => (part, None),
        };
        if name.is_empty()
            || !name
                .bytes()
                .all(|b| is_token_char(b) || b"[]/:&+$()".contains(&b))
        {
            return Err(UriError::BadParam);
        }
        if let Some(v) = value {
            let quoted =
                v.len() >= 2 && v.starts_with('"') && quoted_string_len(v) == Some(v.len());
            if !quoted
                && v.bytes().any(|b| {
                    b.is_ascii_whitespace() || b.is_ascii_control() || b",<>\"\\".contains(&b)
                })
            {
                return Err(UriError::BadParam);
            }
        }
        out.push((name.to_string(), value.map(str::to_string)));
    }
    Ok(out)
}

/// Length of the quoted-string at the start of `s` (quotes included), `None` if unterminated.
fn quoted_string_len(s: &str) -> Option<usize> {
    let bytes = s.as_bytes();
    if bytes.first() != Some(&b'"') {
        return None;
    }
    let mut i = 1;
    while i < bytes.len() {
        match bytes[i] {
            b'\\' => i += 2,
            b'"' => return Some(i + 1),
            _ => i += 1,
        }
    }
    None
}

/// Splits on `sep` where it is not inside a quoted string or `<...>`.
pub fn split_outside_quotes(s: &str, sep: u8) -> Result<Vec<&str>, UriError> {
    let bytes = s.as_bytes();
    let mut parts = Vec::new();
    let mut start = 0;
    let mut in_quote = false;
    let mut angle = false;
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if in_quote {
            match b {
                b'\\' => i += 1,
                b'"' => in_quote = false,
                _ => {}
            }
        } else {
            match b {
                b'"' => in_quote = true,
                b'<' => angle = true,
                b'>' => angle = false,
                _ if b == sep && !angle => {
                    parts.push(&s[start..i]);
                    start = i + 1;
                }
                _ => {}
            }
        }
        i += 1;
    }
    if in_quote {
        return Err(UriError::UnterminatedQuote);
    }
    if angle {
        return Err(UriError::UnterminatedAngle);
    }
    parts.push(&s[start..]);
    Ok(parts)
}

/// `%XX` unescaping (RFC 3261 §19.1.4 compares users unescaped).
pub fn unescape(s: &str) -> Result<String, UriError> {
    if !s.contains('%') {
        return Ok(s.to_string());
    }
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes.get(i + 1..i + 3).ok_or(UriError::BadEscape)?;
            if !hex.iter().all(u8::is_ascii_hexdigit) {
                return Err(UriError::BadEscape);
            }
            let hex = std::str::from_utf8(hex).map_err(|_| UriError::BadEscape)?;
            out.push(u8::from_str_radix(hex, 16).map_err(|_| UriError::BadEscape)?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| UriError::BadEscape)
}

/// A `sip:`/`sips:` URI (other schemes such as `tel:` keep everything after the colon in `host`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Uri {
    pub scheme: String,
    pub user: Option<String>,
    pub password: Option<String>,
    pub host: String,
    pub port: Option<u16>,
    pub params: Params,
    pub headers: Option<String>,
}

impl Uri {
    pub fn sip(user: Option<&str>, host: &str, port: Option<u16>) -> Uri {
        Uri {
            scheme: "sip".into(),
            user: user.map(str::to_string),
            password: None,
            host: host.to_string(),
            port,
            params: Params::new(),
            headers: None,
        }
    }

    pub fn parse(s: &str) -> Result<Uri, UriError> {
        let s = s.trim();
        let (scheme, rest) = s.split_once(':').ok_or(UriError::NoScheme)?;
        if scheme.is_empty()
            || !scheme.as_bytes()[0].is_ascii_alphabetic()
            || !scheme
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"+-.".contains(&b))
        {
            return Err(UriError::NoScheme);
        }
        // No URI form has LWS, controls, quotes or angle brackets unescaped (§19.1, RFC 3986);
        // seeing one means the caller split a header wrongly or the sender broke it.
        if rest
            .bytes()
            .any(|b| b.is_ascii_whitespace() || b.is_ascii_control() || b"<>\"".contains(&b))
        {
            return Err(UriError::BadChar);
        }
        let is_sip = scheme.eq_ignore_ascii_case("sip") || scheme.eq_ignore_ascii_case("sips");
        if !is_sip {
            return Ok(Uri {
                scheme: scheme.to_string(),
                user: None,
                password: None,
                host: rest.to_string(),
                port: None,
                params: Params::new(),
                headers: None,
            });
        }
        // userinfo ends at the first '@': user and password cannot hold one unescaped, while
        // the user may hold '?', ';' and ',' (RFC 4475 intmeth, semiuri), so '@' goes first.
        let (userinfo, hostpart) = match rest.find('@') {
            Some(at) => (Some(&rest[..at]), &rest[at + 1..]),
            None => (None, rest),
        };
        let (hostpart, headers) = match hostpart.split_once('?') {
            Some((r, h)) => (r, Some(h.to_string())),
            None => (hostpart, None),
        };
        let (user, password) = match userinfo {
            Some(ui) => match ui.split_once(':') {
                Some((u, p)) => (Some(u.to_string()), Some(p.to_string())),
                None => (Some(ui.to_string()), None),
            },
            None => (None, None),
        };
        if let Some(u) = &user {
            unescape(u)?;
        }
        let (hostport, params) = match hostpart.find(';') {
            Some(i) => (&hostpart[..i], parse_params(&hostpart[i + 1..])?),
            None => (hostpart, Params::new()),
        };
        let (host, port) = split_host_port(hostport)?;
        Ok(Uri {
            scheme: scheme.to_ascii_lowercase(),
            user,
            password,
            host,
            port,
            params,
            headers,
        })
    }

    /// `sip:` or `sips:` (the schemes whose structure is parsed).
    pub fn is_sip(&self) -> bool {
        self.scheme == "sip" || self.scheme == "sips"
    }

    /// The user part with %-escapes resolved.
    pub fn user_unescaped(&self) -> Option<String> {
        self.user
            .as_deref()
            .map(|u| unescape(u).unwrap_or_else(|_| u.to_string()))
    }

    pub fn param(&self, name: &str) -> Option<Option<&str>> {
        find_param(&self.params, name)
    }

    pub fn set_param(&mut self, name: &str, value: Option<&str>) {
        set_param(&mut self.params, name, value)
    }

    pub fn remove_param(&mut self, name: &str) {
        self.params.retain(|(n, _)| !n.eq_ignore_ascii_case(name));
    }

    /// `transport=` parameter, lowercased.
    pub fn transport(&self) -> Option<String> {
        self.param("transport")
            .flatten()
            .map(|t| t.to_ascii_lowercase())
    }

    pub fn host_ip(&self) -> Option<IpAddr> {
        self.host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse()
            .ok()
    }

    /// `user@host` with the user unescaped: the address-of-record key.
    pub fn aor(&self) -> String {
        match self.user_unescaped() {
            Some(u) => format!("{}@{}", u, self.host.to_ascii_lowercase()),
            None => self.host.to_ascii_lowercase(),
        }
    }
}

fn parse_port(p: &str) -> Result<u16, UriError> {
    let p = p.trim_matches(LWS);
    if p.is_empty() || !p.bytes().all(|b| b.is_ascii_digit()) {
        return Err(UriError::BadPort);
    }
    p.parse().map_err(|_| UriError::BadPort)
}

/// Splits `host[:port]` including `[v6]:port`. The host is a hostname (letters, digits, `-`,
/// `.`, and `_` seen in the wild), an IPv4 address or a bracketed IPv6 reference.
pub fn split_host_port(s: &str) -> Result<(String, Option<u16>), UriError> {
    let s = s.trim_matches(LWS);
    if let Some(rest) = s.strip_prefix('[') {
        let end = rest.find(']').ok_or(UriError::EmptyHost)?;
        if rest[..end].parse::<std::net::Ipv6Addr>().is_err() {
            return Err(UriError::BadHost);
        }
        let host = format!("[{}]", &rest[..end]);
        let after = rest[end + 1..].trim_start_matches(LWS);
        let port = match after.strip_prefix(':') {
            Some(p) => Some(parse_port(p)?),
            None if after.is_empty() => None,
            None => return Err(UriError::BadPort),
        };
        return Ok((host, port));
    }
    let (host, port) = match s.rsplit_once(':') {
        Some((h, p)) => (h.trim_end_matches(LWS), Some(parse_port(p)?)),
        None => (s, None),
    };
    if host.is_empty() {
        return Err(UriError::EmptyHost);
    }
    if !host
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"-._".contains(&b))
    {
        return Err(UriError::BadHost);
    }
    Ok((host.to_string(), port))
}

impl fmt::Display for Uri {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:", self.scheme)?;
        if let Some(u) = &self.user {
            f.write_str(u)?;
            if let Some(p) = &self.password {
                write!(f, ":{p}")?;
            }
            f.write_str("@")?;
        }
        f.write_str(&self.host)?;
        if let Some(p) = self.port {
            write!(f, ":{p}")?;
        }
        write_params(f, &self.params)?;
        if let Some(h) = &self.headers {
            write!(f, "?{h}")?;
        }
        Ok(())
    }
}

/// `["Display"] <uri>;params` as in From, To, Contact, Route.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NameAddr {
    pub display: Option<String>,
    pub uri: Uri,
    pub params: Params,
}

impl NameAddr {
    pub fn new(uri: Uri) -> NameAddr {
        NameAddr {
            display: None,
            uri,
            params: Params::new(),
        }
    }

    /// `name-addr` or `addr-spec`, then `;params` (§20.10). The display name is kept as
    /// received (quotes included). Rejected: an unbalanced quote (RFC 4475 quotbal), a display
    /// name that is neither a quoted string nor tokens (baddn), LWS inside `<>` (badaspec), an
    /// addr-spec whose URI holds `?` or `,` (regbadct), anything but params after `>`.
    pub fn parse(s: &str) -> Result<NameAddr, UriError> {
        let s = s.trim_matches(LWS);
        if let Some(lt) = find_unquoted(s, b'<') {
            let display = s[..lt].trim_matches(LWS);
            check_display(display)?;
            let gt = s[lt..].find('>').ok_or(UriError::UnterminatedAngle)? + lt;
            let inner = &s[lt + 1..gt];
            if inner.trim_matches(LWS).len() != inner.len() {
                return Err(UriError::BadChar);
            }
            let uri = Uri::parse(inner)?;
            let params = parse_trailing_params(&s[gt + 1..])?;
            let display = if display.is_empty() {
                None
            } else {
                Some(display.to_string())
            };
            Ok(NameAddr {
                display,
                uri,
                params,
            })
        } else {
            if s.contains('"') {
                // A quoted display name needs the URI in <>; an unbalanced one is quotbal.
                return Err(if quotes_balanced(s) {
                    UriError::BadDisplayName
                } else {
                    UriError::UnterminatedQuote
                });
            }
            // addr-spec without brackets: everything after the first ';' is a header param.
            let (uri, params) = match s.find(';') {
                Some(i) => (&s[..i], parse_params(&s[i + 1..])?),
                None => (s, Params::new()),
            };
            let uri = uri.trim_end_matches(LWS);
            if uri.contains(['?', ',']) {
                return Err(UriError::NeedsAngleBrackets);
            }
            Ok(NameAddr {
                display: None,
                uri: Uri::parse(uri)?,
                params,
            })
        }
    }

    pub fn param(&self, name: &str) -> Option<Option<&str>> {
        find_param(&self.params, name)
    }

    pub fn set_param(&mut self, name: &str, value: Option<&str>) {
        set_param(&mut self.params, name, value)
    }

    pub fn tag(&self) -> Option<&str> {
        self.param("tag").flatten()
    }

    pub fn set_tag(&mut self, tag: &str) {
        self.set_param("tag", Some(tag))
    }
}

/// After `>`: nothing, or `;params`.
fn parse_trailing_params(s: &str) -> Result<Params, UriError> {
    let s = s.trim_start_matches(LWS);
    if s.is_empty() {
        return Ok(Params::new());
    }
    match s.strip_prefix(';') {
        Some(p) => parse_params(p),
        None => Err(UriError::BadParam),
    }
}

fn quotes_balanced(s: &str) -> bool {
    let mut in_quote = false;
    let bytes = s.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'\\' if in_quote => i += 1,
            b'"' => in_quote = !in_quote,
            _ => {}
        }
        i += 1;
    }
    !in_quote
}

/// display-name = *(token LWS) / quoted-string (§25.1). Non-ASCII in an unquoted name is
/// tolerated: UAs send UTF-8 names unquoted and nothing is ambiguous about it.
fn check_display(d: &str) -> Result<(), UriError> {
    if d.starts_with('"') {
        return match quoted_string_len(d) {
            Some(n) if n == d.len() => Ok(()),
            Some(_) => Err(UriError::BadDisplayName),
            None => Err(UriError::UnterminatedQuote),
        };
    }
    if d.bytes()
        .all(|b| is_token_char(b) || b == b' ' || b == b'\t' || b >= 0x80)
    {
        Ok(())
    } else if d.contains('"') && !quotes_balanced(d) {
        Err(UriError::UnterminatedQuote)
    } else {
        Err(UriError::BadDisplayName)
    }
}

fn find_unquoted(s: &str, needle: u8) -> Option<usize> {
    let mut in_quote = false;
    let bytes = s.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'\\' if in_quote => i += 1,
            b'"' => in_quote = !in_quote,
            b if b == needle && !in_quote => return Some(i),
            _ => {}
        }
        i += 1;
    }
    None
}

impl fmt::Display for NameAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(d) = &self.display {
            write!(f, "{d} ")?;
        }
        write!(f, "<{}>", self.uri)?;
        write_params(f, &self.params)
    }
}

/// One Via value: `SIP/2.0/UDP host:port;branch=...`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Via {
    pub transport: String,
    pub host: String,
    pub port: Option<u16>,
    pub params: Params,
}

impl Via {
    /// One via-parm. `sent-protocol` may have LWS around its slashes (RFC 4475 wsinv); an
    /// unquoted `,` means a whole comma-joined header was passed in and is an error rather
    /// than a branch of `z9hG4bKaaa, SIP/2.0/TCP ...`.
    pub fn parse(s: &str) -> Result<Via, UriError> {
        let s = s.trim_matches(LWS);
        let (name, rest) = take_token(s)?;
        let (version, rest) = take_token(expect_slash(rest)?)?;
        let (transport, rest) = take_token(expect_slash(rest)?)?;
        if !name.eq_ignore_ascii_case("SIP") || version != "2.0" {
            return Err(UriError::BadVia);
        }
        if !rest.starts_with(LWS) {
            return Err(UriError::BadVia);
        }
        let transport = transport.to_ascii_uppercase();
        let rest = rest.trim_matches(LWS);
        if split_outside_quotes(rest, b',')?.len() > 1 {
            return Err(UriError::BadVia);
        }
        let (hostport, params) = match rest.find(';') {
            Some(i) => (&rest[..i], parse_params(&rest[i + 1..])?),
            None => (rest, Params::new()),
        };
        let (host, port) = split_host_port(hostport)?;
        Ok(Via {
            transport,
            host,
            port,
            params,
        })
    }

    pub fn branch(&self) -> Option<&str> {
        self.param("branch").flatten()
    }

    pub fn param(&self, name: &str) -> Option<Option<&str>> {
        find_param(&self.params, name)
    }

    pub fn set_param(&mut self, name: &str, value: Option<&str>) {
        set_param(&mut self.params, name, value)
    }

    /// `rport` present (RFC 3581), with its value if filled in.
    pub fn rport(&self) -> Option<Option<u16>> {
        self.param("rport").map(|v| v.and_then(|p| p.parse().ok()))
    }

    pub fn received(&self) -> Option<&str> {
        self.param("received").flatten()
    }
}

/// A token at the start of `s` (after LWS) and what follows it.
fn take_token(s: &str) -> Result<(&str, &str), UriError> {
    let s = s.trim_start_matches(LWS);
    let end = s.bytes().position(|b| !is_token_char(b)).unwrap_or(s.len());
    if end == 0 {
        return Err(UriError::BadVia);
    }
    Ok((&s[..end], &s[end..]))
}

/// SLASH = SWS "/" SWS.
fn expect_slash(s: &str) -> Result<&str, UriError> {
    s.trim_start_matches(LWS)
        .strip_prefix('/')
        .ok_or(UriError::BadVia)
}

impl fmt::Display for Via {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SIP/2.0/{} {}", self.transport, self.host)?;
        if let Some(p) = self.port {
            write!(f, ":{p}")?;
        }
        write_params(f, &self.params)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sip_uri_round_trip() {
        let s = "sip:alice%20b:secret@[2001:db8::1]:5070;transport=tcp;lr?subject=x";
        let u = Uri::parse(s).unwrap();
        assert_eq!(u.user.as_deref(), Some("alice%20b"));
        assert_eq!(u.user_unescaped().as_deref(), Some("alice b"));
        assert_eq!(u.password.as_deref(), Some("secret"));
        assert_eq!(u.host, "[2001:db8::1]");
        assert_eq!(u.port, Some(5070));
        assert_eq!(u.transport().as_deref(), Some("tcp"));
        assert_eq!(u.param("lr"), Some(None));
        assert_eq!(u.to_string(), s);
    }

    #[test]
    fn bad_uris() {
        assert_eq!(Uri::parse("nocolon"), Err(UriError::NoScheme));
        assert_eq!(Uri::parse("sip:a@h:xx"), Err(UriError::BadPort));
        assert_eq!(Uri::parse("sip:a%zz@h"), Err(UriError::BadEscape));
        assert_eq!(Uri::parse("sip:@"), Err(UriError::EmptyHost));
    }

    #[test]
    fn name_addr_forms() {
        let n = NameAddr::parse("\"Bob <the builder>\" <sip:bob@b.example>;tag=abc").unwrap();
        assert_eq!(n.display.as_deref(), Some("\"Bob <the builder>\""));
        assert_eq!(n.uri.user.as_deref(), Some("bob"));
        assert_eq!(n.tag(), Some("abc"));
        let n = NameAddr::parse("sip:carol@c.example;tag=9").unwrap();
        assert_eq!(n.tag(), Some("9"));
        assert!(n.uri.params.is_empty());
        let n = NameAddr::parse("Anon <sip:x@y;lr>").unwrap();
        assert_eq!(n.uri.param("lr"), Some(None));
        assert!(NameAddr::parse("<sip:x@y").is_err());
        assert!(NameAddr::parse("\"open <sip:x@y>").is_err());
    }

    #[test]
    fn via_parse() {
        let v = Via::parse("SIP/2.0/udp 10.0.0.1:5060 ;branch=z9hG4bK1;rport").unwrap();
        assert_eq!(v.transport, "UDP");
        assert_eq!(v.host, "10.0.0.1");
        assert_eq!(v.port, Some(5060));
        assert_eq!(v.branch(), Some("z9hG4bK1"));
        assert_eq!(v.rport(), Some(None));
        assert!(Via::parse("SIP/2.0 host").is_err());
        assert!(Via::parse("SIP/3.0/UDP host").is_err());
    }

    #[test]
    fn via_lws_and_comma_joined() {
        let v =
            Via::parse("SIP  /   2.0 /udp   h.example.com : 5062 ;  branch = z9hG4bKx").unwrap();
        assert_eq!(
            (v.transport.as_str(), v.host.as_str(), v.port),
            ("UDP", "h.example.com", Some(5062))
        );
        assert_eq!(v.branch(), Some("z9hG4bKx"));
        // A whole comma-joined header is an error, not a branch of "aaa, SIP/2.0/TCP ...".
        assert_eq!(
            Via::parse("SIP/2.0/UDP a;branch=z9hG4bKaaa, SIP/2.0/TCP b.example:5070"),
            Err(UriError::BadVia)
        );
        assert!(Via::parse("SIP/2.0/UDP").is_err());
        assert!(Via::parse("SIP/2.0/UDPhost").is_err());
        assert_eq!(
            Via::parse("SIP/2.0/UDP h;;branch=x"),
            Err(UriError::BadParam)
        );
        assert_eq!(
            Via::parse("SIP/2.0/UDP [::1]:5060;received=::1")
                .unwrap()
                .host,
            "[::1]"
        );
        assert_eq!(Via::parse("SIP/2.0/UDP [zz::1]"), Err(UriError::BadHost));
    }

    #[test]
    fn uri_user_before_host_and_strict_chars() {
        let u = Uri::parse("sip:a?b;c@h.example?subject=x").unwrap();
        assert_eq!(
            (u.user.as_deref(), u.host.as_str()),
            (Some("a?b;c"), "h.example")
        );
        assert_eq!(u.headers.as_deref(), Some("subject=x"));
        let u = Uri::parse("sip:bob@b.example?Referred-By=sip:a@c").unwrap();
        assert_eq!(u.user.as_deref(), Some("bob"));
        assert_eq!(Uri::parse("sip:a b@h"), Err(UriError::BadChar));
        assert_eq!(Uri::parse("sip:a@h(x)"), Err(UriError::BadHost));
        assert_eq!(Uri::parse("sip:a@h:+5"), Err(UriError::BadPort));
        assert_eq!(Uri::parse("sip:a%+1@h"), Err(UriError::BadEscape));
        assert_eq!(Uri::parse("sip:a@h;"), Err(UriError::BadParam));
        assert_eq!(Uri::parse("1sip:a@h"), Err(UriError::NoScheme));
    }

    #[test]
    fn name_addr_strictness() {
        let err = |s: &str| NameAddr::parse(s).map(|_| ()).unwrap_err();
        assert_eq!(err("Bell, Alexander <sip:a@h>"), UriError::BadDisplayName);
        assert_eq!(err("< sip:a@h >"), UriError::BadChar);
        assert_eq!(err("sip:a@h?Route=x"), UriError::NeedsAngleBrackets);
        assert_eq!(err("<sip:a@h> junk"), UriError::BadParam);
        assert_eq!(err(r#""a" b <sip:a@h>"#), UriError::BadDisplayName);
        assert_eq!(err(r#""a <sip:a@h>"#), UriError::UnterminatedQuote);
        let n = NameAddr::parse(r#"Jörg Müller <sip:a@h>;tag="q;x""#).unwrap();
        assert_eq!(n.display.as_deref(), Some("Jörg Müller"));
        assert_eq!(n.tag(), Some(r#""q;x""#));
        let n = NameAddr::parse(r#""x \"y\"" <sip:a@h>"#).unwrap();
        assert_eq!(n.display.as_deref(), Some(r#""x \"y\"""#));
    }

    #[test]
    fn split_respects_quotes_and_angles() {
        let parts = split_outside_quotes("\"a,b\" <sip:x@y;a=1,2>, <sip:z@w>", b',').unwrap();
        assert_eq!(parts.len(), 2);
        assert!(split_outside_quotes("\"open", b',').is_err());
    }
}
