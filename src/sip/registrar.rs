//! Interim registrar written by the lead so the crate compiles; the registrar owner replaces
//! this file with the full §10.3 implementation (same API).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::config::Transport;
use crate::sip::message::{HeaderAccess, Request};
use crate::sip::uri::NameAddr;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Source {
    pub transport: Transport,
    pub addr: SocketAddr,
}

#[derive(Debug, Clone)]
pub struct Binding {
    pub contact: NameAddr,
    pub source: Source,
    pub expires_at: Instant,
}

#[derive(Debug)]
pub struct RegisterOutcome {
    bindings: Vec<(NameAddr, u64)>,
}

impl RegisterOutcome {
    pub fn contacts(&self) -> Vec<String> {
        self.bindings
            .iter()
            .map(|(c, e)| format!("{c};expires={e}"))
            .collect()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RegisterError {
    #[error("bad request")]
    Bad,
}

impl RegisterError {
    pub fn status(&self) -> u16 {
        400
    }
}

pub struct Registrar {
    default_expires: u32,
    max_expires: u32,
    map: HashMap<String, Vec<Binding>>,
}

impl Registrar {
    pub fn new(_min: u32, max: u32, default_expires: u32) -> Registrar {
        Registrar {
            default_expires,
            max_expires: max,
            map: HashMap::new(),
        }
    }

    pub fn register(&mut self, aor: &str, req: &Request, source: Source, now: Instant) -> Result<RegisterOutcome, RegisterError> {
        let expires = req.expires().unwrap_or(self.default_expires).min(self.max_expires);
        let list = self.map.entry(aor.to_string()).or_default();
        for c in req.contacts() {
            list.retain(|b| b.contact.uri != c.uri);
            if expires > 0 {
                list.insert(0, Binding {
                    contact: c,
                    source,
                    expires_at: now + Duration::from_secs(expires.into()),
                });
            }
        }
        let bindings = list
            .iter()
            .map(|b| (b.contact.clone(), b.expires_at.saturating_duration_since(now).as_secs()))
            .collect();
        Ok(RegisterOutcome { bindings })
    }

    pub fn lookup(&self, aor: &str, now: Instant) -> Vec<Binding> {
        self.map
            .get(aor)
            .map(|l| l.iter().filter(|b| b.expires_at > now).cloned().collect())
            .unwrap_or_default()
    }

    pub fn expire(&mut self, now: Instant) {
        for l in self.map.values_mut() {
            l.retain(|b| b.expires_at > now);
        }
        self.map.retain(|_, l| !l.is_empty());
    }

    pub fn count(&self) -> usize {
        self.map.values().map(Vec::len).sum()
    }
}
