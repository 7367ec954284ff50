//! The parser decision table (docs/ARCHITECTURE.md, "SIP parsing"): tricky messages, most
//! adapted from the RFC 4475 torture tests, each with the outcome callvault commits to: `Ok`
//! with checks of the fields that make the case tricky, or a specific [`ParseError`] and what
//! [`error_response_for`] answers (a 400/505 whose reason names the fault, or nothing).
//!
//! Every `Ok` case is also serialised and re-parsed, and must come back the same.

use callvault::sip::message::{
    error_response_for, frame_stream, parse, Frame, HeaderAccess, Method, ParseError, Request,
    Response, SipMessage, MAX_BODY_BYTES, MAX_HEADER_BYTES,
};

/// What `error_response_for` must return for a rejected message.
#[derive(Debug)]
enum Reply {
    /// Dropped: no response can be built (a response, an ACK, no Via, no request line).
    Drop,
    /// Answered with this status; the reason phrase contains the text.
    Status(u16, &'static str),
}

enum Expect {
    Ok(fn(&SipMessage)),
    Err(ParseError, Reply),
}

struct Case {
    name: &'static str,
    msg: Vec<u8>,
    expect: Expect,
}

/// Test text to wire bytes: `\n` becomes CRLF (in the body too), `#LEN#` in the header section
/// becomes the body length, `<BEL>`/`<NUL>`/`<DEL>` become those control bytes.
fn sip(text: &str) -> Vec<u8> {
    let text = text
        .replace("<BEL>", "\x07")
        .replace("<NUL>", "\0")
        .replace("<DEL>", "\x7f");
    let (head, body) = text.split_once("\n\n").unwrap_or((&text, ""));
    let body = body.replace('\n', "\r\n");
    let head = head
        .replace('\n', "\r\n")
        .replace("#LEN#", &body.len().to_string());
    format!("{head}\r\n\r\n{body}").into_bytes()
}

fn req(m: &SipMessage) -> &Request {
    match m {
        SipMessage::Request(r) => r,
        SipMessage::Response(_) => panic!("expected a request"),
    }
}

fn resp(m: &SipMessage) -> &Response {
    match m {
        SipMessage::Response(r) => r,
        SipMessage::Request(_) => panic!("expected a response"),
    }
}

const SDP: &str = "v=0
o=mhandley 29739 7272939 IN IP4 192.0.2.3
s=-
c=IN IP4 192.0.2.4
t=0 0
m=audio 49217 RTP/AVP 0 12
m=video 3227 RTP/AVP 31
a=rtpmap:31 LPC
";

/// A plain, valid OPTIONS to derive small variations from.
const BASE: &str = "OPTIONS sip:user@example.com SIP/2.0
Via: SIP/2.0/UDP host.example.com;branch=z9hG4bKbase
Max-Forwards: 70
To: <sip:user@example.com>
From: <sip:caller@example.net>;tag=1
Call-ID: base.1@example.net
CSeq: 1 OPTIONS
Content-Length: 0

";

fn base_with(from: &str, to: &str) -> Vec<u8> {
    assert!(BASE.contains(from), "{from}");
    sip(&BASE.replace(from, to))
}

fn wsinv() -> Vec<u8> {
    sip(&format!(
        r#"INVITE sip:vivekg@chair-dnrc.example.com;unknownparam SIP/2.0
TO :
 sip:vivekg@chair-dnrc.example.com ;   tag    = 1918181833n
from   : "J Rosenberg \\\""       <sip:jdrosen@example.com>
  ;
  tag = 98asjd8
MaX-fOrWaRdS: 0068
Call-ID: wsinv.ndaksdj@192.0.2.1
Content-Length   : #LEN#
cseq: 0009
  INVITE
Via  : SIP  /   2.0
 /UDP
    192.0.2.2;branch=390skdjuw
s :
NewFangledHeader:   newfangled value
 continued newfangled value
UnknownHeaderWithUnusualValue: ;;,,;;,;
Content-Type: application/sdp
Route:
 <sip:services.example.com;lr;unknownwith=value;unknown-no-value>
v:  SIP  / 2.0  / TCP     spindle.example.com   ;
  branch  =   z9hG4bK9ikj8  ,
 SIP  /    2.0   / UDP  192.168.255.111   ; branch=
 z9hG4bK30239
m:"Quoted string \"\"" <sip:jdrosen@example.com> ; newparam =
      newvalue ;
  secondparam ; q = 0.33

{SDP}"#
    ))
}

fn longreq() -> Vec<u8> {
    let extreme = "extreme".repeat(60);
    let caller = "amazinglylongcallername".repeat(20);
    let tag = "12982982".repeat(40);
    let long_name = format!("Unknown-{}", "LongLong".repeat(100));
    let branch = format!("z9hG4bK{}", "longbranch".repeat(50));
    let mut text = format!(
        "INVITE sip:user@example.com SIP/2.0
To: \"I have a user name of {extreme} proportion\"<sip:user@example.com:6000;unknownparam1=verylonglonglong{ll};longparamnamenamenamename{ll}=shortvalue>
F: sip:{caller}@example.net;tag={tag};unknownheaderparamname{ll}=unknowheaderparamvalue{ll};unknownValuelessparamname{ll}
Call-ID: longreq.one{rr}
CSeq: 3882340 INVITE
{long_name}: unknown-{ll}-value;unknown-{ll}-param-name=unknown-{ll}-param-value;unknown-{ll}-valueless
Via: SIP/2.0/TCP sip33.example.com;branch={branch}
",
        ll = "longlong".repeat(30),
        rr = "reallyreally".repeat(40),
    );
    for i in 0..40 {
        text.push_str(&format!(
            "v: SIP/2.0/UDP sip{i}.example.com;branch=z9hG4bK{i}\n"
        ));
    }
    text.push_str(&format!(
        "Max-Forwards: 70\nContact: <sip:{caller}@host5.example.net>\nContent-Type: application/sdp\nl: #LEN#\n\n{SDP}"
    ));
    sip(&text)
}

fn mpart01() -> Vec<u8> {
    let mut body = b"--7a9cbec02ceef655\r\nContent-Type: text/plain\r\nContent-Transfer-Encoding: binary\r\n\r\nHello\r\n--7a9cbec02ceef655\r\nContent-Type: application/octet-stream\r\nContent-Transfer-Encoding: binary\r\n\r\n".to_vec();
    body.extend_from_slice(&[
        0x30, 0x82, 0x01, 0x52, 0x06, 0x09, 0x00, 0xff, 0xfe, b'\r', b'\n', b'\r', b'\n', 0x80,
        0x0d,
    ]);
    body.extend_from_slice(b"\r\n--7a9cbec02ceef655--\r\n");
    let head = "MESSAGE sip:kumiko@example.org SIP/2.0
Via: SIP/2.0/UDP 127.0.0.1:5070;branch=z9hG4bK-d87543-4dade06d0bdb11ee-1--d87543-;rport
Max-Forwards: 70
Route: <sip:127.0.0.1:5080>
Identity: r5mwreLuyDRYBi/0TiPwEsY3rEVsk/G2WxhgTV1PF7hHuLIK0YWVKZhKv9Mj8UeXqkMVbnVq37CD+813gvYjcBUaZngQmXc9WNZSDNGCzA+fWl9MEUHWIZo1CeJebdY/XlgKeTa0Olvq0rt70Q5jiSfbqMJmQFteeivUhkMWYUA=
Contact: <sip:fluffy@127.0.0.1:5070>
To: <sip:kumiko@example.org>
From: <sip:fluffy@example.com>;tag=2fb0dcc9
Call-ID: 3d9485ad0c49859b@Zmx1ZmZ5LW1hYy0xNi5sb2NhbA..
CSeq: 1 MESSAGE
Content-Transfer-Encoding: binary
Content-Type: multipart/mixed;boundary=7a9cbec02ceef655
Date: Sat, 15 Oct 2005 04:44:56 GMT
User-Agent: SIPimp.org/0.2.5 (curses)
Content-Length: #LEN#
";
    let mut out = head
        .replace('\n', "\r\n")
        .replace("#LEN#", &body.len().to_string())
        .into_bytes();
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(&body);
    out
}

/// The body the mpart01 case carries (binary, with CRLFCRLF and invalid UTF-8 inside).
fn mpart01_body() -> Vec<u8> {
    let m = mpart01();
    let at = m.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
    m[at + 4..].to_vec()
}

fn bad_utf8_subject() -> Vec<u8> {
    let mut m = sip("INVITE sip:bob@example.com SIP/2.0
Via: SIP/2.0/UDP 10.0.0.1:5060;branch=z9hG4bKutf
From: <sip:alice@example.com>;tag=1
To: <sip:bob@example.com>
Subject: caf\u{e9} XX
Call-ID: utf8.1@10.0.0.1
CSeq: 1 INVITE
Max-Forwards: 70
Content-Length: 0

");
    // Replace "XX" by a lone continuation byte and an overlong lead byte.
    let at = m.windows(2).position(|w| w == b"XX").unwrap();
    m[at] = 0x80;
    m[at + 1] = 0xc0;
    m
}

fn table() -> Vec<Case> {
    vec![
        // ---------------------------------------------------------------- valid (RFC 4475 3.1.1)
        Case {
            name: "wsinv: whitespace, folding, compact and odd-case names everywhere",
            msg: wsinv(),
            expect: Expect::Ok(|m| {
                let r = req(m);
                assert_eq!(r.method, Method::Invite);
                assert_eq!(r.uri, "sip:vivekg@chair-dnrc.example.com;unknownparam");
                assert_eq!(r.to_tag().as_deref(), Some("1918181833n"));
                assert_eq!(r.from_tag().as_deref(), Some("98asjd8"));
                assert_eq!(r.from_hdr().unwrap().display.as_deref(), Some(r#""J Rosenberg \\\"""#));
                assert_eq!(r.max_forwards(), Some(68));
                assert_eq!(r.cseq().map(|c| c.seq), Some(9));
                let vias = r.vias();
                assert_eq!(vias.len(), 3);
                assert_eq!((vias[0].host.as_str(), vias[0].branch()), ("192.0.2.2", Some("390skdjuw")));
                assert_eq!((vias[1].transport.as_str(), vias[1].branch()), ("TCP", Some("z9hG4bK9ikj8")));
                assert_eq!(vias[2].branch(), Some("z9hG4bK30239"));
                assert_eq!(r.headers.get("Subject"), Some(""));
                assert_eq!(
                    r.headers.get("newfangledheader"),
                    Some("newfangled value continued newfangled value")
                );
                assert_eq!(r.headers.get("UnknownHeaderWithUnusualValue"), Some(";;,,;;,;"));
                let c = &r.contacts()[0];
                assert_eq!(c.param("q"), Some(Some("0.33")));
                assert_eq!(c.param("newparam"), Some(Some("newvalue")));
                assert_eq!(&r.body[..], SDP.replace('\n', "\r\n").as_bytes());
            }),
        },
        Case {
            name: "intmeth: every token character in method, URI user/password, params, names",
            msg: sip(r#"!interesting-Method0123456789_*+`.%indeed'~ sip:1_unusual.URI~(to-be!sure)&isn't+it$/crazy?,/;;*:&it+has=1,weird!*pas$wo~d_too.(doesn't-it)@example.com SIP/2.0
Via: SIP/2.0/TCP host1.example.com;branch=z9hG4bK-.!%66*_+`'~
To: "BEL:\<BEL> NUL:\<NUL> DEL:\<DEL>" <sip:1_unusual.URI~(to-be!sure)&isn't+it$/crazy?,/;;*@example.com>
From: token1~` token2'+_ token3*%!.- <sip:mundane@example.com>;fromParam''~+*_!.-%="работающий";tag=_token~1'+`*%!-.
Call-ID: intmeth.word%ZK-!.*_+'@word`~)(><:\/"][?}{
CSeq: 139122385 !interesting-Method0123456789_*+`.%indeed'~
Max-Forwards: 255
extensionHeader-!.%*+_`'~:﻿大停電
Content-Length: 0

"#),
            expect: Expect::Ok(|m| {
                let r = req(m);
                assert_eq!(r.method, Method::Other("!interesting-Method0123456789_*+`.%indeed'~".into()));
                let u = r.parsed_uri().unwrap();
                assert_eq!(u.user.as_deref(), Some("1_unusual.URI~(to-be!sure)&isn't+it$/crazy?,/;;*"));
                assert_eq!(u.password.as_deref(), Some("&it+has=1,weird!*pas$wo~d_too.(doesn't-it)"));
                assert_eq!(u.host, "example.com");
                assert!(u.headers.is_none());
                assert_eq!(r.to_hdr().unwrap().uri.host, "example.com");
                assert_eq!(r.from_tag().as_deref(), Some("_token~1'+`*%!-."));
                assert_eq!(r.call_id(), Some(r#"intmeth.word%ZK-!.*_+'@word`~)(><:\/"][?}{"#));
                assert_eq!(r.headers.get("extensionHeader-!.%*+_`'~"), Some("\u{feff}大停電"));
            }),
        },
        Case {
            name: "esc01: %-escapes in Request-URI, To, From and Contact",
            msg: sip(&format!(
                "INVITE sip:sips%3Auser%40example.com@example.net SIP/2.0
To: sip:%75se%72@example.com
From: <sip:I%20have%20spaces@example.net>;tag=938
Max-Forwards: 87
i: esc01.239409asdfakjkn23onasd0-3234
CSeq: 234234 INVITE
Via: SIP/2.0/UDP host5.example.net;branch=z9hG4bKkdjuw
C: application/sdp
Contact:
  <sip:cal%6Cer@host5.example.net;%6C%72;n%61me=v%61lue%25%34%31>
Content-Length: #LEN#

{SDP}"
            )),
            expect: Expect::Ok(|m| {
                let r = req(m);
                let u = r.parsed_uri().unwrap();
                assert_eq!(u.user_unescaped().as_deref(), Some("sips:user@example.com"));
                assert_eq!(u.host, "example.net");
                assert_eq!(r.uri, "sip:sips%3Auser%40example.com@example.net");
                assert_eq!(r.to_hdr().unwrap().uri.user_unescaped().as_deref(), Some("user"));
                assert_eq!(r.from_hdr().unwrap().uri.user_unescaped().as_deref(), Some("I have spaces"));
                let c = &r.contacts()[0];
                assert_eq!(c.uri.user_unescaped().as_deref(), Some("caller"));
                assert_eq!(c.uri.param("n%61me"), Some(Some("v%61lue%25%34%31")));
                assert_eq!(r.call_id(), Some("esc01.239409asdfakjkn23onasd0-3234"));
            }),
        },
        Case {
            name: "escnull: %00 in URIs, two Contact lines, `L:0` with no space",
            msg: sip("REGISTER sip:example.com SIP/2.0
To: sip:null-%00-null@example.com
From: sip:null-%00-null@example.com;tag=839923423
Max-Forwards: 70
Call-ID: escnull.39203ndfvkjdasfkq3w4otrq0adsfdfnavd
CSeq: 14398234 REGISTER
Via: SIP/2.0/UDP host5.example.com;branch=z9hG4bKkdjuw
Contact: <sip:%00@host5.example.com>
Contact: <sip:%00%00@host5.example.com>
L:0

"),
            expect: Expect::Ok(|m| {
                let r = req(m);
                assert_eq!(r.to_hdr().unwrap().uri.user_unescaped().as_deref(), Some("null-\0-null"));
                let c = r.contacts();
                assert_eq!(c.len(), 2);
                assert_eq!(c[1].uri.user_unescaped().as_deref(), Some("\0\0"));
                assert!(r.body.is_empty());
            }),
        },
        Case {
            name: "esc02: escaped method is just an unknown method; C%6Fntact is not Contact",
            msg: sip(r#"RE%47IST%45R sip:registrar.example.com SIP/2.0
To: "%Z%45" <sip:resource@example.com>
From: "%Z%45" <sip:resource@example.com>;tag=f232jadfj23
Call-ID: esc02.asdfnqwo34rq23i34jrjasdcnl23nrlknsdf
Via: SIP/2.0/TCP host.example.com;rport;branch=z9hG4bK209323
CSeq: 29344 RE%47IST%45R
Max-Forwards: 70
Contact: <sip:alias1@host1.example.com>
C%6Fntact: <sip:alias2@host2.example.com>
Contact: <sip:alias3@host3.example.com>
l: 0

"#),
            expect: Expect::Ok(|m| {
                let r = req(m);
                assert_eq!(r.method, Method::Other("RE%47IST%45R".into()));
                assert_eq!(r.contacts().len(), 2);
                assert_eq!(r.headers.get("C%6Fntact"), Some("<sip:alias2@host2.example.com>"));
                assert_eq!(r.top_via().unwrap().rport(), Some(None));
            }),
        },
        Case {
            name: "lwsdisp: no LWS between display name and <",
            msg: base_with("From: <sip:caller@example.net>;tag=1", "From: caller<sip:caller@example.com>;tag=323"),
            expect: Expect::Ok(|m| {
                let f = req(m).from_hdr().unwrap();
                assert_eq!(f.display.as_deref(), Some("caller"));
                assert_eq!(f.tag(), Some("323"));
            }),
        },
        Case {
            name: "longreq: very long values, names and 41 Via values",
            msg: longreq(),
            expect: Expect::Ok(|m| {
                let r = req(m);
                assert_eq!(r.vias().len(), 41);
                assert_eq!(r.vias()[40].host, "sip39.example.com");
                assert_eq!(r.from_tag().map(|t| t.len()), Some(320));
                assert!(r.headers.get(&format!("Unknown-{}", "LongLong".repeat(100))).is_some());
                assert_eq!(r.to_hdr().unwrap().uri.port, Some(6000));
                assert_eq!(r.body.len(), SDP.replace('\n', "\r\n").len());
            }),
        },
        Case {
            name: "dblreq: a datagram with a second request after Content-Length: the rest is cut",
            msg: sip("REGISTER sip:example.com SIP/2.0
To: sip:j.user@example.com
From: sip:j.user@example.com;tag=43251j3j324
Max-Forwards: 8
I: dblreq.0ha0isndaksdj99sdfafnl3lk233412
Contact: sip:j.user@host.example.com
CSeq: 8 REGISTER
Via: SIP/2.0/UDP 192.0.2.125;branch=z9hG4bKkdjuw23492
Content-Length: 0

INVITE sip:joe@example.com SIP/2.0
t: sip:joe@example.com
From: sip:caller@example.net;tag=141334
Max-Forwards: 8
Call-ID: dblreq.0ha0isnda977644900765@192.0.2.15
CSeq: 8 INVITE
Via: SIP/2.0/UDP 192.0.2.15;branch=z9hG4bKkdjuw380234
Content-Type: application/sdp
Content-Length: 150
"),
            expect: Expect::Ok(|m| {
                let r = req(m);
                assert_eq!(r.method, Method::Register);
                assert!(r.body.is_empty());
                assert_eq!(r.call_id(), Some("dblreq.0ha0isndaksdj99sdfafnl3lk233412"));
            }),
        },
        Case {
            name: "semiuri: ';' in the user part; folded Accept list",
            msg: sip("OPTIONS sip:user;par=u%40example.net@example.com SIP/2.0
To: sip:j_user@example.com
From: sip:caller@example.org;tag=33242
Max-Forwards: 3
Call-ID: semiuri.0ha0isndaksdj
CSeq: 8 OPTIONS
Accept: application/sdp, application/pkcs7-mime,
        multipart/mixed, multipart/signed,
        message/sip, message/sipfrag
Via: SIP/2.0/UDP 192.0.2.1;branch=z9hG4bKkdjuw
l: 0

"),
            expect: Expect::Ok(|m| {
                let r = req(m);
                let u = r.parsed_uri().unwrap();
                assert_eq!(u.user.as_deref(), Some("user;par=u%40example.net"));
                assert_eq!(u.host, "example.com");
                assert!(u.params.is_empty());
                assert_eq!(
                    r.headers.get("Accept"),
                    Some("application/sdp, application/pkcs7-mime, multipart/mixed, multipart/signed, message/sip, message/sipfrag")
                );
                assert_eq!(r.headers.list("Accept").unwrap().len(), 6);
            }),
        },
        Case {
            name: "transports: unknown Via transports are kept",
            msg: sip("OPTIONS sip:user@example.com SIP/2.0
To: sip:user@example.com
From: <sip:caller@example.com>;tag=323
Max-Forwards: 70
Call-ID:  transports.kijh4akdnaqjkwendsasfdj
Accept: application/sdp
CSeq: 60 OPTIONS
Via: SIP/2.0/UDP t1.example.com;branch=z9hG4bKkdjuw
Via: SIP/2.0/SCTP t2.example.com;branch=z9hG4bKklasjdhf
Via: SIP/2.0/TLS t3.example.com;branch=z9hG4bK2980unddj
Via: SIP/2.0/UNKNOWN t4.example.com;branch=z9hG4bKasd0f3en
Via: SIP/2.0/TCP t5.example.com;branch=z9hG4bK0a9idfnee
l: 0

"),
            expect: Expect::Ok(|m| {
                let t: Vec<String> = req(m).vias().into_iter().map(|v| v.transport).collect();
                assert_eq!(t, ["UDP", "SCTP", "TLS", "UNKNOWN", "TCP"]);
                assert_eq!(req(m).call_id(), Some("transports.kijh4akdnaqjkwendsasfdj"));
            }),
        },
        Case {
            name: "mpart01: binary multipart body with CRLFCRLF and invalid UTF-8 inside",
            msg: mpart01(),
            expect: Expect::Ok(|m| {
                let r = req(m);
                assert_eq!(r.method, Method::Message);
                assert_eq!(r.content_type().as_deref(), Some("multipart/mixed"));
                assert_eq!(&r.body[..], &mpart01_body()[..]);
            }),
        },
        Case {
            name: "unreason: UTF-8 reason phrase",
            msg: sip(&format!(
                "SIP/2.0 200 = 2**3 * 5**2 но сто девяносто девять - простое
Via: SIP/2.0/UDP 192.0.2.198;branch=z9hG4bK1324923
Call-ID: unreason.1234ksdfak3j2erwedfsASdf
CSeq: 35 INVITE
From: sip:user@example.com;tag=11141343
To: sip:user@example.edu;tag=2229
Content-Length: #LEN#
Content-Type: application/sdp
Contact: <sip:user@host198.example.com>

{SDP}"
            )),
            expect: Expect::Ok(|m| {
                let r = resp(m);
                assert_eq!(r.status, 200);
                assert_eq!(r.reason, "= 2**3 * 5**2 но сто девяносто девять - простое");
                assert_eq!(r.to_tag().as_deref(), Some("2229"));
            }),
        },
        Case {
            name: "noreason: empty reason phrase",
            msg: sip("SIP/2.0 100 \nVia: SIP/2.0/UDP 192.0.2.105;branch=z9hG4bK2398ndaoe
Call-ID: noreason.asndj203insdf99223ndf
CSeq: 35 INVITE
From: <sip:user@example.com>;tag=39ansfi3
To: <sip:user@example.edu>;tag=902jndnke3
Content-Length: 0
Contact: <sip:user@host105.example.com>

"),
            expect: Expect::Ok(|m| {
                assert_eq!(resp(m).status, 100);
                assert_eq!(resp(m).reason, "");
            }),
        },
        Case {
            name: "noreason without the SP: tolerated as an empty reason",
            msg: sip("SIP/2.0 180\nVia: SIP/2.0/UDP 192.0.2.105;branch=z9hG4bK2398ndaoe
Call-ID: noreason2@x
CSeq: 35 INVITE
From: <sip:user@example.com>;tag=39ansfi3
To: <sip:user@example.edu>;tag=902jndnke3
Content-Length: 0

"),
            expect: Expect::Ok(|m| assert_eq!((resp(m).status, resp(m).reason.as_str()), (180, ""))),
        },
        Case {
            name: "inv2543: RFC 2543 INVITE (no branch, no From tag, no Content-Length on UDP)",
            msg: sip(&format!(
                "INVITE sip:UserB@example.com SIP/2.0
Via: SIP/2.0/UDP iftgw.example.com
From: <sip:+13035551111@ift.client.example.net;user=phone>
Record-Route: <sip:UserB@example.com;maddr=ss1.example.com>
To: sip:+16505552222@ss1.example.net;user=phone
Call-ID: inv2543.1717@ift.client.example.com
CSeq: 56 INVITE
Content-Type: application/sdp

{SDP}"
            )),
            expect: Expect::Ok(|m| {
                let r = req(m);
                assert_eq!(r.top_via().unwrap().branch(), None);
                assert_eq!(r.from_tag(), None);
                // addr-spec form: `;user=phone` is a header parameter of To.
                assert_eq!(r.to_hdr().unwrap().param("user"), Some(Some("phone")));
                assert_eq!(r.body.len(), SDP.replace('\n', "\r\n").len());
            }),
        },
        // ------------------------------------ valid syntax, decided above the parser (RFC 4475 3.3)
        Case {
            name: "unkscm/novelsc: unknown Request-URI schemes parse (the core answers 416)",
            msg: base_with("OPTIONS sip:user@example.com SIP/2.0", "OPTIONS soap.beep://192.0.2.103:3002 SIP/2.0"),
            expect: Expect::Ok(|m| {
                let u = req(m).parsed_uri().unwrap();
                assert_eq!(u.scheme, "soap.beep");
                assert!(!u.is_sip());
            }),
        },
        Case {
            name: "unksm2: unknown schemes in To, From, Contact",
            msg: sip("OPTIONS sip:user@example.com SIP/2.0
To: isbn:2983792873
From: <http://www.example.com>;tag=3234233
Call-ID: unksm2.daksdj@hyphenated-host.example.com
CSeq: 234902 OPTIONS
Max-Forwards: 70
Via: SIP/2.0/UDP 192.0.2.21:5060;branch=z9hG4bKkdjuw
Contact: <name:John_Smith>
l: 0

"),
            expect: Expect::Ok(|m| {
                let r = req(m);
                assert_eq!(r.to_hdr().unwrap().uri.scheme, "isbn");
                assert_eq!(r.from_tag().as_deref(), Some("3234233"));
                assert_eq!(r.contacts()[0].uri.scheme, "name");
            }),
        },
        Case {
            name: "bext01: unknown Require/Proxy-Require parse (the core answers 420)",
            msg: base_with("Max-Forwards: 70", "Max-Forwards: 70\nRequire: nothing, something, fox\nProxy-Require: foo"),
            expect: Expect::Ok(|m| assert_eq!(req(m).headers.list("Require").unwrap(), ["nothing", "something", "fox"])),
        },
        Case {
            name: "invut: unknown Content-Type parses (the core answers 415)",
            msg: sip("INVITE sip:user@example.com SIP/2.0
Contact: <sip:caller@host5.example.net>
To: sip:j.user@example.com
From: sip:caller@example.net;tag=8392034
Max-Forwards: 70
Call-ID: invut.0ha0isndaksdjadsfij34n23d
CSeq: 235448 INVITE
Via: SIP/2.0/UDP somehost.example.com;branch=z9hG4bKkdjuw
Content-Type: application/unknownformat
Content-Length: #LEN#

<audio>
 <pcmu port=\"443\"/>
</audio>
"),
            expect: Expect::Ok(|m| {
                assert_eq!(req(m).content_type().as_deref(), Some("application/unknownformat"));
                assert!(req(m).body.starts_with(b"<audio>"));
            }),
        },
        Case {
            name: "regaut01: unknown Authorization scheme is kept as received",
            msg: base_with("Max-Forwards: 70", "Max-Forwards: 70\nAuthorization: NoOneKnowsThisScheme opaque-data=here"),
            expect: Expect::Ok(|m| {
                assert_eq!(req(m).headers.get("authorization"), Some("NoOneKnowsThisScheme opaque-data=here"))
            }),
        },
        Case {
            name: "zeromf: Max-Forwards 0 parses (the core answers 483 when it would forward)",
            msg: base_with("Max-Forwards: 70", "Max-Forwards: 0"),
            expect: Expect::Ok(|m| assert_eq!(req(m).max_forwards(), Some(0))),
        },
        Case {
            name: "cparam01/cparam02: Contact param outside vs inside <>",
            msg: base_with(
                "Max-Forwards: 70",
                "Max-Forwards: 70\nContact: sip:+19725552222@gw1.example.net;unknownparam\nm: <sip:+19725552223@gw1.example.net;unknownparam>",
            ),
            expect: Expect::Ok(|m| {
                let c = req(m).contacts();
                assert_eq!(c[0].param("unknownparam"), Some(None));
                assert!(c[0].uri.params.is_empty());
                assert_eq!(c[1].uri.param("unknownparam"), Some(None));
                assert!(c[1].params.is_empty());
            }),
        },
        Case {
            name: "regescrt: escaped header in a Contact URI inside <>",
            msg: base_with(
                "Max-Forwards: 70",
                "Max-Forwards: 70\nContact: <sip:user@example.com?Route=%3Csip:sip.example.com%3E>",
            ),
            expect: Expect::Ok(|m| {
                let c = &req(m).contacts()[0];
                assert_eq!(c.uri.headers.as_deref(), Some("Route=%3Csip:sip.example.com%3E"));
                assert_eq!(c.uri.host, "example.com");
            }),
        },
        Case {
            name: "bcast: response with a broadcast Via (the transaction layer drops it)",
            msg: sip("SIP/2.0 200 OK
Via: SIP/2.0/UDP 192.0.2.198;branch=z9hG4bK1324923, SIP/2.0/UDP 255.255.255.255;branch=z9hG4bK1saber23
Call-ID: bcast.0384840201234ksdfak3j2erwedfsASdf
CSeq: 35 INVITE
From: sip:user@example.com;tag=11141343
To: sip:user@example.edu;tag=2229
Content-Length: 0

"),
            expect: Expect::Ok(|m| assert_eq!(resp(m).vias()[1].host, "255.255.255.255")),
        },
        Case {
            name: "badbranch: a branch that is only the magic cookie",
            msg: base_with("branch=z9hG4bKbase", "branch=z9hG4bK"),
            expect: Expect::Ok(|m| assert_eq!(req(m).top_via().unwrap().branch(), Some("z9hG4bK"))),
        },
        Case {
            name: "Contact: * parses (the registrar decides whether it is allowed)",
            msg: base_with("Max-Forwards: 70", "Max-Forwards: 70\nContact: *\nExpires: 0"),
            expect: Expect::Ok(|m| {
                assert_eq!(req(m).headers.get("Contact"), Some("*"));
                assert_eq!(req(m).expires(), Some(0));
            }),
        },
        // ------------------------------------------------------ our own leniency and hardening
        Case {
            name: "rsipstack: comma-joined Via gives two values, the first branch intact",
            msg: base_with(
                "Via: SIP/2.0/UDP host.example.com;branch=z9hG4bKbase",
                "Via: SIP/2.0/UDP a.example;branch=z9hG4bKaaa, SIP/2.0/TCP b.example:5070;branch=z9hG4bKbbb",
            ),
            expect: Expect::Ok(|m| {
                let v = req(m).vias();
                assert_eq!(v[0].branch(), Some("z9hG4bKaaa"));
                assert_eq!((v[1].transport.as_str(), v[1].port), ("TCP", Some(5070)));
                assert_eq!(req(m).top_via().unwrap().branch(), Some("z9hG4bKaaa"));
            }),
        },
        Case {
            name: "IPv6 Via with received and rport filled in",
            msg: base_with(
                "Via: SIP/2.0/UDP host.example.com;branch=z9hG4bKbase",
                "Via: SIP/2.0/UDP [2001:db8::9:1]:5062;branch=z9hG4bKv6;received=2001:db8::9:255;rport=5063",
            ),
            expect: Expect::Ok(|m| {
                let v = req(m).top_via().unwrap();
                assert_eq!((v.host.as_str(), v.port), ("[2001:db8::9:1]", Some(5062)));
                assert_eq!(v.received(), Some("2001:db8::9:255"));
                assert_eq!(v.rport(), Some(Some(5063)));
            }),
        },
        Case {
            name: "IPv4 Via behind NAT: rport and received, any order",
            msg: base_with(
                "Via: SIP/2.0/UDP host.example.com;branch=z9hG4bKbase",
                "Via: SIP/2.0/UDP 10.0.0.1:5060;rport=40000;received=198.51.100.7;branch=z9hG4bKnat",
            ),
            expect: Expect::Ok(|m| {
                let v = req(m).top_via().unwrap();
                assert_eq!(v.rport(), Some(Some(40000)));
                assert_eq!(v.received(), Some("198.51.100.7"));
                assert_eq!(v.branch(), Some("z9hG4bKnat"));
            }),
        },
        Case {
            name: "case-insensitive names, space before the colon, empty values",
            msg: sip("OPTIONS sip:user@example.com SIP/2.0
VIA: SIP/2.0/UDP host.example.com;branch=z9hG4bKci
max-forwards: 70
tO: <sip:user@example.com>
FROM \t: <sip:caller@example.net>;tag=1
cAlL-iD   : ci.1@example.net
CSEQ: 1 OPTIONS
Subject:
X-Empty:   
content-length: 0

"),
            expect: Expect::Ok(|m| {
                let r = req(m);
                assert_eq!(r.call_id(), Some("ci.1@example.net"));
                assert_eq!(r.from_tag().as_deref(), Some("1"));
                assert_eq!(r.headers.get("subject"), Some(""));
                assert_eq!(r.headers.get("x-empty"), Some(""));
                assert_eq!(r.headers.iter().nth(3).unwrap().name, "FROM");
            }),
        },
        Case {
            name: "unknown header kept byte-for-byte (inner spacing, quotes, commas)",
            msg: base_with("Max-Forwards: 70", "Max-Forwards: 70\nX-Weird:   a  ,, \"q;,\\\" \" <x>  ;;  "),
            expect: Expect::Ok(|m| assert_eq!(req(m).headers.get("X-Weird"), Some("a  ,, \"q;,\\\" \" <x>  ;;"))),
        },
        Case {
            name: "bare LF line ends and keep-alive CRLFs before the start line",
            msg: {
                let mut v = b"\r\n\r\n".to_vec();
                v.extend_from_slice(BASE.as_bytes());
                v
            },
            expect: Expect::Ok(|m| assert_eq!(req(m).call_id(), Some("base.1@example.net"))),
        },
        Case {
            name: "duplicate Content-Length that agree; UDP body longer than it is cut",
            msg: sip("MESSAGE sip:user@example.com SIP/2.0
Via: SIP/2.0/UDP host.example.com;branch=z9hG4bKcl
Max-Forwards: 70
To: <sip:user@example.com>
From: <sip:caller@example.net>;tag=1
Call-ID: cl.1@example.net
CSeq: 1 MESSAGE
Content-Length: 4
l: 04

helloworld"),
            expect: Expect::Ok(|m| assert_eq!(&req(m).body[..], b"hell")),
        },
        // ----------------------------------------------------------- invalid (RFC 4475 3.1.2)
        Case {
            name: "badinv01: extraneous header field separators",
            msg: sip(r#"INVITE sip:user@example.com SIP/2.0
To: sip:j.user@example.com
From: sip:caller@example.net;;tag=134161461246
Max-Forwards: 7
Call-ID: badinv01.0ha0isndaksdjasdf3234nas
CSeq: 8 INVITE
Via: SIP/2.0/UDP 192.0.2.15;;,;,,
Contact: "Joe" <sip:joe@example.org>;;;;
Content-Length: 0
Content-Type: application/sdp

"#),
            expect: Expect::Err(ParseError::BadHeader("Via"), Reply::Status(400, "Bad Via header")),
        },
        Case {
            name: "badinv01 (From only): empty parameter in From",
            msg: base_with("From: <sip:caller@example.net>;tag=1", "From: sip:caller@example.net;;tag=134161461246"),
            expect: Expect::Err(ParseError::BadHeader("From"), Reply::Status(400, "Bad From header")),
        },
        Case {
            name: "clerr: Content-Length larger than the datagram",
            msg: base_with("Content-Length: 0", "Content-Length: 9999\n\nv=0"),
            expect: Expect::Err(ParseError::TruncatedBody, Reply::Status(400, "Body shorter than Content-Length")),
        },
        Case {
            name: "ncl: negative Content-Length",
            msg: base_with("Content-Length: 0", "Content-Length: -999"),
            expect: Expect::Err(ParseError::BadContentLength, Reply::Status(400, "Bad Content-Length")),
        },
        Case {
            name: "huge Content-Length (overflows usize)",
            msg: base_with("Content-Length: 0", "Content-Length: 99999999999999999999999999"),
            expect: Expect::Err(ParseError::BadContentLength, Reply::Status(400, "Content-Length")),
        },
        Case {
            name: "Content-Length over MAX_BODY_BYTES",
            msg: base_with("Content-Length: 0", &format!("Content-Length: {}", MAX_BODY_BYTES + 1)),
            expect: Expect::Err(ParseError::BadContentLength, Reply::Status(400, "Content-Length")),
        },
        Case {
            name: "signed Content-Length (+4) is not 1*DIGIT",
            msg: base_with("Content-Length: 0", "Content-Length: +4\n\nabcd"),
            expect: Expect::Err(ParseError::BadContentLength, Reply::Status(400, "Content-Length")),
        },
        Case {
            name: "mcl01: two Content-Length values that disagree",
            msg: base_with("Content-Length: 0", "Content-Length: 13\nl: 5\n\nThere's no way to know how many octets are supposed to be here."),
            expect: Expect::Err(ParseError::BadContentLength, Reply::Status(400, "Content-Length")),
        },
        Case {
            name: "scalar02: CSeq, Max-Forwards, Expires and a Contact expires all overlarge",
            msg: sip(&format!(
                "REGISTER sip:example.com SIP/2.0
Via: SIP/2.0/TCP host129.example.com;branch=z9hG4bK342sdfoi3
To: <sip:user@example.com>
From: <sip:user@example.com>;tag=239232jh3
CSeq: 36893488147419103232 REGISTER
Call-ID: scalar02.23o0pd9vanlq3wnrlnewofjas9ui32
Max-Forwards: 300
Expires: 1{}
Contact: <sip:user@host129.example.com>;expires=280297596632815
Content-Length: 0

",
                "0".repeat(100)
            )),
            expect: Expect::Err(ParseError::BadHeader("CSeq"), Reply::Status(400, "Bad CSeq header")),
        },
        Case {
            name: "scalar02 (Max-Forwards only): 300 > 255",
            msg: base_with("Max-Forwards: 70", "Max-Forwards: 300"),
            expect: Expect::Err(ParseError::BadHeader("Max-Forwards"), Reply::Status(400, "Max-Forwards")),
        },
        Case {
            name: "scalar02 (Expires only): beyond 2^32-1",
            msg: base_with("Max-Forwards: 70", "Max-Forwards: 70\nExpires: 4294967296"),
            expect: Expect::Err(ParseError::BadHeader("Expires"), Reply::Status(400, "Expires")),
        },
        Case {
            name: "scalarlg: response with an overlarge CSeq is dropped",
            msg: sip("SIP/2.0 503 Service Unavailable
Via: SIP/2.0/TCP host129.example.com;branch=z9hG4bKzzxdiwo34sw;received=192.0.2.129
To: <sip:user@example.com>
From: <sip:other@example.net>;tag=2easdjfejw
CSeq: 9292394834772304023312 OPTIONS
Call-ID: scalarlg.noase0of0234hn2er0fdlkwejrj
Retry-After: 949302838503028349304023988
Warning: 1812 overture \"In Progress\"
Content-Length: 0

"),
            expect: Expect::Err(ParseError::BadHeader("CSeq"), Reply::Drop),
        },
        Case {
            name: "CSeq with a sign",
            msg: base_with("CSeq: 1 OPTIONS", "CSeq: +1 OPTIONS"),
            expect: Expect::Err(ParseError::BadHeader("CSeq"), Reply::Status(400, "CSeq")),
        },
        Case {
            name: "quotbal: unterminated quoted string in a display name",
            msg: base_with("To: <sip:user@example.com>", "To: \"Mr. J. User <sip:j.user@example.com>"),
            expect: Expect::Err(ParseError::BadHeader("To"), Reply::Status(400, "Bad To header")),
        },
        Case {
            name: "ltgtruri: <> around the Request-URI",
            msg: base_with("OPTIONS sip:user@example.com SIP/2.0", "OPTIONS <sip:user@example.com> SIP/2.0"),
            expect: Expect::Err(ParseError::BadRequestUri, Reply::Status(400, "Bad Request-URI")),
        },
        Case {
            name: "lwsruri: LWS inside the Request-URI",
            msg: base_with("OPTIONS sip:user@example.com SIP/2.0", "OPTIONS sip:user@example.com; lr SIP/2.0"),
            expect: Expect::Err(ParseError::BadStartLine, Reply::Status(400, "Malformed start line")),
        },
        Case {
            name: "HTAB inside the Request-URI",
            msg: base_with("OPTIONS sip:user@example.com SIP/2.0", "OPTIONS sip:user@example.com;\tlr SIP/2.0"),
            expect: Expect::Err(ParseError::BadRequestUri, Reply::Status(400, "Request-URI")),
        },
        Case {
            name: "lwsstart: several SP between request-line elements",
            msg: base_with("OPTIONS sip:user@example.com SIP/2.0", "OPTIONS  sip:user@example.com   SIP/2.0"),
            expect: Expect::Err(ParseError::BadStartLine, Reply::Status(400, "Malformed start line")),
        },
        Case {
            name: "trws: SP after the request line",
            msg: base_with("OPTIONS sip:user@example.com SIP/2.0", "OPTIONS sip:user@example.com SIP/2.0  "),
            expect: Expect::Err(ParseError::BadStartLine, Reply::Status(400, "Malformed start line")),
        },
        Case {
            name: "escruri: escaped headers in the Request-URI",
            msg: base_with(
                "OPTIONS sip:user@example.com SIP/2.0",
                "OPTIONS sip:user@example.com?Route=%3Csip:example.com%3E SIP/2.0",
            ),
            expect: Expect::Err(ParseError::BadRequestUri, Reply::Status(400, "Request-URI")),
        },
        Case {
            name: "regbadct: URI with ? in a Contact without <>",
            msg: base_with(
                "Max-Forwards: 70",
                "Max-Forwards: 70\nContact: sip:user@example.com?Route=%3Csip:sip.example.com%3E",
            ),
            expect: Expect::Err(ParseError::BadHeader("Contact"), Reply::Status(400, "Bad Contact header")),
        },
        Case {
            name: "badaspec: spaces inside <>",
            msg: base_with("To: <sip:user@example.com>", "To: \"Watson, Thomas\" < sip:t.watson@example.org >"),
            expect: Expect::Err(ParseError::BadHeader("To"), Reply::Status(400, "Bad To header")),
        },
        Case {
            name: "baddn: unquoted display name with a comma",
            msg: base_with("From: <sip:caller@example.net>;tag=1", "From:    Bell, Alexander <sip:a.g.bell@example.com>;tag=43"),
            expect: Expect::Err(ParseError::BadHeader("From"), Reply::Status(400, "Bad From header")),
        },
        Case {
            name: "badvers: SIP/7.0 gets 505",
            msg: base_with("OPTIONS sip:user@example.com SIP/2.0", "OPTIONS sip:user@example.com SIP/7.0"),
            expect: Expect::Err(ParseError::BadVersion, Reply::Status(505, "Version Not Supported")),
        },
        Case {
            name: "mismatch01: CSeq method differs from the request method",
            msg: base_with("CSeq: 1 OPTIONS", "CSeq: 1 INVITE"),
            expect: Expect::Err(ParseError::CSeqMismatch, Reply::Status(400, "CSeq method")),
        },
        Case {
            name: "mismatch02: unknown method with a different CSeq method",
            msg: sip(&BASE.replace("OPTIONS sip:", "NEWMETHOD sip:").replace("CSeq: 1 OPTIONS", "CSeq: 1 INVITE")),
            expect: Expect::Err(ParseError::CSeqMismatch, Reply::Status(400, "CSeq method")),
        },
        Case {
            name: "bigcode: status code out of range",
            msg: sip("SIP/2.0 4294967301 better not break the receiver
Via: SIP/2.0/UDP 192.0.2.105;branch=z9hG4bK2398ndaoe
Call-ID: bigcode.asdof3uj203asdnf3429uasdhfas3ehjasdfas9i
CSeq: 353494 INVITE
From: <sip:user@example.com>;tag=39ansfi3
To: <sip:user@example.edu>;tag=902jndnke3
Content-Length: 0

"),
            expect: Expect::Err(ParseError::BadStatus, Reply::Drop),
        },
        Case {
            name: "insuf: missing From, To, Call-ID: still answered along the Via",
            msg: sip(&format!(
                "INVITE sip:user@example.com SIP/2.0
CSeq: 193942 INVITE
Via: SIP/2.0/UDP 192.0.2.95;branch=z9hG4bKkdj.insuf
Content-Type: application/sdp
l: #LEN#

{SDP}"
            )),
            expect: Expect::Err(ParseError::Missing("From"), Reply::Status(400, "Missing From header")),
        },
        Case {
            name: "multi01: two From, To, Call-ID and CSeq",
            msg: sip(&format!(
                "INVITE sip:user@company.com SIP/2.0
Contact: <sip:caller@host25.example.net>
Via: SIP/2.0/UDP 192.0.2.25;branch=z9hG4bKkdjuw
Max-Forwards: 70
CSeq: 5 INVITE
Call-ID: multi01.98asdh@192.0.2.1
CSeq: 59 INVITE
Call-ID: multi01.98asdh@192.0.2.2
From: sip:caller@example.com;tag=3413415
To: sip:user@example.com
To: sip:other@example.net
From: sip:caller@example.net;tag=2923420123
Content-Type: application/sdp
l: #LEN#

{SDP}"
            )),
            expect: Expect::Err(ParseError::Duplicate("From"), Reply::Status(400, "Duplicate From header")),
        },
        // -------------------------------------------- framing, encoding and line-level faults
        Case {
            name: "message cut mid-header",
            msg: b"INVITE sip:bob@example.com SIP/2.0\r\nVia: SIP/2.0/UDP 10.0.0.1;branch=z9hG4bKcut\r\nFrom: <sip:a@example.com>;ta".to_vec(),
            expect: Expect::Err(ParseError::Unterminated, Reply::Status(400, "Headers not terminated")),
        },
        Case {
            name: "message cut right after a complete header line",
            msg: b"INVITE sip:bob@example.com SIP/2.0\r\nVia: SIP/2.0/UDP 10.0.0.1;branch=z9hG4bKcut\r\nCSeq: 1 INVITE\r\n".to_vec(),
            expect: Expect::Err(ParseError::Unterminated, Reply::Status(400, "Headers not terminated")),
        },
        Case {
            name: "invalid UTF-8 in one header: an error naming it, later headers not lost",
            msg: bad_utf8_subject(),
            expect: Expect::Err(ParseError::NotUtf8("Subject".into()), Reply::Status(400, "Invalid UTF-8 in header Subject")),
        },
        Case {
            name: "header name with a space inside",
            msg: base_with("Max-Forwards: 70", "Max Forwards: 70"),
            expect: Expect::Err(ParseError::BadHeaderLine(3), Reply::Status(400, "Malformed header line 3")),
        },
        Case {
            name: "header line without a colon",
            msg: base_with("Max-Forwards: 70", "Max-Forwards 70"),
            expect: Expect::Err(ParseError::BadHeaderLine(3), Reply::Status(400, "Malformed header line 3")),
        },
        Case {
            name: "continuation line before any header",
            msg: base_with("OPTIONS sip:user@example.com SIP/2.0", "OPTIONS sip:user@example.com SIP/2.0\n folded"),
            expect: Expect::Err(ParseError::BadHeaderLine(2), Reply::Status(400, "Malformed header line 2")),
        },
        Case {
            name: "bare CR inside a header value",
            msg: base_with("Max-Forwards: 70", "Max-Forwards: 70\nSubject: a\rb"),
            expect: Expect::Err(ParseError::BadHeaderLine(4), Reply::Status(400, "Malformed header line 4")),
        },
        Case {
            name: "empty Call-ID",
            msg: base_with("Call-ID: base.1@example.net", "Call-ID:"),
            expect: Expect::Err(ParseError::BadHeader("Call-ID"), Reply::Status(400, "Bad Call-ID header")),
        },
        Case {
            name: "empty Via: nothing to answer along",
            msg: base_with("Via: SIP/2.0/UDP host.example.com;branch=z9hG4bKbase", "Via:"),
            expect: Expect::Err(ParseError::BadHeader("Via"), Reply::Status(400, "Bad Via header")),
        },
        Case {
            name: "no Via at all: dropped",
            msg: base_with("Via: SIP/2.0/UDP host.example.com;branch=z9hG4bKbase\n", ""),
            expect: Expect::Err(ParseError::Missing("Via"), Reply::Drop),
        },
        Case {
            name: "empty element in a comma-joined Via",
            msg: base_with(
                "Via: SIP/2.0/UDP host.example.com;branch=z9hG4bKbase",
                "Via: SIP/2.0/UDP a.example;branch=z9hG4bKa, , SIP/2.0/UDP b.example;branch=z9hG4bKb",
            ),
            expect: Expect::Err(ParseError::BadHeader("Via"), Reply::Status(400, "Via")),
        },
        Case {
            name: "Via sent-by that is not a host",
            msg: base_with("Via: SIP/2.0/UDP host.example.com;", "Via: SIP/2.0/UDP ho(st).example.com;"),
            expect: Expect::Err(ParseError::BadHeader("Via"), Reply::Status(400, "Via")),
        },
        Case {
            name: "Route without its closing >",
            msg: base_with("Max-Forwards: 70", "Max-Forwards: 70\nRoute: <sip:proxy.example.com;lr"),
            expect: Expect::Err(ParseError::BadHeader("Route"), Reply::Status(400, "Route")),
        },
        Case {
            name: "two Content-Type headers",
            msg: base_with("Max-Forwards: 70", "Max-Forwards: 70\nContent-Type: text/plain\nc: text/html"),
            expect: Expect::Err(ParseError::Duplicate("Content-Type"), Reply::Status(400, "Duplicate Content-Type")),
        },
        Case {
            name: "malformed ACK is never answered",
            msg: sip(&BASE.replace("OPTIONS", "ACK").replace("Max-Forwards: 70", "Max Forwards: 70")),
            expect: Expect::Err(ParseError::BadHeaderLine(3), Reply::Drop),
        },
        Case {
            name: "not SIP at all",
            msg: b"hello\r\n\r\n".to_vec(),
            expect: Expect::Err(ParseError::BadStartLine, Reply::Drop),
        },
        // ------------------------------------------------- regressions found by cargo fuzz
        Case {
            name: "fuzz: multi-byte character across byte 4 of the start line (was a panic)",
            msg: "+ос\r\nVia: SIP/2.0/UDP h;branch=z9hG4bKx\r\n\r\n".as_bytes().to_vec(),
            expect: Expect::Err(ParseError::BadStartLine, Reply::Drop),
        },
        Case {
            name: "fuzz: multi-byte character across byte 4 of the version (was a panic)",
            msg: sip(&BASE.replace("SIP/2.0\n", "SIPоо\n")),
            expect: Expect::Err(ParseError::BadStartLine, Reply::Status(400, "start line")),
        },
        Case {
            name: "empty datagram",
            msg: Vec::new(),
            expect: Expect::Err(ParseError::Empty, Reply::Drop),
        },
        Case {
            name: "keep-alive only",
            msg: b"\r\n\r\n".to_vec(),
            expect: Expect::Err(ParseError::Empty, Reply::Drop),
        },
        Case {
            name: "header section beyond MAX_HEADER_BYTES",
            msg: base_with("Max-Forwards: 70", &format!("Max-Forwards: 70\nX-Big: {}", "a".repeat(MAX_HEADER_BYTES))),
            expect: Expect::Err(ParseError::TooLarge, Reply::Status(400, "too large")),
        },
    ]
}

/// Serialise, re-parse, and compare what the transaction layer and the B2BUA look at.
fn assert_round_trip(name: &str, m: &SipMessage) {
    let again = parse(&m.to_bytes()).unwrap_or_else(|e| panic!("{name}: re-parse failed: {e}"));
    match (m, &again) {
        (SipMessage::Request(a), SipMessage::Request(b)) => {
            assert_eq!(a.method, b.method, "{name}");
            assert_eq!(a.uri, b.uri, "{name}");
        }
        (SipMessage::Response(a), SipMessage::Response(b)) => {
            assert_eq!((a.status, &a.reason), (b.status, &b.reason), "{name}");
        }
        _ => panic!("{name}: kind changed"),
    }
    let strip = |m: &SipMessage| -> Vec<(String, String)> {
        m.headers()
            .iter()
            .filter(|h| !callvault::sip::message::same_header(&h.name, "Content-Length"))
            .map(|h| (h.name.clone(), h.value.clone()))
            .collect()
    };
    assert_eq!(strip(m), strip(&again), "{name}: headers changed");
    let body = |m: &SipMessage| match m {
        SipMessage::Request(r) => r.body.clone(),
        SipMessage::Response(r) => r.body.clone(),
    };
    assert_eq!(body(m), body(&again), "{name}: body changed");
}

#[test]
fn decision_table() {
    let mut failures = Vec::new();
    for case in table() {
        let got = parse(&case.msg);
        let outcome = std::panic::catch_unwind(|| match (&case.expect, &got) {
            (Expect::Ok(check), Ok(m)) => {
                check(m);
                assert_round_trip(case.name, m);
            }
            (Expect::Err(want, reply), Err(e)) => {
                assert_eq!(e, want, "error variant");
                let r = error_response_for(&case.msg, e);
                match (reply, r) {
                    (Reply::Drop, None) => {}
                    (Reply::Status(code, reason), Some(r)) => {
                        assert_eq!(r.status, *code);
                        assert!(
                            r.reason.contains(reason),
                            "reason {:?} lacks {reason:?}",
                            r.reason
                        );
                        // The 400 must itself be a well-formed message we would accept.
                        let bytes = r.to_bytes();
                        assert!(!bytes.is_empty());
                        assert!(r.headers.has("Via"));
                    }
                    (want, got) => panic!("reply: wanted {want:?}, got {got:?}"),
                }
            }
            (Expect::Ok(_), Err(e)) => panic!("wanted Ok, got Err({e:?})"),
            (Expect::Err(want, _), Ok(_)) => panic!("wanted Err({want:?}), got Ok"),
        });
        if let Err(p) = outcome {
            let msg = p
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            failures.push(format!("{}: {msg}", case.name));
        }
    }
    assert!(
        failures.is_empty(),
        "{} case(s) failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn error_responses_copy_the_transaction_headers() {
    // insuf: only Via and CSeq exist; the 400 carries exactly those.
    let insuf = table()
        .into_iter()
        .find(|c| c.name.starts_with("insuf"))
        .unwrap();
    let e = parse(&insuf.msg).unwrap_err();
    let r = error_response_for(&insuf.msg, &e).unwrap();
    assert_eq!(r.top_via().unwrap().branch(), Some("z9hG4bKkdj.insuf"));
    assert_eq!(r.headers.get("CSeq"), Some("193942 INVITE"));
    assert!(!r.headers.has("Call-ID"));
    // multi01: first From only, every Via.
    let multi = table()
        .into_iter()
        .find(|c| c.name.starts_with("multi01"))
        .unwrap();
    let e = parse(&multi.msg).unwrap_err();
    let r = error_response_for(&multi.msg, &e).unwrap();
    assert_eq!(r.headers.get_all("From").count(), 1);
    assert_eq!(r.from_tag().as_deref(), Some("3413415"));
    // invalid UTF-8 in Subject: the Call-ID after it is still copied.
    let m = bad_utf8_subject();
    let r = error_response_for(&m, &parse(&m).unwrap_err()).unwrap();
    assert_eq!(r.call_id(), Some("utf8.1@10.0.0.1"));
    // A folded Via is copied joined.
    let m = base_with(
        "Via: SIP/2.0/UDP host.example.com;",
        "Via: SIP/2.0/UDP\n host.example.com;",
    );
    let m = String::from_utf8(m)
        .unwrap()
        .replace("Max-Forwards: 70", "Max Forwards: 70");
    let r = error_response_for(m.as_bytes(), &parse(m.as_bytes()).unwrap_err()).unwrap();
    assert_eq!(r.top_via().unwrap().branch(), Some("z9hG4bKbase"));
}

/// BASE with its Content-Length line replaced by `cl` (any header lines) and `body` appended.
fn framed(cl: &str, body: &str) -> Vec<u8> {
    let head = BASE
        .replace("Content-Length: 0\n\n", cl)
        .replace('\n', "\r\n");
    format!("{head}\r\n\r\n{body}").into_bytes()
}

/// TCP framing (§18.3): Content-Length decides where a message ends.
#[test]
fn stream_framing_table() {
    let one = framed("Content-Length: 5", "hello");
    let n = one.len();
    let cases: Vec<(&str, Vec<u8>, Result<Frame, ParseError>)> = vec![
        ("exact message", one.clone(), Ok(Frame::Message(n))),
        (
            "body not all here",
            one[..n - 1].to_vec(),
            Ok(Frame::Incomplete),
        ),
        (
            "headers not all here",
            one[..40].to_vec(),
            Ok(Frame::Incomplete),
        ),
        (
            "two messages back to back",
            [one.clone(), one.clone()].concat(),
            Ok(Frame::Message(n)),
        ),
        (
            "CRLF keep-alive",
            b"\r\n\r\nOPTIONS".to_vec(),
            Ok(Frame::KeepAlive(4)),
        ),
        (
            "no Content-Length counts as 0",
            framed("X-A: b", "hello"),
            Ok(Frame::Message(framed("X-A: b", "").len())),
        ),
        (
            "folded Content-Length",
            framed("Content-Length:\n 5", "hello"),
            Ok(Frame::Message(framed("Content-Length:\n 5", "hello").len())),
        ),
        (
            "compact l: agreeing",
            framed("Content-Length: 5\nl: 5", "hello"),
            Ok(Frame::Message(
                framed("Content-Length: 5\nl: 5", "hello").len(),
            )),
        ),
        (
            "disagreeing Content-Length",
            framed("Content-Length: 5\nl: 6", "hello!"),
            Err(ParseError::BadContentLength),
        ),
        (
            "negative Content-Length",
            framed("Content-Length: -5", ""),
            Err(ParseError::BadContentLength),
        ),
        (
            "Content-Length over the body limit",
            framed("Content-Length: 99999999999", ""),
            Err(ParseError::BadContentLength),
        ),
        (
            "continuation that looks like Content-Length is not one",
            framed("Subject: x\n Content-Length: 5", "hello"),
            Ok(Frame::Message(
                framed("Subject: x\n Content-Length: 5", "").len(),
            )),
        ),
        (
            "endless header section",
            vec![b'a'; MAX_HEADER_BYTES + 1],
            Err(ParseError::TooLarge),
        ),
    ];
    for (name, buf, want) in cases {
        let got = frame_stream(&buf);
        assert_eq!(got, want, "{name}");
        if let Ok(Frame::Message(len)) = got {
            let m =
                parse(&buf[..len]).unwrap_or_else(|e| panic!("{name}: framed message fails: {e}"));
            let body = match &m {
                SipMessage::Request(r) => r.body.len(),
                SipMessage::Response(r) => r.body.len(),
            };
            let cl = m
                .headers()
                .get("Content-Length")
                .map_or(0, |v| v.trim().parse().unwrap());
            assert_eq!(body, cl, "{name}");
        }
    }
}

/// Regenerates the fuzz seed corpus from this table:
/// `CALLVAULT_DUMP_CORPUS=fuzz/corpus cargo test --test parser_table dump_corpus`.
#[test]
fn dump_corpus() {
    let Some(dir) = std::env::var_os("CALLVAULT_DUMP_CORPUS") else {
        return;
    };
    let dir = std::path::PathBuf::from(dir);
    for target in ["parse_message", "frame_stream"] {
        std::fs::create_dir_all(dir.join(target)).unwrap();
    }
    for (i, case) in table().into_iter().enumerate() {
        // Seeds stay small: libFuzzer mutates short inputs far better.
        if case.msg.len() > 16 * 1024 {
            continue;
        }
        let slug: String = case
            .name
            .chars()
            .take_while(|c| *c != ':')
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
            .collect();
        let name = format!("table_{i:02}_{slug}");
        std::fs::write(dir.join("parse_message").join(&name), &case.msg).unwrap();
        // Stream seeds: the message twice with a keep-alive between, as a TCP reader sees it.
        let mut stream = case.msg.clone();
        stream.extend_from_slice(b"\r\n\r\n");
        stream.extend_from_slice(&case.msg);
        std::fs::write(dir.join("frame_stream").join(&name), &stream).unwrap();
    }
}
