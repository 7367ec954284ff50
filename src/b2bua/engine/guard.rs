//! What keeps calls a peer controls from holding state forever or crowding others out
//! (issue 10, findings 7 and 8):
//!
//! - **Ring timeout**: a call with no final answer from the callee `ring_timeout` after its
//!   INVITE is CANCELled on leg B (RFC 3261 §9.1, like a proxy's Timer C, §16.8) and the caller
//!   gets `408` with the `timeout` error body; its ports are released at once. (A 2xx never
//!   ACKed is ended by the transaction layer's Timer L at 64*T1, §13.3.1.4, see
//!   `on_ack_timeout`.)
//! - **Admission** (PROTOCOL.md §7 "Overload"): a new INVITE or REGISTER from an untrusted
//!   source over its share, per [`Admission`] (a token bucket per source IP, Kamailio `pike`
//!   style), or an INVITE from a source that already has `half_open_per_source` calls not yet
//!   confirmed by the caller's ACK (ringing, or answered and never ACKed: they hold ports), is
//!   answered `503` with `Retry-After` and the `overloaded` body, statelessly (§8.2.7): no
//!   transaction, call or port is created for it. Trusted peers (`[[trusted_peer]]`, e.g. a
//!   trunk) are not limited.
//!
//! All bookkeeping here is bounded: per call (removed when the call settles or ends) or by the
//! admission table's size.

use std::collections::{BTreeSet, HashMap};
use std::net::IpAddr;
use std::time::{Duration, Instant};

use super::call::CallState;
use super::{CallKey, Engine, MediaBackend};
use crate::b2bua::errors::with_error_body;
use crate::config::SipConfig;
use crate::error_code::ErrorCode;
use crate::metrics::{CallOutcome, METRICS};
use crate::sip::admission::{Admission, AdmissionConfig, Verdict};
use crate::sip::message::{HeaderAccess, Method, Request};
use crate::sip::transaction::Peer;

/// `Retry-After` for a source refused for its half-open calls: they settle within 64*T1.
const HALF_OPEN_RETRY_SECS: u32 = 5;

/// Limits of the guard (`[sip]` keys of the same names).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GuardConfig {
    /// `ring_timeout_secs`.
    pub ring_timeout: Duration,
    /// `admission_rate` / `admission_burst` / `admission_sources`.
    pub admission: AdmissionConfig,
    /// `half_open_calls_per_source`; 0: no cap.
    pub half_open_per_source: u32,
}

impl From<&SipConfig> for GuardConfig {
    fn from(sip: &SipConfig) -> Self {
        GuardConfig {
            ring_timeout: Duration::from_secs(sip.ring_timeout_secs),
            admission: AdmissionConfig {
                rate: f64::from(sip.admission_rate),
                burst: f64::from(sip.admission_burst),
                max_sources: usize::try_from(sip.admission_sources).unwrap_or(usize::MAX),
            },
            half_open_per_source: sip.half_open_calls_per_source,
        }
    }
}

/// The `[sip]` defaults (config/callvault.toml).
impl Default for GuardConfig {
    fn default() -> Self {
        GuardConfig::from(&SipConfig::default())
    }
}

/// One call not settled yet (no ACK from the caller).
#[derive(Debug, Clone, Copy)]
struct Open {
    ring_deadline: Instant,
    /// The untrusted source it counts against.
    source: Option<IpAddr>,
}

/// The guard's state inside the engine.
#[derive(Debug)]
pub(super) struct Guard {
    cfg: GuardConfig,
    admission: Admission,
    /// Ring deadlines of unsettled calls, earliest first.
    ring: BTreeSet<(Instant, CallKey)>,
    open: HashMap<CallKey, Open>,
    per_source: HashMap<IpAddr, u32>,
}

impl Guard {
    pub(super) fn new(cfg: GuardConfig) -> Guard {
        Guard {
            cfg,
            admission: Admission::new(cfg.admission),
            ring: BTreeSet::new(),
            open: HashMap::new(),
            per_source: HashMap::new(),
        }
    }

    pub(super) fn next_timeout(&self) -> Option<Instant> {
        self.ring.first().map(|(t, _)| *t)
    }
}

impl<M: MediaBackend> Engine<M> {
    /// Calls not yet confirmed by the caller's ACK, and the sources they count against.
    #[cfg(test)]
    pub(crate) fn unsettled_calls(&self) -> (usize, usize) {
        (self.guard.open.len(), self.guard.per_source.len())
    }

    /// Admission of a request before the transaction layer sees it: `Some(req)` to go on with,
    /// `None` when it was refused statelessly (module doc).
    pub(super) fn admit(&mut self, req: Request, peer: Peer, now: Instant) -> Option<Request> {
        let new_call = req.method == Method::Invite && req.to_tag().is_none();
        let limited = new_call || req.method == Method::Register;
        let ip = peer.addr.ip();
        if !limited || self.is_trusted(ip) || !self.tx.is_new_request(&req) {
            return Some(req);
        }
        let cap = self.guard.cfg.half_open_per_source;
        let half_open = self.guard.per_source.get(&ip).copied().unwrap_or(0);
        let (retry_after, detail) = if new_call && cap > 0 && half_open >= cap {
            (
                HALF_OPEN_RETRY_SECS,
                "too many unanswered or unacknowledged calls from this source",
            )
        } else {
            match self.guard.admission.check(ip, now) {
                Verdict::Admit => return Some(req),
                Verdict::Reject { retry_after } => {
                    (retry_after, "too many new requests from this source")
                }
            }
        };
        METRICS.sip_admission_rejected_total.inc();
        let tag = self.token(10);
        self.tx.respond_stateless(req, peer, |req| {
            let mut resp = req.response(503, None);
            resp.ensure_to_tag(&tag);
            resp.headers.push("Retry-After", retry_after.to_string());
            with_error_body(resp, ErrorCode::Overloaded, detail)
        });
        None
    }

    /// A call was set up towards B: its ring deadline starts, and it counts against its
    /// caller's source until it settles.
    pub(super) fn call_opened(&mut self, key: CallKey, caller: Peer, now: Instant) {
        let ip = caller.addr.ip();
        let source = (!self.is_trusted(ip)).then_some(ip);
        let ring_deadline = now + self.guard.cfg.ring_timeout;
        self.guard.ring.insert((ring_deadline, key));
        self.guard.open.insert(
            key,
            Open {
                ring_deadline,
                source,
            },
        );
        if let Some(ip) = source {
            *self.guard.per_source.entry(ip).or_default() += 1;
        }
    }

    /// The caller ACKed the call's 2xx, or the call ended: it no longer counts as half-open.
    pub(super) fn call_settled(&mut self, key: CallKey) {
        let Some(open) = self.guard.open.remove(&key) else {
            return;
        };
        self.guard.ring.remove(&(open.ring_deadline, key));
        if let Some(ip) = open.source {
            if let Some(n) = self.guard.per_source.get_mut(&ip) {
                *n -= 1;
                if *n == 0 {
                    self.guard.per_source.remove(&ip);
                }
            }
        }
    }

    /// Fires the ring deadlines due at `now`.
    pub(super) fn ring_timeouts(&mut self, now: Instant) {
        while let Some(&(t, key)) = self.guard.ring.first() {
            if t > now {
                break;
            }
            self.guard.ring.remove(&(t, key));
            self.on_ring_timeout(key, now);
        }
    }

    /// The callee did not answer in time: CANCEL leg B, 408 to the caller, ports released. A
    /// call already answered (waiting for the caller's ACK) is left to Timer L.
    fn on_ring_timeout(&mut self, key: CallKey, now: Instant) {
        let Some(call) = self.calls.get(&key) else {
            return;
        };
        let Some(a_tx) = call.a_invite_tx.filter(|_| call.state == CallState::Early) else {
            return;
        };
        tracing::info!(call = key, "ring timeout, cancelling");
        let mut resp = call.a_invite.response(408, None);
        resp.ensure_to_tag(&call.a.local_tag.clone());
        let resp = with_error_body(
            resp,
            ErrorCode::Timeout,
            "the callee did not answer within ring_timeout_secs",
        );
        self.abandon_early(key, a_tx, resp, CallOutcome::Failed, now);
    }
}
