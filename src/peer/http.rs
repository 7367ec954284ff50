//! A small HTTP/1.1 client for the agent: GET/POST/PUT with keep-alive connections pooled
//! per `host:port`, bodies by `Content-Length` or chunked, and the timings the cost model
//! needs (request written → first response byte, first byte → last byte).
//!
//! Hand-written rather than a client crate: the agent talks only to callvault and to other
//! agents (both axum), needs per-request timing, and the crate keeps its dependency list
//! short.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::PeerError;

/// Largest response header block accepted.
const MAX_HEAD: usize = 64 * 1024;
/// Idle connections kept per address.
const MAX_IDLE_PER_HOST: usize = 8;

/// An `http://` URL split into what a request needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Url {
    /// `host:port` (port filled in, 80 by default).
    pub authority: String,
    /// Path and query, starting with `/`.
    pub path: String,
}

impl Url {
    /// Parses `http://host[:port][/path]`; `https` is refused (no TLS in the agent).
    pub fn parse(s: &str) -> Result<Url, PeerError> {
        let bad = || PeerError::BadUrl(s.to_string());
        let rest = s.trim().strip_prefix("http://").ok_or_else(bad)?;
        let (auth, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/"),
        };
        if auth.is_empty() || auth.contains('@') {
            return Err(bad());
        }
        let host_end = if auth.starts_with('[') {
            auth.find(']').ok_or_else(bad)? + 1
        } else {
            auth.find(':').unwrap_or(auth.len())
        };
        let (host, port) = auth.split_at(host_end);
        let has_port = match port.strip_prefix(':') {
            Some(p) if !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) => true,
            None if port.is_empty() => false,
            _ => return Err(bad()),
        };
        if host.is_empty() || host == "[]" {
            return Err(bad());
        }
        let authority = if has_port {
            auth.to_string()
        } else {
            format!("{auth}:80")
        };
        Ok(Url {
            authority,
            path: path.to_string(),
        })
    }

    /// The URL for `path` on a base like `http://host:port[/prefix]`.
    pub fn join(base: &str, path: &str) -> Result<Url, PeerError> {
        let mut u = Url::parse(base)?;
        let prefix = u.path.trim_end_matches('/');
        u.path = format!("{prefix}{path}");
        Ok(u)
    }
}

/// A response with its body read in full.
#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    /// Request written → first byte of the response.
    pub rtt: Duration,
    /// First byte → last byte of the body.
    pub transfer: Duration,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn is_success(&self) -> bool {
        (200..300).contains(&self.status)
    }

    /// A short text for error messages: the status and the start of the body.
    pub fn describe(&self) -> String {
        let body = String::from_utf8_lossy(&self.body[..self.body.len().min(200)]).into_owned();
        format!("HTTP {}: {}", self.status, body.trim())
    }
}

/// What to send.
#[derive(Debug, Clone, Default)]
pub struct Request<'a> {
    pub method: &'a str,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    /// Refuse a body larger than this.
    pub max_body: usize,
}

impl<'a> Request<'a> {
    pub fn get(max_body: usize) -> Request<'a> {
        Request {
            method: "GET",
            headers: Vec::new(),
            body: Vec::new(),
            max_body,
        }
    }

    pub fn header(mut self, k: &str, v: impl Into<String>) -> Self {
        self.headers.push((k.to_string(), v.into()));
        self
    }
}

/// Connection pool and timeouts; clones share the pool.
#[derive(Debug, Clone)]
pub struct Client {
    idle: Arc<Mutex<HashMap<String, Vec<TcpStream>>>>,
    /// Connect timeout, and the longest wait for any single read.
    pub io_timeout: Duration,
}

impl Default for Client {
    fn default() -> Self {
        Client::new(Duration::from_secs(20))
    }
}

impl Client {
    pub fn new(io_timeout: Duration) -> Client {
        Client {
            idle: Arc::new(Mutex::new(HashMap::new())),
            io_timeout,
        }
    }

    fn take_idle(&self, authority: &str) -> Option<TcpStream> {
        self.idle.lock().ok()?.get_mut(authority)?.pop()
    }

    fn put_idle(&self, authority: &str, s: TcpStream) {
        if let Ok(mut m) = self.idle.lock() {
            let v = m.entry(authority.to_string()).or_default();
            if v.len() < MAX_IDLE_PER_HOST {
                v.push(s);
            }
        }
    }

    /// Sends `req` to `url`. A pooled connection that turns out closed is retried once on a
    /// fresh one (the server may have timed it out between requests).
    pub async fn send(&self, url: &Url, req: &Request<'_>) -> Result<Response, PeerError> {
        if let Some(s) = self.take_idle(&url.authority) {
            match self.exchange(s, url, req).await {
                Ok(r) => return Ok(r),
                Err(PeerError::Stale) => {}
                Err(e) => return Err(e),
            }
        }
        let s = tokio::time::timeout(self.io_timeout, TcpStream::connect(&url.authority))
            .await
            .map_err(|_| PeerError::Http(format!("connect to {} timed out", url.authority)))?
            .map_err(|e| PeerError::Http(format!("connect to {}: {e}", url.authority)))?;
        let _ = s.set_nodelay(true);
        match self.exchange(s, url, req).await {
            Err(PeerError::Stale) => Err(PeerError::Http(format!(
                "{} closed the connection",
                url.authority
            ))),
            r => r,
        }
    }

    pub async fn get(
        &self,
        url: &Url,
        headers: &[(String, String)],
        max_body: usize,
    ) -> Result<Response, PeerError> {
        let req = Request {
            method: "GET",
            headers: headers.to_vec(),
            body: Vec::new(),
            max_body,
        };
        self.send(url, &req).await
    }

    async fn exchange(
        &self,
        mut s: TcpStream,
        url: &Url,
        req: &Request<'_>,
    ) -> Result<Response, PeerError> {
        let mut head = format!(
            "{} {} HTTP/1.1\r\nHost: {}\r\nUser-Agent: callvault-peer\r\n",
            req.method, url.path, url.authority
        );
        for (k, v) in &req.headers {
            head.push_str(&format!("{k}: {v}\r\n"));
        }
        if req.method != "GET" || !req.body.is_empty() {
            head.push_str(&format!("Content-Length: {}\r\n", req.body.len()));
        }
        head.push_str("\r\n");
        let io_err = |e: std::io::Error| PeerError::Http(format!("{}: {e}", url.authority));
        let mut out = head.into_bytes();
        out.extend_from_slice(&req.body);
        // A write error on a pooled connection means it was closed under us.
        if let Err(e) = s.write_all(&out).await {
            return Err(match e.kind() {
                std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset => {
                    PeerError::Stale
                }
                _ => io_err(e),
            });
        }
        let sent = Instant::now();
        let (resp, reusable) =
            read_response(&mut s, req, sent, self.io_timeout, &url.authority).await?;
        if reusable {
            self.put_idle(&url.authority, s);
        }
        Ok(resp)
    }

    /// PUT (or POST) of a file, streamed from disk on a fresh connection.
    pub async fn send_file(
        &self,
        url: &Url,
        method: &str,
        headers: &[(String, String)],
        path: &std::path::Path,
        max_body: usize,
    ) -> Result<Response, PeerError> {
        let mut file = tokio::fs::File::open(path).await?;
        let len = file.metadata().await?.len();
        let mut s = tokio::time::timeout(self.io_timeout, TcpStream::connect(&url.authority))
            .await
            .map_err(|_| PeerError::Http(format!("connect to {} timed out", url.authority)))?
            .map_err(|e| PeerError::Http(format!("connect to {}: {e}", url.authority)))?;
        let mut head = format!(
            "{method} {} HTTP/1.1\r\nHost: {}\r\nUser-Agent: callvault-peer\r\nContent-Length: {len}\r\n",
            url.path, url.authority
        );
        for (k, v) in headers {
            head.push_str(&format!("{k}: {v}\r\n"));
        }
        head.push_str("\r\n");
        let io_err = |e: std::io::Error| PeerError::Http(format!("{}: {e}", url.authority));
        s.write_all(head.as_bytes()).await.map_err(io_err)?;
        let copied = tokio::io::copy(&mut (&mut file).take(len), &mut s)
            .await
            .map_err(io_err)?;
        if copied != len {
            return Err(PeerError::Http(format!(
                "{}: the file shrank while being sent",
                path.display()
            )));
        }
        let req = Request {
            method,
            headers: Vec::new(),
            body: Vec::new(),
            max_body,
        };
        let (resp, _) = read_response(
            &mut s,
            &req,
            Instant::now(),
            self.io_timeout,
            &url.authority,
        )
        .await?;
        Ok(resp)
    }
}

/// Reads one response; `reusable` when the connection can carry another request.
async fn read_response(
    s: &mut TcpStream,
    req: &Request<'_>,
    sent: Instant,
    timeout: Duration,
    authority: &str,
) -> Result<(Response, bool), PeerError> {
    let mut reader = Reader::new(s, timeout);
    let (status, headers, first) = match reader.read_head().await {
        Ok(h) => h,
        // Nothing at all came back: the connection was dead before we used it.
        Err(ReadError::Closed) if reader.total == 0 => return Err(PeerError::Stale),
        Err(e) => return Err(e.into_peer(authority)),
    };
    let rtt = first.saturating_duration_since(sent);
    let find = |n: &str| {
        headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(n))
            .map(|(_, v)| v.as_str())
    };
    let close = find("connection").is_some_and(|v| v.eq_ignore_ascii_case("close"));
    let chunked =
        find("transfer-encoding").is_some_and(|v| v.to_ascii_lowercase().contains("chunked"));
    let length = find("content-length").and_then(|v| v.trim().parse::<usize>().ok());
    let no_body =
        req.method == "HEAD" || status == 204 || status == 304 || (100..200).contains(&status);
    let body = if no_body {
        Ok(Vec::new())
    } else if chunked {
        reader.read_chunked(req.max_body).await
    } else if let Some(n) = length {
        if n > req.max_body {
            return Err(PeerError::Http(format!(
                "{authority}: body of {n} bytes exceeds {}",
                req.max_body
            )));
        }
        reader.read_exact_len(n).await
    } else {
        reader.read_to_close(req.max_body).await
    }
    .map_err(|e| e.into_peer(authority))?;
    let transfer = first.elapsed();
    let reusable = !close && (chunked || length.is_some() || no_body) && reader.buf.is_empty();
    Ok((
        Response {
            status,
            headers,
            body,
            rtt,
            transfer,
        },
        reusable,
    ))
}

#[derive(Debug)]
enum ReadError {
    Closed,
    Timeout,
    TooLarge,
    Malformed(&'static str),
    Io(std::io::Error),
}

impl ReadError {
    fn into_peer(self, who: &str) -> PeerError {
        PeerError::Http(match self {
            ReadError::Closed => format!("{who}: connection closed early"),
            ReadError::Timeout => format!("{who}: read timed out"),
            ReadError::TooLarge => format!("{who}: response too large"),
            ReadError::Malformed(m) => format!("{who}: malformed response ({m})"),
            ReadError::Io(e) => format!("{who}: {e}"),
        })
    }
}

/// Buffered reads with a timeout per read.
struct Reader<'s, S> {
    s: &'s mut S,
    buf: Vec<u8>,
    timeout: Duration,
    total: usize,
}

impl<'s, S: AsyncRead + Unpin> Reader<'s, S> {
    fn new(s: &'s mut S, timeout: Duration) -> Self {
        Reader {
            s,
            buf: Vec::new(),
            timeout,
            total: 0,
        }
    }

    /// Reads more into `buf`; Closed at EOF.
    async fn fill(&mut self) -> Result<(), ReadError> {
        // Into the heap buffer directly: a 64 KiB array here would sit in every future.
        self.buf.reserve(64 * 1024);
        let n = tokio::time::timeout(self.timeout, self.s.read_buf(&mut self.buf))
            .await
            .map_err(|_| ReadError::Timeout)?
            .map_err(ReadError::Io)?;
        if n == 0 {
            return Err(ReadError::Closed);
        }
        self.total += n;
        Ok(())
    }

    /// Status, headers and when the first byte arrived; skips `100 Continue`.
    async fn read_head(&mut self) -> Result<(u16, Vec<(String, String)>, Instant), ReadError> {
        let mut first: Option<Instant> = None;
        loop {
            if let Some(end) = find(&self.buf, b"\r\n\r\n") {
                let head: Vec<u8> = self.buf.drain(..end + 4).collect();
                let text = std::str::from_utf8(&head[..end])
                    .map_err(|_| ReadError::Malformed("head is not UTF-8"))?;
                let mut lines = text.split("\r\n");
                let status_line = lines.next().unwrap_or("");
                let mut parts = status_line.splitn(3, ' ');
                let version = parts.next().unwrap_or("");
                if !version.starts_with("HTTP/1.") {
                    return Err(ReadError::Malformed("status line"));
                }
                let status: u16 = parts
                    .next()
                    .and_then(|c| c.parse().ok())
                    .ok_or(ReadError::Malformed("status code"))?;
                if status == 100 {
                    continue;
                }
                let headers = lines
                    .filter_map(|l| l.split_once(':'))
                    .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
                    .collect();
                return Ok((status, headers, first.unwrap_or_else(Instant::now)));
            }
            if self.buf.len() > MAX_HEAD {
                return Err(ReadError::TooLarge);
            }
            self.fill().await?;
            first.get_or_insert_with(Instant::now);
        }
    }

    async fn read_exact_len(&mut self, n: usize) -> Result<Vec<u8>, ReadError> {
        while self.buf.len() < n {
            self.fill().await?;
        }
        Ok(self.buf.drain(..n).collect())
    }

    async fn read_line(&mut self) -> Result<String, ReadError> {
        loop {
            if let Some(i) = find(&self.buf, b"\r\n") {
                let line: Vec<u8> = self.buf.drain(..i + 2).collect();
                return String::from_utf8(line[..i].to_vec())
                    .map_err(|_| ReadError::Malformed("chunk line"));
            }
            if self.buf.len() > MAX_HEAD {
                return Err(ReadError::TooLarge);
            }
            self.fill().await?;
        }
    }

    async fn read_chunked(&mut self, max: usize) -> Result<Vec<u8>, ReadError> {
        let mut out = Vec::new();
        loop {
            let line = self.read_line().await?;
            let size_text = line.split(';').next().unwrap_or("").trim();
            let size = usize::from_str_radix(size_text, 16)
                .map_err(|_| ReadError::Malformed("chunk size"))?;
            if size == 0 {
                // Trailers, up to the empty line.
                loop {
                    if self.read_line().await?.is_empty() {
                        return Ok(out);
                    }
                }
            }
            if out.len().saturating_add(size) > max {
                return Err(ReadError::TooLarge);
            }
            let data = self.read_exact_len(size + 2).await?;
            out.extend_from_slice(&data[..size]);
        }
    }

    async fn read_to_close(&mut self, max: usize) -> Result<Vec<u8>, ReadError> {
        loop {
            if self.buf.len() > max {
                return Err(ReadError::TooLarge);
            }
            match self.fill().await {
                Ok(()) => {}
                Err(ReadError::Closed) => return Ok(std::mem::take(&mut self.buf)),
                Err(e) => return Err(e),
            }
        }
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// `Authorization: Basic ...`.
pub fn basic_auth(user: &str, password: &str) -> String {
    use base64::Engine as _;
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"))
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        let u = Url::parse("http://127.0.0.1:8080").unwrap();
        assert_eq!(u.authority, "127.0.0.1:8080");
        assert_eq!(u.path, "/");
        let u = Url::parse("http://example.com/v1/index/ab?x=1").unwrap();
        assert_eq!(u.authority, "example.com:80");
        assert_eq!(u.path, "/v1/index/ab?x=1");
        let u = Url::parse("http://[::1]:9000/a").unwrap();
        assert_eq!(u.authority, "[::1]:9000");
        let u = Url::parse("http://[::1]/a").unwrap();
        assert_eq!(u.authority, "[::1]:80");
        assert!(Url::parse("https://x/").is_err());
        assert!(Url::parse("http:///x").is_err());
        assert!(Url::parse("http://u:p@x/").is_err());
        let j = Url::join("http://h:1/base/", "/v1/pieces/c/3").unwrap();
        assert_eq!(j.path, "/base/v1/pieces/c/3");
        assert_eq!(Url::join("http://h:1", "/v1/x").unwrap().path, "/v1/x");
    }

    #[tokio::test]
    async fn chunked_and_length_bodies() {
        let raw = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2;x=y\r\nde\r\n0\r\n\r\nHTTP/1.1 404 Not Found\r\nContent-Length: 2\r\n\r\nno";
        let mut src: &[u8] = raw;
        let mut r = Reader::new(&mut src, Duration::from_secs(1));
        let (st, h, _) = r.read_head().await.unwrap();
        assert_eq!(st, 200);
        assert_eq!(h[0].0, "Transfer-Encoding");
        assert_eq!(r.read_chunked(100).await.unwrap(), b"abcde");
        let (st, _, _) = r.read_head().await.unwrap();
        assert_eq!(st, 404);
        assert_eq!(r.read_exact_len(2).await.unwrap(), b"no");
        // Limits hold.
        let mut src: &[u8] = b"5\r\nabcde\r\n0\r\n\r\n";
        let mut r = Reader::new(&mut src, Duration::from_secs(1));
        assert!(matches!(r.read_chunked(4).await, Err(ReadError::TooLarge)));
        let mut src: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nabc";
        let mut r = Reader::new(&mut src, Duration::from_secs(1));
        r.read_head().await.unwrap();
        assert!(matches!(r.read_exact_len(9).await, Err(ReadError::Closed)));
        let mut src: &[u8] = b"garbage\r\n\r\n";
        let mut r = Reader::new(&mut src, Duration::from_secs(1));
        assert!(matches!(r.read_head().await, Err(ReadError::Malformed(_))));
    }
}
