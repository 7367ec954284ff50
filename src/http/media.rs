//! Download encodings of a store's records (PROTOCOL 2.5): raw payload bytes, WAV for G.711,
//! and a classic libpcap capture. Pure byte builders; the streaming is in `stores.rs`.
//!
//! WAV: `WAVE_FORMAT_MULAW` (7) or `WAVE_FORMAT_ALAW` (6), 8000 Hz, mono, 8 bits, with the
//! 18-byte `fmt ` chunk and the `fact` chunk that non-PCM formats carry (58-byte header).
//! While a store is still `receiving` its size is unknown when the header goes out, so the
//! RIFF, `fact` and `data` sizes are written as `0xFFFFFFFF` (the streaming convention that
//! ffmpeg, sox and most players read as "until the end of the file"); a finished store gets
//! its real sizes.
//!
//! pcap: magic `a1b2c3d4` (microseconds), link type 101 (`LINKTYPE_RAW`, packets start with
//! the IPv4 header). Each record becomes one IPv4/UDP packet from the sender's RTP source to
//! callvault's RTP address and port as the store session really used them ([`PcapEnds`]; for
//! uploads, rows from before they were recorded, or IPv6, the documentation addresses
//! `192.0.2.1:5004` to `192.0.2.2:5004`) carrying an RTP header rebuilt from the record
//! (version 2, marker, payload type, sequence number, timestamp, SSRC) and the payload,
//! timestamped with the record's arrival time. The UDP checksum is 0 (allowed on IPv4); the
//! IP header checksum is set.

use std::net::{Ipv4Addr, SocketAddr};
use std::str::FromStr;

use crate::storage::segments::RecordHeader;

/// `?format=`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum MediaFormat {
    Raw,
    Wav,
    Pcap,
}

impl FromStr for MediaFormat {
    type Err = ();
    fn from_str(s: &str) -> Result<Self, ()> {
        match s {
            "raw" => Ok(MediaFormat::Raw),
            "wav" => Ok(MediaFormat::Wav),
            "pcap" => Ok(MediaFormat::Pcap),
            _ => Err(()),
        }
    }
}

impl MediaFormat {
    pub(crate) fn content_type(self) -> &'static str {
        match self {
            MediaFormat::Raw => "application/octet-stream",
            MediaFormat::Wav => "audio/wav",
            MediaFormat::Pcap => "application/vnd.tcpdump.pcap",
        }
    }

    pub(crate) fn extension(self) -> &'static str {
        match self {
            MediaFormat::Raw => "raw",
            MediaFormat::Wav => "wav",
            MediaFormat::Pcap => "pcap",
        }
    }
}

pub(crate) const WAVE_FORMAT_ALAW: u16 = 6;
pub(crate) const WAVE_FORMAT_MULAW: u16 = 7;
pub(crate) const WAV_HEADER_LEN: usize = 58;
/// Size fields of a WAV whose length is not known yet.
pub(crate) const WAV_UNKNOWN_SIZE: u32 = 0xFFFF_FFFF;

/// The WAV format tag for a store format like `PCMU/8000` (G.711 only).
pub(crate) fn g711_format_tag(format: &str) -> Option<u16> {
    let mut parts = format.split('/');
    let name = parts.next()?;
    let rate = parts.next().unwrap_or("8000");
    if rate != "8000" || parts.next().is_some_and(|ch| ch != "1") {
        return None;
    }
    if name.eq_ignore_ascii_case("PCMU") {
        Some(WAVE_FORMAT_MULAW)
    } else if name.eq_ignore_ascii_case("PCMA") {
        Some(WAVE_FORMAT_ALAW)
    } else {
        None
    }
}

/// The 58-byte header; `data_len` None = unknown (live store).
pub(crate) fn wav_header(format_tag: u16, data_len: Option<u64>) -> [u8; WAV_HEADER_LEN] {
    // Header bytes counted by the RIFF size: "WAVE" + fmt (8+18) + fact (8+4) + data (8).
    const RIFF_OVERHEAD: u64 = 4 + 26 + 12 + 8;
    let known = data_len.filter(|n| *n <= u64::from(u32::MAX) - RIFF_OVERHEAD);
    let (riff, fact, data) = match known {
        Some(n) => {
            let n32 = n as u32; // checked above
            (n32 + RIFF_OVERHEAD as u32, n32, n32)
        }
        None => (WAV_UNKNOWN_SIZE, WAV_UNKNOWN_SIZE, WAV_UNKNOWN_SIZE),
    };
    let mut h = [0u8; WAV_HEADER_LEN];
    let mut w = Writer(&mut h, 0);
    w.bytes(b"RIFF");
    w.u32(riff);
    w.bytes(b"WAVE");
    w.bytes(b"fmt ");
    w.u32(18);
    w.u16(format_tag);
    w.u16(1); // channels
    w.u32(8000); // sample rate
    w.u32(8000); // byte rate
    w.u16(1); // block align
    w.u16(8); // bits per sample
    w.u16(0); // cbSize
    w.bytes(b"fact");
    w.u32(4);
    w.u32(fact); // samples: one byte each
    w.bytes(b"data");
    w.u32(data);
    h
}

struct Writer<'a>(&'a mut [u8], usize);

impl Writer<'_> {
    fn bytes(&mut self, b: &[u8]) {
        self.0[self.1..self.1 + b.len()].copy_from_slice(b);
        self.1 += b.len();
    }
    fn u16(&mut self, v: u16) {
        self.bytes(&v.to_le_bytes());
    }
    fn u32(&mut self, v: u32) {
        self.bytes(&v.to_le_bytes());
    }
}

pub(crate) const LINKTYPE_RAW: u32 = 101;
const PCAP_SNAPLEN: u32 = 65_535;
const IP_HEADER: usize = 20;
const UDP_HEADER: usize = 8;
const RTP_HEADER: usize = 12;
/// Largest payload that fits one IPv4 packet with these headers.
pub(crate) const PCAP_MAX_PAYLOAD: usize = 65_535 - IP_HEADER - UDP_HEADER - RTP_HEADER;
const DOC_SRC: [u8; 4] = [192, 0, 2, 1];
const DOC_DST: [u8; 4] = [192, 0, 2, 2];
const DOC_PORT: u16 = 5004;

/// The two RTP endpoints a capture shows: the sender's source and callvault's receiver.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct PcapEnds {
    pub(crate) src: ([u8; 4], u16),
    pub(crate) dst: ([u8; 4], u16),
}

impl PcapEnds {
    /// The addresses a store session recorded; the documentation addresses when either is
    /// unknown or not IPv4 (the capture's link type carries IPv4 only).
    pub(crate) fn new(source: Option<SocketAddr>, local: Option<SocketAddr>) -> PcapEnds {
        match (source, local) {
            (Some(SocketAddr::V4(s)), Some(SocketAddr::V4(l))) => PcapEnds {
                src: (s.ip().octets(), s.port()),
                dst: (l.ip().octets(), l.port()),
            },
            _ => PcapEnds {
                src: (DOC_SRC, DOC_PORT),
                dst: (DOC_DST, DOC_PORT),
            },
        }
    }
}

/// The 24-byte pcap global header.
pub(crate) fn pcap_global_header() -> [u8; 24] {
    let mut h = [0u8; 24];
    h[0..4].copy_from_slice(&0xa1b2_c3d4u32.to_le_bytes());
    h[4..6].copy_from_slice(&2u16.to_le_bytes());
    h[6..8].copy_from_slice(&4u16.to_le_bytes());
    // thiszone, sigfigs: 0
    h[16..20].copy_from_slice(&PCAP_SNAPLEN.to_le_bytes());
    h[20..24].copy_from_slice(&LINKTYPE_RAW.to_le_bytes());
    h
}

fn ip_checksum(h: &[u8]) -> u16 {
    let mut sum: u32 = h
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// Appends one pcap record (IPv4/UDP/RTP) for a stored record. `ip_id` numbers the packets.
/// A payload too large for one IPv4 packet is cut to [`PCAP_MAX_PAYLOAD`].
pub(crate) fn pcap_packet(
    out: &mut Vec<u8>,
    ends: PcapEnds,
    h: &RecordHeader,
    payload: &[u8],
    ip_id: u16,
) {
    let payload = &payload[..payload.len().min(PCAP_MAX_PAYLOAD)];
    let mut rtp = [0u8; RTP_HEADER];
    rtp[0] = 0x80;
    rtp[1] = (u8::from(h.marker) << 7) | (h.payload_type & 0x7f);
    rtp[2..4].copy_from_slice(&h.seq.to_be_bytes());
    rtp[4..8].copy_from_slice(&h.timestamp.to_be_bytes());
    rtp[8..12].copy_from_slice(&h.ssrc.to_be_bytes());
    udp_packet(
        out,
        h.arrival_us,
        ends.src,
        ends.dst,
        &[&rtp, payload],
        ip_id,
    );
}

/// Microseconds since the Unix epoch (0 before it), the pcap clock.
pub(crate) fn unix_us(t: std::time::SystemTime) -> u64 {
    t.duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
}

/// SIP signalling port of the capture's two parties.
const SIP_PORT: u16 = 5060;

/// The global header plus a SIP INVITE (from the sender, `ends.src`) and its 200 OK (from the
/// receiver, `ends.dst`), each with SDP naming the RTP address and port the capture's packets
/// use, timestamped just before the media at `start_us`. Wireshark and tshark set up the
/// RTP conversation from that SDP, so the capture reads as RTP without "Decode As".
/// `format` is the store's `ENCODING/RATE` (e.g. `PCMU/8000`), `pt` its payload type.
pub(crate) fn pcap_preamble(
    ends: PcapEnds,
    store_id: &str,
    format: Option<&str>,
    pt: Option<u8>,
    start_us: u64,
) -> Vec<u8> {
    let mut out = pcap_global_header().to_vec();
    let pt = pt.unwrap_or(0) & 0x7f;
    let rtpmap = match format.filter(|f| f.contains('/') && !f.contains(['\r', '\n'])) {
        Some(f) => format!("a=rtpmap:{pt} {f}\r\n"),
        None => String::new(),
    };
    let sdp = |(ip, port): ([u8; 4], u16)| {
        let ip = Ipv4Addr::from(ip);
        format!(
            "v=0\r\no=callvault 1 1 IN IP4 {ip}\r\ns=-\r\nc=IN IP4 {ip}\r\nt=0 0\r\n\
             m=audio {port} RTP/AVP {pt}\r\n{rtpmap}"
        )
    };
    let (src, dst) = (Ipv4Addr::from(ends.src.0), Ipv4Addr::from(ends.dst.0));
    let dialog = |to_tag: &str| {
        format!(
            "Via: SIP/2.0/UDP {src}:{SIP_PORT};branch=z9hG4bK-{store_id}\r\n\
             From: <sip:sender@{src}>;tag=s\r\nTo: <sip:{store_id}@{dst}>{to_tag}\r\n\
             Call-ID: {store_id}@callvault\r\nCSeq: 1 INVITE\r\n"
        )
    };
    let offer = sdp(ends.src);
    let invite = format!(
        "INVITE sip:{store_id}@{dst} SIP/2.0\r\n{}Contact: <sip:sender@{src}>\r\n\
         Content-Type: application/sdp\r\nContent-Length: {}\r\n\r\n{offer}",
        dialog(""),
        offer.len()
    );
    let answer = sdp(ends.dst);
    let ok = format!(
        "SIP/2.0 200 OK\r\n{}Contact: <sip:{store_id}@{dst}>\r\n\
         Content-Type: application/sdp\r\nContent-Length: {}\r\n\r\n{answer}",
        dialog(";tag=r"),
        answer.len()
    );
    let t = start_us.saturating_sub(2000);
    let sip = [
        (ends.src.0, ends.dst.0, invite),
        (ends.dst.0, ends.src.0, ok),
    ];
    for (i, (from, to, msg)) in sip.iter().enumerate() {
        let at = t + 1000 * i as u64;
        udp_packet(
            &mut out,
            at,
            (*from, SIP_PORT),
            (*to, SIP_PORT),
            &[msg.as_bytes()],
            i as u16,
        );
    }
    out
}

/// Appends one pcap record of an IPv4/UDP datagram carrying `parts` one after the other.
fn udp_packet(
    out: &mut Vec<u8>,
    at_us: u64,
    from: ([u8; 4], u16),
    to: ([u8; 4], u16),
    parts: &[&[u8]],
    ip_id: u16,
) {
    // Callers keep a datagram within one IPv4 packet (PCAP_MAX_PAYLOAD, short SIP).
    let data_len: usize = parts.iter().map(|p| p.len()).sum();
    let ip_len = IP_HEADER + UDP_HEADER + data_len;
    let ts_sec = u32::try_from(at_us / 1_000_000).unwrap_or(u32::MAX);
    out.extend_from_slice(&ts_sec.to_le_bytes());
    out.extend_from_slice(&((at_us % 1_000_000) as u32).to_le_bytes());
    out.extend_from_slice(&(ip_len as u32).to_le_bytes());
    out.extend_from_slice(&(ip_len as u32).to_le_bytes());
    let mut ip = [0u8; IP_HEADER];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&(ip_len as u16).to_be_bytes());
    ip[4..6].copy_from_slice(&ip_id.to_be_bytes());
    ip[6] = 0x40;
    ip[8] = 64;
    ip[9] = 17;
    ip[12..16].copy_from_slice(&from.0);
    ip[16..20].copy_from_slice(&to.0);
    let sum = ip_checksum(&ip);
    ip[10..12].copy_from_slice(&sum.to_be_bytes());
    out.extend_from_slice(&ip);
    out.extend_from_slice(&from.1.to_be_bytes());
    out.extend_from_slice(&to.1.to_be_bytes());
    out.extend_from_slice(&((UDP_HEADER + data_len) as u16).to_be_bytes());
    out.extend_from_slice(&0u16.to_be_bytes());
    for p in parts {
        out.extend_from_slice(p);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn format_tags() {
        assert_eq!(g711_format_tag("PCMU/8000"), Some(7));
        assert_eq!(g711_format_tag("pcma/8000"), Some(6));
        assert_eq!(g711_format_tag("PCMA/8000/1"), Some(6));
        assert_eq!(g711_format_tag("PCMU"), Some(7));
        assert_eq!(g711_format_tag("PCMU/16000"), None);
        assert_eq!(g711_format_tag("PCMU/8000/2"), None);
        assert_eq!(g711_format_tag("G722/8000"), None);
        assert_eq!(g711_format_tag("application/octet-stream"), None);
        assert_eq!("pcap".parse(), Ok(MediaFormat::Pcap));
        assert!("mp3".parse::<MediaFormat>().is_err());
    }

    fn le32(b: &[u8], at: usize) -> u32 {
        u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
    }

    #[test]
    fn wav_header_sizes() {
        let h = wav_header(WAVE_FORMAT_MULAW, Some(16_000));
        assert_eq!(&h[0..4], b"RIFF");
        assert_eq!(le32(&h, 4), 16_000 + 50);
        assert_eq!(&h[8..16], b"WAVEfmt ");
        assert_eq!(le32(&h, 16), 18);
        assert_eq!(u16::from_le_bytes([h[20], h[21]]), 7);
        assert_eq!(le32(&h, 24), 8000);
        assert_eq!(&h[38..42], b"fact");
        assert_eq!(le32(&h, 46), 16_000);
        assert_eq!(&h[50..54], b"data");
        assert_eq!(le32(&h, 54), 16_000);
        // RIFF size = file length - 8.
        assert_eq!(le32(&h, 4) as usize, WAV_HEADER_LEN + 16_000 - 8);
        let live = wav_header(WAVE_FORMAT_ALAW, None);
        assert_eq!(le32(&live, 4), WAV_UNKNOWN_SIZE);
        assert_eq!(le32(&live, 54), WAV_UNKNOWN_SIZE);
        assert_eq!(u16::from_le_bytes([live[20], live[21]]), 6);
        let huge = wav_header(WAVE_FORMAT_ALAW, Some(u64::from(u32::MAX)));
        assert_eq!(le32(&huge, 54), WAV_UNKNOWN_SIZE);
    }

    #[test]
    fn pcap_packet_layout() {
        let g = pcap_global_header();
        assert_eq!(le32(&g, 0), 0xa1b2_c3d4);
        assert_eq!(le32(&g, 20), 101);
        let h = RecordHeader {
            arrival_us: 1_700_000_000_123_456,
            seq: 0xBEEF,
            timestamp: 0x0102_0304,
            ssrc: 0xCAFE_BABE,
            payload_type: 8,
            marker: true,
        };
        let mut out = Vec::new();
        let ends = PcapEnds::new(
            Some("10.1.2.3:40000".parse().unwrap()),
            Some("127.0.0.1:20002".parse().unwrap()),
        );
        pcap_packet(&mut out, ends, &h, &[9; 160], 7);
        assert_eq!(le32(&out, 0), 1_700_000_000);
        assert_eq!(le32(&out, 4), 123_456);
        assert_eq!(le32(&out, 8), 200);
        assert_eq!(le32(&out, 12), 200);
        let ip = &out[16..];
        assert_eq!(ip.len(), 200);
        assert_eq!(ip[0], 0x45);
        assert_eq!(u16::from_be_bytes([ip[2], ip[3]]), 200);
        assert_eq!(ip_checksum(&ip[..20]), 0, "header checksum verifies");
        assert_eq!(&ip[12..16], &[10, 1, 2, 3], "the sender's real source");
        assert_eq!(&ip[16..20], &[127, 0, 0, 1], "callvault's RTP address");
        assert_eq!(u16::from_be_bytes([ip[20], ip[21]]), 40000);
        assert_eq!(u16::from_be_bytes([ip[22], ip[23]]), 20002);
        assert_eq!(u16::from_be_bytes([ip[24], ip[25]]), 180, "UDP length");
        let rtp = &ip[28..];
        assert_eq!(rtp[0], 0x80);
        assert_eq!(rtp[1], 0x80 | 8);
        assert_eq!(u16::from_be_bytes([rtp[2], rtp[3]]), 0xBEEF);
        assert_eq!(&rtp[4..8], &[1, 2, 3, 4]);
        assert_eq!(&rtp[8..12], &0xCAFE_BABEu32.to_be_bytes());
        assert_eq!(&rtp[12..], &[9; 160]);

        let mut big = Vec::new();
        pcap_packet(&mut big, ends, &h, &vec![0; 65_536], 1);
        assert_eq!(le32(&big, 8) as usize, 65_535);
    }

    #[test]
    fn pcap_ends_fall_back_to_documentation_addresses() {
        let doc = PcapEnds::new(None, None);
        assert_eq!(doc.src, ([192, 0, 2, 1], 5004));
        assert_eq!(doc.dst, ([192, 0, 2, 2], 5004));
        let v6 = PcapEnds::new(
            Some("[::1]:4000".parse().unwrap()),
            Some("127.0.0.1:20002".parse().unwrap()),
        );
        assert_eq!(v6, doc, "IPv6 does not fit LINKTYPE_RAW's IPv4 packets");
    }
}
