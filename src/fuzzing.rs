//! Fuzz target bodies (not API; `#[doc(hidden)]`). Each takes arbitrary bytes, drives one of
//! the parsers that read network or file input, and panics only on a broken invariant: the
//! parser itself must never panic, and what it accepts must survive its own round trip.
//!
//! The cargo-fuzz crate in `fuzz/` calls these (one `fuzz_target!` per function), and
//! `tests/fuzz_corpus.rs` runs every file of `fuzz/corpus/<target>/` through them on the stable
//! toolchain, so the targets compile and the corpora double as regression inputs in every
//! `cargo test` (see `fuzz/README.md`).

use std::str;

use crate::b2bua::{share_service, wire};
use crate::http::auth::is_party;
use crate::http::shares::{parse_range, RangeAsk};
use crate::media::dtmf::TelephoneEvent;
use crate::media::rtp::{looks_like_rtcp, RtpPacket, RtpPacketMut};
use crate::sdp::SessionDescription;
use crate::share::manifest::Manifest;
use crate::share::policy::{Policy, Requester};
use crate::sip::auth::{Challenge, Credentials, NonceKey, Verifier};

/// A target body: arbitrary bytes in, a panic only on a broken invariant.
pub type Target = fn(&[u8]);

/// The targets, by the name of their corpus directory.
pub const TARGETS: &[(&str, Target)] = &[
    ("sdp", sdp),
    ("rtp", rtp),
    ("digest", digest),
    ("json_bodies", json_bodies),
    ("http_head", http_head),
];

/// `SessionDescription::parse`; what it accepts prints as SDP that parses to the same text.
pub fn sdp(data: &[u8]) {
    let Ok(text) = str::from_utf8(data) else {
        return;
    };
    if let Ok(sd) = SessionDescription::parse(text) {
        let printed = sd.to_string();
        let again = SessionDescription::parse(&printed)
            .unwrap_or_else(|e| panic!("re-parse failed: {e}\n{printed}"));
        assert_eq!(again.to_string(), printed);
    }
}

/// RTP views (read and restamp), RTCP demultiplexing and RFC 4733 events in the payload.
pub fn rtp(data: &[u8]) {
    let _ = looks_like_rtcp(data);
    if let Ok(p) = RtpPacket::parse(data) {
        let _ = (
            p.marker(),
            p.payload_type(),
            p.sequence(),
            p.timestamp(),
            p.ssrc(),
        );
        for i in 0..=usize::from(p.csrc_count()) {
            let _ = p.csrc(i);
        }
        let _ = p.extension_data();
        assert!(p.payload_offset() + p.payload().len() <= data.len());
        let _ = TelephoneEvent::parse(p.payload());
    }
    let mut copy = data.to_vec();
    if let Ok(mut p) = RtpPacketMut::parse(&mut copy) {
        p.set_marker(true);
        p.set_payload_type(101);
        p.set_sequence(7);
        assert_eq!((p.payload_type(), p.sequence()), (101, 7));
    }
    let _ = TelephoneEvent::parse(data);
}

/// Digest challenge and credential headers (SIP and HTTP share them), and the verifier on
/// whatever credentials parse (nonce decoding, nc, qop).
pub fn digest(data: &[u8]) {
    let Ok(text) = str::from_utf8(data) else {
        return;
    };
    if let Ok(ch) = Challenge::parse(text) {
        let printed = ch.to_header_value();
        let again = Challenge::parse(&printed)
            .unwrap_or_else(|e| panic!("re-parse failed: {e}\n{printed}"));
        // Our challenges always offer qop=auth; every other field comes back as it was.
        let key = |c: &Challenge| {
            (
                c.realm.clone(),
                c.nonce.clone(),
                c.opaque.clone(),
                c.algorithm,
                c.stale,
            )
        };
        assert_eq!(key(&again), key(&ch));
    }
    if let Ok(c) = Credentials::parse(text) {
        let mut v = Verifier::new(NonceKey::from_bytes([7; 32]), 300);
        let ha1 = "0".repeat(32);
        let _ = v.verify(&c, &c.realm, Some(&ha1), "INVITE", 1_700_000_000);
        let _ = v.verify(&c, "example.com", None, "REGISTER", 0);
    }
}

/// JSON bodies callvault reads from peers: store requests (PROTOCOL §2), share requests and
/// the sharer's answer (§3), share manifests.
pub fn json_bodies(data: &[u8]) {
    if let Ok(r) = wire::StoreRequest::parse(data) {
        assert!(!r.pin.is_empty() && r.pin.len() <= 32);
    }
    let _ = share_service::parse_request(data);
    let _ = share_service::classify_answer(200, Some("application/json"), data);
    if let Some(m) = Manifest::parse(data) {
        let bytes = m.to_bytes();
        assert!(Manifest::parse(&bytes).is_some(), "manifest round trip");
    }
}

/// What callvault parses itself in an HTTP request head (hyper parses the head's syntax):
/// `Range` values, stored party AORs, share policies and requester URIs. Lines of the input
/// are taken one by one as such values.
pub fn http_head(data: &[u8]) {
    let Ok(text) = str::from_utf8(data) else {
        return;
    };
    let size = u64::try_from(data.len()).unwrap_or(u64::MAX);
    for line in text.lines() {
        match parse_range(Some(line), size) {
            RangeAsk::Part(first, last) => assert!(first <= last && last < size, "{line}"),
            RangeAsk::Whole | RangeAsk::Unsatisfiable => {}
        }
        let _ = is_party(line, "1001", "example.com");
        if let Ok(p) = Policy::parse(line, "example.com") {
            let printed = p.to_string();
            assert!(Policy::parse(&printed, "example.com").is_ok(), "{printed}");
        }
        let _ = Requester::from_uri(line, true, "example.com");
    }
}
