mod common;
use common::*;
use std::time::Duration;
#[test]
fn scratch_all() {
    for t in [Transport::Udp, Transport::Tcp] {
        for name in ["basic", "info_message", "cancel", "callee_bye", "hold"] {
            let mut cfg = ServerConfig::new();
            let uas_ports = PortBlock::reserve(6);
            cfg.route_to = Some((uas_ports.port(0), t));
            let s = Server::spawn(cfg);
            let up = PortBlock::reserve(6);
            let cap = RtpCapture::start(&[uas_ports.port(2), up.port(2)]);
            let uas = Sipp::uas(name).transport(t).port(uas_ports.port(0)).media_port(uas_ports.port(2)).timeout(Duration::from_secs(30)).spawn();
            let uac = Sipp::uac(name, s.sip_addr()).transport(t).port(up.port(0)).media_port(up.port(2)).timeout(Duration::from_secs(30)).run();
            let uas = uas.wait();
            let c = cap.map(|c| c.stop()).unwrap_or_default();
            println!("{name} {t:?}: uac ok={} uas ok={} rtp uac={} uas={}", uac.all_successful(1), uas.all_successful(1), c.to_port(up.port(2)), c.to_port(uas_ports.port(2)));
            if !uac.all_successful(1) { println!("UAC {}", uac.errors); println!("{}", &uac.messages[uac.messages.len().saturating_sub(3000)..]); }
            if !uas.all_successful(1) { println!("UAS {}", uas.errors); println!("{}", &uas.messages[uas.messages.len().saturating_sub(3000)..]); }
        }
    }
    // register: no trusted peers
    let mut cfg = ServerConfig::new();
    cfg.trust_loopback = false;
    let s = Server::prepare(cfg);
    s.account_add("1001", "secret", "4321", "50MiB");
    let mut s = s; s.start();
    let up = PortBlock::reserve(6);
    let r = Sipp::uac("register", s.sip_addr()).port(up.port(0)).media_port(up.port(2)).timeout(Duration::from_secs(20)).run();
    println!("register: ok={}", r.all_successful(1));
    if !r.all_successful(1) { println!("{}\n{}", r.errors, r.messages); }
    let r = Sipp::uac("malformed", s.sip_addr()).port(up.port(0)).media_port(up.port(2)).timeout(Duration::from_secs(10)).run();
    println!("malformed: ok={}", r.all_successful(1));
    if !r.all_successful(1) { println!("{}\n{}", r.errors, r.messages); }
}
