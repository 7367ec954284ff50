//! Store media on S3 (PROTOCOL.md 6, issue 11): a `callvault serve` process with
//! `objects = "s3://..."` against a real `s3s-fs` process (tests/common/s3.rs). While a store
//! receives (a SIPp store session), its chunks reach the bucket at least once a second; once
//! finished it is read from the bucket alone (the node's local log deleted), byte for byte.

mod common;
#[path = "common/ua.rs"]
mod ua;

use std::time::{Duration, Instant};

use callvault::storage::stores::Store;
use common::s3::S3sFs;
use common::{Server, ServerConfig};
use ua::{payload, sdp, sdp_audio, Call, Rtp, PCMU};

const BUCKET: &str = "cv-media";

fn server_on(s3: &S3sFs) -> Server {
    let mut s = Server::prepare(ServerConfig::new());
    s.set_env("CALLVAULT_STORAGE_OBJECTS", &format!("s3://{BUCKET}"));
    s.set_env("CALLVAULT_STORAGE_S3_ENDPOINT", &s3.endpoint);
    s.set_env("AWS_ACCESS_KEY_ID", common::s3::ACCESS_KEY);
    s.set_env("AWS_SECRET_ACCESS_KEY", common::s3::SECRET_KEY);
    s.account_add("1001", "secret", "4321", "50MiB");
    s.account_add("1002", "secret", "4321", "50MiB");
    s.start();
    s
}

fn store_meta(server: &Server, id: &str) -> Store {
    let url = format!(
        "sqlite://{}",
        server.dir.path().join("data/callvault.db").display()
    );
    let id = id.to_string();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let db = callvault::storage::db::Db::open(&url).await.unwrap();
        let st = callvault::storage::stores::Stores::new(db.clone())
            .get(&id)
            .await
            .unwrap()
            .unwrap();
        db.close().await;
        st
    })
}

#[test]
fn store_media_reaches_s3_every_second_and_is_read_from_it_alone() {
    let Some(s3) = S3sFs::start() else { return };
    let server = server_on(&s3);
    assert!(
        server.log().contains("s3://cv-media"),
        "objects on S3:\n{}",
        server.log()
    );
    let mut c = Call::establish(server.sip_addr(), "1001", "1002");
    let prompt = c.ask_for_storage(r#"{"pin":"4321"}"#);
    let id = prompt["store_id"].as_str().unwrap().to_string();

    // The store session is SIPp's (storage_store_uac: 10 s of PCMU from a pcap, as 1001).
    let ports = common::PortBlock::reserve(4);
    let store = common::Sipp::uac("storage_store", server.sip_addr())
        .port(ports.port(0))
        .media_port(ports.port(2))
        .service(&id)
        .timeout(Duration::from_secs(30))
        .spawn();
    let sipp = std::thread::spawn(move || store.wait());
    // Watch the bucket's folder of the store while it receives.
    let chunk_dir = format!("stores/{id}");
    let started = Instant::now();
    let mut seen = 0usize;
    let mut appeared = Vec::new();
    while !sipp.is_finished() {
        let n = s3
            .keys(BUCKET, &chunk_dir)
            .iter()
            .filter(|k| k.ends_with(".chunk"))
            .count();
        if n > seen {
            seen = n;
            appeared.push(started.elapsed());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    sipp.join().unwrap().assert_successful(1);

    // 10 s of media: chunks all along, never a second apart.
    assert!(appeared.len() >= 10, "chunks seen at {appeared:?}");
    let gaps: Vec<Duration> = appeared.windows(2).map(|w| w[1] - w[0]).collect();
    let max_gap = gaps.iter().max().copied().unwrap_or_default();
    eprintln!(
        "{} chunks while receiving; max gap {max_gap:?}",
        appeared.len()
    );
    assert!(max_gap <= Duration::from_millis(1000), "gaps {gaps:?}");
    drop(c);

    // Finished: the end object is there, and with the node's local log gone the download
    // is the bucket's, byte for byte.
    let deadline = Instant::now() + Duration::from_secs(5);
    let st = loop {
        let st = store_meta(&server, &id);
        if st.state.as_str() != "receiving" || Instant::now() > deadline {
            break st;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(st.state.as_str(), "complete", "{st:?}");
    assert_eq!(st.received_bytes, 80_000);
    assert!(s3
        .keys(BUCKET, &chunk_dir)
        .contains(&format!("{chunk_dir}/end")));
    std::fs::remove_dir_all(server.dir.path().join("data/stores").join(&id)).unwrap();
    let (status, body) = common::http_get_bytes(
        server.http_addr(),
        &format!("/v1/stores/{id}/media?token={}", st.token),
    )
    .unwrap();
    assert_eq!(status, 200);
    let pcap = std::fs::read(common::scenarios_dir().join("audio/pcmu-10s.pcap")).unwrap();
    let sent: Vec<u8> = common::udp_datagrams(&pcap)
        .unwrap()
        .into_iter()
        .filter(|(_, d)| d.len() > 12 && d[0] >> 6 == 2 && d[1] & 0x7f == 0)
        .flat_map(|(_, d)| d[12 + 4 * (d[0] & 0x0f) as usize..].to_vec())
        .collect();
    assert_eq!(body.len(), sent.len());
    assert!(
        body == sent,
        "downloaded payload differs from what was sent"
    );
}

/// Bytes readable from the start of the store's chunks in the bucket (contiguous, by name).
fn bucket_len(s3: &S3sFs, id: &str) -> u64 {
    let dir = s3.root.join(BUCKET).join("stores").join(id);
    let mut chunks: Vec<(u64, u64)> = std::fs::read_dir(&dir)
        .map(|rd| {
            rd.flatten()
                .filter_map(|e| {
                    let name = e.file_name().to_string_lossy().into_owned();
                    let base = name.strip_suffix(".chunk")?.parse().ok()?;
                    Some((base, e.metadata().ok()?.len()))
                })
                .collect()
        })
        .unwrap_or_default();
    chunks.sort();
    let mut next = 0;
    for (base, len) in chunks {
        if base != next {
            break;
        }
        next += len;
    }
    next
}

/// `kill -9` mid-store: what reached the bucket is a prefix at most ~2 s short of what was
/// sent; after the restart the node uploads the rest of its recovered log and the store is
/// read from the bucket, every packet it kept, in order.
#[test]
fn a_killed_node_loses_at_most_two_seconds_of_the_bucket_copy() {
    let Some(s3) = S3sFs::start() else { return };
    let mut server = server_on(&s3);
    let mut c = Call::establish(server.sip_addr(), "1001", "1002");
    let prompt = c.ask_for_storage(r#"{"pin":"4321"}"#);
    let id = prompt["store_id"].as_str().unwrap().to_string();
    let rtp = Rtp::bind();
    let inv = c.a.invite_request(
        prompt["store_uri"].as_str().unwrap(),
        &[("Callvault-Data-Size", "80000")],
        &sdp(rtp.port, PCMU, "sendonly"),
    );
    let (r, _d) = c.a.invite(&inv);
    assert_eq!(r.status, 200);
    let (to, _) = sdp_audio(&r.body);
    let mut sent = 0u32;
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(3) {
        rtp.send(to, 0, sent == 0, sent as u16, 160 * sent, 5, &payload(sent));
        sent += 1;
        std::thread::sleep(Duration::from_millis(20));
    }
    server.kill_hard();
    // Each record is a 28-byte header + 160 bytes; 2 s = 100 packets.
    let in_bucket = bucket_len(&s3, &id);
    let sent_bytes = u64::from(sent) * 188;
    eprintln!("killed after {sent} packets: {in_bucket} of {sent_bytes} log bytes in the bucket");
    assert!(
        in_bucket > 0 && in_bucket.is_multiple_of(188),
        "{in_bucket}"
    );
    assert!(
        in_bucket + 100 * 188 >= sent_bytes,
        "{in_bucket} of {sent_bytes}"
    );

    server.start();
    let st = store_meta(&server, &id);
    assert_eq!(st.state.as_str(), "truncated", "{st:?}");
    std::fs::remove_dir_all(server.dir.path().join("data/stores").join(&id)).unwrap();
    let (status, body) = common::http_get_bytes(
        server.http_addr(),
        &format!("/v1/stores/{id}/media?token={}", st.token),
    )
    .unwrap();
    assert_eq!(status, 200);
    assert_eq!(body.len() as u64, st.received_bytes);
    let kept = body.len() / 160;
    let want: Vec<u8> = (0..kept as u32).flat_map(payload).collect();
    assert!(body == want, "the kept media is a prefix of what was sent");
    assert!(st.received_bytes >= in_bucket / 188 * 160);
}
