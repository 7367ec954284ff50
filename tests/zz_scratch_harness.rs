mod common;
use common::*;
use std::time::Duration;
#[test]
fn scratch_server() {
    let mut cfg = ServerConfig::new();
    let uas_ports = PortBlock::reserve(6);
    cfg.route_to = Some((uas_ports.port(0), Transport::Udp));
    let s = Server::prepare(cfg);
    s.account_add("1001", "secret", "4321", "50MiB");
    let mut s = s;
    s.start();
    eprintln!("LOG:\n{}", s.log());
    let m = s.metrics();
    eprintln!("METRICS:\n{m}");
    let cap = RtpCapture::start(&[uas_ports.port(2), uas_ports.port(4)+0]);
    let uas = Sipp::uas("basic").port(uas_ports.port(0)).media_port(uas_ports.port(2)).timeout(Duration::from_secs(20)).spawn();
    let up = PortBlock::reserve(6);
    let uac = Sipp::uac("basic", s.sip_addr()).port(up.port(0)).media_port(up.port(2)).timeout(Duration::from_secs(20)).run();
    let uas = uas.wait();
    eprintln!("UAC {uac}\nUAS {uas}");
    if let Some(c) = cap { eprintln!("{:?}", c.stop()); }
    eprintln!("METRICS:\n{}", s.metrics());
    eprintln!("stop: {:?}", s.stop());
    eprintln!("LOG:\n{}", s.log());
}
