//! SIP dialogs (RFC 3261 §12), sans-IO: dialog state and in-dialog request construction.
//!
//! ```text
//! DialogId { call_id, local_tag, remote_tag }
//!   DialogId::for_incoming(&Request)   local = To tag, remote = From tag
//!   DialogId::for_response(&Response)  local = From tag, remote = To tag
//! Dialog::uac(&invite_sent, &response) -> Result<Dialog, DialogError>   (1xx with To tag: Early; 2xx: Confirmed)
//! Dialog::uas(&invite_received, local_tag, &local_contact) -> Result<Dialog, DialogError>  (Early until confirm())
//! dialog.new_request(method, &local_contact, via) -> Request          §12.2.1.1
//! dialog.next_hop() -> &Uri                                           §8.1.2 (first route or target)
//! route_request(&target, &route_set) -> (Request-URI, Route values)   §12.2.1.1, also for
//!                                                                     preloaded routes (Path)
//! dialog.ack_for(invite_cseq, via) -> Request                         §13.2.2.4
//! dialog.on_request(&Request) -> Result<(), DialogError>              §12.2.2 (error.status() = 500 / 481)
//! dialog.on_refresh_response(&Response) -> Result<(), DialogError>    §12.2.1.2, §13.2.2.4
//! ```
//!
//! The Via passed in is the caller's (it chooses the branch); the 481 for requests matching
//! no dialog is the TU's. Route headers are written one per header line.

use thiserror::Error;

use super::message::{HeaderAccess, Method, Request, Response};
use super::uri::{NameAddr, Uri, Via};

#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum DialogError {
    #[error("missing or malformed {0}")]
    Missing(&'static str),
    #[error("status {0} does not create a dialog")]
    NotDialogCreating(u16),
    #[error("CSeq {got} is lower than the last one ({last})")]
    CSeqOutOfOrder { got: u32, last: u32 },
    #[error("message does not belong to this dialog")]
    WrongDialog,
}

impl DialogError {
    /// The response status a UAS answers with when a request hits this error.
    pub fn status(&self) -> u16 {
        match self {
            DialogError::CSeqOutOfOrder { .. } => 500, // §12.2.2
            DialogError::WrongDialog => 481,
            DialogError::Missing(_) | DialogError::NotDialogCreating(_) => 400,
        }
    }
}

/// §12: Call-ID plus both tags. Tags are compared exactly (they are opaque tokens).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct DialogId {
    pub call_id: String,
    pub local_tag: String,
    pub remote_tag: String,
}

impl DialogId {
    /// The dialog a received request belongs to; `None` when it has no To tag (out of dialog).
    /// A missing From tag (RFC 2543 peer) counts as the empty tag.
    pub fn for_incoming(req: &Request) -> Option<DialogId> {
        Some(DialogId {
            call_id: req.call_id()?.to_string(),
            local_tag: req.to_tag()?,
            remote_tag: req.from_tag().unwrap_or_default(),
        })
    }

    /// The dialog a response to one of our requests belongs to; `None` without a To tag.
    pub fn for_response(resp: &Response) -> Option<DialogId> {
        Some(DialogId {
            call_id: resp.call_id()?.to_string(),
            local_tag: resp.from_tag().unwrap_or_default(),
            remote_tag: resp.to_tag()?,
        })
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Uac,
    Uas,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DialogState {
    Early,
    Confirmed,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Dialog {
    pub id: DialogId,
    pub role: Role,
    pub state: DialogState,
    /// Last CSeq we used; 0 means empty (a UAS dialog before its first request).
    pub local_seq: u32,
    /// Last CSeq received from the peer; `None` until the first request.
    pub remote_seq: Option<u32>,
    /// Our From (with our tag).
    pub local_uri: NameAddr,
    /// Their URI (with their tag): our To.
    pub remote_uri: NameAddr,
    /// Their Contact: the Request-URI of in-dialog requests.
    pub remote_target: Uri,
    /// Route set in the order Route headers are written.
    pub route_set: Vec<NameAddr>,
    /// Our Contact (UAS: as given; UAC: the INVITE's), for responses inside the dialog.
    pub local_target: Option<NameAddr>,
}

fn record_routes(h: &impl HeaderAccess) -> Result<Vec<NameAddr>, DialogError> {
    let list = h
        .headers()
        .list("Record-Route")
        .map_err(|_| DialogError::Missing("Record-Route"))?;
    list.into_iter()
        .map(|v| NameAddr::parse(v).map_err(|_| DialogError::Missing("Record-Route")))
        .collect()
}

/// The Request-URI and the Route header values of a request to `remote_target` through
/// `route_set` (a dialog's, or a preloaded one such as a registration's Path, §8.1.2).
/// Loose routing when the route set is empty or its first entry has `lr` (a URI parameter,
/// any value: `;lr`, `;lr=on`); otherwise the first route is a strict router: it becomes the
/// Request-URI and the remote target goes last in Route (§12.2.1.1).
pub fn route_request(remote_target: &Uri, route_set: &[NameAddr]) -> (Uri, Vec<String>) {
    match route_set.split_first() {
        Some((first, rest)) if first.uri.param("lr").is_none() => {
            let mut uri = first.uri.clone();
            uri.headers = None; // not allowed in a Request-URI
            uri.remove_param("method");
            let mut routes: Vec<String> = rest.iter().map(|r| r.to_string()).collect();
            routes.push(format!("<{remote_target}>"));
            (uri, routes)
        }
        _ => (
            remote_target.clone(),
            route_set.iter().map(|r| r.to_string()).collect(),
        ),
    }
}

/// The URI a request to `remote_target` through `route_set` is sent to (§8.1.2): the first
/// route (a loose router's Route entry or a strict router's Request-URI), else the target.
pub fn next_hop<'a>(remote_target: &'a Uri, route_set: &'a [NameAddr]) -> &'a Uri {
    route_set.first().map(|r| &r.uri).unwrap_or(remote_target)
}

fn first_contact(h: &impl HeaderAccess) -> Option<Uri> {
    h.contacts().into_iter().next().map(|c| c.uri)
}

impl Dialog {
    /// The UAC side, from the INVITE we sent and a 101-299 response with a To tag (§12.1.2).
    pub fn uac(invite_sent: &Request, resp: &Response) -> Result<Dialog, DialogError> {
        if !(101..300).contains(&resp.status) {
            return Err(DialogError::NotDialogCreating(resp.status));
        }
        let local_uri = invite_sent.from_hdr().ok_or(DialogError::Missing("From"))?;
        let remote_uri = resp.to_hdr().ok_or(DialogError::Missing("To"))?;
        let remote_tag = remote_uri
            .tag()
            .ok_or(DialogError::Missing("To tag"))?
            .to_string();
        let call_id = invite_sent
            .call_id()
            .ok_or(DialogError::Missing("Call-ID"))?
            .to_string();
        let cseq = invite_sent.cseq().ok_or(DialogError::Missing("CSeq"))?;
        let confirmed = resp.status >= 200;
        let remote_target = match first_contact(resp) {
            Some(u) => u,
            // A 2xx must carry Contact (§13.3.1.4); an early dialog can wait for it.
            None if confirmed => return Err(DialogError::Missing("Contact")),
            None => invite_sent
                .parsed_uri()
                .map_err(|_| DialogError::Missing("Request-URI"))?,
        };
        let mut route_set = record_routes(resp)?;
        route_set.reverse();
        Ok(Dialog {
            id: DialogId {
                call_id,
                local_tag: local_uri.tag().unwrap_or_default().to_string(),
                remote_tag,
            },
            role: Role::Uac,
            state: if confirmed {
                DialogState::Confirmed
            } else {
                DialogState::Early
            },
            local_seq: cseq.seq,
            remote_seq: None,
            local_uri,
            remote_uri,
            remote_target,
            route_set,
            local_target: invite_sent.contacts().into_iter().next(),
        })
    }

    /// The UAS side, from a received INVITE and the tag we put in our To (§12.1.1). Starts
    /// Early; call [`Dialog::confirm`] when the 2xx goes out. `local_contact` is what our
    /// responses carry as Contact (kept as `local_target`).
    pub fn uas(
        invite_received: &Request,
        local_tag: &str,
        local_contact: &NameAddr,
    ) -> Result<Dialog, DialogError> {
        if local_tag.is_empty() {
            return Err(DialogError::Missing("local tag"));
        }
        let mut local_uri = invite_received.to_hdr().ok_or(DialogError::Missing("To"))?;
        local_uri.set_tag(local_tag);
        let remote_uri = invite_received
            .from_hdr()
            .ok_or(DialogError::Missing("From"))?;
        let call_id = invite_received
            .call_id()
            .ok_or(DialogError::Missing("Call-ID"))?
            .to_string();
        let cseq = invite_received.cseq().ok_or(DialogError::Missing("CSeq"))?;
        let remote_target =
            first_contact(invite_received).ok_or(DialogError::Missing("Contact"))?;
        Ok(Dialog {
            id: DialogId {
                call_id,
                local_tag: local_tag.to_string(),
                remote_tag: remote_uri.tag().unwrap_or_default().to_string(),
            },
            role: Role::Uas,
            state: DialogState::Early,
            local_seq: 0,
            remote_seq: Some(cseq.seq),
            local_uri,
            remote_uri,
            remote_target,
            route_set: record_routes(invite_received)?,
            local_target: Some(local_contact.clone()),
        })
    }

    /// Marks the dialog confirmed (UAS: 2xx sent).
    pub fn confirm(&mut self) {
        self.state = DialogState::Confirmed;
    }

    /// Builds an in-dialog request (§12.2.1.1). CSeq is incremented except for ACK and CANCEL;
    /// Contact (`local_contact`) is included for the methods that refresh or need a target.
    pub fn new_request(&mut self, method: Method, local_contact: &NameAddr, via: Via) -> Request {
        if !matches!(method, Method::Ack | Method::Cancel) {
            self.local_seq = self.local_seq.wrapping_add(1) & 0x7fff_ffff;
            if self.local_seq == 0 {
                self.local_seq = 1;
            }
        }
        let seq = self.local_seq;
        let wants_contact = matches!(
            method,
            Method::Invite | Method::Update | Method::Subscribe | Method::Notify | Method::Refer
        );
        let mut req = self.build(method, seq, via);
        if wants_contact {
            req.headers.push("Contact", local_contact.to_string());
        }
        req
    }

    /// The ACK for a 2xx to the INVITE with CSeq `invite_cseq` (§13.2.2.4): the dialog's
    /// Request-URI and Route, CSeq number of the INVITE.
    pub fn ack_for(&self, invite_cseq: u32, via: Via) -> Request {
        self.build(Method::Ack, invite_cseq, via)
    }

    /// Where this dialog's requests are sent (§8.1.2 via §12.2.1.1): the first route, else
    /// the remote target.
    pub fn next_hop(&self) -> &Uri {
        next_hop(&self.remote_target, &self.route_set)
    }

    fn build(&self, method: Method, seq: u32, via: Via) -> Request {
        let (uri, routes) = route_request(&self.remote_target, &self.route_set);
        let mut req = Request::new(method.clone(), uri.to_string());
        req.headers.push("Via", via.to_string());
        req.headers.push("Max-Forwards", "70");
        for r in routes {
            req.headers.push("Route", r);
        }
        req.headers.push("From", self.local_uri.to_string());
        req.headers.push("To", self.remote_uri.to_string());
        req.headers.push("Call-ID", self.id.call_id.clone());
        req.headers.push("CSeq", format!("{seq} {method}"));
        req
    }

    /// Checks and records a request received in this dialog (§12.2.2): CSeq order (a lower
    /// one is an error whose `status()` is 500) and target refresh for INVITE/UPDATE.
    pub fn on_request(&mut self, req: &Request) -> Result<(), DialogError> {
        match DialogId::for_incoming(req) {
            Some(id) if id == self.id => {}
            _ => return Err(DialogError::WrongDialog),
        }
        let cseq = req.cseq().ok_or(DialogError::Missing("CSeq"))?;
        // ACK and CANCEL reuse the CSeq of the request they belong to and may trail a later
        // request; they neither advance nor fail the order check.
        if matches!(req.method, Method::Ack | Method::Cancel) {
            return Ok(());
        }
        if let Some(last) = self.remote_seq {
            if cseq.seq < last {
                return Err(DialogError::CSeqOutOfOrder {
                    got: cseq.seq,
                    last,
                });
            }
        }
        self.remote_seq = Some(cseq.seq);
        if matches!(req.method, Method::Invite | Method::Update) {
            if let Some(target) = first_contact(req) {
                self.remote_target = target;
            }
        }
        Ok(())
    }

    /// A response to a request we sent in this dialog. A 2xx to INVITE/UPDATE refreshes the
    /// remote target (§12.2.1.2); in an early UAC dialog a 1xx/2xx with Contact does too, and
    /// the 2xx to INVITE confirms the dialog and recomputes the route set (§13.2.2.4).
    pub fn on_refresh_response(&mut self, resp: &Response) -> Result<(), DialogError> {
        match DialogId::for_response(resp) {
            Some(id) if id == self.id => {}
            _ => return Err(DialogError::WrongDialog),
        }
        let cseq = resp.cseq().ok_or(DialogError::Missing("CSeq"))?;
        if !matches!(cseq.method, Method::Invite | Method::Update) {
            return Ok(());
        }
        let success = (200..300).contains(&resp.status);
        let early = self.state == DialogState::Early;
        if success || (early && resp.status > 100 && resp.status < 200) {
            if let Some(target) = first_contact(resp) {
                self.remote_target = target;
            }
        }
        if early && success && cseq.method == Method::Invite && self.role == Role::Uac {
            let mut routes = record_routes(resp)?;
            routes.reverse();
            self.route_set = routes;
            self.state = DialogState::Confirmed;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sip::message::{parse, SipMessage};

    const INVITE: &str = "INVITE sip:bob@example.com SIP/2.0\r\n\
Via: SIP/2.0/UDP 10.0.0.1:5060;branch=z9hG4bKinv\r\n\
Max-Forwards: 70\r\n\
From: Alice <sip:alice@example.com>;tag=atag\r\n\
To: Bob <sip:bob@example.com>\r\n\
Call-ID: dlg-1\r\n\
CSeq: 10 INVITE\r\n\
Contact: <sip:alice@10.0.0.1:5060>\r\n\
Record-Route: <sip:p1.example.com;lr>, <sip:p2.example.com;lr>\r\n\
Content-Length: 0\r\n\r\n";

    fn invite() -> Request {
        match parse(INVITE.as_bytes()).unwrap() {
            SipMessage::Request(r) => r,
            _ => panic!(),
        }
    }

    fn via(branch: &str) -> Via {
        Via::parse(&format!("SIP/2.0/UDP 192.0.2.10:5060;branch={branch}")).unwrap()
    }

    fn contact(s: &str) -> NameAddr {
        NameAddr::parse(s).unwrap()
    }

    /// The response Bob's side sends: To tag, Contact, Record-Route as received (copied by
    /// `Request::response`, §12.1.1).
    fn answer(status: u16, inv: &Request) -> Response {
        let mut r = inv.response(status, None);
        r.ensure_to_tag("btag");
        r.headers.push("Contact", "<sip:bob@10.0.0.2:5062>");
        r
    }

    fn routes(r: &Request) -> Vec<String> {
        r.headers.get_all("Route").map(str::to_string).collect()
    }

    #[test]
    fn uac_dialog_from_2xx() {
        let inv = invite();
        let d = Dialog::uac(&inv, &answer(200, &inv)).unwrap();
        assert_eq!(d.role, Role::Uac);
        assert_eq!(d.state, DialogState::Confirmed);
        assert_eq!(
            d.id,
            DialogId {
                call_id: "dlg-1".into(),
                local_tag: "atag".into(),
                remote_tag: "btag".into()
            }
        );
        assert_eq!(d.local_seq, 10);
        assert_eq!(d.remote_seq, None);
        assert_eq!(d.remote_target.to_string(), "sip:bob@10.0.0.2:5062");
        // Reversed for the UAC.
        let hosts: Vec<&str> = d.route_set.iter().map(|r| r.uri.host.as_str()).collect();
        assert_eq!(hosts, ["p2.example.com", "p1.example.com"]);
        assert_eq!(
            DialogId::for_response(&answer(200, &inv)),
            Some(d.id.clone())
        );
    }

    #[test]
    fn uac_early_dialog_then_confirmed_with_recomputed_routes() {
        let inv = invite();
        let mut ringing = inv.response(180, None);
        ringing.ensure_to_tag("btag");
        // A proxy that record-routes only the 2xx: the early dialog has no routes yet.
        ringing.headers.remove("Record-Route");
        let mut d = Dialog::uac(&inv, &ringing).unwrap();
        assert_eq!(d.state, DialogState::Early);
        assert!(d.route_set.is_empty());
        // No Contact in the 1xx: target is the Request-URI for now.
        assert_eq!(d.remote_target.to_string(), "sip:bob@example.com");
        let ok = answer(200, &inv);
        d.on_refresh_response(&ok).unwrap();
        assert_eq!(d.state, DialogState::Confirmed);
        assert_eq!(d.remote_target.to_string(), "sip:bob@10.0.0.2:5062");
        assert_eq!(d.route_set.len(), 2);
        assert_eq!(d.route_set[0].uri.host, "p2.example.com");
    }

    #[test]
    fn uac_rejects_non_dialog_responses() {
        let inv = invite();
        assert_eq!(
            Dialog::uac(&inv, &answer(100, &inv)),
            Err(DialogError::NotDialogCreating(100))
        );
        assert_eq!(
            Dialog::uac(&inv, &answer(486, &inv)),
            Err(DialogError::NotDialogCreating(486))
        );
        let no_tag = inv.response(180, None);
        assert_eq!(
            Dialog::uac(&inv, &no_tag),
            Err(DialogError::Missing("To tag"))
        );
        let mut no_contact = inv.response(200, None);
        no_contact.ensure_to_tag("b");
        assert_eq!(
            Dialog::uac(&inv, &no_contact),
            Err(DialogError::Missing("Contact"))
        );
    }

    #[test]
    fn uas_dialog() {
        let inv = invite();
        let me = contact("<sip:b2bua@192.0.2.10:5060>");
        let mut d = Dialog::uas(&inv, "ltag", &me).unwrap();
        assert_eq!(d.role, Role::Uas);
        assert_eq!(d.state, DialogState::Early);
        assert_eq!(d.id.local_tag, "ltag");
        assert_eq!(d.id.remote_tag, "atag");
        assert_eq!(d.remote_seq, Some(10));
        assert_eq!(d.local_seq, 0);
        assert_eq!(d.local_uri.tag(), Some("ltag"));
        assert_eq!(d.remote_target.to_string(), "sip:alice@10.0.0.1:5060");
        // In order for the UAS.
        assert_eq!(d.route_set[0].uri.host, "p1.example.com");
        d.confirm();
        assert_eq!(d.state, DialogState::Confirmed);
        // Our first request starts the local sequence.
        let bye = d.new_request(Method::Bye, &me, via("z9hG4bKbye"));
        assert_eq!(bye.cseq().unwrap().to_string(), "1 BYE");
        assert_eq!(bye.uri, "sip:alice@10.0.0.1:5060");
        assert_eq!(bye.from_tag().as_deref(), Some("ltag"));
        assert_eq!(bye.to_tag().as_deref(), Some("atag"));
        assert_eq!(
            routes(&bye),
            ["<sip:p1.example.com;lr>", "<sip:p2.example.com;lr>"]
        );
        assert!(bye.headers.get("Contact").is_none());
        let mut no_contact = inv.clone();
        no_contact.headers.remove("Contact");
        assert_eq!(
            Dialog::uas(&no_contact, "t", &me),
            Err(DialogError::Missing("Contact"))
        );
    }

    #[test]
    fn new_request_loose_routing() {
        let inv = invite();
        let mut d = Dialog::uac(&inv, &answer(200, &inv)).unwrap();
        let me = contact("<sip:b2bua@192.0.2.10:5060>");
        let reinv = d.new_request(Method::Invite, &me, via("z9hG4bKre"));
        assert_eq!(reinv.method, Method::Invite);
        assert_eq!(reinv.uri, "sip:bob@10.0.0.2:5062");
        assert_eq!(reinv.cseq().unwrap().to_string(), "11 INVITE");
        assert_eq!(reinv.headers.get("Max-Forwards"), Some("70"));
        assert_eq!(reinv.call_id(), Some("dlg-1"));
        assert_eq!(reinv.from_tag().as_deref(), Some("atag"));
        assert_eq!(reinv.to_tag().as_deref(), Some("btag"));
        assert_eq!(reinv.top_via().unwrap().branch(), Some("z9hG4bKre"));
        assert_eq!(
            reinv.headers.get("Contact"),
            Some("<sip:b2bua@192.0.2.10:5060>")
        );
        assert_eq!(
            routes(&reinv),
            ["<sip:p2.example.com;lr>", "<sip:p1.example.com;lr>"]
        );
        let info = d.new_request(Method::Info, &me, via("z9hG4bKi"));
        assert_eq!(info.cseq().unwrap().seq, 12);
        // ACK and CANCEL do not advance the sequence.
        let cancel = d.new_request(Method::Cancel, &me, via("z9hG4bKi"));
        assert_eq!(cancel.cseq().unwrap().to_string(), "12 CANCEL");
        let ack = d.ack_for(11, via("z9hG4bKack"));
        assert_eq!(ack.method, Method::Ack);
        assert_eq!(ack.cseq().unwrap().to_string(), "11 ACK");
        assert_eq!(ack.uri, "sip:bob@10.0.0.2:5062");
        assert_eq!(routes(&ack).len(), 2);
        assert_eq!(d.local_seq, 12);
        // What we build parses back.
        assert!(parse(&info.to_bytes()).is_ok());
        assert!(parse(&ack.to_bytes()).is_ok());
    }

    #[test]
    fn new_request_strict_routing() {
        let inv = invite();
        let mut ok = inv.response(200, None);
        ok.ensure_to_tag("btag");
        ok.headers.push("Contact", "<sip:bob@10.0.0.2:5062>");
        // Reversed by the UAC: the strict router p1 ends up first.
        ok.headers.set(
            "Record-Route",
            "<sip:p2.example.com;lr>, <sip:p1.example.com>",
        );
        let mut d = Dialog::uac(&inv, &ok).unwrap();
        let bye = d.new_request(
            Method::Bye,
            &contact("<sip:me@192.0.2.10>"),
            via("z9hG4bKb"),
        );
        assert_eq!(bye.uri, "sip:p1.example.com");
        assert_eq!(
            routes(&bye),
            ["<sip:p2.example.com;lr>", "<sip:bob@10.0.0.2:5062>"]
        );
    }

    #[test]
    fn preloaded_route_and_next_hop() {
        let target = Uri::parse("sip:bob@10.0.0.2:5062").unwrap();
        assert_eq!(next_hop(&target, &[]).to_string(), "sip:bob@10.0.0.2:5062");
        assert_eq!(route_request(&target, &[]), (target.clone(), vec![]));
        // `lr=on` (Kamailio's full form) is loose like a bare `lr`.
        let path = [contact("<sip:edge.example;lr=on>"), contact("<sip:p2;lr>")];
        let (uri, routes) = route_request(&target, &path);
        assert_eq!(uri, target);
        assert_eq!(routes, ["<sip:edge.example;lr=on>", "<sip:p2;lr>"]);
        assert_eq!(next_hop(&target, &path).host, "edge.example");
        // A strict first hop: its URI, cleaned of `method` and headers, is the Request-URI.
        let strict = [contact("<sip:old.example;method=INVITE?X=1>")];
        let (uri, routes) = route_request(&target, &strict);
        assert_eq!(uri.to_string(), "sip:old.example");
        assert_eq!(routes, ["<sip:bob@10.0.0.2:5062>"]);
        assert_eq!(next_hop(&target, &strict).host, "old.example");
    }

    #[test]
    fn on_request_cseq_order_and_target_refresh() {
        let inv = invite();
        let me = contact("<sip:b2bua@192.0.2.10:5060>");
        let mut d = Dialog::uas(&inv, "ltag", &me).unwrap();
        d.confirm();
        // The peer's in-dialog requests: From atag, To ltag.
        let in_dialog = |method: &str, seq: u32, contact: Option<&str>| {
            let mut text = format!(
                "{method} sip:b2bua@192.0.2.10:5060 SIP/2.0\r\nVia: SIP/2.0/UDP 10.0.0.1;branch=z9hG4bK{seq}\r\n\
                 From: <sip:alice@example.com>;tag=atag\r\nTo: <sip:bob@example.com>;tag=ltag\r\n\
                 Call-ID: dlg-1\r\nCSeq: {seq} {method}\r\n"
            );
            if let Some(c) = contact {
                text.push_str(&format!("Contact: {c}\r\n"));
            }
            text.push_str("\r\n");
            match parse(text.as_bytes()).unwrap() {
                SipMessage::Request(r) => r,
                _ => panic!(),
            }
        };
        assert_eq!(
            DialogId::for_incoming(&in_dialog("INFO", 11, None)),
            Some(d.id.clone())
        );
        d.on_request(&in_dialog("INFO", 11, None)).unwrap();
        assert_eq!(d.remote_seq, Some(11));
        let err = d.on_request(&in_dialog("INFO", 9, None)).unwrap_err();
        assert_eq!(err, DialogError::CSeqOutOfOrder { got: 9, last: 11 });
        assert_eq!(err.status(), 500);
        // ACK trailing with an older CSeq is fine.
        d.on_request(&in_dialog("ACK", 10, None)).unwrap();
        // Non-refresh requests leave the target alone; re-INVITE / UPDATE move it.
        d.on_request(&in_dialog("MESSAGE", 12, Some("<sip:alice@10.9.9.9>")))
            .unwrap();
        assert_eq!(d.remote_target.to_string(), "sip:alice@10.0.0.1:5060");
        d.on_request(&in_dialog("INVITE", 13, Some("<sip:alice@10.0.0.7:5080>")))
            .unwrap();
        assert_eq!(d.remote_target.to_string(), "sip:alice@10.0.0.7:5080");
        d.on_request(&in_dialog("UPDATE", 14, Some("<sip:alice@10.0.0.8>")))
            .unwrap();
        assert_eq!(d.remote_target.host, "10.0.0.8");
        // Another dialog's request.
        let mut other = in_dialog("INFO", 20, None);
        other.headers.set("Call-ID", "zzz");
        assert_eq!(d.on_request(&other).unwrap_err().status(), 481);
        // Out of dialog (no To tag): no id.
        assert_eq!(DialogId::for_incoming(&inv), None);
    }

    #[test]
    fn refresh_response_updates_target_only_on_2xx_to_refresh() {
        let inv = invite();
        let mut d = Dialog::uac(&inv, &answer(200, &inv)).unwrap();
        let me = contact("<sip:me@192.0.2.10>");
        let reinv = d.new_request(Method::Invite, &me, via("z9hG4bKr"));
        let mut prov = reinv.response(180, None);
        prov.headers.push("Contact", "<sip:bob@10.1.1.1>");
        d.on_refresh_response(&prov).unwrap();
        assert_eq!(
            d.remote_target.to_string(),
            "sip:bob@10.0.0.2:5062",
            "1xx in a confirmed dialog"
        );
        let mut fail = reinv.response(488, None);
        fail.headers.push("Contact", "<sip:bob@10.1.1.1>");
        d.on_refresh_response(&fail).unwrap();
        assert_eq!(d.remote_target.host, "10.0.0.2");
        let info = d.new_request(Method::Info, &me, via("z9hG4bKi"));
        let mut info_ok = info.response(200, None);
        info_ok.headers.push("Contact", "<sip:bob@10.1.1.1>");
        d.on_refresh_response(&info_ok).unwrap();
        assert_eq!(
            d.remote_target.host, "10.0.0.2",
            "INFO is not a target refresh"
        );
        let mut ok = reinv.response(200, None);
        ok.headers.push("Contact", "<sip:bob@10.1.1.1:5090>");
        d.on_refresh_response(&ok).unwrap();
        assert_eq!(d.remote_target.to_string(), "sip:bob@10.1.1.1:5090");
        // Route set of a confirmed dialog is not recomputed by a re-INVITE's 2xx.
        assert_eq!(d.route_set.len(), 2);
        let mut foreign = ok.clone();
        foreign.headers.set("To", "<sip:bob@example.com>;tag=else");
        assert_eq!(
            d.on_refresh_response(&foreign),
            Err(DialogError::WrongDialog)
        );
    }
}
