//! Share requests in the engine (PROTOCOL §3 steps 2–3): an out-of-dialog MESSAGE with the
//! share-request content type is authenticated like any MESSAGE and handed up as
//! [`EngineEvent::ShareRequest`]; the layer above decides. If it asks, the request is relayed
//! to the sharer's newest registration and the sharer's final answer (or 408/480 when there is
//! none) comes back up as [`EngineEvent::ShareRelayAnswered`], the requester still unanswered.
//! The offer is sent with [`Engine::send_to_user`] or, to a requester without registration,
//! with [`Engine::send_to_peer`].

use std::time::Instant;

use bytes::Bytes;

use super::call::as_message;
use super::{Engine, EngineEvent, Pending, Target};
use crate::b2bua::media::MediaBackend;
use crate::b2bua::wire;
use crate::sip::message::{HeaderAccess, Method, Request, Response};
use crate::sip::transaction::{ClientTxId, Peer, ServerTxId};

/// An out-of-dialog request whose body is a share request.
pub(super) fn is_share_request(req: &Request) -> bool {
    req.content_type()
        .is_some_and(|ct| ct.eq_ignore_ascii_case(wire::SHARE_REQUEST))
}

impl<M: MediaBackend> Engine<M> {
    /// Hands an authenticated share request up. `identity` is what authentication gave (the
    /// digest user, or a trusted peer's From user); `sharer` the Request-URI user.
    pub(super) fn share_request(
        &mut self,
        tx: ServerTxId,
        req: Request,
        peer: Peer,
        identity: String,
        sharer: String,
        now: Instant,
    ) {
        // A trusted peer is known by its From URI, host included (it may be another domain);
        // a digest user is one of ours.
        let requester = if self.is_trusted(peer.addr.ip()) {
            match req.from_hdr() {
                Some(f) => format!("{identity}@{}", f.uri.host.to_ascii_lowercase()),
                None => format!("{identity}@{}", self.cfg.domain),
            }
        } else {
            format!("{identity}@{}", self.cfg.domain)
        };
        let registered = self.sharer_binding(&sharer, now).is_some();
        tracing::debug!(%requester, %sharer, registered, "share request");
        self.events.push_back(EngineEvent::ShareRequest {
            tx,
            request: req,
            requester,
            sharer,
            registered,
            source: peer,
        });
    }

    /// The sharer's newest registered contact, through its Path (routes do not count: a
    /// share lives here, not behind a gateway).
    fn sharer_binding(&self, sharer: &str, now: Instant) -> Option<Target> {
        let aor = format!("{sharer}@{}", self.cfg.domain);
        let b = self.registrar.lookup(&aor, now).into_iter().next()?;
        Some(Target::binding(&b))
    }

    /// Relays the share request of `tx` (from a [`EngineEvent::ShareRequest`]) to the
    /// sharer's newest registration. False when it cannot be (the sharer is not registered
    /// any more, or `tx` is gone): the caller answers on the sharer's behalf.
    pub fn relay_share_request(&mut self, tx: ServerTxId, now: Instant) -> bool {
        let Some(req) = self.tx.server_request(tx).cloned() else {
            return false;
        };
        let sharer = req
            .parsed_uri()
            .ok()
            .and_then(|u| u.user_unescaped())
            .unwrap_or_default();
        let Some(target) = self.sharer_binding(&sharer, now) else {
            return false;
        };
        self.forward_message(&req, &target, Pending::ShareRelay { server_tx: tx }, now);
        self.after(now);
        true
    }

    pub(super) fn on_share_relay_response(
        &mut self,
        id: ClientTxId,
        server_tx: ServerTxId,
        resp: Response,
    ) {
        if resp.status < 200 {
            return;
        }
        // One report per relay, whatever retransmissions follow.
        self.pending.remove(&id);
        self.events.push_back(EngineEvent::ShareRelayAnswered {
            tx: server_tx,
            status: resp.status,
            content_type: resp.content_type(),
            body: resp.body.clone(),
        });
    }

    /// Sends an out-of-dialog request of ours to `uri` at `peer` (the offer to a requester
    /// without registration goes to where its request came from). The final answer comes back
    /// as [`EngineEvent::OutOfDialogDone`].
    pub fn send_to_peer(
        &mut self,
        peer: Peer,
        uri: &str,
        method: Method,
        headers: &[(&str, &str)],
        body: Bytes,
        now: Instant,
    ) -> ClientTxId {
        let id = self.send_out_of_dialog(
            &Target::direct(uri.to_string(), peer),
            &format!("<{uri}>"),
            method,
            headers,
            body,
            now,
        );
        self.after(now);
        id
    }

    /// One out-of-dialog request from `sip:callvault@<domain>` to `target` (through its
    /// Path), tracked as [`Pending::OutOfDialog`]. INFO lives only inside an INVITE dialog
    /// whose peer listed the package (RFC 6086 §4.2.1): asked for here, it goes as MESSAGE
    /// with the same Content-Type and body (logged once).
    pub(super) fn send_out_of_dialog(
        &mut self,
        target: &Target,
        to: &str,
        method: Method,
        headers: &[(&str, &str)],
        body: Bytes,
        now: Instant,
    ) -> ClientTxId {
        let fallback;
        let (method, headers) = if method == Method::Info {
            if !self.ood_info_logged {
                self.ood_info_logged = true;
                tracing::info!("INFO outside a dialog is sent as MESSAGE (RFC 6086 §4.2.1)");
            }
            fallback = as_message(headers);
            (Method::Message, fallback.as_slice())
        } else {
            (method, headers)
        };
        let peer = target.peer;
        let via = self.new_via(peer.transport);
        let mut req = target.request(method.clone(), &via, 70);
        let tag = self.token(10);
        req.headers.push(
            "From",
            format!("<sip:callvault@{}>;tag={tag}", self.cfg.domain),
        );
        req.headers.push("To", to.to_string());
        req.headers.push("Call-ID", format!("cv{}", self.token(22)));
        req.headers.push("CSeq", format!("1 {method}"));
        for (n, v) in headers {
            req.headers.push(n.to_string(), v.to_string());
        }
        req.body = body;
        let id = self.tx.send_request(req, peer, now);
        self.pending.insert(id, (Pending::OutOfDialog, peer));
        id
    }
}
