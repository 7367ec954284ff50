//! Objects: where store media and share pieces live (PROTOCOL.md 6, `[storage] objects`).
//!
//! One trait, [`ObjectBackend`], with two backends: [`file::FileObjects`] (a folder on the
//! local disk) and [`s3::S3Objects`] (any S3-protocol server, through the `object_store`
//! crate). Keys are `/`-separated paths of `[A-Za-z0-9._-]` parts; an object is written whole
//! and never rewritten in place ([`ObjectBackend::put`] replaces atomically).
//!
//! On the embedded default (`objects = "file"`) store media stays what it always was, the
//! segment log under `data_dir/stores/<id>` (nothing is copied). With `s3://bucket` that log
//! is the receiving node's write-ahead log and [`chunks`] uploads what it commits as immutable
//! chunk objects at most [`chunks::CHUNK_INTERVAL`] apart; readers on other nodes and readers
//! of finished stores read the chunks ([`chunks::ChunkSource`], behind
//! [`crate::storage::segments::SegmentReader`]).

pub mod chunks;
pub mod file;
pub mod s3;

use std::fmt;
use std::ops::Range;
use std::path::PathBuf;
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;

use crate::config::StorageConfig;

/// Why an object operation failed.
#[derive(Debug, thiserror::Error)]
pub enum ObjectError {
    #[error("object {0} not found")]
    NotFound(String),
    #[error("object key {0:?} is not a valid key")]
    BadKey(String),
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("object store {op} {key}: {message}")]
    Backend {
        op: &'static str,
        key: String,
        message: String,
    },
    #[error("S3 configuration: {0}")]
    Config(String),
    #[error("object task failed: {0}")]
    Task(String),
}

/// One object of a listing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectInfo {
    /// The full key.
    pub key: String,
    pub size: u64,
}

/// An object store: put whole objects, read them (or a byte range), list a folder, delete.
#[async_trait]
pub trait ObjectBackend: fmt::Debug + Send + Sync {
    /// Stores `data` under `key`, replacing any object there at once (readers see the old
    /// or the new object, never a part).
    async fn put(&self, key: &str, data: Bytes) -> Result<(), ObjectError>;
    /// The whole object; [`ObjectError::NotFound`] when there is none.
    async fn get(&self, key: &str) -> Result<Bytes, ObjectError>;
    /// Bytes `range` of the object (cut at its end).
    async fn get_range(&self, key: &str, range: Range<u64>) -> Result<Bytes, ObjectError>;
    /// The objects directly in folder `dir` (no trailing `/`), sorted by key.
    async fn list(&self, dir: &str) -> Result<Vec<ObjectInfo>, ObjectError>;
    /// Deletes `key`; a missing object is not an error.
    async fn delete(&self, key: &str) -> Result<(), ObjectError>;
    /// For logs: `file:/path` or `s3://bucket at endpoint`.
    fn describe(&self) -> String;
    /// True for the local-disk backend: store media then stays in the segment logs.
    fn is_local(&self) -> bool;
}

/// The configured backend, shared.
pub type Objects = Arc<dyn ObjectBackend>;

/// `[storage] objects` and the S3 keys, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ObjectsConfig {
    File,
    S3(s3::S3Config),
}

impl ObjectsConfig {
    /// Parses the `[storage]` keys; credentials missing from the config come from
    /// `AWS_ACCESS_KEY_ID` / `AWS_SECRET_ACCESS_KEY`.
    pub fn parse(c: &StorageConfig) -> Result<ObjectsConfig, String> {
        let objects = c.objects.trim();
        if objects.is_empty() || objects == "file" {
            return Ok(ObjectsConfig::File);
        }
        let Some(bucket) = objects.strip_prefix("s3://") else {
            return Err(format!("{objects:?}: expected \"file\" or \"s3://bucket\""));
        };
        let bucket = bucket.trim_end_matches('/');
        let name_ok = (3..=63).contains(&bucket.len())
            && bucket
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.');
        if !name_ok {
            return Err(format!(
                "bucket {bucket:?}: 3 to 63 lowercase letters, digits, '-' or '.'"
            ));
        }
        let env = |k: &str| std::env::var(k).unwrap_or_default();
        let key_id = if c.s3_access_key_id.is_empty() {
            env("AWS_ACCESS_KEY_ID")
        } else {
            c.s3_access_key_id.clone()
        };
        let secret = if c.s3_secret_access_key.is_empty() {
            env("AWS_SECRET_ACCESS_KEY")
        } else {
            c.s3_secret_access_key.clone()
        };
        if key_id.is_empty() || secret.is_empty() {
            return Err(
                "S3 credentials: set s3_access_key_id and s3_secret_access_key, or \
                 AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"
                    .into(),
            );
        }
        let endpoint = c.s3_endpoint.trim().trim_end_matches('/').to_string();
        if !endpoint.is_empty() && url::Url::parse(&endpoint).is_err() {
            return Err(format!("s3_endpoint {endpoint:?} is not a URL"));
        }
        Ok(ObjectsConfig::S3(s3::S3Config {
            bucket: bucket.to_string(),
            endpoint,
            region: if c.s3_region.is_empty() {
                "us-east-1".into()
            } else {
                c.s3_region.clone()
            },
            access_key_id: key_id,
            secret_access_key: secret,
        }))
    }
}

/// Opens the configured backend (creating the bucket if missing). The file backend's root
/// is `data_dir`, so its keys are the paths the embedded default always used.
pub async fn open(c: &StorageConfig) -> Result<Objects, ObjectError> {
    match ObjectsConfig::parse(c).map_err(ObjectError::Config)? {
        ObjectsConfig::File => Ok(Arc::new(file::FileObjects::new(c.data_dir.clone()))),
        ObjectsConfig::S3(s) => Ok(Arc::new(s3::S3Objects::open(s).await?)),
    }
}

/// Checks a key: `/`-separated parts of `[A-Za-z0-9._-]`, none empty, `.` or `..`.
pub(crate) fn check_key(key: &str) -> Result<(), ObjectError> {
    let ok = !key.is_empty()
        && key.split('/').all(|p| {
            !p.is_empty()
                && p != "."
                && p != ".."
                && p.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
        });
    if ok {
        Ok(())
    } else {
        Err(ObjectError::BadKey(key.to_string()))
    }
}

#[cfg(test)]
pub(crate) mod tests;
