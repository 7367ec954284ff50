//! Store sessions (steps 21–23, 31/32: INVITE to the store URI, RTP into the segment log,
//! threshold, ready note) and play sessions (332/333: INVITE to the play URI, the stored
//! packets streamed from the start, following the live tail). One task per session; the
//! engine's session events reach it through a [`Runtime`].
//!
//! Observability (issue 3 item 8): each task runs in a `store_session` or `play_session`
//! tracing span carrying `store_id`, `sender` and `receiver` (the last two recorded once the
//! store is looked up), so every log line of the session, the refusal included, names its
//! store. Metrics: `callvault_store_sessions_active` / `callvault_play_sessions_active` are
//! held up by a [`GaugeGuard`] for the life of the session (every exit path lowers them);
//! `callvault_play_sessions_total` counts accepted play sessions;
//! `callvault_threshold_seconds` is observed for every threshold event, the one a finishing
//! store reports included; `callvault_prompt_to_first_packet_seconds` runs from the store's
//! creation (request.rs creates it and sends the prompt right after, one account read apart)
//! to the first commit of the recorder's segment log that holds payload, i.e. the first packet
//! *stored* in the sense of step 31 (durable and readable), watched on the recorder's
//! committed-state watch rather than on `Progress` events, which come at most once a second
//! and may be dropped.

use std::net::SocketAddr;
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::{mpsc, watch};
use tracing::field::Empty;
use tracing::Instrument;

use super::{Command, Ctx};
use crate::b2bua::engine::SessionKey;
use crate::b2bua::wire;
use crate::media::player::{Player, PlayerConfig, PlayerEventKind};
use crate::media::recorder::{Recorder, RecorderConfig, RecorderEventKind};
use crate::media::srtp::{MasterKey, SrtpContext};
use crate::metrics::{GaugeGuard, METRICS};
use crate::sdp::{is_savp, Codec, CryptoLine, Direction, SessionDescription};
use crate::sip::message::Request;
use crate::storage::segments::{
    pipeline, PipelineOptions, SegmentOptions, SegmentReader, SegmentWriter, TailState,
};
use crate::storage::stores::{store_dir, StartSession, Store, StoreError, StoreKind, StoreState};
use crate::storage::threshold::{clock_rate, playout_rate_for, ThresholdLimits, ThresholdTracker};

/// What the engine tells a session task.
#[derive(Debug, Clone, Copy)]
enum Signal {
    Acked,
    Ended,
}

/// The service's handle on a session task.
pub(crate) struct Runtime {
    signals: mpsc::UnboundedSender<Signal>,
}

impl Runtime {
    pub(crate) fn acked(&self) {
        let _ = self.signals.send(Signal::Acked);
    }
    pub(crate) fn ended(&self) {
        let _ = self.signals.send(Signal::Ended);
    }
}

/// Starts the task for an offered local session.
pub(crate) fn offer(ctx: &Ctx, key: SessionKey, identity: String, invite: Request) -> Runtime {
    let (tx, rx) = mpsc::unbounded_channel();
    let ctx = ctx.clone();
    let user = invite
        .parsed_uri()
        .ok()
        .and_then(|u| u.user_unescaped())
        .unwrap_or_default();
    let (is_play, id) = match user.strip_prefix("play-") {
        Some(id) => (true, id.to_string()),
        None => (false, user.clone()),
    };
    // `sender`/`receiver` are filled in by the task once it has read the store.
    let span = if is_play {
        tracing::info_span!(
            "play_session",
            store_id = %id,
            session = key,
            sender = Empty,
            receiver = Empty
        )
    } else {
        tracing::info_span!(
            "store_session",
            store_id = %id,
            session = key,
            sender = Empty,
            receiver = Empty
        )
    };
    tokio::spawn(
        async move {
            let outcome = if is_play {
                play(&ctx, key, &id, &identity, &invite, rx).await
            } else {
                store(&ctx, key, &id, &identity, &invite, rx).await
            };
            if let Err(Refusal(status, code, detail, retry_after)) = outcome {
                tracing::info!(code, "session refused");
                ctx.send(Command::RejectSession {
                    session: key,
                    status,
                    code,
                    detail,
                    retry_after,
                });
            }
            ctx.send(Command::SessionGone(key));
        }
        .instrument(span),
    );
    Runtime { signals: tx }
}

/// A refusal of the INVITE: status, code, detail, Retry-After.
struct Refusal(u16, &'static str, String, Option<u32>);

fn refuse(status: u16, code: &'static str, detail: impl Into<String>) -> Refusal {
    Refusal(status, code, detail.into(), None)
}

fn internal(e: impl std::fmt::Display) -> Refusal {
    refuse(500, "internal", e.to_string())
}

/// SDES for a store or play session (PROTOCOL.md section 7): for an `RTP/SAVP` offer, the
/// offerer's key and callvault's own (fresh, answered under the offer's tag); None for plain
/// RTP; `488` when no crypto line callvault speaks is offered.
fn session_crypto(
    offer: &SessionDescription,
    audio: usize,
) -> Result<Option<(CryptoLine, CryptoLine)>, Refusal> {
    if !offer.media(audio).is_some_and(|m| is_savp(&m.proto)) {
        return Ok(None);
    }
    let theirs = offer.crypto(audio).into_iter().next().ok_or_else(|| {
        refuse(
            488,
            "no-supported-crypto",
            "RTP/SAVP needs an a=crypto line with AES_CM_128_HMAC_SHA1_80 or _32",
        )
    })?;
    let ours = CryptoLine {
        key: MasterKey::random(),
        ..theirs.clone()
    };
    Ok(Some((theirs, ours)))
}

/// The offered SDP and its audio section.
fn offer_sdp(invite: &Request) -> Result<(SessionDescription, usize), Refusal> {
    let text = std::str::from_utf8(&invite.body)
        .map_err(|_| refuse(400, "malformed-message", "SDP is not UTF-8"))?;
    let sdp = SessionDescription::parse(text)
        .map_err(|e| refuse(400, "malformed-message", format!("bad SDP: {e}")))?;
    let idx = sdp
        .find_media("audio")
        .ok_or_else(|| refuse(488, "unsupported-format", "no audio stream offered"))?;
    Ok((sdp, idx))
}

fn same_identity(a: &str, b: &str) -> bool {
    a.eq_ignore_ascii_case(b)
}

/// Names the store's parties on the session's span (see the module doc).
fn record_parties(store: &Store) {
    let span = tracing::Span::current();
    span.record("sender", store.sender.as_str());
    span.record("receiver", store.receiver.as_str());
}

/// Resolves once the log holds committed payload (true), or when the writer is gone without
/// any (false). Pending forever once `tail` is None, so a `select!` branch can be retired.
async fn first_commit(tail: &mut Option<watch::Receiver<TailState>>) -> bool {
    let Some(t) = tail.as_mut() else {
        return std::future::pending().await;
    };
    loop {
        if t.borrow_and_update().payload_bytes > 0 {
            return true;
        }
        if t.changed().await.is_err() {
            return t.borrow().payload_bytes > 0;
        }
    }
}

/// `callvault_prompt_to_first_packet_seconds` for a store of step 2.3 (recorded calls and
/// uploads have no prompt). Wall clock, since `created_at` is; a clock step backwards skips
/// the sample rather than recording nonsense.
fn observe_prompt_to_first_packet(store: &Store, at: SystemTime) {
    if store.kind != StoreKind::InCall {
        return;
    }
    if let Ok(d) = at.duration_since(store.created_at) {
        METRICS.prompt_to_first_packet_seconds.observe_duration(d);
    }
}

async fn store(
    ctx: &Ctx,
    key: SessionKey,
    id: &str,
    identity: &str,
    invite: &Request,
    mut signals: mpsc::UnboundedReceiver<Signal>,
) -> Result<(), Refusal> {
    // Step 211, in the order of PROTOCOL.md §2.4.
    let unknown = || {
        refuse(
            404,
            "unknown-store",
            format!("{id} is unknown, used or expired"),
        )
    };
    let store = ctx
        .stores
        .get(id)
        .await
        .map_err(internal)?
        .ok_or_else(unknown)?;
    record_parties(&store);
    if !store.is_open(SystemTime::now()) {
        return Err(unknown());
    }
    if !same_identity(identity, &store.sender) {
        return Err(refuse(
            403,
            "not-sender",
            format!("{identity} is not the sender this store was offered to"),
        ));
    }
    let (offer, audio) = offer_sdp(invite)?;
    let crypto = session_crypto(&offer, audio)?;
    let offered = offer.codecs(audio);
    let codec = offered
        .iter()
        .find(|c| {
            super::request::FORMATS
                .iter()
                .any(|f| f.eq_ignore_ascii_case(&c.format_name()))
        })
        .cloned()
        .ok_or_else(|| {
            refuse(
                488,
                "unsupported-format",
                "none of the offered codecs can be stored",
            )
        })?;
    let te = offered.iter().find(|c| c.is_telephone_event()).cloned();
    let declared = match invite.headers.get("Callvault-Data-Size") {
        Some(v) => Some(v.trim().parse::<u64>().map_err(|_| {
            refuse(
                400,
                "malformed-request",
                "Callvault-Data-Size is not a number",
            )
        })?),
        None => None,
    };
    let cfg = &ctx.cfg;
    let resolved = store.threshold.resolve(
        declared,
        cfg.store.fallback_bytes,
        cfg.store.threshold_percent,
        &ThresholdLimits::default(),
    );
    let format = codec.format_name();
    let started = ctx
        .stores
        .start_session(
            id,
            &StartSession {
                caller: identity,
                format: &format,
                payload_type: codec.pt,
                declared_bytes: declared,
                reserve_bytes: declared.unwrap_or(0),
                threshold_bytes: resolved.fixed_bytes(),
            },
            SystemTime::now(),
        )
        .await
        .map_err(|e| match e {
            StoreError::UnknownStore(_) => unknown(),
            StoreError::NotSender { .. } => refuse(403, "not-sender", e.to_string()),
            StoreError::QuotaExceeded { .. } => refuse(403, "quota-exceeded", e.to_string()),
            StoreError::NoOwner { .. } => refuse(403, "unknown-receiver", e.to_string()),
            other => internal(other),
        })?;

    // From here the store is `receiving`: every exit must finish it.
    let _active = GaugeGuard::new(&METRICS.store_sessions_active);
    let fail = |e: String| async move {
        let _ = ctx
            .stores
            .finish(id, StoreState::Rejected, 0, SystemTime::now())
            .await;
        internal(e)
    };
    let socket = match ctx.ports.allocate(cfg.public_ip) {
        Ok(s) => s,
        Err(e) => {
            let _ = ctx
                .stores
                .finish(id, StoreState::Rejected, 0, SystemTime::now())
                .await;
            return Err(Refusal(503, "overloaded", e.to_string(), Some(5)));
        }
    };
    let dir = store_dir(&cfg.data_dir, id).map_err(internal)?;
    let writer = match SegmentWriter::create(&dir, SegmentOptions::default()) {
        Ok(w) => w,
        Err(e) => return Err(fail(e.to_string()).await),
    };
    let (ingest, writer) = pipeline(writer, PipelineOptions::default());
    let tracker = ThresholdTracker::new(resolved, playout_rate_for(&format));
    let mut rc = RecorderConfig::new(codec.pt, declared, tracker);
    rc.rtp_timeout = cfg.rtp_timeout;
    rc.telephone_event_pt = te.as_ref().map(|c| c.pt);
    rc.clock_rate = Some(codec.clock_rate);
    rc.source_ip = offer.connection_for(audio).map(|a| a.ip());
    // What is stored is the decrypted payload.
    rc.srtp = crypto
        .as_ref()
        .map(|(theirs, _)| SrtpContext::new(theirs.suite, &theirs.key));
    let (ev_tx, mut events) = mpsc::channel(64);
    let recorder = Recorder::start(socket, ingest, writer, rc, ev_tx);
    ctx.live.insert(id, recorder.tail());
    // Watched until the first packet is committed, for the prompt-to-first-packet time.
    let mut first_tail = Some(recorder.tail());

    let mut accepted: Vec<Codec> = vec![codec.clone()];
    accepted.extend(te);
    let answer = match SessionDescription::answer(
        &offer,
        cfg.public_ip,
        recorder.local_rtp_port(),
        &accepted,
        Direction::RecvOnly,
        key,
    )
    .and_then(|mut a| {
        if let Some((_, ours)) = &crypto {
            a.set_crypto(audio, std::slice::from_ref(ours))?;
        }
        Ok(a)
    }) {
        Ok(a) => a,
        Err(e) => {
            recorder.finish().await;
            ctx.live.remove(id);
            return Err(fail(e.to_string()).await);
        }
    };
    ctx.send(Command::AcceptSession {
        session: key,
        sdp: answer.to_string(),
    });
    tracing::info!(format = %format, declared = ?declared, "store session started");

    let mut reserved = declared.unwrap_or(0);
    let mut ended_by_us: Option<(&'static str, StoreState)> = None;
    loop {
        tokio::select! {
            s = signals.recv() => match s {
                Some(Signal::Acked) => {}
                Some(Signal::Ended) | None => break,
            },
            stored = first_commit(&mut first_tail), if first_tail.is_some() => {
                first_tail = None;
                if stored {
                    observe_prompt_to_first_packet(&store, SystemTime::now());
                }
            }
            ev = events.recv() => {
                let Some(ev) = ev else { break };
                match ev.kind {
                    RecorderEventKind::ThresholdReached { received_bytes, after, by_finish } => {
                        threshold_reached(ctx, &started, received_bytes, after, by_finish).await;
                    }
                    RecorderEventKind::Progress { received_bytes } => {
                        let _ = ctx.stores.record_progress(id, received_bytes).await;
                        // Without a declared size the reservation grows with the data; when the
                        // quota cannot cover it the session ends.
                        if received_bytes > reserved {
                            let extra = received_bytes - reserved + 64 * 1024;
                            if ctx.stores.extend_reservation(id, extra).await.unwrap_or(false) {
                                reserved += extra;
                            } else if ended_by_us.is_none() {
                                ended_by_us = Some(("quota-exceeded", StoreState::Complete));
                                break;
                            }
                        }
                    }
                    RecorderEventKind::SizeExceeded { .. } => {
                        ended_by_us = Some(("size-exceeded", StoreState::Complete));
                        break;
                    }
                    RecorderEventKind::Timeout { .. } => {
                        ended_by_us = Some(("rtp-timeout", StoreState::Truncated));
                        break;
                    }
                    RecorderEventKind::StorageFailed { .. } => {
                        ended_by_us = Some(("storage-failed", StoreState::Truncated));
                        break;
                    }
                    RecorderEventKind::Finished { .. } => break,
                }
            }
        }
    }
    if let Some((reason, _)) = ended_by_us {
        ctx.send(Command::EndSession {
            session: key,
            reason: Some(reason),
        });
    }
    let totals = recorder.finish().await;
    // The first packet was committed only as the session ended (e.g. the BYE overtook the
    // commit tick): the sample is late by at most that tick.
    if first_tail.is_some_and(|t| t.borrow().payload_bytes > 0) {
        observe_prompt_to_first_packet(&store, SystemTime::now());
    }
    // The threshold is always reached by the end (a store shorter than its threshold).
    while let Ok(ev) = events.try_recv() {
        if let RecorderEventKind::ThresholdReached {
            received_bytes,
            after,
            by_finish,
        } = ev.kind
        {
            threshold_reached(ctx, &started, received_bytes, after, by_finish).await;
        }
    }
    let state = ended_by_us.map_or(StoreState::Complete, |(_, s)| s);
    if let Err(e) = ctx
        .stores
        .finish(id, state, totals.received_bytes, SystemTime::now())
        .await
    {
        tracing::warn!(error = %e, "store not finished cleanly");
    }
    ctx.live.remove(id);
    tracing::info!(bytes = totals.received_bytes, ?state, "store session ended");
    Ok(())
}

/// Step 32 reached (by the data or because the store finished): metric, metadata, ready note.
async fn threshold_reached(
    ctx: &Ctx,
    store: &Store,
    received_bytes: u64,
    after: Duration,
    by_finish: bool,
) {
    METRICS.threshold_seconds.observe_duration(after);
    tracing::info!(
        received_bytes,
        after_ms = after.as_millis() as u64,
        by_finish,
        "threshold reached"
    );
    let _ = ctx
        .stores
        .mark_threshold(&store.id, SystemTime::now())
        .await;
    ready(ctx, store, received_bytes);
}

/// Step 331: the ready note to the receiver.
fn ready(ctx: &Ctx, store: &Store, received_bytes: u64) {
    let secure = ctx.secure_store(&store.id, Some(false));
    let r = wire::Ready {
        store_id: store.id.clone(),
        play_uri: ctx.cfg.session_uri(&format!("play-{}", store.id), secure),
        download_url: crate::http::download_url(&ctx.cfg.http_base, store),
        state: "receiving".into(),
        received_bytes,
        declared_bytes: store.declared_bytes,
        format: store.format.clone().unwrap_or_default(),
    };
    ctx.send(Command::Ready {
        receiver: store.receiver.clone(),
        ready: r,
    });
}

async fn play(
    ctx: &Ctx,
    key: SessionKey,
    id: &str,
    identity: &str,
    invite: &Request,
    mut signals: mpsc::UnboundedReceiver<Signal>,
) -> Result<(), Refusal> {
    let store = ctx
        .stores
        .get(id)
        .await
        .map_err(internal)?
        .ok_or_else(|| refuse(404, "unknown-store", format!("{id} is unknown")))?;
    record_parties(&store);
    if !same_identity(identity, &store.receiver) {
        return Err(refuse(
            403,
            "not-receiver",
            format!("{identity} is not the receiver of {id}"),
        ));
    }
    let finished = matches!(store.state, StoreState::Complete | StoreState::Truncated);
    if store.threshold_at.is_none() && !finished {
        if matches!(store.state, StoreState::Pending | StoreState::Receiving) {
            return Err(Refusal(
                480,
                "not-ready",
                "the threshold is not reached yet".into(),
                Some(2),
            ));
        }
        return Err(refuse(404, "unknown-store", format!("{id} holds no data")));
    }
    let (offer, audio) = offer_sdp(invite)?;
    let crypto = session_crypto(&offer, audio)?;
    let format = store.format.clone().unwrap_or_default();
    let codec = offer
        .codecs(audio)
        .into_iter()
        .find(|c| c.format_name().eq_ignore_ascii_case(&format))
        .ok_or_else(|| {
            refuse(
                488,
                "unsupported-format",
                format!("the store is {format}; offer it to listen"),
            )
        })?;
    let target = offer.connection_for(audio);
    let socket = ctx
        .ports
        .allocate(ctx.cfg.public_ip)
        .map_err(|e| Refusal(503, "overloaded", e.to_string(), Some(5)))?;
    let answer = SessionDescription::answer(
        &offer,
        ctx.cfg.public_ip,
        socket.rtp_port,
        std::slice::from_ref(&codec),
        Direction::SendOnly,
        key,
    )
    .and_then(|mut a| {
        if let Some((_, ours)) = &crypto {
            a.set_crypto(audio, std::slice::from_ref(ours))?;
        }
        Ok(a)
    })
    .map_err(internal)?;
    ctx.send(Command::AcceptSession {
        session: key,
        sdp: answer.to_string(),
    });
    METRICS.play_sessions_total.inc();
    let _active = GaugeGuard::new(&METRICS.play_sessions_active);
    tracing::info!("play session accepted");

    // Stream from the ACK on.
    match signals.recv().await {
        Some(Signal::Acked) => {}
        Some(Signal::Ended) | None => return Ok(()),
    }
    let dir = store_dir(&ctx.cfg.data_dir, id).map_err(internal)?;
    let reader = SegmentReader::open(&dir, 0, ctx.live.get(id));
    let mut pc = PlayerConfig::new(
        store.payload_type.unwrap_or(codec.pt),
        clock_rate(&format).unwrap_or(8000),
    );
    pc.start = Instant::now();
    pc.srtp = crypto
        .as_ref()
        .map(|(_, ours)| SrtpContext::new(ours.suite, &ours.key));
    let (ev_tx, mut events) = mpsc::channel(16);
    let target = target.unwrap_or_else(|| SocketAddr::new(ctx.cfg.public_ip, 9));
    let player = Player::start(socket, reader, target, pc, ev_tx);
    loop {
        tokio::select! {
            s = signals.recv() => match s {
                Some(Signal::Acked) => {}
                Some(Signal::Ended) | None => break,
            },
            ev = events.recv() => match ev.map(|e| e.kind) {
                Some(PlayerEventKind::Started { first_packet_after }) => {
                    METRICS.play_start_seconds.observe_duration(first_packet_after);
                }
                Some(PlayerEventKind::Done { packets, .. }) => {
                    tracing::info!(packets, "play finished");
                    ctx.send(Command::EndSession { session: key, reason: None });
                    break;
                }
                Some(PlayerEventKind::Failed { .. }) | None => {
                    ctx.send(Command::EndSession { session: key, reason: Some("play-failed") });
                    break;
                }
            },
        }
    }
    let totals = player.stop().await;
    // A receiver that hangs up right after the first packet can win the race against the
    // Started event in the select above; the task has ended now, so its events are all here.
    while let Ok(ev) = events.try_recv() {
        if let PlayerEventKind::Started { first_packet_after } = ev.kind {
            METRICS
                .play_start_seconds
                .observe_duration(first_packet_after);
        }
    }
    tracing::info!(packets = totals.packets, "play session ended");
    Ok(())
}
