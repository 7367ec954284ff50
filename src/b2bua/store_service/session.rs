//! Store sessions (steps 21–23, 31/32: INVITE to the store URI, RTP into the segment log,
//! threshold, ready note) and play sessions (332/333: INVITE to the play URI, the stored
//! packets streamed from the start, following the live tail). One task per session; the
//! engine's session events (and the server's shutdown) reach it through a [`Runtime`].
//!
//! A store session is the RTP ingest adapter of [`StoreSession`]: [`accept_store`] builds the
//! step-211 snapshot and lets [`session::admit`] decide, the recorder is the ingest, and
//! [`RtpDrive`] feeds the machine the recorder's committed bytes and end, runs its database
//! effects ([`effects::run`]) and turns its notes into engine commands (BYE, ready note).
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
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use tokio::sync::mpsc;
use tracing::field::Empty;
use tracing::Instrument;

use super::{Command, Ctx};
use crate::b2bua::engine::SessionKey;
use crate::b2bua::wire;
use crate::error_code::{ErrorCode, Refusal};
use crate::media::player::{Player, PlayerConfig, PlayerEvent, PlayerEventKind, PlayerHandle};
use crate::media::recorder::{
    Recorder, RecorderConfig, RecorderEvent, RecorderEventKind, RecorderHandle,
};
use crate::media::srtp::{MasterKey, SrtpContext};
use crate::metrics::{GaugeGuard, METRICS};
use crate::sdp::{is_savp, Codec, CryptoLine, Direction, SessionDescription};
use crate::sip::message::{HeaderAccess, Request};
use crate::storage::live::finished_probe;
use crate::storage::objects::chunks::{spawn_uploader, Uploader};
use crate::storage::segments::{pipeline, PipelineOptions, SegmentOptions, SegmentWriter};
use crate::storage::session::effects::{self, observe_first_packet, Note};
use crate::storage::session::{
    self, IngestEnd, Input, Phase, SessionConfig, Snapshot, StoreSession,
};
use crate::storage::stores::{store_dir, SessionEnds, StartSession, Store, StoreError, StoreState};
use crate::storage::threshold::{clock_rate, playout_rate_for, ThresholdTracker};
use crate::storage::Account;

/// What the engine tells a session task.
#[derive(Debug, Clone, Copy)]
enum Signal {
    Acked,
    Ended,
    /// The server is stopping (PROTOCOL.md 4): finish now.
    Shutdown,
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
    pub(crate) fn shutdown(&self) {
        let _ = self.signals.send(Signal::Shutdown);
    }
}

/// The SIP addresses of an offered session: the INVITE's source and callvault's own.
#[derive(Debug, Clone, Copy)]
pub(crate) struct SipEnds {
    pub(crate) remote: SocketAddr,
    pub(crate) local: SocketAddr,
}

/// Starts the task for an offered local session.
pub(crate) fn offer(
    ctx: &Ctx,
    key: SessionKey,
    identity: String,
    invite: Request,
    sip: SipEnds,
) -> Runtime {
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
                store(&ctx, key, &id, &identity, &invite, sip, rx).await
            };
            if let Err(refusal) = outcome {
                tracing::info!(code = %refusal.code, "session refused");
                ctx.send(Command::RejectSession {
                    session: key,
                    refusal,
                });
            }
            ctx.send(Command::SessionGone(key));
        }
        .instrument(span),
    );
    Runtime { signals: tx }
}

fn refuse(code: ErrorCode, detail: impl Into<String>) -> Refusal {
    Refusal::new(code, detail)
}

fn internal(e: impl std::fmt::Display) -> Refusal {
    Refusal::internal(e)
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
            ErrorCode::NoSupportedCrypto,
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
        .map_err(|_| refuse(ErrorCode::MalformedMessage, "SDP is not UTF-8"))?;
    let sdp = SessionDescription::parse(text)
        .map_err(|e| refuse(ErrorCode::MalformedMessage, format!("bad SDP: {e}")))?;
    let idx = sdp
        .find_media("audio")
        .ok_or_else(|| refuse(ErrorCode::UnsupportedFormat, "no audio stream offered"))?;
    Ok((sdp, idx))
}

/// Names the store's parties on the session's span (see the module doc).
fn record_parties(store: &Store) {
    let span = tracing::Span::current();
    span.record("sender", store.sender.as_str());
    span.record("receiver", store.receiver.as_str());
}

/// What an INVITE to a store URI offers, read before step 211 decides.
struct MediaOffer {
    sdp: SessionDescription,
    audio: usize,
    codec: Codec,
    te: Option<Codec>,
    declared: Option<u64>,
    /// The offerer's SDES key and callvault's answer (None: plain RTP).
    crypto: Option<(CryptoLine, CryptoLine)>,
}

/// The offered SDP, the first storable codec and `Callvault-Data-Size`.
fn media_offer(invite: &Request) -> Result<MediaOffer, Refusal> {
    let (sdp, audio) = offer_sdp(invite)?;
    let crypto = session_crypto(&sdp, audio)?;
    let offered = sdp.codecs(audio);
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
                ErrorCode::UnsupportedFormat,
                "none of the offered codecs can be stored",
            )
        })?;
    let te = offered.iter().find(|c| c.is_telephone_event()).cloned();
    let declared = match invite.headers.get("Callvault-Data-Size") {
        Some(v) => Some(v.trim().parse::<u64>().map_err(|_| {
            refuse(
                ErrorCode::MalformedRequest,
                "Callvault-Data-Size is not a number",
            )
        })?),
        None => None,
    };
    Ok(MediaOffer {
        sdp,
        audio,
        codec,
        te,
        declared,
        crypto,
    })
}

/// The owner's account (None: no owner, the operator's store).
async fn owner_account(ctx: &Ctx, store: Option<&Store>) -> Result<Option<Account>, Refusal> {
    let Some(owner) = store.and_then(|s| s.owner.as_deref()) else {
        return Ok(None);
    };
    match ctx.accounts.get(owner).await.map_err(internal)? {
        Some(a) => Ok(Some(a)),
        None => Err(refuse(
            ErrorCode::UnknownReceiver,
            format!("{owner} is not a subscriber"),
        )),
    }
}

/// A store session accepted by step 211, its reservation made.
struct Accepted {
    store: Store,
    offer: MediaOffer,
    cfg: SessionConfig,
}

/// Step 211 and 22's reservation: the machine decides on a snapshot, the database reserves
/// atomically (and may still refuse on a race).
async fn accept_store(
    ctx: &Ctx,
    id: &str,
    identity: &str,
    invite: &Request,
) -> Result<Accepted, Refusal> {
    let found = ctx.stores.get(id).await.map_err(internal)?;
    if let Some(s) = &found {
        record_parties(s);
    }
    let offer = media_offer(invite);
    let owner = owner_account(ctx, found.as_ref()).await?;
    let admitted = session::admit(&Snapshot {
        store: found.as_ref(),
        wall: SystemTime::now(),
        caller: Some(identity),
        offer: offer.as_ref().map(|_| ()).map_err(Clone::clone),
        declared: offer.as_ref().ok().and_then(|o| o.declared),
        free_bytes: owner.as_ref().map(Account::free_bytes),
    })?;
    let (Some(store), Ok(offer)) = (found, offer) else {
        return Err(Refusal::bare(ErrorCode::UnknownStore)); // admit checked both
    };
    let cfg = &ctx.cfg;
    let server_limits = cfg.store.threshold_limits();
    let limits = owner
        .as_ref()
        .map_or(server_limits, |a| a.threshold_limits(&server_limits));
    let resolved = store.threshold.resolve(
        offer.declared,
        cfg.store.fallback_bytes,
        cfg.store.threshold_percent,
        &limits,
    );
    let format = offer.codec.format_name();
    let started = ctx
        .stores
        .start_session(
            id,
            &StartSession {
                caller: identity,
                format: &format,
                payload_type: offer.codec.pt,
                declared_bytes: offer.declared,
                reserve_bytes: admitted.reserve_bytes,
                threshold_bytes: resolved.fixed_bytes(),
            },
            SystemTime::now(),
        )
        .await
        .map_err(store_refusal)?;
    let cfg = SessionConfig {
        admitted,
        resolved,
        playout_rate: playout_rate_for(&format),
        // The recorder keeps the RTP timer (it sees every packet) and reports the timeout.
        silence_timeout: None,
    };
    Ok(Accepted {
        store: started,
        offer,
        cfg,
    })
}

/// A refusal for a database answer to step 211.
fn store_refusal(e: StoreError) -> Refusal {
    match e {
        StoreError::UnknownStore(_) => Refusal::bare(ErrorCode::UnknownStore),
        StoreError::NotSender { .. } => refuse(ErrorCode::NotSender, e.to_string()),
        StoreError::QuotaExceeded { .. } => refuse(ErrorCode::QuotaExceeded, e.to_string()),
        StoreError::NoOwner { .. } => refuse(ErrorCode::UnknownReceiver, e.to_string()),
        other => internal(other),
    }
}

/// The RTP ingest adapter: the recorder on its port, answered with `a=recvonly`. On failure
/// the store is finished `rejected` (it is `receiving` already).
async fn start_recorder(
    ctx: &Ctx,
    key: SessionKey,
    acc: &Accepted,
    sip: SipEnds,
    call_id: Option<&str>,
) -> Result<
    (
        RecorderHandle,
        mpsc::Receiver<RecorderEvent>,
        Option<Uploader>,
    ),
    Refusal,
> {
    let cfg = &ctx.cfg;
    let id = acc.store.id.as_str();
    let reject = |r: Refusal| async move {
        let _ = ctx
            .stores
            .finish(id, StoreState::Rejected, 0, SystemTime::now())
            .await;
        r
    };
    let socket = match ctx.ports.allocate(cfg.public_ip) {
        Ok(s) => s,
        Err(e) => {
            return Err(reject(refuse(ErrorCode::Overloaded, e.to_string()).retry_after(5)).await)
        }
    };
    let (writer, dir) = match store_dir(&cfg.data_dir, id)
        .map_err(internal)
        .and_then(|dir| {
            SegmentWriter::create(&dir, SegmentOptions::default())
                .map(|w| (w, dir))
                .map_err(internal)
        }) {
        Ok(w) => w,
        Err(r) => return Err(reject(r).await),
    };
    let (ingest, writer) = pipeline(writer, PipelineOptions::default());
    // With a remote object store the log is the write-ahead; chunks go up off the RTP path.
    let uploader = ctx
        .live
        .objects()
        .map(|o| spawn_uploader(Arc::clone(o), id.to_string(), dir, writer.subscribe()));
    let o = &acc.offer;
    let format = o.codec.format_name();
    let tracker = ThresholdTracker::new(acc.cfg.resolved, playout_rate_for(&format));
    let mut rc = RecorderConfig::new(o.codec.pt, o.declared, tracker);
    rc.size_limit = acc.cfg.admitted.limit;
    rc.rtp_timeout = cfg.rtp_timeout;
    rc.telephone_event_pt = o.te.as_ref().map(|c| c.pt);
    rc.clock_rate = Some(o.codec.clock_rate);
    rc.source = o.sdp.connection_for(o.audio);
    // What is stored is the decrypted payload.
    rc.srtp = o
        .crypto
        .as_ref()
        .map(|(theirs, _)| SrtpContext::new(theirs.suite, &theirs.key));
    let (ev_tx, events) = mpsc::channel(64);
    let recorder = Recorder::start(socket, ingest, writer, rc, ev_tx);
    let mut accepted: Vec<Codec> = vec![o.codec.clone()];
    accepted.extend(o.te.clone());
    match SessionDescription::answer(
        &o.sdp,
        cfg.public_ip,
        recorder.local_rtp_port(),
        &accepted,
        Direction::RecvOnly,
        key,
    )
    .and_then(|mut a| {
        if let Some((_, ours)) = &o.crypto {
            a.set_crypto(o.audio, std::slice::from_ref(ours))?;
        }
        Ok(a)
    }) {
        Ok(answer) => {
            // Where the media really flows, for the pcap download; a failure costs the pcap
            // its real addresses, not the session.
            let ends = SessionEnds {
                rtp_source: o.sdp.connection_for(o.audio),
                rtp_local: Some(SocketAddr::new(cfg.public_ip, recorder.local_rtp_port())),
                sip_remote: Some(sip.remote),
                sip_local: Some(sip.local),
                sip_call_id: call_id.map(str::to_string),
            };
            if let Err(e) = ctx.stores.set_session_ends(id, &ends).await {
                tracing::warn!(error = %e, "store RTP addresses not recorded");
            }
            ctx.send(Command::AcceptSession {
                session: key,
                sdp: answer.to_string(),
            });
            Ok((recorder, events, uploader))
        }
        Err(e) => {
            recorder.finish().await;
            Err(reject(internal(e)).await)
        }
    }
}

async fn store(
    ctx: &Ctx,
    key: SessionKey,
    id: &str,
    identity: &str,
    invite: &Request,
    sip: SipEnds,
    signals: mpsc::UnboundedReceiver<Signal>,
) -> Result<(), Refusal> {
    let acc = accept_store(ctx, id, identity, invite).await?;
    // From here the store is `receiving`: every exit finishes it.
    let _active = GaugeGuard::new(&METRICS.store_sessions_active);
    let (recorder, events, uploader) =
        start_recorder(ctx, key, &acc, sip, invite.call_id()).await?;
    tracing::info!(format = %acc.offer.codec.format_name(), declared = ?acc.offer.declared,
        "store session started");
    let session = StoreSession::start(acc.cfg.clone(), Instant::now());
    let mut drive = RtpDrive {
        ctx,
        key,
        store: acc.store,
        session,
        first_packet_seen: false,
        how: IngestEnd::Done,
    };
    drive.run(recorder, events, signals, uploader).await;
    Ok(())
}

/// The driver of one RTP store session: feeds the machine from the recorder and the engine,
/// carries out its notes.
struct RtpDrive<'a> {
    ctx: &'a Ctx,
    key: SessionKey,
    store: Store,
    session: StoreSession,
    first_packet_seen: bool,
    /// How the ingest ended, from the recorder's events.
    how: IngestEnd,
}

impl RtpDrive<'_> {
    async fn run(
        &mut self,
        recorder: RecorderHandle,
        mut events: mpsc::Receiver<RecorderEvent>,
        mut signals: mpsc::UnboundedReceiver<Signal>,
        uploader: Option<Uploader>,
    ) {
        let id = self.store.id.clone();
        let mut tail = recorder.tail();
        self.ctx.live.insert(&id, tail.clone());
        let mut tail_open = true;
        loop {
            tokio::select! {
                s = signals.recv() => match s {
                    Some(Signal::Acked) => {}
                    Some(Signal::Shutdown) => self.feed(Input::Shutdown).await,
                    Some(Signal::Ended) | None => break,
                },
                changed = tail.changed(), if tail_open => match changed {
                    Ok(()) => {
                        let n = tail.borrow_and_update().payload_bytes;
                        self.committed(n).await;
                    }
                    Err(_) => tail_open = false,
                },
                ev = events.recv() => match ev.map(|e| e.kind) {
                    Some(kind) => {
                        if self.on_recorder(kind).await {
                            break;
                        }
                    }
                    None => break,
                },
            }
            if self.session.phase() != Phase::Receiving {
                break;
            }
        }
        let totals = recorder.finish().await;
        while let Ok(ev) = events.try_recv() {
            self.on_recorder(ev.kind).await;
        }
        let last = tail.borrow().payload_bytes;
        self.committed(last).await;
        // The store is finished in the database only once its media is all in the object
        // store: a reader of a finished store reads it there alone.
        if let Some(u) = uploader {
            if let Err(e) = u.finish().await {
                tracing::error!(store = %id, error = %e, "store media not uploaded");
            }
        }
        self.feed(Input::IngestEnded {
            how: self.how,
            stored: totals.received_bytes,
        })
        .await;
        self.ctx.live.remove(&id);
        tracing::info!(bytes = totals.received_bytes, phase = ?self.session.phase(),
            "store session ended");
    }

    /// A recorder event; true when the ingest has stopped.
    async fn on_recorder(&mut self, kind: RecorderEventKind) -> bool {
        match kind {
            RecorderEventKind::ThresholdReached {
                received_bytes,
                by_finish: false,
                ..
            } => self.feed(Input::IngestThreshold(received_bytes)).await,
            RecorderEventKind::ThresholdReached { .. } => {}
            RecorderEventKind::Progress { received_bytes } => {
                let _ = self
                    .ctx
                    .stores
                    .record_progress(&self.store.id, received_bytes)
                    .await;
            }
            RecorderEventKind::SizeExceeded { .. } => {
                self.how = IngestEnd::Overran;
                self.stop_ingest(ErrorCode::SizeExceeded);
                return true;
            }
            RecorderEventKind::Timeout { .. } => {
                self.how = IngestEnd::TimedOut;
                self.stop_ingest(ErrorCode::RtpTimeout);
                return true;
            }
            RecorderEventKind::StorageFailed { .. } => {
                self.how = IngestEnd::StorageFailed;
                self.stop_ingest(ErrorCode::StorageFailed);
                return true;
            }
            RecorderEventKind::Finished { .. } => return true,
        }
        false
    }

    async fn committed(&mut self, n: u64) {
        if n > 0 && !self.first_packet_seen {
            self.first_packet_seen = true;
            observe_first_packet(&self.store, SystemTime::now());
        }
        self.feed(Input::Committed(n)).await;
    }

    async fn feed(&mut self, input: Input) {
        self.session.handle(input, Instant::now());
        let notes = effects::run(&mut self.session, &self.ctx.stores, &self.store.id).await;
        for note in notes {
            match note {
                Note::Ready {
                    received_bytes,
                    state,
                } => ready(self.ctx, &self.store, received_bytes, state),
                Note::Stop(reason) => self.stop_ingest(reason),
                Note::Finished(_) => {}
            }
        }
    }

    /// BYE to the sender (the engine ignores a session already gone).
    fn stop_ingest(&self, reason: ErrorCode) {
        self.ctx.send(Command::EndSession {
            session: self.key,
            reason: Some(reason),
        });
    }
}

/// Step 331: the ready note to the receiver, with the store's state.
pub(crate) fn ready(ctx: &Ctx, store: &Store, received_bytes: u64, state: StoreState) {
    let secure = ctx.secure_store(&store.id, Some(false));
    let r = wire::Ready {
        store_id: store.id.clone(),
        play_uri: ctx.cfg.session_uri(&format!("play-{}", store.id), secure),
        download_url: crate::storage::capability::download_url(&ctx.cfg.http_base, store),
        state: state.to_string(),
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
        .ok_or_else(|| refuse(ErrorCode::UnknownStore, format!("{id} is unknown")))?;
    record_parties(&store);
    session::may_play(&store, identity)?;
    let (offer, audio) = offer_sdp(invite)?;
    let crypto = session_crypto(&offer, audio)?;
    let format = store.format.clone().unwrap_or_default();
    let codec = offer
        .codecs(audio)
        .into_iter()
        .find(|c| c.format_name().eq_ignore_ascii_case(&format))
        .ok_or_else(|| {
            refuse(
                ErrorCode::UnsupportedFormat,
                format!("the store is {format}; offer it to listen"),
            )
        })?;
    let target = offer.connection_for(audio);
    let socket = ctx
        .ports
        .allocate(ctx.cfg.public_ip)
        .map_err(|e| Refusal::new(ErrorCode::Overloaded, e.to_string()).retry_after(5))?;
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
        Some(Signal::Ended | Signal::Shutdown) | None => return Ok(()),
    }
    let dir = store_dir(&ctx.cfg.data_dir, id).map_err(internal)?;
    let probe = finished_probe(&ctx.stores, id);
    let receiving = store.state == StoreState::Receiving;
    let (reader, _) = ctx.live.reader(&dir, id, receiving, Some(probe));
    let mut pc = PlayerConfig::new(
        store.payload_type.unwrap_or(codec.pt),
        clock_rate(&format).unwrap_or(8000),
    );
    pc.start = Instant::now();
    pc.srtp = crypto
        .as_ref()
        .map(|(_, ours)| SrtpContext::new(ours.suite, &ours.key));
    let (ev_tx, events) = mpsc::channel(16);
    let target = target.unwrap_or_else(|| SocketAddr::new(ctx.cfg.public_ip, 9));
    let player = Player::start(socket, reader, target, pc, ev_tx);
    drive_player(ctx, key, player, events, &mut signals).await;
    Ok(())
}

/// Follows a started player until it is done, fails, or the session ends: ends the session
/// on the player's account, records the time to the first packet.
async fn drive_player(
    ctx: &Ctx,
    key: SessionKey,
    player: PlayerHandle,
    mut events: mpsc::Receiver<PlayerEvent>,
    signals: &mut mpsc::UnboundedReceiver<Signal>,
) {
    loop {
        tokio::select! {
            s = signals.recv() => match s {
                Some(Signal::Acked) => {}
                Some(Signal::Ended | Signal::Shutdown) | None => break,
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
                    ctx.send(Command::EndSession { session: key, reason: Some(ErrorCode::PlayFailed) });
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
}
