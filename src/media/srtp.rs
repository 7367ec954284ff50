//! SRTP and SRTCP (RFC 3711) for the crypto suites of SDES (RFC 4568 §6.2):
//! `AES_CM_128_HMAC_SHA1_80` and `AES_CM_128_HMAC_SHA1_32`.
//!
//! One [`SrtpContext`] protects or unprotects one direction of one leg with one master key
//! (SDES gives each sender its own key). Everything works in place on the caller's buffer:
//! no allocation, no lock, no log per packet. Session keys are derived once (§4.3, key
//! derivation rate 0); the AES key schedule and the keyed HMAC state are kept and copied per
//! packet.
//!
//! - Encryption: AES in counter mode, IV = salt·2^16 ⊕ SSRC·2^64 ⊕ index·2^16 (§4.1.1).
//! - Authentication: HMAC-SHA1 over the packet and the ROC (RTP) or the E‖index word (RTCP),
//!   cut to 80 or 32 bits for RTP and always 80 bits for RTCP (RFC 4568 §6.2.2).
//! - Index: the 48-bit packet index is guessed from the 16-bit sequence number, the rollover
//!   counter (ROC) and the highest number seen (§3.3.1, Appendix A), per SSRC.
//! - Replay: a 64-packet sliding window per SSRC (§3.3.2); the window moves only for packets
//!   that authenticate.
//!
//! A context follows up to [`MAX_STREAMS`] SSRCs at once (a phone sends one; a re-INVITE or a
//! player may add another); a further SSRC takes over the least recently started slot.

use aes::cipher::{BlockEncrypt, InnerIvInit, KeyInit, StreamCipher};
use aes::Aes128;
use base64::Engine as _;
use hmac::{Hmac, Mac};
use sha1::Sha1;
use subtle::ConstantTimeEq;

type AesCtr = ctr::Ctr128BE<Aes128>;
type HmacSha1 = Hmac<Sha1>;

/// SSRCs one context keeps index and replay state for.
pub const MAX_STREAMS: usize = 4;
/// Packets behind the highest index that are still accepted once (RFC 3711 §3.3.2: ≥ 64).
pub const REPLAY_WINDOW: u64 = 64;
/// Master key and salt lengths of the AES_CM_128 suites.
pub const KEY_LEN: usize = 16;
pub const SALT_LEN: usize = 14;
/// RTCP's authentication tag, the same for both suites.
const RTCP_TAG_LEN: usize = 10;
/// The E flag and 31-bit SRTCP index that follow an SRTCP packet's encrypted part.
const RTCP_TRAILER_LEN: usize = 4;

/// An SDES crypto suite callvault speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Suite {
    AesCm128HmacSha1_80,
    AesCm128HmacSha1_32,
}

impl Suite {
    /// Preference order when several are offered.
    pub const ALL: [Suite; 2] = [Suite::AesCm128HmacSha1_80, Suite::AesCm128HmacSha1_32];

    pub fn name(self) -> &'static str {
        match self {
            Suite::AesCm128HmacSha1_80 => "AES_CM_128_HMAC_SHA1_80",
            Suite::AesCm128HmacSha1_32 => "AES_CM_128_HMAC_SHA1_32",
        }
    }

    pub fn parse(s: &str) -> Option<Suite> {
        Suite::ALL.into_iter().find(|x| x.name() == s)
    }

    /// Bytes of the SRTP authentication tag.
    pub fn rtp_tag_len(self) -> usize {
        match self {
            Suite::AesCm128HmacSha1_80 => 10,
            Suite::AesCm128HmacSha1_32 => 4,
        }
    }
}

/// A master key and salt (the `inline:` key of an `a=crypto` line). Its `Debug` shows no
/// key material, so it can never reach a log by accident.
#[derive(Clone, PartialEq, Eq)]
pub struct MasterKey {
    pub key: [u8; KEY_LEN],
    pub salt: [u8; SALT_LEN],
}

impl std::fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MasterKey(..)")
    }
}

impl MasterKey {
    /// A fresh key and salt from the operating system's CSPRNG.
    pub fn random() -> MasterKey {
        use rand::RngCore;
        let mut m = MasterKey {
            key: [0; KEY_LEN],
            salt: [0; SALT_LEN],
        };
        rand::rngs::OsRng.fill_bytes(&mut m.key);
        rand::rngs::OsRng.fill_bytes(&mut m.salt);
        m
    }

    /// From the base64 of key ‖ salt (30 bytes), as in `inline:KEY|lifetime|MKI` before the
    /// first `|`.
    pub fn from_base64(b64: &str) -> Option<MasterKey> {
        let raw = base64::engine::general_purpose::STANDARD.decode(b64).ok()?;
        if raw.len() != KEY_LEN + SALT_LEN {
            return None;
        }
        let mut m = MasterKey {
            key: [0; KEY_LEN],
            salt: [0; SALT_LEN],
        };
        m.key.copy_from_slice(&raw[..KEY_LEN]);
        m.salt.copy_from_slice(&raw[KEY_LEN..]);
        Some(m)
    }

    /// The base64 of key ‖ salt.
    pub fn to_base64(&self) -> String {
        let mut raw = [0u8; KEY_LEN + SALT_LEN];
        raw[..KEY_LEN].copy_from_slice(&self.key);
        raw[KEY_LEN..].copy_from_slice(&self.salt);
        base64::engine::general_purpose::STANDARD.encode(raw)
    }
}

/// Why a packet was not protected or unprotected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SrtpError {
    #[error("not an RTP/RTCP packet")]
    Malformed,
    #[error("authentication failed")]
    Auth,
    #[error("replayed or too old")]
    Replay,
    #[error("no room for the authentication tag")]
    NoRoom,
}

/// Counts one dropped packet in `callvault_srtp_auth_failures_total` (for media paths that
/// see few such drops; the relay batches its counts instead).
pub fn count_failure(e: SrtpError) {
    match e {
        SrtpError::Replay => crate::metrics::METRICS.srtp_replay_failures_total.inc(),
        _ => crate::metrics::METRICS.srtp_auth_failures_total.inc(),
    }
}

/// The session keys of one of SRTP or SRTCP (§4.3.1).
#[derive(Clone)]
struct SessionKeys {
    aes: Aes128,
    salt: [u8; SALT_LEN],
    mac: HmacSha1,
}

impl SessionKeys {
    /// Derives with labels `base` (cipher key), `base + 1` (auth key), `base + 2` (salt).
    fn derive(master: &MasterKey, base: u8) -> SessionKeys {
        let prf = Aes128::new(&master.key.into());
        let mut key = [0u8; KEY_LEN];
        let mut auth = [0u8; 20];
        let mut salt = [0u8; SALT_LEN];
        kdf(&prf, &master.salt, base, &mut key);
        kdf(&prf, &master.salt, base + 1, &mut auth);
        kdf(&prf, &master.salt, base + 2, &mut salt);
        let mac = <HmacSha1 as KeyInit>::new_from_slice(&auth)
            // HMAC takes keys of any length; 20 bytes cannot fail.
            .unwrap_or_else(|_| <HmacSha1 as KeyInit>::new(&Default::default()));
        SessionKeys {
            aes: Aes128::new(&key.into()),
            salt,
            mac,
        }
    }

    /// XORs the keystream for (`ssrc`, `index`) into `data` (§4.1.1).
    #[inline]
    fn crypt(&self, ssrc: u32, index: u64, data: &mut [u8]) {
        let mut iv = [0u8; 16];
        iv[..SALT_LEN].copy_from_slice(&self.salt);
        for (b, s) in iv[4..8].iter_mut().zip(ssrc.to_be_bytes()) {
            *b ^= s;
        }
        for (b, s) in iv[8..14].iter_mut().zip(&index.to_be_bytes()[2..]) {
            *b ^= s;
        }
        let core = ctr::CtrCore::inner_iv_init(self.aes.clone(), &iv.into());
        let mut ctr = AesCtr::from_core(core);
        ctr.apply_keystream(data);
    }

    /// HMAC-SHA1 of `data` ‖ `tail` (the ROC, or nothing for RTCP).
    #[inline]
    fn tag(&self, data: &[u8], tail: &[u8]) -> [u8; 20] {
        let mut mac = self.mac.clone();
        mac.update(data);
        mac.update(tail);
        mac.finalize().into_bytes().into()
    }
}

/// The AES-CM PRF of §4.3.3 with key derivation rate 0: `out` = the keystream of the master
/// key at IV = (master salt ⊕ label·2^48)·2^16.
fn kdf(prf: &Aes128, master_salt: &[u8; SALT_LEN], label: u8, out: &mut [u8]) {
    let mut iv = [0u8; 16];
    iv[..SALT_LEN].copy_from_slice(master_salt);
    iv[7] ^= label;
    for (n, chunk) in out.chunks_mut(16).enumerate() {
        let mut block = iv;
        // The counter occupies the low 16 bits; key material needs at most two blocks.
        block[14..16].copy_from_slice(&(n as u16).to_be_bytes());
        let mut b = block.into();
        prf.encrypt_block(&mut b);
        chunk.copy_from_slice(&b[..chunk.len()]);
    }
}

/// The sliding replay window of §3.3.2: the highest index seen and a bitmask of the 64
/// before it.
#[derive(Debug, Clone, Copy, Default)]
struct ReplayWindow {
    top: u64,
    bits: u64,
}

impl ReplayWindow {
    #[inline]
    fn fresh(&self, index: u64) -> bool {
        if index > self.top {
            return true;
        }
        let behind = self.top - index;
        behind < REPLAY_WINDOW && self.bits & (1 << behind) == 0
    }

    #[inline]
    fn mark(&mut self, index: u64) {
        if index > self.top {
            let shift = index - self.top;
            self.bits = if shift >= 64 { 0 } else { self.bits << shift };
            self.bits |= 1;
            self.top = index;
        } else {
            self.bits |= 1 << (self.top - index);
        }
    }
}

/// What a context knows about one SSRC.
#[derive(Debug, Clone, Copy, Default)]
struct Stream {
    ssrc: u32,
    used: bool,
    /// Rollover counter and the highest sequence number seen (s_l).
    roc: u32,
    s_l: u16,
    rtp: ReplayWindow,
    rtcp: ReplayWindow,
    /// Next SRTCP index to send.
    rtcp_out: u32,
}

impl Stream {
    fn start(ssrc: u32, seq: u16) -> Stream {
        Stream {
            ssrc,
            used: true,
            s_l: seq,
            // The first packet's index is `seq`: everything before it is "old", nothing new.
            rtp: ReplayWindow {
                top: u64::from(seq),
                bits: 0,
            },
            ..Stream::default()
        }
    }

    /// The packet index of `seq` (Appendix A), or None for an index below zero.
    #[inline]
    fn index(&self, seq: u16) -> Option<(u32, u64)> {
        let roc = i64::from(self.roc);
        let (s_l, seq_i) = (i64::from(self.s_l), i64::from(seq));
        let v = if s_l < 32768 {
            if seq_i - s_l > 32768 {
                roc - 1
            } else {
                roc
            }
        } else if s_l - 32768 > seq_i {
            roc + 1
        } else {
            roc
        };
        let v = u32::try_from(v).ok()?;
        Some((v, (u64::from(v) << 16) | u64::from(seq)))
    }

    /// Accepts `index` (with rollover `v`): moves s_l/ROC forward when it is the newest.
    #[inline]
    fn advance(&mut self, v: u32, index: u64) {
        if index > self.rtp.top || !self.rtp_seen() {
            self.roc = v;
            self.s_l = (index & 0xffff) as u16;
        }
        self.rtp.mark(index);
    }

    fn rtp_seen(&self) -> bool {
        self.rtp.bits != 0
    }
}

/// SRTP + SRTCP state of one direction of one leg (see the module doc).
#[derive(Clone)]
pub struct SrtpContext {
    suite: Suite,
    rtp: SessionKeys,
    rtcp: SessionKeys,
    streams: [Stream; MAX_STREAMS],
    /// Slot a new SSRC takes when all are used.
    next_slot: usize,
}

impl std::fmt::Debug for SrtpContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SrtpContext")
            .field("suite", &self.suite)
            .finish_non_exhaustive()
    }
}

/// Length of the RTP header (fixed part, CSRCs, extension), or None if `pkt` is not RTP v2.
#[inline]
fn rtp_header_len(pkt: &[u8]) -> Option<usize> {
    if pkt.len() < 12 || pkt[0] >> 6 != 2 {
        return None;
    }
    let mut len = 12 + 4 * usize::from(pkt[0] & 0x0f);
    if pkt[0] & 0x10 != 0 {
        let ext = pkt.get(len + 2..len + 4)?;
        len += 4 + 4 * usize::from(u16::from_be_bytes([ext[0], ext[1]]));
    }
    (len <= pkt.len()).then_some(len)
}

impl SrtpContext {
    pub fn new(suite: Suite, master: &MasterKey) -> SrtpContext {
        SrtpContext {
            suite,
            rtp: SessionKeys::derive(master, 0),
            rtcp: SessionKeys::derive(master, 3),
            streams: [Stream::default(); MAX_STREAMS],
            next_slot: 0,
        }
    }

    pub fn suite(&self) -> Suite {
        self.suite
    }

    /// The slot of `ssrc`, started at `seq` when new.
    #[inline]
    fn stream(&mut self, ssrc: u32, seq: u16) -> &mut Stream {
        let i = match self.streams.iter().position(|s| s.used && s.ssrc == ssrc) {
            Some(i) => i,
            None => {
                let i = self
                    .streams
                    .iter()
                    .position(|s| !s.used)
                    .unwrap_or(self.next_slot);
                self.next_slot = (i + 1) % MAX_STREAMS;
                self.streams[i] = Stream::start(ssrc, seq);
                i
            }
        };
        &mut self.streams[i]
    }

    /// Encrypts and authenticates the RTP packet in `buf[..len]`; returns the SRTP length
    /// (`len` + tag). `buf` must have room for the tag.
    pub fn protect_rtp(&mut self, buf: &mut [u8], len: usize) -> Result<usize, SrtpError> {
        let tag_len = self.suite.rtp_tag_len();
        let pkt = buf.get(..len).ok_or(SrtpError::Malformed)?;
        let hdr = rtp_header_len(pkt).ok_or(SrtpError::Malformed)?;
        if buf.len() < len + tag_len {
            return Err(SrtpError::NoRoom);
        }
        let seq = u16::from_be_bytes([buf[2], buf[3]]);
        let ssrc = u32::from_be_bytes([buf[8], buf[9], buf[10], buf[11]]);
        let stream = self.stream(ssrc, seq);
        let (v, index) = stream.index(seq).ok_or(SrtpError::Replay)?;
        stream.advance(v, index);
        self.rtp.crypt(ssrc, index, &mut buf[hdr..len]);
        let tag = self.rtp.tag(&buf[..len], &v.to_be_bytes());
        buf[len..len + tag_len].copy_from_slice(&tag[..tag_len]);
        Ok(len + tag_len)
    }

    /// Authenticates, checks for replay and decrypts the SRTP packet in `buf` in place;
    /// returns the RTP length (without the tag).
    pub fn unprotect_rtp(&mut self, buf: &mut [u8]) -> Result<usize, SrtpError> {
        let tag_len = self.suite.rtp_tag_len();
        let len = buf.len().checked_sub(tag_len).ok_or(SrtpError::Malformed)?;
        let hdr = rtp_header_len(&buf[..len]).ok_or(SrtpError::Malformed)?;
        let seq = u16::from_be_bytes([buf[2], buf[3]]);
        let ssrc = u32::from_be_bytes([buf[8], buf[9], buf[10], buf[11]]);
        // Look up without starting a slot: a forged packet must not evict a real stream.
        let known = self.streams.iter().position(|s| s.used && s.ssrc == ssrc);
        let probe = match known {
            Some(i) => self.streams[i],
            None => Stream::start(ssrc, seq),
        };
        let (v, index) = probe.index(seq).ok_or(SrtpError::Replay)?;
        if known.is_some() && !probe.rtp.fresh(index) {
            return Err(SrtpError::Replay);
        }
        let tag = self.rtp.tag(&buf[..len], &v.to_be_bytes());
        if !bool::from(tag[..tag_len].ct_eq(&buf[len..])) {
            return Err(SrtpError::Auth);
        }
        self.stream(ssrc, seq).advance(v, index);
        self.rtp.crypt(ssrc, index, &mut buf[hdr..len]);
        Ok(len)
    }

    /// Encrypts and authenticates the RTCP packet in `buf[..len]` (§3.4); returns the SRTCP
    /// length (`len` + 4 + 10).
    pub fn protect_rtcp(&mut self, buf: &mut [u8], len: usize) -> Result<usize, SrtpError> {
        if len < 8 || len > buf.len() {
            return Err(SrtpError::Malformed);
        }
        let total = len + RTCP_TRAILER_LEN + RTCP_TAG_LEN;
        if buf.len() < total {
            return Err(SrtpError::NoRoom);
        }
        let ssrc = u32::from_be_bytes([buf[4], buf[5], buf[6], buf[7]]);
        let stream = self.stream(ssrc, 0);
        let index = stream.rtcp_out & 0x7fff_ffff;
        stream.rtcp_out = (index + 1) & 0x7fff_ffff;
        self.rtcp.crypt(ssrc, u64::from(index), &mut buf[8..len]);
        // E flag set: the packet is encrypted.
        buf[len..len + RTCP_TRAILER_LEN].copy_from_slice(&(index | 0x8000_0000).to_be_bytes());
        let signed = len + RTCP_TRAILER_LEN;
        let tag = self.rtcp.tag(&buf[..signed], &[]);
        buf[signed..total].copy_from_slice(&tag[..RTCP_TAG_LEN]);
        Ok(total)
    }

    /// Authenticates, checks for replay and decrypts the SRTCP packet in `buf`; returns the
    /// RTCP length.
    pub fn unprotect_rtcp(&mut self, buf: &mut [u8]) -> Result<usize, SrtpError> {
        let signed = buf
            .len()
            .checked_sub(RTCP_TAG_LEN)
            .ok_or(SrtpError::Malformed)?;
        let len = signed
            .checked_sub(RTCP_TRAILER_LEN)
            .filter(|l| *l >= 8)
            .ok_or(SrtpError::Malformed)?;
        let word = u32::from_be_bytes([buf[len], buf[len + 1], buf[len + 2], buf[len + 3]]);
        let (encrypted, index) = (word & 0x8000_0000 != 0, u64::from(word & 0x7fff_ffff));
        let ssrc = u32::from_be_bytes([buf[4], buf[5], buf[6], buf[7]]);
        let known = self.streams.iter().position(|s| s.used && s.ssrc == ssrc);
        if let Some(i) = known {
            let w = self.streams[i].rtcp;
            if w.bits != 0 && !w.fresh(index) {
                return Err(SrtpError::Replay);
            }
        }
        let tag = self.rtcp.tag(&buf[..signed], &[]);
        if !bool::from(tag[..RTCP_TAG_LEN].ct_eq(&buf[signed..])) {
            return Err(SrtpError::Auth);
        }
        self.stream(ssrc, 0).rtcp.mark(index);
        if encrypted {
            self.rtcp.crypt(ssrc, index, &mut buf[8..len]);
        }
        Ok(len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(s: &str) -> Vec<u8> {
        hex::decode(s.replace([' ', '\n'], "")).unwrap()
    }

    /// RFC 3711 Appendix B.2: the AES-CM keystream for a session key and salt at SSRC 0,
    /// index 0 (the salt given there already shifted: F0F1...FD, then the counter).
    #[test]
    fn rfc3711_b2_aes_cm_keystream() {
        let keys = SessionKeys {
            aes: Aes128::new(
                &<[u8; 16]>::try_from(hex("2B7E151628AED2A6ABF7158809CF4F3C"))
                    .unwrap()
                    .into(),
            ),
            salt: hex("F0F1F2F3F4F5F6F7F8F9FAFBFCFD").try_into().unwrap(),
            mac: <HmacSha1 as KeyInit>::new_from_slice(&[0u8; 20]).unwrap(),
        };
        let mut ks = [0u8; 48];
        keys.crypt(0, 0, &mut ks);
        assert_eq!(
            ks.to_vec(),
            hex("E03EAD0935C95E80E166B16DD92B4EB4
                 D23513162B02D0F72A43A2FE4A5F97AB
                 41E95B3BB0A2E8DD477901E4FCA894C0")
        );
        // Block 0xFEFF of the same stream (RFC 3711 B.2's later rows).
        let mut long = vec![0u8; 16 * 0xff02];
        keys.crypt(0, 0, &mut long);
        assert_eq!(
            long[16 * 0xfeff..16 * 0xff00].to_vec(),
            hex("EC8CDF7398607CB0F2D21675EA9EA1E4")
        );
        assert_eq!(
            long[16 * 0xff00..16 * 0xff01].to_vec(),
            hex("362B7C3C6773516318A077D7FC5073AE")
        );
        assert_eq!(
            long[16 * 0xff01..16 * 0xff02].to_vec(),
            hex("6A2CC3787889374FBEB4C81B17BA6C44")
        );
    }

    /// RFC 3711 Appendix B.3: key derivation (labels 0, 1, 2 at index 0).
    #[test]
    fn rfc3711_b3_key_derivation() {
        let master = MasterKey {
            key: hex("E1F97A0D3E018BE0D64FA32C06DE4139").try_into().unwrap(),
            salt: hex("0EC675AD498AFEEBB6960B3AABE6").try_into().unwrap(),
        };
        let prf = Aes128::new(&master.key.into());
        let mut key = [0u8; 16];
        kdf(&prf, &master.salt, 0, &mut key);
        assert_eq!(key.to_vec(), hex("C61E7A93744F39EE10734AFE3FF7A087"));
        let mut salt = [0u8; 14];
        kdf(&prf, &master.salt, 2, &mut salt);
        assert_eq!(salt.to_vec(), hex("30CBBC08863D8C85D49DB34A9AE1"));
        let mut auth = [0u8; 94];
        kdf(&prf, &master.salt, 1, &mut auth);
        assert_eq!(
            auth.to_vec(),
            hex("CEBE321F6FF7716B6FD4AB49AF256A15
                 6D38BAA48F0A0ACF3C34E2359E6CDBCE
                 E049646C43D9327AD175578EF7227098
                 6371C10C9A369AC2F94A8C5FBCDDDC25
                 6D6E919A48B610EF17C2041E47403576
                 6B68642C59BBFC2F34DB60DBDFB2")
        );
    }

    fn rtp(seq: u16, ssrc: u32, payload: &[u8]) -> Vec<u8> {
        let mut p = vec![0x80, 0, 0, 0, 0, 0, 0, 160, 0, 0, 0, 0];
        p[2..4].copy_from_slice(&seq.to_be_bytes());
        p[8..12].copy_from_slice(&ssrc.to_be_bytes());
        p.extend_from_slice(payload);
        p
    }

    fn pair(suite: Suite) -> (SrtpContext, SrtpContext) {
        let m = MasterKey::random();
        (SrtpContext::new(suite, &m), SrtpContext::new(suite, &m))
    }

    #[test]
    fn round_trip_both_suites_and_tag_lengths() {
        for suite in Suite::ALL {
            let (mut tx, mut rx) = pair(suite);
            let plain = rtp(7, 0x1234, b"hello srtp payload");
            let mut buf = [0u8; 256];
            buf[..plain.len()].copy_from_slice(&plain);
            let n = tx.protect_rtp(&mut buf, plain.len()).unwrap();
            assert_eq!(n, plain.len() + suite.rtp_tag_len());
            assert_ne!(&buf[12..plain.len()], &plain[12..], "payload is encrypted");
            assert_eq!(&buf[..12], &plain[..12], "header is not");
            let m = rx.unprotect_rtp(&mut buf[..n]).unwrap();
            assert_eq!(&buf[..m], &plain[..]);
        }
    }

    #[test]
    fn forged_and_replayed_packets_are_refused() {
        let (mut tx, mut rx) = pair(Suite::AesCm128HmacSha1_80);
        let mut sent = Vec::new();
        for seq in 100..110u16 {
            let p = rtp(seq, 9, &[seq as u8; 20]);
            let mut buf = [0u8; 256];
            buf[..p.len()].copy_from_slice(&p);
            let n = tx.protect_rtp(&mut buf, p.len()).unwrap();
            sent.push(buf[..n].to_vec());
        }
        // A flipped bit anywhere fails authentication.
        let mut forged = sent[0].clone();
        forged[15] ^= 1;
        assert_eq!(rx.unprotect_rtp(&mut forged), Err(SrtpError::Auth));
        // A forged packet of an unknown SSRC is refused too.
        let mut stranger = rtp(5, 77, &[0; 30]);
        assert_eq!(rx.unprotect_rtp(&mut stranger), Err(SrtpError::Auth));
        for p in &sent[..5] {
            rx.unprotect_rtp(&mut p.clone()).unwrap();
        }
        // Replays, also of an older packet inside the window.
        assert_eq!(
            rx.unprotect_rtp(&mut sent[4].clone()),
            Err(SrtpError::Replay)
        );
        assert_eq!(
            rx.unprotect_rtp(&mut sent[1].clone()),
            Err(SrtpError::Replay)
        );
        // Reordered but new: accepted once.
        rx.unprotect_rtp(&mut sent[7].clone()).unwrap();
        rx.unprotect_rtp(&mut sent[6].clone()).unwrap();
        assert_eq!(
            rx.unprotect_rtp(&mut sent[6].clone()),
            Err(SrtpError::Replay)
        );
        // The wrong key cannot produce an accepted packet.
        let mut other = SrtpContext::new(Suite::AesCm128HmacSha1_80, &MasterKey::random());
        assert_eq!(
            other.unprotect_rtp(&mut sent[9].clone()),
            Err(SrtpError::Auth)
        );
    }

    #[test]
    fn rollover_counter_follows_the_sequence_wrap() {
        let (mut tx, mut rx) = pair(Suite::AesCm128HmacSha1_32);
        let mut seq = 65530u16;
        for _ in 0..20 {
            let p = rtp(seq, 1, b"roc test");
            let mut buf = [0u8; 64];
            buf[..p.len()].copy_from_slice(&p);
            let n = tx.protect_rtp(&mut buf, p.len()).unwrap();
            let m = rx.unprotect_rtp(&mut buf[..n]).unwrap();
            assert_eq!(&buf[..m], &p[..], "seq {seq}");
            seq = seq.wrapping_add(1);
        }
        assert_eq!(tx.streams[0].roc, 1);
        assert_eq!(rx.streams[0].roc, 1);
    }

    #[test]
    fn packets_older_than_the_window_are_replays() {
        let (mut tx, mut rx) = pair(Suite::AesCm128HmacSha1_80);
        let mut first = Vec::new();
        for seq in 0..(REPLAY_WINDOW as u16 + 10) {
            let p = rtp(seq, 3, b"window");
            let mut buf = [0u8; 64];
            buf[..p.len()].copy_from_slice(&p);
            let n = tx.protect_rtp(&mut buf, p.len()).unwrap();
            if seq == 0 {
                first = buf[..n].to_vec();
            } else {
                rx.unprotect_rtp(&mut buf[..n]).unwrap();
            }
        }
        // Never received, but now more than 64 behind: refused as a replay.
        assert_eq!(rx.unprotect_rtp(&mut first), Err(SrtpError::Replay));
    }

    #[test]
    fn rtcp_round_trip_replay_and_forgery() {
        let (mut tx, mut rx) = pair(Suite::AesCm128HmacSha1_32);
        // A receiver report: V=2, RC=0, PT=201, length 1, SSRC.
        let rr = [0x80u8, 201, 0, 1, 0, 0, 0, 42];
        let mut buf = [0u8; 64];
        buf[..8].copy_from_slice(&rr);
        buf[8..12].copy_from_slice(b"abcd");
        let n = tx.protect_rtcp(&mut buf, 12).unwrap();
        assert_eq!(n, 12 + 4 + 10, "SRTCP tag is 80 bits for both suites");
        let copy = buf[..n].to_vec();
        let m = rx.unprotect_rtcp(&mut buf[..n]).unwrap();
        assert_eq!(&buf[..m], &[&rr[..], b"abcd"].concat()[..]);
        assert_eq!(rx.unprotect_rtcp(&mut copy.clone()), Err(SrtpError::Replay));
        // The next packet, one bit changed: fails authentication.
        buf[..8].copy_from_slice(&rr);
        let n = tx.protect_rtcp(&mut buf, 12).unwrap();
        buf[9] ^= 0x40;
        assert_eq!(rx.unprotect_rtcp(&mut buf[..n]), Err(SrtpError::Auth));
    }

    #[test]
    fn garbage_never_panics() {
        let (_, mut rx) = pair(Suite::AesCm128HmacSha1_80);
        for len in 0..40 {
            let mut b = vec![0x80u8; len];
            let _ = rx.unprotect_rtp(&mut b);
            let _ = rx.unprotect_rtcp(&mut b);
            let mut big = [0x9fu8; 64];
            let _ = rx.protect_rtp(&mut big, len);
            let _ = rx.protect_rtcp(&mut big, len);
        }
    }

    #[test]
    fn master_key_base64_and_debug() {
        let m = MasterKey::random();
        let b = m.to_base64();
        assert_eq!(b.len(), 40);
        assert_eq!(MasterKey::from_base64(&b), Some(m.clone()));
        assert_eq!(MasterKey::from_base64("c2hvcnQ="), None);
        assert_eq!(format!("{m:?}"), "MasterKey(..)");
        assert_ne!(MasterKey::random(), m, "fresh keys differ");
    }
}
