//! RFC 4733 telephone-events: the 4-byte payload and a detector that turns a packet stream
//! (updates, retransmitted end packets) into each key press exactly once. Sans-IO.

use thiserror::Error;

use super::rtp::RtpPacket;

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
}
