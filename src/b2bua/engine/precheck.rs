//! Checks every out-of-dialog request passes before callvault acts on it, in the order of
//! RFC 3261 §8.2 (UAS behaviour): the Request-URI scheme (§8.2.2.1, 416), the extensions the
//! sender requires (§8.2.2.3, 420 with `Unsupported`), and for INVITE the body type and the
//! `Accept` list (§8.2.3, 415 with `Accept`; 406). A REGISTER whose To is not a SIP URI is
//! refused with 400 (§10.3 step 5: the To must be an address-of-record; RFC 4475 §3.3.4).
//! These come before authentication: they leak nothing about accounts, and a request that
//! cannot succeed should not cost a digest round trip. ACK and CANCEL are never checked
//! (RFC 3261 §8.2.2.3: they carry no Require of their own).

use std::time::Instant;

use super::Engine;
use crate::b2bua::media::MediaBackend;
use crate::sip::message::{HeaderAccess, Method, Request};
use crate::sip::transaction::ServerTxId;

/// Body types callvault understands in an INVITE.
const SDP: &str = "application/sdp";

/// Why an out-of-dialog request is refused before anything else.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Refusal {
    /// 416: not a sip/sips Request-URI.
    UriScheme,
    /// 420: the Require values, comma-joined, for `Unsupported`.
    Extensions(String),
    /// 415: a body that is not SDP.
    BodyType,
    /// 406: `Accept` rules out SDP answers.
    NotAcceptable,
    /// 400: the REGISTER's To is not a sip/sips URI.
    RegisterTo,
}

/// The first rule `req` breaks, if any.
pub(super) fn refusal(req: &Request) -> Option<Refusal> {
    if matches!(req.method, Method::Ack | Method::Cancel) {
        return None;
    }
    if !req.parsed_uri().is_ok_and(|u| u.is_sip()) {
        return Some(Refusal::UriScheme);
    }
    let required: Vec<&str> = req
        .headers
        .get_all("Require")
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .collect();
    if !required.is_empty() {
        return Some(Refusal::Extensions(required.join(", ")));
    }
    match req.method {
        Method::Invite => {
            let ct = req.content_type();
            if !req.body.is_empty() && !ct.as_deref().is_some_and(|c| c.eq_ignore_ascii_case(SDP)) {
                return Some(Refusal::BodyType);
            }
            if !accepts_sdp(req) {
                return Some(Refusal::NotAcceptable);
            }
        }
        Method::Register if !req.to_hdr().is_some_and(|t| t.uri.is_sip()) => {
            return Some(Refusal::RegisterTo);
        }
        _ => {}
    }
    None
}

/// No `Accept` means SDP (RFC 3261 §20.1); otherwise one of its media ranges must cover it.
fn accepts_sdp(req: &Request) -> bool {
    let mut values = req.headers.get_all("Accept").peekable();
    if values.peek().is_none() {
        return true;
    }
    values
        .flat_map(|v| v.split(','))
        .map(|r| {
            r.split(';')
                .next()
                .unwrap_or("")
                .trim()
                .to_ascii_lowercase()
        })
        // An empty Accept header means "no body accepted"; SDP answers are then refused too.
        .any(|r| r == SDP || r == "application/*" || r == "*/*")
}

impl<M: MediaBackend> Engine<M> {
    /// Answers `req` when it breaks a rule of [`refusal`]; true when it was answered.
    pub(super) fn refuse_early(&mut self, tx: ServerTxId, req: &Request, now: Instant) -> bool {
        let Some(why) = refusal(req) else {
            return false;
        };
        let mut resp = match &why {
            Refusal::UriScheme => req.response(416, None),
            Refusal::Extensions(ext) => {
                let mut r = req.response(420, None);
                r.headers.push("Unsupported", ext.clone());
                r
            }
            Refusal::BodyType => {
                let mut r = req.response(415, None);
                r.headers.push("Accept", SDP);
                r
            }
            Refusal::NotAcceptable => req.response(406, None),
            Refusal::RegisterTo => {
                let r = req.response(400, Some("To is not a SIP address-of-record"));
                crate::b2bua::errors::with_error_body(
                    r,
                    crate::error_code::ErrorCode::MalformedMessage,
                    "the To of a REGISTER must be a sip or sips URI",
                )
            }
        };
        resp.ensure_to_tag(&self.token(10));
        self.respond(tx, resp, now);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sip::message::{parse, SipMessage};

    fn req(extra: &str, ruri: &str, method: &str, body: &str) -> Request {
        let text = format!(
            "{method} {ruri} SIP/2.0\r\nVia: SIP/2.0/UDP h;branch=z9hG4bK1\r\n\
             From: <sip:a@x>;tag=1\r\nTo: <sip:b@x>\r\nCall-ID: c\r\nCSeq: 1 {method}\r\n\
             {extra}Content-Length: {}\r\n\r\n{body}",
            body.len()
        );
        match parse(text.as_bytes()).unwrap() {
            SipMessage::Request(r) => r,
            SipMessage::Response(_) => unreachable!(),
        }
    }

    #[test]
    fn rules_in_rfc_3261_order() {
        let plain = req("", "sip:b@x", "OPTIONS", "");
        assert_eq!(refusal(&plain), None);
        assert_eq!(
            refusal(&req("", "soap.beep://192.0.2.103:3002", "OPTIONS", "")),
            Some(Refusal::UriScheme)
        );
        assert_eq!(
            refusal(&req("Require: nothing, fox\r\n", "sip:b@x", "OPTIONS", "")),
            Some(Refusal::Extensions("nothing, fox".into()))
        );
        // ACK and CANCEL are never refused here.
        assert_eq!(refusal(&req("Require: x\r\n", "tel:1", "CANCEL", "")), None);
        let xml = "Content-Type: application/unknownformat\r\n";
        assert_eq!(
            refusal(&req(xml, "sip:b@x", "INVITE", "<audio/>")),
            Some(Refusal::BodyType)
        );
        let sdp = "Content-Type: application/sdp\r\n";
        assert_eq!(refusal(&req(sdp, "sip:b@x", "INVITE", "v=0\r\n")), None);
        let no_sdp = "Content-Type: application/sdp\r\nAccept: text/nobodyknowsthis\r\n";
        assert_eq!(
            refusal(&req(no_sdp, "sip:b@x", "INVITE", "v=0\r\n")),
            Some(Refusal::NotAcceptable)
        );
        let star = "Accept: text/plain, application/*;q=0.5\r\n";
        assert_eq!(refusal(&req(star, "sip:b@x", "INVITE", "")), None);
        let mut reg = req("", "sip:x", "REGISTER", "");
        reg.headers.set("To", "isbn:2983792873");
        assert_eq!(refusal(&reg), Some(Refusal::RegisterTo));
    }
}
