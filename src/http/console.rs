//! `GET /console` (PROTOCOL 8): the operator's web page, compiled into the binary
//! (`include_str!`), no build step and nothing from another host. The page asks the admin API
//! and `/v1/events` itself with the admin token (see the comments in `console/console.js`);
//! these handlers only serve the two files, with a Content-Security-Policy that allows
//! scripts and connections to this origin only.

use axum::http::header::{CACHE_CONTROL, CONTENT_TYPE};
use axum::http::HeaderName;
use axum::response::IntoResponse;

const INDEX: &str = include_str!("console/index.html");
const SCRIPT: &str = include_str!("console/console.js");

/// Scripts, fetches and media from this origin only; the page's own `<style>` block.
const CSP: &str = "default-src 'none'; script-src 'self'; connect-src 'self'; \
                   style-src 'unsafe-inline'; img-src 'self'; base-uri 'none'; form-action 'none'; \
                   frame-ancestors 'none'";

fn headers(content_type: &'static str) -> [(HeaderName, &'static str); 3] {
    [
        (CONTENT_TYPE, content_type),
        (CACHE_CONTROL, "no-cache"),
        (HeaderName::from_static("content-security-policy"), CSP),
    ]
}

pub(crate) async fn page() -> impl IntoResponse {
    (headers("text/html; charset=utf-8"), INDEX)
}

pub(crate) async fn script() -> impl IntoResponse {
    (headers("text/javascript; charset=utf-8"), SCRIPT)
}
