//! Store media on S3 (PROTOCOL.md 6, issue 11): a `callvault serve` process with
//! `objects = "s3://..."` against a real `s3s-fs` process (tests/common/s3.rs). While a store
//! receives, its chunks reach the bucket at least once a second; once finished it is read
//! from the bucket alone (the node's local log deleted), byte for byte.

mod common;
#[path = "common/ua.rs"]
mod ua;

use std::time::{Duration, Instant};

use callvault::sip::message::Method;
use callvault::storage::stores::Store;
use common::s3::S3sFs;
use common::{Server, ServerConfig};
use serde_json::Value;
use ua::{payload, sdp, sdp_audio, Call, Rtp, PCMU, T};

const STORE_REQUEST: &str = "application/vnd.callvault.store-request+json";
const PROMPT: &str = "application/vnd.callvault.prompt+json";
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
    let resp = c.b.in_dialog(
        &mut c.bd,
        Method::Message,
        &[("Content-Type", STORE_REQUEST)],
        br#"{"pin":"4321"}"#,
    );
    assert_eq!(resp.status, 200, "{}", String::from_utf8_lossy(&resp.body));
    let p = c.a.expect_request(Method::Message, Some(PROMPT), T);
    c.a.respond(&p, 200, &[], b"");
    let prompt: Value = serde_json::from_slice(&p.body).unwrap();
    let id = prompt["store_id"].as_str().unwrap().to_string();

    const N: u32 = 150; // 3 s of PCMU at 20 ms
    let rtp = Rtp::bind();
    let size = (u64::from(N) * 160).to_string();
    let inv = c.a.invite_request(
        prompt["store_uri"].as_str().unwrap(),
        &[("Callvault-Data-Size", size.as_str())],
        &sdp(rtp.port, PCMU, "sendonly"),
    );
    let (r, d) = c.a.invite(&inv);
    assert_eq!(r.status, 200);
    let mut d = d.unwrap();
    let (to, _) = sdp_audio(&r.body);

    // Watch the bucket's folder of the store while A streams from another thread.
    let chunk_dir = format!("stores/{id}");
    let sender = std::thread::spawn(move || {
        for i in 0..N {
            rtp.send(to, 0, i == 0, i as u16, 160 * i, 21, &payload(i));
            std::thread::sleep(Duration::from_millis(20));
        }
    });
    let started = Instant::now();
    let mut seen = 0usize;
    let mut appeared = Vec::new();
    while !sender.is_finished() {
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
    sender.join().unwrap();
    let sending = started.elapsed();
    c.a.bye(&mut d);

    // Chunks while receiving: the first within a second, then never a second apart.
    assert!(!appeared.is_empty(), "no chunk while receiving");
    let mut gaps = vec![appeared[0]];
    gaps.extend(appeared.windows(2).map(|w| w[1] - w[0]));
    gaps.push(sending - appeared[appeared.len() - 1]);
    let max_gap = gaps.iter().max().copied().unwrap_or_default();
    eprintln!(
        "{} chunks in {sending:?} of sending; max gap {max_gap:?}",
        appeared.len()
    );
    assert!(max_gap <= Duration::from_millis(1000), "gaps {gaps:?}");

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
    assert_eq!(st.received_bytes, u64::from(N) * 160);
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
    let sent: Vec<u8> = (0..N).flat_map(payload).collect();
    assert_eq!(body.len(), sent.len());
    assert!(
        body == sent,
        "downloaded payload differs from what was sent"
    );
}
