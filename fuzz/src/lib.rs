//! The sans-IO SIP parser, compiled straight from the main crate's sources.
//!
//! Only `sip/message.rs` and `sip/uri.rs` are pulled in (they depend on nothing else in the
//! crate), so fuzz builds stay small and do not wait on sqlx/axum/tokio or on unrelated work in
//! progress elsewhere in the tree. They sit at the root here (`super::uri` still resolves) and
//! are re-exported under `sip` so targets read like code using the real crate.

#[path = "../../src/sip/message.rs"]
pub mod message;
#[path = "../../src/sip/uri.rs"]
pub mod uri;

pub mod sip {
    pub use super::{message, uri};
}
