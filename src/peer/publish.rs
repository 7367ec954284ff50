//! `callvault peer share`: publishes the new files of a folder (PROTOCOL 3 step 1) with
//! `PUT /v1/shares/{user}/{name}` (Basic auth), once or, with `--watch`, on every scan.
//!
//! "New" is decided against the server's own list (`GET /v1/shares/{user}`): a file whose
//! name is not shared yet, or whose size differs, is uploaded; in watch mode a file whose
//! modification time changed since the last scan is uploaded again. Hidden files, non-files
//! and names the server would refuse are skipped.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use serde::Deserialize;

use super::http::{basic_auth, join, parse_url, Client, Request};
use super::{PeerError, ShareArgs};
use crate::share::manifest::{percent_encode, validate_name};

#[derive(Debug, Clone, Deserialize)]
struct Listed {
    name: String,
    size: u64,
}

/// A file of the folder that is a candidate for sharing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Candidate {
    pub name: String,
    pub path: PathBuf,
    pub size: u64,
    pub modified: Option<SystemTime>,
}

/// Regular, non-hidden files with valid share names, sorted by name.
pub(crate) fn scan(folder: &Path) -> Result<Vec<Candidate>, PeerError> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(folder)? {
        let entry = entry?;
        let Ok(name) = entry.file_name().into_string() else {
            continue;
        };
        if validate_name(&name).is_err() {
            continue;
        }
        let Ok(meta) = entry.metadata() else {
            continue;
        };
        if !meta.is_file() {
            continue;
        }
        out.push(Candidate {
            name,
            path: entry.path(),
            size: meta.len(),
            modified: meta.modified().ok(),
        });
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

/// What to upload: not on the server with this size, or changed since `seen`.
pub(crate) fn to_publish(
    files: &[Candidate],
    on_server: &HashMap<String, u64>,
    seen: &HashMap<String, Option<SystemTime>>,
) -> Vec<Candidate> {
    files
        .iter()
        .filter(|f| {
            let same_size = on_server.get(&f.name) == Some(&f.size);
            let changed = seen.get(&f.name).is_some_and(|m| *m != f.modified);
            !same_size || changed
        })
        .cloned()
        .collect()
}

/// Percent-encodes a path segment (unreserved characters kept).
pub(crate) fn encode_segment(s: &str) -> String {
    percent_encode(s, crate::share::manifest::UNRESERVED)
}

struct Publisher {
    client: Client,
    server: String,
    user: String,
    auth: String,
    policy: Option<String>,
}

impl Publisher {
    async fn listed(&self) -> Result<HashMap<String, u64>, PeerError> {
        let url = join(
            &self.server,
            &format!("/v1/shares/{}", encode_segment(&self.user)),
        )?;
        let r = self
            .client
            .send(
                &url,
                &Request::get(16 * 1024 * 1024).header("Authorization", self.auth.clone()),
            )
            .await?;
        if !r.is_success() {
            return Err(PeerError::Server {
                what: "listing shares".into(),
                detail: r.describe(),
            });
        }
        let list: Vec<Listed> = serde_json::from_slice(&r.body)?;
        Ok(list.into_iter().map(|l| (l.name, l.size)).collect())
    }

    async fn put(&self, c: &Candidate) -> Result<serde_json::Value, PeerError> {
        let mut path = format!(
            "/v1/shares/{}/{}",
            encode_segment(&self.user),
            encode_segment(&c.name)
        );
        if let Some(p) = &self.policy {
            path.push_str(&format!("?policy={}", encode_segment(p)));
        }
        let url = join(&self.server, &path)?;
        let headers = vec![
            ("Authorization".to_string(), self.auth.clone()),
            (
                "Content-Type".to_string(),
                "application/octet-stream".to_string(),
            ),
        ];
        let r = self
            .client
            .send_file(&url, "PUT", &headers, &c.path, 1024 * 1024)
            .await?;
        if !r.is_success() {
            return Err(PeerError::Server {
                what: format!("publishing {}", c.name),
                detail: r.describe(),
            });
        }
        Ok(serde_json::from_slice(&r.body)?)
    }

    /// One scan: publishes what is new; prints one JSON line per published share.
    async fn scan_once(
        &self,
        folder: &Path,
        seen: &mut HashMap<String, Option<SystemTime>>,
    ) -> Result<usize, PeerError> {
        let files = scan(folder)?;
        let on_server = self.listed().await?;
        let todo = to_publish(&files, &on_server, seen);
        for f in &files {
            seen.entry(f.name.clone()).or_insert(f.modified);
        }
        let mut done = 0;
        for c in &todo {
            match self.put(c).await {
                Ok(v) => {
                    println!("{v}");
                    seen.insert(c.name.clone(), c.modified);
                    done += 1;
                }
                Err(e) => tracing::warn!(file = %c.name, error = %e, "publish failed"),
            }
        }
        Ok(done)
    }
}

/// `callvault peer share`.
pub(crate) async fn run_cli(a: ShareArgs) -> Result<(), PeerError> {
    parse_url(&a.server)?;
    if !a.folder.is_dir() {
        return Err(PeerError::Usage(format!(
            "{} is not a folder",
            a.folder.display()
        )));
    }
    let p = Publisher {
        client: Client::new(Duration::from_secs(120)),
        server: a.server.clone(),
        user: a.user.clone(),
        auth: basic_auth(&a.user, &a.password),
        policy: a.policy.clone(),
    };
    let mut seen = HashMap::new();
    let n = p.scan_once(&a.folder, &mut seen).await?;
    tracing::info!(published = n, "folder scanned");
    if !a.watch {
        return Ok(());
    }
    loop {
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(a.interval.max(1))) => {}
            _ = tokio::signal::ctrl_c() => return Ok(()),
        }
        match p.scan_once(&a.folder, &mut seen).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(published = n, "folder scanned"),
            Err(e) => tracing::warn!(error = %e, "folder scan failed"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scan_and_selection() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a.bin"), b"12345").unwrap();
        std::fs::write(dir.path().join("b.txt"), b"xy").unwrap();
        std::fs::write(dir.path().join(".hidden"), b"x").unwrap();
        std::fs::create_dir(dir.path().join("sub")).unwrap();
        let files = scan(dir.path()).unwrap();
        let names: Vec<&str> = files.iter().map(|f| f.name.as_str()).collect();
        assert_eq!(names, ["a.bin", "b.txt"]);
        // Server has a.bin with the same size: only b.txt.
        let on_server = HashMap::from([("a.bin".to_string(), 5u64), ("b.txt".to_string(), 9)]);
        let todo = to_publish(&files, &on_server, &HashMap::new());
        assert_eq!(todo.len(), 1);
        assert_eq!(todo[0].name, "b.txt");
        // A modification seen since the last scan republishes a.bin.
        let seen = HashMap::from([("a.bin".to_string(), Some(SystemTime::UNIX_EPOCH))]);
        let on_server = HashMap::from([("a.bin".to_string(), 5u64), ("b.txt".to_string(), 2)]);
        let todo = to_publish(&files, &on_server, &seen);
        assert_eq!(todo.len(), 1);
        assert_eq!(todo[0].name, "a.bin");
    }

    #[test]
    fn segments_are_encoded() {
        assert_eq!(encode_segment("a b/ü"), "a%20b%2F%C3%BC");
        assert_eq!(
            encode_segment("sip:1002@example.com,x"),
            "sip%3A1002%40example.com%2Cx"
        );
    }
}
