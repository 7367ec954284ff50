//! The agent's HTTP client: hyper-util's pooled client (HTTP/1.1, keep-alive per host) over
//! hyper-rustls for `https://` URLs, with what the agent needs on top: bodies read in full
//! under a size cap, a timeout per connect and per read, and the timings the cost model
//! needs (request sent → response head, head → last body byte).
//!
//! TLS is rustls 0.23 with the `ring` provider, given explicitly (the server side uses the
//! same one); certificates are verified against the system's roots
//! (`rustls-native-certs`: `SSL_CERT_FILE` / `SSL_CERT_DIR` override them) or the roots a
//! caller passes to [`Client::with_roots`].

use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt as _, Full, StreamBody};
use hyper::body::{Body as _, Frame};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tokio::io::AsyncReadExt as _;

use super::PeerError;

pub(crate) use url::Url;

/// Idle connections kept per host.
const MAX_IDLE_PER_HOST: usize = 8;
/// Idle pooled connections are closed after this long (servers time them out too).
const POOL_IDLE: Duration = Duration::from_secs(30);
/// Bytes read from a file per body frame of [`Client::send_file`].
const FILE_FRAME: usize = 256 * 1024;

type ReqBody = BoxBody<Bytes, std::io::Error>;

/// Parses an `http://` or `https://` URL with a host and no user info.
pub(crate) fn parse_url(s: &str) -> Result<Url, PeerError> {
    let bad = || PeerError::BadUrl(s.to_string());
    let u = Url::parse(s.trim()).map_err(|_| bad())?;
    let ok = matches!(u.scheme(), "http" | "https")
        && u.host_str().is_some_and(|h| !h.is_empty())
        && u.username().is_empty()
        && u.password().is_none();
    ok.then_some(u).ok_or_else(bad)
}

/// The URL for `path` (with its query, if any) under a base like `http://host:port[/prefix]`.
pub(crate) fn join(base: &str, path: &str) -> Result<Url, PeerError> {
    let mut u = parse_url(base)?;
    let (p, q) = match path.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (path, None),
    };
    let prefix = u.path().trim_end_matches('/').to_string();
    u.set_path(&format!("{prefix}{p}"));
    u.set_query(q);
    Ok(u)
}

/// `host:port` of a URL (the port filled in from the scheme), for messages and logs.
pub(crate) fn authority(u: &Url) -> String {
    let host = u.host_str().unwrap_or("");
    match u.port_or_known_default() {
        Some(p) => format!("{host}:{p}"),
        None => host.to_string(),
    }
}

/// A response with its body read in full.
#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    /// Request sent → response head received.
    pub rtt: Duration,
    /// Response head → last byte of the body.
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

/// rustls' `ring` provider: the one crypto provider of the crate (the server's TLS uses it
/// too). rustls 0.23.48 deprecates it for lacking post-quantum key exchange; the choice of
/// provider is the project's, made once, so the warning is silenced here only.
#[allow(deprecated)]
pub(crate) fn ring_provider() -> rustls::crypto::CryptoProvider {
    rustls::crypto::ring::default_provider()
}

/// The system's roots, read once per process.
pub(crate) fn native_roots() -> Arc<rustls::RootCertStore> {
    static ROOTS: OnceLock<Arc<rustls::RootCertStore>> = OnceLock::new();
    ROOTS
        .get_or_init(|| {
            let found = rustls_native_certs::load_native_certs();
            for e in &found.errors {
                tracing::warn!(error = %e, "loading the system's CA certificates");
            }
            let mut roots = rustls::RootCertStore::empty();
            let (added, ignored) = roots.add_parsable_certificates(found.certs);
            tracing::debug!(added, ignored, "system CA certificates");
            Arc::new(roots)
        })
        .clone()
}

/// Pooled connections and timeouts; clones share the pool.
#[derive(Debug, Clone)]
pub struct Client {
    inner: hyper_util::client::legacy::Client<HttpsConnector<HttpConnector>, ReqBody>,
    /// Connect timeout, and the longest wait for the response head or any body frame.
    pub io_timeout: Duration,
}

impl Default for Client {
    fn default() -> Self {
        Client::new(Duration::from_secs(20))
    }
}

impl Client {
    /// A client verifying `https://` servers against the system's roots.
    pub fn new(io_timeout: Duration) -> Client {
        Client::with_roots(io_timeout, native_roots())
    }

    /// A client verifying `https://` servers against `roots` only.
    pub fn with_roots(io_timeout: Duration, roots: Arc<rustls::RootCertStore>) -> Client {
        let provider = Arc::new(ring_provider());
        // The process default too, for any rustls user that does not name one; failing
        // means one is installed already, which is fine.
        let _ = ring_provider().install_default();
        let tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map(|b| b.with_root_certificates(roots).with_no_client_auth());
        let tls = match tls {
            Ok(t) => t,
            // ring supports the default versions: unreachable in practice, and then only
            // https:// fails (no roots), with a clear error.
            Err(e) => {
                tracing::warn!(error = %e, "TLS client configuration");
                rustls::ClientConfig::builder()
                    .with_root_certificates(rustls::RootCertStore::empty())
                    .with_no_client_auth()
            }
        };
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_nodelay(true);
        http.set_connect_timeout(Some(io_timeout));
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .wrap_connector(http);
        let inner = hyper_util::client::legacy::Client::builder(TokioExecutor::new())
            .pool_max_idle_per_host(MAX_IDLE_PER_HOST)
            .pool_idle_timeout(POOL_IDLE)
            .build(https);
        Client { inner, io_timeout }
    }

    /// Sends `req` to `url` and reads the answer in full.
    pub async fn send(&self, url: &Url, req: &Request<'_>) -> Result<Response, PeerError> {
        let body = Full::new(Bytes::from(req.body.clone()))
            .map_err(|never| match never {})
            .boxed();
        let mut headers = req.headers.clone();
        if req.method != "GET" || !req.body.is_empty() {
            headers.push(("Content-Length".into(), req.body.len().to_string()));
        }
        self.exchange(url, req.method, &headers, body, req.max_body)
            .await
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

    /// PUT (or POST) of a file, streamed from disk.
    pub async fn send_file(
        &self,
        url: &Url,
        method: &str,
        headers: &[(String, String)],
        path: &std::path::Path,
        max_body: usize,
    ) -> Result<Response, PeerError> {
        let file = tokio::fs::File::open(path).await?;
        let len = file.metadata().await?.len();
        let shown = path.display().to_string();
        // Frames of the file, and an error if it ends before `len` bytes.
        let frames = futures_util::stream::unfold((file.take(len), 0u64), move |(mut f, sent)| {
            let shown = shown.clone();
            async move {
                let mut buf = Vec::with_capacity(FILE_FRAME);
                match (&mut f).take(FILE_FRAME as u64).read_to_end(&mut buf).await {
                    Ok(0) if sent == len => None,
                    Ok(0) => Some((
                        Err(std::io::Error::other(format!(
                            "{shown}: the file shrank while being sent"
                        ))),
                        (f, len),
                    )),
                    Ok(n) => Some((Ok(Frame::data(Bytes::from(buf))), (f, sent + n as u64))),
                    Err(e) => Some((Err(e), (f, len))),
                }
            }
        });
        let mut all = headers.to_vec();
        all.push(("Content-Length".into(), len.to_string()));
        self.exchange(url, method, &all, StreamBody::new(frames).boxed(), max_body)
            .await
    }

    async fn exchange(
        &self,
        url: &Url,
        method: &str,
        headers: &[(String, String)],
        body: ReqBody,
        max_body: usize,
    ) -> Result<Response, PeerError> {
        let who = authority(url);
        let fail = |what: String| PeerError::Http(format!("{who}: {what}"));
        let mut b = hyper::Request::builder()
            .method(method)
            .uri(url.as_str())
            .header("User-Agent", "callvault-peer");
        for (k, v) in headers {
            b = b.header(k.as_str(), v.as_str());
        }
        let request = b
            .body(body)
            .map_err(|e| fail(format!("bad request: {e}")))?;
        let sent = Instant::now();
        let resp = tokio::time::timeout(self.io_timeout, self.inner.request(request))
            .await
            .map_err(|_| fail("no answer in time".into()))?
            .map_err(|e| fail(error_chain(&e)))?;
        let head = Instant::now();
        let status = resp.status().as_u16();
        let headers = resp
            .headers()
            .iter()
            .map(|(k, v)| {
                (
                    k.as_str().to_string(),
                    String::from_utf8_lossy(v.as_bytes()).into_owned(),
                )
            })
            .collect();
        let mut incoming = resp.into_body();
        if incoming
            .size_hint()
            .exact()
            .is_some_and(|n| n > max_body as u64)
        {
            return Err(fail(format!("body exceeds {max_body} bytes")));
        }
        let mut body = Vec::new();
        loop {
            let frame = tokio::time::timeout(self.io_timeout, incoming.frame())
                .await
                .map_err(|_| fail("read timed out".into()))?;
            let Some(frame) = frame else { break };
            let frame = frame.map_err(|e| fail(error_chain(&e)))?;
            if let Ok(data) = frame.into_data() {
                if body.len().saturating_add(data.len()) > max_body {
                    return Err(fail(format!("body exceeds {max_body} bytes")));
                }
                body.extend_from_slice(&data);
            }
        }
        Ok(Response {
            status,
            headers,
            body,
            rtt: head.saturating_duration_since(sent),
            transfer: head.elapsed(),
        })
    }
}

/// An error with its causes (a TLS failure is only named deep in the chain).
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// `Authorization: Basic ...`.
pub(crate) fn basic_auth(user: &str, password: &str) -> String {
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
        let u = parse_url("http://127.0.0.1:8080").unwrap();
        assert_eq!(authority(&u), "127.0.0.1:8080");
        assert_eq!(u.path(), "/");
        let u = parse_url("http://example.com/v1/index/ab?x=1").unwrap();
        assert_eq!(authority(&u), "example.com:80");
        assert_eq!((u.path(), u.query()), ("/v1/index/ab", Some("x=1")));
        assert_eq!(
            authority(&parse_url("http://[::1]:9000/a").unwrap()),
            "[::1]:9000"
        );
        assert_eq!(authority(&parse_url("https://h/").unwrap()), "h:443");
        assert!(parse_url("ftp://x/").is_err());
        assert!(parse_url("http://").is_err());
        assert!(parse_url("http://u:p@x/").is_err());
        assert!(parse_url("nope").is_err());
        let j = join("http://h:1/base/", "/v1/pieces/c/3").unwrap();
        assert_eq!(j.path(), "/base/v1/pieces/c/3");
        assert_eq!(join("http://h:1", "/v1/x").unwrap().path(), "/v1/x");
        let q = join("https://h:1", "/v1/x?token=t").unwrap();
        assert_eq!((q.path(), q.query()), ("/v1/x", Some("token=t")));
    }

    /// Bodies by length and chunked, the size cap, a connection refused.
    #[tokio::test]
    async fn bodies_limits_and_errors() {
        use axum::routing::{get, put};
        let app = axum::Router::new()
            .route("/len", get(|| async { "hello" }))
            .route(
                "/chunked",
                get(|| async {
                    let parts = futures_util::stream::iter(
                        ["ab", "cd", "e"].map(|p| Ok::<_, std::io::Error>(Bytes::from(p))),
                    );
                    axum::body::Body::from_stream(parts)
                }),
            )
            .route(
                "/echo",
                put(|b: Bytes| async move { format!("{}", b.len()) }),
            );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        let c = Client::default();
        let url = |p: &str| parse_url(&format!("http://{addr}{p}")).unwrap();
        let r = c.get(&url("/len"), &[], 100).await.unwrap();
        assert_eq!((r.status, r.body.as_slice()), (200, &b"hello"[..]));
        let r = c.get(&url("/chunked"), &[], 100).await.unwrap();
        assert_eq!(r.body, b"abcde");
        assert!(c.get(&url("/len"), &[], 4).await.is_err());
        assert!(c.get(&url("/chunked"), &[], 4).await.is_err());
        assert_eq!(c.get(&url("/nope"), &[], 100).await.unwrap().status, 404);
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("f");
        std::fs::write(&f, vec![7u8; 600_000]).unwrap();
        let r = c
            .send_file(&url("/echo"), "PUT", &[], &f, 100)
            .await
            .unwrap();
        assert_eq!(r.body, b"600000");
        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let gone = closed.local_addr().unwrap();
        drop(closed);
        let e = c
            .get(&parse_url(&format!("http://{gone}/")).unwrap(), &[], 10)
            .await
            .unwrap_err();
        assert!(e.to_string().contains(&gone.to_string()), "{e}");
    }
}
