//! SIP messages (RFC 3261 §7, §20, §25): parsing, framing and serialisation.
//!
//! Our own parser (see docs/ARCHITECTURE.md for why): header names are matched
//! case-insensitively with compact forms expanded, folded lines are joined, every header is kept
//! in order with its value as received, and framing follows §18.3 (Content-Length on streams,
//! datagram bodies longer than Content-Length are cut, shorter ones rejected).

use std::fmt;

use bytes::Bytes;
use thiserror::Error;

use super::uri::{split_outside_quotes, NameAddr, Uri, UriError, Via};

/// Largest header section we accept before the blank line (guards TCP buffers).
pub const MAX_HEADER_BYTES: usize = 64 * 1024;
/// Largest body we accept.
pub const MAX_BODY_BYTES: usize = 1024 * 1024;

#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum ParseError {
    #[error("Empty message")]
    Empty,
    #[error("Malformed start line")]
    BadStartLine,
    #[error("Unsupported SIP version")]
    BadVersion,
    #[error("Bad status code")]
    BadStatus,
    #[error("Malformed header line {0}")]
    BadHeaderLine(usize),
    #[error("Invalid UTF-8 in header {0}")]
    NotUtf8(String),
    #[error("Headers not terminated")]
    Unterminated,
    #[error("Header section too large")]
    TooLarge,
    #[error("Bad Content-Length")]
    BadContentLength,
    #[error("Body shorter than Content-Length")]
    TruncatedBody,
    #[error("Missing {0} header")]
    Missing(&'static str),
    #[error("Bad {0} header")]
    BadHeader(&'static str),
    #[error("CSeq method does not match request method")]
    CSeqMismatch,
    #[error("Bad Request-URI")]
    BadRequestUri,
    #[error("Duplicate {0} header")]
    Duplicate(&'static str),
}

impl From<(&'static str, UriError)> for ParseError {
    fn from((name, _): (&'static str, UriError)) -> Self {
        ParseError::BadHeader(name)
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Method {
    Invite,
    Ack,
    Bye,
    Cancel,
    Register,
    Options,
    Info,
    Message,
    Update,
    Notify,
    Subscribe,
    Refer,
    Prack,
    Publish,
    Other(String),
}

impl Method {
    /// Methods are case-sensitive (§7.1).
    pub fn parse(s: &str) -> Method {
        match s {
            "INVITE" => Method::Invite,
            "ACK" => Method::Ack,
            "BYE" => Method::Bye,
            "CANCEL" => Method::Cancel,
            "REGISTER" => Method::Register,
            "OPTIONS" => Method::Options,
            "INFO" => Method::Info,
            "MESSAGE" => Method::Message,
            "UPDATE" => Method::Update,
            "NOTIFY" => Method::Notify,
            "SUBSCRIBE" => Method::Subscribe,
            "REFER" => Method::Refer,
            "PRACK" => Method::Prack,
            "PUBLISH" => Method::Publish,
            other => Method::Other(other.to_string()),
        }
    }

    pub fn as_str(&self) -> &str {
        match self {
            Method::Invite => "INVITE",
            Method::Ack => "ACK",
            Method::Bye => "BYE",
            Method::Cancel => "CANCEL",
            Method::Register => "REGISTER",
            Method::Options => "OPTIONS",
            Method::Info => "INFO",
            Method::Message => "MESSAGE",
            Method::Update => "UPDATE",
            Method::Notify => "NOTIFY",
            Method::Subscribe => "SUBSCRIBE",
            Method::Refer => "REFER",
            Method::Prack => "PRACK",
            Method::Publish => "PUBLISH",
            Method::Other(s) => s,
        }
    }
}

impl fmt::Display for Method {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Compact forms (§7.3.3 and the IANA registry) expanded to full names.
fn expand_compact(name: &str) -> &str {
    if name.len() != 1 {
        return name;
    }
    match name.as_bytes()[0].to_ascii_lowercase() {
        b'i' => "Call-ID",
        b'm' => "Contact",
        b'e' => "Content-Encoding",
        b'l' => "Content-Length",
        b'c' => "Content-Type",
        b'f' => "From",
        b's' => "Subject",
        b'k' => "Supported",
        b't' => "To",
        b'v' => "Via",
        b'o' => "Event",
        b'u' => "Allow-Events",
        b'r' => "Refer-To",
        b'b' => "Referred-By",
        b'x' => "Session-Expires",
        b'y' => "Identity",
        b'a' => "Accept-Contact",
        b'j' => "Reject-Contact",
        b'd' => "Request-Disposition",
        _ => name,
    }
}

/// True when two header names denote the same header.
pub fn same_header(a: &str, b: &str) -> bool {
    expand_compact(a).eq_ignore_ascii_case(expand_compact(b))
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    /// The name as received (compact or full, original case).
    pub name: String,
    /// The value as received, folding joined with a single space, outer whitespace trimmed.
    pub value: String,
}

/// Headers in message order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Headers(Vec<Header>);

impl Headers {
    pub fn new() -> Headers {
        Headers(Vec::new())
    }

    pub fn iter(&self) -> impl Iterator<Item = &Header> {
        self.0.iter()
    }

    /// First value of the header (compact-form aware, case-insensitive).
    pub fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|h| same_header(&h.name, name))
            .map(|h| h.value.as_str())
    }

    pub fn has(&self, name: &str) -> bool {
        self.get(name).is_some()
    }

    /// Every header line with this name, in order (not split on commas).
    pub fn get_all<'a, 'n>(&'a self, name: &'n str) -> impl Iterator<Item = &'a str> + use<'a, 'n> {
        self.0
            .iter()
            .filter(move |h| same_header(&h.name, name))
            .map(|h| h.value.as_str())
    }

    /// Every element of a comma-separated list header across all its lines (Via, Route,
    /// Record-Route, Contact, Allow, Supported...), commas inside quotes or `<>` respected.
    pub fn list(&self, name: &str) -> Result<Vec<&str>, UriError> {
        let mut out = Vec::new();
        for v in self.get_all(name) {
            for part in split_outside_quotes(v, b',')? {
                let part = part.trim();
                if !part.is_empty() {
                    out.push(part);
                }
            }
        }
        Ok(out)
    }

    pub fn push(&mut self, name: impl Into<String>, value: impl Into<String>) {
        self.0.push(Header {
            name: name.into(),
            value: value.into(),
        });
    }

    /// Inserts before every other header (a new top Via).
    pub fn push_front(&mut self, name: impl Into<String>, value: impl Into<String>) {
        self.0.insert(
            0,
            Header {
                name: name.into(),
                value: value.into(),
            },
        );
    }

    /// Replaces every instance with one value, at the position of the first.
    pub fn set(&mut self, name: &str, value: impl Into<String>) {
        let value = value.into();
        match self.0.iter().position(|h| same_header(&h.name, name)) {
            Some(i) => {
                self.0[i].value = value;
                let mut seen = 0usize;
                self.0.retain(|h| {
                    if same_header(&h.name, name) {
                        seen += 1;
                        seen == 1
                    } else {
                        true
                    }
                });
            }
            None => self.push(name.to_string(), value),
        }
    }

    pub fn remove(&mut self, name: &str) {
        self.0.retain(|h| !same_header(&h.name, name));
    }

    /// Removes the first element of a list header (the top Via), keeping the others.
    pub fn pop_first_list_value(&mut self, name: &str) -> Option<String> {
        let i = self.0.iter().position(|h| same_header(&h.name, name))?;
        let parts: Vec<String> = split_outside_quotes(&self.0[i].value, b',')
            .ok()?
            .into_iter()
            .map(|p| p.trim().to_string())
            .collect();
        let first = parts.first()?.clone();
        if parts.len() == 1 {
            self.0.remove(i);
        } else {
            self.0[i].value = parts[1..].join(", ");
        }
        Some(first)
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// CSeq header value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CSeq {
    pub seq: u32,
    pub method: Method,
}

impl CSeq {
    pub fn parse(s: &str) -> Option<CSeq> {
        let mut it = s.split_ascii_whitespace();
        let seq = parse_digits::<u32>(it.next()?)?;
        let method = it.next()?;
        if !method.bytes().all(is_token_char) {
            return None;
        }
        let method = Method::parse(method);
        if it.next().is_some() || seq > 0x7fff_ffff {
            return None;
        }
        Some(CSeq { seq, method })
    }
}

impl fmt::Display for CSeq {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.seq, self.method)
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    pub method: Method,
    /// Request-URI as received.
    pub uri: String,
    pub headers: Headers,
    pub body: Bytes,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    pub reason: String,
    pub headers: Headers,
    pub body: Bytes,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SipMessage {
    Request(Request),
    Response(Response),
}

/// Header accessors shared by requests and responses.
// `from_hdr`/`from_tag` name the From header, not a conversion; callers use these names.
#[allow(clippy::wrong_self_convention)]
pub trait HeaderAccess {
    fn headers(&self) -> &Headers;
    fn headers_mut(&mut self) -> &mut Headers;

    fn call_id(&self) -> Option<&str> {
        self.headers().get("Call-ID")
    }
    fn cseq(&self) -> Option<CSeq> {
        self.headers().get("CSeq").and_then(CSeq::parse)
    }
    fn from_hdr(&self) -> Option<NameAddr> {
        self.headers()
            .get("From")
            .and_then(|v| NameAddr::parse(v).ok())
    }
    fn to_hdr(&self) -> Option<NameAddr> {
        self.headers()
            .get("To")
            .and_then(|v| NameAddr::parse(v).ok())
    }
    fn from_tag(&self) -> Option<String> {
        self.from_hdr().and_then(|n| n.tag().map(str::to_string))
    }
    fn to_tag(&self) -> Option<String> {
        self.to_hdr().and_then(|n| n.tag().map(str::to_string))
    }
    fn vias(&self) -> Vec<Via> {
        self.headers()
            .list("Via")
            .map(|l| l.into_iter().filter_map(|v| Via::parse(v).ok()).collect())
            .unwrap_or_default()
    }
    fn top_via(&self) -> Option<Via> {
        let first = self.headers().list("Via").ok()?.into_iter().next()?;
        Via::parse(first).ok()
    }
    fn contacts(&self) -> Vec<NameAddr> {
        self.headers()
            .list("Contact")
            .map(|l| {
                l.into_iter()
                    .filter_map(|v| NameAddr::parse(v).ok())
                    .collect()
            })
            .unwrap_or_default()
    }
    fn content_type(&self) -> Option<String> {
        self.headers().get("Content-Type").map(|v| {
            v.split(';')
                .next()
                .unwrap_or_default()
                .trim()
                .to_ascii_lowercase()
        })
    }
    fn expires(&self) -> Option<u32> {
        self.headers()
            .get("Expires")
            .and_then(|v| v.trim().parse().ok())
    }
}

impl HeaderAccess for Request {
    fn headers(&self) -> &Headers {
        &self.headers
    }
    fn headers_mut(&mut self) -> &mut Headers {
        &mut self.headers
    }
}

impl HeaderAccess for Response {
    fn headers(&self) -> &Headers {
        &self.headers
    }
    fn headers_mut(&mut self) -> &mut Headers {
        &mut self.headers
    }
}

impl Request {
    pub fn new(method: Method, uri: impl Into<String>) -> Request {
        Request {
            method,
            uri: uri.into(),
            headers: Headers::new(),
            body: Bytes::new(),
        }
    }

    pub fn parsed_uri(&self) -> Result<Uri, UriError> {
        Uri::parse(&self.uri)
    }

    /// `Max-Forwards`, 70 when absent (§8.1.1.6).
    pub fn max_forwards(&self) -> Option<u32> {
        match self.headers.get("Max-Forwards") {
            Some(v) => v.trim().parse().ok(),
            None => Some(70),
        }
    }

    /// A response carrying Via, From, To, Call-ID and CSeq of this request (§8.2.6.2). A
    /// response that can establish a dialog (101-299 to an out-of-dialog INVITE or
    /// SUBSCRIBE) also carries every Record-Route of the request, values and order as
    /// received (§12.1.1), so the peer's route set keeps the proxies in the path.
    pub fn response(&self, status: u16, reason: Option<&str>) -> Response {
        let copied: &[&str] = if self.creates_dialog_with(status) {
            &["Via", "From", "To", "Call-ID", "CSeq", "Record-Route"]
        } else {
            &["Via", "From", "To", "Call-ID", "CSeq"]
        };
        let mut headers = Headers::new();
        for h in self.headers.iter() {
            if copied.iter().any(|n| same_header(&h.name, n)) {
                headers.push(h.name.clone(), h.value.clone());
            }
        }
        Response {
            status,
            reason: reason.unwrap_or(default_reason(status)).to_string(),
            headers,
            body: Bytes::new(),
        }
    }

    /// True when a `status` answer to this request establishes a dialog (§12.1): 101-299 to
    /// an INVITE or SUBSCRIBE (RFC 6665) that is not inside a dialog yet (no To tag).
    pub fn creates_dialog_with(&self, status: u16) -> bool {
        (101..300).contains(&status)
            && matches!(self.method, Method::Invite | Method::Subscribe)
            && self.to_tag().is_none()
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(512 + self.body.len());
        out.extend_from_slice(self.method.as_str().as_bytes());
        out.push(b' ');
        out.extend_from_slice(self.uri.as_bytes());
        out.extend_from_slice(b" SIP/2.0\r\n");
        write_headers_and_body(&mut out, &self.headers, &self.body);
        out
    }
}

impl Response {
    pub fn is_provisional(&self) -> bool {
        self.status < 200
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(512 + self.body.len());
        out.extend_from_slice(format!("SIP/2.0 {} {}\r\n", self.status, self.reason).as_bytes());
        write_headers_and_body(&mut out, &self.headers, &self.body);
        out
    }

    /// Adds the To tag if the To header has none (§8.2.6.2).
    pub fn ensure_to_tag(&mut self, tag: &str) {
        if let Some(mut to) = self.to_hdr() {
            if to.tag().is_none() {
                to.set_tag(tag);
                self.headers.set("To", to.to_string());
            }
        }
    }
}

fn write_headers_and_body(out: &mut Vec<u8>, headers: &Headers, body: &[u8]) {
    for h in headers.iter() {
        if same_header(&h.name, "Content-Length") {
            continue;
        }
        out.extend_from_slice(h.name.as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(h.value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(format!("Content-Length: {}\r\n\r\n", body.len()).as_bytes());
    out.extend_from_slice(body);
}

impl SipMessage {
    pub fn to_bytes(&self) -> Vec<u8> {
        match self {
            SipMessage::Request(r) => r.to_bytes(),
            SipMessage::Response(r) => r.to_bytes(),
        }
    }

    pub fn headers(&self) -> &Headers {
        match self {
            SipMessage::Request(r) => &r.headers,
            SipMessage::Response(r) => &r.headers,
        }
    }
}

pub fn default_reason(status: u16) -> &'static str {
    match status {
        100 => "Trying",
        180 => "Ringing",
        181 => "Call Is Being Forwarded",
        182 => "Queued",
        183 => "Session Progress",
        200 => "OK",
        202 => "Accepted",
        300 => "Multiple Choices",
        301 => "Moved Permanently",
        302 => "Moved Temporarily",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        407 => "Proxy Authentication Required",
        408 => "Request Timeout",
        415 => "Unsupported Media Type",
        416 => "Unsupported URI Scheme",
        420 => "Bad Extension",
        423 => "Interval Too Brief",
        469 => "Bad Info Package",
        480 => "Temporarily Unavailable",
        481 => "Call/Transaction Does Not Exist",
        482 => "Loop Detected",
        483 => "Too Many Hops",
        486 => "Busy Here",
        487 => "Request Terminated",
        488 => "Not Acceptable Here",
        491 => "Request Pending",
        500 => "Server Internal Error",
        501 => "Not Implemented",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Server Time-out",
        505 => "Version Not Supported",
        513 => "Message Too Large",
        600 => "Busy Everywhere",
        603 => "Decline",
        _ => match status / 100 {
            1 => "Progress",
            2 => "OK",
            3 => "Redirect",
            4 => "Client Error",
            5 => "Server Error",
            _ => "Global Failure",
        },
    }
}

/// What a stream (TCP) buffer holds at its start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Frame {
    /// Not a whole message yet.
    Incomplete,
    /// `n` bytes of CRLF keep-alive (RFC 5626 §3.5.1) to discard.
    KeepAlive(usize),
    /// A whole message of `n` bytes.
    Message(usize),
}

fn find_header_end(buf: &[u8]) -> Option<(usize, usize)> {
    // Returns (end of header section, start of body). Accepts bare-LF line ends too.
    let mut i = 0;
    while i < buf.len() {
        if buf[i] == b'\n' {
            if buf.get(i + 1) == Some(&b'\n') {
                return Some((i, i + 2));
            }
            if buf.get(i + 1) == Some(&b'\r') && buf.get(i + 2) == Some(&b'\n') {
                return Some((i, i + 3));
            }
        }
        i += 1;
    }
    None
}

/// Leading CR/LF before a start line is ignored (§7.5).
fn leading_crlf(buf: &[u8]) -> usize {
    buf.iter()
        .take_while(|b| **b == b'\r' || **b == b'\n')
        .count()
}

/// Frames one message on a stream transport (§18.3): the header section, then exactly
/// Content-Length body bytes (absent Content-Length counts as 0). An error means the stream
/// cannot be re-synchronised (bad or conflicting Content-Length, oversized header section).
pub fn frame_stream(buf: &[u8]) -> Result<Frame, ParseError> {
    let ws = leading_crlf(buf);
    if ws > 0 {
        return Ok(Frame::KeepAlive(ws));
    }
    let Some((hdr_end, body_start)) = find_header_end(buf) else {
        if buf.len() > MAX_HEADER_BYTES {
            return Err(ParseError::TooLarge);
        }
        return Ok(Frame::Incomplete);
    };
    if hdr_end > MAX_HEADER_BYTES {
        return Err(ParseError::TooLarge);
    }
    let len = content_length_raw(&buf[..hdr_end])?.unwrap_or(0);
    let total = body_start + len;
    if buf.len() < total {
        return Ok(Frame::Incomplete);
    }
    Ok(Frame::Message(total))
}

/// One header line of a raw header section, folding already joined. Lenient: used where a full
/// parse has failed or not yet happened (framing, building a 400).
struct RawHeader {
    name: Vec<u8>,
    value: Vec<u8>,
}

/// Header lines after the start line, continuation lines joined with one space; lines without
/// a colon are skipped.
fn raw_headers(head: &[u8]) -> Vec<RawHeader> {
    let mut out: Vec<RawHeader> = Vec::new();
    let mut last_valid = false;
    for line in split_lines(head).skip(1) {
        if line.first().is_some_and(|b| *b == b' ' || *b == b'\t') {
            if let (Some(last), true) = (out.last_mut(), last_valid) {
                let cont = trim_lws(line);
                if !cont.is_empty() {
                    if !last.value.is_empty() {
                        last.value.push(b' ');
                    }
                    last.value.extend_from_slice(cont);
                }
            }
            continue;
        }
        let Some(colon) = line.iter().position(|b| *b == b':') else {
            last_valid = false;
            continue;
        };
        last_valid = true;
        out.push(RawHeader {
            name: trim_lws(&line[..colon]).to_vec(),
            value: trim_lws(&line[colon + 1..]).to_vec(),
        });
    }
    out
}

fn trim_lws(mut s: &[u8]) -> &[u8] {
    while let [b' ' | b'\t', rest @ ..] = s {
        s = rest;
    }
    while let [rest @ .., b' ' | b'\t'] = s {
        s = rest;
    }
    s
}

fn raw_name_is(h: &RawHeader, name: &str) -> bool {
    std::str::from_utf8(&h.name).is_ok_and(|n| same_header(n, name))
}

/// `1*DIGIT` as a number; `None` for signs, spaces, empty or overflow.
fn parse_digits<T: std::str::FromStr>(s: &str) -> Option<T> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

/// Content-Length from a raw header section without full parsing (framing needs it first).
/// Every instance must be a number and all must agree (RFC 4475 mcl01); over
/// [`MAX_BODY_BYTES`] is refused before anything is buffered.
fn content_length_raw(head: &[u8]) -> Result<Option<usize>, ParseError> {
    let mut found = None;
    for h in raw_headers(head) {
        if !raw_name_is(&h, "Content-Length") {
            continue;
        }
        let v = std::str::from_utf8(&h.value).map_err(|_| ParseError::BadContentLength)?;
        let n: usize = parse_digits(v).ok_or(ParseError::BadContentLength)?;
        if n > MAX_BODY_BYTES || found.is_some_and(|f| f != n) {
            return Err(ParseError::BadContentLength);
        }
        found = Some(n);
    }
    Ok(found)
}

/// Parses one datagram or one framed stream message.
///
/// Outcomes for tricky input are pinned by the table in `tests/parser_table.rs`; the rules are:
/// the start line is strict (single spaces, `SIP/2.0`), header names are tokens matched
/// case-insensitively with compact forms, folding is joined with one space, values are kept as
/// received (outer SP/HTAB trimmed), the headers a transaction needs are checked for syntax and
/// uniqueness, and Content-Length frames the body (a longer datagram body is cut, a shorter one
/// is an error).
pub fn parse(buf: &[u8]) -> Result<SipMessage, ParseError> {
    let buf = &buf[leading_crlf(buf)..];
    if buf.is_empty() {
        return Err(ParseError::Empty);
    }
    let (hdr_end, body_start) = find_header_end(buf).ok_or_else(|| {
        if buf.iter().all(|b| b.is_ascii_whitespace()) {
            ParseError::Empty
        } else if buf.len() > MAX_HEADER_BYTES {
            ParseError::TooLarge
        } else {
            ParseError::Unterminated
        }
    })?;
    if hdr_end > MAX_HEADER_BYTES {
        return Err(ParseError::TooLarge);
    }
    let head = &buf[..hdr_end];
    let mut lines = split_lines(head);
    let start = lines.next().ok_or(ParseError::Empty)?;
    let start = parse_start_line(start)?;
    let headers = parse_headers(lines)?;
    let body = frame_body(&headers, &buf[body_start..])?;

    match start {
        StartLine::Response { status, reason } => {
            let resp = Response {
                status,
                reason,
                headers,
                body,
            };
            check_common(&resp.headers)?;
            Ok(SipMessage::Response(resp))
        }
        StartLine::Request { method, uri } => {
            let req = Request {
                method,
                uri,
                headers,
                body,
            };
            let cseq = check_common(&req.headers)?;
            if cseq.method != req.method {
                return Err(ParseError::CSeqMismatch);
            }
            if let Some(v) = single(&req.headers, "Max-Forwards")? {
                // §20.22 gives 1*DIGIT; RFC 4475 scalar02 treats > 255 as malformed.
                match parse_digits::<u32>(v) {
                    Some(n) if n <= 255 => {}
                    _ => return Err(ParseError::BadHeader("Max-Forwards")),
                }
            }
            Ok(SipMessage::Request(req))
        }
    }
}

enum StartLine {
    Request { method: Method, uri: String },
    Response { status: u16, reason: String },
}

/// `SIP/` in any case, on bytes: slicing the str could split a multi-byte character.
fn starts_with_sip(s: &str) -> bool {
    s.as_bytes()
        .get(..4)
        .is_some_and(|p| p.eq_ignore_ascii_case(b"SIP/"))
}

fn parse_start_line(line: &[u8]) -> Result<StartLine, ParseError> {
    let line = std::str::from_utf8(line).map_err(|_| ParseError::BadStartLine)?;
    // HTAB is allowed in a reason phrase only; CR and other controls nowhere.
    if line
        .bytes()
        .any(|b| (b.is_ascii_control() && b != b'\t') || b == 0x7f)
    {
        return Err(ParseError::BadStartLine);
    }
    if starts_with_sip(line) {
        let mut it = line.splitn(3, ' ');
        if !it.next().is_some_and(|v| v.eq_ignore_ascii_case("SIP/2.0")) {
            return Err(ParseError::BadVersion);
        }
        let code = it.next().ok_or(ParseError::BadStatus)?;
        if code.len() != 3 {
            return Err(ParseError::BadStatus);
        }
        let status: u16 = parse_digits(code).ok_or(ParseError::BadStatus)?;
        if !(100..=699).contains(&status) {
            return Err(ParseError::BadStatus);
        }
        // A missing reason (no SP after the code) is tolerated as an empty one.
        let reason = it.next().unwrap_or("").to_string();
        return Ok(StartLine::Response { status, reason });
    }
    // Exactly one SP between the three parts (RFC 4475 lwsstart, trws, lwsruri).
    let mut it = line.split(' ');
    let (Some(method), Some(uri), Some(version), None) =
        (it.next(), it.next(), it.next(), it.next())
    else {
        return Err(ParseError::BadStartLine);
    };
    if method.is_empty() || !method.bytes().all(is_token_char) {
        return Err(ParseError::BadStartLine);
    }
    if !version.eq_ignore_ascii_case("SIP/2.0") {
        return Err(if starts_with_sip(version) {
            ParseError::BadVersion
        } else {
            ParseError::BadStartLine
        });
    }
    if uri.bytes().any(|b| b.is_ascii_whitespace()) {
        return Err(ParseError::BadRequestUri);
    }
    let parsed = Uri::parse(uri).map_err(|_| ParseError::BadRequestUri)?;
    // Escaped headers are not allowed in a Request-URI (§19.1.5, RFC 4475 escruri).
    if parsed.is_sip() && parsed.headers.is_some() {
        return Err(ParseError::BadRequestUri);
    }
    Ok(StartLine::Request {
        method: Method::parse(method),
        uri: uri.to_string(),
    })
}

/// The body per Content-Length (§18.3 for datagrams: longer is cut, shorter is an error).
fn frame_body(headers: &Headers, rest: &[u8]) -> Result<Bytes, ParseError> {
    let mut len: Option<usize> = None;
    for v in headers.get_all("Content-Length") {
        let n: usize = parse_digits(v).ok_or(ParseError::BadContentLength)?;
        if n > MAX_BODY_BYTES || len.is_some_and(|l| l != n) {
            return Err(ParseError::BadContentLength);
        }
        len = Some(n);
    }
    let body = match len {
        Some(n) if rest.len() < n => return Err(ParseError::TruncatedBody),
        Some(n) => &rest[..n],
        None if rest.len() > MAX_BODY_BYTES => return Err(ParseError::BadContentLength),
        None => rest,
    };
    Ok(Bytes::copy_from_slice(body))
}

/// The value of a header that may appear at most once (RFC 4475 multi01).
fn single<'a>(h: &'a Headers, name: &'static str) -> Result<Option<&'a str>, ParseError> {
    let mut all = h.get_all(name);
    let first = all.next();
    if all.next().is_some() {
        return Err(ParseError::Duplicate(name));
    }
    Ok(first)
}

/// Every element of a list header that holds name-addrs must parse (or be `*` for Contact).
fn check_name_addr_list(h: &Headers, name: &'static str, star_ok: bool) -> Result<(), ParseError> {
    for line in h.get_all(name) {
        for part in split_outside_quotes(line, b',').map_err(|e| ParseError::from((name, e)))? {
            let part = part.trim_matches([' ', '\t']);
            if part.is_empty() {
                return Err(ParseError::BadHeader(name));
            }
            if star_ok && part == "*" {
                continue;
            }
            NameAddr::parse(part).map_err(|e| ParseError::from((name, e)))?;
        }
    }
    Ok(())
}

/// The headers every message needs (§8.1.1) and the ones we act on, checked for syntax and,
/// where the grammar allows one instance only, for duplicates.
fn check_common(h: &Headers) -> Result<CSeq, ParseError> {
    let mut vias = 0;
    for line in h.get_all("Via") {
        for part in split_outside_quotes(line, b',').map_err(|e| ParseError::from(("Via", e)))? {
            let part = part.trim_matches([' ', '\t']);
            // An empty element (`a,,b` or a bare `Via:`) is malformed (RFC 4475 badinv01).
            if part.is_empty() {
                return Err(ParseError::BadHeader("Via"));
            }
            Via::parse(part).map_err(|e| ParseError::from(("Via", e)))?;
            vias += 1;
        }
    }
    if vias == 0 {
        return Err(ParseError::Missing("Via"));
    }
    let from = single(h, "From")?.ok_or(ParseError::Missing("From"))?;
    NameAddr::parse(from).map_err(|e| ParseError::from(("From", e)))?;
    let to = single(h, "To")?.ok_or(ParseError::Missing("To"))?;
    NameAddr::parse(to).map_err(|e| ParseError::from(("To", e)))?;
    let call_id = single(h, "Call-ID")?.ok_or(ParseError::Missing("Call-ID"))?;
    if call_id.is_empty()
        || call_id
            .bytes()
            .any(|b| b.is_ascii_whitespace() || b.is_ascii_control())
    {
        return Err(ParseError::BadHeader("Call-ID"));
    }
    let cseq = single(h, "CSeq")?.ok_or(ParseError::Missing("CSeq"))?;
    let cseq = CSeq::parse(cseq).ok_or(ParseError::BadHeader("CSeq"))?;
    check_name_addr_list(h, "Contact", true)?;
    check_name_addr_list(h, "Route", false)?;
    check_name_addr_list(h, "Record-Route", false)?;
    if let Some(v) = single(h, "Expires")? {
        // delta-seconds within 2^32-1 (§20.19); larger is malformed (RFC 4475 scalar02).
        parse_digits::<u32>(v).ok_or(ParseError::BadHeader("Expires"))?;
    }
    single(h, "Content-Type")?;
    Ok(cseq)
}

fn is_token_char(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"-.!%*_+`'~".contains(&b)
}

fn split_lines(head: &[u8]) -> impl Iterator<Item = &[u8]> {
    head.split(|b| *b == b'\n')
        .map(|l| l.strip_suffix(b"\r").unwrap_or(l))
}

fn parse_headers<'a>(lines: impl Iterator<Item = &'a [u8]>) -> Result<Headers, ParseError> {
    let mut headers: Vec<Header> = Vec::new();
    for (idx, line) in lines.enumerate() {
        let lineno = idx + 2;
        if line.first().is_some_and(|b| *b == b' ' || *b == b'\t') {
            // Folded continuation (§7.3.1): joined with a single space.
            let last = headers
                .last_mut()
                .ok_or(ParseError::BadHeaderLine(lineno))?;
            let cont =
                std::str::from_utf8(line).map_err(|_| ParseError::NotUtf8(last.name.clone()))?;
            if cont.contains('\r') {
                return Err(ParseError::BadHeaderLine(lineno));
            }
            let cont = cont.trim_matches([' ', '\t']);
            if !cont.is_empty() {
                if !last.value.is_empty() {
                    last.value.push(' ');
                }
                last.value.push_str(cont);
            }
            continue;
        }
        let colon = line
            .iter()
            .position(|b| *b == b':')
            .ok_or(ParseError::BadHeaderLine(lineno))?;
        let name =
            std::str::from_utf8(&line[..colon]).map_err(|_| ParseError::BadHeaderLine(lineno))?;
        // HCOLON allows SP/HTAB before the colon (`TO :`), nothing inside the name.
        let name = name.trim_end_matches([' ', '\t']);
        if name.is_empty() || !name.bytes().all(is_token_char) {
            return Err(ParseError::BadHeaderLine(lineno));
        }
        let value = std::str::from_utf8(&line[colon + 1..])
            .map_err(|_| ParseError::NotUtf8(name.to_string()))?;
        // A bare CR is never part of a value; it would also change meaning when re-serialised.
        if value.contains('\r') {
            return Err(ParseError::BadHeaderLine(lineno));
        }
        headers.push(Header {
            name: name.to_string(),
            value: value.trim_matches([' ', '\t']).to_string(),
        });
    }
    Ok(Headers(headers))
}

/// Best-effort extraction of the headers a `400` needs from a message that failed to parse,
/// so the sender learns why (§21.4.1). `None` when no response can be built: the input is a
/// response or an ACK, has no recognisable request line, or carries no Via to answer along.
/// From, To, Call-ID and CSeq are copied when present (first instance only), every Via as
/// received; `505` for an unsupported SIP version.
pub fn error_response_for(buf: &[u8], err: &ParseError) -> Option<Response> {
    let buf = &buf[leading_crlf(buf)..];
    let (hdr_end, _) = find_header_end(buf).unwrap_or((buf.len(), buf.len()));
    let head = &buf[..hdr_end.min(MAX_HEADER_BYTES)];
    let start = split_lines(head).next()?;
    let start = std::str::from_utf8(start).ok()?;
    if starts_with_sip(start) {
        return None; // never answer a response
    }
    let method = start.split(' ').next()?;
    if method.is_empty() || !method.bytes().all(is_token_char) || method == "ACK" {
        return None;
    }
    let mut headers = Headers::new();
    for h in raw_headers(head) {
        let (Ok(name), Ok(value)) = (std::str::from_utf8(&h.name), std::str::from_utf8(&h.value))
        else {
            continue;
        };
        if value.contains('\r') || !name.bytes().all(is_token_char) {
            continue;
        }
        let copy = if same_header(name, "Via") {
            true
        } else {
            ["From", "To", "Call-ID", "CSeq"]
                .iter()
                .any(|n| same_header(name, n) && !headers.has(n))
        };
        if copy {
            headers.push(name.to_string(), value.to_string());
        }
    }
    if !headers.has("Via") {
        return None;
    }
    let status = if *err == ParseError::BadVersion {
        505
    } else {
        400
    };
    Some(Response {
        status,
        reason: if status == 505 {
            default_reason(505).to_string()
        } else {
            // The reason phrase names the fault so plain UAs can show it.
            format!("Bad Request - {err}")
        },
        headers,
        body: Bytes::new(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const INVITE: &str = "INVITE sip:bob@example.com SIP/2.0\r\n\
v: SIP/2.0/UDP 10.0.0.1:5060;branch=z9hG4bK776asdhds, SIP/2.0/TCP b.example:5070;branch=z9hG4bKbbb\r\n\
Max-Forwards: 70\r\n\
t: Bob <sip:bob@example.com>\r\n\
f: Alice <sip:alice@example.com>;tag=1928301774\r\n\
i: a84b4c76e66710\r\n\
CSeq: 314159 INVITE\r\n\
m: <sip:alice@10.0.0.1>\r\n\
X-Custom:   keep  me  \r\n\
Subject: folded\r\n continued\r\n\
c: application/sdp\r\n\
l: 4\r\n\r\nv=0\r\n";

    fn req(s: &str) -> Request {
        match parse(s.as_bytes()).unwrap() {
            SipMessage::Request(r) => r,
            SipMessage::Response(_) => panic!("not a request"),
        }
    }

    #[test]
    fn compact_and_comma_joined() {
        let r = req(INVITE);
        assert_eq!(r.method, Method::Invite);
        assert_eq!(r.call_id(), Some("a84b4c76e66710"));
        let vias = r.vias();
        assert_eq!(vias.len(), 2);
        assert_eq!(vias[0].branch(), Some("z9hG4bK776asdhds"));
        assert_eq!(vias[1].transport, "TCP");
        assert_eq!(vias[1].branch(), Some("z9hG4bKbbb"));
        assert_eq!(r.from_tag().as_deref(), Some("1928301774"));
        assert_eq!(r.headers.get("subject"), Some("folded continued"));
        assert_eq!(r.headers.get("x-custom"), Some("keep  me"));
        assert_eq!(&r.body[..], b"v=0\r");
        assert_eq!(r.content_type().as_deref(), Some("application/sdp"));
    }

    #[test]
    fn udp_body_longer_is_cut_shorter_rejected() {
        let long = INVITE.replace("l: 4\r\n", "l: 2\r\n");
        assert_eq!(&req(&long).body[..], b"v=");
        let short = INVITE.replace("l: 4\r\n", "l: 40\r\n");
        assert_eq!(parse(short.as_bytes()), Err(ParseError::TruncatedBody));
        let bad = INVITE.replace("l: 4\r\n", "l: x\r\n");
        assert_eq!(parse(bad.as_bytes()), Err(ParseError::BadContentLength));
    }

    #[test]
    fn broken_header_gets_400_with_reason() {
        let bad = INVITE.replace("Max-Forwards: 70\r\n", "Max-Forwards 70\r\n");
        let err = parse(bad.as_bytes()).unwrap_err();
        assert_eq!(err, ParseError::BadHeaderLine(3));
        let resp = error_response_for(bad.as_bytes(), &err).unwrap();
        assert_eq!(resp.status, 400);
        assert!(resp.reason.contains("Malformed header line 3"));
        assert_eq!(resp.call_id(), Some("a84b4c76e66710"));
    }

    #[test]
    fn stream_framing() {
        let msg = INVITE.as_bytes();
        assert_eq!(frame_stream(&msg[..40]), Ok(Frame::Incomplete));
        // Content-Length is 4 but the text carries 5 body bytes: the frame ends one early.
        let framed = msg.len() - 1;
        assert_eq!(frame_stream(&msg[..framed - 1]), Ok(Frame::Incomplete));
        assert_eq!(frame_stream(msg), Ok(Frame::Message(framed)));
        let mut two = msg[..framed].to_vec();
        two.extend_from_slice(msg);
        assert_eq!(frame_stream(&two), Ok(Frame::Message(framed)));
        assert_eq!(frame_stream(b"\r\n\r\nINV"), Ok(Frame::KeepAlive(4)));
    }

    #[test]
    fn serialise_round_trip() {
        let r = req(INVITE);
        let again = req(std::str::from_utf8(&r.to_bytes()).unwrap());
        assert_eq!(again.headers.get("X-Custom"), Some("keep  me"));
        assert_eq!(again.body, r.body);
        assert_eq!(again.vias().len(), 2);
    }

    #[test]
    fn response_parse_and_build() {
        let r = req(INVITE);
        let mut resp = r.response(180, None);
        resp.ensure_to_tag("xyz");
        let parsed = match parse(&resp.to_bytes()).unwrap() {
            SipMessage::Response(r) => r,
            _ => panic!(),
        };
        assert_eq!(parsed.status, 180);
        assert_eq!(parsed.reason, "Ringing");
        assert_eq!(parsed.to_tag().as_deref(), Some("xyz"));
        assert_eq!(
            parsed.cseq(),
            Some(CSeq {
                seq: 314159,
                method: Method::Invite
            })
        );
    }

    #[test]
    fn dialog_creating_responses_copy_record_route_in_order() {
        let mut r = req(INVITE);
        r.headers.push(
            "Record-Route",
            "<sip:p2.example;lr;ftag=x>, <sip:p1.example;lr>",
        );
        r.headers.push("Record-Route", "<sip:p0.example;lr>");
        let rr = |m: &Response| {
            m.headers
                .get_all("Record-Route")
                .map(str::to_string)
                .collect::<Vec<_>>()
        };
        for status in [180, 183, 200] {
            assert_eq!(
                rr(&r.response(status, None)),
                [
                    "<sip:p2.example;lr;ftag=x>, <sip:p1.example;lr>",
                    "<sip:p0.example;lr>"
                ],
                "{status}"
            );
        }
        // 100 and failures establish nothing; neither does a response inside a dialog.
        assert!(rr(&r.response(100, None)).is_empty());
        assert!(rr(&r.response(486, None)).is_empty());
        let mut in_dialog = r.clone();
        in_dialog
            .headers
            .set("To", "Bob <sip:bob@example.com>;tag=b1");
        assert!(rr(&in_dialog.response(200, None)).is_empty());
        let mut msg = r.clone();
        msg.method = Method::Message;
        assert!(rr(&msg.response(200, None)).is_empty());
    }

    #[test]
    fn rejects() {
        assert_eq!(parse(b""), Err(ParseError::Empty));
        assert_eq!(
            parse(b"INVITE sip:x SIP/2.0\r\nVia: SIP/2.0/UDP h"),
            Err(ParseError::Unterminated)
        );
        let no_cid = INVITE.replace("i: a84b4c76e66710\r\n", "");
        assert_eq!(
            parse(no_cid.as_bytes()),
            Err(ParseError::Missing("Call-ID"))
        );
        let mism = INVITE.replace("314159 INVITE", "314159 BYE");
        assert_eq!(parse(mism.as_bytes()), Err(ParseError::CSeqMismatch));
        let v3 = INVITE.replace("sip:bob@example.com SIP/2.0", "sip:bob@example.com SIP/3.0");
        assert_eq!(parse(v3.as_bytes()), Err(ParseError::BadVersion));
        let mut utf = INVITE.as_bytes().to_vec();
        let pos = INVITE.find("keep").unwrap();
        utf[pos] = 0xff;
        assert_eq!(parse(&utf), Err(ParseError::NotUtf8("X-Custom".into())));
    }
}
