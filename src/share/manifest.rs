//! Manifests (PROTOCOL 5, Shares): `{"name","size","piece_size","pieces":[hex SHA-256...]}`,
//! serialized once; `content_id` is the lowercase hex SHA-256 of exactly those bytes, so the
//! bytes are kept and served as they were built, never re-serialized.
//!
//! [`PieceHasher`] cuts a byte stream into pieces as it arrives and hashes each one on the
//! fly; it never holds more than the bytes of the piece being hashed (and not even those: the
//! SHA-256 state is incremental).

use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    #[error("share name must be 1 to 255 bytes")]
    Length,
    #[error("share name must not contain '/', '\\', NUL or control characters")]
    BadChar,
    #[error("share name must not be '.', '..' or start with a dot")]
    Dot,
}

/// Names become file names on peers and appear in URLs, SIP bodies and headers: no path
/// separators, no dot names (hidden files, traversal), no control characters.
pub fn validate_name(name: &str) -> Result<(), NameError> {
    if name.is_empty() || name.len() > 255 {
        return Err(NameError::Length);
    }
    if name.starts_with('.') {
        return Err(NameError::Dot);
    }
    if name
        .chars()
        .any(|c| c == '/' || c == '\\' || c.is_control())
    {
        return Err(NameError::BadChar);
    }
    Ok(())
}

/// The manifest of one shared file. Field order is the wire order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub name: String,
    pub size: u64,
    pub piece_size: u64,
    /// Lowercase hex SHA-256 of each piece, in order.
    pub pieces: Vec<String>,
}

impl Manifest {
    /// The bytes to store and serve (compact JSON, fields in wire order).
    pub fn to_bytes(&self) -> Vec<u8> {
        // Strings and integers only: serialization cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// Parses manifest bytes (e.g. fetched by a peer) and checks they are consistent.
    pub fn parse(bytes: &[u8]) -> Option<Manifest> {
        let m: Manifest = serde_json::from_slice(bytes).ok()?;
        let ok = m.piece_size > 0
            && m.pieces.len() as u64 == piece_count(m.size, m.piece_size)
            && m.pieces.iter().all(|p| is_sha256_hex(p));
        ok.then_some(m)
    }

    /// Byte range `(offset, len)` of piece `n`, None beyond the last piece.
    pub fn piece_range(&self, n: u64) -> Option<(u64, u64)> {
        piece_range(self.size, self.piece_size, n)
    }
}

/// What stays unencoded in a URL path segment: RFC 3986 unreserved characters.
pub const UNRESERVED: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// What stays unencoded in an RFC 8187 `value-chars` (`filename*`): attr-char.
pub const ATTR_CHAR: &AsciiSet = &UNRESERVED
    .remove(b'!')
    .remove(b'#')
    .remove(b'$')
    .remove(b'&')
    .remove(b'+')
    .remove(b'^')
    .remove(b'`')
    .remove(b'|');

/// Percent-encodes `s` for a URL or header: ASCII alphanumerics and what `keep` spares
/// stay, every other byte is `%XX` (share names travel in paths and `filename*`).
pub fn percent_encode(s: &str, keep: &'static AsciiSet) -> String {
    utf8_percent_encode(s, keep).to_string()
}

/// Lowercase hex SHA-256 of `bytes`: the content id of manifest bytes.
pub fn content_id_of(manifest_bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(manifest_bytes))
}

/// 64 lowercase hex digits (content ids and piece hashes; checked before use as a path).
pub fn is_sha256_hex(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// Number of pieces of a file: the last one may be short; an empty file has none.
pub fn piece_count(size: u64, piece_size: u64) -> u64 {
    if piece_size == 0 {
        return 0;
    }
    size.div_ceil(piece_size)
}

/// `(offset, len)` of piece `n` of a file of `size` bytes.
pub fn piece_range(size: u64, piece_size: u64, n: u64) -> Option<(u64, u64)> {
    if n >= piece_count(size, piece_size) {
        return None;
    }
    let offset = n * piece_size;
    Some((offset, piece_size.min(size - offset)))
}

/// Incremental piece hashing: feed bytes in any chunking, get the same piece hashes.
#[derive(Debug, Clone)]
pub struct PieceHasher {
    piece_size: u64,
    current: Sha256,
    in_piece: u64,
    total: u64,
    pieces: Vec<String>,
}

impl PieceHasher {
    /// `piece_size` must be > 0 (the config refuses 0); 0 is treated as 1 to stay total.
    pub fn new(piece_size: u64) -> PieceHasher {
        PieceHasher {
            piece_size: piece_size.max(1),
            current: Sha256::new(),
            in_piece: 0,
            total: 0,
            pieces: Vec::new(),
        }
    }

    pub fn update(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            let room = self.piece_size - self.in_piece;
            let take = usize::try_from(room).unwrap_or(usize::MAX).min(data.len());
            self.current.update(&data[..take]);
            self.in_piece += take as u64;
            self.total += take as u64;
            data = &data[take..];
            if self.in_piece == self.piece_size {
                let h = std::mem::take(&mut self.current).finalize();
                self.pieces.push(hex::encode(h));
                self.in_piece = 0;
            }
        }
    }

    /// Bytes fed so far.
    pub fn total(&self) -> u64 {
        self.total
    }

    /// Closes the last (short) piece and builds the manifest.
    pub fn finish(mut self, name: &str) -> Manifest {
        if self.in_piece > 0 {
            self.pieces.push(hex::encode(self.current.finalize()));
        }
        Manifest {
            name: name.to_string(),
            size: self.total,
            piece_size: self.piece_size,
            pieces: self.pieces,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percent_encode_keeps_only_alphanumerics_and_keep() {
        assert_eq!(percent_encode("a b/c~d", UNRESERVED), "a%20b%2Fc~d");
        assert_eq!(percent_encode("a b/c~d", NON_ALPHANUMERIC), "a%20b%2Fc%7Ed");
        assert_eq!(percent_encode("é", UNRESERVED), "%C3%A9");
        assert_eq!(percent_encode("", UNRESERVED), "");
        assert_eq!(percent_encode("a!b c|d", ATTR_CHAR), "a!b%20c|d");
        assert_eq!(percent_encode("a!b", UNRESERVED), "a%21b");
    }

    #[test]
    fn names() {
        assert!(validate_name("holiday.mp4").is_ok());
        assert!(validate_name("a b (1).txt").is_ok());
        assert!(validate_name("ünïcødé").is_ok());
        assert!(validate_name(&"x".repeat(255)).is_ok());
        assert_eq!(validate_name(""), Err(NameError::Length));
        assert_eq!(validate_name(&"x".repeat(256)), Err(NameError::Length));
        // 128 two-byte characters = 256 bytes: the limit is in bytes.
        assert_eq!(validate_name(&"é".repeat(128)), Err(NameError::Length));
        assert_eq!(validate_name("."), Err(NameError::Dot));
        assert_eq!(validate_name(".."), Err(NameError::Dot));
        assert_eq!(validate_name(".hidden"), Err(NameError::Dot));
        assert_eq!(validate_name("a/b"), Err(NameError::BadChar));
        assert_eq!(validate_name("..\\x"), Err(NameError::Dot));
        assert_eq!(validate_name("a\\b"), Err(NameError::BadChar));
        assert_eq!(validate_name("a\0b"), Err(NameError::BadChar));
        assert_eq!(validate_name("a\nb"), Err(NameError::BadChar));
    }

    #[test]
    fn manifest_bytes_and_content_id() {
        let m = Manifest {
            name: "a\"b.txt".into(),
            size: 5,
            piece_size: 4,
            pieces: vec!["00".repeat(32), "ff".repeat(32)],
        };
        let b = m.to_bytes();
        let text = String::from_utf8(b.clone()).unwrap();
        assert_eq!(
            text,
            format!(
                "{{\"name\":\"a\\\"b.txt\",\"size\":5,\"piece_size\":4,\"pieces\":[\"{}\",\"{}\"]}}",
                "00".repeat(32),
                "ff".repeat(32)
            )
        );
        let id = content_id_of(&b);
        assert!(is_sha256_hex(&id));
        assert_eq!(id, hex::encode(Sha256::digest(text.as_bytes())));
        assert_eq!(Manifest::parse(&b), Some(m));
        // Piece count must match the size.
        assert_eq!(
            Manifest::parse(br#"{"name":"x","size":9,"piece_size":4,"pieces":[]}"#),
            None
        );
        assert!(!is_sha256_hex(&"AB".repeat(32)));
        assert!(!is_sha256_hex("../etc"));
    }

    #[test]
    fn pieces_do_not_depend_on_chunking() {
        let data: Vec<u8> = (0..10_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let mut whole = PieceHasher::new(1000);
        whole.update(&data);
        let a = whole.finish("f");
        let mut bits = PieceHasher::new(1000);
        for c in data.chunks(333) {
            bits.update(c);
        }
        let b = bits.finish("f");
        assert_eq!(a, b);
        assert_eq!(a.pieces.len(), 10);
        assert_eq!(a.pieces[3], hex::encode(Sha256::digest(&data[3000..4000])));

        let mut short = PieceHasher::new(1000);
        short.update(&data[..2500]);
        let m = short.finish("g");
        assert_eq!(m.size, 2500);
        assert_eq!(m.pieces.len(), 3);
        assert_eq!(m.pieces[2], hex::encode(Sha256::digest(&data[2000..2500])));
        assert_eq!(m.piece_range(2), Some((2000, 500)));
        assert_eq!(m.piece_range(3), None);

        let empty = PieceHasher::new(1000).finish("e");
        assert_eq!((empty.size, empty.pieces.len()), (0, 0));
        assert_eq!(piece_count(0, 10), 0);
        assert_eq!(piece_count(10, 10), 1);
        assert_eq!(piece_count(11, 10), 2);
    }
}
