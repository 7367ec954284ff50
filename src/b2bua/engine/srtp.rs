//! SDES-SRTP terminated per leg (PROTOCOL.md section 7, RFC 4568): the SDP side of it.
//!
//! Each leg keeps the profile it offered. For every anchored media section the engine keeps,
//! per leg, whether it speaks SRTP, the key it sends with (from its `a=crypto`, installed in
//! the relay as that side's [`SrtpDir::FromSide`] context) and callvault's own key for it
//! (fresh from the CSPRNG per leg and call, installed as its [`SrtpDir::ToSide`] context and
//! written into the SDP that goes to it). The `a=crypto` lines of one leg never reach the other.
//!
//! Offer or answer: SDP alternates per section, so an SDP from the side that did not make the
//! pending offer is its answer. Toward the callee callvault offers the caller's profile, or
//! `RTP/SAVP` when the callee's contact is reached over TLS. An `RTP/SAVP` SDP without a
//! supported crypto line is refused (`488` for an offer).

use std::time::Instant;

use bytes::Bytes;

use super::call::Call;
use super::{Engine, Pending};
use crate::b2bua::media::{CallKey, MediaBackend, Side};
use crate::config::SrtpMode;
use crate::media::relay::SrtpDir;
use crate::media::srtp::{MasterKey, SrtpContext, Suite};
use crate::sdp::{is_savp, CryptoLine, SessionDescription};
use crate::sip::message::Request;
use crate::sip::transport::Transport;

/// What the engine knows about the SRTP of one leg of one media section.
#[derive(Debug, Default, Clone)]
pub(super) struct LegCrypto {
    /// The leg's profile is `RTP/SAVP(F)` (known once it sent SDP, or once offered SAVP).
    secure: Option<bool>,
    /// Callvault's keys for this leg: what it offered (one per suite) or the one in force.
    local: Vec<CryptoLine>,
    /// The key this leg sends with, as installed in the relay.
    remote: Option<CryptoLine>,
}

/// Per media section: both legs, and which side made the offer still unanswered.
#[derive(Debug, Default, Clone)]
pub(super) struct StreamCrypto {
    legs: [LegCrypto; 2],
    offer_from: Option<Side>,
    /// The callee's `488` was already answered by offering the other profile.
    retried: bool,
}

/// Why an SDP cannot be anchored with SRTP.
#[derive(Debug)]
pub(super) struct NoCrypto;

fn idx(side: Side) -> usize {
    match side {
        Side::A => 0,
        Side::B => 1,
    }
}

fn context(line: &CryptoLine) -> Box<SrtpContext> {
    Box::new(SrtpContext::new(line.suite, &line.key))
}

impl<M: MediaBackend> Engine<M> {
    /// Applies SRTP termination to section `stream` of `sdp`, which came from `from` and is
    /// rewritten for the other side. Passthrough leaves the SDP alone.
    pub(super) fn srtp_section(
        &mut self,
        key: CallKey,
        sdp: &mut SessionDescription,
        stream: usize,
        from: Side,
    ) -> Result<(), NoCrypto> {
        if self.cfg.srtp == SrtpMode::Passthrough {
            return Ok(());
        }
        let Some(m) = sdp.media(stream).filter(|m| m.is_rtp()) else {
            return Ok(());
        };
        let from_secure = is_savp(&m.proto);
        let offered = sdp.crypto(stream);
        if from_secure && offered.is_empty() {
            return Err(NoCrypto);
        }
        let Some(call) = self.calls.get_mut(&key) else {
            return Ok(());
        };
        let to_over_tls = call.b.peer.transport == Transport::Tls;
        let crypto = stream_crypto(call, stream);
        let answer = crypto.offer_from == Some(from.other());
        crypto.offer_from = if answer { None } else { Some(from) };
        let mut installs: Vec<(Side, SrtpDir, Option<Box<SrtpContext>>)> = Vec::new();

        // The side the SDP came from: its key, and which of ours it took.
        let leg = &mut crypto.legs[idx(from)];
        leg.secure = Some(from_secure);
        if from_secure {
            let theirs = offered[0].clone();
            if leg.remote.as_ref() != Some(&theirs) {
                installs.push((from, SrtpDir::FromSide, Some(context(&theirs))));
                leg.remote = Some(theirs.clone());
            }
            // An answer picks one of our offered lines by tag; an offer gets a key of ours in
            // its suite under its tag (sent back in the answer).
            let ours = if answer {
                leg.local.iter().find(|l| l.tag == theirs.tag).cloned()
            } else {
                match leg.local.first() {
                    Some(l) if l.suite == theirs.suite => Some(CryptoLine {
                        tag: theirs.tag,
                        ..l.clone()
                    }),
                    _ => Some(CryptoLine {
                        tag: theirs.tag,
                        suite: theirs.suite,
                        key: MasterKey::random(),
                    }),
                }
            };
            let Some(ours) = ours else {
                return Err(NoCrypto);
            };
            if leg.local.len() != 1 || leg.local[0] != ours {
                installs.push((from, SrtpDir::ToSide, Some(context(&ours))));
                leg.local = vec![ours];
            }
        } else {
            let had = leg.remote.take().is_some() || !leg.local.is_empty();
            leg.local.clear();
            if had {
                installs.push((from, SrtpDir::FromSide, None));
                installs.push((from, SrtpDir::ToSide, None));
            }
        }

        // The side the SDP goes to: its own profile, with callvault's key(s) for it.
        let to = from.other();
        let leg = &mut crypto.legs[idx(to)];
        // Once a leg's profile is known it stays; a new leg gets the caller's, or SAVP when
        // the callee is reached over TLS.
        let to_secure = leg
            .secure
            .unwrap_or(from_secure || (to == Side::B && to_over_tls));
        leg.secure = Some(to_secure);
        if to_secure && leg.local.is_empty() {
            leg.local = fresh_offer();
        }
        let lines = if to_secure {
            leg.local.clone()
        } else {
            Vec::new()
        };
        // A failed rewrite leaves the section as it was; the SDP already parsed once.
        let _ = sdp.set_crypto(stream, &lines);
        for (side, dir, ctx) in installs {
            self.media.set_srtp(key, stream, side, dir, ctx);
        }
        Ok(())
    }

    /// PROTOCOL.md section 7: a `488` to callvault's first offer to the callee is retried once
    /// with the other profile (`RTP/AVP` <-> `RTP/SAVP`). True when the new INVITE was sent
    /// (the `488` is then not relayed to the caller).
    pub(super) fn retry_other_profile(
        &mut self,
        key: CallKey,
        invite_b: &Request,
        now: Instant,
    ) -> bool {
        if self.cfg.srtp == SrtpMode::Passthrough {
            return false;
        }
        let Some(call) = self.calls.get_mut(&key) else {
            return false;
        };
        if call.srtp.is_empty() || call.srtp.iter().any(|s| s.retried) {
            return false;
        }
        let Ok(text) = std::str::from_utf8(&invite_b.body) else {
            return false;
        };
        let Ok(mut sdp) = SessionDescription::parse(text) else {
            return false;
        };
        for (stream, crypto) in call.srtp.iter_mut().enumerate() {
            crypto.retried = true;
            let leg = &mut crypto.legs[idx(Side::B)];
            let secure = !leg.secure.unwrap_or(false);
            leg.secure = Some(secure);
            if secure && leg.local.is_empty() {
                leg.local = fresh_offer();
            }
            let lines = if secure {
                leg.local.clone()
            } else {
                Vec::new()
            };
            if sdp.media(stream).is_some_and(|m| m.port != 0 && m.is_rtp()) {
                let _ = sdp.set_crypto(stream, &lines);
            }
        }
        sdp.bump_version();
        let peer = call.b.peer;
        let mut inv = invite_b.clone();
        inv.headers.remove("Via");
        let via = self.new_via(peer.transport);
        inv.headers.push_front("Via", via.to_string());
        inv.headers.set("CSeq", "2 INVITE");
        inv.body = Bytes::from(sdp.to_string());
        let tx = self.tx.send_request(inv, peer, now);
        self.pending.insert(tx, (Pending::BInvite(key), peer));
        if let Some(c) = self.calls.get_mut(&key) {
            c.b_invite_tx = Some(tx);
        }
        tracing::info!(
            call = key,
            "488 from the callee: offering the other RTP profile"
        );
        true
    }

    /// Logs once per call that SRTP is relayed untouched (PROTOCOL.md section 7).
    pub(super) fn note_srtp_passthrough(&self, key: CallKey, sdp: &SessionDescription) {
        if self.cfg.srtp == SrtpMode::Passthrough
            && (0..sdp.media_count()).any(|i| sdp.media(i).is_some_and(|m| is_savp(&m.proto)))
        {
            tracing::info!(
                call = key,
                "SRTP passthrough: media relayed encrypted, no recording or feature code"
            );
        }
    }
}

fn stream_crypto(call: &mut Call, stream: usize) -> &mut StreamCrypto {
    if call.srtp.len() <= stream {
        call.srtp.resize(stream + 1, StreamCrypto::default());
    }
    &mut call.srtp[stream]
}

/// Callvault's offer to a leg: one line per suite, each with a fresh key.
fn fresh_offer() -> Vec<CryptoLine> {
    Suite::ALL
        .into_iter()
        .zip(1..)
        .map(|(suite, tag)| CryptoLine {
            tag,
            suite,
            key: MasterKey::random(),
        })
        .collect()
}
