//! RFC 4733 telephone-events: the 4-byte payload and a detector that turns a packet stream
//! (updates, retransmitted end packets) into each key press exactly once, and the gate that
//! holds back a feature code's packets from the other party. Sans-IO.

use std::time::{Duration, Instant};

use thiserror::Error;

use super::rtp::RtpPacket;
use crate::media::feature_code::{Decision, FeatureCode};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum DtmfError {
    #[error("telephone-event payload shorter than 4 bytes ({0})")]
    TooShort(usize),
}

/// One telephone-event payload (RFC 4733 section 2.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TelephoneEvent {
    /// Event code: 0-9, 10 `*`, 11 `#`, 12-15 `A`-`D`; other codes are tones, not DTMF.
    pub event: u8,
    /// E bit: this is (a retransmission of) the last packet of the event.
    pub end: bool,
    /// Power level in -dBm0, 0..=63.
    pub volume: u8,
    /// Duration so far, in RTP timestamp units.
    pub duration: u16,
}

impl TelephoneEvent {
    pub const LEN: usize = 4;

    /// Parses the first 4 bytes (several events may be stacked with RFC 2198; callers that
    /// care split them first). The reserved R bit is ignored, as RFC 4733 asks.
    pub fn parse(payload: &[u8]) -> Result<Self, DtmfError> {
        match payload {
            [event, flags, d0, d1, ..] => Ok(TelephoneEvent {
                event: *event,
                end: flags & 0x80 != 0,
                volume: flags & 0x3f,
                duration: u16::from_be_bytes([*d0, *d1]),
            }),
            _ => Err(DtmfError::TooShort(payload.len())),
        }
    }

    pub fn to_bytes(&self) -> [u8; 4] {
        let d = self.duration.to_be_bytes();
        let flags = (self.volume & 0x3f) | if self.end { 0x80 } else { 0 };
        [self.event, flags, d[0], d[1]]
    }

    /// The DTMF key of this event, if it is one.
    pub fn digit(&self) -> Option<char> {
        event_to_char(self.event)
    }
}

/// DTMF event code to key: `0`-`9`, `*`, `#`, `A`-`D` (RFC 4733 section 3.2).
pub fn event_to_char(event: u8) -> Option<char> {
    match event {
        0..=9 => Some(char::from(b'0' + event)),
        10 => Some('*'),
        11 => Some('#'),
        12..=15 => Some(char::from(b'A' + event - 12)),
        _ => None,
    }
}

/// Key to DTMF event code (lowercase `a`-`d` accepted).
pub fn char_to_event(c: char) -> Option<u8> {
    match c {
        '0'..='9' => Some(c as u8 - b'0'),
        '*' => Some(10),
        '#' => Some(11),
        'A'..='D' => Some(c as u8 - b'A' + 12),
        'a'..='d' => Some(c as u8 - b'a' + 12),
        _ => None,
    }
}

/// A key press reported by [`DtmfDetector`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DtmfDigit {
    pub digit: char,
    /// RTP timestamp of the event's start (shared by all its packets).
    pub timestamp: u32,
    /// Last duration seen, in RTP timestamp units.
    pub duration: u16,
    /// False when the end packets were all lost and the event was closed by the next one or
    /// by [`DtmfDetector::finish`].
    pub ended: bool,
}

/// Turns telephone-event packets into digits, once each.
///
/// All packets of one event share an RTP timestamp (RFC 4733 2.5.1); the end packet is
/// usually sent three times. A digit is reported at its first end packet; if every end packet is
/// lost it is reported when the next event starts or on [`Self::finish`]. Late packets of an
/// event already reported are ignored.
#[derive(Debug, Clone)]
pub struct DtmfDetector {
    payload_type: u8,
    /// Event in progress: (ssrc, timestamp) key and the latest payload.
    current: Option<((u32, u32), TelephoneEvent)>,
    /// Key of the last event reported, to swallow its retransmissions.
    done: Option<(u32, u32)>,
}

impl DtmfDetector {
    /// `payload_type` is the negotiated telephone-event type (e.g. 101).
    pub fn new(payload_type: u8) -> Self {
        DtmfDetector {
            payload_type,
            current: None,
            done: None,
        }
    }

    pub fn payload_type(&self) -> u8 {
        self.payload_type
    }

    /// Feeds a raw RTP packet; packets of other payload types or invalid ones are ignored.
    /// Returns at most one digit per packet (see [`Self::on_event`]).
    pub fn on_rtp(&mut self, packet: &[u8]) -> Option<DtmfDigit> {
        let p = RtpPacket::parse(packet).ok()?;
        if p.payload_type() != self.payload_type {
            return None;
        }
        let ev = TelephoneEvent::parse(p.payload()).ok()?;
        self.on_event(p.ssrc(), p.timestamp(), ev)
    }

    /// Feeds one parsed event payload with its RTP SSRC and timestamp.
    pub fn on_event(&mut self, ssrc: u32, timestamp: u32, ev: TelephoneEvent) -> Option<DtmfDigit> {
        let key = (ssrc, timestamp);
        if self.done == Some(key) {
            return None; // retransmitted end packet, or a late update
        }
        let mut closed = None;
        match self.current {
            Some((k, ref mut cur)) if k == key => {
                // Same event: keep the longest duration (updates may be reordered).
                cur.duration = cur.duration.max(ev.duration);
                cur.end |= ev.end;
            }
            _ => {
                // A new event while another never ended: its end packets were lost.
                closed = self.take_current();
                self.current = Some((key, ev));
            }
        }
        if closed.is_some() {
            // One digit per call: the new event stays pending even if this packet already
            // ended it; its retransmitted end, the next event or `finish` reports it.
            return closed;
        }
        match self.current {
            Some((_, cur)) if cur.end => self.take_current(),
            _ => None,
        }
    }

    /// Reports the event in progress, if any (call it when the stream stops, e.g. on a silence
    /// timer or at hang-up).
    pub fn finish(&mut self) -> Option<DtmfDigit> {
        self.take_current()
    }

    fn take_current(&mut self) -> Option<DtmfDigit> {
        let (key, ev) = self.current.take()?;
        let ended = ev.end;
        self.done = Some(key);
        Some(DtmfDigit {
            digit: ev.digit()?,
            timestamp: key.1,
            duration: ev.duration,
            ended,
        })
    }
}

/// Most telephone-event packets one [`DtmfGate`] holds back at a time (`*7`, a 32-digit PIN
/// and `#`, at ~8 packets a key press, stay well under it).
pub const HOLD_MAX_PACKETS: usize = 512;
/// Most bytes one [`DtmfGate`] holds back at a time.
pub const HOLD_MAX_BYTES: usize = 16 * 1024;
/// Never a 7-bit RTP payload type: marks an unused slot of [`DtmfGate`]'s type list.
const NO_PT: u8 = 0xff;

/// What [`DtmfGate::on_packet`] and [`DtmfGate::handle_timeout`] report besides the packets
/// they hand out.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GateOutput {
    /// A feature code completed: its PIN (right or wrong is for the layer above to judge).
    pub code: Option<String>,
    /// Packets swallowed for good (the feature code's own packets).
    pub swallowed: usize,
}

/// The feature-code gate of one direction of an RTP stream (PROTOCOL.md §2.1, §5), sans-IO.
///
/// Telephone-event packets from one party go in; the ones to relay come out through the `out`
/// callback, in arrival order. From the first packet of a key press matching the code's first
/// key (`*`) every telephone-event packet is held back (copied into a pool allocated once,
/// bounded by [`HOLD_MAX_PACKETS`]/[`HOLD_MAX_BYTES`]) until [`FeatureCode`] decides: a
/// complete code is swallowed, late retransmissions of its last key included; anything else
/// is released in order; so is everything after `hold_timeout` without a telephone-event
/// packet. A full pool also releases everything. Audio never comes here.
#[derive(Debug)]
pub struct DtmfGate {
    /// Telephone-event payload types of this direction ([`NO_PT`] when unused).
    pts: [u8; 2],
    detector: DtmfDetector,
    code: FeatureCode,
    /// Event code of the feature code's first key, if it is a DTMF key.
    first_event: Option<u8>,
    hold_timeout: Duration,
    /// Holding the packets of a first-key press the detector has not reported yet.
    pending: bool,
    /// Release time of what is held.
    deadline: Option<Instant>,
    /// SSRC of the latest packet, for digits the detector closes at `finish`.
    ssrc: u32,
    /// (SSRC, timestamp) of the last digit reported: its late packets do not start a hold.
    last_key: Option<(u32, u32)>,
    /// (SSRC, timestamp) of the key press that completed a code: its late packets are dropped.
    swallow: Option<(u32, u32)>,
    bytes: Vec<u8>,
    /// Held packets as `bytes[start..end]`, in arrival order.
    spans: Vec<(usize, usize)>,
}

impl DtmfGate {
    /// `code` is `store.feature_code` (e.g. `*7`); an empty code holds nothing back.
    pub fn new(code: &str, hold_timeout: Duration) -> DtmfGate {
        DtmfGate {
            pts: [NO_PT; 2],
            // Payload types are matched by the gate itself; the detector only sees events.
            detector: DtmfDetector::new(NO_PT),
            code: FeatureCode::new(code),
            first_event: code.chars().next().and_then(char_to_event),
            hold_timeout,
            pending: false,
            deadline: None,
            ssrc: 0,
            last_key: None,
            swallow: None,
            bytes: Vec::new(),
            spans: Vec::new(),
        }
    }

    /// The telephone-event payload types this direction may use (each side's SDP may number
    /// it differently); `None` entries are unused.
    pub fn set_payload_types(&mut self, pts: [Option<u8>; 2]) {
        self.pts = pts.map(|p| p.map_or(NO_PT, |p| p & 0x7f));
    }

    /// True for an RTP packet of a telephone-event payload type: the only test every packet
    /// of the direction pays.
    #[inline]
    pub fn wants(&self, pkt: &[u8]) -> bool {
        pkt.len() >= 12 && pkt[0] >> 6 == 2 && {
            let pt = pkt[1] & 0x7f;
            pt == self.pts[0] || pt == self.pts[1]
        }
    }

    pub fn is_holding(&self) -> bool {
        self.pending || self.code.is_holding()
    }

    /// When [`Self::handle_timeout`] is due.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.deadline
    }

    /// Takes one telephone-event packet; hands every packet to relay now to `out`, in order.
    pub fn on_packet(
        &mut self,
        pkt: &[u8],
        now: Instant,
        out: &mut impl FnMut(&[u8]),
    ) -> GateOutput {
        let mut res = GateOutput::default();
        let parsed = RtpPacket::parse(pkt).ok().and_then(|p| {
            let ev = TelephoneEvent::parse(p.payload()).ok()?;
            Some((p.ssrc(), p.timestamp(), ev))
        });
        let Some((ssrc, ts, ev)) = parsed else {
            // Not an event we understand: relay it, but never ahead of what is held.
            self.place(pkt, now, out);
            return res;
        };
        let key = (ssrc, ts);
        if self.swallow == Some(key) {
            res.swallowed = 1;
            return res;
        }
        self.ssrc = ssrc;
        let mut same = None;
        if let Some(d) = self.detector.on_event(ssrc, ts, ev) {
            if d.timestamp == ts {
                same = Some(d);
            } else {
                // An earlier key press closed by this one (its end packets were lost): it is
                // decided before this packet is placed.
                self.decide(d, now, out, &mut res);
            }
        }
        if !self.is_holding() && Some(ev.event) == self.first_event && Some(key) != self.last_key {
            self.pending = true;
        }
        self.place(pkt, now, out);
        if let Some(d) = same {
            self.decide(d, now, out, &mut res);
        }
        res
    }

    /// Releases what was held when nothing came for `hold_timeout`; a key press whose end
    /// packets were all lost is decided first (it may complete the code).
    pub fn handle_timeout(&mut self, now: Instant, out: &mut impl FnMut(&[u8])) -> GateOutput {
        let mut res = GateOutput::default();
        if self.deadline.is_none_or(|t| t > now) {
            return res;
        }
        if let Some(d) = self.detector.finish() {
            self.decide(d, now, out, &mut res);
        }
        if self.is_holding() || !self.spans.is_empty() {
            self.release(out);
            self.reset_code();
        }
        self.deadline = None;
        res
    }

    /// Holds `pkt` while holding, else relays it; a full pool releases everything.
    fn place(&mut self, pkt: &[u8], now: Instant, out: &mut impl FnMut(&[u8])) {
        if !self.is_holding() {
            out(pkt);
            return;
        }
        if self.spans.len() >= HOLD_MAX_PACKETS || self.bytes.len() + pkt.len() > HOLD_MAX_BYTES {
            self.release(out);
            self.reset_code();
            out(pkt);
            return;
        }
        if self.spans.capacity() == 0 {
            // First hold of the call: the pool's one allocation (cleared, never shrunk).
            self.spans.reserve_exact(HOLD_MAX_PACKETS);
            self.bytes.reserve_exact(HOLD_MAX_BYTES);
        }
        let start = self.bytes.len();
        self.bytes.extend_from_slice(pkt);
        self.spans.push((start, self.bytes.len()));
        self.deadline = Some(now + self.hold_timeout);
    }

    fn decide(
        &mut self,
        d: DtmfDigit,
        now: Instant,
        out: &mut impl FnMut(&[u8]),
        res: &mut GateOutput,
    ) {
        let key = (self.ssrc, d.timestamp);
        self.last_key = Some(key);
        self.pending = false;
        match self.code.on_digit(d.digit, now) {
            Decision::Hold => self.deadline = Some(now + self.hold_timeout),
            Decision::Forward | Decision::Release(_) => {
                self.release(out);
                self.deadline = None;
            }
            Decision::Code { pin } => {
                res.swallowed += self.spans.len();
                self.spans.clear();
                self.bytes.clear();
                self.swallow = Some(key);
                self.deadline = None;
                res.code = Some(pin);
            }
        }
    }

    fn release(&mut self, out: &mut impl FnMut(&[u8])) {
        for &(s, e) in &self.spans {
            out(&self.bytes[s..e]);
        }
        self.spans.clear();
        self.bytes.clear();
    }

    /// Forgets the digits the code holds (their packets are released by the caller).
    fn reset_code(&mut self) {
        if let Some(t) = self.code.poll_timeout() {
            // Deciding at the code's own deadline releases whatever it holds.
            let _ = self.code.handle_timeout(t);
        }
        self.pending = false;
        self.deadline = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::media::rtp::RtpHeader;

    fn ev(event: u8, end: bool, duration: u16) -> TelephoneEvent {
        TelephoneEvent {
            event,
            end,
            volume: 10,
            duration,
        }
    }

    fn rtp(pt: u8, seq: u16, ts: u32, payload: [u8; 4]) -> Vec<u8> {
        let mut buf = vec![0u8; 16];
        RtpHeader {
            marker: false,
            payload_type: pt,
            sequence: seq,
            timestamp: ts,
            ssrc: 77,
        }
        .write(&mut buf)
        .unwrap();
        buf[12..].copy_from_slice(&payload);
        buf
    }

    /// A realistic key press: start (marker), updates every 160, then 3 end packets.
    fn press(event: u8, ts: u32, seq: &mut u16) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        for d in [160u16, 320, 480, 640] {
            out.push(rtp(101, *seq, ts, ev(event, false, d).to_bytes()));
            *seq += 1;
        }
        for _ in 0..3 {
            out.push(rtp(101, *seq, ts, ev(event, true, 800).to_bytes()));
            *seq += 1;
        }
        out
    }

    #[test]
    fn payload_round_trip() {
        let bytes = [11u8, 0x80 | 0x40 | 7, 0x03, 0x20];
        let e = TelephoneEvent::parse(&bytes).unwrap();
        // R bit (0x40) ignored
        assert_eq!(e, ev_with(11, true, 7, 800));
        assert_eq!(e.to_bytes(), [11, 0x87, 0x03, 0x20]);
        assert_eq!(e.digit(), Some('#'));
        assert_eq!(
            TelephoneEvent::parse(&[1, 2, 3]),
            Err(DtmfError::TooShort(3))
        );
        // longer payloads (redundancy) parse their first event
        assert_eq!(
            TelephoneEvent::parse(&[5, 0, 0, 160, 9, 9]).unwrap().event,
            5
        );
    }

    fn ev_with(event: u8, end: bool, volume: u8, duration: u16) -> TelephoneEvent {
        TelephoneEvent {
            event,
            end,
            volume,
            duration,
        }
    }

    #[test]
    fn event_char_mapping() {
        let keys = "0123456789*#ABCD";
        for (i, c) in keys.chars().enumerate() {
            assert_eq!(event_to_char(i as u8), Some(c));
            assert_eq!(char_to_event(c), Some(i as u8));
        }
        assert_eq!(char_to_event('b'), Some(13));
        assert_eq!(event_to_char(16), None); // flash
        assert_eq!(event_to_char(255), None);
        assert_eq!(char_to_event('x'), None);
    }

    #[test]
    fn feature_code_from_packet_stream_once_each() {
        let mut det = DtmfDetector::new(101);
        let mut seq = 1;
        let mut digits = String::new();
        for (i, key) in "*74321#".chars().enumerate() {
            let ts = 8000 * i as u32;
            for p in press(char_to_event(key).unwrap(), ts, &mut seq) {
                if let Some(d) = det.on_rtp(&p) {
                    assert!(d.ended);
                    assert_eq!(d.timestamp, ts);
                    assert_eq!(d.duration, 800);
                    digits.push(d.digit);
                }
            }
        }
        assert_eq!(digits, "*74321#");
        assert_eq!(det.finish(), None);
    }

    #[test]
    fn same_key_twice_is_two_digits() {
        let mut det = DtmfDetector::new(101);
        let mut seq = 0;
        let mut n = 0;
        for ts in [1000u32, 3000] {
            for p in press(5, ts, &mut seq) {
                n += usize::from(det.on_rtp(&p).is_some());
            }
        }
        assert_eq!(n, 2);
    }

    #[test]
    fn lost_end_packets_are_closed_by_next_event_or_finish() {
        let mut det = DtmfDetector::new(101);
        assert_eq!(det.on_event(1, 100, ev(1, false, 160)), None);
        assert_eq!(det.on_event(1, 100, ev(1, false, 320)), None);
        // next key starts: '1' is reported, unended
        let d = det.on_event(1, 900, ev(2, false, 160)).unwrap();
        assert_eq!((d.digit, d.ended, d.duration), ('1', false, 320));
        // a late update of '1' is ignored
        assert_eq!(det.on_event(1, 100, ev(1, true, 480)), None);
        // '2' never ends either: finish reports it
        let d = det.finish().unwrap();
        assert_eq!((d.digit, d.ended), ('2', false));
        assert_eq!(det.finish(), None);
    }

    #[test]
    fn only_end_packets_and_reordering() {
        let mut det = DtmfDetector::new(101);
        // the start was lost, only an end arrives: reported once
        assert_eq!(det.on_event(1, 5, ev(9, true, 800)).unwrap().digit, '9');
        assert_eq!(det.on_event(1, 5, ev(9, true, 800)), None);
        assert_eq!(det.on_event(1, 5, ev(9, false, 640)), None);
        // an update with a shorter duration after a longer one keeps the longer
        assert_eq!(det.on_event(1, 50, ev(3, false, 480)), None);
        assert_eq!(det.on_event(1, 50, ev(3, false, 320)), None);
        let d = det.on_event(1, 50, ev(3, true, 400)).unwrap();
        assert_eq!(d.duration, 480);
    }

    #[test]
    fn new_event_whose_first_packet_is_its_end() {
        let mut det = DtmfDetector::new(101);
        assert_eq!(det.on_event(1, 100, ev(1, false, 160)), None);
        // the whole of '2' arrives as end packets only; '1' is closed first
        assert_eq!(det.on_event(1, 200, ev(2, true, 800)).unwrap().digit, '1');
        // the retransmission then reports '2' (it was pending and ended)
        assert_eq!(det.on_event(1, 200, ev(2, true, 800)).unwrap().digit, '2');
        assert_eq!(det.on_event(1, 200, ev(2, true, 800)), None);
    }

    #[test]
    fn lone_end_packet_after_unfinished_event_is_kept_until_finish() {
        let mut det = DtmfDetector::new(101);
        assert_eq!(det.on_event(1, 100, ev(1, false, 160)), None);
        // '2' arrives as a single end packet (its retransmissions lost)
        assert_eq!(det.on_event(1, 200, ev(2, true, 800)).unwrap().digit, '1');
        let d = det.finish().unwrap();
        assert_eq!((d.digit, d.ended, d.duration), ('2', true, 800));
        // its late retransmission is swallowed
        assert_eq!(det.on_event(1, 200, ev(2, true, 800)), None);
    }

    #[test]
    fn ignores_other_payload_types_garbage_and_non_dtmf_events() {
        let mut det = DtmfDetector::new(101);
        assert_eq!(det.on_rtp(&rtp(0, 1, 1, [1, 0x80, 0, 160])), None);
        assert_eq!(det.on_rtp(&[0x80, 101, 0]), None);
        let mut short = rtp(101, 1, 1, [1, 0x80, 0, 160]);
        short.truncate(14);
        assert_eq!(det.on_rtp(&short), None);
        // flash (16) is an event but not a digit
        assert_eq!(det.on_rtp(&rtp(101, 2, 2, [16, 0x80, 0, 160])), None);
        assert_eq!(
            det.on_rtp(&rtp(101, 3, 3, [4, 0x80, 0, 160]))
                .unwrap()
                .digit,
            '4'
        );
    }

    #[test]
    fn ssrc_change_is_a_new_event() {
        let mut det = DtmfDetector::new(101);
        assert!(det.on_event(1, 100, ev(7, true, 800)).is_some());
        // same timestamp, new source (e.g. the phone restarted its stream)
        assert!(det.on_event(2, 100, ev(7, true, 800)).is_some());
    }

    // ---- DtmfGate

    const HOLD: Duration = Duration::from_secs(3);

    fn gate() -> DtmfGate {
        let mut g = DtmfGate::new("*7", HOLD);
        g.set_payload_types([Some(101), None]);
        g
    }

    /// Presses of `keys`, 7 packets each, one second apart in RTP time.
    fn presses(keys: &str, seq: &mut u16, ts0: u32) -> Vec<Vec<Vec<u8>>> {
        keys.chars()
            .enumerate()
            .map(|(i, k)| press(char_to_event(k).unwrap(), ts0 + 8000 * i as u32, seq))
            .collect()
    }

    /// Feeds packets at `now`; returns what came out and the outputs that were not empty.
    fn run(g: &mut DtmfGate, pkts: &[Vec<u8>], now: Instant) -> (Vec<Vec<u8>>, GateOutput) {
        let mut out = Vec::new();
        let mut total = GateOutput::default();
        for p in pkts {
            let r = g.on_packet(p, now, &mut |b: &[u8]| out.push(b.to_vec()));
            total.swallowed += r.swallowed;
            if r.code.is_some() {
                assert!(total.code.is_none(), "one code");
                total.code = r.code;
            }
        }
        (out, total)
    }

    #[test]
    fn gate_matches_only_telephone_event_types() {
        let mut g = DtmfGate::new("*7", HOLD);
        let te = rtp(101, 1, 1, [1, 0, 0, 160]);
        assert!(!g.wants(&te), "no type known yet");
        g.set_payload_types([Some(96), Some(101)]);
        assert!(g.wants(&te));
        assert!(g.wants(&rtp(96, 1, 1, [1, 0, 0, 160])));
        let mut marked = te.clone();
        marked[1] |= 0x80;
        assert!(g.wants(&marked), "marker bit ignored");
        assert!(!g.wants(&rtp(0, 1, 1, [1, 0, 0, 160])));
        assert!(!g.wants(&te[..11]));
        let mut v1 = te.clone();
        v1[0] = 0x40;
        assert!(!g.wants(&v1));
        g.set_payload_types([None, None]);
        assert!(!g.wants(&te));
    }

    #[test]
    fn gate_swallows_code_and_its_late_retransmissions() {
        let t0 = Instant::now();
        let mut g = gate();
        let mut seq = 0;
        let all: Vec<Vec<u8>> = presses("*74321#", &mut seq, 1000).concat();
        let (out, res) = run(&mut g, &all, t0);
        assert!(out.is_empty(), "{} feature-code packets leaked", out.len());
        assert_eq!(res.code.as_deref(), Some("4321"));
        assert_eq!(res.swallowed, all.len());
        assert!(!g.is_holding());
        assert_eq!(g.poll_timeout(), None);
        // the next key press goes straight through, packet by packet
        for p in &presses("5", &mut seq, 900_000)[0] {
            let (out, res) = run(&mut g, std::slice::from_ref(p), t0);
            assert_eq!(out, vec![p.clone()]);
            assert_eq!(res, GateOutput::default());
        }
        // and a second code is recognised too
        let (out, res) = run(&mut g, &presses("*71#", &mut seq, 2_000_000).concat(), t0);
        assert!(out.is_empty());
        assert_eq!(res.code.as_deref(), Some("1"));
    }

    #[test]
    fn gate_releases_star_and_next_key_in_order() {
        let t0 = Instant::now();
        let mut g = gate();
        let mut seq = 0;
        let p = presses("*9", &mut seq, 0);
        let (out, _) = run(&mut g, &p[0], t0);
        assert!(
            out.is_empty(),
            "the whole * press is held, its start included"
        );
        assert!(g.is_holding());
        // 9's updates are held too; its first end packet decides
        let (out, _) = run(&mut g, &p[1][..4], t0);
        assert!(out.is_empty());
        let (out, res) = run(&mut g, &p[1][4..5], t0);
        assert_eq!(res, GateOutput::default());
        let mut expect = p[0].clone();
        expect.extend_from_slice(&p[1][..5]);
        assert_eq!(out, expect, "released in arrival order");
        // 9's retransmitted ends follow directly
        let (out, _) = run(&mut g, &p[1][5..], t0);
        assert_eq!(out, p[1][5..].to_vec());
        assert!(!g.is_holding());
        assert_eq!(g.poll_timeout(), None);
    }

    #[test]
    fn gate_releases_lone_star_after_hold_timeout() {
        let t0 = Instant::now();
        let mut g = DtmfGate::new("*7", Duration::from_millis(300));
        g.set_payload_types([None, Some(101)]);
        let mut seq = 0;
        let p = presses("*", &mut seq, 0).concat();
        let t1 = t0 + Duration::from_millis(100);
        let (out, _) = run(&mut g, &p, t1);
        assert!(out.is_empty());
        assert_eq!(g.poll_timeout(), Some(t1 + Duration::from_millis(300)));
        let mut out = Vec::new();
        let early = t1 + Duration::from_millis(299);
        g.handle_timeout(early, &mut |b: &[u8]| out.push(b.to_vec()));
        assert!(out.is_empty());
        let res = g.handle_timeout(t1 + Duration::from_millis(300), &mut |b: &[u8]| {
            out.push(b.to_vec())
        });
        assert_eq!(res, GateOutput::default());
        assert_eq!(out, p);
        assert!(!g.is_holding());
        assert_eq!(g.poll_timeout(), None);
        // the code state was reset: `7` alone is just a digit now
        let (out, _) = run(&mut g, &presses("7", &mut seq, 50_000)[0], t1);
        assert_eq!(out.len(), 7);
    }

    #[test]
    fn gate_completes_code_whose_end_packets_were_lost() {
        let t0 = Instant::now();
        let mut g = gate();
        let mut seq = 0;
        let mut p = presses("*74321#", &mut seq, 0);
        // '4' loses its ends (closed by '3'), '#' loses them too (closed by the timeout)
        p[2].truncate(4);
        p[6].truncate(4);
        let (out, res) = run(&mut g, &p.concat(), t0);
        assert!(out.is_empty());
        assert_eq!(res.code, None);
        let deadline = g.poll_timeout().unwrap();
        let mut out = Vec::new();
        let res = g.handle_timeout(deadline, &mut |b: &[u8]| out.push(b.to_vec()));
        assert!(out.is_empty());
        assert_eq!(res.code.as_deref(), Some("4321"));
        assert_eq!(res.swallowed, 7 * 5 + 4 * 2);
    }

    #[test]
    fn gate_other_keys_pass_and_unparsable_packets_keep_their_place() {
        let t0 = Instant::now();
        let mut g = gate();
        let mut seq = 0;
        let p = presses("1*", &mut seq, 0);
        let (out, _) = run(&mut g, &p[0], t0);
        assert_eq!(out, p[0]);
        let (out, _) = run(&mut g, &p[1][..2], t0);
        assert!(out.is_empty());
        // a telephone-event packet with a short payload is held in order while holding
        let mut odd = rtp(101, 999, 1, [0; 4]);
        odd.truncate(13);
        let (out, _) = run(&mut g, std::slice::from_ref(&odd), t0);
        assert!(out.is_empty());
        let mut out = Vec::new();
        g.handle_timeout(t0 + HOLD, &mut |b: &[u8]| out.push(b.to_vec()));
        assert_eq!(out, vec![p[1][0].clone(), p[1][1].clone(), odd.clone()]);
        // and relayed at once when not
        let (out, _) = run(&mut g, std::slice::from_ref(&odd), t0);
        assert_eq!(out, vec![odd]);
    }

    #[test]
    fn gate_full_pool_releases_everything_in_order() {
        let t0 = Instant::now();
        let mut g = gate();
        let mut seq = 0;
        let mut pkts = presses("*7", &mut seq, 0).concat();
        // '1' held down for ever: updates of one event
        for i in 0..HOLD_MAX_PACKETS as u16 {
            pkts.push(rtp(101, 100 + i, 90_000, ev(1, false, 160 + i).to_bytes()));
        }
        let (out, res) = run(&mut g, &pkts, t0);
        assert_eq!(res, GateOutput::default());
        assert_eq!(out, pkts, "all released, nothing lost or reordered");
        assert!(!g.is_holding());
    }

    #[test]
    fn gate_with_empty_code_holds_nothing() {
        let mut g = DtmfGate::new("", HOLD);
        g.set_payload_types([Some(101), None]);
        let mut seq = 0;
        let p = presses("*74321#", &mut seq, 0).concat();
        let (out, res) = run(&mut g, &p, Instant::now());
        assert_eq!(out, p);
        assert_eq!(res, GateOutput::default());
    }
}
