//! The B2BUA engine, sans-IO: SIP messages, transport events and `now` go in; transmits and
//! media commands come out. Split the way quinn-proto splits `Endpoint` and `Connection`:
//! [`Engine`] here is the dispatcher, owning what is shared by every call (the transaction
//! layer, the registrar, digest auth and admission, routing, local sessions) and the map of
//! calls, keyed by dialog (Call-ID, our tag); it answers out-of-dialog requests itself and hands
//! everything of one call to that call's state machine in [`call`] (`Call`, `Leg`: the two
//! dialogs, relaying between them, ACKs, SDP anchoring, hang-up). The server's core task feeds
//! it (see `server.rs`).
//!
//! A call is two dialogs: leg A (the caller and us, we are UAS) and leg B (us and the callee,
//! we are UAC), each with its own Call-ID, tags and CSeq space. Requests in one leg's dialog
//! are re-originated in the other leg's dialog and their responses relayed back; SDP is
//! rewritten so both ends send RTP to our relay ports (PROTOCOL.md §1).
//!
//! Proxies in the path (RFC 3261 §12, RFC 3327): each leg's dialog keeps its own route set
//! (leg A: the INVITE's Record-Route, which our 1xx/2xx carry back; leg B: the 2xx's reversed)
//! and the leg's requests go to its first hop. Requests to a registered contact carry the
//! registration's Path as a preloaded route set (`Target`). INFO of our `callvault`
//! package goes only to a party that listed it in Recv-Info (RFC 6086 §4.2.1), else as MESSAGE.

use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use bytes::Bytes;
use rand::distributions::Alphanumeric;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

mod admin;
mod call;
mod dtmf;
mod guard;
mod identity;
mod msg_size;
mod precheck;
mod sessions;
mod share;
mod srtp;

pub(crate) use admin::{CallSnapshot, LegEnds, LegSnapshot, RegistrationSnapshot};
pub(crate) use sessions::{is_local_session_user, SessionKey};

use super::errors::with_error_body;
use super::media::{CallKey, MediaBackend, Side};
use crate::config::{Cidr, SrtpMode};
use crate::error_code::ErrorCode;
use crate::guard::{Admit, AuthGuard, GuardPolicy};
use crate::metrics::{AuthProto, CallOutcome, METRICS};
use crate::sip::auth::{Algorithm, Credentials, Verdict, Verifier};
use crate::sip::dialog::route_request;
use crate::sip::message::{HeaderAccess, Method, Request, Response, SipMessage};
use crate::sip::registrar::{Binding, Registrar, Source};
use crate::sip::transaction::{
    ClientInput, ClientTxId, Peer, ServerInput, ServerTxId, TimerConfig, TransactionLayer,
    Transmit, TxEvent,
};
use crate::sip::transport::Transport;
use crate::sip::uri::{NameAddr, Uri, Via};
use call::{
    call_caller, copy_headers, is_sdp, map_b_failure, recv_info_callvault, route_peer, AnchorError,
    Call, CallState, Leg,
};
pub(crate) use guard::GuardConfig;

/// Methods we answer or relay (Allow header).
pub(crate) const ALLOW: &str =
    "INVITE, ACK, CANCEL, BYE, OPTIONS, INFO, MESSAGE, UPDATE, NOTIFY, REGISTER";

/// More media sections than this in one offer are refused (port 0) rather than anchored.
const MAX_STREAMS: usize = 4;

/// Headers that belong to one hop or one dialog and are never copied between legs.
const HOP_HEADERS: &[&str] = &[
    "Via",
    "From",
    "To",
    "Call-ID",
    "CSeq",
    "Contact",
    "Route",
    "Record-Route",
    "Max-Forwards",
    "Content-Length",
    "Authorization",
    "Proxy-Authorization",
    "WWW-Authenticate",
    "Proxy-Authenticate",
    "Proxy-Require",
    "Require",
    "RSeq",
    "RAck",
    "Recv-Info",
    "Supported",
];

/// A `[[route]]` with its target resolved to an address.
#[derive(Debug, Clone)]
pub struct RouteTarget {
    pub prefix: String,
    pub peer: Peer,
    /// `host:port` as configured, for the Request-URI.
    pub host_port: String,
}

#[derive(Debug, Clone)]
pub struct EngineConfig {
    pub domain: String,
    pub public_ip: IpAddr,
    /// Our listening port per transport (Via and Contact).
    pub udp_port: Option<u16>,
    pub tcp_port: Option<u16>,
    /// The `tls:` listener's port; None: callvault has no TLS listener.
    pub tls_port: Option<u16>,
    pub digest_algorithms: Vec<Algorithm>,
    pub trusted: Vec<Cidr>,
    pub routes: Vec<RouteTarget>,
    pub timers: TimerConfig,
    pub registration_min_expires: u32,
    pub registration_max_expires: u32,
    /// DTMF feature code that starts a store request (`store.feature_code`, e.g. `*7`).
    pub feature_code: String,
    /// Ring timeout and per-source admission (`guard` module).
    pub guard: GuardConfig,
    /// `[media] srtp`: terminate SDES-SRTP per leg, or relay it untouched.
    pub srtp: SrtpMode,
}

/// What digest needs to know about an account.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccountAuth {
    pub ha1_md5: String,
    pub ha1_sha256: String,
}

impl AccountAuth {
    fn ha1(&self, alg: Algorithm) -> &str {
        match alg {
            Algorithm::Md5 => &self.ha1_md5,
            Algorithm::Sha256 => &self.ha1_sha256,
        }
    }
}

/// Where an out-of-dialog request of ours goes: its Request-URI, the Route values of a
/// preloaded route set (a registration's Path, RFC 3327) and the first hop's address.
#[derive(Debug, Clone)]
struct Target {
    request_uri: String,
    routes: Vec<String>,
    peer: Peer,
}

impl Target {
    /// A registered contact, reached through the Path it was registered with (§8.1.2 with
    /// the Path as preloaded route set). Without Path: its Contact at the REGISTER's source.
    fn binding(b: &Binding) -> Target {
        let source = Peer {
            transport: b.source.transport,
            addr: b.source.addr,
        };
        let (uri, routes) = route_request(&b.contact.uri, &b.path);
        Target {
            request_uri: uri.to_string(),
            routes,
            peer: route_peer(&b.path, source),
        }
    }

    /// A Request-URI at a known address, no route set.
    fn direct(request_uri: String, peer: Peer) -> Target {
        Target {
            request_uri,
            routes: Vec::new(),
            peer,
        }
    }

    /// Request line, Via, Max-Forwards and Route headers of a request to this target.
    fn request(&self, method: Method, via: &Via, max_forwards: u32) -> Request {
        let mut r = Request::new(method, self.request_uri.clone());
        r.headers.push("Via", via.to_string());
        r.headers.push("Max-Forwards", max_forwards.to_string());
        for route in &self.routes {
            r.headers.push("Route", route.clone());
        }
        r
    }
}

/// What a client transaction we started is for.
#[derive(Debug, Clone)]
enum Pending {
    /// The INVITE on leg B.
    BInvite(CallKey),
    /// A request relayed from `origin`'s server transaction onto the other leg.
    Relay {
        call: CallKey,
        origin: Side,
        server_tx: ServerTxId,
        method: Method,
        cseq: u32,
    },
    /// An out-of-dialog request relayed from a server transaction (MESSAGE).
    Standalone { server_tx: ServerTxId },
    /// A share request relayed to the sharer: its final answer goes up as
    /// [`EngineEvent::ShareRelayAnswered`] instead of back to the requester.
    ShareRelay { server_tx: ServerTxId },
    /// A request callvault itself originated in a call (BYE on teardown, feature requests).
    Own { call: CallKey, side: Side },
    /// An out-of-dialog request of callvault's own (notifications to a user's contacts).
    OutOfDialog,
}

/// Things the engine reports to the layers above it (features, metrics, tests).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EngineEvent {
    CallAnswered(CallKey),
    CallEnded(CallKey, CallOutcome),
    /// An in-dialog MESSAGE/INFO carrying a store request from `side` (the receiver). Not
    /// answered yet: the layer above answers with `respond_request`/`reject_request`.
    StoreRequest {
        call: CallKey,
        side: Side,
        tx: ServerTxId,
        request: Request,
    },
    /// `*7 PIN #` completed by the party on `side` (INFO digits or RFC 4733 events).
    FeatureCode {
        call: CallKey,
        side: Side,
        pin: String,
    },
    /// An INVITE for a local session (store or play URI), authenticated as `identity`.
    SessionOffer {
        session: SessionKey,
        identity: String,
        request: Request,
        source: SocketAddr,
        /// callvault's own SIP address on the session's transport.
        local: SocketAddr,
    },
    /// The ACK for a session's 2xx arrived.
    SessionAcked(SessionKey),
    /// The session is over (`by_remote`: BYE or CANCEL from the far end).
    SessionEnded {
        session: SessionKey,
        by_remote: bool,
    },
    /// Final response to an out-of-dialog request of ours (`send_to_user`).
    OutOfDialogDone {
        tx: ClientTxId,
        status: u16,
    },
    /// Final response to a request callvault originated in a call (`send_in_dialog`).
    OwnRequestDone {
        call: CallKey,
        side: Side,
        tx: ClientTxId,
        status: u16,
    },
    /// An out-of-dialog MESSAGE carrying a share request (PROTOCOL §3 step 2), authenticated,
    /// not answered yet: the layer above relays it (`relay_share_request`) or answers it.
    ShareRequest {
        tx: ServerTxId,
        request: Request,
        /// `user@domain` of a digest-authenticated subscriber, or `user@host` of a trusted
        /// peer's From URI.
        requester: String,
        /// The Request-URI user (the sharer's account).
        sharer: String,
        /// The sharer has a registered contact now.
        registered: bool,
        /// Where the request came from (the offer goes there when the requester has no
        /// registered contact).
        source: Peer,
    },
    /// The sharer's final answer to a relayed share request (408 on Timer F, 480 when it
    /// could not be reached). The requester's transaction `tx` is still unanswered.
    ShareRelayAnswered {
        tx: ServerTxId,
        status: u16,
        content_type: Option<String>,
        body: Bytes,
    },
}

pub struct Engine<M: MediaBackend> {
    cfg: EngineConfig,
    tx: TransactionLayer,
    registrar: Registrar,
    verifier: Verifier,
    /// Digest failures per user and per source; lockouts (issue 10, finding 4).
    auth_guard: AuthGuard,
    accounts: HashMap<String, AccountAuth>,
    media: M,
    calls: HashMap<CallKey, Call>,
    /// (Call-ID, our tag) -> call and leg.
    dialogs: HashMap<(String, String), (CallKey, Side)>,
    /// Call-IDs we generated for B legs: an INVITE carrying one came back to us (loop).
    own_call_ids: HashMap<String, CallKey>,
    a_invites: HashMap<ServerTxId, CallKey>,
    sessions: HashMap<SessionKey, sessions::LocalSession>,
    /// Calls whose feature-code gate holds digits (their 3 s release timers).
    digit_holds: std::collections::HashSet<CallKey>,
    session_dialogs: HashMap<(String, String), SessionKey>,
    session_invites: HashMap<ServerTxId, SessionKey>,
    pending: HashMap<ClientTxId, (Pending, Peer)>,
    events: VecDeque<EngineEvent>,
    next_call: CallKey,
    rng: StdRng,
    epoch: (Instant, u64),
    next_sweep: Option<Instant>,
    /// The out-of-dialog INFO-to-MESSAGE fallback was logged (once per process).
    ood_info_logged: bool,
    guard: guard::Guard,
    /// Client transactions moved from UDP to TCP for their size (RFC 3261 §18.1.1).
    size_switched: msg_size::Switched,
}

impl<M: MediaBackend> Engine<M> {
    /// `epoch` ties the monotonic clock to Unix seconds (digest nonces carry Unix time).
    pub fn new(
        mut cfg: EngineConfig,
        mut media: M,
        verifier: Verifier,
        epoch: (Instant, u64),
        seed: u64,
    ) -> Self {
        // Challenges go out strongest first (RFC 8760 §2.4), whatever order the config lists.
        cfg.digest_algorithms.sort_by_key(|a| match a {
            Algorithm::Sha256 => 0,
            Algorithm::Md5 => 1,
        });
        // The relays hold back the same feature code in RFC 4733 telephone-events.
        media.set_feature_code(&cfg.feature_code);
        let registrar = Registrar::new(
            cfg.registration_min_expires,
            cfg.registration_max_expires,
            3600.min(cfg.registration_max_expires)
                .max(cfg.registration_min_expires),
        );
        Engine {
            tx: TransactionLayer::new(cfg.timers),
            guard: guard::Guard::new(cfg.guard),
            cfg,
            registrar,
            verifier,
            auth_guard: AuthGuard::new(AuthProto::Sip, GuardPolicy::default()),
            accounts: HashMap::new(),
            media,
            calls: HashMap::new(),
            dialogs: HashMap::new(),
            own_call_ids: HashMap::new(),
            a_invites: HashMap::new(),
            sessions: HashMap::new(),
            digit_holds: std::collections::HashSet::new(),
            session_dialogs: HashMap::new(),
            session_invites: HashMap::new(),
            pending: HashMap::new(),
            events: VecDeque::new(),
            next_call: 1,
            rng: StdRng::seed_from_u64(seed),
            epoch,
            next_sweep: None,
            ood_info_logged: false,
            size_switched: Default::default(),
        }
    }

    // ---------------------------------------------------------------------------------------
    // Driving

    pub fn handle_message(&mut self, msg: SipMessage, peer: Peer, now: Instant) {
        match msg {
            SipMessage::Request(req) => {
                let Some(req) = self.admit(req, peer, now) else {
                    return self.after(now);
                };
                match self.tx.on_request(req, peer, now) {
                    ServerInput::New(id, req) => self.on_new_request(id, req, peer, now),
                    ServerInput::Ack(req) => self.on_ack(req),
                    ServerInput::Cancelled { invite, .. } => self.on_cancel(invite, now),
                    ServerInput::Absorbed | ServerInput::Answered | ServerInput::Dropped => {}
                }
            }
            SipMessage::Response(resp) => match self.tx.on_response(resp, peer, now) {
                ClientInput::Response(id, resp) => self.on_response(id, resp, now),
                ClientInput::Retransmission2xx(id, resp) => self.resend_ack(id, &resp),
                ClientInput::Absorbed | ClientInput::Unmatched(_) => {}
            },
        }
        self.after(now);
    }

    pub fn handle_timeout(&mut self, now: Instant) {
        self.tx.handle_timeout(now);
        self.digit_timeouts(now);
        self.ring_timeouts(now);
        if self.next_sweep.is_some_and(|t| t <= now) {
            self.registrar.expire(now);
            self.next_sweep = None;
        }
        self.after(now);
    }

    /// A connection to `peer` failed: requests waiting on it fail now instead of at Timer B/F.
    pub fn handle_unreachable(&mut self, peer: Peer, now: Instant) {
        let failed: Vec<ClientTxId> = self
            .pending
            .iter()
            .filter(|(_, (_, p))| *p == peer)
            .map(|(id, _)| *id)
            .collect();
        for id in failed {
            let status = self.unreachable_status(id, 480);
            self.fail_client(id, status, now);
        }
        self.after(now);
    }

    /// RTP was silent on both sides of the call for `rtp_timeout`.
    pub fn handle_media_timeout(&mut self, call: CallKey, now: Instant) {
        tracing::info!(call, "RTP timeout, ending call");
        self.hang_up(call, ErrorCode::RtpTimeout, CallOutcome::Timeout, now);
        self.after(now);
    }

    /// `*7 PIN #` keyed as RFC 4733 telephone-events in the call's RTP (the relay swallowed
    /// the packets): reported like the INFO form, as [`EngineEvent::FeatureCode`].
    pub fn handle_media_feature_code(&mut self, call: CallKey, side: Side, pin: String) {
        if !self.calls.contains_key(&call) {
            return;
        }
        tracing::info!(call, ?side, "DTMF feature code in RTP");
        self.events
            .push_back(EngineEvent::FeatureCode { call, side, pin });
    }

    /// Ends every call (SIGTERM): BYE on established legs, 503 to unanswered callers.
    pub fn shutdown(&mut self, now: Instant) {
        let keys: Vec<CallKey> = self.calls.keys().copied().collect();
        for k in keys {
            self.hang_up(k, ErrorCode::Shutdown, CallOutcome::Failed, now);
        }
        let sessions: Vec<SessionKey> = self.sessions.keys().copied().collect();
        for k in sessions {
            self.end_session(k, Some(ErrorCode::Shutdown), now);
        }
        self.after(now);
    }

    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        self.tx.poll_transmit()
    }

    pub fn poll_event(&mut self) -> Option<EngineEvent> {
        self.events.pop_front()
    }

    pub fn poll_timeout(&self) -> Option<Instant> {
        [
            self.tx.poll_timeout(),
            self.next_sweep,
            self.next_digit_timeout(),
            self.guard.next_timeout(),
        ]
        .into_iter()
        .flatten()
        .min()
    }

    /// Installs (or removes, with `None`) what digest needs for `user`.
    pub fn set_account(&mut self, user: &str, auth: Option<AccountAuth>) {
        match auth {
            Some(a) => {
                self.accounts.insert(user.to_string(), a);
            }
            None => {
                self.accounts.remove(user);
            }
        }
    }

    pub fn media(&self) -> &M {
        &self.media
    }

    pub fn media_mut(&mut self) -> &mut M {
        &mut self.media
    }

    pub fn active_calls(&self) -> usize {
        self.calls.len()
    }

    pub fn registrations(&self) -> usize {
        self.registrar.count()
    }

    pub fn tx_stats(&self) -> crate::sip::transaction::TxStats {
        self.tx.stats()
    }

    fn after(&mut self, now: Instant) {
        while let Some(ev) = self.tx.poll_event() {
            match ev {
                TxEvent::Timeout(id) => self.fail_client(id, 408, now),
                TxEvent::AckTimeout(id) => self.on_ack_timeout(id, now),
                TxEvent::ClientTerminated(id) => {
                    self.pending.remove(&id);
                }
                TxEvent::ServerTerminated(id) => {
                    self.a_invites.remove(&id);
                    self.session_invites.remove(&id);
                }
            }
        }
        if self.next_sweep.is_none() && self.registrar.count() > 0 {
            self.next_sweep = Some(now + Duration::from_secs(1));
        }
    }

    // ---------------------------------------------------------------------------------------
    // Helpers

    fn unix(&self, now: Instant) -> u64 {
        self.epoch.1 + now.saturating_duration_since(self.epoch.0).as_secs()
    }

    fn token(&mut self, n: usize) -> String {
        (0..n)
            .map(|_| self.rng.sample(Alphanumeric) as char)
            .collect()
    }

    fn local_port(&self, t: Transport) -> u16 {
        match t {
            Transport::Udp => self.cfg.udp_port.or(self.cfg.tcp_port),
            Transport::Tcp => self.cfg.tcp_port.or(self.cfg.udp_port),
            Transport::Tls => self.cfg.tls_port.or(Some(5061)),
        }
        .unwrap_or(5060)
    }

    fn host(&self) -> String {
        match self.cfg.public_ip {
            IpAddr::V6(v6) => format!("[{v6}]"),
            v4 => v4.to_string(),
        }
    }

    fn new_via(&mut self, t: Transport) -> Via {
        let branch = format!("z9hG4bK{}", self.token(16));
        Via {
            transport: t.as_str().to_ascii_uppercase(),
            host: self.host(),
            port: Some(self.local_port(t)),
            params: vec![("branch".into(), Some(branch)), ("rport".into(), None)],
        }
    }

    fn contact(&self, t: Transport) -> NameAddr {
        let mut uri = Uri::sip(Some("callvault"), &self.host(), Some(self.local_port(t)));
        if t != Transport::Udp {
            uri.set_param("transport", Some(t.as_str()));
        }
        NameAddr::new(uri)
    }

    fn is_trusted(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
            v4 => v4,
        };
        self.cfg.trusted.iter().any(|c| c.contains(ip))
    }

    fn respond(&mut self, tx: ServerTxId, resp: Response, now: Instant) {
        if let Err(e) = self.tx.respond(tx, resp, now) {
            tracing::debug!(error = %e, "response not sent");
        }
    }

    /// Answers with a status of our own, JSON error body and Warning (PROTOCOL.md §5).
    fn reject(
        &mut self,
        tx: ServerTxId,
        req: &Request,
        status: u16,
        code: ErrorCode,
        detail: &str,
        now: Instant,
    ) {
        let mut resp = req.response(status, None);
        resp.ensure_to_tag(&self.token(10));
        let resp = with_error_body(resp, code, detail);
        self.respond(tx, resp, now);
    }

    /// Answers with a plain protocol status (no body).
    fn reply(&mut self, tx: ServerTxId, req: &Request, status: u16, now: Instant) {
        let mut resp = req.response(status, None);
        if status > 100 {
            resp.ensure_to_tag(&self.token(10));
        }
        self.respond(tx, resp, now);
    }

    // ---------------------------------------------------------------------------------------
    // Requests

    fn on_new_request(&mut self, tx: ServerTxId, req: Request, peer: Peer, now: Instant) {
        if req.to_tag().is_some() {
            return self.on_in_dialog(tx, req, now);
        }
        if self.refuse_early(tx, &req, now) {
            return;
        }
        match req.method {
            Method::Register => self.on_register(tx, req, peer, now),
            Method::Options => {
                let mut resp = req.response(200, None);
                resp.ensure_to_tag(&self.token(10));
                resp.headers.push("Allow", ALLOW);
                resp.headers.push("Accept", "application/sdp");
                resp.headers.push("Recv-Info", "callvault");
                self.respond(tx, resp, now);
            }
            Method::Invite => self.on_invite(tx, req, peer, now),
            Method::Message => self.on_message(tx, req, peer, now),
            Method::Bye
            | Method::Cancel
            | Method::Info
            | Method::Update
            | Method::Prack
            | Method::Notify => self.reply(tx, &req, 481, now),
            Method::Other(_) => self.reply(tx, &req, 501, now),
            _ => {
                let mut resp = req.response(405, None);
                resp.ensure_to_tag(&self.token(10));
                resp.headers.push("Allow", ALLOW);
                self.respond(tx, resp, now);
            }
        }
    }

    /// Digest authentication (RFC 7616/8760); `Some(user)` when the request may proceed.
    /// Trusted peers are not challenged; their identity is the From URI user.
    fn authenticate(
        &mut self,
        tx: ServerTxId,
        req: &Request,
        peer: Peer,
        now: Instant,
    ) -> Option<String> {
        if self.is_trusted(peer.addr.ip()) {
            let user = req.from_hdr().and_then(|f| f.uri.user_unescaped());
            if user.is_none() {
                // Answered, never dropped: the peer learns why (RFC 4475 §3.3.4).
                let detail = "a trusted peer's From must name a user";
                self.reject(tx, req, 403, ErrorCode::Forbidden, detail, now);
            }
            return user;
        }
        let register = req.method == Method::Register;
        let (cred_hdr, chal_hdr, status) = if register {
            ("Authorization", "WWW-Authenticate", 401)
        } else {
            ("Proxy-Authorization", "Proxy-Authenticate", 407)
        };
        let unix = self.unix(now);
        let mut stale = false;
        let source = Some(peer.addr.ip());
        let creds: Vec<Credentials> = req
            .headers
            .get_all(cred_hdr)
            .filter_map(|v| Credentials::parse(v).ok())
            .filter(|c| c.realm == self.cfg.domain)
            .collect();
        for c in creds {
            if !self.cfg.digest_algorithms.contains(&c.algorithm) {
                continue;
            }
            // A locked user or source is refused before any check: 503 with Retry-After
            // (RFC 3261 21.5.4) tells a UA to come back later, where 403 would say never.
            let admit = self.auth_guard.check(&c.username, source, now);
            if admit != Admit::Go {
                let mut resp = req.response(503, None);
                resp.ensure_to_tag(&self.token(10));
                resp.headers
                    .push("Retry-After", admit.retry_after_secs().to_string());
                let resp = with_error_body(
                    resp,
                    ErrorCode::LoginLockedOut,
                    "too many failed authentications; retry later",
                );
                self.respond(tx, resp, now);
                return None;
            }
            let ha1 = self
                .accounts
                .get(&c.username)
                .map(|a| a.ha1(c.algorithm).to_string());
            match self.verifier.verify(
                &c,
                &self.cfg.domain,
                ha1.as_deref(),
                req.method.as_str(),
                unix,
            ) {
                Verdict::Ok => {
                    self.auth_guard.success(&c.username, now);
                    return Some(c.username);
                }
                Verdict::Stale => stale = true,
                v => {
                    if matches!(v, Verdict::BadResponse | Verdict::UnknownUser) {
                        self.auth_guard.failure(&c.username, source, now);
                    }
                    tracing::debug!(user = %c.username, verdict = ?v, "digest rejected");
                }
            }
        }
        let mut resp = req.response(status, None);
        resp.ensure_to_tag(&self.token(10));
        for ch in
            self.verifier
                .challenges(&self.cfg.domain, &self.cfg.digest_algorithms, stale, unix)
        {
            resp.headers.push(chal_hdr, ch.to_header_value());
        }
        self.respond(tx, resp, now);
        None
    }

    fn on_register(&mut self, tx: ServerTxId, req: Request, peer: Peer, now: Instant) {
        let Some(user) = self.authenticate(tx, &req, peer, now) else {
            return;
        };
        let Some(to) = req.to_hdr() else {
            return self.reply(tx, &req, 400, now);
        };
        let to_user = to.uri.user_unescaped().unwrap_or_default();
        if to_user != user && !self.is_trusted(peer.addr.ip()) {
            return self.reject(
                tx,
                &req,
                403,
                ErrorCode::Forbidden,
                "To user differs from the authenticated user",
                now,
            );
        }
        let aor = format!("{}@{}", to_user, self.cfg.domain);
        let source = Source {
            transport: peer.transport,
            addr: peer.addr,
        };
        match self.registrar.register(&aor, &req, source, now) {
            Ok(outcome) => {
                let mut resp = req.response(200, None);
                resp.ensure_to_tag(&self.token(10));
                for c in outcome.contacts() {
                    resp.headers.push("Contact", c);
                }
                // RFC 3327 §5.3: the stored Path, echoed to a UA that supports it.
                for p in &outcome.echo_path {
                    resp.headers.push("Path", p.to_string());
                }
                resp.headers.push("Supported", "path");
                self.respond(tx, resp, now);
            }
            Err(e) => {
                // The registrar's answer names the fault and carries Min-Expires for 423.
                let mut resp = e.response(&req);
                resp.ensure_to_tag(&self.token(10));
                self.respond(tx, resp, now);
            }
        }
    }

    /// Out-of-dialog MESSAGE (RFC 3428) to a subscriber or a routed user: re-originated
    /// towards the target like an INVITE's leg B, the answer relayed back. Share requests
    /// (PROTOCOL §3) go up as [`EngineEvent::ShareRequest`] instead.
    fn on_message(&mut self, tx: ServerTxId, req: Request, peer: Peer, now: Instant) {
        let mf = req.max_forwards().unwrap_or(70);
        if mf == 0 {
            return self.reply(tx, &req, 483, now);
        }
        let Some(identity) = self.authenticate(tx, &req, peer, now) else {
            return;
        };
        let user = req
            .parsed_uri()
            .ok()
            .and_then(|u| u.user_unescaped())
            .unwrap_or_default();
        if share::is_share_request(&req) {
            return self.share_request(tx, req, peer, identity, user, now);
        }
        let Some(target) = self.resolve_target(&user, now) else {
            return self.reject(
                tx,
                &req,
                404,
                ErrorCode::NotFound,
                &format!("no registration or route for {user}"),
                now,
            );
        };
        let Some(target) = self.secure_target(tx, &req, target, now) else {
            return;
        };
        self.forward_message(&req, &target, Pending::Standalone { server_tx: tx }, now);
    }

    /// Re-originates an out-of-dialog MESSAGE towards `target`: our own Call-ID, From tag
    /// and Via, end-to-end headers and body copied.
    fn forward_message(&mut self, req: &Request, target: &Target, pending: Pending, now: Instant) {
        let mf = req.max_forwards().unwrap_or(70);
        let to_peer = target.peer;
        let via = self.new_via(to_peer.transport);
        let mut out = target.request(Method::Message, &via, mf.saturating_sub(1));
        if let Some(mut from) = req.from_hdr() {
            let tag = self.token(10);
            from.set_tag(&tag);
            out.headers.push("From", from.to_string());
        }
        if let Some(to) = req.headers.get("To") {
            out.headers.push("To", to.to_string());
        }
        out.headers.push("Call-ID", format!("cv{}", self.token(22)));
        out.headers.push("CSeq", "1 MESSAGE");
        copy_headers(&req.headers, &mut out.headers);
        out.body = req.body.clone();
        match self.send_fitted(out, to_peer, now) {
            Ok((id, to_peer)) => {
                self.pending.insert(id, (pending, to_peer));
            }
            Err(e) => self.too_large(pending, &e, now),
        }
    }

    fn on_invite(&mut self, tx: ServerTxId, req: Request, peer: Peer, now: Instant) {
        let mf = req.max_forwards().unwrap_or(70);
        if mf == 0 {
            return self.reply(tx, &req, 483, now);
        }
        if req
            .call_id()
            .is_some_and(|c| self.own_call_ids.contains_key(c))
        {
            return self.reject(
                tx,
                &req,
                482,
                ErrorCode::LoopDetected,
                "the INVITE came back to callvault",
                now,
            );
        }
        // Scheme and Require were checked in `refuse_early`.
        let Ok(ruri) = req.parsed_uri() else {
            return self.reply(tx, &req, 416, now);
        };
        let Some(caller) = self.authenticate(tx, &req, peer, now) else {
            return;
        };
        if self.refuse_spoofed_from(tx, &req, peer, &caller, now) {
            return;
        }
        let callee = ruri.user_unescaped().unwrap_or_default();
        if is_local_session_user(&callee) {
            return self.offer_session(tx, req, peer, caller);
        }
        let Some(target) = self.resolve_target(&callee, now) else {
            return self.reject(
                tx,
                &req,
                404,
                ErrorCode::NotFound,
                &format!("no registration or route for {callee}"),
                now,
            );
        };
        let Some(target) = self.secure_target(tx, &req, target, now) else {
            return;
        };

        let b_peer = target.peer;
        let key = self.next_call;
        self.next_call += 1;
        let a_tag = self.token(10);
        let b_call_id = format!("cv{}", self.token(22));
        let b_tag = self.token(10);
        let a = Leg::new(
            req.call_id().unwrap_or_default().to_string(),
            a_tag,
            peer,
            recv_info_callvault(&req).unwrap_or(false),
        );
        let b = Leg::new(b_call_id.clone(), b_tag, b_peer, false);
        let parties = (
            format!("{caller}@{}", self.cfg.domain),
            format!("{callee}@{}", self.cfg.domain),
        );
        let inv = self.b_invite(&req, &ruri, &target, (&a, &b), &caller);
        let call = Call::new(a, b, req.clone(), tx, parties, &self.cfg.feature_code, now);
        if !self.place_call(key, call, inv, now) {
            return;
        }
        tracing::info!(call = key, caller = %call_caller(&self.calls, key), callee = %callee, "call started");
    }

    /// Takes on a new call and sends leg B's INVITE `inv`, its offer anchored first. False
    /// (the caller answered, the call forgotten) when the offer cannot be anchored or the
    /// INVITE does not fit any transport.
    fn place_call(&mut self, key: CallKey, call: Call, mut inv: Request, now: Instant) -> bool {
        let (Some(tx), req) = (call.a_invite_tx, call.a_invite.clone()) else {
            return false;
        };
        let (peer, b_peer, b_call_id) = (call.a.peer, call.b.peer, call.b.call_id.clone());
        self.calls.insert(key, call);
        if is_sdp(&req) {
            match self.anchor_sdp(key, &req.body, Side::A) {
                Ok(body) => inv.body = body,
                Err(e) => {
                    self.drop_call(key);
                    self.refuse_offer(tx, &req, e, now);
                    return false;
                }
            }
        }
        let (b_tx, b_peer) = match self.send_fitted(inv, b_peer, now) {
            Ok(sent) => sent,
            Err(e) => {
                self.drop_call(key);
                let detail = e.to_string();
                self.reject(tx, &req, 513, ErrorCode::MessageTooLarge, &detail, now);
                return false;
            }
        };
        self.pending.insert(b_tx, (Pending::BInvite(key), b_peer));
        self.a_invites.insert(tx, key);
        self.own_call_ids.insert(b_call_id, key);
        if let Some(c) = self.calls.get_mut(&key) {
            c.b_invite_tx = Some(b_tx);
        }
        self.call_opened(key, peer, now);
        METRICS.calls_active.inc();
        true
    }

    /// Leg B's INVITE to `target` for the caller's INVITE `req` (on leg `a`, authenticated as
    /// `caller`): a new Call-ID and From tag, the caller's From and To, end-to-end headers and
    /// body copied, our Contact and `Recv-Info: callvault`, the caller's asserted identity.
    fn b_invite(
        &mut self,
        req: &Request,
        ruri: &Uri,
        target: &Target,
        (a, b): (&Leg, &Leg),
        caller: &str,
    ) -> Request {
        // The caller's Max-Forwards was checked to be above 0.
        let max_forwards = req.max_forwards().unwrap_or(70).saturating_sub(1);
        let via = self.new_via(target.peer.transport);
        let mut inv = target.request(Method::Invite, &via, max_forwards);
        let mut from = req
            .from_hdr()
            .unwrap_or_else(|| NameAddr::new(Uri::sip(Some(caller), &self.cfg.domain, None)));
        from.set_tag(&b.local_tag);
        inv.headers.push("From", from.to_string());
        let mut to = req.to_hdr().unwrap_or_else(|| NameAddr::new(ruri.clone()));
        to.params.retain(|(n, _)| !n.eq_ignore_ascii_case("tag"));
        inv.headers.push("To", to.to_string());
        inv.headers.push("Call-ID", b.call_id.clone());
        inv.headers.push("CSeq", "1 INVITE");
        inv.headers
            .push("Contact", self.contact(target.peer.transport).to_string());
        inv.headers.push("Recv-Info", "callvault");
        copy_headers(&req.headers, &mut inv.headers);
        self.assert_identity(&mut inv, req, a.peer, caller);
        if !req.headers.has("Allow") {
            inv.headers.push("Allow", ALLOW);
        }
        inv.body = req.body.clone();
        inv
    }

    /// Answers a caller's INVITE whose offer could not be anchored: 400 for bad SDP, 488 for
    /// SRTP without a usable crypto line, 503 with Retry-After when no relay ports are free.
    fn refuse_offer(&mut self, tx: ServerTxId, req: &Request, e: AnchorError, now: Instant) {
        match e {
            AnchorError::Sdp(e) => self.reject(
                tx,
                req,
                400,
                ErrorCode::MalformedMessage,
                &format!("bad SDP: {e}"),
                now,
            ),
            AnchorError::NoCrypto => self.reject(
                tx,
                req,
                488,
                ErrorCode::NoSupportedCrypto,
                "RTP/SAVP needs an a=crypto line with AES_CM_128_HMAC_SHA1_80 or _32",
                now,
            ),
            AnchorError::Media(e) => {
                let mut resp = req.response(503, None);
                resp.ensure_to_tag(&self.token(10));
                resp.headers.push("Retry-After", "5");
                let resp = with_error_body(resp, ErrorCode::Overloaded, &e.to_string());
                self.respond(tx, resp, now);
            }
        }
    }

    /// The callee's newest registered contact (through its Path), else the first matching
    /// `[[route]]`.
    fn resolve_target(&self, user: &str, now: Instant) -> Option<Target> {
        let aor = format!("{}@{}", user, self.cfg.domain);
        if let Some(b) = self.registrar.lookup(&aor, now).into_iter().next() {
            return Some(Target::binding(&b));
        }
        let route = self
            .cfg
            .routes
            .iter()
            .find(|r| user.starts_with(&r.prefix))?;
        let mut uri = format!("sip:{}@{}", user, route.host_port);
        if route.peer.transport != Transport::Udp {
            uri.push_str(";transport=");
            uri.push_str(route.peer.transport.as_str());
        }
        Some(Target::direct(uri, route.peer))
    }

    /// RFC 3261 §26.2.2 / RFC 5630 §3.1.3: a `sips:` Request-URI is only ever forwarded over
    /// TLS, and stays `sips:`. Returns the target to use, or None (and the request
    /// answered) when its first hop is not TLS: `416` when callvault has no TLS at all, else `480`
    /// (the target is known, but not reachable securely).
    fn secure_target(
        &mut self,
        tx: ServerTxId,
        req: &Request,
        mut target: Target,
        now: Instant,
    ) -> Option<Target> {
        let sips = req
            .parsed_uri()
            .is_ok_and(|u| u.scheme.eq_ignore_ascii_case("sips"));
        if !sips {
            return Some(target);
        }
        if target.peer.transport == Transport::Tls {
            if let Some(rest) = target.request_uri.strip_prefix("sip:") {
                target.request_uri = format!("sips:{rest}");
            }
            return Some(target);
        }
        if self.cfg.tls_port.is_none() {
            self.reply(tx, req, 416, now);
        } else {
            self.reject(
                tx,
                req,
                480,
                ErrorCode::SipsNeedsTls,
                "a sips: target is only reached over TLS, and this one is not",
                now,
            );
        }
        None
    }

    // ---------------------------------------------------------------------------------------
    // Responses

    fn on_response(&mut self, id: ClientTxId, resp: Response, now: Instant) {
        let Some((pending, _)) = self.pending.get(&id).cloned() else {
            return;
        };
        match pending {
            Pending::BInvite(key) => self.on_b_invite_response(key, id, resp, now),
            Pending::Relay {
                call,
                origin,
                server_tx,
                method,
                cseq,
            } => self.on_relay_response(call, origin, server_tx, method, cseq, resp, now),
            Pending::Standalone { server_tx } => {
                if resp.status == 100 {
                    return;
                }
                let Some(orig) = self.tx.server_request(server_tx).cloned() else {
                    return;
                };
                let mut out = orig.response(resp.status, Some(&resp.reason));
                let tag = self.token(10);
                out.ensure_to_tag(&tag);
                copy_headers(&resp.headers, &mut out.headers);
                let mut out = map_b_failure(out);
                out.body = resp.body.clone();
                self.respond(server_tx, out, now);
            }
            Pending::ShareRelay { server_tx } => self.on_share_relay_response(id, server_tx, resp),
            Pending::OutOfDialog => {
                if resp.status >= 200 {
                    self.pending.remove(&id);
                    self.events.push_back(EngineEvent::OutOfDialogDone {
                        tx: id,
                        status: resp.status,
                    });
                }
            }
            Pending::Own { call, side, .. } => {
                if resp.status >= 200 {
                    self.pending.remove(&id);
                    self.events.push_back(EngineEvent::OwnRequestDone {
                        call,
                        side,
                        tx: id,
                        status: resp.status,
                    });
                }
            }
        }
    }

    /// A client transaction failed without a response (Timer B/F, 408) or its peer could not
    /// be reached (480).
    fn fail_client(&mut self, id: ClientTxId, status: u16, now: Instant) {
        let Some((pending, _)) = self.pending.remove(&id) else {
            return;
        };
        match pending {
            Pending::BInvite(key) => {
                let Some(call) = self.calls.get(&key) else {
                    return;
                };
                match (call.state, call.a_invite_tx) {
                    (CallState::Early, Some(a_tx)) => {
                        let a_invite = call.a_invite.clone();
                        let (code, detail) = match status {
                            408 => (ErrorCode::Timeout, "the callee did not answer in time"),
                            513 => (ErrorCode::MessageTooLarge, msg_size::TOO_LARGE_FOR_CALLEE),
                            _ => (ErrorCode::Unreachable, "the callee could not be reached"),
                        };
                        self.reject(a_tx, &a_invite, status, code, detail, now);
                        self.end_call(key, CallOutcome::Failed);
                    }
                    (CallState::Ending, _) => self.drop_call(key),
                    _ => {}
                }
            }
            Pending::Relay { server_tx, .. } | Pending::Standalone { server_tx } => {
                if let Some(orig) = self.tx.server_request(server_tx).cloned() {
                    self.reply(server_tx, &orig, status, now);
                }
            }
            Pending::ShareRelay { server_tx } => {
                self.events.push_back(EngineEvent::ShareRelayAnswered {
                    tx: server_tx,
                    status,
                    content_type: None,
                    body: Bytes::new(),
                })
            }
            Pending::Own { call, side, .. } => self.events.push_back(EngineEvent::OwnRequestDone {
                call,
                side,
                tx: id,
                status,
            }),
            Pending::OutOfDialog => self
                .events
                .push_back(EngineEvent::OutOfDialogDone { tx: id, status }),
        }
    }

    fn on_ack_timeout(&mut self, id: ServerTxId, now: Instant) {
        if self.session_ack_timeout(id, now) {
            return;
        }
        // The caller never ACKed our 2xx (§13.3.1.4): end the call on both legs.
        let Some(&key) = self.a_invites.get(&id) else {
            return;
        };
        tracing::info!(call = key, "no ACK for 2xx, ending call");
        self.hang_up(key, ErrorCode::NoAck, CallOutcome::Timeout, now);
    }

    // ---------------------------------------------------------------------------------------
    // Relaying and originating in-dialog requests

    /// Answers a request handed up in an event (e.g. `StoreRequest`) with a body of ours.
    pub fn respond_request(
        &mut self,
        tx: ServerTxId,
        status: u16,
        content_type: Option<&str>,
        body: Bytes,
        now: Instant,
    ) {
        let Some(orig) = self.tx.server_request(tx).cloned() else {
            return;
        };
        let mut resp = orig.response(status, None);
        // Out-of-dialog requests (share requests) get their To tag here; in-dialog ones
        // already carry ours.
        if status > 100 {
            resp.ensure_to_tag(&self.token(10));
        }
        if let Some(ct) = content_type {
            resp.headers.push("Content-Type", ct);
            resp.body = body;
        }
        self.respond(tx, resp, now);
        self.after(now);
    }

    /// Refuses a request handed up in an event with our JSON error body and Warning.
    pub fn reject_request(&mut self, tx: ServerTxId, code: ErrorCode, detail: &str, now: Instant) {
        let Some(orig) = self.tx.server_request(tx).cloned() else {
            return;
        };
        self.reject(tx, &orig, code.sip_status(), code, detail, now);
        self.after(now);
    }

    /// Sends an out-of-dialog request of ours to every registered contact of `user`
    /// (notifications). Each final answer comes back as [`EngineEvent::OutOfDialogDone`].
    pub fn send_to_user(
        &mut self,
        user: &str,
        method: Method,
        headers: &[(&str, &str)],
        body: Bytes,
        now: Instant,
    ) -> Vec<ClientTxId> {
        let aor = format!("{user}@{}", self.cfg.domain);
        let bindings = self.registrar.lookup(&aor, now);
        let mut ids = Vec::new();
        for b in bindings {
            let id = self.send_out_of_dialog(
                &Target::binding(&b),
                &format!("<sip:{aor}>"),
                method.clone(),
                headers,
                body.clone(),
                now,
            );
            ids.push(id);
        }
        self.after(now);
        ids
    }

    // ---------------------------------------------------------------------------------------
    // Media anchoring
}

/// Resolves a configured route target (`host:port`) once at start-up.
pub(crate) fn resolve_route(
    prefix: &str,
    host: &str,
    port: u16,
    transport: Transport,
) -> Option<RouteTarget> {
    use std::net::ToSocketAddrs;
    let addr: SocketAddr = (host, port).to_socket_addrs().ok()?.next()?;
    let host_port = if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    };
    Some(RouteTarget {
        prefix: prefix.to_string(),
        peer: Peer { transport, addr },
        host_port,
    })
}
