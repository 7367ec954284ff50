//! Local sessions: INVITEs that end at callvault itself (the store URI `st_...` and the play
//! URI `play-st_...`, PROTOCOL.md §2.4, §2.5). One dialog, we are UAS; the layer above decides
//! (`SessionOffer` event) and answers through [`Engine::accept_session`] /
//! [`Engine::reject_session`]; media is the layer above's too (recorder / player).

use std::time::Instant;

use bytes::Bytes;

use super::{Engine, EngineEvent};
use crate::b2bua::errors::with_error_body;
use crate::b2bua::media::MediaBackend;
use crate::error_code::ErrorCode;
use crate::sip::dialog::Dialog;
use crate::sip::message::{HeaderAccess, Method, Request};
use crate::sip::transaction::{Peer, ServerTxId};

pub(crate) type SessionKey = u64;

/// Request-URI users that are sessions with callvault rather than calls through it.
pub(crate) fn is_local_session_user(user: &str) -> bool {
    user.starts_with("st_") || user.starts_with("play-")
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum SessionState {
    Offered,
    Up,
}

#[derive(Debug)]
pub(super) struct LocalSession {
    pub(super) invite: Request,
    pub(super) tx: Option<ServerTxId>,
    pub(super) local_tag: String,
    pub(super) peer: Peer,
    pub(super) dialog: Option<Dialog>,
    pub(super) state: SessionState,
}

impl<M: MediaBackend> Engine<M> {
    /// An authenticated INVITE for a local session: recorded and handed up.
    pub(super) fn offer_session(
        &mut self,
        tx: ServerTxId,
        req: Request,
        peer: Peer,
        identity: String,
    ) {
        let key = self.next_call;
        self.next_call += 1;
        let local_tag = self.token(10);
        self.sessions.insert(
            key,
            LocalSession {
                invite: req.clone(),
                tx: Some(tx),
                local_tag,
                peer,
                dialog: None,
                state: SessionState::Offered,
            },
        );
        self.session_invites.insert(tx, key);
        let local = std::net::SocketAddr::new(self.cfg.public_ip, self.local_port(peer.transport));
        self.events.push_back(EngineEvent::SessionOffer {
            session: key,
            identity: format!("{identity}@{}", self.cfg.domain),
            request: req,
            source: peer.addr,
            local,
        });
    }

    /// Answers an offered session `200 OK` with our SDP.
    pub fn accept_session(&mut self, key: SessionKey, sdp: Bytes, now: Instant) -> bool {
        let transport = match self.sessions.get(&key) {
            Some(s) if s.state == SessionState::Offered => s.peer.transport,
            _ => return false,
        };
        let contact = self.contact(transport);
        let Some(s) = self.sessions.get_mut(&key) else {
            return false;
        };
        let Some(tx) = s.tx.take() else {
            return false;
        };
        let mut resp = s.invite.response(200, None);
        resp.ensure_to_tag(&s.local_tag);
        resp.headers.push("Contact", contact.to_string());
        resp.headers.push("Allow", super::ALLOW);
        resp.headers.push("Content-Type", "application/sdp");
        resp.body = sdp;
        match Dialog::uas(&s.invite, &s.local_tag, &contact) {
            Ok(d) => {
                let id = (
                    s.invite.call_id().unwrap_or_default().to_string(),
                    s.local_tag.clone(),
                );
                // The session's requests (our BYE) follow its route set (§12.2.1.1).
                s.peer = super::call::route_peer(&d.route_set, s.peer);
                s.dialog = Some(d);
                s.state = SessionState::Up;
                self.session_dialogs.insert(id, key);
            }
            Err(e) => tracing::debug!(error = %e, "session dialog not created"),
        }
        self.respond(tx, resp, now);
        self.after(now);
        true
    }

    /// Refuses an offered session with our own error (JSON body + Warning).
    pub fn reject_session(
        &mut self,
        key: SessionKey,
        code: ErrorCode,
        detail: &str,
        retry_after: Option<u32>,
        now: Instant,
    ) {
        let Some(s) = self.sessions.remove(&key) else {
            return;
        };
        if let Some(tx) = s.tx {
            self.session_invites.remove(&tx);
            let mut resp = s.invite.response(code.sip_status(), None);
            resp.ensure_to_tag(&s.local_tag);
            if let Some(secs) = retry_after {
                resp.headers.push("Retry-After", secs.to_string());
            }
            let resp = with_error_body(resp, code, detail);
            self.respond(tx, resp, now);
        }
        self.after(now);
    }

    /// Ends a session from our side: BYE (with a Reason) when up, 480 when still offered.
    pub fn end_session(&mut self, key: SessionKey, reason: Option<ErrorCode>, now: Instant) {
        let Some(mut s) = self.sessions.remove(&key) else {
            return;
        };
        if let Some(mut d) = s.dialog.take() {
            self.session_dialogs
                .remove(&(d.id.call_id.clone(), d.id.local_tag.clone()));
            let via = self.new_via(s.peer.transport);
            let contact = self.contact(s.peer.transport);
            let mut bye = d.new_request(Method::Bye, &contact, via);
            if let Some(r) = reason {
                bye.headers
                    .push("Reason", format!("SIP;cause=200;text=\"{r}\""));
            }
            self.tx.send_request(bye, s.peer, now);
        } else if let Some(tx) = s.tx {
            self.session_invites.remove(&tx);
            let mut resp = s.invite.response(480, None);
            resp.ensure_to_tag(&s.local_tag);
            self.respond(tx, resp, now);
        }
        self.after(now);
    }

    /// An in-dialog request in a local session (BYE ends it; others are answered here).
    pub(super) fn on_session_request(
        &mut self,
        key: SessionKey,
        tx: ServerTxId,
        req: Request,
        now: Instant,
    ) {
        let checked = match self.sessions.get_mut(&key).and_then(|s| s.dialog.as_mut()) {
            Some(d) => d.on_request(&req).map_err(|e| e.status()),
            None => Err(481),
        };
        if let Err(status) = checked {
            return self.reply(tx, &req, status, now);
        }
        match req.method {
            Method::Bye => {
                self.respond(tx, req.response(200, None), now);
                if let Some(s) = self.sessions.remove(&key) {
                    if let Some(d) = s.dialog {
                        self.session_dialogs.remove(&(d.id.call_id, d.id.local_tag));
                    }
                }
                self.events.push_back(EngineEvent::SessionEnded {
                    session: key,
                    by_remote: true,
                });
            }
            // Session refreshes and hold do not change what we send or store: keep our SDP.
            Method::Invite | Method::Update => {
                let mut resp = req.response(200, None);
                if let Some(s) = self.sessions.get(&key) {
                    resp.headers
                        .push("Contact", self.contact(s.peer.transport).to_string());
                }
                self.respond(tx, resp, now);
            }
            _ => self.respond(tx, req.response(200, None), now),
        }
    }

    /// CANCEL of an offered session.
    pub(super) fn cancel_session(&mut self, invite_tx: ServerTxId, now: Instant) -> bool {
        let Some(key) = self.session_invites.remove(&invite_tx) else {
            return false;
        };
        if let Some(s) = self.sessions.remove(&key) {
            let mut resp = s.invite.response(487, None);
            resp.ensure_to_tag(&s.local_tag);
            self.respond(invite_tx, resp, now);
        }
        self.events.push_back(EngineEvent::SessionEnded {
            session: key,
            by_remote: true,
        });
        true
    }

    /// The ACK of a session's 2xx: media may start (play sessions stream from here).
    pub(super) fn on_session_ack(&mut self, key: SessionKey) {
        self.events.push_back(EngineEvent::SessionAcked(key));
    }

    /// A session's 2xx was never ACKed: drop it.
    pub(super) fn session_ack_timeout(&mut self, invite_tx: ServerTxId, now: Instant) -> bool {
        let Some(key) = self.session_invites.remove(&invite_tx) else {
            return false;
        };
        self.end_session(key, Some(ErrorCode::NoAck), now);
        self.events.push_back(EngineEvent::SessionEnded {
            session: key,
            by_remote: false,
        });
        true
    }
}
