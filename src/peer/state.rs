//! Resume state and progress display.
//!
//! State: `<DIR>/<content_id>.json` = `{"content_id","pieces","have"}` (`have` in the index's
//! base64 bitfield form), rewritten atomically (temp file + rename) after each verified
//! piece. On resume the pieces it names are hashed again from the output file: the state says
//! what was verified, the file may have changed since.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::PeerError;
use crate::share::index::Bitfield;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct StateFile {
    content_id: String,
    pieces: usize,
    have: String,
}

/// Where one content's resume state lives.
#[derive(Debug, Clone)]
pub(crate) struct ResumeState {
    path: PathBuf,
    content_id: String,
}

impl ResumeState {
    pub(crate) fn new(dir: &Path, content_id: &str) -> ResumeState {
        ResumeState {
            path: dir.join(format!("{content_id}.json")),
            content_id: content_id.to_string(),
        }
    }

    #[cfg(test)]
    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// The saved bitfield; None when there is no state, or it is for other content or
    /// unreadable (a fresh start is always safe).
    pub(crate) fn load(&self, pieces: usize) -> Option<Bitfield> {
        let bytes = std::fs::read(&self.path).ok()?;
        let st: StateFile = serde_json::from_slice(&bytes).ok()?;
        if st.content_id != self.content_id || st.pieces != pieces {
            return None;
        }
        Bitfield::from_base64(&st.have, pieces).ok()
    }

    /// Saves `have` atomically (a crash leaves the old state or the new one, never half).
    pub(crate) fn save(&self, have: &Bitfield) -> Result<(), PeerError> {
        if let Some(dir) = self.path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let st = StateFile {
            content_id: self.content_id.clone(),
            pieces: have.len(),
            have: have.to_base64(),
        };
        let tmp = self.path.with_extension("json.tmp");
        {
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(&serde_json::to_vec(&st).map_err(|e| PeerError::Http(e.to_string()))?)?;
            f.sync_data()?;
        }
        std::fs::rename(&tmp, &self.path)?;
        Ok(())
    }
}

/// Progress figures and their one-line rendering.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Progress {
    pub pieces_done: usize,
    pub pieces: usize,
    pub bytes_done: u64,
    pub bytes: u64,
    pub from_server: u64,
    pub from_peers: u64,
    pub elapsed: Duration,
}

impl Progress {
    pub(crate) fn fraction(&self) -> f64 {
        if self.bytes == 0 {
            1.0
        } else {
            self.bytes_done as f64 / self.bytes as f64
        }
    }

    /// `[#####.....]  50.0% 3/6 pieces 1.5/3.0 MiB 1.2 MiB/s (server 1.0 MiB, peers 0.5 MiB)`.
    pub(crate) fn bar(&self, width: usize) -> String {
        let filled = ((self.fraction() * width as f64).round() as usize).min(width);
        format!(
            "[{}{}] {}",
            "#".repeat(filled),
            ".".repeat(width - filled),
            self.line()
        )
    }

    /// The bar's text without the bar (for plain, non-terminal output).
    pub(crate) fn line(&self) -> String {
        let secs = self.elapsed.as_secs_f64();
        let rate = if secs > 0.0 {
            self.bytes_done as f64 / secs
        } else {
            0.0
        };
        format!(
            "{:5.1}% {}/{} pieces {}/{} {}/s (server {}, peers {})",
            self.fraction() * 100.0,
            self.pieces_done,
            self.pieces,
            mib(self.bytes_done),
            mib(self.bytes),
            mib(rate as u64),
            mib(self.from_server),
            mib(self.from_peers),
        )
    }
}

fn mib(b: u64) -> String {
    format!("{:.1} MiB", b as f64 / (1024.0 * 1024.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn save_load_roundtrip_and_mismatches() {
        let dir = tempfile::tempdir().unwrap();
        let cid = "a".repeat(64);
        let st = ResumeState::new(&dir.path().join("sub"), &cid);
        assert_eq!(st.load(10), None, "no state yet");
        let mut have = Bitfield::empty(10);
        have.set(0, true);
        have.set(9, true);
        st.save(&have).unwrap();
        assert_eq!(st.load(10), Some(have.clone()));
        // Other piece count or other content: ignored.
        assert_eq!(st.load(11), None);
        let other = ResumeState::new(&dir.path().join("sub"), &"b".repeat(64));
        std::fs::copy(st.path(), other.path()).unwrap();
        assert_eq!(other.load(10), None);
        // Overwrite keeps the newest.
        have.set(5, true);
        st.save(&have).unwrap();
        assert_eq!(st.load(10).unwrap().count(), 3);
        // Garbage: ignored, not an error.
        std::fs::write(st.path(), b"{not json").unwrap();
        assert_eq!(st.load(10), None);
    }

    #[test]
    fn progress_rendering() {
        let p = Progress {
            pieces_done: 3,
            pieces: 6,
            bytes_done: 3 * 1024 * 1024,
            bytes: 6 * 1024 * 1024,
            from_server: 1024 * 1024,
            from_peers: 2 * 1024 * 1024,
            elapsed: Duration::from_secs(2),
        };
        assert!((p.fraction() - 0.5).abs() < 1e-12);
        assert_eq!(
            p.line(),
            " 50.0% 3/6 pieces 3.0 MiB/6.0 MiB 1.5 MiB/s (server 1.0 MiB, peers 2.0 MiB)"
        );
        assert!(p.bar(10).starts_with("[#####.....]  50.0%"));
        let empty = Progress {
            bytes: 0,
            bytes_done: 0,
            elapsed: Duration::ZERO,
            ..p
        };
        assert_eq!(empty.fraction(), 1.0);
        assert!(empty.bar(4).starts_with("[####]"));
    }
}
