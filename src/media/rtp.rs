//! Zero-copy RTP header views (RFC 3550 section 5.1) over received buffers.
//!
//! [`RtpPacket`] validates once and then reads fields straight from the bytes; [`RtpPacketMut`]
//! adds in-place setters so the relay/player can restamp seq/ts/SSRC without copying.

use thiserror::Error;

/// Fixed RTP header length (without CSRCs or extension).
pub const RTP_HEADER_LEN: usize = 12;

/// Why a buffer is not a valid RTP packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum RtpError {
    #[error("packet too short for an RTP header ({0} bytes)")]
    TooShort(usize),
    #[error("RTP version {0}, expected 2")]
    BadVersion(u8),
    #[error("CSRC list or header extension runs past the end of the packet")]
    Truncated,
    #[error("padding length {pad} invalid for a {len}-byte packet")]
    BadPadding { pad: usize, len: usize },
}

/// Offsets found by validation, shared by both views.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Layout {
    payload_offset: usize,
    payload_end: usize,
}

fn validate(buf: &[u8]) -> Result<Layout, RtpError> {
    if buf.len() < RTP_HEADER_LEN {
        return Err(RtpError::TooShort(buf.len()));
    }
    let version = buf[0] >> 6;
    if version != 2 {
        return Err(RtpError::BadVersion(version));
    }
    let cc = usize::from(buf[0] & 0x0f);
    let mut offset = RTP_HEADER_LEN + 4 * cc;
    if buf[0] & 0x10 != 0 {
        // Extension header: 16-bit profile, 16-bit length in 32-bit words (RFC 3550 5.3.1).
        let ext = buf.get(offset..offset + 4).ok_or(RtpError::Truncated)?;
        let words = usize::from(u16::from_be_bytes([ext[2], ext[3]]));
        offset += 4 + 4 * words;
    }
    if offset > buf.len() {
        return Err(RtpError::Truncated);
    }
    let mut end = buf.len();
    if buf[0] & 0x20 != 0 {
        // The last octet counts the padding octets, itself included, so it is at least 1.
        let pad = usize::from(buf[buf.len() - 1]);
        if pad == 0 || pad > buf.len() - offset {
            return Err(RtpError::BadPadding {
                pad,
                len: buf.len(),
            });
        }
        end -= pad;
    }
    Ok(Layout {
        payload_offset: offset,
        payload_end: end,
    })
}

macro_rules! read_accessors {
    () => {
        /// Always 2 for a validated packet.
        pub fn version(&self) -> u8 {
            self.buf[0] >> 6
        }
        pub fn padding(&self) -> bool {
            self.buf[0] & 0x20 != 0
        }
        pub fn extension(&self) -> bool {
            self.buf[0] & 0x10 != 0
        }
        pub fn csrc_count(&self) -> u8 {
            self.buf[0] & 0x0f
        }
        pub fn marker(&self) -> bool {
            self.buf[1] & 0x80 != 0
        }
        pub fn payload_type(&self) -> u8 {
            self.buf[1] & 0x7f
        }
        pub fn sequence(&self) -> u16 {
            u16::from_be_bytes([self.buf[2], self.buf[3]])
        }
        pub fn timestamp(&self) -> u32 {
            u32::from_be_bytes([self.buf[4], self.buf[5], self.buf[6], self.buf[7]])
        }
        pub fn ssrc(&self) -> u32 {
            u32::from_be_bytes([self.buf[8], self.buf[9], self.buf[10], self.buf[11]])
        }
        /// CSRC number `i` (`i < csrc_count()`).
        pub fn csrc(&self, i: usize) -> Option<u32> {
            if i >= usize::from(self.csrc_count()) {
                return None;
            }
            let o = RTP_HEADER_LEN + 4 * i;
            Some(u32::from_be_bytes([
                self.buf[o],
                self.buf[o + 1],
                self.buf[o + 2],
                self.buf[o + 3],
            ]))
        }
        /// Header extension `(profile, data)` if the X bit is set.
        pub fn extension_data(&self) -> Option<(u16, &[u8])> {
            if !self.extension() {
                return None;
            }
            let o = RTP_HEADER_LEN + 4 * usize::from(self.csrc_count());
            let profile = u16::from_be_bytes([self.buf[o], self.buf[o + 1]]);
            Some((profile, &self.buf[o + 4..self.layout.payload_offset]))
        }
        /// Where the payload starts (after CSRCs and extension).
        pub fn payload_offset(&self) -> usize {
            self.layout.payload_offset
        }
        /// The payload, without padding.
        pub fn payload(&self) -> &[u8] {
            &self.buf[self.layout.payload_offset..self.layout.payload_end]
        }
        /// The whole packet.
        pub fn as_bytes(&self) -> &[u8] {
            &self.buf[..]
        }
    };
}

/// Read-only view of a validated RTP packet.
#[derive(Debug, Clone, Copy)]
pub struct RtpPacket<'a> {
    buf: &'a [u8],
    layout: Layout,
}

impl<'a> RtpPacket<'a> {
    /// Validates `buf` as an RTP packet (version, CSRC list, extension, padding).
    pub fn parse(buf: &'a [u8]) -> Result<Self, RtpError> {
        let layout = validate(buf)?;
        Ok(RtpPacket { buf, layout })
    }

    read_accessors!();
}

/// Mutable view of a validated RTP packet, for restamping in place.
#[derive(Debug)]
pub struct RtpPacketMut<'a> {
    buf: &'a mut [u8],
    layout: Layout,
}

impl<'a> RtpPacketMut<'a> {
    pub fn parse(buf: &'a mut [u8]) -> Result<Self, RtpError> {
        let layout = validate(buf)?;
        Ok(RtpPacketMut { buf, layout })
    }

    read_accessors!();

    pub fn set_marker(&mut self, marker: bool) {
        self.buf[1] = (self.buf[1] & 0x7f) | if marker { 0x80 } else { 0 };
    }
    /// Sets the 7-bit payload type (the high bit is ignored).
    pub fn set_payload_type(&mut self, pt: u8) {
        self.buf[1] = (self.buf[1] & 0x80) | (pt & 0x7f);
    }
    pub fn set_sequence(&mut self, seq: u16) {
        self.buf[2..4].copy_from_slice(&seq.to_be_bytes());
    }
    pub fn set_timestamp(&mut self, ts: u32) {
        self.buf[4..8].copy_from_slice(&ts.to_be_bytes());
    }
    pub fn set_ssrc(&mut self, ssrc: u32) {
        self.buf[8..12].copy_from_slice(&ssrc.to_be_bytes());
    }
    pub fn payload_mut(&mut self) -> &mut [u8] {
        &mut self.buf[self.layout.payload_offset..self.layout.payload_end]
    }
}

/// The fixed header fields, for building packets (player, tests).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RtpHeader {
    pub marker: bool,
    pub payload_type: u8,
    pub sequence: u16,
    pub timestamp: u32,
    pub ssrc: u32,
}

impl RtpHeader {
    /// Writes a 12-byte header (no padding, extension or CSRCs) and returns its length, or
    /// `None` if `out` is shorter than 12 bytes.
    pub fn write(&self, out: &mut [u8]) -> Option<usize> {
        let h = out.get_mut(..RTP_HEADER_LEN)?;
        h[0] = 0x80;
        h[1] = (self.payload_type & 0x7f) | if self.marker { 0x80 } else { 0 };
        h[2..4].copy_from_slice(&self.sequence.to_be_bytes());
        h[4..8].copy_from_slice(&self.timestamp.to_be_bytes());
        h[8..12].copy_from_slice(&self.ssrc.to_be_bytes());
        Some(RTP_HEADER_LEN)
    }
}

/// RFC 5761 section 4 demultiplexing: given the second octet of a packet, true when it is an
/// RTCP packet type (192..=223), i.e. 64..=95 once the RTP marker bit is masked off. RTP payload
/// types in that range are forbidden precisely so this test works.
pub fn is_rtcp(second_byte: u8) -> bool {
    (64..=95).contains(&(second_byte & 0x7f))
}

/// [`is_rtcp`] on a whole packet: version 2 and an RTCP packet type.
pub fn looks_like_rtcp(packet: &[u8]) -> bool {
    packet.len() >= 8 && packet[0] >> 6 == 2 && is_rtcp(packet[1])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn packet(first: u8, pt: u8, extra_header: &[u8], payload: &[u8], pad: &[u8]) -> Vec<u8> {
        let mut v = vec![first, pt, 0x12, 0x34, 0xde, 0xad, 0xbe, 0xef, 1, 2, 3, 4];
        v.extend_from_slice(extra_header);
        v.extend_from_slice(payload);
        v.extend_from_slice(pad);
        v
    }

    #[test]
    fn parses_plain_header() {
        let buf = packet(0x80, 0x80 | 8, &[], b"hello", &[]);
        let p = RtpPacket::parse(&buf).unwrap();
        assert_eq!(p.version(), 2);
        assert!(!p.padding() && !p.extension());
        assert_eq!(p.csrc_count(), 0);
        assert!(p.marker());
        assert_eq!(p.payload_type(), 8);
        assert_eq!(p.sequence(), 0x1234);
        assert_eq!(p.timestamp(), 0xdeadbeef);
        assert_eq!(p.ssrc(), 0x01020304);
        assert_eq!(p.payload_offset(), 12);
        assert_eq!(p.payload(), b"hello");
        assert_eq!(p.csrc(0), None);
        assert_eq!(p.extension_data(), None);
    }

    #[test]
    fn csrc_extension_and_padding() {
        // 2 CSRCs, extension with 1 word, 3 bytes of padding.
        let extra = [
            0, 0, 0, 9, // csrc 0
            0, 0, 0, 10, // csrc 1
            0xbe, 0xde, 0, 1, // ext profile, 1 word
            0xaa, 0xbb, 0xcc, 0xdd,
        ];
        let buf = packet(0x80 | 0x20 | 0x10 | 2, 0, &extra, b"pay", &[0, 0, 3]);
        let p = RtpPacket::parse(&buf).unwrap();
        assert!(p.padding() && p.extension());
        assert_eq!(p.csrc(0), Some(9));
        assert_eq!(p.csrc(1), Some(10));
        assert_eq!(p.csrc(2), None);
        assert_eq!(
            p.extension_data(),
            Some((0xbede, &[0xaa, 0xbb, 0xcc, 0xdd][..]))
        );
        assert_eq!(p.payload_offset(), 12 + 8 + 8);
        assert_eq!(p.payload(), b"pay");
        assert_eq!(p.as_bytes().len(), buf.len());
    }

    #[test]
    fn rejects_invalid_packets() {
        assert_eq!(RtpPacket::parse(&[]).unwrap_err(), RtpError::TooShort(0));
        assert_eq!(
            RtpPacket::parse(&[0x80; 11]).unwrap_err(),
            RtpError::TooShort(11)
        );
        let v1 = packet(0x40, 0, &[], b"x", &[]);
        assert_eq!(RtpPacket::parse(&v1).unwrap_err(), RtpError::BadVersion(1));
        // 15 CSRCs announced, none present
        let cc = packet(0x8f, 0, &[], b"short", &[]);
        assert_eq!(RtpPacket::parse(&cc).unwrap_err(), RtpError::Truncated);
        // extension header missing / extension length past the end
        let ext = packet(0x90, 0, &[], &[0xbe], &[]);
        assert_eq!(RtpPacket::parse(&ext).unwrap_err(), RtpError::Truncated);
        let ext = packet(0x90, 0, &[0xbe, 0xde, 0xff, 0xff], b"abc", &[]);
        assert_eq!(RtpPacket::parse(&ext).unwrap_err(), RtpError::Truncated);
        // padding count 0, and padding larger than the payload
        let pad0 = packet(0xa0, 0, &[], b"abc", &[0]);
        assert!(matches!(
            RtpPacket::parse(&pad0),
            Err(RtpError::BadPadding { pad: 0, .. })
        ));
        let padbig = packet(0xa0, 0, &[], b"a", &[9]);
        assert!(matches!(
            RtpPacket::parse(&padbig),
            Err(RtpError::BadPadding { pad: 9, .. })
        ));
        // padding covering the whole payload is fine (empty payload)
        let padall = packet(0xa0, 0, &[], b"ab", &[3]);
        assert_eq!(RtpPacket::parse(&padall).unwrap().payload(), b"");
    }

    #[test]
    fn every_short_prefix_is_rejected_without_panic() {
        let extra = [0, 0, 0, 9, 0xbe, 0xde, 0, 1, 1, 2, 3, 4];
        let buf = packet(0x80 | 0x20 | 0x10 | 1, 0, &extra, b"pay", &[0, 2]);
        assert!(RtpPacket::parse(&buf).is_ok());
        for n in 0..buf.len() {
            // Must never panic; most prefixes are errors.
            let _ = RtpPacket::parse(&buf[..n]);
        }
        for n in 0..24 {
            assert!(RtpPacket::parse(&buf[..n]).is_err(), "prefix {n}");
        }
    }

    #[test]
    fn setters_rewrite_in_place() {
        let mut buf = packet(0x80, 0, &[], b"data", &[]);
        {
            let mut p = RtpPacketMut::parse(&mut buf).unwrap();
            p.set_sequence(0xfffe);
            p.set_timestamp(7);
            p.set_ssrc(0xcafebabe);
            p.set_marker(true);
            p.set_payload_type(101);
            p.payload_mut()[0] = b'D';
            assert!(p.marker());
            assert_eq!(p.payload_type(), 101);
            p.set_marker(false);
            assert_eq!(p.payload_type(), 101);
        }
        let p = RtpPacket::parse(&buf).unwrap();
        assert_eq!(
            (p.sequence(), p.timestamp(), p.ssrc(), p.marker()),
            (0xfffe, 7, 0xcafebabe, false)
        );
        assert_eq!(p.payload(), b"Data");
    }

    #[test]
    fn header_builder() {
        let h = RtpHeader {
            marker: true,
            payload_type: 101,
            sequence: 5,
            timestamp: 160,
            ssrc: 42,
        };
        let mut buf = [0u8; 16];
        assert_eq!(h.write(&mut buf), Some(12));
        let p = RtpPacket::parse(&buf).unwrap();
        assert_eq!(
            RtpHeader {
                marker: p.marker(),
                payload_type: p.payload_type(),
                sequence: p.sequence(),
                timestamp: p.timestamp(),
                ssrc: p.ssrc()
            },
            h
        );
        assert_eq!(p.payload().len(), 4);
        assert_eq!(h.write(&mut [0u8; 11]), None);
    }

    #[test]
    fn rtcp_demux() {
        for b in [200u8, 201, 202, 203, 204, 205, 206, 207, 192, 223] {
            assert!(is_rtcp(b), "{b}");
        }
        for b in [0u8, 8, 0x80, 0x80 | 8, 96, 101, 127, 0x80 | 101, 191, 224] {
            assert!(!is_rtcp(b), "{b}");
        }
        // RTCP receiver report header
        assert!(looks_like_rtcp(&[0x81, 201, 0, 7, 1, 2, 3, 4]));
        assert!(!looks_like_rtcp(&[0x80, 0, 0, 7, 1, 2, 3, 4]));
        assert!(!looks_like_rtcp(&[0x81, 201]));
    }
}
