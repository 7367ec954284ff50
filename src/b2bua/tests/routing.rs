//! Proxies in the path (issue 15): Record-Route copied into dialog-creating responses
//! (RFC 3261 §12.1.1), route sets on both legs with one and two proxies (§12.1.2,
//! §12.2.1.1), strict routers, Path (RFC 3327) and INFO only where Recv-Info lists our
//! package (RFC 6086 §4.2.1). Same `Net` harness as the parent module: everything the engine
//! sends is re-parsed from its wire bytes and checked per destination address.

use super::*;

/// Proxies on the caller's side: P1 next to A, P2 next to callvault (the INVITE's source).
const PA1: &str = "127.0.0.11:5071";
const PA2: &str = "127.0.0.12:5072";
/// Proxies on the callee's side: Q1 next to callvault, Q2 next to B.
const QB1: &str = "127.0.0.21:5081";
const QB2: &str = "127.0.0.22:5082";

/// A's INVITE as it reaches callvault through `proxies` (nearest A first): each proxy added
/// its Via and, when `record_route`, its Record-Route on top (`;lr` unless `strict`).
fn proxied_invite(call_id: &str, proxies: &[&str], strict: bool, recv_info: bool) -> Request {
    let mut inv = a_invite(call_id, "1002", Some(&sdp(A_MEDIA, "sendrecv", 1)));
    for p in proxies {
        inv.headers.push_front("Via", via(p).to_string());
        let lr = if strict { "" } else { ";lr" };
        inv.headers
            .push_front("Record-Route", format!("<sip:{p}{lr};ftag={A_TAG}>"));
    }
    if recv_info {
        inv.headers.push("Recv-Info", "callvault");
    }
    inv
}

fn rr_values(m: &impl HeaderAccess) -> Vec<String> {
    m.headers()
        .list("Record-Route")
        .unwrap()
        .into_iter()
        .map(str::to_string)
        .collect()
}

fn routes(r: &Request) -> Vec<String> {
    r.headers
        .list("Route")
        .unwrap()
        .into_iter()
        .map(str::to_string)
        .collect()
}

/// B's answer with B-side proxies' Record-Route (as B received it in the INVITE: the proxy
/// next to B on top) and optionally `Recv-Info: callvault`.
fn b_answer_via(
    b_inv: &Request,
    status: u16,
    rr: &[&str],
    recv_info: bool,
    body: Option<&str>,
) -> Response {
    let mut r = b_answer(b_inv, status, body);
    for v in rr {
        r.headers.push("Record-Route", *v);
    }
    if recv_info {
        r.headers.push("Recv-Info", "callvault");
    }
    r
}

/// A call up through `a_proxies` on leg A and a B answering with `b_rr`; returns the A-side
/// INVITE, A's dialog (built from what it received), B's INVITE and the 200 A got.
struct Routed {
    key: CallKey,
    a_dialog: Dialog,
    b_invite: Request,
    b_dialog: Dialog,
    ok: Response,
    ringing: Response,
}

fn routed_call(net: &mut Net, call_id: &str, a_proxies: &[&str], strict_a: bool) -> Routed {
    let inv = proxied_invite(call_id, a_proxies, strict_a, false);
    let src = peer(a_proxies.last().copied().unwrap_or(A));
    let out = net.req(src, &inv);
    let b_inv = out.request(b(), Method::Invite);
    let out = net.resp(b(), &b_answer_via(&b_inv, 180, &[], false, None));
    let ringing = out.response(src, 180);
    let out = net.resp(
        b(),
        &b_answer_via(&b_inv, 200, &[], false, Some(&sdp(B_MEDIA, "sendrecv", 1))),
    );
    let ok = out.response(src, 200);
    let key = net
        .events()
        .iter()
        .find_map(|e| match e {
            EngineEvent::CallAnswered(k) => Some(*k),
            _ => None,
        })
        .expect("CallAnswered");
    let a_dialog = Dialog::uac(&inv, &ok).unwrap();
    let b_dialog = Dialog::uas(&b_inv, B_TAG, &b_contact()).unwrap();
    Routed {
        key,
        a_dialog,
        b_invite: b_inv,
        b_dialog,
        ok,
        ringing,
    }
}

#[test]
fn record_route_of_the_invite_is_in_the_180_and_200_in_order() {
    let mut net = Net::new();
    let r = routed_call(&mut net, "rr-order@a", &[PA1, PA2], false);
    // The INVITE arrived with PA2's entry on top (PA2 added it last).
    let want = [
        format!("<sip:{PA2};lr;ftag={A_TAG}>"),
        format!("<sip:{PA1};lr;ftag={A_TAG}>"),
    ];
    assert_eq!(rr_values(&r.ringing), want, "180");
    assert_eq!(rr_values(&r.ok), want, "200");
    // B's INVITE is a new request of ours: A's Record-Route does not leak onto leg B.
    assert!(rr_values(&r.b_invite).is_empty());
    assert!(routes(&r.b_invite).is_empty());
    // A, as UAC, reverses it: its requests go to PA1 first, then PA2, then callvault.
    let hosts: Vec<String> = r
        .a_dialog
        .route_set
        .iter()
        .map(|n| n.uri.to_string())
        .collect();
    assert_eq!(
        hosts,
        [
            format!("sip:{PA1};lr;ftag={A_TAG}"),
            format!("sip:{PA2};lr;ftag={A_TAG}")
        ]
    );
    assert_eq!(r.a_dialog.next_hop().to_string(), hosts[0]);
}

#[test]
fn store_and_play_session_200s_carry_the_record_route() {
    let mut net = Net::new();
    let mut inv = session_invite("st_0123456789abcdef", "rr-session@a");
    inv.headers
        .push_front("Record-Route", format!("<sip:{PA2};lr>, <sip:{PA1};lr>"));
    let src = peer(PA2);
    net.req(src, &inv);
    let key = net
        .events()
        .iter()
        .find_map(|e| match e {
            EngineEvent::SessionOffer { session, .. } => Some(*session),
            _ => None,
        })
        .expect("SessionOffer");
    let now = net.now;
    assert!(net
        .eng
        .accept_session(key, Bytes::from(sdp(B_MEDIA, "recvonly", 1)), now));
    let out = net.drain();
    let ok = out.response(src, 200);
    assert_eq!(
        rr_values(&ok),
        [format!("<sip:{PA2};lr>"), format!("<sip:{PA1};lr>")]
    );
    // Our BYE follows the session's route set, in order, to its first hop.
    let now = net.now;
    net.eng
        .end_session(key, Some(crate::error_code::ErrorCode::Shutdown), now);
    let bye = net.drain().request(peer(PA2), Method::Bye);
    assert_eq!(
        routes(&bye),
        [format!("<sip:{PA2};lr>"), format!("<sip:{PA1};lr>")]
    );
}

#[test]
fn leg_a_requests_follow_the_route_set_with_one_and_two_proxies() {
    for proxies in [&[PA2][..], &[PA1, PA2][..]] {
        let mut net = Net::new();
        let mut r = routed_call(&mut net, "rr-a@a", proxies, false);
        let first = peer(proxies.last().unwrap());
        // A's ACK and requests come through the proxies (from the nearest one).
        let out = net.req(first, &r.a_dialog.ack_for(A_CSEQ, via(A)));
        out.request(b(), Method::Ack);
        // Our own request on leg A (a prompt) uses the route set in the order received, to
        // the nearest proxy.
        let now = net.now;
        net.eng.send_in_dialog(
            r.key,
            Side::A,
            Method::Message,
            &[("Content-Type", "text/plain")],
            Bytes::from_static(b"hi"),
            now,
        );
        let out = net.drain();
        let m = out.request(first, Method::Message);
        let want: Vec<String> = proxies
            .iter()
            .rev()
            .map(|p| format!("<sip:{p};lr;ftag={A_TAG}>"))
            .collect();
        assert_eq!(routes(&m), want, "{proxies:?}");
        assert_eq!(m.uri, a_contact().uri.to_string());
        assert!(out.requests(a()).is_empty(), "not around the proxies");
        // B's BYE is relayed onto leg A the same way.
        let bye = r.b_dialog.new_request(Method::Bye, &b_contact(), via(B));
        let out = net.req(b(), &bye);
        let a_bye = out.request(first, Method::Bye);
        assert_eq!(routes(&a_bye), want);
        r.a_dialog.on_request(&a_bye).unwrap();
    }
}

#[test]
fn leg_b_route_set_is_the_2xx_record_route_reversed_with_one_and_two_proxies() {
    for rr in [
        vec![format!("<sip:{QB1};lr>")],
        vec![format!("<sip:{QB2};lr>"), format!("<sip:{QB1};lr;r2=on>")],
    ] {
        let mut net = Net::new();
        let inv = a_invite("rr-b@a", "1002", Some(&sdp(A_MEDIA, "sendrecv", 1)));
        let out = net.req(a(), &inv);
        let b_inv = out.request(b(), Method::Invite);
        let rr_refs: Vec<&str> = rr.iter().map(String::as_str).collect();
        let ok_b = b_answer_via(
            &b_inv,
            200,
            &rr_refs,
            false,
            Some(&sdp(B_MEDIA, "sendrecv", 1)),
        );
        let out = net.resp(b(), &ok_b);
        let ok = out.response(a(), 200);
        // Leg B's Record-Route is leg B's business: A's 200 has none (A sent none).
        assert!(rr_values(&ok).is_empty());
        let mut a_dialog = Dialog::uac(&inv, &ok).unwrap();
        // The ACK for B's 2xx goes to QB1 (the proxy next to us) with the reversed set.
        let out = net.req(a(), &a_dialog.ack_for(A_CSEQ, via(A)));
        let ack = out.request(peer(QB1), Method::Ack);
        let reversed: Vec<String> = rr.iter().rev().cloned().collect();
        assert_eq!(routes(&ack), reversed);
        assert_eq!(ack.uri, b_contact().uri.to_string());
        assert!(out.requests(b()).is_empty(), "not straight to B");
        // A's BYE reaches B through them as well.
        let bye = a_dialog.new_request(Method::Bye, &a_contact(), via(A));
        let out = net.req(a(), &bye);
        let b_bye = out.request(peer(QB1), Method::Bye);
        assert_eq!(routes(&b_bye), reversed);
    }
}

#[test]
fn strict_router_on_either_leg_becomes_the_request_uri() {
    // Leg B: the proxy next to us does not know `lr` (RFC 2543).
    let mut net = Net::new();
    let inv = a_invite("strict-b@a", "1002", Some(&sdp(A_MEDIA, "sendrecv", 1)));
    let out = net.req(a(), &inv);
    let b_inv = out.request(b(), Method::Invite);
    // Its URI names a host; `maddr` says where it is (§19.1.1).
    let strict = "<sip:old-proxy.example:5081;maddr=127.0.0.21>".to_string();
    let ok_b = b_answer_via(
        &b_inv,
        200,
        &[&format!("<sip:{QB2};lr>"), &strict],
        false,
        Some(&sdp(B_MEDIA, "sendrecv", 1)),
    );
    let ok = net.resp(b(), &ok_b).response(a(), 200);
    let a_dialog = Dialog::uac(&inv, &ok).unwrap();
    let out = net.req(a(), &a_dialog.ack_for(A_CSEQ, via(A)));
    let ack = out.request(peer(QB1), Method::Ack);
    // §12.2.1.1: Request-URI = the strict router; Route = the rest, then the remote target.
    assert_eq!(ack.uri, "sip:old-proxy.example:5081;maddr=127.0.0.21");
    assert_eq!(
        routes(&ack),
        [format!("<sip:{QB2};lr>"), format!("<{}>", b_contact().uri)]
    );

    // Leg A: a strict router in front of the caller.
    let mut net = Net::new();
    let r = routed_call(&mut net, "strict-a@a", &[PA2], true);
    let now = net.now;
    net.eng.send_in_dialog(
        r.key,
        Side::A,
        Method::Message,
        &[("Content-Type", "text/plain")],
        Bytes::from_static(b"hi"),
        now,
    );
    let m = net.drain().request(peer(PA2), Method::Message);
    assert_eq!(m.uri, format!("sip:{PA2};ftag={A_TAG}"));
    assert_eq!(routes(&m), [format!("<{}>", a_contact().uri)]);
}

#[test]
fn lr_is_read_as_a_uri_parameter_whatever_its_value() {
    let mut net = Net::new();
    let inv = a_invite("lr-on@a", "1002", Some(&sdp(A_MEDIA, "sendrecv", 1)));
    let out = net.req(a(), &inv);
    let b_inv = out.request(b(), Method::Invite);
    // Kamailio's `enable_full_lr` writes `lr=on`; a name-addr parameter `lr` is not the URI's.
    let ok_b = b_answer_via(
        &b_inv,
        200,
        &[&format!("<sip:{QB1};LR=on>")],
        false,
        Some(&sdp(B_MEDIA, "sendrecv", 1)),
    );
    let ok = net.resp(b(), &ok_b).response(a(), 200);
    let a_dialog = Dialog::uac(&inv, &ok).unwrap();
    let ack = net
        .req(a(), &a_dialog.ack_for(A_CSEQ, via(A)))
        .request(peer(QB1), Method::Ack);
    assert_eq!(ack.uri, b_contact().uri.to_string(), "loose: lr=on");

    let mut net = Net::new();
    let out = net.req(a(), &inv);
    let b_inv = out.request(b(), Method::Invite);
    let ok_b = b_answer_via(
        &b_inv,
        200,
        &[&format!("<sip:{QB1}>;lr")],
        false,
        Some(&sdp(B_MEDIA, "sendrecv", 1)),
    );
    let ok = net.resp(b(), &ok_b).response(a(), 200);
    let a_dialog = Dialog::uac(&inv, &ok).unwrap();
    let ack = net
        .req(a(), &a_dialog.ack_for(A_CSEQ, via(A)))
        .request(peer(QB1), Method::Ack);
    assert_eq!(ack.uri, format!("sip:{QB1}"), "strict: lr outside the URI");
}

/// REGISTER of 1003 through an edge proxy at `edge` that added `Path` (trusted loopback, so
/// no challenge); the 200.
fn register_via_path(net: &mut Net, edge: &str, supported: bool) -> Response {
    let mut r = Request::new(Method::Register, "sip:example.com");
    r.headers.push("Via", via(edge).to_string());
    r.headers.push("Via", via("127.0.0.40:5090").to_string());
    r.headers.push("Max-Forwards", "69");
    r.headers.push("From", "<sip:1003@example.com>;tag=reg-p");
    r.headers.push("To", "<sip:1003@example.com>");
    r.headers.push("Call-ID", "reg-path@phone");
    r.headers.push("CSeq", "1 REGISTER");
    r.headers.push("Contact", "<sip:1003@127.0.0.40:5090>");
    r.headers.push("Expires", "600");
    if supported {
        r.headers.push("Supported", "path, outbound");
    }
    r.headers.push(
        "Path",
        format!("<sip:{edge};lr;received=sip:127.0.0.40:5090>"),
    );
    net.req(peer(edge), &r).response(peer(edge), 200)
}

#[test]
fn path_is_answered_and_used_as_preloaded_route_for_calls_and_notes() {
    const EDGE: &str = "127.0.0.30:5075";
    let mut net = Net::new();
    let ok = register_via_path(&mut net, EDGE, true);
    assert_eq!(
        ok.headers.get_all("Path").collect::<Vec<_>>(),
        [format!("<sip:{EDGE};lr;received=sip:127.0.0.40:5090>")]
    );
    assert!(ok.headers.list("Supported").unwrap().contains(&"path"));

    // A call to 1003: Request-URI the Contact, Route the Path, sent to the edge proxy.
    let inv = a_invite("path-call@a", "1003", Some(&sdp(A_MEDIA, "sendrecv", 1)));
    let out = net.req(a(), &inv);
    let b_inv = out.request(peer(EDGE), Method::Invite);
    assert_eq!(b_inv.uri, "sip:1003@127.0.0.40:5090");
    assert_eq!(
        routes(&b_inv),
        [format!("<sip:{EDGE};lr;received=sip:127.0.0.40:5090>")]
    );

    // Out-of-dialog notes (ready notes, share offers) take the same way; INFO outside a
    // dialog is never sent: it goes as MESSAGE with the same body and type.
    let now = net.now;
    let ids = net.eng.send_to_user(
        "1003",
        Method::Info,
        &[
            ("Content-Type", "application/vnd.callvault.ready+json"),
            ("Info-Package", "callvault"),
        ],
        Bytes::from_static(b"{}"),
        now,
    );
    assert_eq!(ids.len(), 1);
    let m = net.drain().request(peer(EDGE), Method::Message);
    assert_eq!(m.uri, "sip:1003@127.0.0.40:5090");
    assert_eq!(routes(&m).len(), 1);
    assert!(!m.headers.has("Info-Package"));
    assert_eq!(
        m.content_type().as_deref(),
        Some("application/vnd.callvault.ready+json")
    );

    // Without Supported: path the Path is still used, but not echoed.
    let mut net = Net::new();
    let ok = register_via_path(&mut net, EDGE, false);
    assert!(!ok.headers.has("Path"));
    let now = net.now;
    net.eng
        .send_to_user("1003", Method::Message, &[], Bytes::new(), now);
    net.drain().request(peer(EDGE), Method::Message);
}

/// One callvault INFO of the package, as the store service asks for it.
fn own_info(net: &mut Net, key: CallKey, side: Side, package: &str) {
    let now = net.now;
    net.eng.send_in_dialog(
        key,
        side,
        Method::Info,
        &[
            ("Content-Type", "application/vnd.callvault.prompt+json"),
            ("Info-Package", package),
        ],
        Bytes::from_static(b"{\"store_id\":\"st_1\"}"),
        now,
    );
}

#[test]
fn info_only_to_a_leg_that_listed_recv_info_callvault() {
    let mut net = Net::new();
    // A lists nothing; B lists `callvault` (with another package) in its 200.
    let inv = proxied_invite("recv-info@a", &[], false, false);
    let out = net.req(a(), &inv);
    let b_inv = out.request(b(), Method::Invite);
    assert_eq!(b_inv.headers.get("Recv-Info"), Some("callvault"));
    let mut ok_b = b_answer_via(&b_inv, 200, &[], false, Some(&sdp(B_MEDIA, "sendrecv", 1)));
    ok_b.headers.push("Recv-Info", "foo, CallVault;x=1");
    let ok = net.resp(b(), &ok_b).response(a(), 200);
    let key = 1;
    let mut a_dialog = Dialog::uac(&inv, &ok).unwrap();
    net.req(a(), &a_dialog.ack_for(A_CSEQ, via(A)));

    own_info(&mut net, key, Side::A, "callvault");
    let out = net.drain();
    assert!(out.requests(a()).iter().all(|r| r.method != Method::Info));
    let m = out.request(a(), Method::Message);
    assert!(!m.headers.has("Info-Package"));
    assert_eq!(
        m.content_type().as_deref(),
        Some("application/vnd.callvault.prompt+json")
    );
    assert_eq!(&m.body[..], b"{\"store_id\":\"st_1\"}");

    own_info(&mut net, key, Side::B, "callvault");
    let i = net.drain().request(b(), Method::Info);
    assert_eq!(i.headers.get("Info-Package"), Some("callvault"));

    // Other packages (relayed DTMF) are not ours to redirect.
    own_info(&mut net, key, Side::A, "dtmf");
    net.drain().request(a(), Method::Info);

    // A re-INVITE listing the package makes INFO welcome on leg A from then on.
    let mut reinv = a_dialog.new_request(Method::Invite, &a_contact(), via(A));
    reinv.headers.push("Recv-Info", "callvault");
    let out = net.req(a(), &reinv);
    let b_reinv = out.request(b(), Method::Invite);
    net.resp(
        b(),
        &answer(
            &b_reinv,
            200,
            &[("Contact", "<sip:1002@127.0.0.1:5070>")],
            b"",
        ),
    );
    own_info(&mut net, key, Side::A, "callvault");
    net.drain().request(a(), Method::Info);
    // ... and an empty Recv-Info withdraws it.
    let mut reinv = a_dialog.new_request(Method::Update, &a_contact(), via(A));
    reinv.headers.push("Recv-Info", "");
    net.req(a(), &reinv);
    own_info(&mut net, key, Side::A, "callvault");
    net.drain().request(a(), Method::Message);
}

#[test]
fn a_route_naming_callvault_is_consumed_not_relayed() {
    // A phone using callvault as its outbound proxy preloads `Route: <callvault;lr>` (§8.1.2);
    // in-dialog, a loose router in front may leave its own entry to us. We are the endpoint
    // of both: the request is ours and no Route reaches the other leg (§16.12 from the UAS).
    let mut net = Net::new();
    let mut inv = a_invite("route-to-us@a", "1002", Some(&sdp(A_MEDIA, "sendrecv", 1)));
    inv.headers.push("Route", "<sip:127.0.0.1:5060;lr>");
    let out = net.req(a(), &inv);
    let b_inv = out.request(b(), Method::Invite);
    assert!(routes(&b_inv).is_empty());
    let ok = net
        .resp(
            b(),
            &b_answer(&b_inv, 200, Some(&sdp(B_MEDIA, "sendrecv", 1))),
        )
        .response(a(), 200);
    assert!(rr_values(&ok).is_empty(), "no Record-Route in, none out");
    let mut a_dialog = Dialog::uac(&inv, &ok).unwrap();
    net.req(a(), &a_dialog.ack_for(A_CSEQ, via(A)));
    let mut info = a_dialog.new_request(Method::Info, &a_contact(), via(A));
    info.headers.push("Route", "<sip:127.0.0.1:5060;lr>");
    info.headers.set("Content-Type", "text/plain");
    info.body = Bytes::from_static(b"x");
    let out = net.req(a(), &info);
    let relayed = out.request(b(), Method::Info);
    assert!(routes(&relayed).is_empty());
    assert_eq!(relayed.uri, b_contact().uri.to_string());
}
