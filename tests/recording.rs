//! Whole-call recording (PROTOCOL.md §1, §5 "Recorded calls"): with `[media] record_calls`,
//! one SIPp call with 5 s of PCMU each way through callvault leaves two `call-recording`
//! stores, one per direction, listed to the admin with leg A's Call-ID and downloadable.
//! The whole call (`?call=both`): a pcap of both legs' SIP and both directions' RTP that
//! tshark reads as RTP, and a stereo WAV with A's audio left and B's right.
//!
//! Skips with a SKIPPED line when SIPp is missing, unless `CALLVAULT_REQUIRE_TOOLS=1`.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::*;

const ADMIN: &str = "recording-admin-token";
/// 250 packets of 160 PCMU bytes: sip-scenarios/audio/pcmu-5s.pcap.
const BYTES_5S: u64 = 250 * 160;

fn admin_get(addr: SocketAddr, path: &str) -> (u16, Vec<u8>) {
    common::admin_get(addr, ADMIN, path)
}

fn complete_recordings(server: &Server, n: usize) -> Vec<serde_json::Value> {
    common::complete_recordings(server, ADMIN, n)
}

/// A server that records calls and routes to a SIPp UAS, with that UAS and the UAC of one
/// basic call through it (not started yet), each given `timeout`.
struct RecordedCall {
    /// The SIPp ports, reserved while the test runs.
    _ports: PortBlock,
    server: Server,
    uas: Sipp,
    uac: Sipp,
}

fn recorded_call(timeout: Duration) -> RecordedCall {
    recorded_call_with(timeout, common::scenarios_dir().join("basic_uas.xml"))
}

/// [`recorded_call`] with another UAS scenario file.
fn recorded_call_with(timeout: Duration, uas_scenario: PathBuf) -> RecordedCall {
    let ports = PortBlock::reserve(10);
    let (uas_sip, uac_sip, uas_media, uac_media) =
        (ports.port(0), ports.port(1), ports.port(2), ports.port(6));
    let mut cfg = ServerConfig::new();
    cfg.rtp = PortBlock::reserve(20);
    cfg.route_to = Some((uas_sip, Transport::Udp));
    let mut server = Server::prepare(cfg);
    server.set_env("CALLVAULT_MEDIA_RECORD_CALLS", "true");
    server.set_env("CALLVAULT_HTTP_ADMIN_TOKEN", ADMIN);
    server.start();
    let uas = Sipp::new(uas_scenario, "uas")
        .port(uas_sip)
        .media_port(uas_media)
        .transport(Transport::Udp)
        .calls(1)
        .timeout(timeout)
        .trace_messages(true);
    let uac = Sipp::uac("basic", server.sip_addr())
        .port(uac_sip)
        .media_port(uac_media)
        .transport(Transport::Udp)
        .calls(1)
        .timeout(timeout)
        .trace_messages(true);
    RecordedCall {
        _ports: ports,
        server,
        uas,
        uac,
    }
}

/// The audio of a 5 s call, less what was sent before its recording started: the stores are
/// made once the call is answered, while SIPp starts its RTP at the ACK, so a loaded machine
/// misses the first few packets (4 of 250 seen under the full suite). Never more than sent.
fn recorded_most_of(got: u64, want: u64) -> bool {
    got * 100 >= want * 95 && got <= want
}

#[test]
fn recorded_call_lists_two_complete_stores_with_the_audio() {
    if !tool_available("sipp") {
        return;
    }
    let RecordedCall {
        _ports,
        server,
        uas,
        uac,
    } = recorded_call(Duration::from_secs(60));
    let uas = uas.spawn();
    let uac = uac.run();
    let uas = uas.wait();
    uac.assert_successful(1);
    uas.assert_successful(1);
    // Leg A's Call-ID: the one the UAC used.
    let call_id = uac
        .messages
        .lines()
        .find_map(|l| {
            let (name, value) = l.split_once(':')?;
            name.trim()
                .eq_ignore_ascii_case("Call-ID")
                .then(|| value.trim().to_string())
        })
        .expect("Call-ID in the UAC trace");

    // The stores finish once the relay has stopped and the logs are committed.
    let http = server.http_addr();
    let stores = complete_recordings(&server, 2);

    let mut senders = Vec::new();
    for s in &stores {
        assert_eq!(s["call_id"], call_id.as_str(), "{s:#}");
        let got = s["received_bytes"].as_u64().unwrap();
        assert!(recorded_most_of(got, BYTES_5S), "received {got}: {s:#}");
        senders.push(s["sender"].as_str().unwrap().to_string());
        let id = s["store_id"].as_str().unwrap();
        let (status, media) = admin_get(http, &format!("/v1/stores/{id}/media?format=raw"));
        assert_eq!(status, 200, "{}", String::from_utf8_lossy(&media));
        assert_eq!(media.len() as u64, got, "raw download of {id}");
    }
    // One store per direction: each party sends one of them.
    senders.sort();
    senders.dedup();
    assert_eq!(senders.len(), 2, "{stores:#?}");
}

/// A crash mid-call keeps every committed byte of both recordings: callvault is killed
/// (SIGKILL) while the call's audio flows and restarted on the same data; both stores come
/// back `truncated` with what was written before the kill, readable to the last record.
#[test]
fn recordings_survive_a_kill_mid_call_with_every_committed_byte() {
    if !tool_available("sipp") {
        return;
    }
    let RecordedCall {
        _ports,
        mut server,
        uas,
        uac,
    } = recorded_call(Duration::from_secs(20));
    let _uas = uas.spawn();
    let _uac = uac.spawn();
    // Audio is flowing into both recordings...
    let deadline = Instant::now() + Duration::from_secs(15);
    while metric_value(&server.metrics(), "callvault_rtp_packets_stored_total", &[]).unwrap_or(0.0)
        < 100.0
    {
        assert!(
            Instant::now() < deadline,
            "no recorded packets\n{}",
            server.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // ...long enough for at least one write of each log (1 s batches, 250 ms ticks).
    std::thread::sleep(Duration::from_millis(2000));
    server.kill_hard();
    server.start();

    let recs = common::recordings(&server, ADMIN);
    assert_eq!(recs.len(), 2, "{recs:#?}");
    for s in &recs {
        assert_eq!(s["state"], "truncated", "{s:#}");
        let got = s["received_bytes"].as_u64().unwrap();
        // At least half a second of 160-byte packets was written before the kill, and never
        // more than the 5 s the call carries.
        assert!(
            (25 * 160..=BYTES_5S).contains(&got),
            "received {got}: {s:#}"
        );
        let id = s["store_id"].as_str().unwrap();
        let (status, media) = admin_get(
            server.http_addr(),
            &format!("/v1/stores/{id}/media?format=raw"),
        );
        assert_eq!(status, 200, "{}", String::from_utf8_lossy(&media));
        assert_eq!(
            media.len() as u64,
            got,
            "raw download of {id} after recovery"
        );
    }
}

/// A pcap SIPp can play (Ethernet/IPv4/UDP/RTP, PT 0, 20 ms apart): `packets` packets of 160
/// bytes of a square wave in mu-law, so B's audio cannot be mistaken for A's speech.
fn square_wave_pcap(path: &Path, packets: u16) {
    let mut out = Vec::new();
    for v in [0xa1b2_c3d4u32, 0x0004_0002, 0, 0, 65_535, 1] {
        if v == 0x0004_0002 {
            out.extend_from_slice(&2u16.to_le_bytes());
            out.extend_from_slice(&4u16.to_le_bytes());
        } else {
            out.extend_from_slice(&v.to_le_bytes());
        }
    }
    for i in 0..packets {
        let mut rtp = vec![0x80, if i == 0 { 0x80 } else { 0 }];
        rtp.extend_from_slice(&i.to_be_bytes());
        rtp.extend_from_slice(&(160 * u32::from(i)).to_be_bytes());
        rtp.extend_from_slice(&0x5151_5151u32.to_be_bytes());
        rtp.extend((0..160).map(|j| if (j / 10) % 2 == 0 { 0x20u8 } else { 0xa0 }));
        let udp_len = 8 + rtp.len();
        let ip_len = 20 + udp_len;
        let mut ip = vec![0x45, 0];
        ip.extend_from_slice(&(ip_len as u16).to_be_bytes());
        ip.extend_from_slice(&i.to_be_bytes());
        ip.extend_from_slice(&[0x40, 0, 64, 17, 0, 0, 127, 0, 0, 1, 127, 0, 0, 1]);
        let mut sum: u32 = ip
            .chunks(2)
            .map(|c| u32::from(u16::from_be_bytes([c[0], c[1]])))
            .sum();
        while sum > 0xffff {
            sum = (sum & 0xffff) + (sum >> 16);
        }
        ip[10..12].copy_from_slice(&(!(sum as u16)).to_be_bytes());
        let mut frame = vec![2, 0, 0, 0, 0, 2, 2, 0, 0, 0, 0, 1, 8, 0];
        frame.extend_from_slice(&ip);
        frame.extend_from_slice(&6000u16.to_be_bytes());
        frame.extend_from_slice(&6002u16.to_be_bytes());
        frame.extend_from_slice(&(udp_len as u16).to_be_bytes());
        frame.extend_from_slice(&[0, 0]);
        frame.extend_from_slice(&rtp);
        let us = 20_000 * u64::from(i);
        out.extend_from_slice(&(1_700_000_000 + (us / 1_000_000) as u32).to_le_bytes());
        out.extend_from_slice(&((us % 1_000_000) as u32).to_le_bytes());
        out.extend_from_slice(&(frame.len() as u32).to_le_bytes());
        out.extend_from_slice(&(frame.len() as u32).to_le_bytes());
        out.extend_from_slice(&frame);
    }
    std::fs::write(path, out).unwrap();
}

/// `tshark -r FILE -Y FILTER -T fields -e ..` (no decode-as), one line per packet.
fn tshark(pcap: &Path, filter: &str, fields: &[&str]) -> Vec<String> {
    let mut cmd = std::process::Command::new("tshark");
    cmd.arg("-r").arg(pcap).args(["-Y", filter, "-T", "fields"]);
    for f in fields {
        cmd.args(["-e", f]);
    }
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect()
}

/// A WAV decoded by sox to 16-bit samples (interleaved when stereo).
fn sox_samples(wav: &[u8], dir: &Path, name: &str) -> Vec<i16> {
    let (src, dst) = (
        dir.join(format!("{name}.wav")),
        dir.join(format!("{name}.raw")),
    );
    std::fs::write(&src, wav).unwrap();
    let out = std::process::Command::new("sox")
        .arg(&src)
        .args(["-t", "raw", "-e", "signed-integer", "-b", "16", "-L"])
        .arg(&dst)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "sox {name}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::read(&dst)
        .unwrap()
        .chunks(2)
        .map(|c| i16::from_le_bytes([c[0], c[1]]))
        .collect()
}

fn nonzero(samples: impl Iterator<Item = i16>) -> Vec<i16> {
    samples.filter(|s| *s != 0).collect()
}

#[test]
fn whole_call_pcap_and_stereo_wav_of_a_recorded_call() {
    if !tool_available("sipp") || !tool_available("tshark") || !tool_available("sox") {
        return;
    }
    // B plays a square wave, A the speech of pcmu-5s.pcap.
    let files = tempfile::tempdir().unwrap();
    let tone = files.path().join("square-5s.pcap");
    square_wave_pcap(&tone, 250);
    let uas_xml = std::fs::read_to_string(common::scenarios_dir().join("basic_uas.xml"))
        .unwrap()
        .replace("audio/pcmu-5s.pcap", &tone.display().to_string());
    let uas_path = files.path().join("square_uas.xml");
    std::fs::write(&uas_path, uas_xml).unwrap();
    let RecordedCall {
        _ports: ports,
        server,
        uas,
        uac,
    } = recorded_call_with(Duration::from_secs(60), uas_path);
    let (uas_sip, uac_sip, uas_media, uac_media) =
        (ports.port(0), ports.port(1), ports.port(2), ports.port(6));
    let uas = uas.spawn();
    let uac = uac.run();
    let uas = uas.wait();
    uac.assert_successful(1);
    uas.assert_successful(1);

    // Each direction is marked: `a` is the caller's audio, `b` the callee's.
    let recs = complete_recordings(&server, 2);
    let by_dir = |d: &str| {
        recs.iter()
            .find(|s| s["direction"] == d)
            .unwrap_or_else(|| panic!("no direction {d}: {recs:#?}"))
    };
    let (a, b) = (by_dir("a"), by_dir("b"));
    assert_eq!(a["sender"], "sip:1001@example.com", "{a:#}");
    assert_eq!(b["receiver"], "sip:1001@example.com", "{b:#}");
    assert_eq!(a["call_id"], b["call_id"]);
    let (a_id, b_id) = (
        a["store_id"].as_str().unwrap(),
        b["store_id"].as_str().unwrap(),
    );
    let http = server.http_addr();

    // The pcap of both directions, asked on B's store: both legs' INVITE/200 on the real SIP
    // ports (callvault's listener is not 5060) and both directions' RTP, without decode-as.
    let (status, pcap) = admin_get(
        http,
        &format!("/v1/stores/{b_id}/media?format=pcap&call=both"),
    );
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&pcap));
    let pcap_path = files.path().join("call.pcap");
    std::fs::write(&pcap_path, &pcap).unwrap();
    let cv = server.sip_addr().port();
    assert_ne!(cv, 5060);
    let sip = tshark(
        &pcap_path,
        "sip",
        &[
            "udp.srcport",
            "udp.dstport",
            "sip.Method",
            "sip.Status-Code",
            "sdp.media.port",
        ],
    );
    let field = |line: &str, i: usize| line.split('\t').nth(i).unwrap_or("").to_string();
    assert_eq!(sip.len(), 4, "{sip:#?}");
    assert_eq!(
        sip[0],
        format!("{uac_sip}\t{cv}\tINVITE\t\t{uac_media}"),
        "leg A's INVITE"
    );
    assert!(
        sip[1].starts_with(&format!("{cv}\t{uac_sip}\t\t200\t")),
        "{sip:#?}"
    );
    assert!(
        sip[2].starts_with(&format!("{cv}\t{uas_sip}\tINVITE\t\t")),
        "leg B's INVITE from callvault: {sip:#?}"
    );
    assert_eq!(sip[3], format!("{uas_sip}\t{cv}\t\t200\t{uas_media}"));
    let (relay_a, relay_b) = (field(&sip[1], 4), field(&sip[2], 4));
    assert_ne!(relay_a, relay_b);
    let call_ids = tshark(&pcap_path, "sip.Method == \"INVITE\"", &["sip.Call-ID"]);
    assert_eq!(
        call_ids[0],
        a["call_id"].as_str().unwrap(),
        "leg A's own Call-ID"
    );
    assert_ne!(call_ids[1], call_ids[0], "leg B has its own Call-ID");

    let rtp = tshark(
        &pcap_path,
        "rtp",
        &["udp.srcport", "udp.dstport", "rtp.payload"],
    );
    let count = |from: u16, to: &str| {
        rtp.iter()
            .filter(|l| field(l, 0) == from.to_string() && field(l, 1) == to)
            .count()
    };
    let (from_a, from_b) = (count(uac_media, &relay_a), count(uas_media, &relay_b));
    assert!(
        from_a >= 245 && from_b >= 245,
        "A->B {from_a}, B->A {from_b}"
    );
    assert_eq!(
        from_a + from_b,
        rtp.len(),
        "every packet is one of the two streams"
    );
    // B's square wave (tshark prints bytes with or without colons by version).
    let b_payload = |l: &String| field(l, 2).replace(':', "");
    assert!(
        rtp.iter()
            .filter(|l| field(l, 0) == uas_media.to_string())
            .all(|l| b_payload(l).starts_with("20202020")),
        "B's stream carries B's square wave: {:?}",
        rtp.iter().find(|l| field(l, 0) == uas_media.to_string())
    );

    // The stereo WAV: PCM, 2 channels, 8000 Hz, 16 bits; left is A's audio, right B's, each
    // the same samples as its own direction's WAV decoded (silence aside).
    let (status, wav) = admin_get(
        http,
        &format!("/v1/stores/{a_id}/media?format=wav&call=both"),
    );
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&wav));
    let u16_at = |at: usize| u16::from_le_bytes([wav[at], wav[at + 1]]);
    let u32_at = |at: usize| u32::from_le_bytes(wav[at..at + 4].try_into().unwrap());
    assert_eq!(&wav[0..4], b"RIFF");
    assert_eq!(&wav[8..16], b"WAVEfmt ");
    assert_eq!(u16_at(20), 1, "PCM");
    assert_eq!(u16_at(22), 2, "channels");
    assert_eq!(u32_at(24), 8000, "rate");
    assert_eq!(u16_at(34), 16, "bits");
    assert_eq!(&wav[36..40], b"data");
    assert_eq!(
        u32_at(40) as usize,
        wav.len() - 44,
        "the data size is the real one"
    );
    let stereo = sox_samples(&wav, files.path(), "stereo");
    let frames = stereo.len() / 2;
    assert!(
        (4 * 8000..7 * 8000).contains(&frames),
        "{frames} frames for a 5 s call"
    );
    let left = nonzero(stereo.iter().step_by(2).copied());
    let right = nonzero(stereo.iter().skip(1).step_by(2).copied());
    let mono = |id: &str, name: &str| {
        let (status, w) = admin_get(http, &format!("/v1/stores/{id}/media?format=wav"));
        assert_eq!(status, 200);
        nonzero(sox_samples(&w, files.path(), name).into_iter())
    };
    let (a_audio, b_audio) = (mono(a_id, "a"), mono(b_id, "b"));
    assert!(!a_audio.is_empty() && !b_audio.is_empty());
    assert_ne!(a_audio, b_audio, "the two sides sent different audio");
    assert!(left == a_audio, "left channel is A's audio");
    assert!(right == b_audio, "right channel is B's audio");
    // Aligned by arrival: both sides started on the ACK, within a second of each other.
    let first = |ch: usize| stereo.iter().skip(ch).step_by(2).position(|s| *s != 0);
    let right_start = first(1).unwrap();
    assert!(
        right_start < 8000,
        "B's audio starts at frame {right_start}"
    );

    // Raw bytes have no whole-call form.
    let (status, _) = admin_get(
        http,
        &format!("/v1/stores/{a_id}/media?format=raw&call=both"),
    );
    assert_eq!(status, 400);
    // A direction's download token opens that direction, not the whole call.
    let token = store_token(&server, a_id);
    let get = |q: &str| {
        common::http_get_bytes(http, &format!("/v1/stores/{a_id}/media?{q}&token={token}"))
            .unwrap()
            .0
    };
    assert_eq!(get("format=wav"), 200);
    assert_eq!(get("format=wav&call=both"), 403);
    // Without credentials: nothing.
    let (status, _) = common::http_get_bytes(
        http,
        &format!("/v1/stores/{a_id}/media?format=pcap&call=both"),
    )
    .unwrap();
    assert_eq!(status, 401);
}

/// A store's download token, read from the server's database.
fn store_token(server: &Server, id: &str) -> String {
    let url = server.metadata_url();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let db = callvault::storage::Db::open(&url).await.unwrap();
        let st = callvault::storage::stores::Stores::new(db.clone())
            .get(id)
            .await
            .unwrap()
            .expect("the store");
        db.close().await;
        st.token
    })
}
