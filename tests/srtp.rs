//! PROTOCOL.md section 7, SRTP terminated per leg, through the real binary: an SRTP phone
//! (the test UA with callvault's own SRTP context on the test side) and a plain phone talk
//! through callvault, each leg with its own key; forged and replayed packets are dropped and
//! counted.

mod common;
#[path = "common/ua.rs"]
mod ua;

use std::net::SocketAddr;
use std::time::Duration;

use callvault::media::srtp::{MasterKey, SrtpContext, Suite};
use callvault::sdp::{CryptoLine, SessionDescription};
use callvault::sip::message::Method;
use common::*;
use ua::{payload, sdp, Rtp, Ua, PCMU, T};

/// A SAVP offer with one crypto line of `key`.
fn savp_sdp(port: u16, key: &MasterKey) -> String {
    sdp(port, PCMU, "sendrecv").replace("RTP/AVP", "RTP/SAVP")
        + &format!(
            "a=crypto:1 AES_CM_128_HMAC_SHA1_80 inline:{}\r\n",
            key.to_base64()
        )
}

fn parse(body: &[u8]) -> SessionDescription {
    SessionDescription::parse(std::str::from_utf8(body).unwrap()).unwrap()
}

/// An RTP packet with a PCMU payload.
fn rtp(seq: u16, ssrc: u32, payload: &[u8]) -> Vec<u8> {
    let mut p = vec![0x80, 0];
    p.extend_from_slice(&seq.to_be_bytes());
    p.extend_from_slice(&(u32::from(seq) * 160).to_be_bytes());
    p.extend_from_slice(&ssrc.to_be_bytes());
    p.extend_from_slice(payload);
    p
}

fn protect(ctx: &mut SrtpContext, pkt: &[u8]) -> Vec<u8> {
    let mut buf = vec![0u8; pkt.len() + 16];
    buf[..pkt.len()].copy_from_slice(pkt);
    let n = ctx.protect_rtp(&mut buf, pkt.len()).unwrap();
    buf.truncate(n);
    buf
}

/// Receives raw datagrams on `rtp` until one arrives or `timeout`.
fn recv_raw(rtp: &Rtp, timeout: Duration) -> Option<Vec<u8>> {
    rtp.sock.set_read_timeout(Some(timeout)).unwrap();
    let mut buf = [0u8; 2048];
    rtp.sock
        .recv_from(&mut buf)
        .ok()
        .map(|(n, _)| buf[..n].to_vec())
}

#[test]
fn srtp_phone_and_plain_phone_talk_through_callvault_and_forgeries_are_dropped() {
    let server = Server::spawn(ServerConfig::new());
    let mut b = Ua::new("2002", "example.com", server.sip_addr());
    b.register();
    let mut a = Ua::new("2001", "example.com", server.sip_addr());
    let a_media = Rtp::bind();
    let b_media = Rtp::bind();

    // A offers SRTP with its key; B is a plain phone.
    let a_key = MasterKey::random();
    let inv = a.invite_request("sip:2002@example.com", &[], &savp_sdp(a_media.port, &a_key));
    a.send(&inv);
    let binv = b.expect_request(Method::Invite, None, T);
    let b_offer = parse(&binv.body);
    let b_audio = b_offer.find_media("audio").unwrap();
    // Toward B callvault offers the caller's profile with keys of its own, never A's.
    assert_eq!(b_offer.media(b_audio).unwrap().proto, "RTP/SAVP");
    let b_lines = b_offer.crypto(b_audio);
    assert!(!b_lines.is_empty(), "callvault's a=crypto for B");
    assert!(
        b_lines.iter().all(|l| l.key != a_key),
        "A's key leaked to B"
    );
    let bd = b.accept_invite(&binv, &sdp(b_media.port, PCMU, "sendrecv"));
    let (resp, ad) = a.finish_invite(&inv);
    assert_eq!(resp.status, 200, "{resp:?}");
    assert!(ad.is_some());
    b.expect_request(Method::Ack, None, T);
    let a_answer = parse(&resp.body);
    let a_audio = a_answer.find_media("audio").unwrap();
    assert_eq!(a_answer.media(a_audio).unwrap().proto, "RTP/SAVP");
    let a_lines: Vec<CryptoLine> = a_answer.crypto(a_audio);
    assert_eq!(a_lines.len(), 1, "one answered crypto line");
    assert_eq!(a_lines[0].tag, 1);
    assert_eq!(a_lines[0].suite, Suite::AesCm128HmacSha1_80);
    assert_ne!(
        a_lines[0].key, a_key,
        "A gets callvault's key, not its own back"
    );
    // Where each phone sends: callvault's port facing it, from the SDP it got.
    let a_sends_to: SocketAddr = a_answer.connection_for(a_audio).unwrap();
    let b_sends_to: SocketAddr = b_offer.connection_for(b_audio).unwrap();

    let mut a_tx = SrtpContext::new(Suite::AesCm128HmacSha1_80, &a_key);
    let mut a_rx = SrtpContext::new(a_lines[0].suite, &a_lines[0].key);

    // A -> B: SRTP in, plain out, payload intact.
    let mut sent = Vec::new();
    for i in 0..20u16 {
        let p = protect(&mut a_tx, &rtp(i, 0xa1, &payload(u32::from(i))));
        a_media.sock.send_to(&p, a_sends_to).unwrap();
        sent.push(p);
        let got = b_media.recv(Duration::from_secs(2)).expect("B hears A");
        assert_eq!(got.seq, i);
        assert_eq!(
            got.payload,
            payload(u32::from(i)),
            "decrypted for the plain leg"
        );
    }
    // B -> A: plain in, SRTP out with callvault's key for A.
    for i in 0..20u16 {
        b_media
            .sock
            .send_to(&rtp(i, 0xb2, &payload(1000 + u32::from(i))), b_sends_to)
            .unwrap();
        let mut got = recv_raw(&a_media, Duration::from_secs(2)).expect("A hears B");
        let n = a_rx.unprotect_rtp(&mut got).expect("authentic SRTP to A");
        assert_eq!(&got[12..n], &payload(1000 + u32::from(i))[..]);
    }

    // A forged packet (bad tag) and a replayed one never reach B.
    let before = server.metrics();
    let auth0 = metric_value(
        &before,
        "callvault_srtp_auth_failures_total",
        &[("reason", "auth")],
    )
    .unwrap_or(0.0);
    let replay0 = metric_value(
        &before,
        "callvault_srtp_auth_failures_total",
        &[("reason", "replay")],
    )
    .unwrap_or(0.0);
    let mut forged = protect(&mut a_tx, &rtp(20, 0xa1, &payload(20)));
    let last = forged.len() - 1;
    forged[last] ^= 0x01;
    a_media.sock.send_to(&forged, a_sends_to).unwrap();
    a_media.sock.send_to(&sent[5], a_sends_to).unwrap();
    a_media.sock.send_to(&sent[19], a_sends_to).unwrap();
    // Then a good one, which is the next thing B gets.
    let good = protect(&mut a_tx, &rtp(21, 0xa1, &payload(21)));
    a_media.sock.send_to(&good, a_sends_to).unwrap();
    let got = b_media
        .recv(Duration::from_secs(2))
        .expect("B hears the good packet");
    assert_eq!(got.seq, 21, "forged or replayed packet relayed");
    // Counters are published within the relay's flush interval.
    std::thread::sleep(Duration::from_millis(250));
    a_media
        .sock
        .send_to(
            &protect(&mut a_tx, &rtp(22, 0xa1, &payload(22))),
            a_sends_to,
        )
        .unwrap();
    std::thread::sleep(Duration::from_millis(150));
    let after = server.metrics();
    let auth1 = metric_value(
        &after,
        "callvault_srtp_auth_failures_total",
        &[("reason", "auth")],
    )
    .unwrap_or(0.0);
    let replay1 = metric_value(
        &after,
        "callvault_srtp_auth_failures_total",
        &[("reason", "replay")],
    )
    .unwrap_or(0.0);
    assert_eq!(auth1 - auth0, 1.0, "{after}");
    assert_eq!(replay1 - replay0, 2.0, "{after}");
    drop(bd);
}

#[test]
fn savp_offer_without_a_supported_crypto_line_gets_488() {
    let server = Server::spawn(ServerConfig::new());
    let mut b = Ua::new("2002", "example.com", server.sip_addr());
    b.register();
    let mut a = Ua::new("2001", "example.com", server.sip_addr());
    let a_media = Rtp::bind();
    let offer = sdp(a_media.port, PCMU, "sendrecv").replace("RTP/AVP", "RTP/SAVP")
        + "a=crypto:1 AEAD_AES_256_GCM inline:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA\r\n";
    let inv = a.invite_request("sip:2002@example.com", &[], &offer);
    let (resp, _) = a.invite(&inv);
    assert_eq!(resp.status, 488, "{resp:?}");
    // Nothing reached B.
    assert!(b
        .wait_for(Duration::from_millis(300), |m| matches!(
            m,
            callvault::sip::message::SipMessage::Request(r) if r.method == Method::Invite
        ))
        .is_none());
}

/// A plain phone calls an SRTP-only phone: the callee's `488` to the plain offer is retried
/// once with `RTP/SAVP` and callvault's key (PROTOCOL.md section 7); audio flows both ways,
/// plain on A's leg and SRTP on B's.
#[test]
fn plain_phone_calls_srtp_only_phone_after_a_488_retry() {
    let server = Server::spawn(ServerConfig::new());
    let mut b = Ua::new("2002", "example.com", server.sip_addr());
    b.register();
    let mut a = Ua::new("2001", "example.com", server.sip_addr());
    let a_media = Rtp::bind();
    let b_media = Rtp::bind();
    let inv = a.invite_request(
        "sip:2002@example.com",
        &[],
        &sdp(a_media.port, PCMU, "sendrecv"),
    );
    a.send(&inv);
    // B refuses plain RTP.
    let first = b.expect_request(Method::Invite, None, T);
    assert_eq!(parse(&first.body).media(0).unwrap().proto, "RTP/AVP");
    b.respond(&first, 488, &[], b"");
    // The retry offers SRTP with callvault's keys.
    let binv = b.expect_request(Method::Invite, None, T);
    let offer = parse(&binv.body);
    assert_eq!(offer.media(0).unwrap().proto, "RTP/SAVP");
    let ours = offer.crypto(0);
    let line = ours
        .iter()
        .find(|l| l.suite == Suite::AesCm128HmacSha1_80)
        .expect("an AES_CM_128_HMAC_SHA1_80 line")
        .clone();
    let b_key = MasterKey::random();
    let answer =
        savp_sdp(b_media.port, &b_key).replace("a=crypto:1 ", &format!("a=crypto:{} ", line.tag));
    let bd = b.accept_invite(&binv, &answer);
    let (resp, ad) = a.finish_invite(&inv);
    assert_eq!(resp.status, 200, "{resp:?}");
    assert!(ad.is_some());
    let a_answer = parse(&resp.body);
    assert_eq!(
        a_answer.media(0).unwrap().proto,
        "RTP/AVP",
        "A's leg stays plain"
    );
    assert!(a_answer.crypto(0).is_empty());
    let a_sends_to = a_answer.connection_for(0).unwrap();
    let b_sends_to = offer.connection_for(0).unwrap();

    // A (plain) -> B (SRTP with callvault's key for B).
    let mut b_rx = SrtpContext::new(line.suite, &line.key);
    for i in 0..10u16 {
        a_media
            .sock
            .send_to(&rtp(i, 0xa1, &payload(u32::from(i))), a_sends_to)
            .unwrap();
        let mut got = recv_raw(&b_media, Duration::from_secs(2)).expect("B hears A");
        let n = b_rx.unprotect_rtp(&mut got).expect("authentic SRTP to B");
        assert_eq!(&got[12..n], &payload(u32::from(i))[..]);
    }
    // B (SRTP with its own key) -> A (plain).
    let mut b_tx = SrtpContext::new(Suite::AesCm128HmacSha1_80, &b_key);
    for i in 0..10u16 {
        let p = protect(&mut b_tx, &rtp(i, 0xb2, &payload(500 + u32::from(i))));
        b_media.sock.send_to(&p, b_sends_to).unwrap();
        let got = a_media.recv(Duration::from_secs(2)).expect("A hears B");
        assert_eq!(got.payload, payload(500 + u32::from(i)));
    }
    drop(bd);
}
