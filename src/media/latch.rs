//! Which source a media port takes RTP from: the strict-source policy against RTP bleed
//! (rtpengine's `strict-source`; the "RTP Bleed" attack on symmetric-RTP latching), shared by
//! the call relay, the store recorder and the player. Pure and allocation-free: the caller
//! feeds each datagram's source and bytes, the policy answers [`Decision`].
//!
//! # The rule
//!
//! Every port starts from the [`Expect`] the signalling gave it: the SDP address of the party
//! (RFC 4566 `c=` + `m=` port), the payload types negotiated (RFC 3264), and whether that
//! address may not be where the media really comes from (`nat`, see [`Expect::from_sdp`]).
//!
//! - **Strict** (the SDP address is usable and nothing suggests NAT): only datagrams from exactly
//!   that address are taken; everything else is refused, however well-formed. A stranger who
//!   sends first, or while the party pauses, gets nothing and changes nothing.
//! - **NAT** (no usable SDP address, or a private one different from the signalling source):
//!   the port latches onto the first source whose datagram is valid RTP version 2 (RFC 3550 5.1)
//!   of a negotiated payload type (or the SDP address itself), and from then on takes only that
//!   source. Garbage, RTCP, or RTP of another payload type never latch.
//! - Once latched, the address does not move: not after silence, not for a new port on the same
//!   host. A new SSRC *from the latched address* (the party restarted its stream) is taken and
//!   becomes the latched SSRC. Only new signalling ([`Latch::expect`], a re-INVITE) re-opens
//!   latching.
//!
//! A NAT rebinding (the party's port changes mid-call without new signalling) is therefore not
//! followed; that is rtpengine's strict-source trade-off, chosen because following it is exactly
//! what lets a third party take the stream (docs/ARCHITECTURE.md, Decisions).
//!
//! RTCP follows the RTP latch: [`Latch::rtcp_ok`] accepts RTCP from the host RTP comes from.
//! Refusals are counted per reason in [`RefusedCounts`] and published in batches as
//! `callvault_rtp_packets_refused_total{reason}`.

use std::net::{IpAddr, SocketAddr};

use super::rtp::{looks_like_rtcp, RtpPacket};
use crate::metrics::METRICS;

/// A set of RTP payload types (0..=127) as a bit mask: `Copy`, no allocation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PtSet(u128);

impl PtSet {
    /// Every payload type: used where nothing was negotiated (e.g. an SDP without codecs).
    pub const ANY: PtSet = PtSet(u128::MAX);
    pub const EMPTY: PtSet = PtSet(0);

    /// The set of `pts` (values above 127 are ignored).
    pub fn of(pts: impl IntoIterator<Item = u8>) -> PtSet {
        pts.into_iter().fold(PtSet::EMPTY, PtSet::with)
    }

    pub fn with(self, pt: u8) -> PtSet {
        if pt < 128 {
            PtSet(self.0 | 1u128 << pt)
        } else {
            self
        }
    }

    pub fn union(self, other: PtSet) -> PtSet {
        PtSet(self.0 | other.0)
    }

    #[inline]
    pub fn contains(self, pt: u8) -> bool {
        pt < 128 && self.0 & (1u128 << pt) != 0
    }

    pub fn is_empty(self) -> bool {
        self.0 == 0
    }
}

/// What signalling says about where a port's media comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Expect {
    /// The SDP address (`None`: unknown, on hold, or no SDP yet).
    pub addr: Option<SocketAddr>,
    /// Payload types the sender may use.
    pub pts: PtSet,
    /// The SDP address may not be the real source: latch onto the first valid RTP instead.
    pub nat: bool,
}

impl Expect {
    /// Strict to `addr` when given; without an address, the first valid RTP of `pts` latches.
    pub fn strict(addr: Option<SocketAddr>, pts: PtSet) -> Expect {
        Expect {
            addr,
            pts,
            nat: addr.is_none(),
        }
    }

    /// From an SDP address and the IP the signalling came from: NAT is assumed when there is no
    /// usable address (none, `0.0.0.0`, port 0), or when the address is a private, shared or
    /// link-local one (RFC 1918, RFC 6598, RFC 4193, RFC 3927/4291) other than the signalling
    /// source, i.e. a phone behind NAT that wrote its inside address. A public or loopback
    /// address is taken literally: a proxy or media gateway in front of the party is normal,
    /// a third party's packets are not.
    pub fn from_sdp(addr: Option<SocketAddr>, signalling: Option<IpAddr>, pts: PtSet) -> Expect {
        let usable = addr.filter(|a| !a.ip().is_unspecified() && a.port() != 0);
        let nat = match usable {
            None => true,
            Some(a) => is_inside_address(a.ip()) && Some(a.ip()) != signalling,
        };
        Expect {
            addr: usable,
            pts,
            nat,
        }
    }
}

/// Addresses a phone behind NAT typically announces.
fn is_inside_address(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            v4.is_private() || v4.is_link_local() || (o[0] == 100 && (o[1] & 0xc0) == 64)
        }
        IpAddr::V6(v6) => {
            let s = v6.segments()[0];
            (s & 0xfe00) == 0xfc00 || (s & 0xffc0) == 0xfe80
        }
    }
}

/// Why a datagram was refused (label of `callvault_rtp_packets_refused_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Not RTP version 2 (or RTCP) from a source that is not latched: cannot latch.
    NotRtp,
    /// RTP of a payload type the signalling did not negotiate: cannot latch.
    PayloadType,
    /// From a source other than the SDP / latched one.
    ForeignSource,
}

impl Refusal {
    pub const ALL: [Refusal; 3] = [
        Refusal::NotRtp,
        Refusal::PayloadType,
        Refusal::ForeignSource,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Refusal::NotRtp => "not_rtp",
            Refusal::PayloadType => "payload_type",
            Refusal::ForeignSource => "foreign_source",
        }
    }
}

/// The policy's answer for one datagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Decision {
    /// From the latched source: take it.
    Accept,
    /// Take it; the source is now latched (first datagram, or first after new signalling).
    Latch,
    Refuse(Refusal),
}

impl Decision {
    #[inline]
    pub(crate) fn is_ok(self) -> bool {
        !matches!(self, Decision::Refuse(_))
    }
}

/// The latch state of one port (or one side of a relay).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Latch {
    expect: Expect,
    latched: Option<SocketAddr>,
    ssrc: Option<u32>,
}

impl Latch {
    pub(crate) fn new(expect: Expect) -> Latch {
        Latch {
            expect,
            latched: None,
            ssrc: None,
        }
    }

    /// New signalling (re-INVITE, SDP answer): the new expectation, latching re-opened.
    pub(crate) fn expect(&mut self, expect: Expect) {
        *self = Latch::new(expect);
    }

    /// New payload types without new addressing (the other side's SDP arrived): the latch stays.
    pub(crate) fn set_pts(&mut self, pts: PtSet) {
        self.expect.pts = pts;
    }

    /// Where this party's media should go: the latched source, else the SDP address.
    #[inline]
    pub(crate) fn target(&self) -> Option<SocketAddr> {
        self.latched.or(self.expect.addr)
    }

    /// The source taken since latching (None: latching open).
    pub(crate) fn latched(&self) -> Option<SocketAddr> {
        self.latched
    }

    /// The SSRC of the latched stream, once an RTP packet was taken.
    #[cfg(test)]
    pub(crate) fn ssrc(&self) -> Option<u32> {
        self.ssrc
    }

    /// The decision for one datagram of `pkt` bytes from `src` on the RTP port. The latched
    /// source's datagrams are taken without parsing (the fast path of a running stream).
    #[inline]
    pub(crate) fn on_rtp(&mut self, src: SocketAddr, pkt: &[u8]) -> Decision {
        if self.latched == Some(src) {
            self.note_ssrc(pkt);
            return Decision::Accept;
        }
        self.on_unlatched(src, pkt)
    }

    #[cold]
    fn on_unlatched(&mut self, src: SocketAddr, pkt: &[u8]) -> Decision {
        if self.latched.is_some() {
            return Decision::Refuse(Refusal::ForeignSource);
        }
        let from_sdp = self.expect.addr == Some(src);
        if !from_sdp && !self.expect.nat {
            return Decision::Refuse(Refusal::ForeignSource);
        }
        if !from_sdp {
            // NAT: only RTP of a negotiated type may claim the port.
            let rtp = match RtpPacket::parse(pkt) {
                Ok(p) if !looks_like_rtcp(pkt) => p,
                _ => return Decision::Refuse(Refusal::NotRtp),
            };
            if !self.expect.pts.contains(rtp.payload_type()) {
                return Decision::Refuse(Refusal::PayloadType);
            }
        }
        self.latched = Some(src);
        self.ssrc = None;
        self.note_ssrc(pkt);
        Decision::Latch
    }

    /// Remembers the SSRC of an RTP packet from the latched source (a new one replaces it).
    #[inline]
    fn note_ssrc(&mut self, pkt: &[u8]) {
        if pkt.len() >= 12 && pkt[0] >> 6 == 2 && !looks_like_rtcp(pkt) {
            self.ssrc = Some(u32::from_be_bytes([pkt[8], pkt[9], pkt[10], pkt[11]]));
        }
    }

    /// RTCP follows RTP: taken from the host RTP is latched to (any port: RTCP may come from
    /// another NAT binding), or before that from the SDP host in strict mode.
    #[inline]
    pub(crate) fn rtcp_ok(&self, src: SocketAddr) -> bool {
        match (self.latched, self.expect.addr) {
            (Some(l), _) => l.ip() == src.ip(),
            (None, Some(a)) if !self.expect.nat => a.ip() == src.ip(),
            _ => false,
        }
    }
}

/// Refusals not yet published, kept on the packet path's stack.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct RefusedCounts([u64; 3]);

impl RefusedCounts {
    #[inline]
    pub(crate) fn count(&mut self, r: Refusal) {
        self.0[r as usize] += 1;
    }

    #[cfg(test)]
    pub(crate) fn total(&self) -> u64 {
        self.0.iter().sum()
    }

    /// Adds the counts to `/metrics` and zeroes them.
    pub(crate) fn flush(&mut self) {
        for r in Refusal::ALL {
            let n = std::mem::take(&mut self.0[r as usize]);
            if n > 0 {
                METRICS.rtp_packets_refused(r, n);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn rtp(pt: u8, ssrc: u32) -> Vec<u8> {
        let mut v = vec![0x80, pt, 0, 1, 0, 0, 0, 0];
        v.extend_from_slice(&ssrc.to_be_bytes());
        v.extend_from_slice(&[0xff; 160]);
        v
    }

    const PCMU: PtSet = PtSet(1);

    #[test]
    fn pt_set() {
        let s = PtSet::of([0, 8, 101, 200]);
        assert!(s.contains(0) && s.contains(8) && s.contains(101));
        assert!(!s.contains(9) && !s.contains(127) && !s.contains(200));
        assert!(PtSet::ANY.contains(127) && !PtSet::ANY.contains(128));
        assert!(PtSet::EMPTY.is_empty());
        assert_eq!(PtSet::of([0]).union(PtSet::of([8])), PtSet::of([0, 8]));
    }

    #[test]
    fn strict_takes_only_the_sdp_address() {
        let sdp = a("127.0.0.1:4000");
        let mut l = Latch::new(Expect::strict(Some(sdp), PCMU));
        assert_eq!(l.target(), Some(sdp));
        // A stranger first, valid RTP of the right type: refused, target unchanged.
        assert_eq!(
            l.on_rtp(a("127.0.0.2:4000"), &rtp(0, 9)),
            Decision::Refuse(Refusal::ForeignSource)
        );
        // Another port on the same host too.
        assert_eq!(
            l.on_rtp(a("127.0.0.1:4002"), &rtp(0, 9)),
            Decision::Refuse(Refusal::ForeignSource)
        );
        assert_eq!(l.target(), Some(sdp));
        assert_eq!(l.on_rtp(sdp, &rtp(0, 1)), Decision::Latch);
        assert_eq!(l.on_rtp(sdp, &rtp(0, 1)), Decision::Accept);
        assert_eq!(l.ssrc(), Some(1));
        // New SSRC from the latched address: taken, and it is the stream now.
        assert_eq!(l.on_rtp(sdp, &rtp(0, 2)), Decision::Accept);
        assert_eq!(l.ssrc(), Some(2));
        assert!(l.rtcp_ok(a("127.0.0.1:4001")) && l.rtcp_ok(a("127.0.0.1:9")));
        assert!(!l.rtcp_ok(a("127.0.0.2:4001")));
    }

    #[test]
    fn strict_rtcp_before_rtp_only_from_the_sdp_host() {
        let l = Latch::new(Expect::strict(Some(a("127.0.0.1:4000")), PCMU));
        assert!(l.rtcp_ok(a("127.0.0.1:4001")));
        assert!(!l.rtcp_ok(a("127.0.0.3:4001")));
    }

    #[test]
    fn nat_latches_the_first_valid_rtp_of_a_negotiated_type() {
        let mut l = Latch::new(Expect::strict(None, PtSet::of([0, 101])));
        let (evil, real) = (a("10.0.0.9:5000"), a("192.0.2.7:31000"));
        assert!(!l.rtcp_ok(real), "no RTCP before RTP latched");
        assert_eq!(
            l.on_rtp(evil, b"garbage that is not rtp"),
            Decision::Refuse(Refusal::NotRtp)
        );
        assert_eq!(
            l.on_rtp(evil, &[0x81, 200, 0, 6, 0, 0, 0, 1, 0, 0, 0, 0]),
            Decision::Refuse(Refusal::NotRtp),
            "RTCP does not latch"
        );
        assert_eq!(
            l.on_rtp(evil, &rtp(8, 5)),
            Decision::Refuse(Refusal::PayloadType)
        );
        assert_eq!(l.target(), None);
        assert_eq!(l.on_rtp(real, &rtp(0, 7)), Decision::Latch);
        assert_eq!((l.target(), l.ssrc()), (Some(real), Some(7)));
        // From now on: that source only, whatever the others send and however long it pauses.
        assert_eq!(
            l.on_rtp(evil, &rtp(0, 7)),
            Decision::Refuse(Refusal::ForeignSource)
        );
        assert_eq!(
            l.on_rtp(a("192.0.2.7:31002"), &rtp(0, 99)),
            Decision::Refuse(Refusal::ForeignSource)
        );
        // Non-RTP from the latched source still passes (the caller decides what to do).
        assert_eq!(l.on_rtp(real, b"\x00\x01stun"), Decision::Accept);
        assert_eq!(l.ssrc(), Some(7));
        assert!(l.rtcp_ok(a("192.0.2.7:40000")) && !l.rtcp_ok(evil));
    }

    #[test]
    fn new_signalling_reopens_and_pts_update_keeps_the_latch() {
        let first = a("127.0.0.1:4000");
        let mut l = Latch::new(Expect::strict(Some(first), PCMU));
        assert_eq!(l.on_rtp(first, &rtp(0, 1)), Decision::Latch);
        l.set_pts(PtSet::of([0, 8]));
        assert_eq!(l.latched(), Some(first));
        let moved = a("127.0.0.1:4100");
        assert_eq!(
            l.on_rtp(moved, &rtp(0, 1)),
            Decision::Refuse(Refusal::ForeignSource)
        );
        l.expect(Expect::strict(Some(moved), PCMU));
        assert_eq!(l.target(), Some(moved));
        assert_eq!(
            l.on_rtp(first, &rtp(0, 1)),
            Decision::Refuse(Refusal::ForeignSource)
        );
        assert_eq!(l.on_rtp(moved, &rtp(0, 1)), Decision::Latch);
    }

    #[test]
    fn nat_mode_also_takes_the_sdp_address_itself() {
        let sdp = a("192.168.1.20:4000");
        let mut l = Latch::new(Expect::from_sdp(
            Some(sdp),
            Some("203.0.113.5".parse().unwrap()),
            PCMU,
        ));
        assert!(l.expect.nat);
        // Whatever it sends, the SDP address may latch.
        assert_eq!(l.on_rtp(sdp, b"not rtp"), Decision::Latch);
        assert_eq!(l.ssrc(), None);
    }

    #[test]
    fn nat_detection_from_sdp() {
        let ip = |s: &str| Some(s.parse::<IpAddr>().unwrap());
        let pts = PCMU;
        let nat = |addr: &str, sig: Option<IpAddr>| Expect::from_sdp(Some(a(addr)), sig, pts).nat;
        // Private address, signalling from elsewhere: NAT.
        assert!(nat("192.168.1.20:4000", ip("203.0.113.5")));
        assert!(nat("10.1.2.3:4000", ip("203.0.113.5")));
        assert!(nat("172.16.0.1:4000", None));
        assert!(nat("100.64.0.1:4000", ip("203.0.113.5")));
        assert!(nat("[fd00::1]:4000", ip("2001:db8::1")));
        assert!(nat("[fe80::1]:4000", ip("2001:db8::1")));
        // Private but the same as the signalling source (a LAN): strict.
        assert!(!nat("192.168.1.20:4000", ip("192.168.1.20")));
        // Public or loopback: strict, whatever the signalling source.
        assert!(!nat("198.51.100.1:4000", ip("203.0.113.5")));
        assert!(!nat("127.0.0.1:4000", ip("127.0.0.1")));
        assert!(!nat("172.32.0.1:4000", ip("203.0.113.5")));
        assert!(!nat("100.128.0.1:4000", ip("203.0.113.5")));
        // No usable address: NAT, and no target.
        let e = Expect::from_sdp(Some(a("0.0.0.0:4000")), None, pts);
        assert!(e.nat && e.addr.is_none());
        let e = Expect::from_sdp(Some(a("127.0.0.1:0")), None, pts);
        assert!(e.nat && e.addr.is_none());
        assert!(Expect::from_sdp(None, None, pts).nat);
    }

    #[test]
    fn refused_counts_reach_metrics() {
        let before = METRICS.rtp_packets_refused_total(Refusal::PayloadType);
        let mut c = RefusedCounts::default();
        c.count(Refusal::PayloadType);
        c.count(Refusal::PayloadType);
        c.count(Refusal::NotRtp);
        assert_eq!(c.total(), 3);
        c.flush();
        assert_eq!(c.total(), 0);
        assert!(METRICS.rtp_packets_refused_total(Refusal::PayloadType) >= before + 2);
    }
}
