//! A store's capabilities (PROTOCOL.md 2.4): the one secret a store has (`Store::token`) is
//! the *download token* of the ready note's `download_url`; the *upload token* of the prompt's
//! `upload_url` is derived from it one-way, so the sender's URL cannot download and the
//! receiver's cannot upload.

use sha2::{Digest as _, Sha256};

use super::stores::Store;

/// The token of `download_url` (receiver's capability): the store's secret itself.
pub fn download_token(store: &Store) -> &str {
    &store.token
}

/// The token of `upload_url` (sender's capability): 160 bits of SHA-256 over a label and the
/// store's secret, hex. One-way, so holding it does not give the download token.
pub fn upload_token(store: &Store) -> String {
    upload_token_of(&store.token)
}

fn upload_token_of(secret: &str) -> String {
    let mut h = Sha256::new();
    h.update(b"callvault upload token\0");
    h.update(secret.as_bytes());
    hex::encode(&h.finalize()[..20])
}

/// `{base}/v1/stores/{id}/data?token=...` (the prompt's `upload_url`); `base` like
/// `http://192.0.2.10:8080`, without a trailing slash.
pub fn upload_url(base: &str, store: &Store) -> String {
    format!(
        "{}/v1/stores/{}/data?token={}",
        base.trim_end_matches('/'),
        store.id,
        upload_token(store)
    )
}

/// `{base}/v1/stores/{id}/media?token=...` (the ready note's `download_url`).
pub fn download_url(base: &str, store: &Store) -> String {
    format!(
        "{}/v1/stores/{}/media?token={}",
        base.trim_end_matches('/'),
        store.id,
        download_token(store)
    )
}
