//! The object trait on both backends: the local folder and a real `s3s-fs` process.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;

use super::chunks::{self, ChunkSource};
use super::file::FileObjects;
use super::s3::{S3Config, S3Objects};
use super::{ObjectError, Objects};
use crate::storage::segments::{RecordHeader, SegmentOptions, SegmentReader, SegmentWriter};

/// An `s3s-fs` server on a free loopback port, stopped on drop.
pub(crate) struct S3sFs {
    child: Child,
    pub(crate) endpoint: String,
    _dir: tempfile::TempDir,
}

impl Drop for S3sFs {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn s3s_fs_binary() -> Option<PathBuf> {
    if let Ok(p) = std::env::var("CALLVAULT_S3S_FS") {
        return Some(PathBuf::from(p));
    }
    let cached = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".cache/s3s-fs/bin/s3s-fs");
    if cached.exists() {
        return Some(cached);
    }
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join("s3s-fs"))
            .find(|p| p.exists())
    })
}

pub(crate) const AK: &str = "cvtestkey";
pub(crate) const SK: &str = "cvtestsecret123";

/// Starts s3s-fs; None (a skip) when it is not installed, unless `CALLVAULT_REQUIRE_TOOLS=1`.
pub(crate) fn start_s3s_fs() -> Option<S3sFs> {
    let Some(bin) = s3s_fs_binary() else {
        assert!(
            std::env::var("CALLVAULT_REQUIRE_TOOLS").as_deref() != Ok("1"),
            "s3s-fs is not installed (.ci/run builds it into .cache/s3s-fs)"
        );
        eprintln!("s3s-fs not installed: test skipped");
        return None;
    };
    let dir = tempfile::tempdir().unwrap();
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let child = Command::new(bin)
        .args(["--host", "127.0.0.1", "--port", &port.to_string()])
        .args(["--access-key", AK, "--secret-key", SK])
        .arg(dir.path())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "s3s-fs did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    Some(S3sFs {
        child,
        endpoint: format!("http://127.0.0.1:{port}"),
        _dir: dir,
    })
}

pub(crate) async fn s3_objects(server: &S3sFs, bucket: &str) -> Objects {
    Arc::new(
        S3Objects::open(S3Config {
            bucket: bucket.into(),
            endpoint: server.endpoint.clone(),
            region: "us-east-1".into(),
            access_key_id: AK.into(),
            secret_access_key: SK.into(),
        })
        .await
        .unwrap(),
    )
}

/// The trait's contract, run against any backend.
async fn contract(o: Objects) {
    assert!(o.list("stores/st_a").await.unwrap().is_empty());
    assert!(matches!(
        o.get("stores/st_a/x").await,
        Err(ObjectError::NotFound(_))
    ));
    assert!(matches!(
        o.put("../x", Bytes::new()).await,
        Err(ObjectError::BadKey(_))
    ));
    o.put(
        "stores/st_a/00000000000000000000.chunk",
        Bytes::from_static(b"hello "),
    )
    .await
    .unwrap();
    o.put(
        "stores/st_a/00000000000000000006.chunk",
        Bytes::from_static(b"world"),
    )
    .await
    .unwrap();
    o.put("stores/st_b/other", Bytes::from_static(b"-"))
        .await
        .unwrap();
    assert_eq!(
        o.get("stores/st_a/00000000000000000006.chunk")
            .await
            .unwrap(),
        Bytes::from_static(b"world")
    );
    assert_eq!(
        o.get_range("stores/st_a/00000000000000000000.chunk", 2..4)
            .await
            .unwrap(),
        Bytes::from_static(b"ll")
    );
    // A range past the end is cut there.
    assert_eq!(
        o.get_range("stores/st_a/00000000000000000006.chunk", 3..100)
            .await
            .unwrap(),
        Bytes::from_static(b"ld")
    );
    let l = o.list("stores/st_a").await.unwrap();
    let keys: Vec<_> = l.iter().map(|i| (i.key.as_str(), i.size)).collect();
    assert_eq!(
        keys,
        [
            ("stores/st_a/00000000000000000000.chunk", 6),
            ("stores/st_a/00000000000000000006.chunk", 5)
        ]
    );
    // Replacing is whole.
    o.put("stores/st_b/other", Bytes::from_static(b"second"))
        .await
        .unwrap();
    assert_eq!(o.get("stores/st_b/other").await.unwrap(), "second");
    assert_eq!(chunks::committed_len(&*o, "st_a").await.unwrap(), 11);
    chunks::mark_finished(&*o, "st_a", 11).await.unwrap();
    let listing = chunks::list(&*o, "st_a").await.unwrap();
    assert_eq!(listing.end, Some(11));
    chunks::delete_store(&*o, "st_a").await.unwrap();
    assert!(o.list("stores/st_a").await.unwrap().is_empty());
    o.delete("stores/st_a/never").await.unwrap();
    assert_eq!(o.list("stores/st_b").await.unwrap().len(), 1);
}

#[tokio::test]
async fn file_backend_keeps_the_contract() {
    let dir = tempfile::tempdir().unwrap();
    contract(Arc::new(FileObjects::new(dir.path().to_path_buf()))).await;
}

#[tokio::test]
async fn s3_backend_keeps_the_contract_on_s3s_fs() {
    let Some(server) = start_s3s_fs() else { return };
    let o = s3_objects(&server, "cv-contract").await;
    contract(Arc::clone(&o)).await;
    // Opening again finds the bucket there: no error.
    let again = s3_objects(&server, "cv-contract").await;
    assert_eq!(again.get("stores/st_b/other").await.unwrap(), "second");
}

fn header(i: u32) -> RecordHeader {
    RecordHeader {
        arrival_us: 1_000 + u64::from(i),
        seq: i as u16,
        timestamp: i * 160,
        ssrc: 7,
        payload_type: 0,
        marker: false,
    }
}

/// A writer on one "node" (its own data_dir, uploader on its own runtime) and a reader with
/// another data_dir following it through s3s-fs: every record arrives, in order, and the
/// reader's lag behind the writer's commit stays under a second.
#[test]
fn chunks_carry_a_live_store_to_another_node() {
    let Some(server) = start_s3s_fs() else { return };
    let writer_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let reader_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let node_a = writer_rt.block_on(s3_objects(&server, "cv-tail"));
    let node_b = reader_rt.block_on(s3_objects(&server, "cv-tail"));
    let dir_a = tempfile::tempdir().unwrap();
    let id = "st_tailtest";
    let log_dir = dir_a.path().join(id);
    const RECORDS: u32 = 150; // 3 s at 50 packets a second
    let started = Instant::now();

    let writer = writer_rt.spawn(async move {
        let mut w = SegmentWriter::create(
            &log_dir,
            SegmentOptions {
                segment_bytes: 4096, // several segments: chunks cross them
                ..SegmentOptions::default()
            },
        )
        .unwrap();
        let up = chunks::spawn_uploader(node_a, id.to_string(), log_dir.clone(), w.subscribe());
        let mut committed_at = Vec::new();
        for i in 0..RECORDS {
            w.append(&header(i), &[i as u8; 160]).unwrap();
            w.commit().unwrap();
            committed_at.push(started.elapsed());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        w.finish().unwrap();
        let uploaded = up.finish().await.unwrap();
        (committed_at, uploaded, w.state().bytes)
    });

    let reader = reader_rt.spawn(async move {
        let src = ChunkSource::new(node_b, id, true, None);
        let mut r = SegmentReader::from_objects(src, 0);
        let mut seen = Vec::new();
        while let Some(rec) = r.next().await.unwrap() {
            assert_eq!(rec.payload, &[rec.header.seq as u8; 160][..]);
            seen.push((rec.header.seq, started.elapsed()));
        }
        seen
    });
    let (committed_at, uploaded, bytes) = writer_rt.block_on(writer).unwrap();
    let seen = reader_rt.block_on(reader).unwrap();
    assert_eq!(uploaded, bytes);
    assert_eq!(seen.len(), RECORDS as usize, "every record, once");
    let mut lags: Vec<Duration> = seen
        .iter()
        .enumerate()
        .map(|(i, (seq, at))| {
            assert_eq!(usize::from(*seq), i, "in order");
            at.saturating_sub(committed_at[i])
        })
        .collect();
    lags.sort();
    let p50 = lags[lags.len() / 2];
    let p99 = lags[lags.len() * 99 / 100];
    eprintln!(
        "cross-node chunk tail lag: p50 {p50:?} p99 {p99:?} max {:?}",
        lags.last()
    );
    assert!(p99 <= Duration::from_secs(1), "p99 lag {p99:?}");
}

/// Chunks are cut at record boundaries, at most `max` bytes unless one record is larger.
#[test]
fn chunks_are_cut_at_records() {
    use crate::storage::segments::{encode_record, record_cut, HEADER_LEN};
    let mut log = Vec::new();
    for (i, len) in [100usize, 200, 50, 400].into_iter().enumerate() {
        encode_record(&mut log, &header(i as u32), &vec![1u8; len]).unwrap();
    }
    let r = |n: usize| HEADER_LEN + n;
    assert_eq!(record_cut(&log, usize::MAX), log.len());
    assert_eq!(record_cut(&log, r(100) + r(200)), r(100) + r(200));
    assert_eq!(record_cut(&log, r(100) + r(200) - 1), r(100));
    assert_eq!(record_cut(&log, 10), r(100), "one record even when larger");
    assert_eq!(record_cut(&log[r(100) + r(200) + r(50)..], 10), r(400));
}
