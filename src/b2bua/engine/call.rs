//! One call, the per-call state machine: leg A (the caller and us, we are UAS) and leg B (us
//! and the callee, we are UAC), each a dialog with its own Call-ID, tags, CSeq space and route
//! set (RFC 3261 §12), and the anchored media streams both legs' SDP is rewritten to
//! (PROTOCOL.md §1). [`Call`] and [`Leg`] hold that state; the handlers below drive one call
//! from the dispatcher's inputs: in-dialog requests relayed from one leg to the other and
//! their responses relayed back, ACKs (ours for the 2xx of the other leg, §13.2.2.4), CANCEL,
//! leg B's INVITE responses, SDP anchoring, hang-up. They reach the network only through the
//! dispatcher's transaction layer ([`Engine`] in `mod.rs`), which owns the map of calls and
//! routes each message to its call by dialog key.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::time::Instant;

use bytes::Bytes;

use super::{dtmf, srtp};
use super::{Engine, EngineEvent, Pending, HOP_HEADERS, MAX_STREAMS};
use crate::b2bua::errors::with_error_body;
use crate::b2bua::media::{CallKey, Expect, MediaBackend, MediaError, PtSet, Side, StreamPorts};
use crate::error_code::ErrorCode;
use crate::metrics::{CallOutcome, METRICS};
use crate::sdp::SessionDescription;
use crate::sip::dialog::Dialog;
use crate::sip::message::{same_header, HeaderAccess, Method, Request, Response};
use crate::sip::transaction::{ClientTxId, Peer, ServerTxId};
use crate::sip::transport::Transport;
use crate::sip::uri::{NameAddr, Via};

/// One leg of a call.
#[derive(Debug)]
pub(super) struct Leg {
    pub(super) call_id: String,
    pub(super) local_tag: String,
    /// Where this leg's requests go (the source of the caller's INVITE, NAT-friendly; the
    /// callee's binding or route).
    pub(super) peer: Peer,
    pub(super) dialog: Option<Dialog>,
    /// The ACK we sent last on this leg, re-sent on a retransmitted 2xx.
    pub(super) last_ack: Option<Request>,
    /// This leg sent a 2xx-answered INVITE we still need its ACK for: the CSeq of the INVITE
    /// on the *other* leg whose 2xx we will then ACK.
    pub(super) awaiting_ack: Option<u32>,
    /// The party listed `Recv-Info: callvault` (its INVITE, its 1xx/2xx, or its latest target
    /// refresh): INFO of our package is welcome on this leg (RFC 6086 §4.2.1).
    pub(super) accepts_info: bool,
    /// The INFO-to-MESSAGE fallback on this leg was logged (once per leg).
    pub(super) info_fallback_logged: bool,
}

impl Leg {
    pub(super) fn new(call_id: String, local_tag: String, peer: Peer, accepts_info: bool) -> Leg {
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
    pub(super) fn set_dialog(&mut self, d: Dialog) {
        self.peer = route_peer(&d.route_set, self.peer);
        self.dialog = Some(d);
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum CallState {
    /// INVITE sent to B, no final yet.
    Early,
    /// 2xx relayed to A.
    Up,
    /// A cancelled or was answered with an error; waiting for B's INVITE transaction to end.
    Ending,
}

#[derive(Debug)]
pub(super) struct Call {
    pub(super) a: Leg,
    pub(super) b: Leg,
    pub(super) state: CallState,
    /// The caller's INVITE and its server transaction while unanswered.
    pub(super) a_invite: Request,
    pub(super) a_invite_tx: Option<ServerTxId>,
    pub(super) b_invite_tx: Option<ClientTxId>,
    pub(super) streams: Vec<StreamPorts>,
    /// The caller's authenticated (or trusted) identity, `user@domain`.
    pub(super) caller: String,
    /// The callee's identity, `user@domain` (the Request-URI user).
    pub(super) callee: String,
    /// Feature-code detection on INFO digits, per side (index 0 = A).
    pub(super) digits: [dtmf::DigitGate; 2],
    /// The audio format of the answer (first codec that is not telephone-event), once known.
    pub(super) format: Option<(String, u8)>,
    /// SRTP state per media section (see [`srtp`]).
    pub(super) srtp: Vec<srtp::StreamCrypto>,
    /// When the caller's INVITE arrived and when the call was answered (admin listing).
    pub(super) started: Instant,
    pub(super) answered: Option<Instant>,
}

impl Call {
    /// A call ringing: the caller's INVITE `a_invite` (server transaction `a_tx`) on leg A,
    /// leg B's INVITE about to go out. `parties` are caller and callee, `user@domain`.
    pub(super) fn new(
        a: Leg,
        b: Leg,
        a_invite: Request,
        a_tx: ServerTxId,
        (caller, callee): (String, String),
        feature_code: &str,
        now: Instant,
    ) -> Call {
        Call {
            a,
            b,
            state: CallState::Early,
            a_invite,
            a_invite_tx: Some(a_tx),
            b_invite_tx: None,
            streams: Vec::new(),
            caller,
            callee,
            format: None,
            srtp: Vec::new(),
            digits: [
                dtmf::DigitGate::new(feature_code),
                dtmf::DigitGate::new(feature_code),
            ],
            started: now,
            answered: None,
        }
    }

    pub(super) fn leg(&self, side: Side) -> &Leg {
        match side {
            Side::A => &self.a,
            Side::B => &self.b,
        }
    }
    pub(super) fn leg_mut(&mut self, side: Side) -> &mut Leg {
        match side {
            Side::A => &mut self.a,
            Side::B => &mut self.b,
        }
    }
    /// Leg B's INVITE `invite_b` got `resp` (1xx-2xx with a To tag): an early or confirmed
    /// dialog with B, whose route set (the response's Record-Route reversed, §12.1.2) decides
    /// where leg B's requests go from now on; Recv-Info updates what B accepts. Returns the
    /// dialog key when the dialog is new (the dispatcher maps it to this call).
    pub(super) fn track_b_dialog(
        &mut self,
        invite_b: &Request,
        resp: &Response,
    ) -> Option<(String, String)> {
        if resp.to_tag().is_none() || resp.status >= 300 {
            return None;
        }
        if let Some(accepts) = recv_info_callvault(resp) {
            self.b.accepts_info = accepts;
        }
        match self.b.dialog.take() {
            Some(mut d) => {
                if resp.status >= 200 {
                    let _ = d.on_refresh_response(resp);
                }
                self.b.set_dialog(d);
                None
            }
            None => {
                let d = Dialog::uac(invite_b, resp).ok()?;
                self.b.set_dialog(d);
                Some((self.b.call_id.clone(), self.b.local_tag.clone()))
            }
        }
    }

    /// B's 2xx is being relayed to the caller: the call is up, leg A's dialog (UAS side, our
    /// `contact`) starts and owes us the ACK of INVITE CSeq 1 on leg B. Returns leg A's
    /// dialog key when the dialog could be formed.
    pub(super) fn answered(
        &mut self,
        resp: &Response,
        contact: &NameAddr,
        now: Instant,
    ) -> Option<(String, String)> {
        self.state = CallState::Up;
        self.answered = Some(now);
        self.a_invite_tx = None;
        self.a.awaiting_ack = Some(1);
        self.format = answer_format(resp);
        let d = Dialog::uas(&self.a_invite, &self.a.local_tag, contact).ok()?;
        self.a.set_dialog(d);
        Some((self.a.call_id.clone(), self.a.local_tag.clone()))
    }

    /// The dialog keys (Call-ID, our tag) of both legs.
    pub(super) fn dialog_keys(&self) -> [(String, String); 2] {
        [
            (self.a.call_id.clone(), self.a.local_tag.clone()),
            (self.b.call_id.clone(), self.b.local_tag.clone()),
        ]
    }

    /// The party on `side` (`user@domain`).
    pub(super) fn party(&self, side: Side) -> &str {
        match side {
            Side::A => &self.caller,
            Side::B => &self.callee,
        }
    }
    /// A BYE in `side`'s dialog (our `contact`, a fresh `via`), with `reason` as its whole
    /// Reason header value when there is one.
    pub(super) fn bye(
        &mut self,
        side: Side,
        reason: Option<String>,
        contact: &NameAddr,
        via: Via,
    ) -> Option<Request> {
        let dialog = self.leg_mut(side).dialog.as_mut()?;
        let mut bye = dialog.new_request(Method::Bye, contact, via);
        if let Some(r) = reason {
            bye.headers.push("Reason", r);
        }
        Some(bye)
    }

    /// The ACK, in `side`'s dialog, of the 2xx that answered our INVITE with CSeq `cseq`
    /// (§13.2.2.4); kept as the leg's last ACK, re-sent on a retransmitted 2xx.
    pub(super) fn ack_on(&mut self, side: Side, cseq: u32, via: Via) -> Option<Request> {
        let leg = self.leg_mut(side);
        let ack = leg.dialog.as_ref()?.ack_for(cseq, via);
        leg.last_ack = Some(ack.clone());
        Some(ack)
    }
    /// `req` from the other leg re-originated in `to`'s dialog: end-to-end headers and body
    /// copied, our `contact` on a target refresh (INVITE, UPDATE).
    pub(super) fn relayed_request(
        &mut self,
        to: Side,
        req: &Request,
        contact: &NameAddr,
        via: Via,
    ) -> Option<Request> {
        let dialog = self.leg_mut(to).dialog.as_mut()?;
        let mut out = dialog.new_request(req.method.clone(), contact, via);
        copy_headers(&req.headers, &mut out.headers);
        if matches!(req.method, Method::Invite | Method::Update) {
            out.headers.set("Contact", contact.to_string());
        }
        out.body = req.body.clone();
        Some(out)
    }

    /// The answer to a request relayed from `origin` (its `method` and our `cseq` on the other
    /// leg): a 2xx to a target refresh updates the other leg's remote target and Recv-Info
    /// (§12.2.1.2, RFC 6086 §5.2.2); a 2xx to INVITE makes `origin` owe us its ACK.
    pub(super) fn on_relayed_response(
        &mut self,
        origin: Side,
        method: &Method,
        cseq: u32,
        resp: &Response,
    ) {
        if !(200..300).contains(&resp.status) {
            return;
        }
        let other = origin.other();
        if matches!(method, Method::Invite | Method::Update) {
            if let Some(d) = self.leg_mut(other).dialog.as_mut() {
                let _ = d.on_refresh_response(resp);
            }
            if let Some(accepts) = recv_info_callvault(resp) {
                self.leg_mut(other).accepts_info = accepts;
            }
        }
        if *method == Method::Invite {
            self.leg_mut(origin).awaiting_ack = Some(cseq);
        }
    }
    /// A final answer of ours to the caller's INVITE (leg A's To tag), e.g. 487 after CANCEL.
    pub(super) fn a_answer(&self, status: u16) -> Response {
        let mut resp = self.a_invite.response(status, None);
        resp.ensure_to_tag(&self.a.local_tag);
        resp
    }

    /// `side` no longer owes us the ACK for a 2xx we relayed to it (its ACK came, or it is
    /// going away): the CSeq of the INVITE on the other leg whose 2xx we ACK now, and where
    /// that ACK goes.
    pub(super) fn take_owed_ack(&mut self, side: Side) -> Option<(u32, Peer)> {
        let cseq = self.leg_mut(side).awaiting_ack.take()?;
        Some((cseq, self.leg(side.other()).peer))
    }
}

#[derive(Debug)]
pub(super) enum AnchorError {
    Sdp(String),
    Media(MediaError),
    /// `RTP/SAVP` without a supported `a=crypto` line (PROTOCOL.md section 7: `488`).
    NoCrypto,
}

pub(super) trait HasBody {
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

pub(super) fn call_caller(calls: &HashMap<CallKey, Call>, key: CallKey) -> String {
    calls
        .get(&key)
        .map(|c| c.caller.clone())
        .unwrap_or_default()
}

pub(super) fn is_sdp<T: HeaderAccess + HasBody>(m: &T) -> bool {
    !m.body().is_empty() && m.content_type().as_deref() == Some("application/sdp")
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
pub(super) fn copy_headers(
    from: &crate::sip::message::Headers,
    to: &mut crate::sip::message::Headers,
) {
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
pub(super) fn map_b_failure(mut out: Response) -> Response {
    if out.status == 401 || out.status == 407 {
        out.status = 403;
        out.reason = "Forbidden".into();
    }
    out
}

/// The transport address of a route set's first hop (§8.1.2; RFC 3263 without DNS): the
/// first route's IP literal (its `maddr` if it has one, §19.1.1) and port (5060, 5061 for
/// sips), with its `transport=` if it names one. `fallback` (the address the leg's traffic
/// comes from) when the set is empty or the first route names a host: the sans-IO core
/// resolves no names, and the proxy in front is normally where the traffic comes from anyway.
pub(super) fn route_peer(route_set: &[NameAddr], fallback: Peer) -> Peer {
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
pub(super) fn recv_info_callvault(m: &impl HeaderAccess) -> Option<bool> {
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
pub(super) fn as_message<'a>(headers: &[(&'a str, &'a str)]) -> Vec<(&'a str, &'a str)> {
    headers
        .iter()
        .filter(|(n, _)| !same_header(n, "Info-Package"))
        .copied()
        .collect()
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

impl<M: MediaBackend> Engine<M> {
    pub(super) fn on_in_dialog(&mut self, tx: ServerTxId, req: Request, now: Instant) {
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

    pub(super) fn on_ack(&mut self, ack: Request) {
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
        let Some((cseq, peer)) = self
            .calls
            .get_mut(&call_key)
            .and_then(|c| c.take_owed_ack(side))
        else {
            return;
        };
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

    pub(super) fn on_cancel(&mut self, invite_tx: ServerTxId, now: Instant) {
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
        let resp = call.a_answer(487);
        self.abandon_early(key, invite_tx, resp, CallOutcome::Cancelled, now);
    }

    /// Gives up a call still ringing: `resp` to the caller's INVITE, CANCEL on leg B, ports
    /// released. The call stays (`Ending`) until leg B's INVITE transaction ends, so a 2xx
    /// crossing the CANCEL is still ACKed and hung up.
    pub(super) fn abandon_early(
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

    pub(super) fn on_b_invite_response(
        &mut self,
        key: CallKey,
        id: ClientTxId,
        resp: Response,
        now: Instant,
    ) {
        if resp.status == 100 {
            return;
        }
        let Some(state) = self.calls.get(&key).map(|c| c.state) else {
            return;
        };
        let invite_b = self.tx.client_request(id).cloned();
        if state == CallState::Ending {
            return self.on_late_b_response(key, invite_b, &resp, now);
        }
        let Some(call) = self.calls.get_mut(&key) else {
            return;
        };
        if let Some(k) = invite_b
            .as_ref()
            .and_then(|inv| call.track_b_dialog(inv, &resp))
        {
            self.dialogs.insert(k, (key, Side::B));
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
            if let Some(k) = call.answered(&resp, &contact, now) {
                self.dialogs.insert(k, (key, Side::A));
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

    /// Leg B's INVITE answered after the caller went away (CANCEL crossed a 2xx, or the call
    /// failed): a 2xx still has to be ACKed and hung up; any final answer forgets the call.
    fn on_late_b_response(
        &mut self,
        key: CallKey,
        invite_b: Option<Request>,
        resp: &Response,
        now: Instant,
    ) {
        if (200..300).contains(&resp.status) {
            if let Some(d) = invite_b.and_then(|inv| Dialog::uac(&inv, resp).ok()) {
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
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn on_relay_response(
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
        call.on_relayed_response(origin, &method, cseq, &resp);
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

    pub(super) fn resend_ack(&mut self, id: ClientTxId, resp: &Response) {
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

    pub(super) fn relay_in_dialog(
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
        let Some(mut out) = self
            .calls
            .get_mut(&key)
            .and_then(|c| c.relayed_request(other, &req, &contact, via))
        else {
            return;
        };
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
        self.calls.get(&call).map(|c| c.party(side).to_string())
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

    /// BYE on one leg, with `Reason: SIP;cause=200;text="CODE"` when we end the call for one
    /// of our error codes.
    pub(super) fn bye_leg(
        &mut self,
        key: CallKey,
        side: Side,
        reason: Option<ErrorCode>,
        now: Instant,
    ) {
        let reason = reason.map(|r| format!("SIP;cause=200;text=\"{r}\""));
        self.bye_leg_with(key, side, reason, now);
    }

    /// BYE on one leg with `reason` as the whole `Reason` header value, if any.
    pub(super) fn bye_leg_with(
        &mut self,
        key: CallKey,
        side: Side,
        reason: Option<String>,
        now: Instant,
    ) {
        let Some(call) = self.calls.get(&key) else {
            return;
        };
        let peer = call.leg(side).peer;
        let via = self.new_via(peer.transport);
        let contact = self.contact(peer.transport);
        let Some(bye) = self
            .calls
            .get_mut(&key)
            .and_then(|c| c.bye(side, reason, &contact, via))
        else {
            return;
        };
        let id = self.tx.send_request(bye, peer, now);
        self.pending
            .insert(id, (Pending::Own { call: key, side }, peer));
    }

    /// `side` owes us an ACK for a 2xx we relayed to it: ACK, on the other leg, the 2xx that
    /// answered the INVITE we sent there, since no ACK from `side` will come now.
    pub(super) fn ack_pending_2xx(&mut self, key: CallKey, side: Side) {
        let Some((cseq, peer)) = self.calls.get_mut(&key).and_then(|c| c.take_owed_ack(side))
        else {
            return;
        };
        let via = self.new_via(peer.transport);
        let Some(ack) = self
            .calls
            .get_mut(&key)
            .and_then(|c| c.ack_on(side.other(), cseq, via))
        else {
            return;
        };
        self.tx.send_ack(&ack, peer);
    }

    /// Tears a call down from our side, whatever state it is in.
    pub(super) fn hang_up(
        &mut self,
        key: CallKey,
        reason: ErrorCode,
        outcome: CallOutcome,
        now: Instant,
    ) {
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
                let a_tx = call.a_invite_tx;
                let b_tx = call.b_invite_tx;
                if let Some(a_tx) = a_tx {
                    let mut resp = call.a_answer(503);
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
    pub(super) fn end_call(&mut self, key: CallKey, outcome: CallOutcome) {
        if self.calls.contains_key(&key) {
            METRICS.calls_active.dec();
            METRICS.call_ended(outcome);
            self.events.push_back(EngineEvent::CallEnded(key, outcome));
            tracing::info!(call = key, ?outcome, "call ended");
        }
        self.drop_call(key);
    }

    /// Forgets a call (no metrics): media released, dialog keys removed.
    pub(super) fn drop_call(&mut self, key: CallKey) {
        self.digit_holds.remove(&key);
        self.call_settled(key);
        if let Some(call) = self.calls.remove(&key) {
            for k in call.dialog_keys() {
                self.dialogs.remove(&k);
            }
            self.own_call_ids.remove(&call.b.call_id);
            if let Some(tx) = call.a_invite_tx {
                self.a_invites.remove(&tx);
            }
        }
        self.media.release(key);
    }

    /// Rewrites an SDP body coming from `from` for the other side: every media section points
    /// at our relay port facing the other side; `from`'s announced address becomes its remote.
    pub(super) fn anchor_sdp(
        &mut self,
        key: CallKey,
        body: &[u8],
        from: Side,
    ) -> Result<Bytes, AnchorError> {
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
