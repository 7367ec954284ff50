//! Interop to the letter (issue 15) against real processes on 127.0.0.1:
//!
//! - A record-routing Kamailio 5.6 in front of `callvault serve` (config written by the
//!   test; `kamailio -DD -E` in the foreground with its own pid file and runtime dir): phones
//!   A and B (tests/common/ua.rs) send everything to Kamailio, which logs each request it
//!   gets (`xlog`). B registers through it (Kamailio adds `Path`). A call with RTP both ways,
//!   INFO and MESSAGE both ways, the in-call storage flow (prompt, store session, ready note,
//!   play), BYE from either side, and an out-of-dialog ready note that reaches B through
//!   Kamailio by the Path. Every in-dialog request of the phones must show up in Kamailio's
//!   log from the phone's own port: the phones follow the route set callvault's responses
//!   gave them, so a 2xx without Record-Route would send them around the proxy.
//! - `prompt_method = "INFO"`: INFO only to a party that listed `Recv-Info: callvault`
//!   (RFC 6086 §4.2.1), MESSAGE to the other.
//!
//! A missing `kamailio` skips the Kamailio test with a SKIPPED line, unless
//! `CALLVAULT_REQUIRE_TOOLS=1` (scripts/test), which makes it a failure.

mod common;
#[path = "common/ua.rs"]
mod ua;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use callvault::sip::dialog::Dialog;
use callvault::sip::message::{HeaderAccess, Method, Request, Response};
use common::kamailio::Kamailio;
use common::{Server, ServerConfig};
use serde_json::Value;
use ua::{payload, sdp, sdp_audio, Call, Rtp, Ua, PCMU, T};

const STORE_REQUEST: &str = "application/vnd.callvault.store-request+json";
const PROMPT: &str = "application/vnd.callvault.prompt+json";
const READY: &str = "application/vnd.callvault.ready+json";
const TEST_CT: &str = "application/x-interop-test";

// ---------------------------------------------------------------------------------------------
// Kamailio

/// The proxy in front of callvault (tests/common/kamailio.rs) runs this config: initial
/// requests from the phones go to callvault (REGISTER gets `Path`, INVITE is record-routed);
/// requests with Route headers are loose-routed; a request from callvault without a Route
/// header is refused, so callvault must use the Path or the route set.
fn kamailio_config(port: u16, callvault: SocketAddr) -> String {
    let cv_port = callvault.port();
    format!(
        r#"#!KAMAILIO
debug=2
log_stderror=yes
children=1
auto_aliases=no
disable_tcp=yes
disable_sctp=yes
listen=udp:127.0.0.1:{port}
loadmodule "tm.so"
loadmodule "sl.so"
loadmodule "rr.so"
loadmodule "path.so"
loadmodule "pv.so"
loadmodule "maxfwd.so"
loadmodule "siputils.so"
loadmodule "textops.so"
loadmodule "xlog.so"
modparam("rr", "append_fromtag", 1)

request_route {{
    xlog("L_NOTICE", "CVTEST REQ $rm $ci $cs from $si:$sp\n");
    if (!mf_process_maxfwd_header("10")) {{ sl_send_reply("483", "Too Many Hops"); exit; }}
    if (is_method("CANCEL")) {{ if (t_check_trans()) {{ t_relay(); }} exit; }}
    if (has_totag()) {{
        if (loose_route()) {{ t_relay(); exit; }}
        if (is_method("ACK")) {{ if (t_check_trans()) {{ t_relay(); }} exit; }}
        xlog("L_NOTICE", "CVTEST NOROUTE $rm $ci from $si:$sp\n");
        sl_send_reply("404", "No route set");
        exit;
    }}
    # Initial request with a preloaded route (callvault using a Path): follow it, stay in.
    # (loose_route() answers -3 for these; loose_route_preloaded() is true for them.)
    if (loose_route_preloaded()) {{
        if (is_method("INVITE|SUBSCRIBE")) {{ record_route(); }}
        t_relay();
        exit;
    }}
    if ($si == "127.0.0.1" && $sp == {cv_port}) {{
        xlog("L_NOTICE", "CVTEST NOPATH $rm $ci\n");
        sl_send_reply("403", "callvault must route by Path");
        exit;
    }}
    if (is_method("REGISTER")) {{ add_path(); }}
    else if (is_method("INVITE|SUBSCRIBE")) {{ record_route(); }}
    $du = "sip:127.0.0.1:{cv_port}";
    t_relay();
}}
"#
    )
}

fn start_kamailio(callvault: SocketAddr) -> Option<Kamailio> {
    Kamailio::start(|port| kamailio_config(port, callvault))
}

/// True when `req` reached us from Kamailio (its Via is on top).
fn forwarded(k: &Kamailio, req: &Request) -> bool {
    req.top_via()
        .is_some_and(|v| v.host == k.addr.ip().to_string() && v.port == Some(k.addr.port()))
}

// ---------------------------------------------------------------------------------------------
// Phones' in-dialog requests, remembered for the Kamailio log check

/// (method, Call-ID, CSeq number, the phone's port) of every in-dialog request a phone sent.
#[derive(Default)]
struct Trace(Vec<(String, String, u32, u16)>);

impl Trace {
    fn note(&mut self, ua: &Ua, method: &str, call_id: &str, cseq: u32) {
        self.0.push((
            method.to_string(),
            call_id.to_string(),
            cseq,
            ua.addr.port(),
        ));
    }

    fn note_req(&mut self, ua: &Ua, req: &Request) {
        let cseq = req.cseq().unwrap();
        self.note(ua, req.method.as_str(), req.call_id().unwrap(), cseq.seq);
    }

    /// An in-dialog request from `ua` to its dialog's next hop; its final answer.
    fn in_dialog(
        &mut self,
        ua: &mut Ua,
        d: &mut Dialog,
        method: Method,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> Response {
        let req = ua.in_dialog_request(d, method, headers, body);
        self.note_req(ua, &req);
        let hop = ua.hop(d);
        ua.transact_to(&req, hop)
    }

    /// An INVITE from `ua` (to the proxy); a 2xx is ACKed along the new route set.
    fn invite(&mut self, ua: &mut Ua, inv: &Request) -> (Response, Option<Dialog>) {
        let (resp, d) = ua.invite(inv);
        if d.is_some() {
            self.note(ua, "ACK", inv.call_id().unwrap(), 1);
        }
        (resp, d)
    }

    /// Every noted request appears in Kamailio's log, received from the phone itself.
    fn assert_all_through(&self, k: &Kamailio) {
        let deadline = Instant::now() + Duration::from_secs(3);
        loop {
            let log = k.log();
            let missing: Vec<_> = self
                .0
                .iter()
                .filter(|(m, cid, cseq, port)| {
                    !log.contains(&format!(
                        "CVTEST REQ {m} {cid} {cseq} from 127.0.0.1:{port}"
                    ))
                })
                .collect();
            if missing.is_empty() {
                return;
            }
            if Instant::now() > deadline {
                panic!(
                    "requests from the phones that went around Kamailio: {missing:#?}\nlog:\n{log}"
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Helpers

fn server_with(extra: &str) -> Server {
    let mut cfg = ServerConfig::new();
    cfg.extra = extra.to_string();
    let mut s = Server::prepare(cfg);
    s.account_add("1001", "secret", "4321", "50MiB");
    s.account_add("1002", "secret", "4321", "50MiB");
    s.start();
    s
}

fn json(body: &[u8]) -> Value {
    serde_json::from_slice(body)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(body)))
}

/// The proxy's own Record-Route entry (what the phones' route sets must hold).
fn is_kamailio_route(k: &Kamailio, d: &Dialog) -> bool {
    d.route_set.len() == 1
        && d.route_set[0].uri.host == "127.0.0.1"
        && d.route_set[0].uri.port == Some(k.addr.port())
        && d.route_set[0].uri.param("lr").is_some()
}

/// `from` sends `method` in its dialog; callvault relays it to `to`, which must get it from
/// Kamailio and answers 200; `from` gets the 200.
#[allow(clippy::too_many_arguments)]
fn relayed(
    trace: &mut Trace,
    k: &Kamailio,
    from: &mut Ua,
    fd: &mut Dialog,
    to: &mut Ua,
    method: Method,
    body: &[u8],
) {
    let req = from.in_dialog_request(fd, method.clone(), &[("Content-Type", TEST_CT)], body);
    trace.note_req(from, &req);
    from.send_in_dialog(fd, &req);
    let got = to.expect_request(method.clone(), Some(TEST_CT), T);
    assert!(
        forwarded(k, &got),
        "{method} reached the far end around Kamailio"
    );
    assert_eq!(&got.body[..], body);
    to.respond(&got, 200, &[], b"");
    let branch = req.top_via().unwrap().branch().unwrap().to_string();
    let resp = from.final_response(&branch, T).expect("final answer");
    assert_eq!(resp.status, 200, "{method} relayed");
}

/// `n` packets of the test stream, 20 ms apart.
fn send_stream(rtp: &Rtp, to: SocketAddr, ssrc: u32, range: std::ops::Range<u32>) {
    for i in range {
        rtp.send(to, 0, i == 0, 1000 + i as u16, 160 * i, ssrc, &payload(i));
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The store request from `ua` in its call dialog (threshold: 2 packets).
fn ask_to_store(trace: &mut Trace, ua: &mut Ua, d: &mut Dialog) {
    let resp = trace.in_dialog(
        ua,
        d,
        Method::Message,
        &[("Content-Type", STORE_REQUEST)],
        br#"{"pin":"4321","threshold":{"bytes":320}}"#,
    );
    assert_eq!(resp.status, 200, "{}", String::from_utf8_lossy(&resp.body));
}

/// A store (sendonly) or play (recvonly) session INVITE from `ua` to `uri`.
fn session(
    trace: &mut Trace,
    k: &Kamailio,
    ua: &mut Ua,
    uri: &str,
    size: Option<&str>,
    rtp: &Rtp,
) -> (Dialog, SocketAddr) {
    let (dir, extra) = match size {
        Some(s) => ("sendonly", vec![("Callvault-Data-Size", s)]),
        None => ("recvonly", vec![]),
    };
    let inv = ua.invite_request(uri, &extra, &sdp(rtp.port, PCMU, dir));
    let (resp, d) = trace.invite(ua, &inv);
    assert_eq!(resp.status, 200, "{}", String::from_utf8_lossy(&resp.body));
    let d = d.unwrap();
    assert!(
        is_kamailio_route(k, &d),
        "session 200 without the proxy's Record-Route: {resp:?}"
    );
    (d, sdp_audio(&resp.body).0)
}

// ---------------------------------------------------------------------------------------------
// Tests

#[test]
fn kamailio_in_front_every_phone_request_passes_the_proxy() {
    let server = server_with("");
    let Some(k) = start_kamailio(server.sip_addr()) else {
        return;
    };
    let mut trace = Trace::default();

    // B registers through Kamailio (Path), A calls B through it.
    let mut c = Call::establish(k.addr, "1001", "1002");
    trace.note(&c.a, "ACK", &c.ad.id.call_id.clone(), 1);
    assert!(
        is_kamailio_route(&k, &c.ad),
        "callvault's 200 to A must carry the INVITE's Record-Route: {:?}",
        c.ad.route_set
    );
    assert!(
        is_kamailio_route(&k, &c.bd),
        "callvault's INVITE to B must go by the Path (Kamailio record-routes it): {:?}",
        c.bd.route_set
    );

    // RTP both ways through callvault's relay.
    for i in 0..5 {
        c.a_media
            .send(c.a_media_to, 0, i == 0, i as u16, 160 * i, 0xA, &payload(i));
        c.b_media.send(
            c.b_media_to,
            0,
            i == 0,
            i as u16,
            160 * i,
            0xB,
            &payload(i + 100),
        );
    }
    let at_b = c.b_media.recv(T).expect("RTP from A at B");
    let at_a = c.a_media.recv(T).expect("RTP from B at A");
    assert!((0..5).any(|i| at_b.payload == payload(i)), "A's audio at B");
    assert!(
        (100..105).any(|i| at_a.payload == payload(i)),
        "B's audio at A"
    );

    // INFO and MESSAGE both ways.
    for method in [Method::Info, Method::Message] {
        relayed(
            &mut trace,
            &k,
            &mut c.a,
            &mut c.ad,
            &mut c.b,
            method.clone(),
            b"a->b",
        );
        relayed(
            &mut trace, &k, &mut c.b, &mut c.bd, &mut c.a, method, b"b->a",
        );
    }

    // In-call storage: B asks, A is prompted in its dialog through the proxy.
    ask_to_store(&mut trace, &mut c.b, &mut c.bd);
    let p = c.a.expect_request(Method::Message, Some(PROMPT), T);
    assert!(forwarded(&k, &p), "prompt around Kamailio");
    assert_eq!(p.call_id(), Some(c.ad.id.call_id.as_str()));
    c.a.respond(&p, 200, &[], b"");
    let prompt = json(&p.body);
    let a_rtp = Rtp::bind();
    let (mut sd, store_to) = session(
        &mut trace,
        &k,
        &mut c.a,
        prompt["store_uri"].as_str().unwrap(),
        Some("1600"),
        &a_rtp,
    );
    send_stream(&a_rtp, store_to, 7, 0..10);
    let r = c.b.expect_request(Method::Message, Some(READY), T);
    assert!(forwarded(&k, &r), "ready note around Kamailio");
    assert_eq!(r.call_id(), Some(c.bd.id.call_id.as_str()), "in dialog");
    c.b.respond(&r, 200, &[], b"");
    let ready = json(&r.body);
    assert_eq!(
        trace
            .in_dialog(&mut c.a, &mut sd, Method::Bye, &[], b"")
            .status,
        200
    );
    // B plays what was stored; callvault ends the play session through the proxy.
    let b_rtp = Rtp::bind();
    let (pd, _) = session(
        &mut trace,
        &k,
        &mut c.b,
        ready["play_uri"].as_str().unwrap(),
        None,
        &b_rtp,
    );
    for i in 0..10 {
        let pkt = b_rtp.recv(T).unwrap_or_else(|| panic!("played packet {i}"));
        assert_eq!(pkt.payload, payload(i));
    }
    let bye = c.b.expect_request(Method::Bye, None, T);
    assert_eq!(bye.call_id(), Some(pd.id.call_id.as_str()));
    assert!(forwarded(&k, &bye), "play session BYE around Kamailio");
    c.b.respond(&bye, 200, &[], b"");

    // A second store; B hangs up the call first, so the ready note goes out of dialog to
    // B's registration, through Kamailio by the Path.
    ask_to_store(&mut trace, &mut c.b, &mut c.bd);
    let p = c.a.expect_request(Method::Message, Some(PROMPT), T);
    c.a.respond(&p, 200, &[], b"");
    let (mut sd, store_to) = session(
        &mut trace,
        &k,
        &mut c.a,
        json(&p.body)["store_uri"].as_str().unwrap(),
        Some("16000"),
        &a_rtp,
    );
    let resp = trace.in_dialog(&mut c.b, &mut c.bd, Method::Bye, &[], b"");
    assert_eq!(resp.status, 200);
    let bye = c.a.expect_request(Method::Bye, None, T);
    assert!(forwarded(&k, &bye), "BYE to A around Kamailio");
    assert_eq!(bye.call_id(), Some(c.ad.id.call_id.as_str()));
    c.a.respond(&bye, 200, &[], b"");
    send_stream(&a_rtp, store_to, 8, 0..3);
    let r = c.b.expect_request(Method::Message, Some(READY), T);
    assert!(r.to_tag().is_none(), "out of dialog");
    assert!(
        forwarded(&k, &r),
        "out-of-dialog ready note not sent by the Path: {r:?}"
    );
    assert!(!r.headers.has("Route"), "Kamailio consumed its Route");
    c.b.respond(&r, 200, &[], b"");
    assert_eq!(
        trace
            .in_dialog(&mut c.a, &mut sd, Method::Bye, &[], b"")
            .status,
        200
    );
    drop(c);

    // Another call, hung up by A this time.
    let mut c = Call::establish(k.addr, "1001", "1002");
    trace.note(&c.a, "ACK", &c.ad.id.call_id.clone(), 1);
    let resp = trace.in_dialog(&mut c.a, &mut c.ad, Method::Bye, &[], b"");
    assert_eq!(resp.status, 200);
    let bye = c.b.expect_request(Method::Bye, None, T);
    assert!(forwarded(&k, &bye), "BYE to B around Kamailio");
    c.b.respond(&bye, 200, &[], b"");

    trace.assert_all_through(&k);
    let log = k.log();
    assert!(
        !log.contains("CVTEST NOPATH"),
        "callvault ignored a Path:\n{log}"
    );
    assert!(
        !log.contains("CVTEST NOROUTE"),
        "in-dialog request without Route:\n{log}"
    );
}

#[test]
fn prompt_method_info_only_where_recv_info_lists_callvault() {
    let server = server_with("[store]\nprompt_method = \"INFO\"");
    // A lists no package (linphone 5.1 style); B lists callvault in its 200.
    let mut c = Call::establish_with(
        server.sip_addr(),
        "1001",
        "1002",
        &[],
        &[("Recv-Info", "callvault")],
    );
    let mut trace = Trace::default();

    // B asks: A's prompt comes as MESSAGE, B's ready note as INFO of the package.
    ask_to_store(&mut trace, &mut c.b, &mut c.bd);
    assert!(
        c.a.wait_request(Method::Info, None, Duration::from_millis(300))
            .is_none(),
        "INFO to a party that did not list Recv-Info: callvault"
    );
    let p = c.a.expect_request(Method::Message, Some(PROMPT), T);
    assert!(!p.headers.has("Info-Package"));
    c.a.respond(&p, 200, &[], b"");
    let rtp = Rtp::bind();
    let inv = c.a.invite_request(
        json(&p.body)["store_uri"].as_str().unwrap(),
        &[("Callvault-Data-Size", "1600")],
        &sdp(rtp.port, PCMU, "sendonly"),
    );
    let (resp, sd) = c.a.invite(&inv);
    assert_eq!(resp.status, 200);
    send_stream(&rtp, sdp_audio(&resp.body).0, 3, 0..3);
    let r = c.b.expect_request(Method::Info, Some(READY), T);
    assert_eq!(r.headers.get("Info-Package"), Some("callvault"));
    c.b.respond(&r, 200, &[], b"");
    assert_eq!(c.a.bye(&mut sd.unwrap()).status, 200);

    // A asks: B's prompt comes as INFO, A's ready note as MESSAGE.
    ask_to_store(&mut trace, &mut c.a, &mut c.ad);
    let p = c.b.expect_request(Method::Info, Some(PROMPT), T);
    assert_eq!(p.headers.get("Info-Package"), Some("callvault"));
    c.b.respond(&p, 200, &[], b"");
    let inv = c.b.invite_request(
        json(&p.body)["store_uri"].as_str().unwrap(),
        &[("Callvault-Data-Size", "1600")],
        &sdp(rtp.port, PCMU, "sendonly"),
    );
    let (resp, sd) = c.b.invite(&inv);
    assert_eq!(resp.status, 200);
    send_stream(&rtp, sdp_audio(&resp.body).0, 4, 0..3);
    let r = c.a.expect_request(Method::Message, Some(READY), T);
    assert!(!r.headers.has("Info-Package"));
    assert_eq!(r.call_id(), Some(c.ad.id.call_id.as_str()), "in dialog");
    c.a.respond(&r, 200, &[], b"");
    assert_eq!(c.b.bye(&mut sd.unwrap()).status, 200);

    // The fallback is logged once for A's leg, not per notification.
    let log = server.log();
    assert_eq!(
        log.matches("did not list Recv-Info: callvault").count(),
        1,
        "{log}"
    );
}
