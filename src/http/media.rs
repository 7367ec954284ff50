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
//! IP header checksum is set. The capture opens with the session's SIP INVITE and 200 OK
//! ([`PcapSession`]) on the SIP addresses and ports the session really used, with its Call-ID
//! (port 5060 and a made-up Call-ID only for rows recorded before those were kept).
//!
//! Whole calls (a recorded call's two directions, `?call=both`): the pcap carries both legs'
//! INVITE/200 and both directions' packets merged by arrival time; the stereo WAV
//! ([`stereo_wav_header`], [`Lane`], [`put_frames`]) is 16-bit PCM, 8000 Hz, leg A's audio
//! left and leg B's right, G.711 decoded ([`g711_decode`]) and placed by arrival time.

use std::net::{Ipv4Addr, SocketAddr};
use std::str::FromStr;

use crate::storage::segments::RecordHeader;
use crate::storage::stores::{Direction, Store};

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

/// SIP port assumed for a session recorded before its SIP addresses were kept.
const SIP_PORT: u16 = 5060;

/// One side of a rebuilt SIP session: its SIP and RTP addresses (IPv4, port).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct PcapParty {
    pub(crate) sip: ([u8; 4], u16),
    pub(crate) rtp: ([u8; 4], u16),
}

/// The INVITE/200 exchange a capture opens with: who invited whom, on which addresses, and
/// the session's Call-ID. Wireshark and tshark set up the RTP conversation from its SDP.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct PcapSession {
    pub(crate) call_id: String,
    /// The user of the Request-URI (the store id).
    pub(crate) user: String,
    pub(crate) inviter: PcapParty,
    pub(crate) invitee: PcapParty,
}

fn v4(a: Option<SocketAddr>) -> Option<([u8; 4], u16)> {
    match a {
        Some(SocketAddr::V4(a)) => Some((a.ip().octets(), a.port())),
        _ => None,
    }
}

/// A store's capture: its RTP ends and its SIP session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct StoreCapture {
    pub(crate) ends: PcapEnds,
    pub(crate) session: PcapSession,
}

impl StoreCapture {
    /// The sender invited callvault (an in-call store, a recording's A-to-B direction); for
    /// a recording's B-to-A direction callvault invited the callee (leg B), whose audio it is.
    pub(crate) fn of(store: &Store) -> StoreCapture {
        let ends = PcapEnds::new(store.rtp_source, store.rtp_local);
        let sender = PcapParty {
            sip: v4(store.sip_remote).unwrap_or((ends.src.0, SIP_PORT)),
            rtp: ends.src,
        };
        let callvault = PcapParty {
            sip: v4(store.sip_local).unwrap_or((ends.dst.0, SIP_PORT)),
            rtp: ends.dst,
        };
        let (inviter, invitee) = match store.direction {
            Some(Direction::BToA) => (callvault, sender),
            _ => (sender, callvault),
        };
        let call_id = store
            .sip_call_id
            .clone()
            .filter(|c| !c.is_empty() && c.bytes().all(|b| b.is_ascii_graphic()))
            .unwrap_or_else(|| format!("{}@callvault", store.id));
        StoreCapture {
            ends,
            session: PcapSession {
                call_id,
                user: store.id.clone(),
                inviter,
                invitee,
            },
        }
    }
}

/// The global header plus, for each session, a SIP INVITE (from the inviter) and its 200 OK
/// (from the invitee), each with SDP naming that party's RTP address and port, timestamped
/// just before the media at `start_us`. `format` is the store's `ENCODING/RATE` (e.g.
/// `PCMU/8000`), `pt` its payload type.
pub(crate) fn pcap_preamble(
    sessions: &[PcapSession],
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
    let base = start_us.saturating_sub(1000 * (2 * sessions.len() as u64 + 1));
    let mut n: u16 = 0;
    for (i, s) in sessions.iter().enumerate() {
        let (from, to) = (s.inviter.sip, s.invitee.sip);
        let (src, dst) = (Ipv4Addr::from(from.0), Ipv4Addr::from(to.0));
        let (sp, dp) = (from.1, to.1);
        let (user, call_id) = (&s.user, &s.call_id);
        let dialog = |to_tag: &str| {
            format!(
                "Via: SIP/2.0/UDP {src}:{sp};branch=z9hG4bK-cv{i}\r\n\
                 From: <sip:caller@{src}:{sp}>;tag=s{i}\r\nTo: <sip:{user}@{dst}:{dp}>{to_tag}\r\n\
                 Call-ID: {call_id}\r\nCSeq: 1 INVITE\r\n"
            )
        };
        let offer = sdp(s.inviter.rtp);
        let invite = format!(
            "INVITE sip:{user}@{dst}:{dp} SIP/2.0\r\n{}Contact: <sip:caller@{src}:{sp}>\r\n\
             Content-Type: application/sdp\r\nContent-Length: {}\r\n\r\n{offer}",
            dialog(""),
            offer.len()
        );
        let answer = sdp(s.invitee.rtp);
        let ok = format!(
            "SIP/2.0 200 OK\r\n{}Contact: <sip:{user}@{dst}:{dp}>\r\n\
             Content-Type: application/sdp\r\nContent-Length: {}\r\n\r\n{answer}",
            dialog(";tag=r"),
            answer.len()
        );
        for (a, b, msg) in [(from, to, invite), (to, from, ok)] {
            udp_packet(
                &mut out,
                base + 1000 * u64::from(n),
                a,
                b,
                &[msg.as_bytes()],
                n,
            );
            n = n.wrapping_add(1);
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------
// G.711 to 16-bit PCM and the stereo WAV of a whole call

/// Which G.711 law a WAV format tag names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Law {
    Mu,
    A,
}

impl Law {
    pub(crate) fn of_tag(tag: u16) -> Option<Law> {
        match tag {
            WAVE_FORMAT_MULAW => Some(Law::Mu),
            WAVE_FORMAT_ALAW => Some(Law::A),
            _ => None,
        }
    }
}

/// One G.711 byte as a 16-bit linear sample (ITU-T G.711 expansion, the tables sox and
/// Wireshark use; the console's player decodes the same way).
pub(crate) fn g711_decode(law: Law, b: u8) -> i16 {
    let v: i32 = match law {
        Law::Mu => {
            let u = !b;
            let t = ((i32::from(u & 0x0f) << 3) + 0x84) << ((u & 0x70) >> 4);
            if u & 0x80 != 0 {
                0x84 - t
            } else {
                t - 0x84
            }
        }
        Law::A => {
            let a = b ^ 0x55;
            let mut t = i32::from(a & 0x0f) << 4;
            match (a & 0x70) >> 4 {
                0 => t += 8,
                1 => t += 0x108,
                seg => t = (t + 0x108) << (seg - 1),
            }
            if a & 0x80 != 0 {
                t
            } else {
                -t
            }
        }
    };
    // Both expansions stay within ±32 256.
    v as i16
}

pub(crate) const STEREO_HEADER_LEN: usize = 44;
/// Bytes of one stereo frame: two 16-bit samples.
pub(crate) const STEREO_FRAME: usize = 4;

/// The 44-byte header of a PCM WAV, 2 channels, 8000 Hz, 16 bits, holding `frames` frames
/// (sizes saturate at the format's 4 GiB limit).
pub(crate) fn stereo_wav_header(frames: u64) -> [u8; STEREO_HEADER_LEN] {
    let data = frames
        .saturating_mul(STEREO_FRAME as u64)
        .min(u64::from(u32::MAX) - 36) as u32;
    let mut h = [0u8; STEREO_HEADER_LEN];
    let mut w = Writer(&mut h, 0);
    w.bytes(b"RIFF");
    w.u32(data + 36);
    w.bytes(b"WAVE");
    w.bytes(b"fmt ");
    w.u32(16);
    w.u16(1); // PCM
    w.u16(2); // channels: leg A left, leg B right
    w.u32(8000);
    w.u32(8000 * STEREO_FRAME as u32); // byte rate
    w.u16(STEREO_FRAME as u16); // block align
    w.u16(16);
    w.bytes(b"data");
    w.u32(data);
    h
}

/// A gap in a direction's arrivals longer than this (in samples, 60 ms) is kept as silence;
/// shorter ones are network jitter and the audio stays contiguous.
pub(crate) const LANE_SLACK: u64 = 480;

/// Places one direction's packets on the call's timeline (8000 samples a second from the
/// call's first packet in either direction): each packet goes right after the previous one,
/// unless it arrived more than [`LANE_SLACK`] later than that, then at its arrival time with
/// silence before it. Audio is never overlapped or reordered.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Lane {
    /// The sample after the last one placed.
    pub(crate) cursor: u64,
}

impl Lane {
    /// The first sample of a packet of `len` samples that arrived at `arrival_us`; `t0_us`
    /// is the call's first arrival.
    pub(crate) fn place(&mut self, t0_us: u64, arrival_us: u64, len: u64) -> u64 {
        let at = arrival_us.saturating_sub(t0_us).saturating_mul(8) / 1000;
        let start = if at > self.cursor + LANE_SLACK {
            at
        } else {
            self.cursor
        };
        self.cursor = start + len;
        start
    }
}

/// One packet's decoded samples at their place on the timeline.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Placed {
    pub(crate) start: u64,
    pub(crate) samples: Vec<i16>,
}

impl Placed {
    pub(crate) fn end(&self) -> u64 {
        self.start + self.samples.len() as u64
    }

    fn at(&self, pos: u64) -> i16 {
        pos.checked_sub(self.start)
            .and_then(|i| self.samples.get(usize::try_from(i).ok()?))
            .copied()
            .unwrap_or(0)
    }
}

/// Appends the stereo frames `from..to` (16-bit little endian, left then right): a lane's
/// sample where its current packet covers the position, silence elsewhere.
pub(crate) fn put_frames(
    out: &mut Vec<u8>,
    from: u64,
    to: u64,
    left: Option<&Placed>,
    right: Option<&Placed>,
) {
    for pos in from..to {
        let l = left.map_or(0, |p| p.at(pos));
        let r = right.map_or(0, |p| p.at(pos));
        out.extend_from_slice(&l.to_le_bytes());
        out.extend_from_slice(&r.to_le_bytes());
    }
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

    fn store_with(direction: Option<Direction>) -> Store {
        let now = std::time::SystemTime::now();
        Store {
            id: "st_test".into(),
            token: "t".into(),
            kind: crate::storage::stores::StoreKind::CallRecording,
            sender: "1001@example.com".into(),
            receiver: "1002@example.com".into(),
            owner: None,
            call_id: Some("leg-a@host".into()),
            threshold: crate::storage::threshold::Threshold::Bytes(0),
            format: Some("PCMU/8000".into()),
            payload_type: Some(0),
            declared_bytes: None,
            received_bytes: 0,
            reserved_bytes: 0,
            threshold_bytes: None,
            state: crate::storage::stores::StoreState::Complete,
            created_at: now,
            expires_at: now,
            started_at: None,
            threshold_at: None,
            finished_at: None,
            rtp_source: Some("127.0.0.1:40000".parse().unwrap()),
            rtp_local: Some("127.0.0.1:20002".parse().unwrap()),
            direction,
            sip_remote: Some("127.0.0.1:15061".parse().unwrap()),
            sip_local: Some("127.0.0.1:15060".parse().unwrap()),
            sip_call_id: Some("leg-b@callvault".into()),
        }
    }

    /// (source port, destination port, payload) of every UDP packet of a capture.
    fn udp_of(pcap: &[u8]) -> Vec<(u16, u16, Vec<u8>)> {
        let mut out = Vec::new();
        let mut at = 24;
        while at + 16 <= pcap.len() {
            let len = le32(pcap, at + 8) as usize;
            let ip = &pcap[at + 16..at + 16 + len];
            let port = |i: usize| u16::from_be_bytes([ip[i], ip[i + 1]]);
            out.push((port(20), port(22), ip[28..].to_vec()));
            at += 16 + len;
        }
        out
    }

    #[test]
    fn preamble_uses_the_sessions_real_sip_ports_and_call_id() {
        let a = StoreCapture::of(&store_with(Some(Direction::AToB)));
        let pcap = pcap_preamble(
            std::slice::from_ref(&a.session),
            Some("PCMU/8000"),
            Some(0),
            5_000_000,
        );
        let pk = udp_of(&pcap);
        assert_eq!(pk.len(), 2);
        assert_eq!((pk[0].0, pk[0].1), (15061, 15060), "INVITE from the sender");
        assert_eq!((pk[1].0, pk[1].1), (15060, 15061), "200 from callvault");
        let invite = String::from_utf8_lossy(&pk[0].2);
        assert!(invite.starts_with("INVITE sip:st_test@127.0.0.1:15060 SIP/2.0\r\n"));
        assert!(invite.contains("Call-ID: leg-b@callvault\r\n"), "{invite}");
        assert!(invite.contains("m=audio 40000 RTP/AVP 0"), "{invite}");
        let ok = String::from_utf8_lossy(&pk[1].2);
        assert!(ok.contains("m=audio 20002 RTP/AVP 0"), "{ok}");

        // Leg B: callvault invited the callee, whose audio the store holds.
        let b = StoreCapture::of(&store_with(Some(Direction::BToA)));
        let pk = udp_of(&pcap_preamble(
            &[a.session, b.session],
            None,
            Some(0),
            5_000_000,
        ));
        assert_eq!(pk.len(), 4);
        assert_eq!((pk[2].0, pk[2].1), (15060, 15061), "INVITE from callvault");
        assert!(String::from_utf8_lossy(&pk[2].2).contains("m=audio 20002 "));
        assert!(String::from_utf8_lossy(&pk[3].2).contains("m=audio 40000 "));

        // Rows from before the SIP ends were kept: port 5060 on the RTP hosts.
        let mut old = store_with(None);
        (old.sip_remote, old.sip_local, old.sip_call_id) = (None, None, None);
        let c = StoreCapture::of(&old);
        assert_eq!(c.session.inviter.sip, ([127, 0, 0, 1], 5060));
        assert_eq!(c.session.call_id, "st_test@callvault");
    }

    #[test]
    fn g711_expands_like_the_itu_tables() {
        assert_eq!(g711_decode(Law::Mu, 0xff), 0);
        assert_eq!(g711_decode(Law::Mu, 0x7f), 0);
        assert_eq!(g711_decode(Law::Mu, 0x00), -32124);
        assert_eq!(g711_decode(Law::Mu, 0x80), 32124);
        assert_eq!(g711_decode(Law::A, 0xd5), 8);
        assert_eq!(g711_decode(Law::A, 0x55), -8);
        assert_eq!(g711_decode(Law::A, 0xaa), 32256);
        assert_eq!(g711_decode(Law::A, 0x2a), -32256);
        assert_eq!(Law::of_tag(WAVE_FORMAT_ALAW), Some(Law::A));
    }

    #[test]
    fn stereo_header_and_frames() {
        let h = stereo_wav_header(8000);
        assert_eq!(&h[0..4], b"RIFF");
        assert_eq!(le32(&h, 4) as usize, STEREO_HEADER_LEN + 32_000 - 8);
        assert_eq!(u16::from_le_bytes([h[20], h[21]]), 1, "PCM");
        assert_eq!(u16::from_le_bytes([h[22], h[23]]), 2, "channels");
        assert_eq!(le32(&h, 24), 8000);
        assert_eq!(le32(&h, 28), 32_000);
        assert_eq!(u16::from_le_bytes([h[32], h[33]]), 4);
        assert_eq!(u16::from_le_bytes([h[34], h[35]]), 16);
        assert_eq!(le32(&h, 40), 32_000);

        let left = Placed {
            start: 1,
            samples: vec![5, 6],
        };
        let right = Placed {
            start: 2,
            samples: vec![-1],
        };
        let mut out = Vec::new();
        put_frames(&mut out, 0, 4, Some(&left), Some(&right));
        let got: Vec<i16> = out
            .chunks(2)
            .map(|c| i16::from_le_bytes([c[0], c[1]]))
            .collect();
        assert_eq!(got, [0, 0, 5, 0, 6, -1, 0, 0]);
    }

    #[test]
    fn lanes_keep_audio_contiguous_and_keep_real_gaps() {
        let mut lane = Lane::default();
        // Starts 100 ms after the call's first packet: 800 samples of silence first.
        assert_eq!(lane.place(1_000_000, 1_100_000, 160), 800);
        // Jitter: early or a little late, right after the previous packet.
        assert_eq!(lane.place(1_000_000, 1_115_000, 160), 960);
        assert_eq!(lane.place(1_000_000, 1_170_000, 160), 1120);
        // A pause of a second: placed at its arrival.
        assert_eq!(lane.place(1_000_000, 2_300_000, 160), 10_400);
        assert_eq!(lane.cursor, 10_560);
    }
}
