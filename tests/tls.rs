//! PROTOCOL.md section 7, TLS: SIP over TLS and HTTPS through the real binary, with a test CA
//! made here (rcgen) and clients that verify the server against it.

mod common;
#[path = "common/pki.rs"]
mod pki;
#[path = "common/ua.rs"]
mod ua;

use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::rustls;

use common::*;
use pki::{tls_server, Pki};

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

async fn connect(
    config: Arc<rustls::ClientConfig>,
    port: u16,
    name: &str,
) -> std::io::Result<TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(("127.0.0.1", port)).await?;
    let name = rustls::pki_types::ServerName::try_from(name.to_string()).unwrap();
    tokio_rustls::TlsConnector::from(config)
        .connect(name, tcp)
        .await
}

/// Reads one SIP message (headers + Content-Length body) from a stream.
async fn read_sip(s: &mut TlsStream<TcpStream>, buf: &mut Vec<u8>) -> String {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_string();
            let len = head
                .lines()
                .find_map(|l| {
                    let (k, v) = l.split_once(':')?;
                    (k.eq_ignore_ascii_case("content-length") || k == "l")
                        .then(|| v.trim().parse::<usize>().ok())?
                })
                .unwrap_or(0);
            if buf.len() >= end + 4 + len {
                let msg: Vec<u8> = buf.drain(..end + 4 + len).collect();
                return String::from_utf8_lossy(&msg).to_string();
            }
        }
        let mut chunk = [0u8; 4096];
        let n = tokio::time::timeout_at(deadline, s.read(&mut chunk))
            .await
            .expect("no SIP message within 5 s")
            .unwrap();
        assert!(n > 0, "connection closed");
        buf.extend_from_slice(&chunk[..n]);
    }
}

fn request(
    method: &str,
    ruri: &str,
    local: SocketAddr,
    from: &str,
    to: &str,
    extra: &str,
) -> String {
    let branch = format!("z9hG4bK{:x}", rand::random::<u64>());
    format!(
        "{method} {ruri} SIP/2.0\r\nVia: SIP/2.0/TLS {local};branch={branch}\r\nMax-Forwards: 70\r\n\
         From: <{from}>;tag={:x}\r\nTo: <{to}>\r\nCall-ID: {:x}@tls-test\r\nCSeq: 1 {method}\r\n\
         {extra}Content-Length: 0\r\n\r\n",
        rand::random::<u32>(),
        rand::random::<u64>()
    )
}

fn status_of(msg: &str) -> u16 {
    msg.split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

#[test]
fn tls_handshake_with_verifying_client_then_sip_on_the_connection() {
    let pki = Pki::new();
    let (server, port, _p) = tls_server(&pki, false, "");
    runtime().block_on(async {
        let mut s = connect(pki.client(), port, "localhost").await.unwrap();
        let (_, conn) = s.get_ref();
        let version = conn.protocol_version().unwrap();
        assert!(
            matches!(
                version,
                rustls::ProtocolVersion::TLSv1_3 | rustls::ProtocolVersion::TLSv1_2
            ),
            "{version:?}"
        );
        let local = s.get_ref().0.local_addr().unwrap();
        let opt = request(
            "OPTIONS",
            "sip:example.com",
            local,
            "sip:probe@example.com",
            "sip:example.com",
            "",
        );
        s.write_all(opt.as_bytes()).await.unwrap();
        let mut buf = Vec::new();
        let resp = read_sip(&mut s, &mut buf).await;
        assert_eq!(status_of(&resp), 200, "{resp}");
        assert!(resp.contains("SIP/2.0/TLS"), "Via kept: {resp}");

        // A client that trusts another CA refuses callvault's certificate.
        let other = Pki::new();
        assert!(connect(other.client(), port, "localhost").await.is_err());
        // And the certificate is for localhost/127.0.0.1, not another name.
        assert!(connect(pki.client(), port, "example.org").await.is_err());
    });
    drop(server);
}

/// `openssl s_client` with one protocol version: Ok(output) when the handshake completed.
fn s_client(port: u16, version_flag: &str, ca: &str) -> (bool, String) {
    let out = std::process::Command::new("openssl")
        .args([
            "s_client",
            "-connect",
            &format!("127.0.0.1:{port}"),
            version_flag,
            // Security level 0 so the client really offers TLS 1.0/1.1: the refusal must come
            // from callvault, not from the local OpenSSL policy.
            "-cipher",
            "DEFAULT:@SECLEVEL=0",
            "-CAfile",
            ca,
            "-verify_return_error",
        ])
        .stdin(std::process::Stdio::null())
        .output()
        .expect("openssl s_client (apt-get install openssl)");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let done = out.status.success()
        && text.contains("Verify return code: 0 (ok)")
        && !text.contains("Cipher is (NONE)");
    (done, text)
}

#[test]
fn tls_1_0_and_1_1_are_refused_1_2_and_1_3_accepted() {
    let pki = Pki::new();
    let (server, port, _p) = tls_server(&pki, false, "");
    let ca = pki.path("ca.pem");
    for ok in ["-tls1_2", "-tls1_3"] {
        let (done, text) = s_client(port, ok, &ca);
        assert!(done, "{ok} must succeed:\n{text}");
    }
    for old in ["-tls1", "-tls1_1"] {
        let (done, text) = s_client(port, old, &ca);
        assert!(!done, "{old} must be refused:\n{text}");
        // The client did offer the old version (else the test would prove nothing) and the
        // server said no.
        assert!(
            !text.contains("no protocols available"),
            "the local OpenSSL did not offer {old}:\n{text}"
        );
        // rustls answers a ClientHello without 1.2/1.3 with a fatal alert.
        assert!(
            text.contains("Cipher is (NONE)") && text.contains("alert"),
            "{old}: no refusal by the server:\n{text}"
        );
    }
    drop(server);
}

#[test]
fn sips_request_is_never_forwarded_over_udp_or_tcp() {
    let pki = Pki::new();
    // A gateway on UDP that sees whatever callvault forwards.
    let gw = UdpSocket::bind("127.0.0.1:0").unwrap();
    gw.set_read_timeout(Some(Duration::from_millis(1500)))
        .unwrap();
    let gw_port = gw.local_addr().unwrap().port();
    let extra = format!(
        "[[route]]\nprefix = \"\"\ntarget = \"127.0.0.1:{gw_port}\"\ntransport = \"udp\"\n"
    );
    let (server, port, _p) = tls_server(&pki, false, &extra);
    let sdp = "v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\nm=audio 40000 RTP/AVP 0\r\n";
    let invite = |ruri: &str, local: SocketAddr| {
        request(
            "INVITE",
            ruri,
            local,
            "sip:alice@example.com",
            ruri,
            &format!(
                "Contact: <sip:alice@{local};transport=tls>\r\nContent-Type: application/sdp\r\n"
            ),
        )
        .replace(
            "Content-Length: 0\r\n\r\n",
            &format!("Content-Length: {}\r\n\r\n{sdp}", sdp.len()),
        )
    };
    let mut buf = [0u8; 65536];
    runtime().block_on(async {
        let mut s = connect(pki.client(), port, "localhost").await.unwrap();
        let local = s.get_ref().0.local_addr().unwrap();
        let mut rbuf = Vec::new();
        // sips: over TLS to a target reached only over UDP: refused, nothing leaves.
        s.write_all(invite("sips:7001@example.com", local).as_bytes())
            .await
            .unwrap();
        let resp = loop {
            let m = read_sip(&mut s, &mut rbuf).await;
            if status_of(&m) >= 200 {
                break m;
            }
        };
        assert_eq!(status_of(&resp), 480, "{resp}");
        assert!(resp.contains("sips-needs-tls"), "{resp}");
        assert!(
            gw.recv_from(&mut buf).is_err(),
            "a sips: request left over UDP"
        );
        // The same request as sip: is routed (the route works; only sips: was held back).
        s.write_all(invite("sip:7002@example.com", local).as_bytes())
            .await
            .unwrap();
        let (n, _) = gw.recv_from(&mut buf).expect("sip: INVITE routed over UDP");
        let got = String::from_utf8_lossy(&buf[..n]);
        assert!(got.starts_with("INVITE sip:7002@"), "{got}");
    });
    drop(server);
}

#[test]
fn phone_registered_over_tls_is_reached_over_its_connection() {
    let pki = Pki::new();
    let (server, port, _p) = tls_server(&pki, false, "");
    let mut caller = Ua::new("2001", "example.com", server.sip_addr());
    runtime().block_on(async {
        let mut s = connect(pki.client(), port, "localhost").await.unwrap();
        let local = s.get_ref().0.local_addr().unwrap();
        let mut rbuf = Vec::new();
        let reg = request(
            "REGISTER",
            "sip:example.com",
            local,
            "sip:2002@example.com",
            "sip:2002@example.com",
            &format!("Contact: <sip:2002@{local};transport=tls>\r\nExpires: 300\r\n"),
        );
        s.write_all(reg.as_bytes()).await.unwrap();
        let resp = read_sip(&mut s, &mut rbuf).await;
        assert_eq!(status_of(&resp), 200, "{resp}");

        // A MESSAGE from a UDP phone reaches 2002 on the TLS connection it registered over.
        let mut msg = Request::new(Method::Message, "sip:2002@example.com".to_string());
        msg.headers.push("Via", caller.new_via().to_string());
        msg.headers.push("Max-Forwards", "70");
        msg.headers.push("From", "<sip:2001@example.com>;tag=m1");
        msg.headers.push("To", "<sip:2002@example.com>");
        msg.headers.push("Call-ID", "tls-message-1@test");
        msg.headers.push("CSeq", "1 MESSAGE");
        msg.headers.push("Content-Type", "text/plain");
        msg.body = bytes::Bytes::from_static(b"over TLS please");
        caller.send(&msg);
        let got = read_sip(&mut s, &mut rbuf).await;
        assert!(got.starts_with("MESSAGE sip:2002@"), "{got}");
        assert!(
            got.contains("SIP/2.0/TLS"),
            "callvault's Via names TLS: {got}"
        );
        assert!(got.ends_with("over TLS please"), "{got}");
        // Answer on the same connection: the caller gets the 200.
        let mut answer = String::from("SIP/2.0 200 OK\r\n");
        for line in got.lines().skip(1) {
            if line.is_empty() {
                break;
            }
            let name = line.split(':').next().unwrap_or("").to_ascii_lowercase();
            if ["via", "from", "to", "call-id", "cseq"].contains(&name.as_str()) {
                answer.push_str(line);
                if name == "to" {
                    answer.push_str(";tag=b2");
                }
                answer.push_str("\r\n");
            }
        }
        answer.push_str("Content-Length: 0\r\n\r\n");
        s.write_all(answer.as_bytes()).await.unwrap();
        let resp = caller
            .wait_for(
                T,
                |m| matches!(m, SipMessage::Response(r) if r.status >= 200),
            )
            .expect("final response to the MESSAGE");
        let SipMessage::Response(r) = resp else {
            unreachable!()
        };
        assert_eq!(r.status, 200);
    });
    drop(server);
}

#[test]
fn https_serves_the_api_with_the_same_certificate() {
    let pki = Pki::new();
    let (server, _port, _p) = tls_server(&pki, true, "");
    let http_port = server.http_addr().port();
    runtime().block_on(async {
        let mut s = connect(pki.client(), http_port, "127.0.0.1").await.unwrap();
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut body = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut body))
            .await
            .unwrap()
            .ok();
        let text = String::from_utf8_lossy(&body);
        assert!(text.starts_with("HTTP/1.1 200"), "{text}");
        assert!(text.contains("callvault_"), "{text}");
    });
    // Plain HTTP on the HTTPS port gets no answer.
    assert!(http_get(server.http_addr(), "/metrics").is_err());
    drop(server);
}

use callvault::sip::message::{Method, Request, SipMessage};
use ua::{Ua, T};

/// A `[[route]]` with `transport = "tls"`: callvault connects over TLS, verifies the gateway
/// against `[tls] ca_file` by the route's host name, and forwards `sips:` requests there.
#[test]
fn tls_route_carries_sips_requests_to_a_verified_gateway() {
    let pki = Pki::new();
    let rt = runtime();
    rt.block_on(async {
        let server_cfg = callvault::transport::tls::server_config(&callvault::config::TlsConfig {
            cert_file: pki.path("cert.pem"),
            key_file: pki.path("key.pem"),
            ca_file: String::new(),
        })
        .unwrap();
        let gw = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let gw_port = gw.local_addr().unwrap().port();
        let extra = format!(
            "[[route]]\nprefix = \"8\"\ntarget = \"localhost:{gw_port}\"\ntransport = \"tls\"\n"
        );
        let (server, port, _p) = tls_server(&pki, false, &extra);
        let mut s = connect(pki.client(), port, "localhost").await.unwrap();
        let local = s.get_ref().0.local_addr().unwrap();
        let inv = request(
            "INVITE",
            "sips:8001@example.com",
            local,
            "sips:alice@example.com",
            "sips:8001@example.com",
            &format!("Contact: <sips:alice@{local}>\r\n"),
        );
        s.write_all(inv.as_bytes()).await.unwrap();
        let (tcp, _) = tokio::time::timeout(Duration::from_secs(5), gw.accept())
            .await
            .expect("callvault connects to the TLS gateway")
            .unwrap();
        let mut tls = tokio_rustls::TlsAcceptor::from(server_cfg)
            .accept(tcp)
            .await
            .expect("TLS handshake with the gateway");
        let mut buf = vec![0u8; 8192];
        let n = tokio::time::timeout(Duration::from_secs(5), tls.read(&mut buf))
            .await
            .unwrap()
            .unwrap();
        let got = String::from_utf8_lossy(&buf[..n]).to_string();
        assert!(
            got.starts_with("INVITE sips:8001@localhost:"),
            "stays sips: {got}"
        );
        assert!(got.contains(";transport=tls"), "{got}");
        assert!(got.contains("SIP/2.0/TLS"), "{got}");
        drop(server);
    });
}

/// With `[http] tls = true` the URLs callvault writes use https:// (here the prompt's
/// `upload_url`), and the upload URL works over TLS with the same certificate.
#[test]
fn https_urls_in_prompts() {
    let pki = Pki::new();
    let (server, _port, _p) = tls_server(&pki, true, "");
    server.account_add("1002", "pw", "4321", "10MiB");
    let mut c = ua::Call::establish(server.sip_addr(), "1001", "1002");
    let resp = c.b.in_dialog(
        &mut c.bd,
        Method::Message,
        &[(
            "Content-Type",
            "application/vnd.callvault.store-request+json",
        )],
        br#"{"pin":"4321"}"#,
    );
    assert!(resp.status < 300, "{resp:?}");
    let p = c.a.expect_request(
        Method::Message,
        Some("application/vnd.callvault.prompt+json"),
        T,
    );
    c.a.respond(&p, 200, &[], b"");
    let prompt: serde_json::Value = serde_json::from_slice(&p.body).unwrap();
    let upload = prompt["upload_url"].as_str().unwrap().to_string();
    let http = server.http_addr();
    assert!(
        upload.starts_with(&format!("https://127.0.0.1:{}/v1/stores/", http.port())),
        "{upload}"
    );
    // The server behind those URLs speaks TLS: the store's metadata with the upload token.
    let token = upload.split("token=").nth(1).unwrap().to_string();
    let id = prompt["store_id"].as_str().unwrap().to_string();
    runtime().block_on(async {
        let mut s = connect(pki.client(), http.port(), "127.0.0.1").await.unwrap();
        let req = format!(
            "GET /v1/stores/{id}?token={token} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
        );
        s.write_all(req.as_bytes()).await.unwrap();
        let mut body = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut body))
            .await
            .unwrap()
            .ok();
        let text = String::from_utf8_lossy(&body);
        assert!(text.starts_with("HTTP/1.1 200"), "{text}");
        assert!(text.contains(&id), "{text}");
    });
}
