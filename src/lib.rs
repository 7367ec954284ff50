//! callvault: SIP registrar + B2BUA with anchored media, in-call network storage and shared data.
//!
//! Layout follows the architecture (see `docs/ARCHITECTURE.md`): `sip` is the sans-IO protocol
//! core, `transport` and `media` own sockets, `b2bua` ties calls together, `storage` holds
//! accounts and stores, `http` serves the API and metrics.

// Bad input gets an error, never a panic: no unwrap/expect outside tests (an infallible case
// says why in an `#[allow]`).
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]
// `pub` only for the crate's API (the binary, the integration tests, the fuzz targets); the
// rest is `pub(crate)`.
#![warn(unreachable_pub)]

pub mod b2bua;
pub(crate) mod cluster;
pub mod config;
pub(crate) mod digest;
pub(crate) mod error_code;
#[doc(hidden)]
pub mod fuzzing;
pub(crate) mod guard;
pub mod http;
pub mod logging;
pub mod media;
pub mod metrics;
pub mod peer;
pub mod sdp;
pub mod secret;
pub mod server;
pub mod share;
pub mod sip;
pub mod storage;
pub mod transport;
