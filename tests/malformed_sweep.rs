//! Malformed-input sweep, in the manner of str0m's `tests/malformed-packet-injection.rs`:
//! every parser that reads the network, a peer or a file is fed real messages cut at many
//! lengths and with bits flipped. None may panic; each answers `Ok` or an error that says why
//! (a non-empty reason). Deterministic (a fixed xorshift seed) and bounded: a few thousand
//! inputs per parser, a few seconds in all.
//!
//! Parsers: SIP messages and TCP framing, SDP, RTP (and RTCP demultiplexing: callvault reads
//! no RTCP fields, it only tells RTCP from RTP), RFC 4733 events, digest challenges and
//! credentials, the JSON bodies (store and share requests, the sharer's answer, manifests,
//! share offers), share policies and the config TOML. The fuzz target bodies
//! ([`callvault::fuzzing`]) run on every input too.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use callvault::b2bua::{share_service, wire};
use callvault::config::Config;
use callvault::media::dtmf::TelephoneEvent;
use callvault::media::rtp::{looks_like_rtcp, RtpPacket};
use callvault::peer::fetch::OfferBody;
use callvault::sdp::SessionDescription;
use callvault::share::manifest::Manifest;
use callvault::share::policy::Policy;
use callvault::sip::auth::{Challenge, Credentials};
use callvault::sip::message::{error_response_for, frame_stream, parse};

/// Lengths tried per seed (all of them for short seeds).
const MAX_CUTS: usize = 200;
/// Bit-flipped variants per seed (1 to 4 bits each).
const FLIPS: usize = 150;

type Parser = fn(&[u8]) -> Result<(), String>;

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        // xorshift64*
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

fn variants(seed: &[u8], rng: &mut Rng) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    let step = seed.len().div_ceil(MAX_CUTS).max(1);
    for len in (0..seed.len()).step_by(step) {
        out.push(seed[..len].to_vec());
    }
    if seed.is_empty() {
        return out;
    }
    for _ in 0..FLIPS {
        let mut v = seed.to_vec();
        for _ in 0..=rng.below(4) {
            let i = rng.below(v.len());
            v[i] ^= 1 << rng.below(8);
        }
        // Some flipped inputs are cut too: a corrupted length meets the end of the data.
        if rng.below(4) == 0 {
            let cut = rng.below(v.len() + 1);
            v.truncate(cut);
        }
        out.push(v);
    }
    out
}

/// Runs `parser` (and every fuzz target) over the variants of every seed.
fn sweep(name: &str, seeds: &[Vec<u8>], parser: Parser) -> usize {
    assert!(!seeds.is_empty(), "{name}: no seeds");
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ name.len() as u64);
    let mut count = 0;
    for seed in seeds {
        // The real message itself must parse: the sweep starts from valid input.
        if let Err(e) = parser(seed) {
            panic!(
                "{name}: seed rejected ({e}): {:?}",
                String::from_utf8_lossy(seed)
            );
        }
        for v in variants(seed, &mut rng) {
            let run = catch_unwind(AssertUnwindSafe(|| {
                let verdict = parser(&v);
                for (_, target) in callvault::fuzzing::TARGETS {
                    target(&v);
                }
                verdict
            }));
            match run {
                Ok(Ok(())) => {}
                Ok(Err(reason)) => assert!(
                    !reason.trim().is_empty(),
                    "{name}: an error without a reason for {:?}",
                    String::from_utf8_lossy(&v)
                ),
                Err(_) => panic!("{name}: panic on {:?} ({v:?})", String::from_utf8_lossy(&v)),
            }
            count += 1;
        }
    }
    count
}

fn text(data: &[u8]) -> Result<&str, String> {
    std::str::from_utf8(data).map_err(|e| format!("not UTF-8: {e}"))
}

fn sip(data: &[u8]) -> Result<(), String> {
    let _ = frame_stream(data);
    match parse(data) {
        Ok(_) => Ok(()),
        Err(e) => {
            if let Some(resp) = error_response_for(data, &e) {
                let _ = resp.to_bytes();
            }
            Err(e.to_string())
        }
    }
}

fn sdp(data: &[u8]) -> Result<(), String> {
    SessionDescription::parse(text(data)?)
        .map(drop)
        .map_err(|e| e.to_string())
}

fn rtp(data: &[u8]) -> Result<(), String> {
    if looks_like_rtcp(data) {
        return Ok(()); // relayed as is, never read
    }
    let p = RtpPacket::parse(data).map_err(|e| e.to_string())?;
    if p.payload_type() == 101 {
        TelephoneEvent::parse(p.payload()).map_err(|e| e.to_string())?;
    }
    Ok(())
}

fn digest(data: &[u8]) -> Result<(), String> {
    let t = text(data)?;
    match Challenge::parse(t) {
        Ok(_) => Ok(()),
        Err(_) => Credentials::parse(t).map(drop).map_err(|e| e.to_string()),
    }
}

fn json(data: &[u8]) -> Result<(), String> {
    let _ = share_service::classify_answer(200, None, data);
    let store = wire::StoreRequest::parse(data).map(drop);
    let share = share_service::parse_request(data).map(drop);
    let manifest = Manifest::parse(data)
        .map(drop)
        .ok_or_else(|| "not a consistent manifest".to_string());
    let offer = serde_json::from_slice::<OfferBody>(data)
        .map(drop)
        .map_err(|e| e.to_string());
    // Each seed is one of these; every error it gives must have a reason.
    let all = [store, share, manifest, offer];
    if all.iter().any(Result::is_ok) {
        return Ok(());
    }
    let reasons: Vec<String> = all.into_iter().filter_map(Result::err).collect();
    if reasons.iter().any(|r| r.trim().is_empty()) {
        return Err(String::new());
    }
    Err(reasons.join("; "))
}

fn policy(data: &[u8]) -> Result<(), String> {
    Policy::parse(text(data)?, "example.com")
        .map(drop)
        .map_err(|e| e.to_string())
}

fn config(data: &[u8]) -> Result<(), String> {
    Config::from_toml_str(text(data)?, |_| None)
        .map(drop)
        .map_err(|e| e.to_string())
}

fn repo(path: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(path)
}

/// Every file of a directory (sorted), optionally only those with `ext`.
fn files(dir: &str, ext: Option<&str>) -> Vec<Vec<u8>> {
    let mut paths: Vec<_> = std::fs::read_dir(repo(dir))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| ext.is_none_or(|x| p.extension().is_some_and(|e| e == x)))
        .collect();
    paths.sort();
    paths
        .into_iter()
        .map(|p| std::fs::read(p).unwrap())
        .collect()
}

#[test]
fn every_parser_survives_truncated_and_bit_flipped_input() {
    let started = Instant::now();
    // Real SIP: the RFC 4475 requests that parse (the others are malformed to start with).
    let sip_seeds: Vec<Vec<u8>> = files("tests/data/rfc4475", Some("sip"))
        .into_iter()
        .filter(|m| parse(m).is_ok())
        .collect();
    let json_seeds: Vec<Vec<u8>> = files("fuzz/corpus/json_bodies", None)
        .into_iter()
        .filter(|m| json(m).is_ok())
        .chain([br#"{"content_id":"c1","server_url":"http://127.0.0.1:8080","name":"a.bin","token":"t"}"#.to_vec()])
        .collect();
    let policies = [
        "public",
        "subscribers",
        "sip:1002@example.com, 1003@Example.com,1002",
    ]
    .map(|p| p.as_bytes().to_vec());
    let plan: [(&str, Vec<Vec<u8>>, Parser); 7] = [
        ("sip", sip_seeds, sip),
        (
            "sdp",
            files("fuzz/corpus/sdp", None)
                .into_iter()
                .filter(|s| sdp(s).is_ok())
                .collect(),
            sdp,
        ),
        (
            "rtp/rtcp/rfc4733",
            files("fuzz/corpus/rtp", None)
                .into_iter()
                .filter(|s| rtp(s).is_ok())
                .collect(),
            rtp,
        ),
        (
            "digest",
            files("fuzz/corpus/digest", None)
                .into_iter()
                .filter(|s| digest(s).is_ok())
                .collect(),
            digest,
        ),
        ("json", json_seeds, json),
        ("share policy", policies.to_vec(), policy),
        (
            "config",
            vec![std::fs::read(repo("config/callvault.toml")).unwrap()],
            config,
        ),
    ];
    let mut total = 0;
    for (name, seeds, parser) in plan {
        let n = sweep(name, &seeds, parser);
        assert!(n > 300, "{name}: only {n} inputs");
        total += n;
    }
    eprintln!("{total} malformed inputs in {:?}", started.elapsed());
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "{:?}",
        started.elapsed()
    );
}
