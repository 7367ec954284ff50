//! The B2BUA engine, sans-IO: SIP messages, transport events and `now` go in; transmits and
//! media commands come out. One instance owns every transaction, dialog, registration and
//! call; the server's core task feeds it (see `server.rs`).
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

mod dtmf;
mod guard;
mod identity;
mod msg_size;
mod precheck;
mod sessions;
mod share;
mod srtp;

pub use msg_size::UDP_MTU_LIMIT;
pub use sessions::{is_local_session_user, SessionKey};

use super::errors::with_error_body;
use super::media::{CallKey, Expect, MediaBackend, MediaError, PtSet, Side, StreamPorts};
use crate::config::{Cidr, SrtpMode};
use crate::error_code::ErrorCode;
use crate::guard::{Admit, AuthGuard, GuardPolicy};
use crate::metrics::{AuthProto, CallOutcome, METRICS};
use crate::sdp::SessionDescription;
use crate::sip::auth::{Algorithm, Credentials, Verdict, Verifier};
use crate::sip::dialog::{route_request, Dialog};
use crate::sip::message::{same_header, HeaderAccess, Method, Request, Response, SipMessage};
use crate::sip::registrar::{Binding, Registrar, Source};
use crate::sip::transaction::{
    ClientInput, ClientTxId, Peer, ServerInput, ServerTxId, TimerConfig, TransactionLayer,
    Transmit, TxEvent,
};
use crate::sip::transport::Transport;
use crate::sip::uri::{NameAddr, Uri, Via};
pub use guard::GuardConfig;

/// Methods we answer or relay (Allow header).
pub const ALLOW: &str =
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

/// One leg of a call.
#[derive(Debug)]
struct Leg {
    call_id: String,
    local_tag: String,
    /// Where this leg's requests go (the source of the caller's INVITE, NAT-friendly; the
    /// callee's binding or route).
    peer: Peer,
    dialog: Option<Dialog>,
    /// The ACK we sent last on this leg, re-sent on a retransmitted 2xx.
    last_ack: Option<Request>,
    /// This leg sent a 2xx-answered INVITE we still need its ACK for: the CSeq of the INVITE
    /// on the *other* leg whose 2xx we will then ACK.
    awaiting_ack: Option<u32>,
    /// The party listed `Recv-Info: callvault` (its INVITE, its 1xx/2xx, or its latest target
    /// refresh): INFO of our package is welcome on this leg (RFC 6086 §4.2.1).
    accepts_info: bool,
    /// The INFO-to-MESSAGE fallback on this leg was logged (once per leg).
    info_fallback_logged: bool,
}

impl Leg {
    fn new(call_id: String, local_tag: String, peer: Peer, accepts_info: bool) -> Leg {
        Leg {
            call_id,
            local_tag,
            peer,
            dialog: None,
            last_ack: None,
            awaiting_ack: None,
            accepts_info,
            info_fallback_logged: false,
        }
    }

    /// Keeps the dialog and sends this leg's requests to its first route from now on.
    fn set_dialog(&mut self, d: Dialog) {
        self.peer = route_peer(&d.route_set, self.peer);
        self.dialog = Some(d);
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

/// The transport address of a route set's first hop (§8.1.2; RFC 3263 without DNS): the
/// first route's IP literal (its `maddr` if it has one, §19.1.1) and port (5060, 5061 for
/// sips), with its `transport=` if it names one. `fallback` (the address the leg's traffic
/// comes from) when the set is empty or the first route names a host: the sans-IO core
/// resolves no names, and the proxy in front is normally where the traffic comes from anyway.
fn route_peer(route_set: &[NameAddr], fallback: Peer) -> Peer {
    let Some(first) = route_set.first() else {
        return fallback;
    };
    let maddr = first.uri.param("maddr").flatten();
    let ip = match maddr {
        Some(m) => m.trim_start_matches('[').trim_end_matches(']').parse().ok(),
        None => first.uri.host_ip(),
    };
    let Some(ip) = ip else {
        return fallback;
    };
    let default_port = if first.uri.scheme == "sips" {
        5061
    } else {
        5060
    };
    let transport = match first.uri.transport().as_deref() {
        Some("udp") => Transport::Udp,
        Some("tcp") => Transport::Tcp,
        _ => fallback.transport,
    };
    Peer {
        transport,
        addr: SocketAddr::new(ip, first.uri.port.unwrap_or(default_port)),
    }
}

/// `Some(true)` when a message lists the `callvault` Info-Package in Recv-Info, `Some(false)`
/// when it has Recv-Info without it (an empty one withdraws every package), `None` when it
/// says nothing (RFC 6086 §5.2.2: the previous set stands).
fn recv_info_callvault(m: &impl HeaderAccess) -> Option<bool> {
    if !m.headers().has("Recv-Info") {
        return None;
    }
    let listed = m.headers().list("Recv-Info").ok()?;
    Some(listed.iter().any(|p| {
        p.split(';')
            .next()
            .is_some_and(|name| name.trim().eq_ignore_ascii_case("callvault"))
    }))
}

/// An INFO of the `callvault` Info-Package (its Info-Package header).
fn is_callvault_info(method: &Method, headers: &[(&str, &str)]) -> bool {
    *method == Method::Info
        && headers.iter().any(|(n, v)| {
            same_header(n, "Info-Package")
                && v.split(';')
                    .next()
                    .is_some_and(|p| p.trim().eq_ignore_ascii_case("callvault"))
        })
}

/// A notification asked for as INFO goes as MESSAGE instead (same body and Content-Type, no
/// Info-Package).
fn as_message<'a>(headers: &[(&'a str, &'a str)]) -> Vec<(&'a str, &'a str)> {
    headers
        .iter()
        .filter(|(n, _)| !same_header(n, "Info-Package"))
        .copied()
        .collect()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CallState {
    /// INVITE sent to B, no final yet.
    Early,
    /// 2xx relayed to A.
    Up,
    /// A cancelled or was answered with an error; waiting for B's INVITE transaction to end.
    Ending,
}

#[derive(Debug)]
struct Call {
    a: Leg,
    b: Leg,
    state: CallState,
    /// The caller's INVITE and its server transaction while unanswered.
    a_invite: Request,
    a_invite_tx: Option<ServerTxId>,
    b_invite_tx: Option<ClientTxId>,
    streams: Vec<StreamPorts>,
    /// The caller's authenticated (or trusted) identity, `user@domain`.
    caller: String,
    /// The callee's identity, `user@domain` (the Request-URI user).
    callee: String,
    /// Feature-code detection on INFO digits, per side (index 0 = A).
    digits: [dtmf::DigitGate; 2],
    /// The audio format of the answer (first codec that is not telephone-event), once known.
    format: Option<(String, u8)>,
    /// SRTP state per media section (see [`srtp`]).
    srtp: Vec<srtp::StreamCrypto>,
}

impl Call {
    fn leg(&self, side: Side) -> &Leg {
        match side {
            Side::A => &self.a,
            Side::B => &self.b,
        }
    }
    fn leg_mut(&mut self, side: Side) -> &mut Leg {
        match side {
            Side::A => &mut self.a,
            Side::B => &mut self.b,
        }
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
        let a_call_id = req.call_id().unwrap_or_default().to_string();
        let a_accepts_info = recv_info_callvault(&req).unwrap_or(false);
        let call = Call {
            a: Leg::new(a_call_id, a_tag, peer, a_accepts_info),
            b: Leg::new(b_call_id.clone(), b_tag.clone(), b_peer, false),
            state: CallState::Early,
            a_invite: req.clone(),
            a_invite_tx: Some(tx),
            b_invite_tx: None,
            streams: Vec::new(),
            caller: format!("{caller}@{}", self.cfg.domain),
            callee: format!("{callee}@{}", self.cfg.domain),
            format: None,
            srtp: Vec::new(),
            digits: [
                dtmf::DigitGate::new(&self.cfg.feature_code),
                dtmf::DigitGate::new(&self.cfg.feature_code),
            ],
        };

        // Leg B's INVITE.
        let via = self.new_via(b_peer.transport);
        let mut inv = target.request(Method::Invite, &via, mf - 1);
        let mut from = req
            .from_hdr()
            .unwrap_or_else(|| NameAddr::new(Uri::sip(Some(&caller), &self.cfg.domain, None)));
        from.set_tag(&b_tag);
        inv.headers.push("From", from.to_string());
        let mut to = req.to_hdr().unwrap_or_else(|| NameAddr::new(ruri.clone()));
        to.params.retain(|(n, _)| !n.eq_ignore_ascii_case("tag"));
        inv.headers.push("To", to.to_string());
        inv.headers.push("Call-ID", b_call_id.clone());
        inv.headers.push("CSeq", "1 INVITE");
        inv.headers
            .push("Contact", self.contact(b_peer.transport).to_string());
        inv.headers.push("Recv-Info", "callvault");
        copy_headers(&req.headers, &mut inv.headers);
        self.assert_identity(&mut inv, &req, peer, &caller);
        if !req.headers.has("Allow") {
            inv.headers.push("Allow", ALLOW);
        }
        inv.body = req.body.clone();

        self.calls.insert(key, call);
        if is_sdp(&req) {
            match self.anchor_sdp(key, &req.body, Side::A) {
                Ok(body) => inv.body = body,
                Err(AnchorError::Sdp(e)) => {
                    self.drop_call(key);
                    return self.reject(
                        tx,
                        &req,
                        400,
                        ErrorCode::MalformedMessage,
                        &format!("bad SDP: {e}"),
                        now,
                    );
                }
                Err(AnchorError::NoCrypto) => {
                    self.drop_call(key);
                    return self.reject(
                        tx,
                        &req,
                        488,
                        ErrorCode::NoSupportedCrypto,
                        "RTP/SAVP needs an a=crypto line with AES_CM_128_HMAC_SHA1_80 or _32",
                        now,
                    );
                }
                Err(AnchorError::Media(e)) => {
                    self.drop_call(key);
                    let mut resp = req.response(503, None);
                    resp.ensure_to_tag(&self.token(10));
                    resp.headers.push("Retry-After", "5");
                    let resp = with_error_body(resp, ErrorCode::Overloaded, &e.to_string());
                    return self.respond(tx, resp, now);
                }
            }
        }
        let (b_tx, b_peer) = match self.send_fitted(inv, b_peer, now) {
            Ok(sent) => sent,
            Err(e) => {
                self.drop_call(key);
                return self.reject(
                    tx,
                    &req,
                    513,
                    ErrorCode::MessageTooLarge,
                    &e.to_string(),
                    now,
                );
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
        tracing::info!(call = key, caller = %call_caller(&self.calls, key), callee = %callee, "call started");
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

    fn on_in_dialog(&mut self, tx: ServerTxId, req: Request, now: Instant) {
        let key = (
            req.call_id().unwrap_or_default().to_string(),
            req.to_tag().unwrap_or_default(),
        );
        if let Some(&session) = self.session_dialogs.get(&key) {
            return self.on_session_request(session, tx, req, now);
        }
        let Some(&(call_key, side)) = self.dialogs.get(&key) else {
            return self.reply(tx, &req, 481, now);
        };
        // A wrong From tag is another dialog (481); a CSeq out of order is 500 (§12.2.2).
        let checked = match self
            .calls
            .get_mut(&call_key)
            .and_then(|c| c.leg_mut(side).dialog.as_mut())
        {
            Some(d) => d.on_request(&req).map_err(|e| e.status()),
            None => Err(481),
        };
        if let Err(status) = checked {
            return self.reply(tx, &req, status, now);
        }
        // A target refresh may change the packages the party accepts (RFC 6086 §5.2.2).
        if matches!(req.method, Method::Invite | Method::Update) {
            if let (Some(accepts), Some(call)) =
                (recv_info_callvault(&req), self.calls.get_mut(&call_key))
            {
                call.leg_mut(side).accepts_info = accepts;
            }
        }
        match req.method {
            Method::Bye => {
                let resp = req.response(200, None);
                self.respond(tx, resp, now);
                // A 2xx whose ACK never came (lost, or BYE sent at once) is ACKed before BYE.
                for s in [Side::A, Side::B] {
                    self.ack_pending_2xx(call_key, s);
                }
                self.bye_leg(call_key, side.other(), None, now);
                self.end_call(call_key, CallOutcome::Answered);
            }
            Method::Message | Method::Info if is_store_request(&req) => {
                self.events.push_back(EngineEvent::StoreRequest {
                    call: call_key,
                    side,
                    tx,
                    request: req,
                });
            }
            Method::Info => {
                if let Some(req) = self.gate_info_digit(call_key, side, tx, req, now) {
                    self.relay_in_dialog(call_key, side, tx, req, now);
                }
            }
            _ => self.relay_in_dialog(call_key, side, tx, req, now),
        }
    }

    fn on_ack(&mut self, ack: Request) {
        let key = (
            ack.call_id().unwrap_or_default().to_string(),
            ack.to_tag().unwrap_or_default(),
        );
        if let Some(&session) = self.session_dialogs.get(&key) {
            return self.on_session_ack(session);
        }
        let Some(&(call_key, side)) = self.dialogs.get(&key) else {
            return;
        };
        if side == Side::A {
            self.call_settled(call_key);
        }
        let other = side.other();
        let Some(call) = self.calls.get_mut(&call_key) else {
            return;
        };
        let Some(cseq) = call.leg_mut(side).awaiting_ack.take() else {
            return;
        };
        let peer = call.leg(other).peer;
        let via = self.new_via(peer.transport);
        let Some(call) = self.calls.get_mut(&call_key) else {
            return;
        };
        let Some(dialog) = call.leg(other).dialog.as_ref() else {
            return;
        };
        let mut out = dialog.ack_for(cseq, via);
        if is_sdp(&ack) {
            // Late offer: the ACK carries the answer.
            match self.anchor_sdp(call_key, &ack.body, side) {
                Ok(body) => {
                    out.headers.set("Content-Type", "application/sdp");
                    out.body = body;
                }
                Err(e) => tracing::debug!(error = ?e, "bad SDP in ACK"),
            }
        }
        self.tx.send_ack(&out, peer);
        if let Some(call) = self.calls.get_mut(&call_key) {
            call.leg_mut(other).last_ack = Some(out);
        }
    }

    fn on_cancel(&mut self, invite_tx: ServerTxId, now: Instant) {
        if self.cancel_session(invite_tx, now) {
            return;
        }
        let Some(&key) = self.a_invites.get(&invite_tx) else {
            return;
        };
        let Some(call) = self.calls.get_mut(&key) else {
            return;
        };
        if call.state != CallState::Early {
            return;
        }
        let mut resp = call.a_invite.response(487, None);
        resp.ensure_to_tag(&call.a.local_tag.clone());
        self.abandon_early(key, invite_tx, resp, CallOutcome::Cancelled, now);
    }

    /// Gives up a call still ringing: `resp` to the caller's INVITE, CANCEL on leg B, ports
    /// released. The call stays (`Ending`) until leg B's INVITE transaction ends, so a 2xx
    /// crossing the CANCEL is still ACKed and hung up.
    fn abandon_early(
        &mut self,
        key: CallKey,
        a_tx: ServerTxId,
        resp: Response,
        outcome: CallOutcome,
        now: Instant,
    ) {
        let Some(call) = self.calls.get_mut(&key) else {
            return;
        };
        call.state = CallState::Ending;
        call.a_invite_tx = None;
        let b_tx = call.b_invite_tx;
        self.respond(a_tx, resp, now);
        if let Some(b_tx) = b_tx {
            let _ = self.tx.cancel(b_tx, now);
        }
        self.media.release(key);
        self.call_settled(key);
        METRICS.calls_active.dec();
        METRICS.call_ended(outcome);
        self.events.push_back(EngineEvent::CallEnded(key, outcome));
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

    fn on_b_invite_response(&mut self, key: CallKey, id: ClientTxId, resp: Response, now: Instant) {
        if resp.status == 100 {
            return;
        }
        let Some(state) = self.calls.get(&key).map(|c| c.state) else {
            return;
        };
        let invite_b = self.tx.client_request(id).cloned();
        if state == CallState::Ending {
            // The caller is gone: a late 2xx still has to be ACKed and hung up.
            if (200..300).contains(&resp.status) {
                if let Some(d) = invite_b.and_then(|inv| Dialog::uac(&inv, &resp).ok()) {
                    let peer = self.calls.get(&key).map(|c| c.b.peer);
                    if let Some(peer) = peer {
                        let via = self.new_via(peer.transport);
                        let ack = d.ack_for(1, via);
                        self.tx.send_ack(&ack, peer);
                        if let Some(call) = self.calls.get_mut(&key) {
                            call.b.set_dialog(d);
                        }
                        self.bye_leg(key, Side::B, Some(ErrorCode::Cancelled), now);
                    }
                }
            }
            if resp.status >= 200 {
                self.drop_call(key);
            }
            return;
        }
        let Some(call) = self.calls.get_mut(&key) else {
            return;
        };
        // Early or confirmed dialog with B; its route set (the 2xx's Record-Route reversed,
        // §12.1.2) decides where leg B's requests go.
        if resp.to_tag().is_some() && resp.status < 300 {
            if let Some(accepts) = recv_info_callvault(&resp) {
                call.b.accepts_info = accepts;
            }
            if let Some(inv) = &invite_b {
                match call.b.dialog.take() {
                    Some(mut d) => {
                        if resp.status >= 200 {
                            let _ = d.on_refresh_response(&resp);
                        }
                        call.b.set_dialog(d);
                    }
                    None => {
                        if let Ok(d) = Dialog::uac(inv, &resp) {
                            let k = (call.b.call_id.clone(), call.b.local_tag.clone());
                            call.b.set_dialog(d);
                            self.dialogs.insert(k, (key, Side::B));
                        }
                    }
                }
            }
        }
        let Some(call) = self.calls.get(&key) else {
            return;
        };
        let Some(a_tx) = call.a_invite_tx else {
            return;
        };
        let a_invite = call.a_invite.clone();
        let a_tag = call.a.local_tag.clone();
        let a_transport = call.a.peer.transport;
        let mut out = a_invite.response(resp.status, Some(&resp.reason));
        out.ensure_to_tag(&a_tag);
        copy_headers(&resp.headers, &mut out.headers);
        if resp.status < 300 {
            out.headers
                .push("Contact", self.contact(a_transport).to_string());
            if resp.status >= 200 {
                out.headers.push("Recv-Info", "callvault");
            }
        } else if (300..400).contains(&resp.status) {
            for c in resp.headers.get_all("Contact") {
                out.headers.push("Contact", c);
            }
        }
        out.body = resp.body.clone();
        if is_sdp(&resp) && resp.status < 300 {
            match self.anchor_sdp(key, &resp.body, Side::B) {
                Ok(body) => out.body = body,
                Err(e) => tracing::debug!(error = ?e, "bad SDP from callee"),
            }
        }

        if (200..300).contains(&resp.status) {
            let contact = self.contact(a_transport);
            let Some(call) = self.calls.get_mut(&key) else {
                return;
            };
            call.state = CallState::Up;
            call.a_invite_tx = None;
            call.a.awaiting_ack = Some(1);
            call.format = answer_format(&resp);
            if let Ok(d) = Dialog::uas(&a_invite, &a_tag, &contact) {
                call.a.set_dialog(d);
                self.dialogs
                    .insert((call.a.call_id.clone(), a_tag.clone()), (key, Side::A));
            }
            self.respond(a_tx, out, now);
            self.media.arm_timeout(key);
            self.events.push_back(EngineEvent::CallAnswered(key));
            tracing::info!(call = key, "call answered");
        } else if resp.status == 488
            && invite_b
                .as_ref()
                .is_some_and(|inv| self.retry_other_profile(key, inv, now))
        {
            // Retried with the other RTP profile; the caller hears about the new answer.
        } else if resp.status >= 300 {
            let out = map_b_failure(out);
            self.respond(a_tx, out, now);
            self.end_call(key, CallOutcome::Failed);
        } else {
            self.respond(a_tx, out, now);
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn on_relay_response(
        &mut self,
        key: CallKey,
        origin: Side,
        server_tx: ServerTxId,
        method: Method,
        cseq: u32,
        resp: Response,
        now: Instant,
    ) {
        if resp.status == 100 {
            return;
        }
        let Some(orig) = self.tx.server_request(server_tx).cloned() else {
            return;
        };
        let Some(call) = self.calls.get_mut(&key) else {
            return;
        };
        let other = origin.other();
        let target_refresh = matches!(method, Method::Invite | Method::Update);
        if (200..300).contains(&resp.status) && target_refresh {
            if let Some(d) = call.leg_mut(other).dialog.as_mut() {
                let _ = d.on_refresh_response(&resp);
            }
            if let Some(accepts) = recv_info_callvault(&resp) {
                call.leg_mut(other).accepts_info = accepts;
            }
        }
        if (200..300).contains(&resp.status) && method == Method::Invite {
            call.leg_mut(origin).awaiting_ack = Some(cseq);
        }
        let origin_transport = call.leg(origin).peer.transport;
        let mut out = orig.response(resp.status, Some(&resp.reason));
        copy_headers(&resp.headers, &mut out.headers);
        if target_refresh && resp.status < 300 {
            out.headers
                .push("Contact", self.contact(origin_transport).to_string());
        }
        out.body = resp.body.clone();
        if is_sdp(&resp) && target_refresh {
            match self.anchor_sdp(key, &resp.body, other) {
                Ok(body) => out.body = body,
                Err(e) => tracing::debug!(error = ?e, "bad SDP in relayed response"),
            }
        }
        self.respond(server_tx, out, now);
    }

    fn resend_ack(&mut self, id: ClientTxId, resp: &Response) {
        let Some((pending, peer)) = self.pending.get(&id).cloned() else {
            return;
        };
        let (call, side) = match pending {
            Pending::BInvite(c) => (c, Side::B),
            Pending::Relay { call, origin, .. } => (call, origin.other()),
            Pending::Own { call, side, .. } => (call, side),
            Pending::Standalone { .. } | Pending::ShareRelay { .. } | Pending::OutOfDialog => {
                return
            }
        };
        // Only the ACK of this very INVITE: the 2xx of a re-INVITE whose ACK has not come
        // from the other side yet must not be answered with the previous INVITE's ACK.
        let seq = resp.cseq().map(|c| c.seq);
        if let Some(ack) = self
            .calls
            .get(&call)
            .and_then(|c| c.leg(side).last_ack.clone())
        {
            if ack.cseq().map(|c| c.seq) == seq {
                self.tx.send_ack(&ack, peer);
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

    fn relay_in_dialog(
        &mut self,
        key: CallKey,
        origin: Side,
        server_tx: ServerTxId,
        req: Request,
        now: Instant,
    ) {
        let other = origin.other();
        let Some(call) = self.calls.get(&key) else {
            return;
        };
        let peer = call.leg(other).peer;
        if call.leg(other).dialog.is_none() {
            return self.reply(server_tx, &req, 481, now);
        }
        let via = self.new_via(peer.transport);
        let contact = self.contact(peer.transport);
        let Some(call) = self.calls.get_mut(&key) else {
            return;
        };
        let Some(dialog) = call.leg_mut(other).dialog.as_mut() else {
            return;
        };
        let mut out = dialog.new_request(req.method.clone(), &contact, via);
        copy_headers(&req.headers, &mut out.headers);
        if matches!(req.method, Method::Invite | Method::Update) {
            out.headers.set("Contact", contact.to_string());
        }
        out.body = req.body.clone();
        if is_sdp(&req) && matches!(req.method, Method::Invite | Method::Update) {
            match self.anchor_sdp(key, &req.body, origin) {
                Ok(body) => out.body = body,
                Err(e) => {
                    return self.reject(
                        server_tx,
                        &req,
                        488,
                        ErrorCode::MalformedMessage,
                        &format!("{e:?}"),
                        now,
                    );
                }
            }
        }
        let cseq = out.cseq().map(|c| c.seq).unwrap_or(0);
        let method = req.method.clone();
        let (id, peer) = match self.send_fitted(out, peer, now) {
            Ok(sent) => sent,
            Err(e) => {
                return self.reject(
                    server_tx,
                    &req,
                    513,
                    ErrorCode::MessageTooLarge,
                    &e.to_string(),
                    now,
                )
            }
        };
        self.pending.insert(
            id,
            (
                Pending::Relay {
                    call: key,
                    origin,
                    server_tx,
                    method,
                    cseq,
                },
                peer,
            ),
        );
    }

    /// Sends a request of callvault's own in the call's dialog on `side` (the storage feature
    /// injects MESSAGE/INFO this way). The final answer comes back as
    /// [`EngineEvent::OwnRequestDone`]. An INFO of the `callvault` Info-Package goes only to
    /// a party that listed `Recv-Info: callvault`; to any other it goes as MESSAGE with the
    /// same Content-Type and body (RFC 6086 §4.2.1), logged once per leg.
    pub fn send_in_dialog(
        &mut self,
        key: CallKey,
        side: Side,
        method: Method,
        headers: &[(&str, &str)],
        body: Bytes,
        now: Instant,
    ) -> Option<ClientTxId> {
        let call = self.calls.get_mut(&key)?;
        let leg = call.leg_mut(side);
        let peer = leg.peer;
        let fallback;
        let (method, headers) = if is_callvault_info(&method, headers) && !leg.accepts_info {
            if !leg.info_fallback_logged {
                leg.info_fallback_logged = true;
                tracing::info!(
                    call = key,
                    ?side,
                    "party did not list Recv-Info: callvault; callvault's INFO goes as MESSAGE on this leg"
                );
            }
            fallback = as_message(headers);
            (Method::Message, fallback.as_slice())
        } else {
            (method, headers)
        };
        let via = self.new_via(peer.transport);
        let contact = self.contact(peer.transport);
        let dialog = self.calls.get_mut(&key)?.leg_mut(side).dialog.as_mut()?;
        let mut out = dialog.new_request(method, &contact, via);
        for (n, v) in headers {
            out.headers.push(n.to_string(), v.to_string());
        }
        out.body = body;
        let id = self.tx.send_request(out, peer, now);
        self.pending
            .insert(id, (Pending::Own { call: key, side }, peer));
        let r = Some(id);
        self.after(now);
        r
    }

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

    /// Leg A's Call-ID (what a recorded call is listed under) and the answered audio format.
    pub fn call_facts(&self, call: CallKey) -> Option<(String, Option<(String, u8)>)> {
        self.calls
            .get(&call)
            .map(|c| (c.a.call_id.clone(), c.format.clone()))
    }

    /// `(caller, callee)` identities of a call, `user@domain` each.
    pub fn call_parties(&self, call: CallKey) -> Option<(String, String)> {
        self.calls
            .get(&call)
            .map(|c| (c.caller.clone(), c.callee.clone()))
    }

    /// The party on `side` of a call (`user@domain`).
    pub fn party(&self, call: CallKey, side: Side) -> Option<String> {
        self.calls.get(&call).map(|c| match side {
            Side::A => c.caller.clone(),
            Side::B => c.callee.clone(),
        })
    }

    /// The transport `side`'s leg runs over (TLS decides `;transport=tls` in store URIs).
    pub fn leg_transport(&self, call: CallKey, side: Side) -> Option<Transport> {
        self.calls.get(&call).map(|c| match side {
            Side::A => c.a.peer.transport,
            Side::B => c.b.peer.transport,
        })
    }

    /// True while both dialogs of the call are established.
    pub fn call_is_up(&self, call: CallKey) -> bool {
        self.calls
            .get(&call)
            .is_some_and(|c| c.state == CallState::Up)
    }

    /// The call and side in which `user@domain` currently is a party, if any (newest call).
    pub fn call_of(&self, aor: &str) -> Option<(CallKey, Side)> {
        self.calls
            .iter()
            .filter(|(_, c)| c.state == CallState::Up)
            .filter_map(|(k, c)| {
                if c.callee == aor {
                    Some((*k, Side::B))
                } else if c.caller == aor {
                    Some((*k, Side::A))
                } else {
                    None
                }
            })
            .max_by_key(|(k, _)| *k)
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

    fn bye_leg(&mut self, key: CallKey, side: Side, reason: Option<ErrorCode>, now: Instant) {
        let Some(call) = self.calls.get(&key) else {
            return;
        };
        let peer = call.leg(side).peer;
        let via = self.new_via(peer.transport);
        let contact = self.contact(peer.transport);
        let Some(dialog) = self
            .calls
            .get_mut(&key)
            .and_then(|c| c.leg_mut(side).dialog.as_mut())
        else {
            return;
        };
        let mut bye = dialog.new_request(Method::Bye, &contact, via);
        if let Some(r) = reason {
            bye.headers
                .push("Reason", format!("SIP;cause=200;text=\"{r}\""));
        }
        let id = self.tx.send_request(bye, peer, now);
        self.pending
            .insert(id, (Pending::Own { call: key, side }, peer));
    }

    /// `side` owes us an ACK for a 2xx we relayed to it: ACK, on the other leg, the 2xx that
    /// answered the INVITE we sent there, since no ACK from `side` will come now.
    fn ack_pending_2xx(&mut self, key: CallKey, side: Side) {
        let Some(call) = self.calls.get_mut(&key) else {
            return;
        };
        let Some(cseq) = call.leg_mut(side).awaiting_ack.take() else {
            return;
        };
        let peer = call.leg(side.other()).peer;
        let via = self.new_via(peer.transport);
        let Some(leg) = self.calls.get_mut(&key).map(|c| c.leg_mut(side.other())) else {
            return;
        };
        let Some(ack) = leg.dialog.as_ref().map(|d| d.ack_for(cseq, via)) else {
            return;
        };
        self.tx.send_ack(&ack, peer);
        leg.last_ack = Some(ack);
    }

    /// Tears a call down from our side, whatever state it is in.
    fn hang_up(&mut self, key: CallKey, reason: ErrorCode, outcome: CallOutcome, now: Instant) {
        let Some(call) = self.calls.get(&key) else {
            return;
        };
        match call.state {
            CallState::Up => {
                // A 2xx that is not ACKed yet still must be ACKed before BYE (§15).
                for side in [Side::A, Side::B] {
                    self.ack_pending_2xx(key, side);
                }
                self.bye_leg(key, Side::A, Some(reason), now);
                self.bye_leg(key, Side::B, Some(reason), now);
                self.end_call(key, outcome);
            }
            CallState::Early => {
                let a_invite = call.a_invite.clone();
                let a_tx = call.a_invite_tx;
                let b_tx = call.b_invite_tx;
                if let Some(a_tx) = a_tx {
                    let mut resp = a_invite.response(503, None);
                    resp.ensure_to_tag(&call.a.local_tag.clone());
                    resp.headers.push("Retry-After", "5");
                    let resp =
                        with_error_body(resp, ErrorCode::Overloaded, reason.default_detail());
                    self.respond(a_tx, resp, now);
                }
                if let Some(b_tx) = b_tx {
                    let _ = self.tx.cancel(b_tx, now);
                }
                self.end_call(key, outcome);
            }
            CallState::Ending => self.drop_call(key),
        }
    }

    /// Ends a call that was counted active: metrics, media, dialogs.
    fn end_call(&mut self, key: CallKey, outcome: CallOutcome) {
        if self.calls.contains_key(&key) {
            METRICS.calls_active.dec();
            METRICS.call_ended(outcome);
            self.events.push_back(EngineEvent::CallEnded(key, outcome));
            tracing::info!(call = key, ?outcome, "call ended");
        }
        self.drop_call(key);
    }

    /// Forgets a call (no metrics): media released, dialog keys removed.
    fn drop_call(&mut self, key: CallKey) {
        self.digit_holds.remove(&key);
        self.call_settled(key);
        if let Some(call) = self.calls.remove(&key) {
            self.dialogs
                .remove(&(call.a.call_id.clone(), call.a.local_tag.clone()));
            self.dialogs
                .remove(&(call.b.call_id.clone(), call.b.local_tag.clone()));
            self.own_call_ids.remove(&call.b.call_id);
            if let Some(tx) = call.a_invite_tx {
                self.a_invites.remove(&tx);
            }
        }
        self.media.release(key);
    }

    // ---------------------------------------------------------------------------------------
    // Media anchoring

    /// Rewrites an SDP body coming from `from` for the other side: every media section points
    /// at our relay port facing the other side; `from`'s announced address becomes its remote.
    fn anchor_sdp(&mut self, key: CallKey, body: &[u8], from: Side) -> Result<Bytes, AnchorError> {
        let text =
            std::str::from_utf8(body).map_err(|_| AnchorError::Sdp("SDP is not UTF-8".into()))?;
        let mut sdp =
            SessionDescription::parse(text).map_err(|e| AnchorError::Sdp(e.to_string()))?;
        if self.calls.get(&key).is_some_and(|c| c.streams.is_empty()) {
            self.note_srtp_passthrough(key, &sdp);
        }
        let ip = self.cfg.public_ip;
        // Read every section's address first: rewriting one section rewrites the session-level
        // `c=` the later sections may inherit.
        let signalling = self.calls.get(&key).map(|c| c.leg(from).peer.addr.ip());
        let remotes: Vec<(Expect, Option<u8>)> = (0..sdp.media_count())
            .map(|i| {
                let te = sdp.codecs(i).into_iter().find(|c| c.is_telephone_event());
                (media_expect(&sdp, i, signalling), te.map(|c| c.pt))
            })
            .collect();
        for (idx, (remote, dtmf_pt)) in remotes.into_iter().enumerate() {
            if idx >= MAX_STREAMS {
                let _ = sdp.disable_media(idx);
                continue;
            }
            let have = self.calls.get(&key).map(|c| c.streams.len()).unwrap_or(0);
            if idx >= have {
                let ports = self.media.add_stream(key).map_err(AnchorError::Media)?;
                if let Some(c) = self.calls.get_mut(&key) {
                    c.streams.push(ports);
                }
            }
            let Some(ports) = self
                .calls
                .get(&key)
                .and_then(|c| c.streams.get(idx).copied())
            else {
                continue;
            };
            self.media.set_remote(key, idx, from, remote);
            self.media.set_dtmf_pt(key, idx, from, dtmf_pt);
            if sdp.media(idx).is_some_and(|m| m.port == 0) {
                continue;
            }
            self.srtp_section(key, &mut sdp, idx, from)
                .map_err(|_| AnchorError::NoCrypto)?;
            sdp.rewrite_for_anchor(idx, ip, ports.facing(from.other()))
                .map_err(|e| AnchorError::Sdp(e.to_string()))?;
        }
        Ok(Bytes::from(sdp.to_string()))
    }
}

/// What section `idx` of an SDP from a party whose signalling came from `signalling` says
/// about where its media comes from: address, payload types (any when none are listed), NAT.
fn media_expect(sdp: &SessionDescription, idx: usize, signalling: Option<IpAddr>) -> Expect {
    let pts = sdp
        .media(idx)
        .map(|m| PtSet::of(m.payload_types()))
        .filter(|p| !p.is_empty())
        .unwrap_or(PtSet::ANY);
    Expect::from_sdp(sdp.connection_for(idx), signalling, pts)
}

#[derive(Debug)]
enum AnchorError {
    Sdp(String),
    Media(MediaError),
    /// `RTP/SAVP` without a supported `a=crypto` line (PROTOCOL.md section 7: `488`).
    NoCrypto,
}

fn call_caller(calls: &HashMap<CallKey, Call>, key: CallKey) -> String {
    calls
        .get(&key)
        .map(|c| c.caller.clone())
        .unwrap_or_default()
}

fn is_sdp<T: HeaderAccess + HasBody>(m: &T) -> bool {
    !m.body().is_empty() && m.content_type().as_deref() == Some("application/sdp")
}

trait HasBody {
    fn body(&self) -> &[u8];
}

impl HasBody for Request {
    fn body(&self) -> &[u8] {
        &self.body
    }
}

impl HasBody for Response {
    fn body(&self) -> &[u8] {
        &self.body
    }
}

/// An in-dialog MESSAGE, or an INFO of the `callvault` Info-Package (or legacy INFO without
/// one, RFC 6086 §4.3.1 aside), whose body is a store request.
fn is_store_request(req: &Request) -> bool {
    let ct_ok = req
        .content_type()
        .is_some_and(|ct| crate::b2bua::wire::is_consumed(&ct));
    let package_ok = match req.headers.get("Info-Package") {
        Some(p) => p
            .split(';')
            .next()
            .unwrap_or("")
            .trim()
            .eq_ignore_ascii_case("callvault"),
        None => true,
    };
    ct_ok && (req.method == Method::Message || package_ok)
}

/// The first audio codec of an SDP answer that is not telephone-event, e.g. `PCMU/8000`.
fn answer_format(resp: &Response) -> Option<(String, u8)> {
    if !is_sdp(resp) {
        return None;
    }
    let sdp = SessionDescription::parse(std::str::from_utf8(&resp.body).ok()?).ok()?;
    let audio = sdp.find_media("audio")?;
    let c = sdp
        .codecs(audio)
        .into_iter()
        .find(|c| !c.is_telephone_event())?;
    Some((c.format_name(), c.pt))
}

/// Copies end-to-end headers (everything but [`HOP_HEADERS`]); `Supported` is passed on
/// without `100rel`, which we do not relay.
fn copy_headers(from: &crate::sip::message::Headers, to: &mut crate::sip::message::Headers) {
    for h in from.iter() {
        if same_header(&h.name, "Supported") {
            let kept: Vec<&str> = h
                .value
                .split(',')
                .map(str::trim)
                .filter(|t| !t.eq_ignore_ascii_case("100rel") && !t.is_empty())
                .collect();
            if !kept.is_empty() {
                to.push(h.name.clone(), kept.join(", "));
            }
            continue;
        }
        if HOP_HEADERS.iter().any(|n| same_header(&h.name, n)) {
            continue;
        }
        if same_header(&h.name, "Content-Type") && to.has("Content-Type") {
            continue;
        }
        to.push(h.name.clone(), h.value.clone());
    }
}

/// A failure from leg B as the caller should see it: auth challenges of the far end mean
/// nothing to the caller (403), everything else keeps its status.
fn map_b_failure(mut out: Response) -> Response {
    if out.status == 401 || out.status == 407 {
        out.status = 403;
        out.reason = "Forbidden".into();
    }
    out
}

/// Resolves a configured route target (`host:port`) once at start-up.
pub fn resolve_route(
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
