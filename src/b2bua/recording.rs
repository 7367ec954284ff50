//! Whole-call recording (PROTOCOL.md §1 last bullet, §5 "Recorded calls"): with
//! `[media] record_calls = true`, both directions of every answered call are written through
//! the store path of section 2, one `call-recording` store per direction, owned by the
//! callee's account when it has one, else by the operator (no quota).
//!
//! The service reacts to engine events like the store service: on `CallAnswered` a task
//! creates and starts the two stores, opens their logs and sends [`Command::Attach`] back to
//! the core, which hands the ingest ends to the call's relay ([`RelayMedia::record`]). The
//! relay pushes every relayed RTP packet into its direction's log and closes the logs when it
//! stops; each store's writer task then finishes the store `complete` with its payload bytes.
//!
//! Each store is marked with its direction (`a`: leg A's audio towards B, `b`: back) and the
//! ends of the leg the audio came in on (that leg's SIP addresses and Call-ID, its RTP source
//! and callvault's relay port), so downloads can rebuild the call's SIP and put the two
//! directions together (`http::whole_call`).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use thiserror::Error;
use tokio::sync::{mpsc, oneshot, watch};

use super::engine::{Engine, EngineEvent, LegEnds};
use super::media::{CallKey, MediaBackend, RelayMedia};
use crate::media::relay::{RecordCounters, RecordSinks};
use crate::storage::accounts::Accounts;
use crate::storage::live::LiveStores;
use crate::storage::log_thread::{LogThread, RecordSource};
use crate::storage::objects::chunks::{spawn_uploader, Uploader};
use crate::storage::segments::{
    pipeline, Durability, Ingest, PipelineOptions, SegmentError, SegmentOptions, SegmentWriter,
    TailState,
};
use crate::storage::session::effects;
use crate::storage::session::{self, IngestEnd, Input, SessionConfig, Snapshot, StoreSession};
use crate::storage::stores::{
    store_dir, Direction, NewStore, SessionEnds, StartSession, StoreError, StoreKind, StoreState,
    Stores,
};
use crate::storage::threshold::{Resolved, Threshold};

/// Used when the answer's codec cannot be read.
pub(crate) const DEFAULT_FORMAT: (&str, u8) = ("PCMU/8000", 0);
/// How long a recording store id may wait for its session (it starts at once).
const STORE_TTL: Duration = Duration::from_secs(60);
/// A recording's batch is handed to the log writer this long after its first packet at most,
/// and the writer thread writes every log once per [`LOG_TICK`]: a recording is readable live
/// about a second behind. Longer than an in-call store's 20 ms: nobody waits on a
/// recording's threshold, and thousands of recorded directions share one writer thread.
pub(crate) const RECORD_COMMIT_INTERVAL: Duration = Duration::from_secs(1);
pub(crate) const LOG_TICK: Duration = Duration::from_millis(250);
/// A recording's batch is handed off at this size at the latest (a second of G.711 is 9.5 KiB
/// of records).
const RECORD_BATCH_BYTES: usize = 16 * 1024;

/// Log settings of a recording: synced at segment ends and at the end of the call, not at
/// every commit (see [`Durability::AtSegmentEnd`]).
fn record_log_options() -> (SegmentOptions, PipelineOptions) {
    (
        SegmentOptions {
            durability: Durability::AtSegmentEnd,
            ..SegmentOptions::default()
        },
        PipelineOptions {
            commit_interval: RECORD_COMMIT_INTERVAL,
            // The relay hands its batch over every 100 ms (about 1 KiB of G.711), and with the
            // kernel path it records only a direction's first packets: small buffers, of which
            // each recorded call keeps several for its whole length (docs/BENCHMARKS.md).
            batch_bytes: RECORD_BATCH_BYTES,
            ..PipelineOptions::default()
        },
    )
}

#[derive(Debug, Error)]
pub(crate) enum RecordingError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("store log: {0}")]
    Log(String),
}

/// Sent by recording tasks to the core.
#[derive(Debug)]
pub(crate) enum Command {
    /// The logs of a call are open: hand them to the call's relay.
    Attach { call: CallKey, sinks: RecordSinks },
}

fn user_of(aor: &str) -> &str {
    aor.split('@').next().unwrap_or(aor)
}

#[derive(Clone)]
struct Ctx {
    data_dir: PathBuf,
    accounts: Accounts,
    stores: Stores,
    live: Arc<LiveStores>,
    commands: mpsc::UnboundedSender<Command>,
    counters: Arc<RecordCounters>,
    /// Writes every recording's log.
    logs: LogThread,
    /// Set at a clean shutdown: recordings then end `truncated`.
    stop: Arc<watch::Sender<bool>>,
}

/// The recording side of the core; exists only when `record_calls` is on.
pub(crate) struct RecordingService {
    ctx: Ctx,
}

impl RecordingService {
    pub(crate) fn new(
        data_dir: PathBuf,
        accounts: Accounts,
        stores: Stores,
        live: Arc<LiveStores>,
        kernel: Option<&crate::media::kernel::KernelPath>,
    ) -> std::io::Result<(RecordingService, mpsc::UnboundedReceiver<Command>)> {
        // With the kernel fast path, the writer thread also drains its recording ring, and
        // recorded directions can be forwarded and recorded in the kernel.
        let ring = kernel
            .and_then(|k| k.take_ring())
            .map(|r| Box::new(r) as Box<dyn RecordSource>);
        let (tx, rx) = mpsc::unbounded_channel();
        let ctx = Ctx {
            data_dir,
            accounts,
            stores,
            live,
            commands: tx,
            counters: Arc::new(RecordCounters::default()),
            logs: LogThread::start("cv-record-logs", LOG_TICK, ring)?,
            stop: Arc::new(watch::channel(false).0),
        };
        Ok((RecordingService { ctx }, rx))
    }

    /// Starts recording a call when it is answered.
    pub(crate) fn on_event<M: MediaBackend>(&mut self, engine: &Engine<M>, ev: &EngineEvent) {
        let EngineEvent::CallAnswered(call) = ev else {
            return;
        };
        let Some((caller, callee)) = engine.call_parties(*call) else {
            return;
        };
        let (call_id, format) = engine.call_facts(*call).unzip();
        let job = Job {
            call: *call,
            caller,
            callee,
            call_id,
            format: format.flatten(),
            legs: engine.call_leg_ends(*call),
        };
        let ctx = self.ctx.clone();
        tokio::spawn(async move { start(ctx, job).await });
    }

    /// A clean shutdown: every recording in progress ends `truncated` when its call is hung up.
    pub(crate) fn shutdown(&self) {
        let _ = self.ctx.stop.send(true);
    }

    /// Applies a command to the relays.
    pub(crate) fn apply(&mut self, media: &mut RelayMedia, cmd: Command) {
        match cmd {
            Command::Attach { call, sinks } => {
                if !media.record(call, sinks, self.ctx.counters.clone()) {
                    tracing::debug!(call, "call gone before its recording started");
                }
            }
        }
    }
}

struct Job {
    call: CallKey,
    caller: String,
    callee: String,
    call_id: Option<String>,
    format: Option<(String, u8)>,
    /// Leg A's and leg B's ends (None: the call was gone).
    legs: Option<[LegEnds; 2]>,
}

/// What a direction's store records of the leg its audio came in on.
fn session_ends(leg: &LegEnds) -> SessionEnds {
    SessionEnds {
        rtp_source: leg.rtp_remote,
        rtp_local: leg.rtp_local,
        sip_remote: Some(leg.sip_remote),
        sip_local: Some(leg.sip_local),
        sip_call_id: Some(leg.call_id.clone()),
    }
}

async fn start(ctx: Ctx, job: Job) {
    // The callee's account owns the recording when there is one.
    let owner = match ctx.accounts.get(user_of(&job.callee)).await {
        Ok(Some(a)) => Some(a.user),
        Ok(None) => None,
        Err(e) => {
            tracing::warn!(error = %e, "recording owner lookup failed; operator owns it");
            None
        }
    };
    let mut sinks = RecordSinks::default();
    let mut kernel_ids = [0u32; 2];
    for (direction, sender, receiver, slot) in [
        (Direction::AToB, &job.caller, &job.callee, &mut sinks.from_a),
        (Direction::BToA, &job.callee, &job.caller, &mut sinks.from_b),
    ] {
        let dir = Dir {
            direction,
            sender,
            receiver,
        };
        match open_direction(&ctx, &job, dir, owner.clone()).await {
            Ok((ingest, kernel_id)) => {
                *slot = Some(ingest);
                kernel_ids[match direction {
                    Direction::AToB => 0,
                    Direction::BToA => 1,
                }] = kernel_id.unwrap_or(0);
            }
            Err(e) => tracing::warn!(call = job.call, error = %e, "call recording not started"),
        }
    }
    sinks.kernel_ids = kernel_ids;
    if sinks.from_a.is_some() || sinks.from_b.is_some() {
        let _ = ctx.commands.send(Command::Attach {
            call: job.call,
            sinks,
        });
    }
}

/// One direction of a call: which, and who speaks to whom.
#[derive(Clone, Copy)]
struct Dir<'a> {
    direction: Direction,
    sender: &'a str,
    receiver: &'a str,
}

/// Creates and starts one direction's store and opens its log; the writer task finishing the
/// store is running when this returns.
async fn open_direction(
    ctx: &Ctx,
    job: &Job,
    dir: Dir<'_>,
    owner: Option<String>,
) -> Result<(Ingest, Option<u32>), RecordingError> {
    let Dir {
        direction,
        sender,
        receiver,
    } = dir;
    let now = SystemTime::now();
    let store = ctx
        .stores
        .create(
            NewStore {
                kind: StoreKind::CallRecording,
                sender: sender.to_string(),
                receiver: receiver.to_string(),
                owner,
                call_id: job.call_id.clone(),
                // Readable (live) from the first packet.
                threshold: Threshold::Bytes(0),
                ttl: STORE_TTL,
            },
            now,
        )
        .await?;
    let (format, pt) = match &job.format {
        Some((f, pt)) => (f.as_str(), *pt),
        None => DEFAULT_FORMAT,
    };
    ctx.stores
        .start_session(
            &store.id,
            &StartSession {
                caller: sender,
                format,
                payload_type: pt,
                declared_bytes: None,
                reserve_bytes: 0,
                threshold_bytes: Some(0),
            },
            now,
        )
        .await?;
    // Marks for the downloads; a failure costs them the direction, not the recording.
    let leg = job.legs.as_ref().map(|l| match direction {
        Direction::AToB => &l[0],
        Direction::BToA => &l[1],
    });
    if let Err(e) = ctx.stores.set_direction(&store.id, direction).await {
        tracing::warn!(store = %store.id, error = %e, "recording direction not noted");
    }
    if let Some(leg) = leg {
        if let Err(e) = ctx
            .stores
            .set_session_ends(&store.id, &session_ends(leg))
            .await
        {
            tracing::warn!(store = %store.id, error = %e, "recording addresses not noted");
        }
    }
    let (log_options, pipeline_options) = record_log_options();
    let opened = store_dir(&ctx.data_dir, &store.id)
        .map_err(RecordingError::from)
        .and_then(|dir| {
            SegmentWriter::create(&dir, log_options).map_err(|e| RecordingError::Log(e.to_string()))
        });
    let writer = match opened {
        Ok(w) => w,
        Err(e) => {
            let _ = ctx
                .stores
                .finish(&store.id, StoreState::Rejected, 0, SystemTime::now())
                .await;
            return Err(e);
        }
    };
    let (ingest, task) = pipeline(writer, pipeline_options);
    ctx.live.insert(&store.id, task.subscribe());
    if let Err(e) = ctx.stores.mark_threshold(&store.id, now).await {
        tracing::debug!(error = %e, "recording threshold not noted");
    }
    let tail = task.subscribe();
    // With a remote object store the log is the write-ahead; chunks go up off the relay.
    let uploader = match (ctx.live.objects(), store_dir(&ctx.data_dir, &store.id)) {
        (Some(o), Ok(dir)) => Some(spawn_uploader(
            Arc::clone(o),
            store.id.clone(),
            dir,
            task.subscribe(),
        )),
        _ => None,
    };
    let adopted = ctx
        .logs
        .adopt(task)
        .map_err(|e| RecordingError::Log(e.to_string()))?;
    // The operator's and the callee's recordings alike reserve nothing: a call is recorded
    // whole, and its bytes are charged when it ends (no limit stops a call mid-way).
    let admitted = session::admit(&Snapshot {
        store: Some(&store),
        wall: now,
        caller: Some(sender),
        offer: Ok(()),
        declared: None,
        free_bytes: None,
    })
    .map_err(|r| RecordingError::Log(r.to_string()))?;
    let cfg = SessionConfig {
        admitted,
        resolved: Resolved::Fixed(0),
        playout_rate: None,
        silence_timeout: None,
    };
    let machine = StoreSession::start(cfg, std::time::Instant::now());
    tokio::spawn(finish_when_done(
        ctx.clone(),
        store.id,
        machine,
        tail,
        adopted.end,
        uploader,
    ));
    Ok((ingest, adopted.kernel_id))
}

/// The recording's ingest adapter of [`StoreSession`]: feeds it the log's commits, a
/// shutdown, and the end (the relay closed the log and the writer thread wrote it), and runs
/// its effects; the machine settles the store.
async fn finish_when_done(
    ctx: Ctx,
    id: String,
    mut machine: StoreSession,
    mut tail: watch::Receiver<TailState>,
    mut end: oneshot::Receiver<Result<TailState, SegmentError>>,
    uploader: Option<Uploader>,
) {
    let mut stop = ctx.stop.subscribe();
    let mut stopping = false;
    let mut tail_open = true;
    let (how, stored) = loop {
        let input = tokio::select! {
            written = &mut end => break match written {
                Ok(Ok(t)) => (IngestEnd::Done, t.payload_bytes),
                Ok(Err(e)) => {
                    tracing::warn!(store = %id, error = %e, "call recording cut short");
                    (IngestEnd::StorageFailed, machine.committed())
                }
                Err(_) => {
                    tracing::warn!(store = %id, "call recording cut short: log writer stopped");
                    (IngestEnd::StorageFailed, machine.committed())
                }
            },
            changed = tail.changed(), if tail_open => match changed {
                Ok(()) => {
                    let n = tail.borrow_and_update().payload_bytes;
                    Input::Committed(n)
                }
                Err(_) => { tail_open = false; continue; }
            },
            _ = async { drop(stop.wait_for(|s| *s).await) }, if !stopping => {
                stopping = true;
                Input::Shutdown
            }
        };
        machine.handle(input, std::time::Instant::now());
        // A recording sends no ready note and cannot stop its relay (the call's end does).
        // Boxed: the database calls' state would otherwise be part of this task for the
        // whole call (two per recorded call, thousands at a time).
        let _ = Box::pin(effects::run(&mut machine, &ctx.stores, &id)).await;
    };
    // Settled in the database only once the media is all in the object store.
    if let Some(u) = uploader {
        if let Err(e) = Box::pin(u.finish()).await {
            tracing::error!(store = %id, error = %e, "recording media not uploaded");
        }
    }
    machine.handle(
        Input::IngestEnded { how, stored },
        std::time::Instant::now(),
    );
    let _ = Box::pin(effects::run(&mut machine, &ctx.stores, &id)).await;
    ctx.live.remove(&id);
    tracing::info!(store = %id, bytes = stored, phase = ?machine.phase(), "call recording ended");
}
