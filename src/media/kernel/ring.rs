//! The consumer end of the program's recording ring (`rec_ring` in `bpf/rtp_fwd.bpf.c`): the
//! RTP bytes of every datagram the kernel forwarded for a recorded direction, with its arrival
//! time and the direction's log id, read without a syscall from the ring's shared pages.
//!
//! # Contract
//!
//! - One consumer: [`KernelPath::take_ring`](super::KernelPath::take_ring) hands the ring out
//!   once, to the recordings' log writer thread ([`crate::storage::log_thread`]), which calls
//!   [`KernelRing::drain`] on its own tick. The program never wakes it (`BPF_RB_NO_WAKEUP`).
//! - Each record is parsed as untrusted bytes (bounds-checked; a record that does not parse
//!   is skipped and counted in [`Drained::malformed`]) and handed over as the log id, the
//!   arrival time as wall-clock microseconds (the program stamps CLOCK_MONOTONIC; the offset to
//!   the wall clock is taken once per drain) and the RTP bytes.
//! - A drain takes at most `max` records, so one pass of the writer thread stays bounded even
//!   when the ring is full; what is left is taken by the next pass.
//! - A record's id is a log id (low [`LOG_ID_BITS`] bits) and a *gear epoch* (high 8 bits).
//!   Log ids are allocated by the writer thread's handle ([`RecIds`]), never 0 (0 in a map
//!   entry means "not recorded"), and wrap after 2^24 - 1 logs. The relay starts a new epoch
//!   each time the kernel takes a recorded direction over ([`with_epoch`]), so the writer
//!   thread sees a gear change as a new id and appends the relay's own batches before the
//!   kernel's records, without looking at every log's queue on every drain. A record whose
//!   log is not open (the log ended while its last records were in flight) is the caller's to
//!   count.

use std::sync::atomic::{AtomicU32, Ordering};

use aya::maps::{MapData, RingBuf};

/// `struct rec_hdr` of the C source.
const HEADER_LEN: usize = 16;

/// The recording ring of a loaded program.
pub(crate) struct KernelRing {
    ring: RingBuf<MapData>,
}

impl std::fmt::Debug for KernelRing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("KernelRing")
    }
}

/// Bits of a record id that name the log; the 8 above them are the gear epoch.
pub(crate) const LOG_ID_BITS: u32 = 24;
const LOG_ID_MASK: u32 = (1 << LOG_ID_BITS) - 1;

/// The log a record id names.
pub(crate) fn log_of(rec_id: u32) -> u32 {
    rec_id & LOG_ID_MASK
}

/// The record id of `log` in gear epoch `epoch`.
pub(crate) fn with_epoch(log: u32, epoch: u8) -> u32 {
    (log & LOG_ID_MASK) | (u32::from(epoch) << LOG_ID_BITS)
}

/// One record of the ring.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct RingRecord<'a> {
    pub rec_id: u32,
    pub arrival_us: u64,
    /// The RTP header and payload, as forwarded.
    pub rtp: &'a [u8],
}

/// What one [`KernelRing::drain`] took.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Drained {
    pub records: u64,
    pub malformed: u64,
}

impl KernelRing {
    pub(super) fn new(ring: RingBuf<MapData>) -> KernelRing {
        KernelRing { ring }
    }

    /// Hands up to `max` records to `each`, oldest first (module doc).
    pub(crate) fn drain(&mut self, max: usize, mut each: impl FnMut(RingRecord<'_>)) -> Drained {
        let offset_us = mono_to_wall_us();
        let mut d = Drained::default();
        while (d.records + d.malformed) < max as u64 {
            let Some(item) = self.ring.next() else {
                break;
            };
            match parse(&item, offset_us) {
                Some(r) => {
                    d.records += 1;
                    each(r);
                }
                None => d.malformed += 1,
            }
        }
        d
    }
}

/// Reads one record: the header, then exactly `len` bytes of RTP (at least the 12 of a header).
pub(crate) fn parse(bytes: &[u8], offset_us: i64) -> Option<RingRecord<'_>> {
    let header = bytes.get(..HEADER_LEN)?;
    let arrival_ns = u64::from_ne_bytes(header[0..8].try_into().ok()?);
    let rec_id = u32::from_ne_bytes(header[8..12].try_into().ok()?);
    let len = usize::from(u16::from_ne_bytes(header[12..14].try_into().ok()?));
    let rtp = bytes.get(HEADER_LEN..HEADER_LEN + len)?;
    if rec_id == 0 || len < 12 {
        return None;
    }
    let arrival_us = (arrival_ns / 1000).saturating_add_signed(offset_us);
    Some(RingRecord {
        rec_id,
        arrival_us,
        rtp,
    })
}

/// Wall clock minus CLOCK_MONOTONIC, in microseconds.
fn mono_to_wall_us() -> i64 {
    fn now_us(clock: libc::clockid_t) -> i64 {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: `ts` is a valid timespec for the call to fill; both clocks always exist.
        unsafe { libc::clock_gettime(clock, &mut ts) };
        ts.tv_sec * 1_000_000 + ts.tv_nsec / 1000
    }
    now_us(libc::CLOCK_REALTIME) - now_us(libc::CLOCK_MONOTONIC)
}

/// Log ids for map entries (module doc): shared by the writer thread's handles.
#[derive(Debug, Default)]
pub(crate) struct RecIds {
    next: AtomicU32,
}

impl RecIds {
    /// A fresh log id: 1 ..= 2^24 - 1, then again from 1.
    pub(crate) fn next(&self) -> u32 {
        loop {
            let id = log_of(self.next.fetch_add(1, Ordering::Relaxed).wrapping_add(1));
            if id != 0 {
                return id;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(id: u32, ns: u64, rtp: &[u8]) -> Vec<u8> {
        let mut b = Vec::new();
        b.extend_from_slice(&ns.to_ne_bytes());
        b.extend_from_slice(&id.to_ne_bytes());
        b.extend_from_slice(&(rtp.len() as u16).to_ne_bytes());
        b.extend_from_slice(&[0, 0]);
        b.extend_from_slice(rtp);
        b
    }

    #[test]
    fn parses_a_record_and_moves_its_clock_to_the_wall() {
        let rtp = [0x80u8, 0, 0, 1, 0, 0, 0, 160, 0, 0, 0, 7, 0xff, 0xfe];
        let b = record(9, 5_000_000, &rtp);
        let r = parse(&b, 1_000).unwrap();
        assert_eq!(r.rec_id, 9);
        assert_eq!(r.arrival_us, 6_000);
        assert_eq!(r.rtp, &rtp);
    }

    #[test]
    fn refuses_what_does_not_add_up() {
        let rtp = [0x80u8; 20];
        let good = record(3, 1, &rtp);
        // Cut anywhere: the header or the RTP is short.
        for cut in 0..good.len() {
            assert_eq!(parse(&good[..cut], 0), None, "cut at {cut}");
        }
        // Id 0 is "not recorded"; under 12 bytes is no RTP header.
        assert_eq!(parse(&record(0, 1, &rtp), 0), None);
        assert_eq!(parse(&record(3, 1, &rtp[..11]), 0), None);
        // Trailing bytes (the ring pads to 8) are ignored.
        let mut padded = good.clone();
        padded.extend_from_slice(&[0; 4]);
        assert_eq!(parse(&padded, 0).unwrap().rtp, &rtp);
    }

    #[test]
    fn log_ids_are_never_zero_even_when_they_wrap() {
        let ids = RecIds {
            next: AtomicU32::new(LOG_ID_MASK - 1),
        };
        assert_eq!(ids.next(), LOG_ID_MASK);
        assert_eq!(ids.next(), 1);
        assert_eq!(ids.next(), 2);
    }

    #[test]
    fn an_epoch_changes_the_id_not_the_log() {
        let id = with_epoch(77, 3);
        assert_ne!(id, with_epoch(77, 4));
        assert_eq!(log_of(id), 77);
        assert_eq!(log_of(with_epoch(77, 255)), 77);
        // Epoch 0 of a log is the log id itself: never 0.
        assert_eq!(with_epoch(77, 0), 77);
    }
}
