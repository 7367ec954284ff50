//! SDP (RFC 4566) parsing, access and rewriting for media anchoring, sans-IO.
//!
//! The body is kept as its ordered list of `<type>=<value>` lines so that anything this module
//! does not understand is written back byte-for-byte; accessors parse the lines they need on
//! demand. Output always uses CRLF line ends; input may use CRLF or bare LF.

use crate::media::srtp::{MasterKey, Suite};
use std::fmt;
use std::net::{IpAddr, SocketAddr};

use thiserror::Error;

/// Why an SDP body was refused or a request on it could not be done.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum SdpError {
    #[error("empty SDP body")]
    Empty,
    #[error("SDP must start with v=0")]
    MissingVersion,
    #[error("line {line}: {reason}")]
    BadLine { line: usize, reason: &'static str },
    #[error("no media section {0}")]
    NoSuchMedia(usize),
    #[error("offer has no usable audio stream")]
    NoAudio,
}

/// Media direction attribute (RFC 3264 section 5.1 / RFC 4566 section 6).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Direction {
    #[default]
    SendRecv,
    SendOnly,
    RecvOnly,
    Inactive,
}

impl Direction {
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::SendRecv => "sendrecv",
            Direction::SendOnly => "sendonly",
            Direction::RecvOnly => "recvonly",
            Direction::Inactive => "inactive",
        }
    }

    fn from_attr(value: &str) -> Option<Self> {
        match value {
            "sendrecv" => Some(Direction::SendRecv),
            "sendonly" => Some(Direction::SendOnly),
            "recvonly" => Some(Direction::RecvOnly),
            "inactive" => Some(Direction::Inactive),
            _ => None,
        }
    }

    /// The direction an answerer uses to accept this offered direction (RFC 3264 6.1).
    pub fn answer_to(self) -> Self {
        match self {
            Direction::SendRecv => Direction::SendRecv,
            Direction::SendOnly => Direction::RecvOnly,
            Direction::RecvOnly => Direction::SendOnly,
            Direction::Inactive => Direction::Inactive,
        }
    }

    /// Whether the party that wrote this direction will send media.
    pub fn sends(self) -> bool {
        matches!(self, Direction::SendRecv | Direction::SendOnly)
    }

    /// Whether the party that wrote this direction wants to receive media.
    pub fn receives(self) -> bool {
        matches!(self, Direction::SendRecv | Direction::RecvOnly)
    }
}

impl fmt::Display for Direction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One codec as announced for a media section.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Codec {
    pub pt: u8,
    /// Encoding name as written (e.g. `PCMU`, `opus`, `telephone-event`).
    pub name: String,
    pub clock_rate: u32,
    /// Audio channels; 1 when the SDP does not say.
    pub channels: u16,
}

impl Codec {
    pub fn new(pt: u8, name: &str, clock_rate: u32, channels: u16) -> Self {
        Codec {
            pt,
            name: name.to_string(),
            clock_rate,
            channels,
        }
    }

    /// `NAME/rate` or `NAME/rate/channels` (channels only when not 1), the PROTOCOL.md format name.
    pub fn format_name(&self) -> String {
        if self.channels == 1 {
            format!("{}/{}", self.name, self.clock_rate)
        } else {
            format!("{}/{}/{}", self.name, self.clock_rate, self.channels)
        }
    }

    /// Case-insensitive match on encoding name, clock rate and channels (payload type ignored:
    /// dynamic types differ between offers).
    pub fn same_format(&self, other: &Codec) -> bool {
        self.name.eq_ignore_ascii_case(&other.name)
            && self.clock_rate == other.clock_rate
            && self.channels == other.channels
    }

    /// RFC 4733 telephone-event.
    pub fn is_telephone_event(&self) -> bool {
        self.name.eq_ignore_ascii_case("telephone-event")
    }
}

/// RFC 3551 static audio payload types (tables 4 and 5); video types are left out because
/// callvault only anchors and stores audio by codec name.
pub fn static_codec(pt: u8) -> Option<Codec> {
    let (name, rate, ch) = match pt {
        0 => ("PCMU", 8000, 1),
        3 => ("GSM", 8000, 1),
        4 => ("G723", 8000, 1),
        5 => ("DVI4", 8000, 1),
        6 => ("DVI4", 16000, 1),
        7 => ("LPC", 8000, 1),
        8 => ("PCMA", 8000, 1),
        // RFC 3551 4.5.2: G722's RTP clock rate is 8000 for historical reasons.
        9 => ("G722", 8000, 1),
        10 => ("L16", 44100, 2),
        11 => ("L16", 44100, 1),
        12 => ("QCELP", 8000, 1),
        13 => ("CN", 8000, 1),
        14 => ("MPA", 90000, 1),
        15 => ("G728", 8000, 1),
        16 => ("DVI4", 11025, 1),
        17 => ("DVI4", 22050, 1),
        18 => ("G729", 8000, 1),
        _ => return None,
    };
    Some(Codec::new(pt, name, rate, ch))
}

/// The `m=` line of a media section.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MediaLine {
    /// `audio`, `video`, `application`, ...
    pub media: String,
    pub port: u16,
    /// The `/<number of ports>` suffix, if present.
    pub port_count: Option<u16>,
    pub proto: String,
    pub formats: Vec<String>,
}

impl MediaLine {
    fn parse(value: &str) -> Option<Self> {
        let mut it = value.split(' ');
        let media = it.next().filter(|s| !s.is_empty())?;
        let port_field = it.next()?;
        let (port, port_count) = match port_field.split_once('/') {
            Some((p, n)) => (p.parse().ok()?, Some(n.parse().ok()?)),
            None => (port_field.parse().ok()?, None),
        };
        let proto = it.next().filter(|s| !s.is_empty())?;
        let formats: Vec<String> = it.filter(|s| !s.is_empty()).map(str::to_string).collect();
        Some(MediaLine {
            media: media.to_string(),
            port,
            port_count,
            proto: proto.to_string(),
            formats,
        })
    }

    /// Payload types among the formats (non-numeric formats of non-RTP protocols are skipped).
    pub fn payload_types(&self) -> Vec<u8> {
        self.formats.iter().filter_map(|f| f.parse().ok()).collect()
    }

    /// True for the RTP profiles (`RTP/AVP`, `RTP/SAVP`, `RTP/AVPF`, `UDP/TLS/RTP/SAVPF`, ...).
    pub fn is_rtp(&self) -> bool {
        self.proto.contains("RTP/")
    }
}

impl fmt::Display for MediaLine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.media, self.port)?;
        if let Some(n) = self.port_count {
            write!(f, "/{n}")?;
        }
        write!(f, " {}", self.proto)?;
        for fmt_ in &self.formats {
            write!(f, " {fmt_}")?;
        }
        Ok(())
    }
}

/// A `c=` line: network type IN, address type IP4/IP6, address (TTL / count suffixes dropped).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Connection {
    pub addr: IpAddr,
}

impl Connection {
    fn parse(value: &str) -> Option<Self> {
        let mut it = value.split_ascii_whitespace();
        let (net, kind, addr) = (it.next()?, it.next()?, it.next()?);
        if net != "IN" {
            return None;
        }
        // Multicast suffixes `/ttl[/count]` are not part of the address.
        let addr = addr.split('/').next()?;
        let addr: IpAddr = addr.parse().ok()?;
        match (kind, addr) {
            ("IP4", IpAddr::V4(_)) | ("IP6", IpAddr::V6(_)) => Some(Connection { addr }),
            _ => None,
        }
    }
}

fn addr_fields(addr: IpAddr) -> String {
    match addr {
        IpAddr::V4(a) => format!("IN IP4 {a}"),
        IpAddr::V6(a) => format!("IN IP6 {a}"),
    }
}

/// The `a=rtcp:` attribute (RFC 3605).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RtcpAttr {
    pub port: u16,
    pub addr: Option<IpAddr>,
}

/// Where a media section's RTP is to be sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MediaTarget {
    /// Port 0: the stream is rejected or disabled.
    Disabled,
    /// `c=` is `0.0.0.0` (or `::`): old RFC 2543 hold; the port is kept for when it resumes.
    HoldByAddress {
        port: u16,
    },
    Active(SocketAddr),
}

/// The `o=` line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    pub username: String,
    pub session_id: String,
    pub session_version: String,
    pub addr: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Line {
    kind: u8,
    /// Everything after `x=`, exactly as received (without the line end).
    value: String,
}

/// A parsed SDP body; see the module doc.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionDescription {
    lines: Vec<Line>,
    /// Index in `lines` of each `m=` line, in order.
    media_starts: Vec<usize>,
}

impl SessionDescription {
    /// Parses a body. Checks the structure callvault relies on (`v=0` first, well-formed `x=`
    /// lines, valid `m=`, `c=` and `o=` lines); other lines are kept without interpretation.
    pub fn parse(body: &str) -> Result<Self, SdpError> {
        let mut lines = Vec::new();
        let mut media_starts = Vec::new();
        for (i, raw) in body.split('\n').enumerate() {
            let raw = raw.strip_suffix('\r').unwrap_or(raw);
            let lineno = i + 1;
            // Blank lines are not allowed by RFC 4566, but a trailing CRLF pair is common.
            if raw.is_empty() {
                continue;
            }
            let bytes = raw.as_bytes();
            if bytes.len() < 2 || bytes[1] != b'=' || !bytes[0].is_ascii_lowercase() {
                return Err(SdpError::BadLine {
                    line: lineno,
                    reason: "not a <type>=<value> line",
                });
            }
            let kind = bytes[0];
            let value = &raw[2..];
            if lines.is_empty() && (kind != b'v' || value.trim() != "0") {
                return Err(SdpError::MissingVersion);
            }
            let bad = |reason| SdpError::BadLine {
                line: lineno,
                reason,
            };
            match kind {
                b'm' => {
                    MediaLine::parse(value).ok_or(bad("malformed m= line"))?;
                    media_starts.push(lines.len());
                }
                b'c' => {
                    Connection::parse(value).ok_or(bad("malformed c= line"))?;
                }
                b'o' if value.split_ascii_whitespace().count() != 6 => {
                    return Err(bad("malformed o= line"));
                }
                _ => {}
            }
            lines.push(Line {
                kind,
                value: value.to_string(),
            });
        }
        if lines.is_empty() {
            return Err(SdpError::Empty);
        }
        Ok(SessionDescription {
            lines,
            media_starts,
        })
    }

    /// Number of `m=` sections.
    pub fn media_count(&self) -> usize {
        self.media_starts.len()
    }

    fn session_range(&self) -> std::ops::Range<usize> {
        0..self
            .media_starts
            .first()
            .copied()
            .unwrap_or(self.lines.len())
    }

    fn media_range(&self, idx: usize) -> Result<std::ops::Range<usize>, SdpError> {
        let start = *self
            .media_starts
            .get(idx)
            .ok_or(SdpError::NoSuchMedia(idx))?;
        let end = self
            .media_starts
            .get(idx + 1)
            .copied()
            .unwrap_or(self.lines.len());
        Ok(start..end)
    }

    fn find(&self, range: std::ops::Range<usize>, kind: u8) -> Option<usize> {
        range.into_iter().find(|&i| self.lines[i].kind == kind)
    }

    /// Values of `a=` lines in `range`: `(name, Some(value))` or `(name, None)` for flags.
    fn attrs(
        &self,
        range: std::ops::Range<usize>,
    ) -> impl Iterator<Item = (usize, &str, Option<&str>)> + '_ {
        self.lines[range.clone()]
            .iter()
            .zip(range)
            .filter(|(l, _)| l.kind == b'a')
            .map(|(l, i)| match l.value.split_once(':') {
                Some((n, v)) => (i, n, Some(v)),
                None => (i, l.value.as_str(), None),
            })
    }

    /// The `o=` line.
    pub fn origin(&self) -> Option<Origin> {
        let i = self.find(self.session_range(), b'o')?;
        let f: Vec<&str> = self.lines[i].value.split_ascii_whitespace().collect();
        match f.as_slice() {
            [user, id, ver, _, _, addr] => Some(Origin {
                username: user.to_string(),
                session_id: id.to_string(),
                session_version: ver.to_string(),
                addr: addr.to_string(),
            }),
            _ => None,
        }
    }

    /// Session-level `c=` address.
    pub fn session_connection(&self) -> Option<IpAddr> {
        let i = self.find(self.session_range(), b'c')?;
        Connection::parse(&self.lines[i].value).map(|c| c.addr)
    }

    /// Media-level `c=` address of section `idx` (not falling back to the session level).
    pub fn media_connection(&self, idx: usize) -> Option<IpAddr> {
        let i = self.find(self.media_range(idx).ok()?, b'c')?;
        Connection::parse(&self.lines[i].value).map(|c| c.addr)
    }

    /// The `c=` address in force for section `idx` (media level, else session level).
    pub fn effective_connection(&self, idx: usize) -> Option<IpAddr> {
        self.media_connection(idx)
            .or_else(|| self.session_connection())
    }

    /// The `m=` line of section `idx`.
    pub fn media(&self, idx: usize) -> Option<MediaLine> {
        let start = *self.media_starts.get(idx)?;
        MediaLine::parse(&self.lines[start].value)
    }

    /// Index of the first section of this media type with a non-zero port.
    pub fn find_media(&self, media: &str) -> Option<usize> {
        (0..self.media_count()).find(|&i| {
            self.media(i)
                .is_some_and(|m| m.media.eq_ignore_ascii_case(media) && m.port != 0)
        })
    }

    /// Where to send RTP for section `idx`, telling disabled streams and 0.0.0.0 holds apart.
    pub fn target(&self, idx: usize) -> Option<MediaTarget> {
        let m = self.media(idx)?;
        if m.port == 0 {
            return Some(MediaTarget::Disabled);
        }
        let addr = self.effective_connection(idx)?;
        if addr.is_unspecified() {
            return Some(MediaTarget::HoldByAddress { port: m.port });
        }
        Some(MediaTarget::Active(SocketAddr::new(addr, m.port)))
    }

    /// The remote RTP target of section `idx`: `c=` address + `m=` port. `None` when the stream
    /// is disabled (port 0), on an RFC 2543 hold (`0.0.0.0`, see [`Self::target`]), or has no
    /// `c=` at all.
    pub fn connection_for(&self, idx: usize) -> Option<SocketAddr> {
        match self.target(idx)? {
            MediaTarget::Active(sa) => Some(sa),
            _ => None,
        }
    }

    /// True when the remote party of section `idx` does not want to receive: `sendonly` /
    /// `inactive`, or the old `c=0.0.0.0` style.
    pub fn is_on_hold(&self, idx: usize) -> bool {
        matches!(self.target(idx), Some(MediaTarget::HoldByAddress { .. }))
            || !self.direction(idx).receives()
    }

    /// Codecs of section `idx` in `m=` order: from `a=rtpmap`, else the RFC 3551 static table;
    /// dynamic payload types without `a=rtpmap` are skipped.
    pub fn codecs(&self, idx: usize) -> Vec<Codec> {
        let (Some(m), Ok(range)) = (self.media(idx), self.media_range(idx)) else {
            return Vec::new();
        };
        let maps: Vec<Codec> = self
            .attrs(range)
            .filter(|(_, n, _)| *n == "rtpmap")
            .filter_map(|(_, _, v)| parse_rtpmap(v?))
            .collect();
        m.payload_types()
            .into_iter()
            .filter_map(|pt| {
                maps.iter()
                    .find(|c| c.pt == pt)
                    .cloned()
                    .or_else(|| static_codec(pt))
            })
            .collect()
    }

    /// The `a=fmtp` parameters for payload type `pt` in section `idx`.
    pub fn fmtp(&self, idx: usize, pt: u8) -> Option<&str> {
        let range = self.media_range(idx).ok()?;
        self.attrs(range)
            .filter(|(_, n, _)| *n == "fmtp")
            .find_map(|(_, _, v)| {
                let (p, params) = v?.split_once(' ')?;
                (p.parse::<u8>().ok()? == pt).then_some(params)
            })
    }

    /// The `a=rtcp:` attribute of section `idx` (RFC 3605).
    pub fn rtcp(&self, idx: usize) -> Option<RtcpAttr> {
        let range = self.media_range(idx).ok()?;
        self.attrs(range)
            .find(|(_, n, _)| *n == "rtcp")
            .and_then(|(_, _, v)| parse_rtcp(v?))
    }

    /// Session-level direction (default sendrecv).
    pub fn session_direction(&self) -> Direction {
        self.attrs(self.session_range())
            .filter(|(_, _, v)| v.is_none())
            .find_map(|(_, n, _)| Direction::from_attr(n))
            .unwrap_or_default()
    }

    /// Direction of section `idx`: media level overrides session level, default sendrecv.
    pub fn direction(&self, idx: usize) -> Direction {
        self.media_range(idx)
            .ok()
            .and_then(|r| {
                self.attrs(r)
                    .filter(|(_, _, v)| v.is_none())
                    .find_map(|(_, n, _)| Direction::from_attr(n))
            })
            .unwrap_or_else(|| self.session_direction())
    }

    /// `a=ptime` in milliseconds, media level then session level.
    pub fn ptime(&self, idx: usize) -> Option<u32> {
        let find = |range| {
            self.attrs(range)
                .find(|(_, n, _)| *n == "ptime")
                .and_then(|(_, _, v)| v?.trim().parse().ok())
        };
        self.media_range(idx)
            .ok()
            .and_then(find)
            .or_else(|| find(self.session_range()))
    }

    /// Sets the direction of section `idx` at media level (replacing any there; a session-level
    /// direction is left alone since the media level overrides it).
    pub fn set_direction(&mut self, idx: usize, dir: Direction) -> Result<(), SdpError> {
        let range = self.media_range(idx)?;
        let existing: Option<usize> = self
            .attrs(range.clone())
            .find(|(_, n, v)| v.is_none() && Direction::from_attr(n).is_some())
            .map(|(i, _, _)| i);
        let line = Line {
            kind: b'a',
            value: dir.as_str().to_string(),
        };
        match existing {
            Some(i) => self.lines[i] = line,
            None => self.insert_line(range.end, line),
        }
        Ok(())
    }

    /// Rewrites section `idx` to be sent to `addr:rtp_port` (callvault's anchor): session- and
    /// media-level `c=`, the `m=` port, `a=rtcp:` (to `rtp_port + 1`, with the address) when
    /// present, and the `o=` address. Codecs and other attributes are untouched.
    ///
    /// The session-level `c=` is shared by every section without its own `c=`, so a caller
    /// anchors all active sections (or disables the others with [`Self::disable_media`]).
    pub fn rewrite_for_anchor(
        &mut self,
        idx: usize,
        addr: IpAddr,
        rtp_port: u16,
    ) -> Result<(), SdpError> {
        let range = self.media_range(idx)?;
        let conn = addr_fields(addr);

        let mut m = MediaLine::parse(&self.lines[range.start].value).ok_or(SdpError::BadLine {
            line: range.start + 1,
            reason: "malformed m= line",
        })?;
        m.port = rtp_port;
        self.lines[range.start].value = m.to_string();

        let rtcp_line = self
            .attrs(range.clone())
            .find(|(_, n, _)| *n == "rtcp")
            .map(|(i, _, _)| i);
        if let Some(i) = rtcp_line {
            self.lines[i].value = format!("rtcp:{} {conn}", rtp_port.wrapping_add(1));
        }

        let session_c = self.find(self.session_range(), b'c');
        let media_c = self.find(range.clone(), b'c');
        if let Some(i) = session_c {
            self.lines[i].value = conn.clone();
        }
        match media_c {
            Some(i) => self.lines[i].value = conn.clone(),
            // RFC 4566 5.7: c= must be in force for every section; add one if nothing covered it.
            None if session_c.is_none() => {
                let pos = self.media_c_position(range);
                self.insert_line(
                    pos,
                    Line {
                        kind: b'c',
                        value: conn.clone(),
                    },
                );
            }
            None => {}
        }

        if let Some(i) = self.find(self.session_range(), b'o') {
            let f: Vec<&str> = self.lines[i].value.split_ascii_whitespace().collect();
            if let [user, id, ver, _, _, _] = f.as_slice() {
                self.lines[i].value = format!("{user} {id} {ver} {conn}");
            }
        }
        Ok(())
    }

    /// Rejects/disables section `idx` by setting its port to 0 (RFC 3264 6).
    pub fn disable_media(&mut self, idx: usize) -> Result<(), SdpError> {
        let start = self.media_range(idx)?.start;
        if let Some(mut m) = MediaLine::parse(&self.lines[start].value) {
            m.port = 0;
            self.lines[start].value = m.to_string();
        }
        Ok(())
    }

    /// Increments the `o=` session version (RFC 3264 8: every new offer/answer in a dialog must).
    pub fn bump_version(&mut self) {
        let Some(i) = self.find(self.session_range(), b'o') else {
            return;
        };
        let mut f: Vec<String> = self.lines[i]
            .value
            .split_ascii_whitespace()
            .map(str::to_string)
            .collect();
        if let Some(ver) = f.get_mut(2) {
            *ver = match ver.parse::<u64>() {
                Ok(v) => v.wrapping_add(1).to_string(),
                // Non-numeric or >u64 versions are rare; restart from a fresh number.
                Err(_) => "1".to_string(),
            };
            self.lines[i].value = f.join(" ");
        }
    }

    /// Removes every media-level `a=NAME` / `a=NAME:...` of section `idx` (e.g. ICE candidates
    /// that would bypass the anchor). Returns how many were removed.
    pub fn remove_attribute(&mut self, idx: usize, name: &str) -> Result<usize, SdpError> {
        let range = self.media_range(idx)?;
        let doomed: Vec<usize> = self
            .attrs(range)
            .filter(|(_, n, _)| *n == name)
            .map(|(i, _, _)| i)
            .collect();
        for &i in doomed.iter().rev() {
            self.remove_line(i);
        }
        Ok(doomed.len())
    }

    /// Builds a `sendrecv`/`recvonly`/... answer to `offer`: the first audio section with a
    /// non-zero port is accepted at `local_addr:port` with `accepted_codecs` (payload types as
    /// in the offer; their `a=fmtp` and the offer's `a=ptime` are copied); every other section
    /// is rejected with port 0, as RFC 3264 requires one answer section per offered one.
    pub fn answer(
        offer: &SessionDescription,
        local_addr: IpAddr,
        port: u16,
        accepted_codecs: &[Codec],
        direction: Direction,
        session_id: u64,
    ) -> Result<SessionDescription, SdpError> {
        let audio = offer.find_media("audio").ok_or(SdpError::NoAudio)?;
        if accepted_codecs.is_empty() {
            return Err(SdpError::NoAudio);
        }
        let mut out = Self::header(local_addr, session_id);
        for idx in 0..offer.media_count() {
            let Some(m) = offer.media(idx) else { continue };
            if idx == audio {
                let fmtp: Vec<(u8, String)> = accepted_codecs
                    .iter()
                    .filter_map(|c| offer.fmtp(idx, c.pt).map(|f| (c.pt, f.to_string())))
                    .collect();
                out.push_audio(
                    &m.proto,
                    port,
                    accepted_codecs,
                    &fmtp,
                    offer.ptime(idx),
                    direction,
                );
            } else {
                let rejected = MediaLine { port: 0, ..m };
                out.push_line(b'm', rejected.to_string());
            }
        }
        Ok(out)
    }

    /// Builds a single-audio-stream offer from callvault (used when it originates a session).
    /// `fmtp` pairs a payload type with its parameters (e.g. `(101, "0-16")`).
    pub fn offer(
        local_addr: IpAddr,
        port: u16,
        codecs: &[Codec],
        fmtp: &[(u8, String)],
        ptime: Option<u32>,
        direction: Direction,
        session_id: u64,
    ) -> SessionDescription {
        let mut out = Self::header(local_addr, session_id);
        out.push_audio("RTP/AVP", port, codecs, fmtp, ptime, direction);
        out
    }

    fn header(local_addr: IpAddr, session_id: u64) -> SessionDescription {
        let conn = addr_fields(local_addr);
        let mut out = SessionDescription {
            lines: Vec::new(),
            media_starts: Vec::new(),
        };
        out.push_line(b'v', "0".into());
        out.push_line(b'o', format!("callvault {session_id} {session_id} {conn}"));
        out.push_line(b's', "callvault".into());
        out.push_line(b'c', conn);
        out.push_line(b't', "0 0".into());
        out
    }

    fn push_audio(
        &mut self,
        proto: &str,
        port: u16,
        codecs: &[Codec],
        fmtp: &[(u8, String)],
        ptime: Option<u32>,
        direction: Direction,
    ) {
        let m = MediaLine {
            media: "audio".into(),
            port,
            port_count: None,
            proto: proto.into(),
            formats: codecs.iter().map(|c| c.pt.to_string()).collect(),
        };
        self.push_line(b'm', m.to_string());
        for c in codecs {
            // Static types get an rtpmap too: harmless, and some UAs insist on it.
            let chans = if c.channels == 1 {
                String::new()
            } else {
                format!("/{}", c.channels)
            };
            self.push_line(
                b'a',
                format!("rtpmap:{} {}/{}{chans}", c.pt, c.name, c.clock_rate),
            );
            if let Some((_, f)) = fmtp.iter().find(|(pt, _)| *pt == c.pt) {
                self.push_line(b'a', format!("fmtp:{} {f}", c.pt));
            }
        }
        if let Some(p) = ptime {
            self.push_line(b'a', format!("ptime:{p}"));
        }
        self.push_line(b'a', direction.as_str().into());
    }

    fn push_line(&mut self, kind: u8, value: String) {
        if kind == b'm' {
            self.media_starts.push(self.lines.len());
        }
        self.lines.push(Line { kind, value });
    }

    fn insert_line(&mut self, pos: usize, line: Line) {
        debug_assert!(line.kind != b'm');
        self.lines.insert(pos, line);
        for s in &mut self.media_starts {
            if *s >= pos {
                *s += 1;
            }
        }
    }

    fn remove_line(&mut self, pos: usize) {
        debug_assert!(self.lines[pos].kind != b'm');
        self.lines.remove(pos);
        for s in &mut self.media_starts {
            if *s > pos {
                *s -= 1;
            }
        }
    }

    /// Where a media-level `c=` goes: after `m=`, `i=` (RFC 4566 5 ordering m, i, c, b, k, a).
    fn media_c_position(&self, range: std::ops::Range<usize>) -> usize {
        let mut pos = range.start + 1;
        while pos < range.end && self.lines[pos].kind == b'i' {
            pos += 1;
        }
        pos
    }
}

/// A supported SDES `a=crypto` line (RFC 4568 §9.1): tag, suite and inline master key. Lines
/// with a suite callvault does not speak, an MKI, several keys or session parameters are
/// not represented (callvault cannot honour them).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CryptoLine {
    pub tag: u32,
    pub suite: Suite,
    pub key: MasterKey,
}

impl CryptoLine {
    fn parse(value: &str) -> Option<CryptoLine> {
        let mut it = value.split_ascii_whitespace();
        let tag = it.next()?.parse().ok()?;
        let suite = Suite::parse(it.next()?)?;
        let key_params = it.next()?;
        if it.next().is_some() || key_params.contains(';') {
            return None;
        }
        let inline = key_params.strip_prefix("inline:")?;
        let mut parts = inline.split('|');
        let key = MasterKey::from_base64(parts.next()?)?;
        // `|lifetime` is fine (callvault rekeys never and calls are far shorter); an MKI
        // (`|n:len`) would put bytes in every packet that callvault does not write.
        let rest: Vec<&str> = parts.collect();
        if rest.iter().any(|p| p.contains(':')) || rest.len() > 1 {
            return None;
        }
        Some(CryptoLine { tag, suite, key })
    }
}

impl fmt::Display for CryptoLine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "crypto:{} {} inline:{}",
            self.tag,
            self.suite.name(),
            self.key.to_base64()
        )
    }
}

/// True for the SRTP profiles SDES applies to (`RTP/SAVP`, `RTP/SAVPF`).
pub fn is_savp(proto: &str) -> bool {
    proto == "RTP/SAVP" || proto == "RTP/SAVPF"
}

impl SessionDescription {
    /// The supported `a=crypto` lines of section `idx`, in the order offered.
    pub fn crypto(&self, idx: usize) -> Vec<CryptoLine> {
        let Ok(range) = self.media_range(idx) else {
            return Vec::new();
        };
        self.attrs(range)
            .filter(|(_, n, _)| *n == "crypto")
            .filter_map(|(_, _, v)| CryptoLine::parse(v?))
            .collect()
    }

    /// Makes section `idx` plain `RTP/AVP(F)` without `a=crypto` (`lines` empty), or
    /// `RTP/SAVP(F)` with exactly `lines`.
    pub fn set_crypto(&mut self, idx: usize, lines: &[CryptoLine]) -> Result<(), SdpError> {
        self.remove_attribute(idx, "crypto")?;
        let range = self.media_range(idx)?;
        let mut m = MediaLine::parse(&self.lines[range.start].value).ok_or(SdpError::BadLine {
            line: range.start + 1,
            reason: "malformed m= line",
        })?;
        let feedback = m.proto.ends_with('F');
        m.proto = match (lines.is_empty(), feedback) {
            (true, false) => "RTP/AVP",
            (true, true) => "RTP/AVPF",
            (false, false) => "RTP/SAVP",
            (false, true) => "RTP/SAVPF",
        }
        .to_string();
        self.lines[range.start].value = m.to_string();
        for (n, line) in lines.iter().enumerate() {
            self.insert_line(
                range.end + n,
                Line {
                    kind: b'a',
                    value: line.to_string(),
                },
            );
        }
        Ok(())
    }
}

impl fmt::Display for SessionDescription {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for l in &self.lines {
            // `kind` is an ASCII lowercase letter (checked in parse / set by this module).
            write!(f, "{}={}\r\n", l.kind as char, l.value)?;
        }
        Ok(())
    }
}

impl std::str::FromStr for SessionDescription {
    type Err = SdpError;
    fn from_str(s: &str) -> Result<Self, SdpError> {
        Self::parse(s)
    }
}

fn parse_rtpmap(v: &str) -> Option<Codec> {
    let (pt, enc) = v.trim().split_once(' ')?;
    let pt: u8 = pt.parse().ok()?;
    if pt > 127 {
        return None;
    }
    let mut it = enc.trim().split('/');
    let name = it.next().filter(|s| !s.is_empty())?;
    let clock_rate = it.next()?.parse().ok()?;
    let channels = match it.next() {
        Some(c) => c.parse().ok()?,
        None => 1,
    };
    Some(Codec::new(pt, name, clock_rate, channels))
}

fn parse_rtcp(v: &str) -> Option<RtcpAttr> {
    let mut it = v.split_ascii_whitespace();
    let port = it.next()?.parse().ok()?;
    let rest: Vec<&str> = it.collect();
    let addr = if rest.is_empty() {
        None
    } else {
        Some(Connection::parse(&rest.join(" "))?.addr)
    };
    Some(RtcpAttr { port, addr })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crypto_lines_parse_and_rewrite() {
        let key = MasterKey::random();
        let offer = format!(
            "v=0\r\no=- 1 1 IN IP4 10.0.0.1\r\ns=-\r\nc=IN IP4 10.0.0.1\r\nt=0 0\r\n\
             m=audio 4000 RTP/SAVP 0\r\na=rtpmap:0 PCMU/8000\r\n\
             a=crypto:1 AEAD_AES_256_GCM inline:AAAA\r\n\
             a=crypto:2 AES_CM_128_HMAC_SHA1_80 inline:{k}|2^20|1:4\r\n\
             a=crypto:3 AES_CM_128_HMAC_SHA1_32 inline:{k}|2^31\r\n\
             a=crypto:4 AES_CM_128_HMAC_SHA1_80 inline:{k} UNENCRYPTED_SRTP\r\n\
             a=crypto:5 AES_CM_128_HMAC_SHA1_80 inline:{k}\r\n",
            k = key.to_base64()
        );
        let mut sdp = SessionDescription::parse(&offer).unwrap();
        // Unknown suite, MKI and session parameters are skipped; lifetimes are fine.
        let lines = sdp.crypto(0);
        assert_eq!(
            lines.iter().map(|l| l.tag).collect::<Vec<_>>(),
            vec![3, 5],
            "{lines:?}"
        );
        assert_eq!(lines[0].suite, Suite::AesCm128HmacSha1_32);
        assert_eq!(lines[1].key, key);
        // Rewritten with one line of ours: SAVP, only that line.
        let ours = CryptoLine {
            tag: 5,
            suite: Suite::AesCm128HmacSha1_80,
            key: MasterKey::random(),
        };
        sdp.set_crypto(0, std::slice::from_ref(&ours)).unwrap();
        let text = sdp.to_string();
        assert_eq!(text.matches("a=crypto:").count(), 1, "{text}");
        assert!(text.contains(&ours.to_string()), "{text}");
        assert!(!text.contains(&key.to_base64()), "{text}");
        assert_eq!(sdp.media(0).unwrap().proto, "RTP/SAVP");
        // And made plain: AVP, no crypto.
        sdp.set_crypto(0, &[]).unwrap();
        let text = sdp.to_string();
        assert!(!text.contains("a=crypto"), "{text}");
        assert_eq!(sdp.media(0).unwrap().proto, "RTP/AVP");
        assert!(is_savp("RTP/SAVPF") && !is_savp("RTP/AVP"));
    }
    use std::net::Ipv6Addr;

    fn crlf(s: &str) -> String {
        s.lines().map(|l| format!("{l}\r\n")).collect()
    }

    // SIPp's default uac.xml body.
    const SIPP: &str = "v=0
o=user1 53655765 2353687637 IN IP4 127.0.0.1
s=-
c=IN IP4 127.0.0.1
t=0 0
m=audio 6000 RTP/AVP 0
a=rtpmap:0 PCMU/8000
";

    // Asterisk 20 (chan_pjsip) offer.
    const ASTERISK: &str = "v=0
o=- 1791582310 1791582310 IN IP4 10.0.0.5
s=Asterisk
c=IN IP4 10.0.0.5
t=0 0
m=audio 17398 RTP/AVP 0 8 9 101
a=rtpmap:0 PCMU/8000
a=rtpmap:8 PCMA/8000
a=rtpmap:9 G722/8000
a=rtpmap:101 telephone-event/8000
a=fmtp:101 0-16
a=ptime:20
a=maxptime:150
a=sendrecv
";

    // baresip 1.0 offer: no rtpmap for static types, a=rtcp with port only, opus with channels.
    const BARESIP: &str = "v=0
o=- 1449603934 1734206117 IN IP4 192.168.1.20
s=-
c=IN IP4 192.168.1.20
t=0 0
m=audio 10630 RTP/AVP 96 9 0 8 101
b=AS:96
a=rtpmap:96 opus/48000/2
a=fmtp:96 stereo=1;sprop-stereo=1
a=rtpmap:101 telephone-event/8000
a=fmtp:101 0-15
a=rtcp:10631
a=sendrecv
a=label:1
a=ssrc:1234 cname:abc
a=rtcp-rsize
a=ptime:20
";

    // linphone: session-level direction, media-level c=, video section, rtcp with address.
    const LINPHONE: &str = "v=0
o=alice 2345 1234 IN IP4 192.168.0.7
s=Talk
c=IN IP4 192.168.0.7
t=0 0
a=rtcp-xr:rcvr-rtt=all:10000 stat-summary=loss,dup,jitt,TTL voip-metrics
a=sendrecv
m=audio 7078 RTP/AVP 96 97 98 0 8 18 101 99 100
c=IN IP4 192.168.0.8
a=rtpmap:96 opus/48000/2
a=fmtp:96 useinbandfec=1
a=rtpmap:97 speex/16000
a=fmtp:97 vbr=on
a=rtpmap:98 speex/8000
a=fmtp:98 vbr=on
a=fmtp:18 annexb=yes
a=rtpmap:101 telephone-event/48000
a=rtpmap:99 telephone-event/16000
a=rtpmap:100 telephone-event/8000
a=rtcp:7079 IN IP4 192.168.0.8
a=rtcp-fb:* trr-int 1000
m=video 9078 RTP/AVP 96
a=rtpmap:96 VP8/90000
a=recvonly
";

    const IPV6: &str = "v=0
o=- 20518 0 IN IP6 2001:db8::10
s=-
c=IN IP6 2001:db8::10
t=0 0
m=audio 49170 RTP/AVP 0 8
a=rtcp:49171 IN IP6 2001:db8::10
";

    #[test]
    fn round_trips_real_bodies_byte_for_byte() {
        for body in [SIPP, ASTERISK, BARESIP, LINPHONE, IPV6] {
            let wire = crlf(body);
            let sdp = SessionDescription::parse(&wire).unwrap();
            assert_eq!(sdp.to_string(), wire);
            // LF-only input comes out as CRLF.
            assert_eq!(SessionDescription::parse(body).unwrap().to_string(), wire);
        }
    }

    #[test]
    fn unknown_lines_and_whitespace_survive() {
        let body = "v=0\r\no=- 1 1 IN IP4 1.2.3.4\r\ns= spaced  \r\nz=weird stuff\r\nm=audio 5 RTP/AVP 0\r\na=x-custom:  keep  this \r\n";
        let sdp = SessionDescription::parse(body).unwrap();
        assert_eq!(sdp.to_string(), body);
    }

    #[test]
    fn sipp_basics() {
        let sdp = SessionDescription::parse(SIPP).unwrap();
        assert_eq!(sdp.media_count(), 1);
        assert_eq!(
            sdp.connection_for(0),
            Some("127.0.0.1:6000".parse().unwrap())
        );
        assert_eq!(sdp.codecs(0), vec![Codec::new(0, "PCMU", 8000, 1)]);
        assert_eq!(sdp.direction(0), Direction::SendRecv);
        assert_eq!(sdp.ptime(0), None);
        assert_eq!(sdp.rtcp(0), None);
        let o = sdp.origin().unwrap();
        assert_eq!(o.session_version, "2353687637");
    }

    #[test]
    fn asterisk_codecs_fmtp_ptime() {
        let sdp = SessionDescription::parse(ASTERISK).unwrap();
        let codecs = sdp.codecs(0);
        let names: Vec<String> = codecs.iter().map(Codec::format_name).collect();
        assert_eq!(
            names,
            [
                "PCMU/8000",
                "PCMA/8000",
                "G722/8000",
                "telephone-event/8000"
            ]
        );
        assert!(codecs[3].is_telephone_event());
        assert_eq!(sdp.fmtp(0, 101), Some("0-16"));
        assert_eq!(sdp.fmtp(0, 0), None);
        assert_eq!(sdp.ptime(0), Some(20));
        assert_eq!(sdp.direction(0), Direction::SendRecv);
    }

    #[test]
    fn baresip_static_types_without_rtpmap() {
        let sdp = SessionDescription::parse(BARESIP).unwrap();
        let codecs = sdp.codecs(0);
        assert_eq!(codecs.len(), 5);
        assert_eq!(codecs[0], Codec::new(96, "opus", 48000, 2));
        assert_eq!(codecs[0].format_name(), "opus/48000/2");
        assert_eq!(codecs[1], Codec::new(9, "G722", 8000, 1));
        assert_eq!(codecs[2], Codec::new(0, "PCMU", 8000, 1));
        assert_eq!(codecs[3], Codec::new(8, "PCMA", 8000, 1));
        assert_eq!(
            sdp.rtcp(0),
            Some(RtcpAttr {
                port: 10631,
                addr: None
            })
        );
        assert_eq!(sdp.fmtp(0, 96), Some("stereo=1;sprop-stereo=1"));
    }

    #[test]
    fn linphone_media_level_overrides() {
        let sdp = SessionDescription::parse(LINPHONE).unwrap();
        assert_eq!(sdp.media_count(), 2);
        // media-level c= wins over the session one
        assert_eq!(
            sdp.connection_for(0),
            Some("192.168.0.8:7078".parse().unwrap())
        );
        assert_eq!(
            sdp.connection_for(1),
            Some("192.168.0.7:9078".parse().unwrap())
        );
        assert_eq!(sdp.direction(0), Direction::SendRecv); // session level
        assert_eq!(sdp.direction(1), Direction::RecvOnly); // media level
        assert_eq!(sdp.session_direction(), Direction::SendRecv);
        // G729 (18) is static, 96 is opus here but VP8 in the video section.
        let audio = sdp.codecs(0);
        assert!(audio.contains(&Codec::new(18, "G729", 8000, 1)));
        assert_eq!(sdp.codecs(1), vec![Codec::new(96, "VP8", 90000, 1)]);
        assert_eq!(sdp.fmtp(0, 18), Some("annexb=yes"));
        assert_eq!(
            sdp.rtcp(0),
            Some(RtcpAttr {
                port: 7079,
                addr: Some("192.168.0.8".parse().unwrap())
            })
        );
        assert_eq!(sdp.find_media("video"), Some(1));
        // ptime is absent at both levels
        assert_eq!(sdp.ptime(0), None);
    }

    #[test]
    fn ipv6() {
        let sdp = SessionDescription::parse(IPV6).unwrap();
        let target = sdp.connection_for(0).unwrap();
        assert_eq!(target, "[2001:db8::10]:49170".parse().unwrap());
        assert_eq!(
            sdp.rtcp(0).unwrap().addr,
            Some("2001:db8::10".parse().unwrap())
        );
    }

    #[test]
    fn rewrite_for_anchor_ipv4() {
        let mut sdp = SessionDescription::parse(LINPHONE).unwrap();
        let anchor: IpAddr = "192.0.2.10".parse().unwrap();
        sdp.rewrite_for_anchor(0, anchor, 20000).unwrap();
        sdp.rewrite_for_anchor(1, anchor, 20002).unwrap();
        sdp.bump_version();
        assert_eq!(
            sdp.connection_for(0),
            Some("192.0.2.10:20000".parse().unwrap())
        );
        assert_eq!(
            sdp.connection_for(1),
            Some("192.0.2.10:20002".parse().unwrap())
        );
        assert_eq!(sdp.session_connection(), Some(anchor));
        assert_eq!(
            sdp.rtcp(0),
            Some(RtcpAttr {
                port: 20001,
                addr: Some(anchor)
            })
        );
        let o = sdp.origin().unwrap();
        assert_eq!(
            (o.session_version.as_str(), o.addr.as_str()),
            ("1235", "192.0.2.10")
        );
        // codecs and other attributes untouched
        let orig = SessionDescription::parse(LINPHONE).unwrap();
        assert_eq!(sdp.codecs(0), orig.codecs(0));
        assert_eq!(sdp.direction(1), Direction::RecvOnly);
        let text = sdp.to_string();
        assert!(text.contains("a=rtcp-fb:* trr-int 1000\r\n"));
        assert!(text.contains("m=audio 20000 RTP/AVP 96 97 98 0 8 18 101 99 100\r\n"));
        assert!(!text.contains("192.168.0."));
        // and it reparses
        assert_eq!(SessionDescription::parse(&text).unwrap(), sdp);
    }

    #[test]
    fn rewrite_for_anchor_to_ipv6_and_rtcp_without_address() {
        let mut sdp = SessionDescription::parse(BARESIP).unwrap();
        let anchor = IpAddr::V6(Ipv6Addr::LOCALHOST);
        sdp.rewrite_for_anchor(0, anchor, 30000).unwrap();
        let text = sdp.to_string();
        assert!(text.contains("c=IN IP6 ::1\r\n"));
        assert!(text.contains("o=- 1449603934 1734206117 IN IP6 ::1\r\n"));
        assert!(text.contains("a=rtcp:30001 IN IP6 ::1\r\n"));
        assert_eq!(sdp.connection_for(0), Some("[::1]:30000".parse().unwrap()));
    }

    #[test]
    fn rewrite_adds_rtcp_only_when_present_and_c_when_missing() {
        let mut sdp = SessionDescription::parse(ASTERISK).unwrap();
        sdp.rewrite_for_anchor(0, "127.0.0.1".parse().unwrap(), 20000)
            .unwrap();
        assert_eq!(sdp.rtcp(0), None);
        assert!(!sdp.to_string().contains("a=rtcp:"));

        // No c= anywhere (invalid, but seen): one is added at media level after m=/i=.
        let body = "v=0\no=- 1 1 IN IP4 1.1.1.1\ns=-\nt=0 0\nm=audio 4000 RTP/AVP 0\ni=voice\na=sendrecv\n";
        let mut sdp = SessionDescription::parse(body).unwrap();
        assert_eq!(sdp.connection_for(0), None);
        sdp.rewrite_for_anchor(0, "10.1.1.1".parse().unwrap(), 20000)
            .unwrap();
        assert_eq!(
            sdp.to_string(),
            crlf("v=0\no=- 1 1 IN IP4 10.1.1.1\ns=-\nt=0 0\nm=audio 20000 RTP/AVP 0\ni=voice\nc=IN IP4 10.1.1.1\na=sendrecv\n")
        );
        assert_eq!(
            sdp.rewrite_for_anchor(3, "10.1.1.1".parse().unwrap(), 1),
            Err(SdpError::NoSuchMedia(3))
        );
    }

    #[test]
    fn hold_styles() {
        let old = SIPP.replace("c=IN IP4 127.0.0.1", "c=IN IP4 0.0.0.0");
        let sdp = SessionDescription::parse(&old).unwrap();
        assert_eq!(sdp.connection_for(0), None);
        assert_eq!(
            sdp.target(0),
            Some(MediaTarget::HoldByAddress { port: 6000 })
        );
        assert!(sdp.is_on_hold(0));

        let mut sdp = SessionDescription::parse(ASTERISK).unwrap();
        assert!(!sdp.is_on_hold(0));
        sdp.set_direction(0, Direction::SendOnly).unwrap();
        assert_eq!(sdp.direction(0), Direction::SendOnly);
        assert!(sdp.is_on_hold(0));
        // replaced in place, not duplicated
        assert_eq!(sdp.to_string().matches("a=send").count(), 1);
        assert!(sdp.to_string().ends_with("a=sendonly\r\n"));

        // adding a direction where none exists puts it at the end of that section only
        let mut sdp = SessionDescription::parse(LINPHONE).unwrap();
        sdp.set_direction(0, Direction::Inactive).unwrap();
        assert_eq!(sdp.direction(0), Direction::Inactive);
        assert_eq!(sdp.direction(1), Direction::RecvOnly);
        assert_eq!(sdp.media(1).unwrap().media, "video");
        assert!(sdp
            .to_string()
            .contains("a=rtcp-fb:* trr-int 1000\r\na=inactive\r\nm=video"));

        let disabled = SIPP.replace("m=audio 6000", "m=audio 0");
        let sdp = SessionDescription::parse(&disabled).unwrap();
        assert_eq!(sdp.target(0), Some(MediaTarget::Disabled));
        assert_eq!(sdp.connection_for(0), None);
    }

    #[test]
    fn answer_accepts_first_audio_and_rejects_the_rest() {
        let offer = SessionDescription::parse(LINPHONE).unwrap();
        let codecs = offer.codecs(0);
        let pcmu = codecs.iter().find(|c| c.name == "PCMU").unwrap().clone();
        let te = codecs
            .iter()
            .find(|c| c.is_telephone_event() && c.clock_rate == 8000)
            .unwrap()
            .clone();
        let ans = SessionDescription::answer(
            &offer,
            "192.0.2.10".parse().unwrap(),
            20000,
            &[pcmu, te],
            offer.direction(0).answer_to(),
            42,
        )
        .unwrap();
        assert_eq!(ans.media_count(), 2);
        assert_eq!(
            ans.connection_for(0),
            Some("192.0.2.10:20000".parse().unwrap())
        );
        assert_eq!(ans.target(1), Some(MediaTarget::Disabled));
        assert_eq!(ans.media(1).unwrap().media, "video");
        assert_eq!(
            ans.codecs(0),
            vec![
                Codec::new(0, "PCMU", 8000, 1),
                Codec::new(100, "telephone-event", 8000, 1)
            ]
        );
        assert_eq!(ans.direction(0), Direction::SendRecv);
        let o = ans.origin().unwrap();
        assert_eq!(o.session_id, "42");
        // it parses back to itself
        assert_eq!(SessionDescription::parse(&ans.to_string()).unwrap(), ans);
    }

    #[test]
    fn answer_store_session_recvonly() {
        let offer = SessionDescription::parse(
            &format!("{ASTERISK}a=sendonly\n").replace("a=sendrecv\n", ""),
        )
        .unwrap();
        assert_eq!(offer.direction(0), Direction::SendOnly);
        let accepted: Vec<Codec> = offer
            .codecs(0)
            .into_iter()
            .filter(|c| c.pt == 0 || c.pt == 101)
            .collect();
        let ans = SessionDescription::answer(
            &offer,
            "127.0.0.1".parse().unwrap(),
            21000,
            &accepted,
            Direction::RecvOnly,
            7,
        )
        .unwrap();
        let text = ans.to_string();
        assert_eq!(
            text,
            crlf("v=0\no=callvault 7 7 IN IP4 127.0.0.1\ns=callvault\nc=IN IP4 127.0.0.1\nt=0 0\nm=audio 21000 RTP/AVP 0 101\na=rtpmap:0 PCMU/8000\na=rtpmap:101 telephone-event/8000\na=fmtp:101 0-16\na=ptime:20\na=recvonly\n")
        );
        let no_audio = SessionDescription::parse("v=0\nm=video 1 RTP/AVP 96\n").unwrap();
        assert_eq!(
            SessionDescription::answer(
                &no_audio,
                "127.0.0.1".parse().unwrap(),
                1,
                &accepted,
                Direction::RecvOnly,
                1
            ),
            Err(SdpError::NoAudio)
        );
    }

    #[test]
    fn offer_builder() {
        let sdp = SessionDescription::offer(
            "127.0.0.1".parse().unwrap(),
            22000,
            &[Codec::new(96, "opus", 48000, 2)],
            &[(96, "useinbandfec=1".into())],
            Some(20),
            Direction::SendOnly,
            9,
        );
        assert_eq!(sdp.codecs(0), vec![Codec::new(96, "opus", 48000, 2)]);
        assert_eq!(sdp.fmtp(0, 96), Some("useinbandfec=1"));
        assert_eq!(sdp.direction(0), Direction::SendOnly);
        assert!(sdp.to_string().contains("a=rtpmap:96 opus/48000/2\r\n"));
    }

    #[test]
    fn bump_version_and_remove_attribute() {
        let mut sdp = SessionDescription::parse(BARESIP).unwrap();
        sdp.bump_version();
        sdp.bump_version();
        assert_eq!(sdp.origin().unwrap().session_version, "1734206119");
        assert_eq!(sdp.remove_attribute(0, "ssrc").unwrap(), 1);
        assert_eq!(sdp.remove_attribute(0, "rtcp-rsize").unwrap(), 1);
        assert_eq!(sdp.remove_attribute(0, "candidate").unwrap(), 0);
        let t = sdp.to_string();
        assert!(!t.contains("ssrc") && !t.contains("rtcp-rsize"));
        assert!(t.ends_with("a=label:1\r\na=ptime:20\r\n"));
    }

    #[test]
    fn malformed_bodies_are_errors() {
        let cases: &[&str] = &[
            "",
            "\r\n",
            "o=- 1 1 IN IP4 1.1.1.1\r\n",
            "v=1\r\n",
            "v=0\r\nthis is not sdp\r\n",
            "v=0\r\nX=upper\r\n",
            "v=0\r\n=novalue\r\n",
            "v=0\r\nm=audio\r\n",
            "v=0\r\nm=audio abc RTP/AVP 0\r\n",
            "v=0\r\nm=audio 70000 RTP/AVP 0\r\n",
            "v=0\r\nm=audio 5/x RTP/AVP 0\r\n",
            "v=0\r\nc=IN IP4 not-an-ip\r\n",
            "v=0\r\nc=IN IP6 1.2.3.4\r\n",
            "v=0\r\nc=ATM NSAP 1\r\n",
            "v=0\r\no=only three fields\r\n",
            "v=0\r\n \r\n",
        ];
        for c in cases {
            assert!(SessionDescription::parse(c).is_err(), "accepted {c:?}");
        }
        assert_eq!(SessionDescription::parse(""), Err(SdpError::Empty));
        assert!(matches!(
            SessionDescription::parse("v=0\nm=audio x RTP/AVP 0\n"),
            Err(SdpError::BadLine { line: 2, .. })
        ));
    }

    #[test]
    fn garbage_attributes_do_not_panic() {
        let body = "v=0\nc=IN IP4 1.1.1.1\nm=audio 1000 RTP/AVP 0 96 97 foo 300\na=rtpmap:96\na=rtpmap:97 x/\na=rtpmap:300 big/8000\na=fmtp:\na=rtcp:notaport\na=ptime:abc\na=\n";
        let sdp = SessionDescription::parse(body).unwrap();
        // only PCMU survives: 96/97 have broken rtpmaps, foo/300 are not payload types
        assert_eq!(sdp.codecs(0), vec![Codec::new(0, "PCMU", 8000, 1)]);
        assert_eq!(sdp.rtcp(0), None);
        assert_eq!(sdp.ptime(0), None);
        assert_eq!(sdp.fmtp(0, 0), None);
        assert_eq!(sdp.codecs(5), vec![]);
        assert_eq!(sdp.direction(5), Direction::SendRecv);
        // multicast c= with ttl parses to its address
        let mc = SessionDescription::parse("v=0\nc=IN IP4 224.2.1.1/127/3\nm=audio 5 RTP/AVP 0\n")
            .unwrap();
        assert_eq!(mc.connection_for(0), Some("224.2.1.1:5".parse().unwrap()));
    }
}
