//! Requests too big for UDP (RFC 3261 §18.1.1). A request callvault forwards over UDP that
//! is larger than [`UDP_MTU_LIMIT`] (the RFC's 1300 bytes for an unknown path MTU: 200 bytes
//! under a 1500-byte MTU) goes over TCP to the same address instead: its Via is rewritten to
//! TCP with our TCP port, so the answer comes back on that connection (§18.2.2). When callvault
//! has no SIP TCP listener (its Via could name no TCP port), or the TCP connection cannot be
//! opened (the target does not take TCP), the original sender gets `513 Message Too Large`
//! instead of silence and a 32-second Timer B.

use std::collections::HashSet;
use std::time::Instant;

use bytes::Bytes;

use super::{Engine, EngineEvent, Pending};
use crate::b2bua::media::MediaBackend;
use crate::sip::message::{HeaderAccess, Request};
use crate::sip::transaction::{ClientTxId, Peer};
use crate::sip::transport::Transport;

/// Largest request sent over UDP (RFC 3261 §18.1.1, path MTU unknown).
pub(crate) const UDP_MTU_LIMIT: usize = 1300;

/// The 513's detail when the TCP connection for a too-large request could not be opened.
pub(super) const TOO_LARGE_FOR_CALLEE: &str =
    "the request is too large for UDP and the callee does not take TCP";

/// The request cannot go out: too big for UDP, and no TCP to send it over.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("request of {size} bytes is too large for UDP and callvault has no SIP TCP listener")]
pub(super) struct TooLarge {
    pub size: usize,
}

impl<M: MediaBackend> Engine<M> {
    /// Sends `out` to `to` as a new client transaction, over TCP when it is too large for UDP
    /// ([`Engine::fit_transport`]): the transaction and the peer it went to.
    pub(super) fn send_fitted(
        &mut self,
        mut out: Request,
        to: Peer,
        now: Instant,
    ) -> Result<(ClientTxId, Peer), TooLarge> {
        let sent_to = self.fit_transport(&mut out, to)?;
        let id = self.tx.send_request(out, sent_to, now);
        if sent_to != to {
            self.note_switched(id);
        }
        Ok((id, sent_to))
    }

    /// Answers the sender of a relayed request that could not be sent for its size.
    pub(super) fn too_large(&mut self, pending: Pending, e: &TooLarge, now: Instant) {
        match pending {
            Pending::Standalone { server_tx } | Pending::Relay { server_tx, .. } => {
                if let Some(orig) = self.tx.server_request(server_tx).cloned() {
                    let detail = e.to_string();
                    self.reject(
                        server_tx,
                        &orig,
                        513,
                        crate::error_code::ErrorCode::MessageTooLarge,
                        &detail,
                        now,
                    );
                }
            }
            Pending::ShareRelay { server_tx } => {
                self.events.push_back(EngineEvent::ShareRelayAnswered {
                    tx: server_tx,
                    status: 513,
                    content_type: None,
                    body: Bytes::new(),
                })
            }
            // Requests of our own are small and never relayed through here.
            Pending::BInvite(_) | Pending::Own { .. } | Pending::OutOfDialog => {}
        }
    }

    /// Where `out` (fully built, about to be sent to `to`) must go: `to` itself, or the TCP
    /// peer at the same address with `out`'s Via rewritten. Call [`Engine::note_switched`]
    /// with the transaction it starts when the peer returned differs from `to`.
    fn fit_transport(&self, out: &mut Request, to: Peer) -> Result<Peer, TooLarge> {
        if to.transport != Transport::Udp {
            return Ok(to);
        }
        let size = out.to_bytes().len();
        if size <= UDP_MTU_LIMIT {
            return Ok(to);
        }
        let Some(tcp_port) = self.cfg.tcp_port else {
            return Err(TooLarge { size });
        };
        if let Some(mut via) = out.top_via() {
            via.transport = "TCP".into();
            via.port = Some(tcp_port);
            // The Via we built is the only one: requests we originate carry no other.
            out.headers.set("Via", via.to_string());
        }
        Ok(Peer {
            transport: Transport::Tcp,
            addr: to.addr,
        })
    }

    /// Remembers that transaction `id` went over TCP only because of its size: if the
    /// connection cannot be opened, its sender gets 513 rather than 480. Entries whose
    /// transaction has ended are pruned here, so the set never outgrows `pending`.
    fn note_switched(&mut self, id: ClientTxId) {
        let pending = &self.pending;
        self.size_switched.retain(|i| pending.contains_key(i));
        self.size_switched.insert(id);
    }

    /// The status a failed client transaction reports to its sender: 513 for one moved to TCP
    /// for its size (the target does not take TCP), else `status`.
    pub(super) fn unreachable_status(&mut self, id: ClientTxId, status: u16) -> u16 {
        if self.size_switched.remove(&id) {
            513
        } else {
            status
        }
    }
}

/// Transactions moved to TCP for their size (see [`Engine::note_switched`]).
pub(super) type Switched = HashSet<ClientTxId>;
