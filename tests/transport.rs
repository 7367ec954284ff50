//! SIP transports against a running callvault, with plain sockets: TCP framing, connection
//! reuse and idle close, RFC 3261 §18.2.2 / RFC 3581 response routing, garbage on UDP.

mod common;

use std::io::{Read, Write};
use std::net::{TcpStream, UdpSocket};
use std::time::Duration;

use common::*;

fn options(branch: &str, via_port: u16, rport: bool, transport: &str) -> String {
    let rport = if rport { ";rport" } else { "" };
    format!(
        "OPTIONS sip:callvault@127.0.0.1 SIP/2.0\r\n\
         Via: SIP/2.0/{transport} 127.0.0.1:{via_port};branch=z9hG4bK{branch}{rport}\r\n\
         Max-Forwards: 70\r\n\
         From: <sip:probe@example.com>;tag={branch}\r\n\
         To: <sip:callvault@example.com>\r\n\
         Call-ID: {branch}@probe\r\n\
         CSeq: 1 OPTIONS\r\n\
         Content-Length: 0\r\n\r\n"
    )
}

fn read_responses(s: &mut TcpStream, want: usize) -> String {
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut got = String::new();
    let mut buf = [0u8; 4096];
    while got.matches("SIP/2.0 200").count() < want {
        let n = s.read(&mut buf).unwrap();
        assert!(n > 0, "connection closed early; got {got}");
        got.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    got
}

#[test]
fn tcp_framing_reuse_and_idle_close() {
    // Short idle timeout for this server only (this test binary's environment).
    std::env::set_var("CALLVAULT_SIP_TCP_IDLE_SECS", "1");
    let server = Server::spawn(ServerConfig::new());
    std::env::remove_var("CALLVAULT_SIP_TCP_IDLE_SECS");

    let mut s = TcpStream::connect(server.sip_addr()).unwrap();
    // Two messages in one segment, then one split in the middle of a header.
    let two = format!(
        "{}{}",
        options("a1", 1, false, "TCP"),
        options("a2", 1, false, "TCP")
    );
    s.write_all(two.as_bytes()).unwrap();
    let got = read_responses(&mut s, 2);
    assert!(
        got.contains("Call-ID: a1@probe") && got.contains("Call-ID: a2@probe"),
        "{got}"
    );
    let third = options("a3", 1, false, "TCP");
    let (x, y) = third.split_at(60);
    s.write_all(x.as_bytes()).unwrap();
    std::thread::sleep(Duration::from_millis(200));
    s.write_all(y.as_bytes()).unwrap();
    let got = read_responses(&mut s, 1);
    assert!(got.contains("Call-ID: a3@probe"), "{got}");

    // Idle for longer than tcp_idle_secs: the server closes the connection.
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut buf = [0u8; 16];
    let n = s.read(&mut buf).unwrap_or(0);
    assert_eq!(n, 0, "connection should be closed after the idle timeout");
}

#[test]
fn udp_responses_follow_rport_or_via_port() {
    let server = Server::spawn(ServerConfig::new());
    let sender = UdpSocket::bind("127.0.0.1:0").unwrap();
    let listener = UdpSocket::bind("127.0.0.1:0").unwrap();
    for s in [&sender, &listener] {
        s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    }
    let via_port = listener.local_addr().unwrap().port();
    let mut buf = [0u8; 4096];

    // No rport: the response goes to the Via's sent-by port, not the source port.
    sender
        .send_to(
            options("u1", via_port, false, "UDP").as_bytes(),
            server.sip_addr(),
        )
        .unwrap();
    let n = listener.recv(&mut buf).unwrap();
    let text = String::from_utf8_lossy(&buf[..n]).to_string();
    assert!(text.starts_with("SIP/2.0 200"), "{text}");
    assert!(text.contains("Allow:"), "{text}");

    // rport: back to the source, with received/rport filled in.
    sender
        .send_to(
            options("u2", via_port, true, "UDP").as_bytes(),
            server.sip_addr(),
        )
        .unwrap();
    let n = sender.recv(&mut buf).unwrap();
    let text = String::from_utf8_lossy(&buf[..n]).to_string();
    let src = sender.local_addr().unwrap().port();
    assert!(text.contains(&format!("rport={src}")), "{text}");
}

#[test]
fn garbage_on_udp_is_survived() {
    let server = Server::spawn(ServerConfig::new());
    let s = UdpSocket::bind("127.0.0.1:0").unwrap();
    s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    let port = s.local_addr().unwrap().port();
    let junk: [&[u8]; 5] = [
        b"\x00\x01\x02\xff\xfe",
        b"INVITE",
        b"SIP/2.0 200 OK\r\n\r\n",
        b"OPTIONS sip:x SIP/2.0\r\nVia: SIP/2.0/UDP h;branch=z9hG4bK1\r\n",
        &[0xffu8; 1400],
    ];
    for j in junk {
        s.send_to(j, server.sip_addr()).unwrap();
    }
    s.send_to(
        options("g1", port, true, "UDP").as_bytes(),
        server.sip_addr(),
    )
    .unwrap();
    // Junk that still names a Via may be answered 400 first; the OPTIONS must get its 200.
    let mut buf = [0u8; 4096];
    let mut got = Vec::new();
    loop {
        let n = s.recv(&mut buf).unwrap();
        let text = String::from_utf8_lossy(&buf[..n]).to_string();
        if text.starts_with("SIP/2.0 200") {
            break;
        }
        assert!(text.starts_with("SIP/2.0 400"), "{text}");
        got.push(text);
        assert!(got.len() < 5, "{got:?}");
    }
    let text = server.metrics();
    assert!(
        metric_value(&text, "callvault_sip_malformed_total", &[]).unwrap_or(0.0) >= 3.0,
        "{text}"
    );
}
