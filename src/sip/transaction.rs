//! SIP transactions (RFC 3261 §17, with the RFC 6026 `Accepted` states), sans-IO.
//!
//! The layer never reads a clock, owns no socket and spawns nothing, in the style of
//! `quinn-proto`: the caller feeds parsed messages and `now`, then drains what the layer wants
//! done.
//!
//! ```text
//! server side:  on_request(req, from, now) -> ServerInput     respond(tx, resp, now)
//! client side:  send_request(req, to, now) -> ClientTxId      on_response(resp, from, now) -> ClientInput
//!               cancel(tx, now)                                send_ack(ack, to)
//! driving:      poll_transmit() -> Option<Transmit>           poll_event() -> Option<TxEvent>
//!               poll_timeout() -> Option<Instant>             handle_timeout(now)
//! inspection:   server_request(tx), client_request(tx), counts(), stats()
//! ```
//!
//! After every call into the layer the driver drains `poll_transmit` (datagrams / stream writes
//! to send, already encoded) and `poll_event` (timeouts for the TU), then sleeps until
//! `poll_timeout` and calls `handle_timeout` with the current time.
//!
//! Behaviour worth knowing for the TU (transaction user, i.e. the B2BUA):
//! - A new server INVITE transaction has already queued `100 Trying` when `New` is returned.
//! - Responses go to the [`Peer`] the request came from (§18.2.2 with RFC 3581: the `received` /
//!   `rport` address; for TCP the same connection). The top Via of a received request is
//!   stamped with `received`/`rport` so responses built from it carry them.
//! - The layer itself: ACKs non-2xx finals on client INVITE transactions (§17.1.1.3);
//!   retransmits a 2xx sent on a server INVITE transaction at T1 doubling to T2 until the ACK
//!   arrives (§13.3.1.4, on every transport since the 2xx is retransmitted end to end) and
//!   reports [`TxEvent::AckTimeout`] after 64*T1 (Timer L); answers CANCEL with `200` (or
//!   `481` when it matches nothing) and merged requests (§8.2.2.2) with `482`.
//! - An ACK for a 2xx is a request of its own (it matches no transaction): the TU builds it
//!   (see the dialog module) and sends it with [`TransactionLayer::send_ack`], and sends it
//!   again on [`ClientInput::Retransmission2xx`]. Further 2xx with another To tag (forking)
//!   also arrive as `Retransmission2xx`; the TU tells them apart by the To tag.
//! - [`TransactionLayer::cancel`] sends CANCEL for a client INVITE per §9.1 (deferred until a
//!   provisional arrives); the responses to that CANCEL are absorbed. If no final answer
//!   arrives within 64*T1 after a CANCEL, the INVITE transaction ends with
//!   [`TxEvent::Timeout`].
//! - Stateless answers (§8.2.7, e.g. load shedding): [`TransactionLayer::is_new_request`] tells
//!   a new request from a retransmission, [`TransactionLayer::respond_stateless`] answers one
//!   without creating a transaction.
//! - A server transaction that has sent a final non-2xx answer (it only absorbs retransmissions
//!   and the ACK until Timer H/J) keeps just the headers a response is built from, not the
//!   whole request with its body.
//! - Timers: a `BTreeMap` keyed by deadline holds every armed timer, so `poll_timeout` is
//!   O(log n) and firing touches only due timers.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use bytes::Bytes;
use thiserror::Error;

use super::message::{HeaderAccess, Method, Request, Response};
use super::uri::Via;
use crate::sip::transport::Transport;

/// RFC 3261 branch prefix (§8.1.1.7).
pub(crate) const MAGIC_COOKIE: &str = "z9hG4bK";

/// The far end of a hop: transport and address (for TCP the connection's remote address).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Peer {
    pub transport: Transport,
    pub addr: SocketAddr,
}

impl Peer {
    pub fn new(transport: Transport, addr: SocketAddr) -> Peer {
        Peer { transport, addr }
    }

    /// Reliable transports do their own retransmission (§17.1.1.2, §17.1.2.2).
    pub fn is_reliable(&self) -> bool {
        matches!(self.transport, Transport::Tcp | Transport::Tls)
    }
}

/// Encoded bytes to send to a peer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Transmit {
    pub peer: Peer,
    pub data: Bytes,
}

/// RFC 3261 timer base values (§17.1.1.1, Table 4).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TimerConfig {
    pub t1: Duration,
    pub t2: Duration,
    pub t4: Duration,
}

impl Default for TimerConfig {
    fn default() -> Self {
        TimerConfig {
            t1: Duration::from_millis(500),
            t2: Duration::from_secs(4),
            t4: Duration::from_secs(5),
        }
    }
}

impl TimerConfig {
    fn t1x64(&self) -> Duration {
        self.t1 * 64
    }
}

/// Timer D for unreliable transports: "at least 32 seconds" (§17.1.1.2).
const TIMER_D_UDP: Duration = Duration::from_secs(32);

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ClientTxId(u64);

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServerTxId(u64);

impl ClientTxId {
    /// The raw number, for logs.
    pub fn raw(self) -> u64 {
        self.0
    }
}

impl ServerTxId {
    /// The raw number, for logs.
    pub fn raw(self) -> u64 {
        self.0
    }
}

#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub(crate) enum TxError {
    #[error("no such transaction")]
    UnknownTransaction,
    #[error("status code {0} out of range")]
    BadStatus(u16),
    #[error("a final response was already sent")]
    FinalAlreadySent,
    #[error("transaction is not an INVITE transaction")]
    NotInvite,
    #[error("INVITE transaction can no longer be cancelled")]
    NotCancellable,
}

/// What a received request means for the TU.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum ServerInput {
    /// A new server transaction. For INVITE, `100 Trying` is already queued.
    New(ServerTxId, Request),
    /// A retransmission (last response re-sent, if any) or an ACK for a non-2xx final.
    Absorbed,
    /// ACK for a 2xx (it stopped the 2xx retransmissions) or ACK matching nothing.
    Ack(Request),
    /// CANCEL for an INVITE still in Proceeding: the layer answered the CANCEL `200`; the TU
    /// sends `487` (or its final) on `invite`.
    Cancelled { invite: ServerTxId, cancel: Request },
    /// The layer answered by itself: CANCEL matching nothing (`481`), CANCEL for an INVITE
    /// already answered (`200`), merged request (`482`).
    Answered,
    /// Unusable request (no Via, CSeq or Call-ID): dropped, nothing can be answered.
    Dropped,
}

/// What a received response means for the TU.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum ClientInput {
    /// Provisional or final response. Non-2xx finals to INVITE are already ACKed.
    Response(ClientTxId, Response),
    /// A 2xx for an INVITE already in Accepted (Timer M running): the TU re-sends its ACK
    /// (or, for another To tag, deals with the forked answer).
    Retransmission2xx(ClientTxId, Response),
    /// Retransmitted response the transaction absorbed (the ACK was re-sent where due).
    Absorbed,
    /// No transaction matches.
    Unmatched(Response),
}

/// Things that happen on timers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum TxEvent {
    /// Timer B / F fired (or no final within 64*T1 of a CANCEL): the TU treats it as 408.
    Timeout(ClientTxId),
    /// A 2xx was sent and no ACK came within 64*T1 (Timer L, §13.3.1.4): the TU should BYE.
    AckTimeout(ServerTxId),
    /// The transaction is gone; its id will not be seen again.
    ClientTerminated(ClientTxId),
    /// The transaction is gone; its id will not be seen again.
    ServerTerminated(ServerTxId),
}

/// Counters for metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TxStats {
    pub client_created: u64,
    pub server_created: u64,
    /// Requests, responses and ACKs sent again.
    pub retransmissions: u64,
    /// Timer B/F/cancel-guard timeouts reported to the TU.
    pub timeouts: u64,
    /// Timer L firings (2xx never ACKed).
    pub ack_timeouts: u64,
}

// ------------------------------------------------------------------------------------------
// Internals

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum TxRef {
    Client(u64),
    Server(u64),
}

/// Each transaction has at most two timers at once: one that retransmits (A, E, G, 2xx) and
/// one that ends a state (B, D, F, H, I, J, K, L, M, CANCEL guard).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Slot {
    Retransmit = 0,
    Lifetime = 1,
}

type TimerKey = (Instant, u64);
type TimerSlots = [Option<TimerKey>; 2];

#[derive(Default)]
struct Timers {
    map: BTreeMap<TimerKey, (TxRef, Slot)>,
    seq: u64,
}

impl Timers {
    fn arm(&mut self, slots: &mut TimerSlots, tx: TxRef, slot: Slot, at: Instant) {
        self.disarm(slots, slot);
        self.seq += 1;
        let key = (at, self.seq);
        self.map.insert(key, (tx, slot));
        slots[slot as usize] = Some(key);
    }

    fn disarm(&mut self, slots: &mut TimerSlots, slot: Slot) {
        if let Some(key) = slots[slot as usize].take() {
            self.map.remove(&key);
        }
    }

    fn disarm_all(&mut self, slots: &mut TimerSlots) {
        self.disarm(slots, Slot::Retransmit);
        self.disarm(slots, Slot::Lifetime);
    }
}

#[derive(Default)]
struct Output {
    transmits: VecDeque<Transmit>,
    events: VecDeque<TxEvent>,
    stats: TxStats,
}

impl Output {
    fn send(&mut self, peer: Peer, data: Bytes) {
        self.transmits.push_back(Transmit { peer, data });
    }

    fn resend(&mut self, peer: Peer, data: Bytes) {
        self.stats.retransmissions += 1;
        self.send(peer, data);
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ClientState {
    /// INVITE before any response.
    Calling,
    /// Non-INVITE before any response.
    Trying,
    Proceeding,
    Completed,
    /// RFC 6026: INVITE got a 2xx, absorbing 2xx retransmissions for the TU (Timer M).
    Accepted,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum CancelState {
    None,
    /// Asked while Calling: sent with the first provisional (§9.1).
    Pending,
    Sent,
}

struct ClientTx {
    invite: bool,
    state: ClientState,
    peer: Peer,
    key: (String, Method),
    request_bytes: Bytes,
    /// Kept for INVITE only: the ACK and the CANCEL are built from it.
    request: Option<Box<Request>>,
    /// ACK for a non-2xx final, re-sent when the final is retransmitted.
    ack: Option<Bytes>,
    interval: Duration,
    timers: TimerSlots,
    /// Created by the layer (CANCEL): responses are absorbed, no events.
    internal: bool,
    cancel: CancelState,
    cancelled_at: Option<Instant>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ServerState {
    Trying,
    Proceeding,
    Completed,
    Confirmed,
    /// RFC 6026: 2xx sent, waiting for the ACK (Timer L).
    Accepted,
}

/// §17.2.3 match key. ACK is stored and looked up as INVITE.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum ServerKey {
    Rfc3261 {
        branch: String,
        sent_by: String,
        method: Method,
    },
    /// Branch without the magic cookie (RFC 2543 peers): a simplified §17.2.3 fallback.
    Rfc2543 {
        call_id: String,
        from_tag: String,
        cseq: u32,
        method: Method,
        via: String,
    },
}

impl ServerKey {
    fn with_method(&self, m: Method) -> ServerKey {
        let mut k = self.clone();
        match &mut k {
            ServerKey::Rfc3261 { method, .. } | ServerKey::Rfc2543 { method, .. } => *method = m,
        }
        k
    }
}

/// §8.2.2.2 merged-request key: From tag, Call-ID, CSeq.
type MergeKey = (String, String, u32, Method);
/// 2xx ACK key: Call-ID, From tag, CSeq number.
type AckKey = (String, String, u32);

struct ServerTx {
    invite: bool,
    state: ServerState,
    peer: Peer,
    key: ServerKey,
    merge_key: Option<MergeKey>,
    ack_key: Option<AckKey>,
    request: Request,
    last_response: Option<Bytes>,
    /// To tag of the 2xx sent (ACK for it must carry it).
    ok_to_tag: Option<String>,
    interval: Duration,
    timers: TimerSlots,
    acked: bool,
    internal: bool,
}

/// The transaction layer: every client and server transaction of one SIP endpoint.
pub(crate) struct TransactionLayer {
    cfg: TimerConfig,
    next_id: u64,
    clients: HashMap<u64, ClientTx>,
    servers: HashMap<u64, ServerTx>,
    client_index: HashMap<(String, Method), u64>,
    server_index: HashMap<ServerKey, u64>,
    merge_index: HashMap<MergeKey, u64>,
    ack_index: HashMap<AckKey, u64>,
    timers: Timers,
    out: Output,
}

impl TransactionLayer {
    pub(crate) fn new(cfg: TimerConfig) -> Self {
        TransactionLayer {
            cfg,
            next_id: 1,
            clients: HashMap::new(),
            servers: HashMap::new(),
            client_index: HashMap::new(),
            server_index: HashMap::new(),
            merge_index: HashMap::new(),
            ack_index: HashMap::new(),
            timers: Timers::default(),
            out: Output::default(),
        }
    }

    fn alloc_id(&mut self) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        id
    }

    // --------------------------------------------------------------------------------------
    // Server side

    /// Feeds a received request (§17.2.3 matching, §9.2 CANCEL, §8.2.2.2 merge detection).
    pub(crate) fn on_request(&mut self, mut req: Request, from: Peer, now: Instant) -> ServerInput {
        let Some(key) = server_key(&req) else {
            return ServerInput::Dropped;
        };
        stamp_via(&mut req, &from);
        let from = response_peer(&req, from);

        if req.method == Method::Ack {
            return self.on_ack(req, key, now);
        }

        if let Some(&id) = self.server_index.get(&key) {
            if let Some(tx) = self.servers.get(&id) {
                // Retransmission: re-send the last response, except in Accepted, where the
                // 2xx timer does it (RFC 6026 §8.5), and in Confirmed (nothing to re-send).
                if matches!(tx.state, ServerState::Proceeding | ServerState::Completed) {
                    if let Some(data) = tx.last_response.clone() {
                        self.out.resend(tx.peer, data);
                    }
                }
                return ServerInput::Absorbed;
            }
        }

        if req.method == Method::Cancel {
            return self.on_cancel(req, &key, from, now);
        }

        if req.to_tag().is_none() {
            if let Some(mk) = merge_key(&req) {
                if self
                    .merge_index
                    .get(&mk)
                    .is_some_and(|id| self.servers.contains_key(id))
                {
                    let resp = req.response(482, None);
                    let id = self.new_server_tx(req, key, None, from, true);
                    let _ = self.respond_inner(id, resp, now);
                    return ServerInput::Answered;
                }
            }
        }

        let mk = if req.to_tag().is_none() {
            merge_key(&req)
        } else {
            None
        };
        let id = self.new_server_tx(req.clone(), key, mk, from, false);
        if req.method == Method::Invite {
            // §17.2.1: the B2BUA always wants 100 Trying at once (it will not answer in 200 ms).
            let trying = req.response(100, None);
            let data = Bytes::from(trying.to_bytes());
            if let Some(tx) = self.servers.get_mut(&id) {
                tx.last_response = Some(data.clone());
            }
            self.out.send(from, data);
        }
        ServerInput::New(ServerTxId(id), req)
    }

    /// True when `req` would start a new server transaction: not an ACK or CANCEL, and no
    /// transaction matches it (a retransmission matches the one it started).
    pub(crate) fn is_new_request(&self, req: &Request) -> bool {
        if matches!(req.method, Method::Ack | Method::Cancel) {
            return false;
        }
        server_key(req).is_some_and(|k| !self.server_index.contains_key(&k))
    }

    /// Answers `req` (received from `from`) statelessly (§8.2.7): `build` makes the response
    /// from the request with its top Via stamped (`received`/`rport`), which goes where a
    /// transaction's would (§18.2.2). Nothing is kept: a retransmission is simply answered
    /// again.
    pub(crate) fn respond_stateless(
        &mut self,
        mut req: Request,
        from: Peer,
        build: impl FnOnce(&Request) -> Response,
    ) {
        stamp_via(&mut req, &from);
        let to = response_peer(&req, from);
        let resp = build(&req);
        self.out.send(to, Bytes::from(resp.to_bytes()));
    }

    fn new_server_tx(
        &mut self,
        req: Request,
        key: ServerKey,
        merge_key: Option<MergeKey>,
        peer: Peer,
        internal: bool,
    ) -> u64 {
        let id = self.alloc_id();
        let invite = req.method == Method::Invite;
        self.server_index.insert(key.clone(), id);
        if let Some(mk) = &merge_key {
            self.merge_index.insert(mk.clone(), id);
        }
        self.servers.insert(
            id,
            ServerTx {
                invite,
                state: if invite {
                    ServerState::Proceeding
                } else {
                    ServerState::Trying
                },
                peer,
                key,
                merge_key,
                ack_key: None,
                request: req,
                last_response: None,
                ok_to_tag: None,
                interval: self.cfg.t1,
                timers: [None, None],
                acked: false,
                internal,
            },
        );
        self.out.stats.server_created += 1;
        id
    }

    fn on_ack(&mut self, req: Request, key: ServerKey, now: Instant) -> ServerInput {
        let invite_key = key.with_method(Method::Invite);
        let by_branch = self.server_index.get(&invite_key).copied();
        if let Some(id) = by_branch {
            if let Some(tx) = self.servers.get_mut(&id) {
                match tx.state {
                    ServerState::Completed => {
                        // §17.2.1: ACK for our non-2xx; stop G/H, absorb ACK retransmissions
                        // for Timer I.
                        tx.state = ServerState::Confirmed;
                        self.timers.disarm_all(&mut tx.timers);
                        if tx.peer.is_reliable() {
                            self.terminate(TxRef::Server(id));
                        } else {
                            let at = now + self.cfg.t4;
                            self.timers
                                .arm(&mut tx.timers, TxRef::Server(id), Slot::Lifetime, at);
                        }
                        return ServerInput::Absorbed;
                    }
                    ServerState::Confirmed | ServerState::Proceeding | ServerState::Trying => {
                        return ServerInput::Absorbed;
                    }
                    // A peer reusing the INVITE branch for the 2xx ACK: still the 2xx ACK.
                    ServerState::Accepted => {
                        tx.acked = true;
                        self.timers.disarm(&mut tx.timers, Slot::Retransmit);
                        return ServerInput::Ack(req);
                    }
                }
            }
        }
        if let (Some(call_id), Some(from_tag), Some(cseq)) =
            (req.call_id(), req.from_tag(), req.cseq())
        {
            let ak = (call_id.to_string(), from_tag, cseq.seq);
            if let Some(id) = self.ack_index.get(&ak).copied() {
                if let Some(tx) = self.servers.get_mut(&id) {
                    let tag_ok = tx.ok_to_tag.is_none() || tx.ok_to_tag == req.to_tag();
                    if tx.state == ServerState::Accepted && tag_ok {
                        tx.acked = true;
                        self.timers.disarm(&mut tx.timers, Slot::Retransmit);
                    }
                }
            }
        }
        ServerInput::Ack(req)
    }

    fn on_cancel(
        &mut self,
        req: Request,
        key: &ServerKey,
        from: Peer,
        now: Instant,
    ) -> ServerInput {
        let target = self
            .server_index
            .get(&key.with_method(Method::Invite))
            .copied()
            .and_then(|id| self.servers.get(&id).map(|tx| (id, tx.state)));
        let status = if target.is_some() { 200 } else { 481 };
        let resp = req.response(status, None);
        let cancel_id = self.new_server_tx(req.clone(), key.clone(), None, from, true);
        let _ = self.respond_inner(cancel_id, resp, now);
        match target {
            Some((invite, ServerState::Proceeding)) => ServerInput::Cancelled {
                invite: ServerTxId(invite),
                cancel: req,
            },
            _ => ServerInput::Answered,
        }
    }

    /// Sends a response on a server transaction (§17.2.1 / §17.2.2 / RFC 6026).
    pub(crate) fn respond(
        &mut self,
        tx: ServerTxId,
        resp: Response,
        now: Instant,
    ) -> Result<(), TxError> {
        self.respond_inner(tx.0, resp, now)
    }

    fn respond_inner(&mut self, id: u64, resp: Response, now: Instant) -> Result<(), TxError> {
        if !(100..=699).contains(&resp.status) {
            return Err(TxError::BadStatus(resp.status));
        }
        let cfg = self.cfg;
        let tx = self
            .servers
            .get_mut(&id)
            .ok_or(TxError::UnknownTransaction)?;
        let status = resp.status;
        let me = TxRef::Server(id);
        let provisional = status < 200;
        let success = (200..300).contains(&status);
        match (tx.invite, tx.state) {
            (true, ServerState::Proceeding) => {
                let data = Bytes::from(resp.to_bytes());
                self.out.send(tx.peer, data.clone());
                tx.last_response = Some(data);
                if provisional {
                    return Ok(());
                }
                tx.interval = cfg.t1;
                if success {
                    tx.state = ServerState::Accepted;
                    tx.ok_to_tag = resp.to_tag();
                    let req = &tx.request;
                    if let (Some(cid), Some(ft), Some(cs)) =
                        (req.call_id(), req.from_tag(), req.cseq())
                    {
                        let ak = (cid.to_string(), ft, cs.seq);
                        self.ack_index.insert(ak.clone(), id);
                        tx.ack_key = Some(ak);
                    }
                    self.timers
                        .arm(&mut tx.timers, me, Slot::Retransmit, now + cfg.t1);
                    self.timers
                        .arm(&mut tx.timers, me, Slot::Lifetime, now + cfg.t1x64());
                } else {
                    tx.state = ServerState::Completed;
                    compact_request(&mut tx.request);
                    if !tx.peer.is_reliable() {
                        self.timers
                            .arm(&mut tx.timers, me, Slot::Retransmit, now + cfg.t1);
                    }
                    self.timers
                        .arm(&mut tx.timers, me, Slot::Lifetime, now + cfg.t1x64());
                }
                Ok(())
            }
            (true, ServerState::Accepted) if success => {
                // RFC 6026 §8.5: further 2xx from the TU are sent; they replace the one the
                // retransmission timer re-sends.
                let data = Bytes::from(resp.to_bytes());
                self.out.send(tx.peer, data.clone());
                tx.last_response = Some(data);
                Ok(())
            }
            (false, ServerState::Trying | ServerState::Proceeding) => {
                let data = Bytes::from(resp.to_bytes());
                self.out.send(tx.peer, data.clone());
                tx.last_response = Some(data);
                if provisional {
                    tx.state = ServerState::Proceeding;
                    return Ok(());
                }
                tx.state = ServerState::Completed;
                compact_request(&mut tx.request);
                if tx.peer.is_reliable() {
                    self.terminate(me);
                } else {
                    self.timers
                        .arm(&mut tx.timers, me, Slot::Lifetime, now + cfg.t1x64());
                }
                Ok(())
            }
            _ => Err(TxError::FinalAlreadySent),
        }
    }

    /// The request that created a server transaction.
    pub(crate) fn server_request(&self, tx: ServerTxId) -> Option<&Request> {
        self.servers.get(&tx.0).map(|t| &t.request)
    }

    // --------------------------------------------------------------------------------------
    // Client side

    /// Starts a client transaction. `req` must carry its top Via with a `z9hG4bK` branch.
    /// An ACK creates no transaction: it is sent as by [`Self::send_ack`] and the id returned
    /// matches nothing.
    pub(crate) fn send_request(&mut self, req: Request, to: Peer, now: Instant) -> ClientTxId {
        self.start_client(req, to, now, false)
    }

    /// Sends an ACK for a 2xx (or any stateless request) once.
    pub(crate) fn send_ack(&mut self, ack: &Request, to: Peer) {
        self.out.send(to, Bytes::from(ack.to_bytes()));
    }

    fn start_client(&mut self, req: Request, to: Peer, now: Instant, internal: bool) -> ClientTxId {
        let id = self.alloc_id();
        let data = Bytes::from(req.to_bytes());
        self.out.send(to, data.clone());
        if req.method == Method::Ack {
            return ClientTxId(id);
        }
        let branch = req
            .top_via()
            .and_then(|v| v.branch().map(str::to_string))
            .unwrap_or_default();
        let key = (branch, req.method.clone());
        let invite = req.method == Method::Invite;
        let me = TxRef::Client(id);
        let cfg = self.cfg;
        let mut tx = ClientTx {
            invite,
            state: if invite {
                ClientState::Calling
            } else {
                ClientState::Trying
            },
            peer: to,
            key: key.clone(),
            request_bytes: data,
            request: None,
            ack: None,
            interval: cfg.t1,
            timers: [None, None],
            internal,
            cancel: CancelState::None,
            cancelled_at: None,
        };
        if !to.is_reliable() {
            self.timers
                .arm(&mut tx.timers, me, Slot::Retransmit, now + cfg.t1);
        }
        // Timer B (INVITE) / Timer F (non-INVITE).
        self.timers
            .arm(&mut tx.timers, me, Slot::Lifetime, now + cfg.t1x64());
        if req.method == Method::Cancel {
            self.note_cancel_sent(&key.0, now);
        }
        if invite {
            tx.request = Some(Box::new(req));
        }
        self.client_index.insert(key, id);
        self.clients.insert(id, tx);
        self.out.stats.client_created += 1;
        ClientTxId(id)
    }

    /// A CANCEL went out for the INVITE with this branch: guard its lifetime (§9.1: give up
    /// 64*T1 after the CANCEL if no final response comes).
    fn note_cancel_sent(&mut self, branch: &str, now: Instant) {
        let Some(&id) = self.client_index.get(&(branch.to_string(), Method::Invite)) else {
            return;
        };
        let Some(tx) = self.clients.get_mut(&id) else {
            return;
        };
        tx.cancel = CancelState::Sent;
        tx.cancelled_at = Some(now);
        if tx.state == ClientState::Proceeding {
            let at = now + self.cfg.t1x64();
            self.timers
                .arm(&mut tx.timers, TxRef::Client(id), Slot::Lifetime, at);
        }
    }

    /// Cancels a client INVITE (§9.1). Sent at once in Proceeding, or with the first
    /// provisional response while Calling. Idempotent until a final response arrives.
    pub(crate) fn cancel(&mut self, tx: ClientTxId, now: Instant) -> Result<(), TxError> {
        let t = self
            .clients
            .get_mut(&tx.0)
            .ok_or(TxError::UnknownTransaction)?;
        if !t.invite {
            return Err(TxError::NotInvite);
        }
        if !matches!(t.state, ClientState::Calling | ClientState::Proceeding) {
            return Err(TxError::NotCancellable);
        }
        if t.cancel != CancelState::None {
            return Ok(());
        }
        match t.state {
            ClientState::Calling => {
                t.cancel = CancelState::Pending;
                Ok(())
            }
            ClientState::Proceeding => {
                self.send_cancel(tx.0, now);
                Ok(())
            }
            _ => Err(TxError::NotCancellable),
        }
    }

    fn send_cancel(&mut self, id: u64, now: Instant) {
        let Some(tx) = self.clients.get(&id) else {
            return;
        };
        let Some(invite) = tx.request.as_deref() else {
            return;
        };
        let cancel = build_cancel(invite);
        let peer = tx.peer;
        self.start_client(cancel, peer, now, true);
    }

    /// The request of a client INVITE transaction (kept to build ACK and CANCEL).
    pub(crate) fn client_request(&self, tx: ClientTxId) -> Option<&Request> {
        self.clients.get(&tx.0).and_then(|t| t.request.as_deref())
    }

    /// Feeds a received response (§17.1.3 matching: top Via branch + CSeq method).
    pub(crate) fn on_response(&mut self, resp: Response, _from: Peer, now: Instant) -> ClientInput {
        let branch = resp.top_via().and_then(|v| v.branch().map(str::to_string));
        let (Some(branch), Some(cseq)) = (branch, resp.cseq()) else {
            return ClientInput::Unmatched(resp);
        };
        let Some(&id) = self.client_index.get(&(branch, cseq.method)) else {
            return ClientInput::Unmatched(resp);
        };
        let Some(tx) = self.clients.get_mut(&id) else {
            return ClientInput::Unmatched(resp);
        };
        let cfg = self.cfg;
        let me = TxRef::Client(id);
        let status = resp.status;
        let deliver = |internal: bool, resp: Response| {
            if internal {
                ClientInput::Absorbed
            } else {
                ClientInput::Response(ClientTxId(id), resp)
            }
        };
        if tx.invite {
            match tx.state {
                ClientState::Calling | ClientState::Proceeding if status < 200 => {
                    if tx.state == ClientState::Calling {
                        tx.state = ClientState::Proceeding;
                        // §17.1.1.2: no more retransmissions; Timer B only runs in Calling.
                        self.timers.disarm_all(&mut tx.timers);
                        if let Some(at) = tx.cancelled_at {
                            self.timers
                                .arm(&mut tx.timers, me, Slot::Lifetime, at + cfg.t1x64());
                        }
                        if tx.cancel == CancelState::Pending {
                            self.send_cancel(id, now);
                        }
                    }
                    ClientInput::Response(ClientTxId(id), resp)
                }
                ClientState::Calling | ClientState::Proceeding if status < 300 => {
                    tx.state = ClientState::Accepted;
                    self.timers.disarm_all(&mut tx.timers);
                    self.timers
                        .arm(&mut tx.timers, me, Slot::Lifetime, now + cfg.t1x64());
                    ClientInput::Response(ClientTxId(id), resp)
                }
                ClientState::Calling | ClientState::Proceeding => {
                    tx.state = ClientState::Completed;
                    self.timers.disarm_all(&mut tx.timers);
                    if let Some(invite) = tx.request.as_deref() {
                        let ack = Bytes::from(build_ack(invite, &resp).to_bytes());
                        self.out.send(tx.peer, ack.clone());
                        tx.ack = Some(ack);
                    }
                    if tx.peer.is_reliable() {
                        self.terminate(me);
                    } else {
                        self.timers
                            .arm(&mut tx.timers, me, Slot::Lifetime, now + TIMER_D_UDP);
                    }
                    ClientInput::Response(ClientTxId(id), resp)
                }
                ClientState::Accepted if (200..300).contains(&status) => {
                    ClientInput::Retransmission2xx(ClientTxId(id), resp)
                }
                ClientState::Completed if status >= 300 => {
                    if let Some(ack) = tx.ack.clone() {
                        self.out.resend(tx.peer, ack);
                    }
                    ClientInput::Absorbed
                }
                _ => ClientInput::Absorbed,
            }
        } else {
            match tx.state {
                ClientState::Trying | ClientState::Proceeding if status < 200 => {
                    // Timer E keeps running; in Proceeding it is re-armed at T2.
                    tx.state = ClientState::Proceeding;
                    deliver(tx.internal, resp)
                }
                ClientState::Trying | ClientState::Proceeding => {
                    tx.state = ClientState::Completed;
                    self.timers.disarm_all(&mut tx.timers);
                    let internal = tx.internal;
                    if tx.peer.is_reliable() {
                        self.terminate(me);
                    } else {
                        self.timers
                            .arm(&mut tx.timers, me, Slot::Lifetime, now + cfg.t4);
                    }
                    deliver(internal, resp)
                }
                _ => ClientInput::Absorbed,
            }
        }
    }

    // --------------------------------------------------------------------------------------
    // Driving

    pub(crate) fn poll_transmit(&mut self) -> Option<Transmit> {
        self.out.transmits.pop_front()
    }

    pub(crate) fn poll_event(&mut self) -> Option<TxEvent> {
        self.out.events.pop_front()
    }

    /// The earliest armed timer.
    pub(crate) fn poll_timeout(&self) -> Option<Instant> {
        self.timers.map.first_key_value().map(|((at, _), _)| *at)
    }

    /// Fires every timer due at `now`, in deadline order.
    pub(crate) fn handle_timeout(&mut self, now: Instant) {
        while let Some(entry) = self.timers.map.first_entry() {
            if entry.key().0 > now {
                break;
            }
            let (key, (tx, slot)) = entry.remove_entry();
            match tx {
                TxRef::Client(id) => self.fire_client(id, slot, key.0),
                TxRef::Server(id) => self.fire_server(id, slot, key.0),
            }
        }
    }

    /// `deadline` rather than the caller's `now` anchors re-arming, so a late wake-up does not
    /// stretch the schedule.
    fn fire_client(&mut self, id: u64, slot: Slot, deadline: Instant) {
        let cfg = self.cfg;
        let Some(tx) = self.clients.get_mut(&id) else {
            return;
        };
        tx.timers[slot as usize] = None;
        let me = TxRef::Client(id);
        match (slot, tx.state) {
            (Slot::Retransmit, ClientState::Calling) => {
                // Timer A doubles without a cap (§17.1.1.2).
                self.out.resend(tx.peer, tx.request_bytes.clone());
                tx.interval *= 2;
                self.timers
                    .arm(&mut tx.timers, me, Slot::Retransmit, deadline + tx.interval);
            }
            (Slot::Retransmit, ClientState::Trying | ClientState::Proceeding) if !tx.invite => {
                // Timer E: doubling to T2 in Trying, T2 in Proceeding (§17.1.2.2).
                self.out.resend(tx.peer, tx.request_bytes.clone());
                tx.interval = if tx.state == ClientState::Proceeding {
                    cfg.t2
                } else {
                    (tx.interval * 2).min(cfg.t2)
                };
                self.timers
                    .arm(&mut tx.timers, me, Slot::Retransmit, deadline + tx.interval);
            }
            (
                Slot::Lifetime,
                ClientState::Calling | ClientState::Trying | ClientState::Proceeding,
            ) => {
                // Timer B / F, or no final within 64*T1 of our CANCEL.
                if !tx.internal {
                    self.out.events.push_back(TxEvent::Timeout(ClientTxId(id)));
                    self.out.stats.timeouts += 1;
                    tracing::debug!(tx = id, "client transaction timed out");
                }
                self.terminate(me);
            }
            (Slot::Lifetime, _) => self.terminate(me), // Timer D / K / M
            (Slot::Retransmit, _) => {}
        }
    }

    fn fire_server(&mut self, id: u64, slot: Slot, deadline: Instant) {
        let cfg = self.cfg;
        let Some(tx) = self.servers.get_mut(&id) else {
            return;
        };
        tx.timers[slot as usize] = None;
        let me = TxRef::Server(id);
        match (slot, tx.state) {
            (Slot::Retransmit, ServerState::Completed | ServerState::Accepted) => {
                // Timer G (non-2xx, §17.2.1) or the 2xx timer (§13.3.1.4): T1 doubling to T2.
                if let Some(data) = tx.last_response.clone() {
                    self.out.resend(tx.peer, data);
                }
                tx.interval = (tx.interval * 2).min(cfg.t2);
                self.timers
                    .arm(&mut tx.timers, me, Slot::Retransmit, deadline + tx.interval);
            }
            (Slot::Lifetime, ServerState::Accepted) => {
                // Timer L.
                if !tx.acked {
                    self.out
                        .events
                        .push_back(TxEvent::AckTimeout(ServerTxId(id)));
                    self.out.stats.ack_timeouts += 1;
                    tracing::debug!(tx = id, "2xx never acknowledged");
                }
                self.terminate(me);
            }
            // Timer H (ACK never came for a non-2xx), I, J.
            (Slot::Lifetime, _) => self.terminate(me),
            (Slot::Retransmit, _) => {}
        }
    }

    fn terminate(&mut self, tx: TxRef) {
        match tx {
            TxRef::Client(id) => {
                let Some(mut t) = self.clients.remove(&id) else {
                    return;
                };
                self.timers.disarm_all(&mut t.timers);
                if self.client_index.get(&t.key) == Some(&id) {
                    self.client_index.remove(&t.key);
                }
                if !t.internal {
                    self.out
                        .events
                        .push_back(TxEvent::ClientTerminated(ClientTxId(id)));
                }
            }
            TxRef::Server(id) => {
                let Some(mut t) = self.servers.remove(&id) else {
                    return;
                };
                self.timers.disarm_all(&mut t.timers);
                if self.server_index.get(&t.key) == Some(&id) {
                    self.server_index.remove(&t.key);
                }
                if let Some(mk) = &t.merge_key {
                    if self.merge_index.get(mk) == Some(&id) {
                        self.merge_index.remove(mk);
                    }
                }
                if let Some(ak) = &t.ack_key {
                    if self.ack_index.get(ak) == Some(&id) {
                        self.ack_index.remove(ak);
                    }
                }
                if !t.internal {
                    self.out
                        .events
                        .push_back(TxEvent::ServerTerminated(ServerTxId(id)));
                }
            }
        }
    }

    /// Live (client, server) transactions, including the layer's own CANCEL/481/482 ones.
    #[cfg(test)]
    pub(crate) fn counts(&self) -> (usize, usize) {
        (self.clients.len(), self.servers.len())
    }

    pub(crate) fn stats(&self) -> TxStats {
        self.out.stats
    }
}

// ------------------------------------------------------------------------------------------
// Helpers

fn default_port(transport: &str) -> u16 {
    if transport.eq_ignore_ascii_case("TLS") {
        5061
    } else {
        5060
    }
}

fn normalized_method(m: &Method) -> Method {
    if *m == Method::Ack {
        Method::Invite
    } else {
        m.clone()
    }
}

/// §17.2.3 key of a received request; `None` when it lacks what matching needs.
fn server_key(req: &Request) -> Option<ServerKey> {
    let via = req.top_via()?;
    let method = normalized_method(&req.method);
    match via.branch() {
        Some(b) if b.starts_with(MAGIC_COOKIE) => Some(ServerKey::Rfc3261 {
            branch: b.to_string(),
            sent_by: format!(
                "{}:{}",
                via.host.to_ascii_lowercase(),
                via.port.unwrap_or_else(|| default_port(&via.transport))
            ),
            method,
        }),
        _ => {
            let cseq = req.cseq()?;
            Some(ServerKey::Rfc2543 {
                call_id: req.call_id()?.to_string(),
                from_tag: req.from_tag().unwrap_or_default(),
                cseq: cseq.seq,
                method,
                via: via.to_string().to_ascii_lowercase(),
            })
        }
    }
}

fn merge_key(req: &Request) -> Option<MergeKey> {
    let cseq = req.cseq()?;
    Some((
        req.from_tag()?,
        req.call_id()?.to_string(),
        cseq.seq,
        cseq.method,
    ))
}

/// Keeps of a request only what a response to it is built from (Via, From, To, Call-ID, CSeq,
/// as [`Request::response`] copies them): a finished server transaction holds no body.
fn compact_request(req: &mut Request) {
    let mut kept = super::message::Headers::new();
    for h in req.headers.iter() {
        if ["Via", "From", "To", "Call-ID", "CSeq"]
            .iter()
            .any(|n| super::message::same_header(&h.name, n))
        {
            kept.push(h.name.clone(), h.value.clone());
        }
    }
    req.headers = kept;
    req.body = Bytes::new();
}

/// Where responses to a request go (§18.2.2): over TCP the connection it came on; over UDP
/// the source address when the top Via asks for `rport` (RFC 3581), else the `received`
/// address (the source IP) with the Via's sent-by port (5060 when absent).
fn response_peer(req: &Request, from: Peer) -> Peer {
    if from.is_reliable() {
        return from;
    }
    match req.top_via() {
        Some(via) if via.rport().is_none() => Peer {
            transport: from.transport,
            addr: SocketAddr::new(from.addr.ip(), via.port.unwrap_or(5060)),
        },
        _ => from,
    }
}

/// §18.2.1 / RFC 3581: records the source address in the top Via so responses carry it.
fn stamp_via(req: &mut Request, from: &Peer) {
    let Some(mut via) = req.top_via() else { return };
    let ip = from.addr.ip();
    let host_ip: Option<IpAddr> = via
        .host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .parse()
        .ok();
    let rport = via.rport();
    let mut changed = false;
    let ip_s = ip.to_string();
    if (host_ip != Some(ip) || rport.is_some()) && via.received() != Some(ip_s.as_str()) {
        via.set_param("received", Some(&ip_s));
        changed = true;
    }
    if rport == Some(None) {
        via.set_param("rport", Some(&from.addr.port().to_string()));
        changed = true;
    }
    if changed {
        replace_top_via(req, &via);
    }
}

fn replace_top_via(req: &mut Request, via: &Via) {
    req.headers.pop_first_list_value("Via");
    req.headers.push_front("Via", via.to_string());
}

/// ACK for a non-2xx final (§17.1.1.3): same Request-URI, top Via, From, Call-ID, CSeq number
/// and Route as the INVITE, To from the response.
pub(crate) fn build_ack(invite: &Request, resp: &Response) -> Request {
    let to = resp.headers.get("To").or_else(|| invite.headers.get("To"));
    build_like(invite, Method::Ack, to)
}

/// CANCEL for a client INVITE (§9.1).
pub(crate) fn build_cancel(invite: &Request) -> Request {
    build_like(invite, Method::Cancel, invite.headers.get("To"))
}

fn build_like(invite: &Request, method: Method, to: Option<&str>) -> Request {
    let mut r = Request::new(method.clone(), invite.uri.clone());
    if let Some(top) = invite
        .headers
        .list("Via")
        .ok()
        .and_then(|l| l.first().map(|s| s.to_string()))
    {
        r.headers.push("Via", top);
    }
    r.headers.push("Max-Forwards", "70");
    for route in invite.headers.get_all("Route") {
        r.headers.push("Route", route);
    }
    if let Some(from) = invite.headers.get("From") {
        r.headers.push("From", from);
    }
    if let Some(to) = to {
        r.headers.push("To", to);
    }
    if let Some(cid) = invite.call_id() {
        r.headers.push("Call-ID", cid);
    }
    let seq = invite.cseq().map(|c| c.seq).unwrap_or(1);
    r.headers.push("CSeq", format!("{seq} {method}"));
    r
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sip::message::{parse, SipMessage};

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn udp() -> Peer {
        Peer::new(Transport::Udp, "127.0.0.1:5070".parse().unwrap())
    }

    fn tcp() -> Peer {
        Peer::new(Transport::Tcp, "127.0.0.1:5071".parse().unwrap())
    }

    fn request_text(method: &str, branch: &str, cseq: u32, to_tag: Option<&str>) -> String {
        let to = match to_tag {
            Some(t) => format!("<sip:bob@example.com>;tag={t}"),
            None => "<sip:bob@example.com>".to_string(),
        };
        format!(
            "{method} sip:bob@example.com SIP/2.0\r\n\
             Via: SIP/2.0/UDP 127.0.0.1:5070;branch={branch}\r\n\
             Max-Forwards: 70\r\n\
             From: <sip:alice@example.com>;tag=ftag\r\n\
             To: {to}\r\n\
             Call-ID: call-1\r\n\
             CSeq: {cseq} {method}\r\n\
             Route: <sip:proxy.example.com;lr>\r\n\
             Content-Length: 0\r\n\r\n"
        )
    }

    fn req(method: &str, branch: &str) -> Request {
        req_full(method, branch, 1, None)
    }

    fn req_full(method: &str, branch: &str, cseq: u32, to_tag: Option<&str>) -> Request {
        match parse(request_text(method, branch, cseq, to_tag).as_bytes()).unwrap() {
            SipMessage::Request(r) => r,
            SipMessage::Response(_) => panic!("not a request"),
        }
    }

    fn resp_to(r: &Request, status: u16, tag: Option<&str>) -> Response {
        let mut resp = r.response(status, None);
        if let Some(t) = tag {
            resp.ensure_to_tag(t);
        }
        resp
    }

    fn decode(t: &Transmit) -> SipMessage {
        parse(&t.data).unwrap()
    }

    fn drain(l: &mut TransactionLayer) -> Vec<Transmit> {
        std::iter::from_fn(|| l.poll_transmit()).collect()
    }

    fn events(l: &mut TransactionLayer) -> Vec<TxEvent> {
        std::iter::from_fn(|| l.poll_event()).collect()
    }

    fn status_of(t: &Transmit) -> u16 {
        match decode(t) {
            SipMessage::Response(r) => r.status,
            SipMessage::Request(r) => panic!("expected a response, got {}", r.method),
        }
    }

    fn method_of(t: &Transmit) -> Method {
        match decode(t) {
            SipMessage::Request(r) => r.method,
            SipMessage::Response(r) => panic!("expected a request, got {}", r.status),
        }
    }

    /// Runs the layer's timers up to `until`, returning the offset (from `t0`) of every
    /// transmission it made.
    fn run_until(l: &mut TransactionLayer, t0: Instant, until: Duration) -> Vec<Duration> {
        let mut sent = Vec::new();
        while let Some(at) = l.poll_timeout() {
            if at > t0 + until {
                break;
            }
            l.handle_timeout(at);
            for _ in drain(l) {
                sent.push(at - t0);
            }
        }
        sent
    }

    fn layer() -> TransactionLayer {
        TransactionLayer::new(TimerConfig::default())
    }

    // ---------------- client INVITE ----------------

    #[test]
    fn client_invite_timer_a_doubles_then_timer_b() {
        let mut l = layer();
        let t0 = Instant::now();
        let id = l.send_request(req("INVITE", "z9hG4bKa"), udp(), t0);
        let first = drain(&mut l);
        assert_eq!(first.len(), 1);
        assert_eq!(first[0].peer, udp());
        assert_eq!(l.poll_timeout(), Some(t0 + ms(500)));
        let sent = run_until(&mut l, t0, Duration::from_secs(31));
        let expect: Vec<Duration> = [500, 1500, 3500, 7500, 15500]
            .iter()
            .map(|&m| ms(m))
            .collect();
        assert_eq!(sent, expect);
        let sent = run_until(&mut l, t0, Duration::from_secs(40));
        assert_eq!(sent, vec![ms(31500)]);
        assert_eq!(
            events(&mut l),
            vec![TxEvent::Timeout(id), TxEvent::ClientTerminated(id)]
        );
        assert_eq!(l.counts(), (0, 0));
        assert_eq!(l.poll_timeout(), None);
        assert_eq!(l.stats().retransmissions, 6);
        assert_eq!(l.stats().timeouts, 1);
    }

    #[test]
    fn client_invite_over_tcp_never_retransmits() {
        let mut l = layer();
        let t0 = Instant::now();
        let id = l.send_request(req("INVITE", "z9hG4bKa"), tcp(), t0);
        assert_eq!(drain(&mut l).len(), 1);
        assert_eq!(l.poll_timeout(), Some(t0 + Duration::from_secs(32)));
        l.handle_timeout(t0 + Duration::from_secs(32));
        assert!(drain(&mut l).is_empty());
        assert_eq!(events(&mut l)[0], TxEvent::Timeout(id));
    }

    #[test]
    fn client_invite_provisional_then_non2xx_acked_and_timer_d() {
        let mut l = layer();
        let t0 = Instant::now();
        let invite = req("INVITE", "z9hG4bKa");
        let id = l.send_request(invite.clone(), udp(), t0);
        drain(&mut l);
        let ringing = resp_to(&invite, 180, Some("tt"));
        assert_eq!(
            l.on_response(ringing.clone(), udp(), t0 + ms(100)),
            ClientInput::Response(id, ringing)
        );
        // Proceeding: no Timer A, no Timer B.
        assert_eq!(l.poll_timeout(), None);
        let busy = resp_to(&invite, 486, Some("tt"));
        let t1 = t0 + Duration::from_secs(60);
        assert_eq!(
            l.on_response(busy.clone(), udp(), t1),
            ClientInput::Response(id, busy.clone())
        );
        let out = drain(&mut l);
        assert_eq!(out.len(), 1);
        let SipMessage::Request(ack) = decode(&out[0]) else {
            panic!()
        };
        assert_eq!(ack.method, Method::Ack);
        assert_eq!(ack.uri, invite.uri);
        assert_eq!(ack.cseq().unwrap().to_string(), "1 ACK");
        assert_eq!(ack.to_tag().as_deref(), Some("tt"));
        assert_eq!(ack.top_via().unwrap().branch(), Some("z9hG4bKa"));
        assert_eq!(ack.headers.get("Route"), Some("<sip:proxy.example.com;lr>"));
        // Completed: retransmitted final absorbed, ACK re-sent.
        assert_eq!(
            l.on_response(busy.clone(), udp(), t1 + ms(10)),
            ClientInput::Absorbed
        );
        let again = drain(&mut l);
        assert_eq!(again.len(), 1);
        assert_eq!(again[0].data, out[0].data);
        // Timer D: 32 s.
        assert_eq!(l.poll_timeout(), Some(t1 + Duration::from_secs(32)));
        l.handle_timeout(t1 + Duration::from_secs(32));
        assert_eq!(l.counts(), (0, 0));
        assert_eq!(
            l.on_response(busy.clone(), udp(), t1 + Duration::from_secs(33)),
            ClientInput::Unmatched(busy)
        );
    }

    #[test]
    fn client_invite_non2xx_over_tcp_timer_d_zero() {
        let mut l = layer();
        let t0 = Instant::now();
        let invite = req("INVITE", "z9hG4bKa");
        let id = l.send_request(invite.clone(), tcp(), t0);
        drain(&mut l);
        let busy = resp_to(&invite, 486, Some("tt"));
        assert_eq!(
            l.on_response(busy, tcp(), t0),
            ClientInput::Response(id, resp_to(&invite, 486, Some("tt")))
        );
        assert_eq!(method_of(&drain(&mut l)[0]), Method::Ack);
        assert_eq!(l.counts(), (0, 0));
    }

    #[test]
    fn client_invite_2xx_accepted_then_timer_m() {
        let mut l = layer();
        let t0 = Instant::now();
        let invite = req("INVITE", "z9hG4bKa");
        let id = l.send_request(invite.clone(), udp(), t0);
        drain(&mut l);
        let ok = resp_to(&invite, 200, Some("tt"));
        assert_eq!(
            l.on_response(ok.clone(), udp(), t0 + ms(200)),
            ClientInput::Response(id, ok.clone())
        );
        assert!(drain(&mut l).is_empty(), "the layer never ACKs a 2xx");
        assert_eq!(
            l.on_response(ok.clone(), udp(), t0 + ms(700)),
            ClientInput::Retransmission2xx(id, ok.clone())
        );
        // Another fork answering is passed up too.
        let forked = resp_to(&invite, 200, Some("other"));
        assert_eq!(
            l.on_response(forked.clone(), udp(), t0 + ms(800)),
            ClientInput::Retransmission2xx(id, forked)
        );
        assert_eq!(
            l.poll_timeout(),
            Some(t0 + ms(200) + Duration::from_secs(32))
        );
        l.handle_timeout(t0 + Duration::from_secs(33));
        assert_eq!(events(&mut l), vec![TxEvent::ClientTerminated(id)]);
        assert_eq!(
            l.on_response(ok.clone(), udp(), t0 + Duration::from_secs(34)),
            ClientInput::Unmatched(ok)
        );
    }

    #[test]
    fn client_cancel_waits_for_provisional_and_absorbs_its_200() {
        let mut l = layer();
        let t0 = Instant::now();
        let invite = req("INVITE", "z9hG4bKa");
        let id = l.send_request(invite.clone(), udp(), t0);
        drain(&mut l);
        l.cancel(id, t0 + ms(100)).unwrap();
        assert!(
            drain(&mut l).is_empty(),
            "§9.1: no CANCEL before a provisional"
        );
        let trying = resp_to(&invite, 100, None);
        l.on_response(trying, udp(), t0 + ms(200));
        let out = drain(&mut l);
        assert_eq!(out.len(), 1);
        let SipMessage::Request(cancel) = decode(&out[0]) else {
            panic!()
        };
        assert_eq!(cancel.method, Method::Cancel);
        assert_eq!(cancel.cseq().unwrap().to_string(), "1 CANCEL");
        assert_eq!(cancel.top_via().unwrap().branch(), Some("z9hG4bKa"));
        assert_eq!(cancel.uri, invite.uri);
        assert_eq!(l.counts(), (2, 0));
        let cancel_ok = cancel.response(200, None);
        assert_eq!(
            l.on_response(cancel_ok, udp(), t0 + ms(300)),
            ClientInput::Absorbed
        );
        let terminated = resp_to(&invite, 487, Some("tt"));
        assert_eq!(
            l.on_response(terminated.clone(), udp(), t0 + ms(400)),
            ClientInput::Response(id, terminated)
        );
        assert_eq!(method_of(&drain(&mut l)[0]), Method::Ack);
        assert_eq!(l.cancel(id, t0 + ms(500)), Err(TxError::NotCancellable));
    }

    #[test]
    fn client_cancel_guard_times_out_without_final() {
        let mut l = layer();
        let t0 = Instant::now();
        let invite = req("INVITE", "z9hG4bKa");
        let id = l.send_request(invite.clone(), tcp(), t0);
        l.on_response(resp_to(&invite, 180, Some("t")), tcp(), t0 + ms(10));
        let t1 = t0 + Duration::from_secs(100);
        l.cancel(id, t1).unwrap();
        assert_eq!(method_of(drain(&mut l).last().unwrap()), Method::Cancel);
        l.handle_timeout(t1 + Duration::from_secs(31));
        assert!(events(&mut l).is_empty());
        l.handle_timeout(t1 + Duration::from_secs(32));
        assert_eq!(
            events(&mut l),
            vec![TxEvent::Timeout(id), TxEvent::ClientTerminated(id)]
        );
    }

    // ---------------- client non-INVITE ----------------

    #[test]
    fn client_non_invite_timer_e_caps_at_t2_then_timer_f() {
        let mut l = layer();
        let t0 = Instant::now();
        let id = l.send_request(req("OPTIONS", "z9hG4bKo"), udp(), t0);
        drain(&mut l);
        let sent = run_until(&mut l, t0, Duration::from_secs(31));
        let expect: Vec<Duration> = [500, 1500, 3500, 7500, 11500, 15500, 19500, 23500, 27500]
            .iter()
            .map(|&m| ms(m))
            .collect();
        assert_eq!(sent, expect);
        run_until(&mut l, t0, Duration::from_secs(32));
        assert_eq!(
            events(&mut l),
            vec![TxEvent::Timeout(id), TxEvent::ClientTerminated(id)]
        );
    }

    #[test]
    fn client_non_invite_proceeding_retransmits_at_t2_then_timer_k() {
        let mut l = layer();
        let t0 = Instant::now();
        let r = req("MESSAGE", "z9hG4bKm");
        let id = l.send_request(r.clone(), udp(), t0);
        drain(&mut l);
        assert_eq!(run_until(&mut l, t0, ms(600)), vec![ms(500)]);
        let prov = resp_to(&r, 180, None);
        assert_eq!(
            l.on_response(prov.clone(), udp(), t0 + ms(700)),
            ClientInput::Response(id, prov)
        );
        // E was armed for 1.5 s (interval 1 s); after it fires in Proceeding it stays at T2.
        assert_eq!(
            run_until(&mut l, t0, ms(10_000)),
            vec![ms(1500), ms(5500), ms(9500)]
        );
        let ok = resp_to(&r, 200, Some("x"));
        let t1 = t0 + ms(10_000);
        assert_eq!(
            l.on_response(ok.clone(), udp(), t1),
            ClientInput::Response(id, ok.clone())
        );
        assert_eq!(
            l.on_response(ok.clone(), udp(), t1 + ms(1)),
            ClientInput::Absorbed
        );
        // Timer K = T4.
        assert_eq!(l.poll_timeout(), Some(t1 + Duration::from_secs(5)));
        l.handle_timeout(t1 + Duration::from_secs(5));
        assert_eq!(l.counts(), (0, 0));
        assert!(drain(&mut l).is_empty());
    }

    #[test]
    fn client_non_invite_tcp_no_e_and_k_zero() {
        let mut l = layer();
        let t0 = Instant::now();
        let r = req("BYE", "z9hG4bKb");
        let id = l.send_request(r.clone(), tcp(), t0);
        drain(&mut l);
        assert_eq!(l.poll_timeout(), Some(t0 + Duration::from_secs(32)));
        let ok = resp_to(&r, 200, Some("x"));
        assert_eq!(
            l.on_response(ok.clone(), tcp(), t0 + ms(5)),
            ClientInput::Response(id, ok)
        );
        assert_eq!(l.counts(), (0, 0));
        assert_eq!(l.poll_timeout(), None);
    }

    #[test]
    fn client_matching_uses_branch_and_method() {
        let mut l = layer();
        let t0 = Instant::now();
        let invite = req("INVITE", "z9hG4bKa");
        l.send_request(invite.clone(), udp(), t0);
        // Same branch, CSeq method CANCEL: not the INVITE's response.
        let mut other = resp_to(&invite, 200, Some("x"));
        other.headers.set("CSeq", "1 CANCEL");
        assert!(matches!(
            l.on_response(other, udp(), t0),
            ClientInput::Unmatched(_)
        ));
        let mut wrong_branch = resp_to(&invite, 180, None);
        wrong_branch
            .headers
            .set("Via", "SIP/2.0/UDP 127.0.0.1:5070;branch=z9hG4bKzz");
        assert!(matches!(
            l.on_response(wrong_branch, udp(), t0),
            ClientInput::Unmatched(_)
        ));
    }

    // ---------------- server INVITE ----------------

    #[test]
    fn server_invite_trying_provisional_and_timer_g_until_ack_then_timer_i() {
        let mut l = layer();
        let t0 = Instant::now();
        let invite = req("INVITE", "z9hG4bKs");
        let ServerInput::New(id, got) = l.on_request(invite.clone(), udp(), t0) else {
            panic!()
        };
        assert_eq!(got.method, Method::Invite);
        let out = drain(&mut l);
        assert_eq!(out.len(), 1);
        assert_eq!(status_of(&out[0]), 100);
        assert_eq!(out[0].peer, udp());
        // Retransmitted INVITE: the 100 again.
        assert_eq!(
            l.on_request(invite.clone(), udp(), t0 + ms(500)),
            ServerInput::Absorbed
        );
        assert_eq!(status_of(&drain(&mut l)[0]), 100);
        l.respond(id, resp_to(&invite, 180, Some("s")), t0 + ms(600))
            .unwrap();
        assert_eq!(status_of(&drain(&mut l)[0]), 180);
        assert_eq!(
            l.on_request(invite.clone(), udp(), t0 + ms(1500)),
            ServerInput::Absorbed
        );
        assert_eq!(status_of(&drain(&mut l)[0]), 180);
        // Final non-2xx: Timer G.
        let t1 = t0 + Duration::from_secs(2);
        l.respond(id, resp_to(&invite, 486, Some("s")), t1).unwrap();
        assert_eq!(status_of(&drain(&mut l)[0]), 486);
        assert_eq!(
            l.respond(id, resp_to(&invite, 500, Some("s")), t1),
            Err(TxError::FinalAlreadySent)
        );
        let mut sent = Vec::new();
        while let Some(at) = l.poll_timeout() {
            if at > t1 + ms(12_000) {
                break;
            }
            l.handle_timeout(at);
            for t in drain(&mut l) {
                assert_eq!(status_of(&t), 486);
                sent.push(at - t1);
            }
        }
        let expect: Vec<Duration> = [500, 1500, 3500, 7500, 11500]
            .iter()
            .map(|&m| ms(m))
            .collect();
        assert_eq!(sent, expect);
        // Retransmitted INVITE in Completed: the final again.
        assert_eq!(
            l.on_request(invite.clone(), udp(), t1 + ms(12_000)),
            ServerInput::Absorbed
        );
        assert_eq!(status_of(&drain(&mut l)[0]), 486);
        // ACK: Confirmed, no more G; Timer I = T4.
        let mut ack = build_ack(&invite, &resp_to(&invite, 486, Some("s")));
        ack.headers
            .set("Via", "SIP/2.0/UDP 127.0.0.1:5070;branch=z9hG4bKs");
        let t2 = t1 + ms(12_100);
        assert_eq!(l.on_request(ack.clone(), udp(), t2), ServerInput::Absorbed);
        assert_eq!(l.poll_timeout(), Some(t2 + Duration::from_secs(5)));
        assert_eq!(
            l.on_request(ack, udp(), t2 + ms(100)),
            ServerInput::Absorbed
        );
        l.handle_timeout(t2 + Duration::from_secs(5));
        assert!(drain(&mut l).is_empty());
        assert_eq!(events(&mut l), vec![TxEvent::ServerTerminated(id)]);
        assert_eq!(l.counts(), (0, 0));
    }

    #[test]
    fn server_invite_timer_h_gives_up() {
        let mut l = layer();
        let t0 = Instant::now();
        let invite = req("INVITE", "z9hG4bKs");
        let ServerInput::New(id, _) = l.on_request(invite.clone(), udp(), t0) else {
            panic!()
        };
        l.respond(id, resp_to(&invite, 404, Some("s")), t0).unwrap();
        drain(&mut l);
        l.handle_timeout(t0 + Duration::from_secs(32) - ms(1));
        assert_eq!(l.counts(), (0, 1));
        l.handle_timeout(t0 + Duration::from_secs(32));
        assert_eq!(l.counts(), (0, 0));
        assert_eq!(events(&mut l), vec![TxEvent::ServerTerminated(id)]);
        // G fired at 0.5, 1.5, 3.5, 7.5, then every 4 s up to 31.5: 10 times.
        assert_eq!(drain(&mut l).len(), 10);
        assert_eq!(l.stats().retransmissions, 10);
    }

    #[test]
    fn server_invite_over_tcp_no_g_and_timer_i_zero() {
        let mut l = layer();
        let t0 = Instant::now();
        let invite = req("INVITE", "z9hG4bKs");
        let ServerInput::New(id, _) = l.on_request(invite.clone(), tcp(), t0) else {
            panic!()
        };
        l.respond(id, resp_to(&invite, 603, Some("s")), t0).unwrap();
        assert_eq!(l.poll_timeout(), Some(t0 + Duration::from_secs(32)));
        let mut ack = build_ack(&invite, &resp_to(&invite, 603, Some("s")));
        ack.headers
            .set("Via", "SIP/2.0/UDP 127.0.0.1:5070;branch=z9hG4bKs");
        assert_eq!(l.on_request(ack, tcp(), t0 + ms(50)), ServerInput::Absorbed);
        assert_eq!(l.counts(), (0, 0));
        assert_eq!(l.poll_timeout(), None);
    }

    fn ack_2xx(invite: &Request, tag: &str, branch: &str) -> Request {
        let mut ack = build_ack(invite, &resp_to(invite, 200, Some(tag)));
        ack.headers
            .set("Via", format!("SIP/2.0/UDP 127.0.0.1:5070;branch={branch}"));
        ack
    }

    #[test]
    fn server_invite_2xx_retransmitted_until_ack() {
        let mut l = layer();
        let t0 = Instant::now();
        let invite = req("INVITE", "z9hG4bKs");
        let ServerInput::New(id, _) = l.on_request(invite.clone(), udp(), t0) else {
            panic!()
        };
        drain(&mut l);
        l.respond(id, resp_to(&invite, 200, Some("s")), t0).unwrap();
        assert_eq!(status_of(&drain(&mut l)[0]), 200);
        let sent = run_until(&mut l, t0, ms(8000));
        assert_eq!(sent, vec![ms(500), ms(1500), ms(3500), ms(7500)]);
        // INVITE retransmission in Accepted: absorbed, not passed up (RFC 6026).
        assert_eq!(
            l.on_request(invite.clone(), udp(), t0 + ms(8000)),
            ServerInput::Absorbed
        );
        assert!(drain(&mut l).is_empty());
        // ACK for the 2xx: new branch, To tag of the 2xx.
        let ack = ack_2xx(&invite, "s", "z9hG4bKack");
        let t1 = t0 + ms(9000);
        assert_eq!(l.on_request(ack.clone(), udp(), t1), ServerInput::Ack(ack));
        assert!(run_until(&mut l, t0, Duration::from_secs(31)).is_empty());
        l.handle_timeout(t0 + Duration::from_secs(32));
        assert_eq!(
            events(&mut l),
            vec![TxEvent::ServerTerminated(id)],
            "no AckTimeout"
        );
        assert_eq!(l.counts(), (0, 0));
    }

    #[test]
    fn server_invite_2xx_without_ack_timer_l() {
        let mut l = layer();
        let t0 = Instant::now();
        let invite = req("INVITE", "z9hG4bKs");
        let ServerInput::New(id, _) = l.on_request(invite.clone(), tcp(), t0) else {
            panic!()
        };
        l.respond(id, resp_to(&invite, 200, Some("s")), t0).unwrap();
        drain(&mut l);
        // An ACK with the wrong To tag does not stop the retransmissions.
        let stray = ack_2xx(&invite, "other", "z9hG4bKack");
        assert!(matches!(
            l.on_request(stray, tcp(), t0 + ms(100)),
            ServerInput::Ack(_)
        ));
        let sent = run_until(&mut l, t0, Duration::from_secs(32));
        assert_eq!(sent.len(), 10, "0.5 1.5 3.5 7.5 11.5 .. 31.5 even over TCP");
        assert_eq!(
            events(&mut l),
            vec![TxEvent::AckTimeout(id), TxEvent::ServerTerminated(id)]
        );
        assert_eq!(l.stats().ack_timeouts, 1);
    }

    #[test]
    fn server_cancel_matching_proceeding_invite() {
        let mut l = layer();
        let t0 = Instant::now();
        let invite = req("INVITE", "z9hG4bKs");
        let ServerInput::New(id, _) = l.on_request(invite.clone(), udp(), t0) else {
            panic!()
        };
        drain(&mut l);
        let cancel = build_cancel(&invite);
        let ServerInput::Cancelled {
            invite: which,
            cancel: c,
        } = l.on_request(cancel.clone(), udp(), t0 + ms(10))
        else {
            panic!()
        };
        assert_eq!(which, id);
        assert_eq!(c.method, Method::Cancel);
        let out = drain(&mut l);
        let SipMessage::Response(ok) = decode(&out[0]) else {
            panic!()
        };
        assert_eq!(ok.status, 200);
        assert_eq!(ok.cseq().unwrap().method, Method::Cancel);
        // CANCEL retransmission: the 200 again, nothing for the TU.
        assert_eq!(
            l.on_request(cancel.clone(), udp(), t0 + ms(20)),
            ServerInput::Absorbed
        );
        assert_eq!(status_of(&drain(&mut l)[0]), 200);
        l.respond(id, resp_to(&invite, 487, Some("s")), t0 + ms(30))
            .unwrap();
        assert_eq!(status_of(&drain(&mut l)[0]), 487);
        // The CANCEL retransmitted after the final: still absorbed by the CANCEL transaction.
        assert_eq!(
            l.on_request(cancel, udp(), t0 + ms(40)),
            ServerInput::Absorbed
        );
        assert_eq!(status_of(&drain(&mut l)[0]), 200);
    }

    #[test]
    fn server_cancel_after_final_and_unknown_cancel() {
        let mut l = layer();
        let t0 = Instant::now();
        let invite = req("INVITE", "z9hG4bKs");
        let ServerInput::New(id, _) = l.on_request(invite.clone(), udp(), t0) else {
            panic!()
        };
        l.respond(id, resp_to(&invite, 200, Some("s")), t0).unwrap();
        drain(&mut l);
        assert_eq!(
            l.on_request(build_cancel(&invite), udp(), t0 + ms(1)),
            ServerInput::Answered
        );
        assert_eq!(status_of(&drain(&mut l)[0]), 200);
        let stray = req("CANCEL", "z9hG4bKnothing");
        assert_eq!(
            l.on_request(stray, udp(), t0 + ms(2)),
            ServerInput::Answered
        );
        let out = drain(&mut l);
        assert_eq!(status_of(&out[0]), 481);
        assert_eq!(out[0].peer, udp());
        // The layer's own transactions raise no events.
        l.handle_timeout(t0 + Duration::from_secs(40));
        assert_eq!(
            events(&mut l),
            vec![TxEvent::AckTimeout(id), TxEvent::ServerTerminated(id)]
        );
    }

    #[test]
    fn server_merged_request_gets_482() {
        let mut l = layer();
        let t0 = Instant::now();
        let first = req("INVITE", "z9hG4bKpath1");
        assert!(matches!(
            l.on_request(first, udp(), t0),
            ServerInput::New(..)
        ));
        drain(&mut l);
        let second = req("INVITE", "z9hG4bKpath2");
        assert_eq!(
            l.on_request(second, udp(), t0 + ms(5)),
            ServerInput::Answered
        );
        assert_eq!(status_of(&drain(&mut l)[0]), 482);
        // In-dialog (To tag) requests are never treated as merged.
        let a = req_full("INFO", "z9hG4bKi1", 5, Some("x"));
        let b = req_full("INFO", "z9hG4bKi2", 5, Some("x"));
        assert!(matches!(l.on_request(a, udp(), t0), ServerInput::New(..)));
        assert!(matches!(l.on_request(b, udp(), t0), ServerInput::New(..)));
    }

    #[test]
    fn ack_matching_nothing_goes_to_dialog_layer() {
        let mut l = layer();
        let ack = req_full("ACK", "z9hG4bKlone", 1, Some("x"));
        assert!(matches!(
            l.on_request(ack, udp(), Instant::now()),
            ServerInput::Ack(_)
        ));
        assert_eq!(l.counts(), (0, 0));
    }

    // ---------------- server non-INVITE ----------------

    #[test]
    fn server_non_invite_trying_proceeding_completed_timer_j() {
        let mut l = layer();
        let t0 = Instant::now();
        let r = req("OPTIONS", "z9hG4bKo");
        let ServerInput::New(id, _) = l.on_request(r.clone(), udp(), t0) else {
            panic!()
        };
        assert!(drain(&mut l).is_empty(), "no 100 for non-INVITE");
        assert_eq!(l.server_request(id).unwrap().method, Method::Options);
        // Trying: retransmission absorbed silently.
        assert_eq!(
            l.on_request(r.clone(), udp(), t0 + ms(500)),
            ServerInput::Absorbed
        );
        assert!(drain(&mut l).is_empty());
        l.respond(id, resp_to(&r, 183, None), t0 + ms(600)).unwrap();
        assert_eq!(status_of(&drain(&mut l)[0]), 183);
        assert_eq!(
            l.on_request(r.clone(), udp(), t0 + ms(700)),
            ServerInput::Absorbed
        );
        assert_eq!(status_of(&drain(&mut l)[0]), 183);
        l.respond(id, resp_to(&r, 200, Some("s")), t0 + ms(800))
            .unwrap();
        assert_eq!(status_of(&drain(&mut l)[0]), 200);
        assert_eq!(
            l.on_request(r.clone(), udp(), t0 + ms(900)),
            ServerInput::Absorbed
        );
        assert_eq!(status_of(&drain(&mut l)[0]), 200);
        assert_eq!(
            l.respond(id, resp_to(&r, 200, Some("s")), t0),
            Err(TxError::FinalAlreadySent)
        );
        assert_eq!(
            l.poll_timeout(),
            Some(t0 + ms(800) + Duration::from_secs(32))
        );
        l.handle_timeout(t0 + ms(800) + Duration::from_secs(32));
        assert_eq!(l.counts(), (0, 0));
        assert_eq!(
            l.respond(id, resp_to(&r, 200, None), t0),
            Err(TxError::UnknownTransaction)
        );
        // After Timer J the same request is new again.
        assert!(matches!(
            l.on_request(r, udp(), t0 + Duration::from_secs(40)),
            ServerInput::New(..)
        ));
    }

    #[test]
    fn stateless_answer_keeps_nothing_and_retransmissions_stay_new() {
        let mut l = layer();
        let t0 = Instant::now();
        let r = req("INVITE", "z9hG4bKflood");
        assert!(l.is_new_request(&r));
        // From another port than the Via's: rport/received route the answer to the source.
        let from = Peer::new(Transport::Udp, "127.0.0.9:40000".parse().unwrap());
        l.respond_stateless(r.clone(), from, |req| req.response(503, None));
        let out = drain(&mut l);
        assert_eq!(out.len(), 1);
        assert_eq!(status_of(&out[0]), 503);
        assert_eq!(out[0].peer.addr.ip(), from.addr.ip());
        let SipMessage::Response(resp) = decode(&out[0]) else {
            panic!()
        };
        assert!(resp
            .top_via()
            .unwrap()
            .to_string()
            .contains("received=127.0.0.9"));
        assert_eq!(l.counts(), (0, 0));
        assert_eq!(l.poll_timeout(), None);
        // The same INVITE again is still new (nothing remembered); once taken, it is not.
        assert!(l.is_new_request(&r));
        assert!(matches!(
            l.on_request(r.clone(), udp(), t0),
            ServerInput::New(..)
        ));
        assert!(!l.is_new_request(&r));
        assert!(!l.is_new_request(&req("ACK", "z9hG4bKflood")));
    }

    #[test]
    fn a_rejected_transaction_keeps_only_what_responses_need() {
        let mut l = layer();
        let t0 = Instant::now();
        let mut r = req("INVITE", "z9hG4bKrej");
        r.body = Bytes::from(vec![b'x'; 4000]);
        r.headers.push("Content-Type", "application/sdp");
        let ServerInput::New(id, _) = l.on_request(r.clone(), udp(), t0) else {
            panic!()
        };
        assert_eq!(l.server_request(id).unwrap().body.len(), 4000);
        l.respond(id, resp_to(&r, 486, Some("t")), t0).unwrap();
        let kept = l.server_request(id).unwrap();
        assert!(kept.body.is_empty());
        assert!(kept.headers.get("Route").is_none() && kept.headers.get("Content-Type").is_none());
        assert_eq!(kept.call_id(), Some("call-1"));
        assert_eq!(
            kept.response(486, None).headers.get("CSeq"),
            Some("1 INVITE")
        );
        // The ACK still matches and the retransmission still gets the 486.
        drain(&mut l);
        assert_eq!(
            l.on_request(r.clone(), udp(), t0 + ms(10)),
            ServerInput::Absorbed
        );
        assert_eq!(status_of(&drain(&mut l)[0]), 486);
    }

    #[test]
    fn server_non_invite_tcp_timer_j_zero() {
        let mut l = layer();
        let t0 = Instant::now();
        let r = req("REGISTER", "z9hG4bKr");
        let ServerInput::New(id, _) = l.on_request(r.clone(), tcp(), t0) else {
            panic!()
        };
        l.respond(id, resp_to(&r, 200, Some("s")), t0).unwrap();
        assert_eq!(drain(&mut l)[0].peer, tcp());
        assert_eq!(l.counts(), (0, 0));
        assert_eq!(
            l.respond(id, resp_to(&r, 100, None), t0),
            Err(TxError::UnknownTransaction)
        );
    }

    #[test]
    fn bad_status_rejected() {
        let mut l = layer();
        let r = req("OPTIONS", "z9hG4bKo");
        let ServerInput::New(id, _) = l.on_request(r.clone(), udp(), Instant::now()) else {
            panic!()
        };
        let mut bad = resp_to(&r, 200, None);
        bad.status = 99;
        assert_eq!(
            l.respond(id, bad, Instant::now()),
            Err(TxError::BadStatus(99))
        );
    }

    // ---------------- matching details ----------------

    #[test]
    fn sent_by_is_part_of_the_server_key() {
        let mut l = layer();
        let t0 = Instant::now();
        let a = req("OPTIONS", "z9hG4bKsame");
        let mut b = a.clone();
        b.headers
            .set("Via", "SIP/2.0/UDP 10.9.9.9:5060;branch=z9hG4bKsame");
        b.headers.set("From", "<sip:carol@example.com>;tag=other");
        assert!(matches!(l.on_request(a, udp(), t0), ServerInput::New(..)));
        assert!(matches!(l.on_request(b, udp(), t0), ServerInput::New(..)));
        assert_eq!(l.counts(), (0, 2));
    }

    #[test]
    fn rfc2543_fallback_matching() {
        let mut l = layer();
        let t0 = Instant::now();
        let invite = req("INVITE", "oldstyle1");
        let ServerInput::New(id, _) = l.on_request(invite.clone(), udp(), t0) else {
            panic!()
        };
        assert_eq!(
            l.on_request(invite.clone(), udp(), t0 + ms(500)),
            ServerInput::Absorbed
        );
        l.respond(id, resp_to(&invite, 486, Some("s")), t0).unwrap();
        drain(&mut l);
        let ack = build_ack(&invite, &resp_to(&invite, 486, Some("s")));
        assert_eq!(
            l.on_request(ack, udp(), t0 + ms(600)),
            ServerInput::Absorbed
        );
        l.handle_timeout(t0 + ms(600) + Duration::from_secs(5));
        assert_eq!(l.counts(), (0, 0));
    }

    #[test]
    fn responses_follow_via_port_without_rport() {
        let mut l = layer();
        let t0 = Instant::now();
        let from = Peer::new(Transport::Udp, "127.0.0.2:40000".parse().unwrap());
        let mut r = req("OPTIONS", "z9hG4bKnorport");
        r.headers
            .set("Via", "SIP/2.0/UDP 127.0.0.2:5099;branch=z9hG4bKnorport");
        let ServerInput::New(id, r) = l.on_request(r, from, t0) else {
            panic!("not new")
        };
        l.respond(id, r.response(200, None), t0).unwrap();
        let sent = l.poll_transmit().unwrap();
        assert_eq!(sent.peer.addr, "127.0.0.2:5099".parse().unwrap());
        // With rport: the source port.
        let mut r = req_full("OPTIONS", "z9hG4bKrport", 2, None);
        r.headers.set(
            "Via",
            "SIP/2.0/UDP 127.0.0.2:5099;rport;branch=z9hG4bKrport",
        );
        let ServerInput::New(id, r) = l.on_request(r, from, t0) else {
            panic!("not new")
        };
        l.respond(id, r.response(200, None), t0).unwrap();
        assert_eq!(l.poll_transmit().unwrap().peer.addr, from.addr);
    }

    #[test]
    fn via_stamped_with_received_and_rport() {
        let mut l = layer();
        let t0 = Instant::now();
        let mut r = req("OPTIONS", "z9hG4bKv");
        r.headers.set("Via", "SIP/2.0/UDP 10.0.0.5:5060;rport;branch=z9hG4bKv, SIP/2.0/UDP p.example;branch=z9hG4bKp");
        let natted = Peer::new(Transport::Udp, "127.0.0.2:40000".parse().unwrap());
        let ServerInput::New(id, got) = l.on_request(r, natted, t0) else {
            panic!()
        };
        let vias = got.vias();
        assert_eq!(vias.len(), 2);
        assert_eq!(vias[0].received(), Some("127.0.0.2"));
        assert_eq!(vias[0].rport(), Some(Some(40000)));
        assert_eq!(vias[1].host, "p.example");
        // The response goes to the source, not to the Via sent-by.
        let resp = got.response(200, None);
        l.respond(id, resp, t0).unwrap();
        let out = drain(&mut l);
        assert_eq!(out[0].peer, natted);
        let SipMessage::Response(sent) = decode(&out[0]) else {
            panic!()
        };
        assert_eq!(sent.top_via().unwrap().rport(), Some(Some(40000)));
    }

    #[test]
    fn many_transactions_share_one_timer_queue() {
        let mut l = layer();
        let t0 = Instant::now();
        for i in 0..10_000u32 {
            let r = req_full("OPTIONS", &format!("z9hG4bK{i}"), i + 1, None);
            l.send_request(r, udp(), t0 + Duration::from_micros(u64::from(i)));
        }
        assert_eq!(l.counts(), (10_000, 0));
        assert_eq!(l.stats().client_created, 10_000);
        assert_eq!(l.poll_timeout(), Some(t0 + ms(500)));
        l.handle_timeout(t0 + Duration::from_secs(40));
        assert_eq!(l.counts(), (0, 0));
        assert_eq!(l.poll_timeout(), None);
        let timeouts = events(&mut l)
            .iter()
            .filter(|e| matches!(e, TxEvent::Timeout(_)))
            .count();
        assert_eq!(timeouts, 10_000);
    }
}
