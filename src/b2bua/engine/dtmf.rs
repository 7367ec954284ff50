//! DTMF carried in INFO (`application/dtmf-relay`, `application/dtmf`) and the feature code:
//! digits of a possible `*7 PIN #` are answered by us and held back from the other party until
//! the code is decided (PROTOCOL.md §5), then swallowed or re-sent in order.

use std::time::Instant;

use super::{Engine, EngineEvent};
use crate::b2bua::media::{CallKey, MediaBackend, Side};
use crate::media::feature_code::{Decision, FeatureCode};
use crate::sip::message::{HeaderAccess, Request};
use crate::sip::transaction::ServerTxId;

/// One direction's detector plus the INFO requests it holds.
#[derive(Debug, Clone)]
pub(super) struct DigitGate {
    code: FeatureCode,
    held: Vec<Request>,
}

impl DigitGate {
    pub(super) fn new(code: &str) -> DigitGate {
        DigitGate {
            code: FeatureCode::new(code),
            held: Vec::new(),
        }
    }

    pub(super) fn poll_timeout(&self) -> Option<Instant> {
        self.code.poll_timeout()
    }
}

/// The digit an INFO carries, if it is a DTMF INFO.
pub(super) fn info_digit(req: &Request) -> Option<char> {
    let ct = req.content_type()?;
    let body = std::str::from_utf8(&req.body).ok()?;
    let d = match ct.as_str() {
        // "Signal=5\r\nDuration=160"
        "application/dtmf-relay" => body
            .lines()
            .find_map(|l| {
                let (k, v) = l.split_once('=')?;
                k.trim()
                    .eq_ignore_ascii_case("signal")
                    .then(|| v.trim().to_string())
            })?
            .chars()
            .next()?,
        "application/dtmf" => body.trim().chars().next()?,
        _ => return None,
    };
    let d = d.to_ascii_uppercase();
    matches!(d, '0'..='9' | '*' | '#' | 'A'..='D').then_some(d)
}

fn idx(side: Side) -> usize {
    match side {
        Side::A => 0,
        Side::B => 1,
    }
}

impl<M: MediaBackend> Engine<M> {
    /// Runs a DTMF INFO from `side` through the feature-code gate. Returns the request back
    /// when it is to be relayed as usual.
    pub(super) fn gate_info_digit(
        &mut self,
        call: CallKey,
        side: Side,
        tx: ServerTxId,
        req: Request,
        now: Instant,
    ) -> Option<Request> {
        let Some(digit) = info_digit(&req) else {
            return Some(req);
        };
        let Some(c) = self.calls.get_mut(&call) else {
            return Some(req);
        };
        let decision = c.digits[idx(side)].code.on_digit(digit, now);
        match decision {
            Decision::Forward => Some(req),
            Decision::Hold => {
                self.respond(tx, req.response(200, None), now);
                if let Some(c) = self.calls.get_mut(&call) {
                    c.digits[idx(side)].held.push(req);
                }
                self.digit_holds.insert(call);
                None
            }
            Decision::Release(_) => {
                self.respond(tx, req.response(200, None), now);
                let mut held = self
                    .calls
                    .get_mut(&call)
                    .map(|c| std::mem::take(&mut c.digits[idx(side)].held))
                    .unwrap_or_default();
                held.push(req);
                self.resend_digits(call, side, held, now);
                None
            }
            Decision::Code { pin } => {
                self.respond(tx, req.response(200, None), now);
                if let Some(c) = self.calls.get_mut(&call) {
                    c.digits[idx(side)].held.clear();
                }
                self.events
                    .push_back(EngineEvent::FeatureCode { call, side, pin });
                None
            }
        }
    }

    /// Sends held digit INFOs on to the other party, in order, as our own requests.
    fn resend_digits(&mut self, call: CallKey, from: Side, held: Vec<Request>, now: Instant) {
        for r in held {
            let headers: Vec<(String, String)> = r
                .headers
                .iter()
                .filter(|h| {
                    ["Content-Type", "Info-Package"]
                        .iter()
                        .any(|n| crate::sip::message::same_header(&h.name, n))
                })
                .map(|h| (h.name.clone(), h.value.clone()))
                .collect();
            let refs: Vec<(&str, &str)> = headers
                .iter()
                .map(|(n, v)| (n.as_str(), v.as_str()))
                .collect();
            self.send_in_dialog(
                call,
                from.other(),
                r.method.clone(),
                &refs,
                r.body.clone(),
                now,
            );
        }
    }

    /// Releases digits held too long (the 3 s rule).
    pub(super) fn digit_timeouts(&mut self, now: Instant) {
        let mut due = Vec::new();
        // Only calls holding digits: the core asks for timeouts before every event, so this
        // must not grow with the number of calls.
        for k in &self.digit_holds {
            let Some(c) = self.calls.get_mut(k) else {
                continue;
            };
            for side in [Side::A, Side::B] {
                let gate = &mut c.digits[idx(side)];
                if gate.code.handle_timeout(now).is_some() {
                    due.push((*k, side, std::mem::take(&mut gate.held)));
                }
            }
        }
        for (k, side, held) in due {
            self.resend_digits(k, side, held, now);
        }
        let calls = &self.calls;
        self.digit_holds.retain(|k| {
            calls
                .get(k)
                .is_some_and(|c| c.digits.iter().any(|g| g.code.is_holding()))
        });
    }

    pub(super) fn next_digit_timeout(&self) -> Option<Instant> {
        self.digit_holds
            .iter()
            .filter_map(|k| self.calls.get(k))
            .flat_map(|c| c.digits.iter().filter_map(DigitGate::poll_timeout))
            .min()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sip::message::{parse, SipMessage};

    fn info(ct: &str, body: &str) -> Request {
        let text = format!(
            "INFO sip:a@b SIP/2.0\r\nVia: SIP/2.0/UDP h;branch=z9hG4bK1\r\nFrom: <sip:a@b>;tag=1\r\n\
             To: <sip:c@d>;tag=2\r\nCall-ID: x\r\nCSeq: 2 INFO\r\nContent-Type: {ct}\r\n\
             Content-Length: {}\r\n\r\n{body}",
            body.len()
        );
        match parse(text.as_bytes()).unwrap() {
            SipMessage::Request(r) => r,
            _ => panic!(),
        }
    }

    #[test]
    fn digits_from_both_info_forms() {
        assert_eq!(
            info_digit(&info(
                "application/dtmf-relay",
                "Signal=*\r\nDuration=160\r\n"
            )),
            Some('*')
        );
        assert_eq!(
            info_digit(&info("application/dtmf-relay", "signal= 7\r\n")),
            Some('7')
        );
        assert_eq!(info_digit(&info("application/dtmf", "#")), Some('#'));
        assert_eq!(info_digit(&info("application/dtmf", "x")), None);
        assert_eq!(info_digit(&info("text/plain", "5")), None);
    }

    #[test]
    fn rtp_feature_code_becomes_engine_event() {
        use crate::b2bua::engine::{EngineConfig, RouteTarget};
        use crate::b2bua::media::FakeMedia;
        use crate::sip::auth::{Algorithm, NonceKey, Verifier};
        use crate::sip::transaction::{Peer, TimerConfig};
        use crate::sip::transport::Transport;

        let a = Peer::new(Transport::Udp, "127.0.0.1:5061".parse().unwrap());
        let b = Peer::new(Transport::Udp, "127.0.0.1:5070".parse().unwrap());
        let cfg = EngineConfig {
            domain: "example.com".into(),
            public_ip: "127.0.0.1".parse().unwrap(),
            udp_port: Some(5060),
            tcp_port: None,
            tls_port: None,
            digest_algorithms: vec![Algorithm::Md5],
            trusted: vec!["127.0.0.0/8".parse().unwrap()],
            routes: vec![RouteTarget {
                prefix: String::new(),
                peer: b,
                host_port: "127.0.0.1:5070".into(),
            }],
            timers: TimerConfig::default(),
            registration_min_expires: 60,
            registration_max_expires: 3600,
            feature_code: "*7".into(),
            guard: Default::default(),
            srtp: crate::config::SrtpMode::Terminate,
        };
        let now = Instant::now();
        let verifier = Verifier::new(NonceKey::from_bytes([7; 32]), 300);
        let mut eng = Engine::new(cfg, FakeMedia::new(4), verifier, (now, 1_800_000_000), 1);
        assert_eq!(eng.media().feature_code, "*7", "relays get the code");

        let sdp = "v=0\r\no=- 1 1 IN IP4 127.0.0.2\r\ns=-\r\nc=IN IP4 127.0.0.2\r\nt=0 0\r\n\
                   m=audio 6000 RTP/AVP 0 96\r\na=rtpmap:0 PCMU/8000\r\n\
                   a=rtpmap:96 telephone-event/8000\r\n";
        let invite = format!(
            "INVITE sip:1002@example.com SIP/2.0\r\n\
             Via: SIP/2.0/UDP 127.0.0.1:5061;branch=z9hG4bKrtpdtmf1\r\nMax-Forwards: 70\r\n\
             From: <sip:1001@example.com>;tag=a1\r\nTo: <sip:1002@example.com>\r\n\
             Call-ID: rtp-dtmf\r\nCSeq: 1 INVITE\r\nContact: <sip:1001@127.0.0.1:5061>\r\n\
             Content-Type: application/sdp\r\nContent-Length: {}\r\n\r\n{sdp}",
            sdp.len()
        );
        eng.handle_message(parse(invite.as_bytes()).unwrap(), a, now);
        let call = *eng.media().streams.keys().next().expect("call anchored");
        // A's telephone-event type went to the relay with A's address
        assert_eq!(
            eng.media().dtmf_pts.get(&(call, 0, Side::A)),
            Some(&Some(96))
        );
        while eng.poll_event().is_some() {}

        eng.handle_media_feature_code(call, Side::B, "4321".into());
        assert_eq!(
            eng.poll_event(),
            Some(EngineEvent::FeatureCode {
                call,
                side: Side::B,
                pin: "4321".into()
            })
        );
        // an unknown (already ended) call reports nothing
        eng.handle_media_feature_code(call + 99, Side::B, "4321".into());
        assert_eq!(eng.poll_event(), None);
    }
}
