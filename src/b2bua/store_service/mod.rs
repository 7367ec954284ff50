//! In-call storage (PROTOCOL.md §2) on top of the engine: store requests and the DTMF feature
//! code (steps 11/111), prompts (12), store and play sessions (21–23, 31–33), notifications.
//!
//! The engine stays sans-IO; this service is its async neighbour in the core task. Engine
//! events come in through [`StoreService::on_event`], which reads what it needs from the engine
//! and spawns tasks for the database, argon2 and media work. Those tasks answer with
//! [`Command`]s on a channel the core drains into [`StoreService::apply`], the only place that
//! touches the engine again. So no lock is held across an await and the engine never blocks.
//!
//! The store lifecycle itself is not here: it is [`crate::storage::session::StoreSession`],
//! which this service drives for RTP store sessions (`session.rs`) and whose ready notes it
//! sends for uploads too ([`StoreService::on_http_event`]). At a clean shutdown
//! [`StoreService::shutdown`] stops every session; the core waits for them to settle.

mod lockout;
mod request;
mod session;

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::mpsc;

pub(crate) use lockout::Lockout;

use super::engine::{Engine, EngineEvent, SessionKey};
use super::media::{CallKey, MediaBackend, Side};
use super::wire;
use crate::config::{PromptMethod, StoreConfig};
use crate::error_code::{ErrorCode, Refusal};
use crate::media::ports::PortAllocator;
use crate::sip::message::Method;
use crate::sip::transaction::{ClientTxId, ServerTxId};
use crate::sip::transport::Transport;
use crate::storage::accounts::Accounts;
use crate::storage::live::LiveStores;
use crate::storage::stores::Stores;

/// What the service needs to know about the server.
#[derive(Debug, Clone)]
pub(crate) struct ServiceConfig {
    pub public_ip: IpAddr,
    /// Our SIP port (the store and play URIs carry it).
    pub sip_port: u16,
    /// Our `tls:` port: store requests that came over TLS get store and play URIs with
    /// `;transport=tls` and this port (PROTOCOL.md section 7).
    pub tls_port: Option<u16>,
    /// `http://host:port` of the HTTP API, for upload and download URLs.
    pub http_base: String,
    pub store: StoreConfig,
    pub data_dir: PathBuf,
    pub rtp_timeout: Duration,
}

impl ServiceConfig {
    fn host(&self) -> String {
        match self.public_ip {
            IpAddr::V6(v6) => format!("[{v6}]"),
            v4 => v4.to_string(),
        }
    }

    /// The port a store or play URI names: the TLS port when the store was asked for over TLS
    /// (and callvault has one), else the SIP port.
    pub(crate) fn session_port(&self, secure: bool) -> u16 {
        match (secure, self.tls_port) {
            (true, Some(p)) => p,
            _ => self.sip_port,
        }
    }

    /// `sip:{user}@host:port`, with `;transport=tls` when `secure` (store and play URIs).
    pub(crate) fn session_uri(&self, user: &str, secure: bool) -> String {
        let port = self.session_port(secure);
        let mut uri = format!("sip:{user}@{}:{port}", self.host());
        if secure && self.tls_port.is_some() {
            uri.push_str(";transport=tls");
        }
        uri
    }
}

/// Where a notification goes.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) enum Target {
    /// In the call's dialog on that side.
    InCall(CallKey, Side),
    /// Out of dialog, to every registered contact of the user.
    User(String),
}

/// A notification in both forms; which one goes out depends on the UA (§5 "Softphones").
#[derive(Debug, Clone)]
pub(crate) struct Notification {
    pub target: Target,
    pub content_type: &'static str,
    pub json: String,
    pub text: String,
    /// The recipient's account asks for text.
    pub prefer_text: bool,
}

/// Work for the engine, produced by the service's tasks.
#[derive(Debug)]
pub(crate) enum Command {
    RespondRequest {
        tx: ServerTxId,
        status: u16,
        content_type: &'static str,
        body: String,
    },
    RejectRequest {
        tx: ServerTxId,
        code: ErrorCode,
        detail: String,
    },
    Notify(Notification),
    AcceptSession {
        session: SessionKey,
        sdp: String,
    },
    RejectSession {
        session: SessionKey,
        refusal: Refusal,
    },
    EndSession {
        session: SessionKey,
        reason: Option<ErrorCode>,
    },
    /// A session task ended: forget its runtime.
    SessionGone(SessionKey),
    /// Threshold reached for a store: tell its receiver.
    Ready {
        receiver: String,
        ready: wire::Ready,
    },
}

/// Shared by the service and its tasks.
#[derive(Clone)]
pub(crate) struct Ctx {
    pub cfg: Arc<ServiceConfig>,
    pub accounts: Accounts,
    pub stores: Stores,
    pub lockout: Arc<Mutex<Lockout>>,
    pub commands: mpsc::UnboundedSender<Command>,
    pub ports: PortAllocator,
    pub live: Arc<LiveStores>,
    /// Ids of stores asked for over TLS, until their ready note names a TLS play URI.
    pub secure_stores: Arc<Mutex<HashSet<String>>>,
}

impl Ctx {
    fn send(&self, c: Command) {
        // The core is gone only at shutdown; nothing left to do then.
        let _ = self.commands.send(c);
    }

    /// Records (`Some(true)`), forgets and reports whether a store was asked for over TLS.
    pub(crate) fn secure_store(&self, id: &str, set: Option<bool>) -> bool {
        let mut m = self.secure_stores.lock().unwrap_or_else(|p| p.into_inner());
        match set {
            Some(true) => {
                m.insert(id.to_string());
                true
            }
            Some(false) => m.remove(id),
            None => m.contains(id),
        }
    }

    fn lockout(&self) -> std::sync::MutexGuard<'_, Lockout> {
        // A poisoned lockout table only means a task panicked; the data is still consistent.
        self.lockout.lock().unwrap_or_else(|p| p.into_inner())
    }
}

pub(crate) struct StoreService {
    ctx: Ctx,
    /// JSON notifications in flight, for the text fallback.
    sent: HashMap<ClientTxId, Notification>,
    /// Parties that get text from now on (they refused JSON).
    text_parties: HashSet<Target>,
    sessions: HashMap<SessionKey, session::Runtime>,
}

impl StoreService {
    pub(crate) fn new(
        cfg: ServiceConfig,
        accounts: Accounts,
        stores: Stores,
        ports: PortAllocator,
        live: Arc<LiveStores>,
    ) -> (StoreService, mpsc::UnboundedReceiver<Command>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let ctx = Ctx {
            cfg: Arc::new(cfg),
            accounts,
            stores,
            lockout: Arc::new(Mutex::new(Lockout::default())),
            commands: tx,
            ports,
            live,
            secure_stores: Arc::default(),
        };
        (
            StoreService {
                ctx,
                sent: HashMap::new(),
                text_parties: HashSet::new(),
                sessions: HashMap::new(),
            },
            rx,
        )
    }

    /// Reacts to an engine event (reads the engine, spawns the work).
    pub(crate) fn on_event<M: MediaBackend>(&mut self, engine: &Engine<M>, ev: &EngineEvent) {
        match ev {
            EngineEvent::StoreRequest {
                call,
                side,
                tx,
                request,
            } => self.store_request(
                engine,
                *call,
                *side,
                request::Origin::Sip {
                    tx: *tx,
                    body: request.body.clone(),
                },
            ),
            EngineEvent::FeatureCode { call, side, pin } => self.store_request(
                engine,
                *call,
                *side,
                request::Origin::Dtmf { pin: pin.clone() },
            ),
            EngineEvent::SessionOffer {
                session,
                identity,
                request,
                source,
                local,
            } => {
                let sip = session::SipEnds {
                    remote: *source,
                    local: *local,
                };
                let rt =
                    session::offer(&self.ctx, *session, identity.clone(), request.clone(), sip);
                self.sessions.insert(*session, rt);
            }
            EngineEvent::SessionAcked(s) => {
                if let Some(rt) = self.sessions.get(s) {
                    rt.acked();
                }
            }
            EngineEvent::SessionEnded { session, .. } => {
                if let Some(rt) = self.sessions.get(session) {
                    rt.ended();
                }
            }
            EngineEvent::OwnRequestDone { tx, status, .. }
            | EngineEvent::OutOfDialogDone { tx, status } => {
                self.on_notification_done(*tx, *status)
            }
            EngineEvent::CallEnded(call, _) => {
                self.text_parties
                    .retain(|t| !matches!(t, Target::InCall(c, _) if c == call));
            }
            // Share events belong to the share service.
            EngineEvent::CallAnswered(_)
            | EngineEvent::ShareRequest { .. }
            | EngineEvent::ShareRelayAnswered { .. } => {}
        }
    }

    fn store_request<M: MediaBackend>(
        &mut self,
        engine: &Engine<M>,
        call: CallKey,
        side: Side,
        origin: request::Origin,
    ) {
        let (Some(receiver), Some(sender)) =
            (engine.party(call, side), engine.party(call, side.other()))
        else {
            return;
        };
        let secure = engine.leg_transport(call, side) == Some(Transport::Tls);
        let job = request::Job {
            call,
            side,
            receiver,
            sender,
            origin,
            secure,
        };
        let ctx = self.ctx.clone();
        tokio::spawn(async move { request::handle(ctx, job).await });
    }

    /// Applies a command to the engine.
    pub(crate) fn apply<M: MediaBackend>(
        &mut self,
        engine: &mut Engine<M>,
        cmd: Command,
        now: Instant,
    ) {
        match cmd {
            Command::RespondRequest {
                tx,
                status,
                content_type,
                body,
            } => engine.respond_request(tx, status, Some(content_type), Bytes::from(body), now),
            Command::RejectRequest { tx, code, detail } => {
                engine.reject_request(tx, code, &detail, now)
            }
            Command::Notify(n) => self.notify(engine, n, now),
            Command::AcceptSession { session, sdp } => {
                if !engine.accept_session(session, Bytes::from(sdp), now) {
                    if let Some(rt) = self.sessions.get(&session) {
                        rt.ended();
                    }
                }
            }
            Command::RejectSession { session, refusal } => {
                engine.reject_session(
                    session,
                    refusal.code,
                    &refusal.detail,
                    refusal.retry_after,
                    now,
                );
                self.sessions.remove(&session);
            }
            Command::EndSession { session, reason } => engine.end_session(session, reason, now),
            Command::SessionGone(session) => {
                self.sessions.remove(&session);
            }
            Command::Ready { receiver, ready } => {
                let user = receiver.split('@').next().unwrap_or_default().to_string();
                // In-dialog on the receiver's leg while its call lasts, else to its contacts.
                let target = match engine.call_of(&receiver) {
                    Some((call, side)) => Target::InCall(call, side),
                    None => Target::User(user.clone()),
                };
                let ctx = self.ctx.clone();
                tokio::spawn(async move {
                    let prefer_text = request::prefers_text(&ctx, &user).await;
                    ctx.send(Command::Notify(Notification {
                        target,
                        content_type: wire::READY,
                        json: serde_json::to_string(&ready).unwrap_or_default(),
                        text: ready.to_text(),
                        prefer_text,
                    }));
                });
            }
        }
    }

    /// Sends a notification as JSON (MESSAGE or INFO, `prompt_method`) or as text/plain
    /// MESSAGE when the UA wants text.
    fn notify<M: MediaBackend>(&mut self, engine: &mut Engine<M>, n: Notification, now: Instant) {
        let text = n.prefer_text || self.text_parties.contains(&n.target);
        let info = self.ctx.cfg.store.prompt_method == PromptMethod::Info && !text;
        let method = if info { Method::Info } else { Method::Message };
        let (ct, body) = if text {
            ("text/plain;charset=utf-8", n.text.clone())
        } else {
            (n.content_type, n.json.clone())
        };
        let mut headers = vec![("Content-Type", ct)];
        if info {
            headers.push(("Info-Package", "callvault"));
        }
        let body = Bytes::from(body);
        let ids = match &n.target {
            Target::InCall(call, side) => engine
                .send_in_dialog(*call, *side, method, &headers, body, now)
                .into_iter()
                .collect(),
            Target::User(user) => engine.send_to_user(user, method, &headers, body, now),
        };
        if !text {
            for id in ids {
                self.sent.insert(id, n.clone());
            }
        }
    }

    /// A UA that refuses JSON (415/488/405/501) gets the text form once, and text from then on.
    fn on_notification_done(&mut self, tx: ClientTxId, status: u16) {
        let Some(n) = self.sent.remove(&tx) else {
            return;
        };
        if matches!(status, 415 | 488 | 405 | 501) {
            self.text_parties.insert(n.target.clone());
            self.ctx.send(Command::Notify(Notification {
                prefer_text: true,
                ..n
            }));
        }
    }

    /// An upload's event (`http/upload.rs`): at its threshold, the ready note to the receiver
    /// like an RTP store's (in-dialog while the receiver's call lasts, else out of dialog).
    pub(crate) fn on_http_event(&mut self, ev: crate::http::HttpEvent) {
        let crate::http::HttpEvent::ThresholdReached {
            store_id,
            received_bytes,
            state,
        } = ev
        else {
            return;
        };
        let ctx = self.ctx.clone();
        tokio::spawn(async move {
            match ctx.stores.get(&store_id).await {
                Ok(Some(store)) => session::ready(&ctx, &store, received_bytes, state),
                Ok(None) => {}
                Err(e) => tracing::warn!(store = %store_id, error = %e, "ready note not sent"),
            }
        });
    }

    /// A clean shutdown (PROTOCOL.md 4): every store session stops and finishes `truncated`
    /// with its committed data, every play session ends. Their tasks report
    /// [`Command::SessionGone`]; [`StoreService::sessions_left`] counts who is still at it.
    pub(crate) fn shutdown(&self) {
        for rt in self.sessions.values() {
            rt.shutdown();
        }
    }

    /// Store and play sessions not finished yet.
    pub(crate) fn sessions_left(&self) -> usize {
        self.sessions.len()
    }
}
