//! The operator's view of the engine (PROTOCOL 8): snapshots of the calls and registrations
//! the engine holds, and ending a call on the operator's word.
//!
//! The engine stays sans-IO: these are plain methods the core task calls when the HTTP layer
//! asks through its admin channel (`crate::server`); times are converted to wall-clock time
//! with the engine's epoch, packet counts come from the media backend's published counters.

use crate::error_code::ErrorCode;
use std::net::SocketAddr;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use super::{CallState, Engine};
use crate::b2bua::media::{CallKey, MediaBackend, Side};
use crate::config::Transport;
use crate::metrics::CallOutcome;
use crate::sip::transaction::Peer;

/// `Reason` of the BYEs an operator's `DELETE /v1/calls/{id}` sends (PROTOCOL 8; Q.850
/// cause 16 = normal call clearing).
pub(crate) const OPERATOR_REASON: &str = "Q.850;cause=16;text=\"ended by operator\"";

/// One call as `GET /v1/calls` lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CallSnapshot {
    pub id: CallKey,
    /// Answered (`up`); otherwise still ringing.
    pub up: bool,
    /// Caller and callee identities, `user@domain`.
    pub caller: String,
    pub callee: String,
    pub started_at: SystemTime,
    pub answered_at: Option<SystemTime>,
    /// Leg A, leg B.
    pub legs: [LegSnapshot; 2],
}

/// One leg of a [`CallSnapshot`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LegSnapshot {
    pub call_id: String,
    /// Where this leg's SIP requests go.
    pub remote: Peer,
    /// The first media section's relay, once SDP anchored one.
    pub rtp: Option<RtpSnapshot>,
}

/// The relay side facing one leg.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RtpSnapshot {
    /// Our port this leg sends to.
    pub local_port: u16,
    /// The leg's SDP-announced RTP address.
    pub remote: Option<SocketAddr>,
    /// RTP packets relayed from this leg / to this leg.
    pub packets_in: u64,
    pub packets_out: u64,
}

/// One live binding as `GET /v1/registrations` lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegistrationSnapshot {
    /// `user@domain`.
    pub aor: String,
    pub contact: String,
    pub source: SocketAddr,
    pub transport: Transport,
    pub expires_at: SystemTime,
    /// The registering REGISTER's User-Agent, when it sent one.
    pub user_agent: Option<String>,
}

/// The network ends of one leg of a call, kept with the recording of the audio that came in
/// on it: the pcap of a recorded call rebuilds each leg's INVITE/200 and RTP on them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct LegEnds {
    pub(crate) call_id: String,
    /// The leg's party: where its requests go.
    pub(crate) sip_remote: SocketAddr,
    /// callvault's own address on the leg's transport.
    pub(crate) sip_local: SocketAddr,
    /// The RTP address the leg's SDP announced (None: latched, or no media yet).
    pub(crate) rtp_remote: Option<SocketAddr>,
    /// callvault's relay port that leg sends to.
    pub(crate) rtp_local: Option<SocketAddr>,
}

impl<M: MediaBackend> Engine<M> {
    /// Leg A's and leg B's [`LegEnds`] (the first media section's relay).
    pub(crate) fn call_leg_ends(&self, call: CallKey) -> Option<[LegEnds; 2]> {
        let c = self.calls.get(&call)?;
        let stats = self.media.stream_stats(call, 0);
        let leg = |side: Side| {
            let l = c.leg(side);
            let i = usize::from(side == Side::B);
            LegEnds {
                call_id: l.call_id.clone(),
                sip_remote: l.peer.addr,
                sip_local: SocketAddr::new(self.cfg.public_ip, self.local_port(l.peer.transport)),
                rtp_remote: stats.and_then(|s| s.remote[i]),
                rtp_local: c
                    .streams
                    .first()
                    .map(|p| SocketAddr::new(self.cfg.public_ip, p.facing(side))),
            }
        };
        Some([leg(Side::A), leg(Side::B)])
    }

    /// Wall-clock time of a monotonic instant (the epoch ties the two clocks together).
    fn wall(&self, t: Instant) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(self.epoch.1) + t.saturating_duration_since(self.epoch.0)
    }

    /// The calls that are ringing or up, newest first (calls being torn down are left out).
    pub(crate) fn calls_snapshot(&self) -> Vec<CallSnapshot> {
        let mut out: Vec<CallSnapshot> = self
            .calls
            .iter()
            .filter(|(_, c)| c.state != CallState::Ending)
            .map(|(key, c)| {
                let stats = self.media.stream_stats(*key, 0);
                let leg = |side: Side| {
                    let l = c.leg(side);
                    let i = usize::from(side == Side::B);
                    let rtp = c.streams.first().map(|p| RtpSnapshot {
                        local_port: p.facing(side),
                        remote: stats.and_then(|s| s.remote[i]),
                        packets_in: stats.map_or(0, |s| s.packets_from[i]),
                        packets_out: stats.map_or(0, |s| s.packets_from[1 - i]),
                    });
                    LegSnapshot {
                        call_id: l.call_id.clone(),
                        remote: l.peer,
                        rtp,
                    }
                };
                CallSnapshot {
                    id: *key,
                    up: c.state == CallState::Up,
                    caller: c.caller.clone(),
                    callee: c.callee.clone(),
                    started_at: self.wall(c.started),
                    answered_at: c.answered.map(|t| self.wall(t)),
                    legs: [leg(Side::A), leg(Side::B)],
                }
            })
            .collect();
        out.sort_by_key(|c| std::cmp::Reverse(c.id));
        out
    }

    /// Every live registration, by AOR then contact.
    pub(crate) fn registrations_snapshot(&self, now: Instant) -> Vec<RegistrationSnapshot> {
        let mut out: Vec<RegistrationSnapshot> = self
            .registrar
            .all_live(now)
            .into_iter()
            .map(|(aor, b)| RegistrationSnapshot {
                aor: aor.to_string(),
                contact: b.contact.to_string(),
                source: b.source.addr,
                transport: b.source.transport,
                expires_at: self.wall(b.expires_at),
                user_agent: b.user_agent.clone(),
            })
            .collect();
        out.sort_by(|a, b| a.aor.cmp(&b.aor).then(a.contact.cmp(&b.contact)));
        out
    }

    /// Ends a call on the operator's word: an answered call gets BYE on both legs with
    /// [`OPERATOR_REASON`]; a ringing one is torn down like any call we end before answer
    /// (503 to the caller, CANCEL to the callee). False when no such call is up or ringing.
    pub(crate) fn end_call_by_operator(&mut self, id: CallKey, now: Instant) -> bool {
        let Some(state) = self.calls.get(&id).map(|c| c.state) else {
            return false;
        };
        match state {
            CallState::Ending => return false,
            CallState::Up => {
                // A 2xx that is not ACKed yet still must be ACKed before BYE (RFC 3261 §15).
                for side in [Side::A, Side::B] {
                    self.ack_pending_2xx(id, side);
                }
                for side in [Side::A, Side::B] {
                    self.bye_leg_with(id, side, Some(OPERATOR_REASON.to_string()), now);
                }
                self.end_call(id, CallOutcome::Answered);
            }
            CallState::Early => {
                self.hang_up(id, ErrorCode::EndedByOperator, CallOutcome::Cancelled, now);
            }
        }
        tracing::info!(call = id, "call ended by operator");
        self.after(now);
        true
    }

    /// Ends the store sessions (INVITE to `st_...`) addressed to `store_id`, as if the sender
    /// had hung up: BYE to the sender, and `SessionEnded` so the store service finishes the
    /// store `truncated`. Returns how many sessions it ended.
    pub(crate) fn end_store_sessions(&mut self, store_id: &str, now: Instant) -> usize {
        let keys: Vec<_> = self
            .sessions
            .iter()
            .filter(|(_, s)| {
                s.invite
                    .parsed_uri()
                    .ok()
                    .and_then(|u| u.user_unescaped())
                    .is_some_and(|u| u == store_id)
            })
            .map(|(k, _)| *k)
            .collect();
        for &key in &keys {
            self.end_session(key, Some(ErrorCode::EndedByOperator), now);
            self.events.push_back(super::EngineEvent::SessionEnded {
                session: key,
                by_remote: true,
            });
        }
        keys.len()
    }

    /// New routes and trusted peers from a reloaded config (SIGHUP); calls in progress keep
    /// the targets they were set up with.
    pub(crate) fn reconfigure(
        &mut self,
        routes: Vec<super::RouteTarget>,
        trusted: Vec<crate::config::Cidr>,
    ) {
        self.cfg.routes = routes;
        self.cfg.trusted = trusted;
    }

    /// Both legs' Call-IDs of the call a message with `call_id` belongs to (for log spans):
    /// `(Some(a), Some(b))` for a call's leg, `(Some(call_id), None)` for anything else.
    pub(crate) fn leg_call_ids(&self, call_id: &str) -> (Option<String>, Option<String>) {
        let key = self.own_call_ids.get(call_id).copied().or_else(|| {
            self.calls
                .iter()
                .find(|(_, c)| c.a.call_id == call_id)
                .map(|(k, _)| *k)
        });
        match key.and_then(|k| self.calls.get(&k)) {
            Some(c) => (Some(c.a.call_id.clone()), Some(c.b.call_id.clone())),
            None => (Some(call_id.to_string()), None),
        }
    }
}
