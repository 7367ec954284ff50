//! Shared data (PROTOCOL 3, seed CN101247316A), the server side: publishing files in pieces
//! with a manifest and `content_id` ([`manifest`], [`store`]), who may fetch them
//! ([`policy`]), the piece index ([`index`]), source choice per piece for fetchers
//! ([`select`], sans-IO), the server's egress pacing ([`rate`]) and the DHT that finds holders
//! when the index lives on the terminals ([`dht`], claim 8).
//!
//! The SIP side (share requests and offers) and the `callvault peer` agent use [`Shares`]:
//! [`Shares::get_by_name`] / [`Shares::list_visible`] / [`Shares::may_fetch`] to answer a
//! request, [`Shares::offer`] to build the offer body, and the HTTP routes of
//! [`crate::http::shares`] to move the bytes.

pub mod dht;
pub mod index;
pub mod manifest;
pub mod policy;
pub mod rate;
pub mod select;
pub mod store;

pub use index::{Bitfield, Holder, IndexError, MemoryIndex, PieceIndex};
pub use manifest::{Manifest, NameError};
pub use policy::{Policy, PolicyError, Requester};
pub use select::{CostModel, CostParams, Source, SourceClass};
pub use store::{Offer, Share, ShareSettings, ShareView, Shares, TokenGrant};

/// Content type of a share request (step 2).
pub const SHARE_REQUEST_TYPE: &str = "application/vnd.callvault.share-request+json";
/// Content type of a share offer (step 3).
pub const SHARE_OFFER_TYPE: &str = "application/vnd.callvault.share-offer+json";

#[derive(Debug, thiserror::Error)]
pub enum ShareError {
    /// `400 bad-name`.
    #[error("bad share name: {0}")]
    BadName(#[from] NameError),
    /// `400 bad-policy`.
    #[error(transparent)]
    BadPolicy(#[from] PolicyError),
    #[error("no account {0}")]
    NoAccount(String),
    /// `403 quota-exceeded`.
    #[error("{bytes} bytes exceed the free space of {owner}")]
    QuotaExceeded { owner: String, bytes: u64 },
    #[error("size {0} is out of range")]
    TooLarge(u64),
    /// The upload body was not the declared size, stalled or broke off.
    #[error("{0}")]
    Body(String),
    #[error("unknown content {0}")]
    UnknownContent(String),
    #[error("stored {what} is invalid")]
    Corrupt { what: String },
    #[error("share data: {0}")]
    Io(#[from] std::io::Error),
    #[error("metadata database: {0}")]
    Db(#[from] sqlx::Error),
    #[error("account: {0}")]
    Account(#[from] crate::storage::AccountError),
}
