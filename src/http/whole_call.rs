//! Whole-call downloads of a recorded call (`GET /v1/stores/{id}/media?call=both`, issue 13
//! item 5): with `[media] record_calls` each call leaves two `call-recording` stores, one per
//! direction (`direction` `a` = leg A to leg B, `b` = back), sharing leg A's Call-ID. Asked on
//! either of them, `call=both` serves the call as one file:
//!
//! - `format=pcap`: both legs' SIP INVITE/200 (each on the addresses, ports and Call-ID that
//!   leg really used, [`media::StoreCapture`]) and both directions' RTP merged by arrival
//!   time, so `tshark -Y rtp` shows the two streams without "Decode As";
//! - `format=wav`: 16-bit PCM stereo at 8000 Hz, leg A's audio left and leg B's right, G.711
//!   decoded, each direction placed on the call's timeline by arrival time ([`media::Lane`]:
//!   silence where a side sent nothing, jitter absorbed).
//!
//! The caller needs the media access of section 2.5 to *both* stores (the admin, the owner;
//! a download token opens only its own direction). The call must have ended (both stores
//! finished): until then `503 not-ready` with `Retry-After`. Each direction's own download
//! is unchanged.
//!
//! The stores are finished, so the logs are read from disk without following a tail; the WAV
//! reads them three times (first arrivals, length for the header, frames), each a sequential
//! scan, and holds one packet per direction in memory.

use std::io;
use std::path::PathBuf;
use std::sync::Arc;

use axum::body::Bytes;
use tokio::sync::mpsc;

use super::errors::ApiError;
use super::media::{self, Lane, Law, MediaFormat, Placed, StoreCapture};
use super::stores::{body_from, check_access, media_response, storage_error, Need};
use super::HttpState;
use crate::error_code::ErrorCode;
use crate::http::auth::Caller;
use crate::storage::objects::chunks::ChunkSource;
use crate::storage::objects::Objects;
use crate::storage::segments::{RecordHeader, SegmentError, SegmentReader};
use crate::storage::stores::{store_dir, Direction, Store, StoreKind, StoreState};

/// Body bytes gathered before a chunk goes out.
const CHUNK: usize = 64 * 1024;

type Tx = mpsc::Sender<Result<Bytes, io::Error>>;

/// The call's two stores, leg A's direction first, after the access and state checks.
async fn both_directions(
    state: &HttpState,
    caller: &Caller,
    store: Store,
) -> Result<[Store; 2], ApiError> {
    if store.kind != StoreKind::CallRecording || store.direction.is_none() {
        return Err(ApiError::bad_request(
            "call=both is for the stores of a recorded call (those with a direction)",
        ));
    }
    let other = state
        .stores
        .recording_sibling(&store)
        .await?
        .ok_or_else(|| ApiError::not_found("the other direction of this call is gone"))?;
    if let Caller::Token(t) = caller {
        if !other.token_matches(t) {
            return Err(ApiError::forbidden(
                "a download token opens only its own direction: call=both needs the admin \
                 or the owner's credentials",
            ));
        }
    }
    check_access(state, caller, &other, Need::Media)?;
    let pair = if store.direction == Some(Direction::AToB) {
        [store, other]
    } else {
        [other, store]
    };
    for s in &pair {
        match s.state {
            StoreState::Complete | StoreState::Truncated => {}
            StoreState::Receiving => {
                return Err(ApiError::new(
                    ErrorCode::NotReady,
                    "the call is still being recorded: the whole call is served once it ends",
                )
                .with_retry_after(5))
            }
            st => {
                return Err(ApiError::new(
                    ErrorCode::NoData,
                    format!("store {} is {st}: it holds no data", s.id),
                ))
            }
        }
    }
    Ok(pair)
}

/// `?call=both` on a call recording's media. `store` passed the media check already.
pub(super) async fn download(
    state: Arc<HttpState>,
    caller: &Caller,
    store: Store,
    format: MediaFormat,
) -> Result<axum::response::Response, ApiError> {
    if format == MediaFormat::Raw {
        return Err(ApiError::bad_request(
            "call=both comes as format=pcap or format=wav",
        ));
    }
    let pair = both_directions(&state, caller, store).await?;
    let objects = state.live.objects();
    let dirs = [
        LogAt::new(&state.data_dir, objects, &pair[0].id)?,
        LogAt::new(&state.data_dir, objects, &pair[1].id)?,
    ];
    let (tx, rx) = mpsc::channel(8);
    let name = format!("{}-call", pair[0].id);
    match format {
        MediaFormat::Wav => {
            let law = |s: &Store| {
                s.format
                    .as_deref()
                    .and_then(media::g711_format_tag)
                    .and_then(Law::of_tag)
                    .ok_or_else(|| {
                        ApiError::new(
                            ErrorCode::UnsupportedFormat,
                            format!(
                                "the stereo WAV is for PCMU/PCMA calls; store {} holds {}",
                                s.id,
                                s.format.as_deref().unwrap_or("no format")
                            ),
                        )
                    })
            };
            let lanes = [
                LaneSpec {
                    dir: dirs[0].clone(),
                    pt: pair[0].payload_type,
                    law: law(&pair[0])?,
                },
                LaneSpec {
                    dir: dirs[1].clone(),
                    pt: pair[1].payload_type,
                    law: law(&pair[1])?,
                },
            ];
            tokio::spawn(async move { report(tx.clone(), stereo(lanes, &tx).await).await });
        }
        _ => {
            let caps = [StoreCapture::of(&pair[0]), StoreCapture::of(&pair[1])];
            let (fmt, pt) = (pair[0].format.clone(), pair[0].payload_type);
            tokio::spawn(async move {
                let r = pcap(dirs, caps, fmt.as_deref(), pt, &tx).await;
                report(tx.clone(), r).await
            });
        }
    }
    Ok(media_response(body_from(rx), format, &name))
}

/// Ends the body: cleanly, or broken on a read error (the client sees a broken transfer).
async fn report(tx: Tx, r: Result<(), SegmentError>) {
    if let Err(e) = r {
        let _ = storage_error(e);
        let _ = tx
            .send(Err(io::Error::other("store data unreadable")))
            .await;
    }
}

/// Sends `buf` once it holds [`CHUNK`] bytes (or always with `flush`); false when the client
/// went away.
async fn send(tx: &Tx, buf: &mut Vec<u8>, flush: bool) -> bool {
    if buf.is_empty() || (!flush && buf.len() < CHUNK) {
        return true;
    }
    let chunk = Bytes::from(std::mem::take(buf));
    tx.send(Ok(chunk)).await.is_ok()
}

async fn next_owned(
    r: &mut SegmentReader,
) -> Result<Option<(RecordHeader, Vec<u8>)>, SegmentError> {
    Ok(r.next()
        .await?
        .map(|rec| (rec.header, rec.payload.to_vec())))
}

/// Both legs' SIP, then both directions' packets merged by arrival time.
async fn pcap(
    dirs: [LogAt; 2],
    caps: [StoreCapture; 2],
    format: Option<&str>,
    pt: Option<u8>,
    tx: &Tx,
) -> Result<(), SegmentError> {
    let mut readers = [dirs[0].reader(), dirs[1].reader()];
    let mut next = [
        next_owned(&mut readers[0]).await?,
        next_owned(&mut readers[1]).await?,
    ];
    let start = next.iter().flatten().map(|(h, _)| h.arrival_us).min();
    let sessions = [caps[0].session.clone(), caps[1].session.clone()];
    let mut buf = media::pcap_preamble(&sessions, format, pt, start.unwrap_or(0));
    let mut ip_id: u16 = 0;
    loop {
        let i = match (&next[0], &next[1]) {
            (Some(a), Some(b)) => usize::from(b.0.arrival_us < a.0.arrival_us),
            (Some(_), None) => 0,
            (None, Some(_)) => 1,
            (None, None) => break,
        };
        if let Some((h, payload)) = next[i].take() {
            media::pcap_packet(&mut buf, caps[i].ends, &h, &payload, ip_id);
            ip_id = ip_id.wrapping_add(1);
        }
        next[i] = next_owned(&mut readers[i]).await?;
        if !send(tx, &mut buf, false).await {
            return Ok(());
        }
    }
    send(tx, &mut buf, true).await;
    Ok(())
}

/// Where one direction's log is read: this node's disk, or (media in a remote object store)
/// the store's chunks.
#[derive(Clone)]
struct LogAt {
    dir: PathBuf,
    chunks: Option<(Objects, String)>,
}

impl LogAt {
    fn new(
        data_dir: &std::path::Path,
        objects: Option<&Objects>,
        id: &str,
    ) -> Result<LogAt, ApiError> {
        Ok(LogAt {
            dir: store_dir(data_dir, id)?,
            chunks: objects.map(|o| (Arc::clone(o), id.to_string())),
        })
    }

    #[cfg(test)]
    fn local(dir: PathBuf) -> LogAt {
        LogAt { dir, chunks: None }
    }

    fn reader(&self) -> SegmentReader {
        match &self.chunks {
            Some((o, id)) => {
                SegmentReader::from_objects(ChunkSource::new(Arc::clone(o), id, false, None), 0)
            }
            None => SegmentReader::open(&self.dir, 0, None),
        }
    }
}

/// One direction of the stereo WAV: its log, the payload type that is audio, its law.
struct LaneSpec {
    dir: LogAt,
    pt: Option<u8>,
    law: Law,
}

/// Reads one direction's audio packets in order, placing each on the call's timeline.
struct LaneReader {
    reader: SegmentReader,
    lane: Lane,
    pt: Option<u8>,
    law: Law,
    /// The packet covering (or next after) the current output position.
    cur: Option<Placed>,
    done: bool,
}

impl LaneReader {
    fn open(spec: &LaneSpec) -> LaneReader {
        LaneReader {
            reader: spec.dir.reader(),
            lane: Lane::default(),
            pt: spec.pt,
            law: spec.law,
            cur: None,
            done: false,
        }
    }

    /// The next audio packet's arrival and payload (a telephone-event is not audio).
    async fn next_audio(&mut self) -> Result<Option<(u64, Vec<u8>)>, SegmentError> {
        let pt = self.pt;
        loop {
            match self.reader.next().await? {
                None => return Ok(None),
                Some(r) if pt.is_some_and(|p| p != r.header.payload_type) => {}
                Some(r) if r.payload.is_empty() => {}
                Some(r) => return Ok(Some((r.header.arrival_us, r.payload.to_vec()))),
            }
        }
    }

    /// Moves to the next packet (or to the end).
    async fn advance(&mut self, t0: u64) -> Result<(), SegmentError> {
        match self.next_audio().await? {
            Some((arrival, payload)) => {
                let law = self.law;
                let samples: Vec<i16> = payload
                    .iter()
                    .map(|b| media::g711_decode(law, *b))
                    .collect();
                let start = self.lane.place(t0, arrival, samples.len() as u64);
                self.cur = Some(Placed { start, samples });
            }
            None => {
                self.cur = None;
                self.done = true;
            }
        }
        Ok(())
    }
}

/// The first audio arrival of a direction (None: it sent no audio).
async fn first_arrival(spec: &LaneSpec) -> Result<Option<u64>, SegmentError> {
    let mut r = LaneReader::open(spec);
    Ok(r.next_audio().await?.map(|(t, _)| t))
}

/// Where a direction's audio ends on the call's timeline.
async fn lane_end(spec: &LaneSpec, t0: u64) -> Result<u64, SegmentError> {
    let mut r = LaneReader::open(spec);
    while let Some((arrival, payload)) = r.next_audio().await? {
        r.lane.place(t0, arrival, payload.len() as u64);
    }
    Ok(r.lane.cursor)
}

/// The stereo WAV: header with the real length, then the frames, leg A left.
async fn stereo(specs: [LaneSpec; 2], tx: &Tx) -> Result<(), SegmentError> {
    let firsts = [
        first_arrival(&specs[0]).await?,
        first_arrival(&specs[1]).await?,
    ];
    let t0 = firsts.iter().flatten().min().copied().unwrap_or(0);
    let frames = lane_end(&specs[0], t0)
        .await?
        .max(lane_end(&specs[1], t0).await?);
    let mut buf = media::stereo_wav_header(frames).to_vec();
    let mut lanes = [LaneReader::open(&specs[0]), LaneReader::open(&specs[1])];
    let mut pos = 0u64;
    while pos < frames {
        for l in lanes.iter_mut() {
            while !l.done && l.cur.as_ref().is_none_or(|c| c.end() <= pos) {
                l.advance(t0).await?;
            }
        }
        // Up to the next packet boundary of either lane: within it each lane is one packet
        // or silence.
        let mut to = frames.min(pos + (CHUNK / media::STEREO_FRAME) as u64);
        for c in lanes.iter().filter_map(|l| l.cur.as_ref()) {
            to = to.min(if pos < c.start { c.start } else { c.end() });
        }
        media::put_frames(
            &mut buf,
            pos,
            to,
            lanes[0].cur.as_ref(),
            lanes[1].cur.as_ref(),
        );
        pos = to;
        if !send(tx, &mut buf, false).await {
            return Ok(());
        }
    }
    send(tx, &mut buf, true).await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::segments::{SegmentOptions, SegmentWriter};
    use std::path::Path as FsPath;

    fn write_log(dir: &FsPath, packets: &[(u64, u8, Vec<u8>)]) {
        let mut w = SegmentWriter::create(dir, SegmentOptions::default()).unwrap();
        for (i, (at, pt, payload)) in packets.iter().enumerate() {
            let h = RecordHeader {
                arrival_us: *at,
                seq: i as u16,
                timestamp: 160 * i as u32,
                ssrc: 1,
                payload_type: *pt,
                marker: false,
            };
            w.append(&h, payload).unwrap();
        }
        w.commit().unwrap();
    }

    /// Leg A talks from the start (ulaw 0x00 = -32124), leg B starts 200 ms later (0x80 =
    /// 32124) with a telephone-event that is not audio; the WAV has A left and B right.
    #[tokio::test]
    async fn stereo_places_each_direction_by_arrival() {
        let tmp = tempfile::tempdir().unwrap();
        let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
        std::fs::create_dir_all(&a).unwrap();
        std::fs::create_dir_all(&b).unwrap();
        let t0 = 1_000_000_000;
        write_log(
            &a,
            &(0..5)
                .map(|i| (t0 + 20_000 * i, 0, vec![0x00; 160]))
                .collect::<Vec<_>>(),
        );
        write_log(
            &b,
            &[
                (t0 + 200_000, 101, vec![1, 2, 3, 4]),
                (t0 + 200_000, 0, vec![0x80; 160]),
                (t0 + 220_000, 0, vec![0x80; 160]),
            ],
        );
        let specs = [
            LaneSpec {
                dir: LogAt::local(a),
                pt: Some(0),
                law: Law::Mu,
            },
            LaneSpec {
                dir: LogAt::local(b),
                pt: Some(0),
                law: Law::Mu,
            },
        ];
        let (tx, mut rx) = mpsc::channel(64);
        stereo(specs, &tx).await.unwrap();
        drop(tx);
        let mut wav = Vec::new();
        while let Some(c) = rx.recv().await {
            wav.extend_from_slice(&c.unwrap());
        }
        assert_eq!(&wav[..4], b"RIFF");
        let frames: Vec<(i16, i16)> = wav[media::STEREO_HEADER_LEN..]
            .chunks(4)
            .map(|f| {
                (
                    i16::from_le_bytes([f[0], f[1]]),
                    i16::from_le_bytes([f[2], f[3]]),
                )
            })
            .collect();
        // B ends at 200 ms + 2 packets = 1600 + 320 samples.
        assert_eq!(frames.len(), 1920);
        assert!(frames[..800].iter().all(|f| *f == (-32124, 0)));
        assert!(frames[800..1600].iter().all(|f| *f == (0, 0)));
        assert!(frames[1600..].iter().all(|f| *f == (0, 32124)));
    }
}
