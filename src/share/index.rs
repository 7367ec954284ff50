//! The piece index (claims 2, 6–8): which holders have which pieces of a content, each with
//! `last_seen`; holders not heard from for `share.holder_ttl_secs` are dropped.
//!
//! [`PieceIndex`] is the seam for other placements (the `callvault index` role, and the
//! index on the terminals, where each agent keeps a [`MemoryIndex`] of the holders it found
//! through the DHT, [`crate::peer::terminals`]); [`MemoryIndex`] is the in-process one. Calls are synchronous
//! and cheap (a map behind a mutex): an index elsewhere is reached by peers over HTTP, not
//! through this trait, so nothing here needs to wait on I/O.
//!
//! Bitfields travel as base64 of the bits, piece 0 in the most significant bit of the first
//! byte (PROTOCOL 5, Shares).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use base64::Engine as _;

use super::select::SourceClass;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IndexError {
    #[error("have is not valid base64")]
    BadBase64,
    #[error("have has {got} bytes; {pieces} pieces need {want}")]
    WrongLength {
        got: usize,
        want: usize,
        pieces: usize,
    },
    #[error("peer_id must be 1 to 64 characters of A-Z a-z 0-9 . _ - : and not \"server\"")]
    BadPeerId,
    #[error("address must be host:port")]
    BadAddress,
    /// Another announcer holds this peer id (until it expires): nobody may move a peer.
    #[error("peer_id {0:?} is announced by someone else")]
    PeerIdTaken(String),
    /// This announcer has [`MAX_HOLDERS_PER_ANNOUNCER`] holders of the content already.
    #[error("at most {MAX_HOLDERS_PER_ANNOUNCER} holders per announcer and content")]
    TooManyFromAnnouncer,
    /// [`MAX_HOLDERS_PER_CONTENT`] live holders: new ones wait until some expire.
    #[error("the index of this content is full")]
    Full,
}

/// Which pieces a holder has.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Bitfield {
    bytes: Vec<u8>,
    len: usize,
}

impl Bitfield {
    /// `len` pieces, none held.
    pub fn empty(len: usize) -> Bitfield {
        Bitfield {
            bytes: vec![0; len.div_ceil(8)],
            len,
        }
    }

    /// `len` pieces, all held (the server).
    pub fn full(len: usize) -> Bitfield {
        let mut b = Bitfield::empty(len);
        for i in 0..len {
            b.set(i, true);
        }
        b
    }

    /// Decodes the wire form for a content of `len` pieces. The byte count must be exactly
    /// `ceil(len / 8)`; spare bits after the last piece are ignored (cleared).
    pub fn from_base64(s: &str, len: usize) -> Result<Bitfield, IndexError> {
        let mut bytes = base64::engine::general_purpose::STANDARD
            .decode(s.trim())
            .map_err(|_| IndexError::BadBase64)?;
        let want = len.div_ceil(8);
        if bytes.len() != want {
            return Err(IndexError::WrongLength {
                got: bytes.len(),
                want,
                pieces: len,
            });
        }
        if !len.is_multiple_of(8) {
            if let Some(last) = bytes.last_mut() {
                *last &= 0xffu8 << (8 - len % 8);
            }
        }
        Ok(Bitfield { bytes, len })
    }

    pub fn to_base64(&self) -> String {
        base64::engine::general_purpose::STANDARD.encode(&self.bytes)
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn get(&self, i: usize) -> bool {
        i < self.len && self.bytes[i / 8] & (0x80 >> (i % 8)) != 0
    }

    pub fn set(&mut self, i: usize, v: bool) {
        if i >= self.len {
            return;
        }
        let mask = 0x80u8 >> (i % 8);
        if v {
            self.bytes[i / 8] |= mask;
        } else {
            self.bytes[i / 8] &= !mask;
        }
    }

    /// Pieces held.
    pub fn count(&self) -> usize {
        self.bytes.iter().map(|b| b.count_ones() as usize).sum()
    }

    pub fn is_complete(&self) -> bool {
        self.count() == self.len
    }
}

/// One holder of (some pieces of) a content.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Holder {
    pub peer_id: String,
    /// Its HTTP `host:port`, where it serves `/v1/pieces/...`.
    pub address: String,
    /// What it announced itself as (`peer` unless it said `mobile`): fetchers weigh
    /// sources by class.
    pub class: SourceClass,
    pub have: Bitfield,
    pub last_seen: SystemTime,
}

/// A plain peer holding `pieces` of a content of `n` pieces (tests of the fetch side).
#[cfg(test)]
pub(crate) fn test_holder(peer_id: &str, pieces: &[usize], n: usize) -> Holder {
    let mut have = Bitfield::empty(n);
    for p in pieces {
        have.set(*p, true);
    }
    Holder {
        peer_id: peer_id.into(),
        address: "127.0.0.1:9000".into(),
        class: SourceClass::Peer,
        have,
        last_seen: std::time::UNIX_EPOCH,
    }
}

/// Peer ids name holders in JSON and logs; "server" is the server's own entry.
pub fn validate_peer_id(id: &str) -> Result<(), IndexError> {
    let ok = (1..=64).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-:".contains(&b))
        && id != "server";
    if ok {
        Ok(())
    } else {
        Err(IndexError::BadPeerId)
    }
}

/// `host:port` with a non-empty host (name, IPv4 or bracketed IPv6) and a port 1..=65535.
pub fn validate_address(addr: &str) -> Result<(), IndexError> {
    let (host, port) = addr.rsplit_once(':').ok_or(IndexError::BadAddress)?;
    let port_ok = port.parse::<u16>().is_ok_and(|p| p > 0);
    let host_ok = if let Some(v6) = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        v6.parse::<std::net::Ipv6Addr>().is_ok()
    } else {
        !host.is_empty()
            && host.len() <= 253
            && host
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b".-_".contains(&b))
    };
    if port_ok && host_ok {
        Ok(())
    } else {
        Err(IndexError::BadAddress)
    }
}

/// Where holders are recorded. Implementations must be cheap to call from async handlers.
pub trait PieceIndex: Send + Sync + std::fmt::Debug {
    /// Records (or refreshes) what `peer_id` at `address`, of `class`, holds of `content_id`,
    /// on behalf of `announcer` (who proved it: a token digest, a user). A peer id belongs to
    /// the announcer who first announced it until it expires; an announcer has at most
    /// [`MAX_HOLDERS_PER_ANNOUNCER`] holders per content; a full content refuses new holders
    /// rather than evicting live ones (issue 10, finding 9).
    #[allow(clippy::too_many_arguments)]
    fn announce_as(
        &self,
        content_id: &str,
        peer_id: &str,
        address: &str,
        class: SourceClass,
        have: Bitfield,
        announcer: &str,
        now: SystemTime,
    ) -> Result<(), IndexError>;

    /// [`announce_as`](Self::announce_as) with the peer as its own announcer (in-process
    /// callers that need no proof).
    fn announce(
        &self,
        content_id: &str,
        peer_id: &str,
        address: &str,
        class: SourceClass,
        have: Bitfield,
        now: SystemTime,
    ) -> Result<(), IndexError> {
        self.announce_as(content_id, peer_id, address, class, have, peer_id, now)
    }

    /// Holders heard from within the TTL, by peer id; expired ones are dropped.
    fn holders(&self, content_id: &str, now: SystemTime) -> Vec<Holder>;

    /// Forgets a holder (a peer that leaves, or serves corrupt data).
    fn remove(&self, content_id: &str, peer_id: &str);

    /// Forgets a content altogether (it is no longer shared).
    fn forget_content(&self, content_id: &str);
}

/// Upper bound on live holders kept per content; when reached, new holders are refused
/// (existing ones are never pushed out by newcomers).
pub const MAX_HOLDERS_PER_CONTENT: usize = 4096;

/// Holders one announcer may keep per content: a token shared by a household of terminals,
/// each restarted once or twice within the holder TTL.
pub const MAX_HOLDERS_PER_ANNOUNCER: usize = 16;

/// A holder and who announced it.
#[derive(Debug, Clone)]
struct Entry {
    holder: Holder,
    announcer: String,
}

type ContentMap = HashMap<String, HashMap<String, Entry>>;

/// The index inside callvault: a map behind a mutex.
#[derive(Debug)]
pub struct MemoryIndex {
    ttl: Duration,
    map: Mutex<ContentMap>,
}

impl MemoryIndex {
    pub fn new(ttl: Duration) -> MemoryIndex {
        MemoryIndex {
            ttl,
            map: Mutex::new(HashMap::new()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ContentMap> {
        // Every operation leaves the map consistent, so a poisoned lock is still usable.
        self.map.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn live(&self, h: &Holder, now: SystemTime) -> bool {
        now.duration_since(h.last_seen)
            .map_or(true, |age| age < self.ttl)
    }

    /// `(contents, holders)` currently live, for `/metrics` (expired entries not counted).
    pub fn stats(&self, now: SystemTime) -> (usize, usize) {
        let map = self.lock();
        let mut contents = 0;
        let mut holders = 0;
        for hs in map.values() {
            let live = hs.values().filter(|e| self.live(&e.holder, now)).count();
            holders += live;
            contents += usize::from(live > 0);
        }
        (contents, holders)
    }

    /// Drops expired holders everywhere (and contents left without any).
    pub fn sweep(&self, now: SystemTime) {
        let mut map = self.lock();
        map.retain(|_, holders| {
            holders.retain(|_, e| self.live(&e.holder, now));
            !holders.is_empty()
        });
    }
}

impl PieceIndex for MemoryIndex {
    fn announce_as(
        &self,
        content_id: &str,
        peer_id: &str,
        address: &str,
        class: SourceClass,
        have: Bitfield,
        announcer: &str,
        now: SystemTime,
    ) -> Result<(), IndexError> {
        validate_peer_id(peer_id)?;
        if class == SourceClass::Server {
            // The server's entry is synthesized by whoever serves the index, never stored.
            return Err(IndexError::BadPeerId);
        }
        validate_address(address)?;
        let mut map = self.lock();
        let holders = map.entry(content_id.to_string()).or_default();
        holders.retain(|_, e| self.live(&e.holder, now));
        match holders.get(peer_id) {
            Some(e) if e.announcer != announcer => {
                return Err(IndexError::PeerIdTaken(peer_id.to_string()))
            }
            Some(_) => {}
            None => {
                if holders.len() >= MAX_HOLDERS_PER_CONTENT {
                    return Err(IndexError::Full);
                }
                let mine = holders
                    .values()
                    .filter(|e| e.announcer == announcer)
                    .count();
                if mine >= MAX_HOLDERS_PER_ANNOUNCER {
                    return Err(IndexError::TooManyFromAnnouncer);
                }
            }
        }
        holders.insert(
            peer_id.to_string(),
            Entry {
                holder: Holder {
                    peer_id: peer_id.to_string(),
                    address: address.to_string(),
                    class,
                    have,
                    last_seen: now,
                },
                announcer: announcer.to_string(),
            },
        );
        Ok(())
    }

    fn holders(&self, content_id: &str, now: SystemTime) -> Vec<Holder> {
        let mut map = self.lock();
        let Some(holders) = map.get_mut(content_id) else {
            return Vec::new();
        };
        holders.retain(|_, e| self.live(&e.holder, now));
        let mut out: Vec<Holder> = holders.values().map(|e| e.holder.clone()).collect();
        if holders.is_empty() {
            map.remove(content_id);
        }
        out.sort_by(|a, b| a.peer_id.cmp(&b.peer_id));
        out
    }

    fn remove(&self, content_id: &str, peer_id: &str) {
        let mut map = self.lock();
        if let Some(holders) = map.get_mut(content_id) {
            holders.remove(peer_id);
            if holders.is_empty() {
                map.remove(content_id);
            }
        }
    }

    fn forget_content(&self, content_id: &str) {
        self.lock().remove(content_id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::UNIX_EPOCH;

    /// `id` announces itself as a plain peer at a fixed address.
    fn peer(
        idx: &MemoryIndex,
        content: &str,
        id: &str,
        have: Bitfield,
        at: SystemTime,
    ) -> Result<(), IndexError> {
        idx.announce(content, id, "127.0.0.1:9000", SourceClass::Peer, have, at)
    }

    #[test]
    fn bitfield_wire_form() {
        let mut b = Bitfield::empty(10);
        b.set(0, true);
        b.set(9, true);
        // Piece 0 is the MSB of byte 0; piece 9 the second bit of byte 1.
        assert_eq!(b.to_base64(), base64_of(&[0x80, 0x40]));
        assert!(b.get(0) && b.get(9) && !b.get(1) && !b.get(10));
        assert_eq!(b.count(), 2);
        let back = Bitfield::from_base64(&b.to_base64(), 10).unwrap();
        assert_eq!(back, b);
        // Spare bits are cleared, not trusted.
        let odd = Bitfield::from_base64(&base64_of(&[0xff, 0xff]), 10).unwrap();
        assert_eq!(odd.count(), 10);
        assert!(odd.is_complete());
        assert_eq!(Bitfield::full(10), odd);
        assert_eq!(
            Bitfield::from_base64(&base64_of(&[0xff]), 10),
            Err(IndexError::WrongLength {
                got: 1,
                want: 2,
                pieces: 10
            })
        );
        assert_eq!(
            Bitfield::from_base64("not base64!", 10),
            Err(IndexError::BadBase64)
        );
        assert_eq!(Bitfield::from_base64("", 0).unwrap().len(), 0);
        assert_eq!(Bitfield::full(8).to_base64(), base64_of(&[0xff]));
    }

    fn base64_of(b: &[u8]) -> String {
        base64::engine::general_purpose::STANDARD.encode(b)
    }

    #[test]
    fn ids_and_addresses() {
        assert!(validate_peer_id("peer-1").is_ok());
        assert!(validate_peer_id("server").is_err());
        assert!(validate_peer_id("").is_err());
        assert!(validate_peer_id("a b").is_err());
        assert!(validate_address("127.0.0.1:8081").is_ok());
        assert!(validate_address("[::1]:8081").is_ok());
        assert!(validate_address("peer.example.com:80").is_ok());
        assert!(validate_address("127.0.0.1").is_err());
        assert!(validate_address("127.0.0.1:0").is_err());
        assert!(validate_address(":80").is_err());
        assert!(validate_address("a/b:80").is_err());
    }

    #[test]
    fn announce_refresh_and_expiry() {
        let idx = MemoryIndex::new(Duration::from_secs(600));
        let t0 = UNIX_EPOCH + Duration::from_secs(1_000_000);
        let c = "c1";
        peer(&idx, c, "p2", Bitfield::full(3), t0).unwrap();
        peer(
            &idx,
            c,
            "p1",
            Bitfield::empty(3),
            t0 + Duration::from_secs(100),
        )
        .unwrap();
        let h = idx.holders(c, t0 + Duration::from_secs(200));
        assert_eq!(
            h.iter().map(|h| h.peer_id.as_str()).collect::<Vec<_>>(),
            ["p1", "p2"]
        );
        assert!(idx.holders("other", t0).is_empty());
        // p2 is 600 s old at t0+600: dropped; p1 is 500 s old: kept.
        let h = idx.holders(c, t0 + Duration::from_secs(600));
        assert_eq!(h.len(), 1);
        assert_eq!(h[0].peer_id, "p1");
        // A re-announce refreshes last_seen and replaces the bitfield.
        peer(
            &idx,
            c,
            "p1",
            Bitfield::full(3),
            t0 + Duration::from_secs(650),
        )
        .unwrap();
        let h = idx.holders(c, t0 + Duration::from_secs(1200));
        assert_eq!(h.len(), 1);
        assert!(h[0].have.is_complete());
        assert!(idx.holders(c, t0 + Duration::from_secs(1250)).is_empty());
        assert!(peer(&idx, c, "server", Bitfield::empty(3), t0).is_err());
        peer(&idx, c, "p3", Bitfield::empty(3), t0).unwrap();
        idx.remove(c, "p3");
        assert!(idx.holders(c, t0).is_empty());
        peer(&idx, c, "p5", Bitfield::empty(3), t0).unwrap();
        idx.forget_content(c);
        assert!(idx.holders(c, t0).is_empty());
        peer(&idx, c, "p4", Bitfield::empty(3), t0).unwrap();
        idx.sweep(t0 + Duration::from_secs(601));
        assert!(idx.lock().is_empty());
    }

    #[test]
    fn holder_count_is_bounded_without_evicting_live_holders() {
        let idx = MemoryIndex::new(Duration::from_secs(600));
        let t0 = UNIX_EPOCH + Duration::from_secs(1_000_000);
        for i in 0..MAX_HOLDERS_PER_CONTENT {
            peer(&idx, "c", &format!("p{i}"), Bitfield::empty(1), t0).unwrap();
        }
        assert_eq!(
            peer(&idx, "c", "late", Bitfield::empty(1), t0),
            Err(IndexError::Full)
        );
        let h = idx.holders("c", t0 + Duration::from_secs(1));
        assert_eq!(h.len(), MAX_HOLDERS_PER_CONTENT);
        assert!(h.iter().any(|h| h.peer_id == "p0"), "nobody is pushed out");
        // Once they expire there is room again.
        let later = t0 + Duration::from_secs(601);
        peer(&idx, "c", "late", Bitfield::empty(1), later).unwrap();
    }

    #[test]
    fn peer_ids_belong_to_their_announcer_and_announcers_are_capped() {
        let idx = MemoryIndex::new(Duration::from_secs(600));
        let t0 = UNIX_EPOCH + Duration::from_secs(1_000_000);
        let a = |id: &str, addr: &str, who: &str| {
            idx.announce_as(
                "c",
                id,
                addr,
                SourceClass::Peer,
                Bitfield::empty(1),
                who,
                t0,
            )
        };
        a("real", "127.0.0.1:9000", "alice").unwrap();
        assert_eq!(
            a("real", "127.0.0.9:6666", "mallory"),
            Err(IndexError::PeerIdTaken("real".into()))
        );
        a("real", "127.0.0.1:9001", "alice").unwrap();
        assert_eq!(idx.holders("c", t0)[0].address, "127.0.0.1:9001");
        for i in 0..MAX_HOLDERS_PER_ANNOUNCER {
            a(&format!("m{i}"), "127.0.0.9:1", "mallory").unwrap();
        }
        assert_eq!(
            a("one-more", "127.0.0.9:1", "mallory"),
            Err(IndexError::TooManyFromAnnouncer)
        );
    }

    #[test]
    fn class_is_kept_and_stats_count_live_holders() {
        let idx = MemoryIndex::new(Duration::from_secs(600));
        let t0 = UNIX_EPOCH + Duration::from_secs(1_000_000);
        let m = SourceClass::MobilePeer;
        idx.announce("c1", "m", "127.0.0.1:9001", m, Bitfield::empty(2), t0)
            .unwrap();
        peer(&idx, "c1", "p", Bitfield::empty(2), t0).unwrap();
        let later = t0 + Duration::from_secs(300);
        peer(&idx, "c2", "p", Bitfield::empty(2), later).unwrap();
        let h = idx.holders("c1", t0);
        assert_eq!(h[0].peer_id, "m");
        assert_eq!(h[0].class, SourceClass::MobilePeer);
        assert_eq!(h[1].class, SourceClass::Peer);
        assert_eq!(idx.stats(t0 + Duration::from_secs(400)), (2, 3));
        // c1's holders expire at t0+600; c2's is still live.
        assert_eq!(idx.stats(t0 + Duration::from_secs(650)), (1, 1));
        // Nobody announces as the server.
        assert!(idx
            .announce(
                "c1",
                "x",
                "127.0.0.1:1",
                SourceClass::Server,
                Bitfield::empty(2),
                t0
            )
            .is_err());
    }
}
