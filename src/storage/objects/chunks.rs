//! Store media as chunk objects (`objects = "s3://..."`, PROTOCOL.md 6).
//!
//! The receiving node keeps writing the store's segment log on its local disk (the
//! write-ahead log: CRC records, group commit, the committed length on a watch; the RTP path is
//! unchanged). An [`Uploader`] task follows that watch and, at most every
//! [`CHUNK_INTERVAL`], puts the newly committed bytes as one immutable object
//! `stores/{id}/{base:020}.chunk`, `base` being the logical offset of its first byte in the
//! log (the name scheme of the segment files). Chunks are contiguous, cut at record
//! boundaries and never rewritten; the listing of `stores/{id}/` is the index. When the log
//! is finished the uploader puts `stores/{id}/end` holding the final length in decimal.
//!
//! Why chunks and not one multipart upload: the parts of a multipart upload are invisible
//! until it completes, so another node could not tail a store and a dead node's parts would
//! be lost (or need an S3 call most servers lack to list them). Immutable small objects are
//! readable by any node as soon as the put returns, need no coordination (one writer per
//! store), and [`committed_len`] is one listing.
//!
//! Readers ([`ChunkSource`], behind [`crate::storage::segments::SegmentReader`]) fetch a whole
//! chunk at a time and, while the store receives, list again every [`TAIL_POLL`] until the
//! end object appears (or their probe says the store was finished without one: a node that
//! died; its takeover calls [`mark_finished`] with [`committed_len`]).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::future::BoxFuture;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::{ObjectBackend, ObjectError, Objects};
use crate::storage::segments::{self, TailState};

/// Longest time between a commit on the receiving node and its chunk put: the node's death
/// loses at most this plus one put, and other nodes' live tails lag by it plus [`TAIL_POLL`].
pub const CHUNK_INTERVAL: Duration = Duration::from_millis(500);
/// Largest chunk (an HTTP upload can commit faster than a call): bounds reader memory.
pub const MAX_CHUNK: usize = 4 * 1024 * 1024;
/// How often a live reader lists the store's chunks while it waits for more.
pub const TAIL_POLL: Duration = Duration::from_millis(100);
/// How often a live reader without news asks its probe whether the store has finished.
const PROBE_EVERY: Duration = Duration::from_secs(1);

/// The folder of a store's chunks.
pub fn store_prefix(id: &str) -> String {
    format!("stores/{id}")
}

pub fn chunk_key(id: &str, base: u64) -> String {
    format!("stores/{id}/{base:020}.chunk")
}

pub fn end_key(id: &str) -> String {
    format!("stores/{id}/end")
}

/// One chunk object: bytes `base..base+len` of the store's log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Chunk {
    pub base: u64,
    pub len: u64,
}

/// What a listing of a store's folder says.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Listing {
    /// The chunks contiguous from offset 0, in order.
    pub chunks: Vec<Chunk>,
    /// The final length, once the store's log was finished.
    pub end: Option<u64>,
}

impl Listing {
    /// Bytes readable from offset 0 without a hole.
    pub fn contiguous_len(&self) -> u64 {
        self.chunks.last().map_or(0, |c| c.base + c.len)
    }

    fn find(&self, at: u64) -> Option<Chunk> {
        let i = self.chunks.partition_point(|c| c.base + c.len <= at);
        self.chunks.get(i).copied().filter(|c| c.base <= at)
    }
}

/// Lists store `id`'s chunks and reads its end object.
pub async fn list(objects: &dyn ObjectBackend, id: &str) -> Result<Listing, ObjectError> {
    let entries = objects.list(&store_prefix(id)).await?;
    let mut found: Vec<Chunk> = Vec::new();
    let mut has_end = false;
    for e in &entries {
        let name = e.key.rsplit('/').next().unwrap_or("");
        if name == "end" {
            has_end = true;
        } else if let Some(base) = name
            .strip_suffix(".chunk")
            .filter(|b| b.len() == 20)
            .and_then(|b| b.parse::<u64>().ok())
        {
            found.push(Chunk { base, len: e.size });
        }
    }
    found.sort_by_key(|c| c.base);
    let mut chunks = Vec::with_capacity(found.len());
    let mut next = 0u64;
    for c in found {
        if c.base != next || c.len == 0 {
            break;
        }
        next = c.base + c.len;
        chunks.push(c);
    }
    let end = if has_end {
        let b = objects.get(&end_key(id)).await?;
        std::str::from_utf8(&b)
            .ok()
            .and_then(|s| s.trim().parse().ok())
    } else {
        None
    };
    Ok(Listing { chunks, end })
}

/// The length of store `id`'s log that reached the object store (contiguous from 0, at a
/// record boundary): what a node taking over a dead node's store keeps. Node leases
/// (PROTOCOL.md 6 "Node failure") call this, then [`mark_finished`].
pub async fn committed_len(objects: &dyn ObjectBackend, id: &str) -> Result<u64, ObjectError> {
    Ok(list(objects, id).await?.contiguous_len())
}

/// What reached the object store of store `id`: the log length contiguous from 0 and the
/// payload bytes of its records. A node taking over a dead node's store finishes it with
/// these (PROTOCOL.md 6 "Node failure"). Chunks are cut at record boundaries and put whole,
/// so each holds whole records; a header that does not fit its chunk ends the count there
/// (nothing after it is contiguous).
pub async fn committed_payload(objects: &dyn ObjectBackend, id: &str) -> Result<Kept, ObjectError> {
    let listing = list(objects, id).await?;
    let mut kept = Kept::default();
    for c in &listing.chunks {
        let data = objects.get(&chunk_key(id, c.base)).await?;
        let (log, payload) = segments::record_extent(&data);
        kept.log_bytes += log as u64;
        kept.payload_bytes += payload;
        if log < data.len() {
            break;
        }
    }
    Ok(kept)
}

/// [`committed_payload`]'s answer.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Kept {
    /// Bytes of the store's log (headers and payloads) readable from offset 0.
    pub log_bytes: u64,
    /// Payload bytes in those records: the store's `received_bytes`.
    pub payload_bytes: u64,
}

/// Writes store `id`'s end object: readers following it stop at `len`.
pub async fn mark_finished(
    objects: &dyn ObjectBackend,
    id: &str,
    len: u64,
) -> Result<(), ObjectError> {
    objects
        .put(&end_key(id), Bytes::from(len.to_string()))
        .await
}

/// Deletes every object of store `id`.
pub async fn delete_store(objects: &dyn ObjectBackend, id: &str) -> Result<(), ObjectError> {
    for e in objects.list(&store_prefix(id)).await? {
        objects.delete(&e.key).await?;
    }
    Ok(())
}

/// Puts log bytes `*done..to` of the segment log in `dir` as chunks of at most
/// [`MAX_CHUNK`], cut at record boundaries, advancing `*done` past each chunk put (so a
/// failure part-way leaves `*done` on a record and no chunk is ever put twice).
async fn upload_range(
    objects: &dyn ObjectBackend,
    id: &str,
    dir: &std::path::Path,
    done: &mut u64,
    to: u64,
) -> Result<(), ObjectError> {
    let (d, from) = (dir.to_path_buf(), *done);
    let bytes = tokio::task::spawn_blocking(move || segments::read_log_range(&d, from, to))
        .await
        .map_err(|e| ObjectError::Task(e.to_string()))?
        .map_err(|e| ObjectError::Task(e.to_string()))?;
    let bytes = Bytes::from(bytes);
    let mut at = 0usize;
    while at < bytes.len() {
        let cut = segments::record_cut(&bytes[at..], MAX_CHUNK);
        objects
            .put(&chunk_key(id, *done), bytes.slice(at..at + cut))
            .await?;
        at += cut;
        *done += cut as u64;
    }
    Ok(())
}

/// Uploads a finished log that no uploader followed (a store recovered at start-up) from
/// what already reached the object store, then marks it finished.
pub async fn upload_rest(
    objects: &dyn ObjectBackend,
    id: &str,
    dir: &std::path::Path,
    len: u64,
) -> Result<(), ObjectError> {
    let mut have = committed_len(objects, id).await?;
    if have < len {
        upload_range(objects, id, dir, &mut have, len).await?;
    }
    mark_finished(objects, id, have).await
}

/// The task putting a receiving store's committed bytes as chunks ([`spawn_uploader`]).
#[derive(Debug)]
pub struct Uploader {
    task: JoinHandle<Result<u64, ObjectError>>,
    uploaded: watch::Receiver<u64>,
}

impl Uploader {
    /// The length of the log in the object store, as the uploader advances it.
    pub fn uploaded(&self) -> watch::Receiver<u64> {
        self.uploaded.clone()
    }

    /// Waits until the finished log is uploaded and marked finished (call after the writer
    /// finished or was dropped). Returns the uploaded length.
    pub async fn finish(self) -> Result<u64, ObjectError> {
        self.task
            .await
            .map_err(|e| ObjectError::Task(e.to_string()))?
    }
}

/// Starts uploading the log in `dir` of store `id`, following the writer's `tail`.
pub fn spawn_uploader(
    objects: Objects,
    id: String,
    dir: PathBuf,
    tail: watch::Receiver<TailState>,
) -> Uploader {
    let (tx, uploaded) = watch::channel(0u64);
    let task = tokio::spawn(run_uploader(objects, id, dir, tail, tx));
    Uploader { task, uploaded }
}

/// Puts after a failure are retried this many times once the log is finished, then the
/// uploader gives up (the local log stays; the error is returned).
const FINAL_ATTEMPTS: u32 = 5;

async fn run_uploader(
    objects: Objects,
    id: String,
    dir: PathBuf,
    mut tail: watch::Receiver<TailState>,
    tx: watch::Sender<u64>,
) -> Result<u64, ObjectError> {
    let mut uploaded = 0u64;
    let mut last_put: Option<Instant> = None;
    let mut writer_gone = false;
    let mut failures = 0u32;
    loop {
        let st = *tail.borrow_and_update();
        let done = st.finished || writer_gone;
        if st.bytes > uploaded {
            // At most one put per interval while the store receives (a 20 ms commit each
            // would be 50 requests a second per store); the last one goes at once.
            if let (Some(t), false) = (last_put, done) {
                tokio::time::sleep_until(t + CHUNK_INTERVAL).await;
            }
            let st = *tail.borrow_and_update();
            let done = st.finished || writer_gone;
            last_put = Some(Instant::now());
            let result = upload_range(&*objects, &id, &dir, &mut uploaded, st.bytes).await;
            tx.send_replace(uploaded);
            match result {
                Ok(()) => failures = 0,
                Err(e) => {
                    failures += 1;
                    tracing::warn!(store = %id, error = %e, failures, "chunk upload failed");
                    if done && failures >= FINAL_ATTEMPTS {
                        return Err(e);
                    }
                    tokio::time::sleep(CHUNK_INTERVAL).await;
                }
            }
            continue;
        }
        if done {
            mark_finished(&*objects, &id, uploaded).await?;
            return Ok(uploaded);
        }
        if tail.changed().await.is_err() {
            // The writer went away without publishing `finished`: what it committed is all.
            writer_gone = true;
        }
    }
}

/// Asks whether a store is still receiving (from the metadata database); a live reader uses
/// it to end when a store was finished without an end object.
pub type FinishedProbe = Arc<dyn Fn() -> BoxFuture<'static, bool> + Send + Sync>;

/// Reads a store's log from its chunk objects (see the module doc).
pub struct ChunkSource {
    objects: Objects,
    id: String,
    /// Wait for more until the end object appears (a receiving store).
    follow: bool,
    probe: Option<FinishedProbe>,
    listing: Listing,
    listed_at: Option<Instant>,
    /// The chunk being read: its base and bytes.
    current: Option<(u64, Bytes)>,
}

impl std::fmt::Debug for ChunkSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChunkSource")
            .field("id", &self.id)
            .field("follow", &self.follow)
            .field("listing", &self.listing)
            .finish()
    }
}

impl ChunkSource {
    /// A reader of store `id`; `follow` for a store still receiving (then `probe`, if given,
    /// is asked every second without news whether it has finished).
    pub fn new(
        objects: Objects,
        id: &str,
        follow: bool,
        probe: Option<FinishedProbe>,
    ) -> ChunkSource {
        ChunkSource {
            objects,
            id: id.to_string(),
            follow,
            probe,
            listing: Listing::default(),
            listed_at: None,
            current: None,
        }
    }

    async fn relist(&mut self) -> Result<(), ObjectError> {
        if let Some(t) = self.listed_at {
            tokio::time::sleep_until(t + TAIL_POLL).await;
        }
        self.listing = list(&*self.objects, &self.id).await?;
        self.listed_at = Some(Instant::now());
        Ok(())
    }

    /// Copies log bytes from offset `at` into `out`; 0 at the end of the store (for a
    /// followed store: once its end object or probe says so).
    pub async fn read_at(&mut self, at: u64, out: &mut [u8]) -> Result<usize, ObjectError> {
        let mut next_probe = Instant::now() + PROBE_EVERY;
        let mut fresh = false;
        loop {
            if let Some((base, data)) = &self.current {
                let end = base + data.len() as u64;
                if at >= *base && at < end {
                    let from = usize::try_from(at - base).unwrap_or(usize::MAX);
                    let n = out.len().min(data.len() - from);
                    out[..n].copy_from_slice(&data[from..from + n]);
                    return Ok(n);
                }
            }
            if let Some(c) = self.listing.find(at) {
                let data = self.objects.get(&chunk_key(&self.id, c.base)).await?;
                self.current = Some((c.base, data));
                continue;
            }
            if self.listing.end.is_some_and(|e| at >= e) {
                return Ok(0);
            }
            if fresh && !self.follow {
                return Ok(0);
            }
            if fresh && Instant::now() >= next_probe {
                next_probe = Instant::now() + PROBE_EVERY;
                if let Some(p) = &self.probe {
                    if p().await {
                        // Finished without an end object: one more listing is all there is.
                        self.follow = false;
                    }
                }
            }
            self.relist().await?;
            fresh = true;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listing_finds_the_chunk_holding_an_offset() {
        let l = Listing {
            chunks: vec![Chunk { base: 0, len: 10 }, Chunk { base: 10, len: 5 }],
            end: None,
        };
        assert_eq!(l.find(0), Some(Chunk { base: 0, len: 10 }));
        assert_eq!(l.find(9), Some(Chunk { base: 0, len: 10 }));
        assert_eq!(l.find(10), Some(Chunk { base: 10, len: 5 }));
        assert_eq!(l.find(15), None);
        assert_eq!(l.contiguous_len(), 15);
    }
}
