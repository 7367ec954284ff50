//! The caller's identity toward the callee (RFC 3325, RFC 3261 §22). `From` is whatever the
//! caller's UA wrote; only authentication says who is calling.
//!
//! - A digest-authenticated caller may not name another subscriber in `From`: such an INVITE is
//!   refused with 403 and the error body (`forbidden`), as Kamailio's `auth_check(..., 1)`
//!   does, rather than rewritten (docs/ARCHITECTURE.md, Decisions). A `From` naming someone who
//!   is not a subscriber here (a number, another domain, `anonymous@anonymous.invalid`) passes.
//!   Leg B then carries `P-Asserted-Identity: <sip:USER@DOMAIN>`, the authenticated user, and
//!   every `P-Asserted-Identity`/`P-Preferred-Identity` the caller sent is dropped (RFC 3325
//!   §5: an assertion from outside the trust domain means nothing). With `Privacy: id`
//!   (RFC 3325 §7) no identity is asserted toward the callee.
//! - A trusted peer (`[[trusted_peer]]`) is not authenticated: it belongs to the trust domain,
//!   so its `From` and any `P-Asserted-Identity` it sent pass unchanged and callvault asserts
//!   nothing of its own (it verified nothing).

use std::time::Instant;

use super::Engine;
use crate::b2bua::media::MediaBackend;
use crate::sip::message::{HeaderAccess, Request};
use crate::sip::transaction::{Peer, ServerTxId};
use crate::sip::uri::{NameAddr, Uri};

const PAI: &str = "P-Asserted-Identity";
const PPI: &str = "P-Preferred-Identity";

/// `Privacy: id` (or a list holding it) asks that the identity not be passed on.
fn privacy_id(req: &Request) -> bool {
    req.headers
        .get_all("Privacy")
        .flat_map(|v| v.split(';'))
        .any(|t| t.trim().eq_ignore_ascii_case("id"))
}

impl<M: MediaBackend> Engine<M> {
    /// The user the From of a digest-authenticated request names, when that user is another
    /// subscriber of this domain than `caller`.
    fn spoofed_subscriber(&self, req: &Request, caller: &str) -> Option<String> {
        let from = req.from_hdr()?;
        if !from.uri.is_sip() || !from.uri.host.eq_ignore_ascii_case(&self.cfg.domain) {
            return None;
        }
        let user = from.uri.user_unescaped()?;
        (user != caller && self.accounts.contains_key(&user)).then_some(user)
    }

    /// Refuses (403) an INVITE whose authenticated caller names another subscriber in From;
    /// true when it was answered. Trusted peers are never refused here.
    pub(super) fn refuse_spoofed_from(
        &mut self,
        tx: ServerTxId,
        req: &Request,
        peer: Peer,
        caller: &str,
        now: Instant,
    ) -> bool {
        if self.is_trusted(peer.addr.ip()) {
            return false;
        }
        let Some(named) = self.spoofed_subscriber(req, caller) else {
            return false;
        };
        tracing::info!(%caller, from = %named, "From names another subscriber: refused");
        self.reject(
            tx,
            req,
            403,
            crate::error_code::ErrorCode::Forbidden,
            &format!("authenticated as {caller}, From names {named}"),
            now,
        );
        true
    }

    /// Sets the identity headers of leg B's `out` (its end-to-end headers already copied from
    /// the caller's `req`): see the module documentation.
    pub(super) fn assert_identity(
        &self,
        out: &mut Request,
        req: &Request,
        peer: Peer,
        caller: &str,
    ) {
        if self.is_trusted(peer.addr.ip()) {
            return;
        }
        out.headers.remove(PAI);
        out.headers.remove(PPI);
        if !privacy_id(req) {
            let me = NameAddr::new(Uri::sip(Some(caller), &self.cfg.domain, None));
            out.headers.push(PAI, me.to_string());
        }
    }
}
