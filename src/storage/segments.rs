//! Durable append-only media log of one store (step 31).
//!
//! # On disk
//!
//! A store's data is a directory of segment files named `{base:020}.seg`, where `base` is the
//! logical offset of the segment's first byte in the store's log (the concatenation of all
//! segments). Segments are contiguous: the next one starts where the previous one ends, and a
//! record never spans two. A segment is closed (fsynced) before the next is created, so only
//! the last segment can have a torn tail after a crash. Segments roll over at
//! [`SegmentOptions::segment_bytes`] (a single record larger than that gets a segment alone).
//!
//! A record, little-endian, 28-byte header then the payload:
//!
//! | offset | size | field |
//! | --- | --- | --- |
//! | 0 | 4 | `len`: payload length in bytes (at most [`MAX_PAYLOAD`]) |
//! | 4 | 4 | `crc`: CRC-32C (Castagnoli) of bytes 0..4 and 8..28+len |
//! | 8 | 8 | `arrival_us`: wall-clock arrival, microseconds since the Unix epoch |
//! | 16 | 2 | RTP sequence number |
//! | 18 | 4 | RTP timestamp |
//! | 22 | 4 | RTP SSRC |
//! | 26 | 1 | RTP payload type |
//! | 27 | 1 | flags: bit 0 = RTP marker, other bits 0 |
//! | 28 | len | RTP payload |
//!
//! # Writing
//!
//! [`SegmentWriter`] buffers appended records in memory; [`SegmentWriter::commit`] writes the
//! buffer, `fdatasync`s and only then publishes the new committed length through a
//! `tokio::sync::watch`, so readers never see data a crash could take back.
//!
//! On the RTP path use [`pipeline`]: the ingest task owns an [`Ingest`] that encodes each
//! packet straight into a reusable batch buffer (no allocation, no lock, no syscall per
//! packet) and hands full or aged batches (`commit_interval`, default 20 ms) to a
//! [`WriterTask`] over a bounded channel; the writer appends everything queued, commits once
//! (group commit, on the blocking pool) and returns the buffers for reuse.
//!
//! # Reading and recovery
//!
//! [`SegmentReader`] reads records from a logical offset, verifying CRCs, and when given the
//! store's watch follows the live tail: it waits for more committed data and ends when the
//! writer has finished. [`recover`] scans a store after a crash and cuts it back to its last
//! good record.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use crc::{Crc, Table, CRC_32_ISCSI};
use tokio::io::{AsyncReadExt, AsyncSeekExt};
use tokio::sync::{mpsc, watch};

use crate::storage::objects::chunks::ChunkSource;

/// Header bytes before each payload.
pub const HEADER_LEN: usize = 28;
/// Largest payload a record may hold (larger than any UDP datagram).
pub const MAX_PAYLOAD: usize = 65_536;
const MAX_RECORD: usize = HEADER_LEN + MAX_PAYLOAD;
const SEGMENT_SUFFIX: &str = ".seg";
const ORPHAN_SUFFIX: &str = ".orphan";

static CRC32C: Crc<u32, Table<16>> = Crc::<u32, Table<16>>::new(&CRC_32_ISCSI);

#[derive(Debug, thiserror::Error)]
pub enum SegmentError {
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("corrupt record at offset {offset}: {reason}")]
    Corrupt { offset: u64, reason: &'static str },
    #[error("payload of {0} bytes is larger than {MAX_PAYLOAD}")]
    PayloadTooLarge(usize),
    #[error("batch is not a sequence of whole records")]
    BadBatch,
    #[error("store directory {0} already holds segments")]
    NotEmpty(PathBuf),
    #[error("no segment holds offset {0}")]
    MissingSegment(u64),
    #[error("the writer failed earlier; the store cannot take more data")]
    Failed,
    #[error("storage task failed: {0}")]
    Task(String),
    #[error(transparent)]
    Object(#[from] crate::storage::objects::ObjectError),
}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> SegmentError + 'a {
    move |source| SegmentError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

/// The RTP facts kept with each payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RecordHeader {
    pub arrival_us: u64,
    pub seq: u16,
    pub timestamp: u32,
    pub ssrc: u32,
    pub payload_type: u8,
    pub marker: bool,
}

/// A record read back; `payload` borrows the reader's buffer until the next call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordRef<'a> {
    pub header: RecordHeader,
    pub payload: &'a [u8],
    /// Logical offset of this record, and of the one after it (where a reader may resume).
    pub offset: u64,
    pub next_offset: u64,
}

/// What the writer has made durable, as published to readers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TailState {
    /// Committed log bytes (headers included).
    pub bytes: u64,
    pub records: u64,
    /// Committed RTP payload bytes (what quota and thresholds count).
    pub payload_bytes: u64,
    /// No more data will come.
    pub finished: bool,
}

fn crc_of(header: &[u8; HEADER_LEN], payload: &[u8]) -> u32 {
    let mut d = CRC32C.digest();
    d.update(&header[0..4]);
    d.update(&header[8..]);
    d.update(payload);
    d.finalize()
}

/// Appends one encoded record to `out`.
pub fn encode_record(
    out: &mut Vec<u8>,
    h: &RecordHeader,
    payload: &[u8],
) -> Result<(), SegmentError> {
    if payload.len() > MAX_PAYLOAD {
        return Err(SegmentError::PayloadTooLarge(payload.len()));
    }
    let mut hdr = [0u8; HEADER_LEN];
    hdr[0..4].copy_from_slice(&(payload.len() as u32).to_le_bytes());
    hdr[8..16].copy_from_slice(&h.arrival_us.to_le_bytes());
    hdr[16..18].copy_from_slice(&h.seq.to_le_bytes());
    hdr[18..22].copy_from_slice(&h.timestamp.to_le_bytes());
    hdr[22..26].copy_from_slice(&h.ssrc.to_le_bytes());
    hdr[26] = h.payload_type;
    hdr[27] = u8::from(h.marker);
    let crc = crc_of(&hdr, payload);
    hdr[4..8].copy_from_slice(&crc.to_le_bytes());
    out.extend_from_slice(&hdr);
    out.extend_from_slice(payload);
    Ok(())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Decoded {
    /// A whole, verified record: header and its total length (payload at `HEADER_LEN..len`).
    Record(RecordHeader, usize),
    /// Not enough bytes for a whole record.
    Incomplete,
    Corrupt(&'static str),
}

fn le_u32(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(a)
}

/// The whole records at the start of `buf`, good CRCs only: (their length in bytes, their
/// payload bytes). For counting what a store's chunk objects hold.
pub fn record_extent(buf: &[u8]) -> (usize, u64) {
    let (mut pos, mut payload) = (0usize, 0u64);
    while pos < buf.len() {
        match decode(&buf[pos..]) {
            Decoded::Record(_, len) => {
                payload += (len - HEADER_LEN) as u64;
                pos += len;
            }
            _ => break,
        }
    }
    (pos, payload)
}

fn decode(buf: &[u8]) -> Decoded {
    if buf.len() < HEADER_LEN {
        return Decoded::Incomplete;
    }
    let len = le_u32(buf, 0) as usize;
    if len > MAX_PAYLOAD {
        return Decoded::Corrupt("length out of range");
    }
    if buf.len() < HEADER_LEN + len {
        return Decoded::Incomplete;
    }
    let mut hdr = [0u8; HEADER_LEN];
    hdr.copy_from_slice(&buf[..HEADER_LEN]);
    if crc_of(&hdr, &buf[HEADER_LEN..HEADER_LEN + len]) != le_u32(&hdr, 4) {
        return Decoded::Corrupt("checksum mismatch");
    }
    if hdr[27] & !1 != 0 {
        return Decoded::Corrupt("unknown flags");
    }
    let mut a8 = [0u8; 8];
    a8.copy_from_slice(&hdr[8..16]);
    let h = RecordHeader {
        arrival_us: u64::from_le_bytes(a8),
        seq: u16::from_le_bytes([hdr[16], hdr[17]]),
        timestamp: le_u32(&hdr, 18),
        ssrc: le_u32(&hdr, 22),
        payload_type: hdr[26],
        marker: hdr[27] & 1 != 0,
    };
    Decoded::Record(h, HEADER_LEN + len)
}

/// Counts whole records in an encoded batch (framing only; CRCs are the reader's job).
fn frame_batch(batch: &[u8]) -> Result<(u64, u64), SegmentError> {
    let (mut pos, mut records, mut payload) = (0usize, 0u64, 0u64);
    while pos < batch.len() {
        if batch.len() - pos < HEADER_LEN {
            return Err(SegmentError::BadBatch);
        }
        let len = le_u32(batch, pos) as usize;
        if len > MAX_PAYLOAD || batch.len() - pos - HEADER_LEN < len {
            return Err(SegmentError::BadBatch);
        }
        pos += HEADER_LEN + len;
        records += 1;
        payload += len as u64;
    }
    Ok((records, payload))
}

fn segment_name(base: u64) -> String {
    format!("{base:020}{SEGMENT_SUFFIX}")
}

fn segment_path(dir: &Path, base: u64) -> PathBuf {
    dir.join(segment_name(base))
}

/// `(base, path)` of every segment in `dir`, in order. A missing directory has none.
fn list_segments(dir: &Path) -> Result<Vec<(u64, PathBuf)>, SegmentError> {
    let rd = match fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io_err("list", dir)(e)),
    };
    let mut out = Vec::new();
    for entry in rd {
        let entry = entry.map_err(io_err("list", dir))?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        let Some(stem) = name.strip_suffix(SEGMENT_SUFFIX) else {
            continue;
        };
        if stem.len() == 20 && stem.bytes().all(|b| b.is_ascii_digit()) {
            if let Ok(base) = stem.parse() {
                out.push((base, entry.path()));
            }
        }
    }
    out.sort_unstable_by_key(|(b, _)| *b);
    Ok(out)
}

/// Bytes `from..to` of the committed log in `dir` (blocking): what the object uploader puts
/// as a chunk. `from` and `to` are commit boundaries the writer published.
pub(crate) fn read_log_range(dir: &Path, from: u64, to: u64) -> Result<Vec<u8>, SegmentError> {
    let segments = list_segments(dir)?;
    let cap = usize::try_from(to.saturating_sub(from)).unwrap_or(0);
    let mut out = Vec::with_capacity(cap);
    let mut at = from;
    while at < to {
        let Some((base, path)) = segments.iter().rev().find(|(b, _)| *b <= at) else {
            return Err(SegmentError::MissingSegment(at));
        };
        let mut f = File::open(path).map_err(io_err("open", path))?;
        f.seek(io::SeekFrom::Start(at - base))
            .map_err(io_err("seek", path))?;
        let before = out.len();
        f.take(to - at)
            .read_to_end(&mut out)
            .map_err(io_err("read", path))?;
        let n = (out.len() - before) as u64;
        if n == 0 {
            return Err(SegmentError::MissingSegment(at));
        }
        at += n;
    }
    Ok(out)
}

/// The length of the longest run of whole records at the start of `log` that is at most
/// `max` bytes (at least one record, even a larger one; all of `log` when shorter). `log`
/// starts on a record.
pub(crate) fn record_cut(log: &[u8], max: usize) -> usize {
    let mut at = 0usize;
    while at + HEADER_LEN <= log.len() {
        let len = HEADER_LEN + le_u32(log, at) as usize;
        if at > 0 && at + len > max {
            break;
        }
        at += len;
    }
    at.min(log.len())
}

/// Makes created/renamed directory entries durable.
fn sync_dir(dir: &Path) -> Result<(), SegmentError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err("sync directory", dir))
}

/// Where segments roll over, and how hard a commit works to be durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SegmentOptions {
    pub segment_bytes: u64,
    pub durability: Durability,
}

/// What a commit guarantees before readers see the data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// `fdatasync` on every commit: survives a power loss (in-call stores, PROTOCOL §2).
    EveryCommit,
    /// `write` on every commit (survives a crash or kill of the process); `fdatasync` only
    /// when a segment is sealed and when the log finishes, the kernel's writeback does the
    /// rest. Whole-call recordings: one sync per direction per commit would cost more than
    /// relaying the call (docs/BENCHMARKS.md, issue 5).
    AtSegmentEnd,
}

impl Default for SegmentOptions {
    fn default() -> Self {
        SegmentOptions {
            segment_bytes: 8 * 1024 * 1024,
            durability: Durability::EveryCommit,
        }
    }
}

/// The outcome of [`recover`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Recovered {
    /// Good log bytes kept, records and their payload bytes.
    pub bytes: u64,
    pub records: u64,
    pub payload_bytes: u64,
    pub segments: usize,
    /// Bytes cut off: the torn or corrupt tail of a segment plus any segments after it.
    pub truncated_bytes: u64,
    /// Later segments set aside as `*.seg.orphan` because an earlier one was cut.
    pub orphaned_segments: usize,
}

/// Scans a store directory and cuts it back to the last good record: a torn or corrupt record
/// (a crash mid-write) and everything after it are removed from the log, so what remains is
/// exactly what the writer committed. Blocking; run it on the blocking pool. A missing
/// directory is an empty store.
pub fn recover(dir: &Path) -> Result<Recovered, SegmentError> {
    let segments = list_segments(dir)?;
    let mut r = Recovered::default();
    let mut data = Vec::new();
    let mut cut = false;
    let mut touched = false;
    for (base, path) in segments {
        if cut || base != r.bytes {
            // After a cut (or a gap, which only damage can cause) nothing is contiguous with
            // the good log any more. Keep it aside rather than destroy it.
            let len = fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
            let mut orphan = path.clone().into_os_string();
            orphan.push(ORPHAN_SUFFIX);
            fs::rename(&path, &orphan).map_err(io_err("set aside", &path))?;
            tracing::warn!(segment = %path.display(), "segment after a damaged one set aside");
            r.truncated_bytes += len;
            r.orphaned_segments += 1;
            cut = true;
            touched = true;
            continue;
        }
        data.clear();
        File::open(&path)
            .and_then(|mut f| f.read_to_end(&mut data))
            .map_err(io_err("read", &path))?;
        let mut pos = 0usize;
        while pos < data.len() {
            match decode(&data[pos..]) {
                Decoded::Record(_, len) => {
                    r.records += 1;
                    r.payload_bytes += (len - HEADER_LEN) as u64;
                    pos += len;
                }
                Decoded::Incomplete | Decoded::Corrupt(_) => break,
            }
        }
        if pos < data.len() {
            let f = OpenOptions::new()
                .write(true)
                .open(&path)
                .map_err(io_err("open", &path))?;
            f.set_len(pos as u64).map_err(io_err("truncate", &path))?;
            f.sync_all().map_err(io_err("sync", &path))?;
            tracing::warn!(segment = %path.display(), kept = pos, cut = data.len() - pos,
                "torn or corrupt tail cut off");
            r.truncated_bytes += (data.len() - pos) as u64;
            cut = true;
        }
        if pos == 0 {
            // An empty segment carries nothing; the writer recreates it when needed.
            fs::remove_file(&path).map_err(io_err("remove", &path))?;
            touched = true;
        } else {
            r.segments += 1;
        }
        r.bytes += pos as u64;
    }
    if touched {
        sync_dir(dir)?;
    }
    Ok(r)
}

/// Initial room for the records between two commits.
const WRITER_BUF: usize = 16 * 1024;

/// Appends records to a store's segments; see the module docs. Blocking I/O in `commit`.
#[derive(Debug)]
pub struct SegmentWriter {
    dir: PathBuf,
    opts: SegmentOptions,
    /// The open last segment, its base and length.
    file: Option<File>,
    seg_base: u64,
    seg_len: u64,
    buf: Vec<u8>,
    buf_records: u64,
    buf_payload: u64,
    committed: TailState,
    tx: watch::Sender<TailState>,
    failed: bool,
}

impl SegmentWriter {
    /// Starts a new, empty store log in `dir` (created if missing).
    pub fn create(dir: &Path, opts: SegmentOptions) -> Result<SegmentWriter, SegmentError> {
        crate::secret::create_private_dir_all(dir).map_err(io_err("create", dir))?;
        if !list_segments(dir)?.is_empty() {
            return Err(SegmentError::NotEmpty(dir.to_path_buf()));
        }
        Ok(SegmentWriter::at(
            dir,
            opts,
            None,
            0,
            0,
            TailState::default(),
        ))
    }

    /// Recovers `dir` and continues appending after its last good record.
    pub fn open(
        dir: &Path,
        opts: SegmentOptions,
    ) -> Result<(SegmentWriter, Recovered), SegmentError> {
        crate::secret::create_private_dir_all(dir).map_err(io_err("create", dir))?;
        let rec = recover(dir)?;
        let state = TailState {
            bytes: rec.bytes,
            records: rec.records,
            payload_bytes: rec.payload_bytes,
            finished: false,
        };
        let last = list_segments(dir)?.pop();
        let w = match last {
            Some((base, path)) => {
                let f = OpenOptions::new()
                    .append(true)
                    .open(&path)
                    .map_err(io_err("open", &path))?;
                SegmentWriter::at(dir, opts, Some(f), base, rec.bytes - base, state)
            }
            None => SegmentWriter::at(dir, opts, None, rec.bytes, 0, state),
        };
        Ok((w, rec))
    }

    fn at(
        dir: &Path,
        opts: SegmentOptions,
        file: Option<File>,
        seg_base: u64,
        seg_len: u64,
        committed: TailState,
    ) -> SegmentWriter {
        SegmentWriter {
            dir: dir.to_path_buf(),
            opts,
            file,
            seg_base,
            seg_len,
            // Grows when a commit holds more; a recording's 250 ms of G.711 is 2.4 KiB, and a
            // log lives as long as its call.
            buf: Vec::with_capacity(WRITER_BUF),
            buf_records: 0,
            buf_payload: 0,
            committed,
            tx: watch::Sender::new(committed),
            failed: false,
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// A receiver of the committed state, for live-tailing readers.
    pub fn subscribe(&self) -> watch::Receiver<TailState> {
        self.tx.subscribe()
    }

    /// The committed state.
    pub fn state(&self) -> TailState {
        self.committed
    }

    /// Bytes appended but not committed yet.
    pub fn pending_bytes(&self) -> usize {
        self.buf.len()
    }

    /// Buffers one record; durable only after [`commit`](Self::commit).
    pub fn append(&mut self, h: &RecordHeader, payload: &[u8]) -> Result<(), SegmentError> {
        encode_record(&mut self.buf, h, payload)?;
        self.buf_records += 1;
        self.buf_payload += payload.len() as u64;
        Ok(())
    }

    /// Buffers records already encoded with [`encode_record`] (an [`Ingest`] batch).
    pub fn append_encoded(&mut self, batch: &[u8]) -> Result<(), SegmentError> {
        let (records, payload) = frame_batch(batch)?;
        self.buf.extend_from_slice(batch);
        self.buf_records += records;
        self.buf_payload += payload;
        Ok(())
    }

    /// Writes the buffered records, `fdatasync`s, then publishes the new committed state.
    /// After an I/O error the writer refuses further commits (what reached the disk is
    /// uncertain; recovery sorts it out at the next start).
    pub fn commit(&mut self) -> Result<TailState, SegmentError> {
        if self.failed {
            return Err(SegmentError::Failed);
        }
        if self.buf.is_empty() {
            return Ok(self.committed);
        }
        if let Err(e) = self.write_buffer() {
            self.failed = true;
            return Err(e);
        }
        self.committed.bytes += self.buf.len() as u64;
        self.committed.records += self.buf_records;
        self.committed.payload_bytes += self.buf_payload;
        self.buf.clear();
        self.buf_records = 0;
        self.buf_payload = 0;
        self.tx.send_replace(self.committed);
        Ok(self.committed)
    }

    fn write_buffer(&mut self) -> Result<(), SegmentError> {
        let mut pos = 0usize;
        while pos < self.buf.len() {
            if self.file.is_none() {
                self.new_segment()?;
            }
            // The longest run of whole records that fits in this segment; an empty segment
            // takes at least one record however large.
            let room = self.opts.segment_bytes.saturating_sub(self.seg_len);
            let mut end = pos;
            while end < self.buf.len() {
                let rec = HEADER_LEN + le_u32(&self.buf, end) as usize;
                let fits = ((end - pos + rec) as u64) <= room;
                let first_in_empty = end == pos && self.seg_len == 0;
                if !fits && !first_in_empty {
                    break;
                }
                end += rec;
            }
            if end == pos {
                self.seal_segment()?;
                continue;
            }
            let path = segment_path(&self.dir, self.seg_base);
            let file = self.file.as_mut().ok_or(SegmentError::Failed)?;
            file.write_all(&self.buf[pos..end])
                .map_err(io_err("write", &path))?;
            self.seg_len += (end - pos) as u64;
            pos = end;
        }
        if self.opts.durability == Durability::EveryCommit {
            self.sync_segment()?;
        }
        Ok(())
    }

    fn sync_segment(&self) -> Result<(), SegmentError> {
        if let Some(f) = &self.file {
            f.sync_data()
                .map_err(io_err("sync", &segment_path(&self.dir, self.seg_base)))?;
        }
        Ok(())
    }

    /// Makes the full segment durable before the next one exists, so only the last segment
    /// can ever be torn.
    fn seal_segment(&mut self) -> Result<(), SegmentError> {
        if let Some(f) = self.file.take() {
            f.sync_data()
                .map_err(io_err("sync", &segment_path(&self.dir, self.seg_base)))?;
            self.seg_base += self.seg_len;
            self.seg_len = 0;
        }
        Ok(())
    }

    fn new_segment(&mut self) -> Result<(), SegmentError> {
        let path = segment_path(&self.dir, self.seg_base);
        let f = OpenOptions::new()
            .append(true)
            .create_new(true)
            .open(&path)
            .map_err(io_err("create", &path))?;
        sync_dir(&self.dir)?;
        self.file = Some(f);
        Ok(())
    }

    /// Commits what is buffered and tells readers the log is complete.
    pub fn finish(&mut self) -> Result<TailState, SegmentError> {
        let mut res = self.commit();
        if res.is_ok() && self.opts.durability != Durability::EveryCommit {
            res = self.sync_segment().map(|()| self.committed);
        }
        self.close_tail();
        res.map(|_| self.committed)
    }

    /// Ends the live tail at what is committed, without writing (the writer gave up).
    pub fn close_tail(&mut self) {
        self.committed.finished = true;
        self.tx.send_replace(self.committed);
    }
}

/// Reads a store's records in order from a logical offset, following the live tail when
/// given the writer's watch. Sees only committed data.
#[derive(Debug)]
pub struct SegmentReader {
    dir: PathBuf,
    /// Chunk objects instead of the segment files in `dir` (`objects = "s3://..."`).
    chunks: Option<Box<ChunkSource>>,
    tail: Option<watch::Receiver<TailState>>,
    /// Logical offset of `buf[start]`.
    pos: u64,
    file: Option<OpenSegment>,
    buf: Vec<u8>,
    start: usize,
    end: usize,
}

impl SegmentReader {
    /// `offset` must be a record boundary (0, or a `next_offset` seen earlier). Without
    /// `tail` the reader reads to the end of the segments on disk (a finished store).
    pub fn open(
        dir: &Path,
        offset: u64,
        tail: Option<watch::Receiver<TailState>>,
    ) -> SegmentReader {
        SegmentReader {
            dir: dir.to_path_buf(),
            chunks: None,
            tail,
            pos: offset,
            file: None,
            buf: vec![0; 2 * MAX_RECORD],
            start: 0,
            end: 0,
        }
    }

    /// A reader of the store's chunk objects from `offset` (a record boundary), following
    /// the store while `source` does (see [`ChunkSource`]).
    pub fn from_objects(source: ChunkSource, offset: u64) -> SegmentReader {
        SegmentReader {
            dir: PathBuf::new(),
            chunks: Some(Box::new(source)),
            tail: None,
            pos: offset,
            file: None,
            buf: vec![0; 2 * MAX_RECORD],
            start: 0,
            end: 0,
        }
    }

    /// Logical offset of the next record.
    pub fn position(&self) -> u64 {
        self.pos
    }

    /// The next record; None at the end of a finished store (or, without a watch, at the
    /// end of the data on disk). Waits while a live store has nothing new committed.
    pub async fn next(&mut self) -> Result<Option<RecordRef<'_>>, SegmentError> {
        loop {
            match decode(&self.buf[self.start..self.end]) {
                Decoded::Record(header, len) => {
                    let offset = self.pos;
                    let at = self.start;
                    self.start += len;
                    self.pos += len as u64;
                    return Ok(Some(RecordRef {
                        header,
                        payload: &self.buf[at + HEADER_LEN..at + len],
                        offset,
                        next_offset: self.pos,
                    }));
                }
                Decoded::Corrupt(reason) => {
                    return Err(SegmentError::Corrupt {
                        offset: self.pos,
                        reason,
                    })
                }
                Decoded::Incomplete => {}
            }
            let have_end = self.pos + (self.end - self.start) as u64;
            let limit = match &mut self.tail {
                None => None,
                Some(rx) => {
                    let st = *rx.borrow_and_update();
                    if have_end >= st.bytes {
                        if st.finished {
                            return self.at_end().map(|()| None);
                        }
                        if rx.changed().await.is_err() {
                            // Writer gone without finishing: end at what it committed.
                            let st = *rx.borrow();
                            if have_end >= st.bytes {
                                return self.at_end().map(|()| None);
                            }
                        }
                        continue;
                    }
                    Some(st.bytes - have_end)
                }
            };
            if self.fill(have_end, limit).await? == 0 {
                // Without a watch: the end of the data on disk.
                return self.at_end().map(|()| None);
            }
        }
    }

    fn at_end(&self) -> Result<(), SegmentError> {
        if self.start < self.end {
            return Err(SegmentError::Corrupt {
                offset: self.pos,
                reason: "log ends inside a record",
            });
        }
        Ok(())
    }

    /// Reads more bytes at logical offset `at` (at most `limit`); 0 only at the end of the
    /// segments on disk.
    async fn fill(&mut self, at: u64, limit: Option<u64>) -> Result<usize, SegmentError> {
        if self.start > 0 {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        let room = self.buf.len() - self.end;
        let want = limit.map_or(room, |l| room.min(usize::try_from(l).unwrap_or(usize::MAX)));
        if let Some(chunks) = self.chunks.as_mut() {
            let n = chunks
                .read_at(at, &mut self.buf[self.end..self.end + want])
                .await?;
            self.end += n;
            return Ok(n);
        }
        // Out of data on disk: an error when the watch says there is more.
        let none_left = |at| match limit {
            None => Ok(0),
            Some(_) => Err(SegmentError::MissingSegment(at)),
        };
        if self.file.as_ref().is_none_or(|f| f.pos != at) && !self.open_segment_at(at).await? {
            return none_left(at);
        }
        loop {
            let Some(f) = self.file.as_mut() else {
                return none_left(at);
            };
            let n = f
                .file
                .read(&mut self.buf[self.end..self.end + want])
                .await
                .map_err(io_err("read", &self.dir))?;
            if n > 0 {
                f.pos += n as u64;
                self.end += n;
                return Ok(n);
            }
            if f.base == at {
                // An empty segment: nothing follows it.
                return none_left(at);
            }
            // End of this segment: the data continues in the segment named by this offset.
            let next = segment_path(&self.dir, at);
            match tokio::fs::File::open(&next).await {
                Ok(file) => {
                    self.file = Some(OpenSegment {
                        file,
                        base: at,
                        pos: at,
                    })
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => return none_left(at),
                Err(e) => return Err(io_err("open", &next)(e)),
            }
        }
    }

    /// Opens the segment holding logical offset `at`; false when there is none.
    async fn open_segment_at(&mut self, at: u64) -> Result<bool, SegmentError> {
        let dir = self.dir.clone();
        let segments = tokio::task::spawn_blocking(move || list_segments(&dir))
            .await
            .map_err(|e| SegmentError::Task(e.to_string()))??;
        let Some((base, path)) = segments.into_iter().rev().find(|(b, _)| *b <= at) else {
            return Ok(false);
        };
        let mut file = tokio::fs::File::open(&path)
            .await
            .map_err(io_err("open", &path))?;
        file.seek(io::SeekFrom::Start(at - base))
            .await
            .map_err(io_err("seek", &path))?;
        self.file = Some(OpenSegment {
            file,
            base,
            pos: at,
        });
        Ok(true)
    }
}

#[derive(Debug)]
struct OpenSegment {
    file: tokio::fs::File,
    /// Logical offsets of the segment's start and of the file's read position.
    base: u64,
    pos: u64,
}

/// Tuning of the ingest → writer hand-off.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PipelineOptions {
    /// A batch is handed off when it holds this many bytes...
    pub batch_bytes: usize,
    /// ...or its oldest record arrived this long ago: the loss window on a crash is about
    /// this plus one fsync.
    pub commit_interval: Duration,
    /// Batches in flight between ingest and writer.
    pub queue_depth: usize,
    /// While the writer lags, the ingest keeps buffering up to this; beyond it packets are
    /// refused ([`IngestError::Backpressure`]) rather than stalling the RTP socket.
    pub max_buffered_bytes: usize,
}

impl Default for PipelineOptions {
    fn default() -> Self {
        PipelineOptions {
            batch_bytes: 64 * 1024,
            commit_interval: Duration::from_millis(20),
            queue_depth: 8,
            max_buffered_bytes: 4 * 1024 * 1024,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    #[error("the store writer has stopped")]
    WriterClosed,
    #[error("the store writer is behind; packet not stored")]
    Backpressure,
    #[error(transparent)]
    Record(#[from] SegmentError),
}

/// Counts kept by the ingest side.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct IngestStats {
    pub packets: u64,
    pub payload_bytes: u64,
    pub refused: u64,
}

/// The packet-path end of a store log: owned by the RTP ingest task. See [`pipeline`].
#[derive(Debug)]
pub struct Ingest {
    buf: Vec<u8>,
    oldest_us: Option<u64>,
    tx: mpsc::Sender<Vec<u8>>,
    pool: mpsc::Receiver<Vec<u8>>,
    opts: PipelineOptions,
    stats: IngestStats,
}

/// The disk end of a store log: spawn [`run`](Self::run) as the store's writer task.
#[derive(Debug)]
pub struct WriterTask {
    writer: SegmentWriter,
    rx: mpsc::Receiver<Vec<u8>>,
    pool: mpsc::Sender<Vec<u8>>,
    /// The first failure of [`take_queued`](Self::take_queued) or
    /// [`append_record`](Self::append_record), reported by the next [`pump`](Self::pump).
    failed: Option<SegmentError>,
}

/// Connects an [`Ingest`] to a [`WriterTask`] for `writer`.
pub fn pipeline(writer: SegmentWriter, opts: PipelineOptions) -> (Ingest, WriterTask) {
    let depth = opts.queue_depth.max(1);
    let (tx, rx) = mpsc::channel(depth);
    let (pool_tx, pool_rx) = mpsc::channel(depth + 2);
    let ingest = Ingest {
        buf: Vec::with_capacity(opts.batch_bytes + MAX_RECORD),
        oldest_us: None,
        tx,
        pool: pool_rx,
        opts,
        stats: IngestStats::default(),
    };
    let task = WriterTask {
        writer,
        rx,
        pool: pool_tx,
        failed: None,
    };
    (ingest, task)
}

impl Ingest {
    /// Stores one packet: encodes it into the current batch and hands the batch off when it
    /// is full or old enough. Never blocks and, once warmed up, never allocates.
    pub fn push(&mut self, h: &RecordHeader, payload: &[u8]) -> Result<(), IngestError> {
        // A closed writer is noticed at the next hand-off (`flush`), not per packet: the
        // check reads a cache line the writer's thread shares.
        if self.buf.len() >= self.opts.max_buffered_bytes {
            // The writer is stuck; try once more before refusing.
            self.flush()?;
            if self.buf.len() >= self.opts.max_buffered_bytes {
                self.stats.refused += 1;
                return Err(IngestError::Backpressure);
            }
        }
        encode_record(&mut self.buf, h, payload)?;
        self.stats.packets += 1;
        self.stats.payload_bytes += payload.len() as u64;
        let oldest = *self.oldest_us.get_or_insert(h.arrival_us);
        let age = Duration::from_micros(h.arrival_us.saturating_sub(oldest));
        if self.buf.len() >= self.opts.batch_bytes || age >= self.opts.commit_interval {
            self.flush()?;
        }
        Ok(())
    }

    /// Hands the current batch to the writer if there is room in the queue; otherwise keeps
    /// it (it is retried at the next push or flush). Call it from the ingest task's timer
    /// too, so a stream that goes quiet is still committed promptly.
    pub fn flush(&mut self) -> Result<(), IngestError> {
        if self.tx.is_closed() {
            return Err(IngestError::WriterClosed);
        }
        if self.buf.is_empty() || self.tx.capacity() == 0 {
            return Ok(());
        }
        let fresh = self
            .pool
            .try_recv()
            .unwrap_or_else(|_| Vec::with_capacity(self.opts.batch_bytes + MAX_RECORD));
        let full = std::mem::replace(&mut self.buf, fresh);
        self.oldest_us = None;
        // The only sender, and capacity was checked, so this does not fail for lack of room.
        self.tx
            .try_send(full)
            .map_err(|_| IngestError::WriterClosed)
    }

    pub fn stats(&self) -> IngestStats {
        self.stats
    }

    /// Hands off what is left (waiting for queue room) and closes the log: the writer
    /// commits it and then publishes `finished`.
    pub async fn close(mut self) -> Result<IngestStats, IngestError> {
        if !self.buf.is_empty() {
            let rest = std::mem::take(&mut self.buf);
            self.tx
                .send(rest)
                .await
                .map_err(|_| IngestError::WriterClosed)?;
        }
        Ok(self.stats)
    }
}

impl WriterTask {
    /// A receiver of the committed state, for readers and threshold tracking.
    pub fn subscribe(&self) -> watch::Receiver<TailState> {
        self.writer.subscribe()
    }

    /// Appends and commits batches until the [`Ingest`] is closed or dropped, then publishes
    /// `finished`. Everything queued while a commit runs goes into the next one (group
    /// commit). On an I/O error the tail is closed at the last commit and the error returned.
    pub async fn run(self) -> Result<TailState, SegmentError> {
        let WriterTask {
            mut writer,
            mut rx,
            pool,
            failed: _,
        } = self;
        while let Some(batch) = rx.recv().await {
            let mut res = writer.append_encoded(&batch);
            recycle(&pool, batch);
            if res.is_ok() {
                // A close seen here is seen again by the next `recv`.
                res = append_queued(&mut writer, &mut rx, &pool).0;
            }
            let (w, committed) = blocking(writer, |w| res.and_then(|_| w.commit())).await?;
            writer = w;
            if let Err(e) = committed {
                writer.close_tail();
                return Err(e);
            }
        }
        // `finish` closes the tail whatever happens.
        blocking(writer, SegmentWriter::finish).await?.1
    }

    /// Appends and commits whatever is queued, without waiting: for a thread that serves many
    /// logs by polling them ([`super::log_thread`]), where a wake-up per batch would cost more
    /// than the write. Blocks on disk I/O, so never call it on an async worker.
    pub fn pump(&mut self) -> Pumped {
        if let Some(e) = self.failed.take() {
            self.writer.close_tail();
            return Pumped::Finished(Err(e));
        }
        let (res, closed) = append_queued(&mut self.writer, &mut self.rx, &self.pool);
        match res.and_then(|()| self.writer.commit()) {
            Err(e) => {
                self.writer.close_tail();
                Pumped::Finished(Err(e))
            }
            Ok(_) if closed => Pumped::Finished(self.writer.finish()),
            Ok(_) => Pumped::Open,
        }
    }
}

impl WriterTask {
    /// Appends the batches queued now, without committing: the log thread calls it before it
    /// appends records that arrived another way ([`append_record`](Self::append_record)), so
    /// the log keeps the order in which the two were handed over.
    pub(crate) fn take_queued(&mut self) {
        if self.failed.is_none() {
            if let (Err(e), _) = append_queued(&mut self.writer, &mut self.rx, &self.pool) {
                self.failed = Some(e);
            }
        }
    }

    /// Appends one record that did not come through the [`Ingest`] (the kernel fast path's
    /// recording ring), committed by the next [`pump`](Self::pump).
    pub(crate) fn append_record(&mut self, h: &RecordHeader, payload: &[u8]) {
        if self.failed.is_none() {
            if let Err(e) = self.writer.append(h, payload) {
                self.failed = Some(e);
            }
        }
    }
}

/// Appends every batch queued now (not waiting for more) and recycles the buffers; also says
/// whether the ingest end has closed with nothing left. Stops at the first bad batch.
fn append_queued(
    writer: &mut SegmentWriter,
    rx: &mut mpsc::Receiver<Vec<u8>>,
    pool: &mpsc::Sender<Vec<u8>>,
) -> (Result<(), SegmentError>, bool) {
    loop {
        match rx.try_recv() {
            Ok(b) => {
                let res = writer.append_encoded(&b);
                recycle(pool, b);
                if res.is_err() {
                    return (res, false);
                }
            }
            Err(mpsc::error::TryRecvError::Empty) => return (Ok(()), false),
            Err(mpsc::error::TryRecvError::Disconnected) => return (Ok(()), true),
        }
    }
}

/// What [`WriterTask::pump`] left behind.
#[derive(Debug)]
pub enum Pumped {
    /// The log is still open; call again later.
    Open,
    /// The ingest end closed and the log is finished (or failed; the tail is closed at the
    /// last commit).
    Finished(Result<TailState, SegmentError>),
}

fn recycle(pool: &mpsc::Sender<Vec<u8>>, mut buf: Vec<u8>) {
    buf.clear();
    // A full pool just lets the buffer go.
    let _ = pool.try_send(buf);
}

/// Runs blocking writer work on the blocking pool, handing the writer back.
async fn blocking<T: Send + 'static>(
    mut w: SegmentWriter,
    f: impl FnOnce(&mut SegmentWriter) -> Result<T, SegmentError> + Send + 'static,
) -> Result<(SegmentWriter, Result<T, SegmentError>), SegmentError> {
    tokio::task::spawn_blocking(move || {
        let r = f(&mut w);
        (w, r)
    })
    .await
    .map_err(|e| SegmentError::Task(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hdr(i: u32) -> RecordHeader {
        RecordHeader {
            arrival_us: 1_700_000_000_000_000 + u64::from(i) * 20_000,
            seq: (i as u16).wrapping_add(65_500),
            timestamp: i.wrapping_mul(160),
            ssrc: 0xdead_beef,
            payload_type: 0,
            marker: i == 0,
        }
    }

    fn payload(i: u32) -> Vec<u8> {
        // Varying lengths, including empty.
        let len = (i as usize * 37) % 300;
        (0..len).map(|j| (i as usize * 7 + j) as u8).collect()
    }

    async fn read_all(
        dir: &Path,
        offset: u64,
        tail: Option<watch::Receiver<TailState>>,
    ) -> Result<Vec<(RecordHeader, Vec<u8>)>, SegmentError> {
        let mut r = SegmentReader::open(dir, offset, tail);
        let mut out = Vec::new();
        while let Some(rec) = r.next().await? {
            out.push((rec.header, rec.payload.to_vec()));
        }
        Ok(out)
    }

    fn expected(range: std::ops::Range<u32>) -> Vec<(RecordHeader, Vec<u8>)> {
        range.map(|i| (hdr(i), payload(i))).collect()
    }

    fn seg_files(dir: &Path) -> Vec<(u64, u64)> {
        list_segments(dir)
            .unwrap()
            .into_iter()
            .map(|(b, p)| (b, fs::metadata(p).unwrap().len()))
            .collect()
    }

    #[test]
    fn encode_decode_round_trip() {
        let mut buf = Vec::new();
        let h = hdr(3);
        encode_record(&mut buf, &h, b"hello").unwrap();
        assert_eq!(buf.len(), HEADER_LEN + 5);
        assert_eq!(decode(&buf), Decoded::Record(h, HEADER_LEN + 5));
        assert_eq!(decode(&buf[..HEADER_LEN + 4]), Decoded::Incomplete);
        // Every single-bit flip is caught.
        for byte in 0..buf.len() {
            for bit in 0..8 {
                let mut b = buf.clone();
                b[byte] ^= 1 << bit;
                assert!(
                    !matches!(decode(&b), Decoded::Record(..)),
                    "flip {byte}.{bit} undetected"
                );
            }
        }
        assert!(matches!(
            encode_record(&mut buf, &h, &vec![0; MAX_PAYLOAD + 1]),
            Err(SegmentError::PayloadTooLarge(_))
        ));
    }

    #[tokio::test]
    async fn append_commit_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let store = dir.path().join("st_x");
        let mut w = SegmentWriter::create(&store, SegmentOptions::default()).unwrap();
        let mut payload_total = 0;
        for i in 0..200 {
            w.append(&hdr(i), &payload(i)).unwrap();
            payload_total += payload(i).len() as u64;
        }
        // Nothing visible before the commit.
        assert_eq!(w.state(), TailState::default());
        let st = w.commit().unwrap();
        assert_eq!(st.records, 200);
        assert_eq!(st.payload_bytes, payload_total);
        assert_eq!(st.bytes, payload_total + 200 * HEADER_LEN as u64);
        let st = w.finish().unwrap();
        assert!(st.finished);
        assert_eq!(seg_files(&store), vec![(0, st.bytes)]);

        let got = read_all(&store, 0, Some(w.subscribe())).await.unwrap();
        assert_eq!(got, expected(0..200));
        let got = read_all(&store, 0, None).await.unwrap();
        assert_eq!(got, expected(0..200));
        // A second store in the same place is refused.
        assert!(matches!(
            SegmentWriter::create(&store, SegmentOptions::default()),
            Err(SegmentError::NotEmpty(_))
        ));
        // Recovery of a clean store changes nothing.
        let rec = recover(&store).unwrap();
        assert_eq!(
            (
                rec.bytes,
                rec.records,
                rec.payload_bytes,
                rec.truncated_bytes
            ),
            (st.bytes, 200, payload_total, 0)
        );
    }

    #[tokio::test]
    async fn rollover_and_reading_from_an_offset() {
        let dir = tempfile::tempdir().unwrap();
        let store = dir.path().join("s");
        let opts = SegmentOptions {
            segment_bytes: 1000,
            ..SegmentOptions::default()
        };
        let mut w = SegmentWriter::create(&store, opts).unwrap();
        let mut offsets = Vec::new();
        let mut at = 0u64;
        for i in 0..120 {
            offsets.push(at);
            w.append(&hdr(i), &payload(i)).unwrap();
            at += (HEADER_LEN + payload(i).len()) as u64;
            if i % 7 == 0 {
                w.commit().unwrap();
            }
        }
        // One record larger than a segment still goes in, alone.
        offsets.push(at);
        let big = vec![0xab; 3000];
        w.append(&hdr(120), &big).unwrap();
        w.append(&hdr(121), &payload(121)).unwrap();
        let st = w.finish().unwrap();
        let segs = seg_files(&store);
        assert!(segs.len() > 10, "{segs:?}");
        // Contiguous, within size unless a single record, and summing to the log.
        let mut next = 0;
        for (base, len) in &segs {
            assert_eq!(*base, next);
            assert!(*len <= 1000 || *len == (HEADER_LEN + 3000) as u64, "{len}");
            next = base + len;
        }
        assert_eq!(next, st.bytes);

        let mut want = expected(0..120);
        want.push((hdr(120), big));
        want.push((hdr(121), payload(121)));
        assert_eq!(read_all(&store, 0, None).await.unwrap(), want);
        // Resume from record 77 (in some later segment).
        assert_eq!(
            read_all(&store, offsets[77], Some(w.subscribe()))
                .await
                .unwrap(),
            want[77..]
        );
        let mut r = SegmentReader::open(&store, offsets[50], None);
        let rec = r.next().await.unwrap().unwrap();
        assert_eq!((rec.offset, rec.next_offset), (offsets[50], offsets[51]));
    }

    #[tokio::test]
    async fn torn_tail_is_cut_and_writing_continues() {
        let dir = tempfile::tempdir().unwrap();
        let store = dir.path().join("s");
        let mut w = SegmentWriter::create(&store, SegmentOptions::default()).unwrap();
        for i in 0..50 {
            w.append(&hdr(i), &payload(i)).unwrap();
        }
        let good = w.commit().unwrap();
        drop(w);
        let seg = segment_path(&store, 0);
        // A crash mid-write: half a record at the end.
        let mut rec = Vec::new();
        encode_record(&mut rec, &hdr(50), &payload(50)).unwrap();
        let mut f = OpenOptions::new().append(true).open(&seg).unwrap();
        f.write_all(&rec[..rec.len() / 2]).unwrap();
        drop(f);
        // Unbounded reading of the damaged file reports it.
        assert!(matches!(
            read_all(&store, 0, None).await,
            Err(SegmentError::Corrupt { .. })
        ));

        let (mut w, r) = SegmentWriter::open(&store, SegmentOptions::default()).unwrap();
        assert_eq!(r.bytes, good.bytes);
        assert_eq!(r.records, 50);
        assert_eq!(r.payload_bytes, good.payload_bytes);
        assert_eq!(r.truncated_bytes, (rec.len() / 2) as u64);
        assert_eq!(fs::metadata(&seg).unwrap().len(), good.bytes);
        assert_eq!(read_all(&store, 0, None).await.unwrap(), expected(0..50));

        // The reopened writer continues after the last good record.
        for i in 50..60 {
            w.append(&hdr(i), &payload(i)).unwrap();
        }
        w.finish().unwrap();
        assert_eq!(read_all(&store, 0, None).await.unwrap(), expected(0..60));

        // Garbage (not a record at all) after the good data is cut the same way.
        let mut f = OpenOptions::new().append(true).open(&seg).unwrap();
        f.write_all(&[0xff; 100]).unwrap();
        drop(f);
        let r = recover(&store).unwrap();
        assert_eq!((r.records, r.truncated_bytes), (60, 100));
        assert_eq!(read_all(&store, 0, None).await.unwrap(), expected(0..60));
    }

    #[tokio::test]
    async fn corruption_is_detected_and_recovery_cuts_there() {
        let dir = tempfile::tempdir().unwrap();
        let store = dir.path().join("s");
        let opts = SegmentOptions {
            segment_bytes: 2000,
            ..SegmentOptions::default()
        };
        let mut w = SegmentWriter::create(&store, opts).unwrap();
        let mut offsets = Vec::new();
        let mut at = 0u64;
        for i in 0..100 {
            offsets.push(at);
            w.append(&hdr(i), &payload(i)).unwrap();
            at += (HEADER_LEN + payload(i).len()) as u64;
        }
        w.finish().unwrap();
        let segs = seg_files(&store);
        assert!(segs.len() >= 3);
        // Flip a payload byte of a record in the second segment.
        let (base, _) = segs[1];
        let victim = (0..100)
            .find(|i| offsets[*i] > base && payload(*i as u32).len() > 4)
            .unwrap();
        let path = segment_path(&store, base);
        let mut data = fs::read(&path).unwrap();
        let idx = (offsets[victim] - base) as usize + HEADER_LEN + 2;
        data[idx] ^= 0x40;
        fs::write(&path, &data).unwrap();

        let mut r = SegmentReader::open(&store, 0, None);
        let mut n = 0;
        let err = loop {
            match r.next().await {
                Ok(Some(_)) => n += 1,
                Ok(None) => panic!("corruption not detected"),
                Err(e) => break e,
            }
        };
        assert_eq!(n, victim);
        assert!(
            matches!(err, SegmentError::Corrupt { offset, reason: "checksum mismatch" } if offset == offsets[victim])
        );

        let rec = recover(&store).unwrap();
        assert_eq!(rec.records, victim as u64);
        assert_eq!(rec.bytes, offsets[victim]);
        assert_eq!(rec.orphaned_segments, segs.len() - 2);
        assert_eq!(
            read_all(&store, 0, None).await.unwrap(),
            expected(0..victim as u32)
        );
        let orphans = fs::read_dir(&store)
            .unwrap()
            .filter(|e| {
                e.as_ref()
                    .unwrap()
                    .file_name()
                    .to_string_lossy()
                    .ends_with(".orphan")
            })
            .count();
        assert_eq!(orphans, segs.len() - 2);
    }

    #[tokio::test]
    async fn live_tail_sees_commits_and_ends_at_finish() {
        let dir = tempfile::tempdir().unwrap();
        let store = dir.path().join("s");
        let opts = SegmentOptions {
            segment_bytes: 1500,
            ..SegmentOptions::default()
        };
        let mut w = SegmentWriter::create(&store, opts).unwrap();
        let rx = w.subscribe();
        let (seen_tx, mut seen_rx) = mpsc::unbounded_channel();
        let reader_store = store.clone();
        let reader = tokio::spawn(async move {
            let mut r = SegmentReader::open(&reader_store, 0, Some(rx));
            let mut n = 0u32;
            while let Some(rec) = r.next().await.unwrap() {
                assert_eq!(rec.header, hdr(n));
                assert_eq!(rec.payload, payload(n).as_slice());
                n += 1;
                seen_tx.send(n).unwrap();
            }
            n
        });
        async fn wait_for(rx: &mut mpsc::UnboundedReceiver<u32>, want: u32) -> u32 {
            let mut last = 0;
            while last < want {
                last = tokio::time::timeout(Duration::from_secs(5), rx.recv())
                    .await
                    .expect("reader stalled")
                    .unwrap();
            }
            last
        }
        let mut i = 0u32;
        for step in [1u32, 5, 20, 3, 40] {
            for _ in 0..step {
                w.append(&hdr(i), &payload(i)).unwrap();
                i += 1;
            }
            // Appended but uncommitted data is not visible.
            tokio::time::sleep(Duration::from_millis(20)).await;
            assert!(seen_rx.try_recv().is_err());
            w.commit().unwrap();
            assert_eq!(wait_for(&mut seen_rx, i).await, i);
        }
        assert!(!reader.is_finished());
        w.append(&hdr(i), &payload(i)).unwrap();
        w.finish().unwrap();
        let n = tokio::time::timeout(Duration::from_secs(5), reader)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(n, i + 1);
    }

    #[tokio::test]
    async fn pipeline_end_to_end() {
        let dir = tempfile::tempdir().unwrap();
        let store = dir.path().join("s");
        let w = SegmentWriter::create(
            &store,
            SegmentOptions {
                segment_bytes: 4096,
                ..SegmentOptions::default()
            },
        )
        .unwrap();
        let opts = PipelineOptions {
            batch_bytes: 1024,
            commit_interval: Duration::from_millis(60),
            queue_depth: 2,
            max_buffered_bytes: 1 << 20,
        };
        let (mut ingest, task) = pipeline(w, opts);
        let rx = task.subscribe();
        let writer = tokio::spawn(task.run());
        let reader_store = store.clone();
        let reader = tokio::spawn(async move { read_all(&reader_store, 0, Some(rx)).await });
        let mut payload_total = 0;
        for i in 0..500 {
            ingest.push(&hdr(i), &payload(i)).unwrap();
            payload_total += payload(i).len() as u64;
            if i % 50 == 0 {
                tokio::task::yield_now().await;
            }
        }
        let stats = ingest.close().await.unwrap();
        assert_eq!((stats.packets, stats.payload_bytes), (500, payload_total));
        let st = writer.await.unwrap().unwrap();
        assert!(st.finished);
        assert_eq!((st.records, st.payload_bytes), (500, payload_total));
        let got = reader.await.unwrap().unwrap();
        assert_eq!(got, expected(0..500));
        assert_eq!(recover(&store).unwrap().records, 500);
    }

    #[tokio::test]
    async fn ingest_commits_aged_batches_and_reports_a_dead_writer() {
        let dir = tempfile::tempdir().unwrap();
        let store = dir.path().join("s");
        let w = SegmentWriter::create(&store, SegmentOptions::default()).unwrap();
        let (mut ingest, task) = pipeline(w, PipelineOptions::default());
        let mut rx = task.subscribe();
        let writer = tokio::spawn(task.run());
        // Packets 20 ms apart (by arrival time): the second one ages the batch out.
        ingest.push(&hdr(0), &payload(0)).unwrap();
        ingest.push(&hdr(1), &payload(1)).unwrap();
        tokio::time::timeout(Duration::from_secs(5), rx.wait_for(|s| s.records == 2))
            .await
            .unwrap()
            .unwrap();
        // A quiet stream is committed by the timer's flush.
        ingest.push(&hdr(1), &payload(1)).unwrap();
        ingest.flush().unwrap();
        tokio::time::timeout(Duration::from_secs(5), rx.wait_for(|s| s.records == 3))
            .await
            .unwrap()
            .unwrap();
        writer.abort();
        let _ = writer.await;
        // Noticed at the next hand-off, not per packet.
        ingest.push(&hdr(5), &payload(5)).unwrap();
        assert!(matches!(ingest.flush(), Err(IngestError::WriterClosed)));
    }

    #[tokio::test]
    async fn deferred_sync_commits_are_readable_and_survive_a_killed_writer() {
        let dir = tempfile::tempdir().unwrap();
        let store = dir.path().join("s");
        let opts = SegmentOptions {
            segment_bytes: 4096,
            durability: Durability::AtSegmentEnd,
        };
        let mut w = SegmentWriter::create(&store, opts).unwrap();
        for i in 0..100 {
            w.append(&hdr(i), &payload(i)).unwrap();
            if i % 10 == 9 {
                let st = w.commit().unwrap();
                assert_eq!(st.records, u64::from(i) + 1);
            }
        }
        // Appended after the last commit: not promised to anyone.
        w.append(&hdr(100), &payload(100)).unwrap();
        let committed = w.subscribe().borrow().bytes;
        // The process dies here: no finish, no sync of the open segment. What was written
        // is in the kernel and recovery finds every committed record (and only those).
        drop(w);
        let r = recover(&store).unwrap();
        assert_eq!(r.records, 100);
        assert_eq!(r.bytes, committed);
        let back = read_all(&store, 0, None).await.unwrap();
        assert_eq!(back.len(), 100);
        for (i, (h, p)) in back.iter().enumerate() {
            assert_eq!(*h, hdr(i as u32));
            assert_eq!(*p, payload(i as u32));
        }
    }

    #[test]
    fn recover_missing_and_empty() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(
            recover(&dir.path().join("nope")).unwrap(),
            Recovered::default()
        );
        // A segment created but never written (crash right after rollover) is dropped.
        fs::write(segment_path(dir.path(), 0), b"").unwrap();
        let r = recover(dir.path()).unwrap();
        assert_eq!(r, Recovered::default());
        assert!(list_segments(dir.path()).unwrap().is_empty());
    }

    /// The log thread's two ways in: a record appended directly lands after the batches taken
    /// before it, and a bad batch found by `take_queued` ends the log at the next pump with the
    /// error (what was committed before stays; nothing after it is appended).
    #[test]
    fn direct_records_follow_taken_batches_and_a_bad_batch_ends_the_log() {
        let dir = tempfile::tempdir().unwrap();
        let w = SegmentWriter::create(dir.path(), SegmentOptions::default()).unwrap();
        let (mut ingest, mut task) = pipeline(w, PipelineOptions::default());
        ingest.push(&hdr(1), &[1; 160]).unwrap();
        ingest.flush().unwrap();
        task.take_queued();
        task.append_record(&hdr(2), &[2; 160]);
        assert!(matches!(task.pump(), Pumped::Open));
        assert_eq!(task.subscribe().borrow().records, 2);
        // A batch that does not frame (as no Ingest makes one), then one more direct record.
        ingest.tx.try_send(vec![0xff; 7]).unwrap();
        task.take_queued();
        task.append_record(&hdr(3), &[3; 160]);
        match task.pump() {
            Pumped::Finished(Err(SegmentError::BadBatch)) => {}
            other => panic!("{other:?}"),
        }
        let tail = *task.subscribe().borrow();
        assert_eq!((tail.records, tail.payload_bytes), (2, 320));
    }
}
