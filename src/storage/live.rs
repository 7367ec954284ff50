//! The registry of stores being written ([`LiveStores`]): a reader of a `receiving` store (an
//! HTTP download, a player) follows the writer's committed tail through the watch registered
//! here instead of polling the disk and the database.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::watch;

use super::segments::TailState;

/// Registry of stores being written, so a reader of a `receiving` store can follow its live
/// tail. The store-session code registers the writer's watch when the session starts and
/// removes it after the log is finished (or holds a [`LiveGuard`], which removes it on drop).
/// A `receiving` store that is not registered is read by polling the disk and the database.
#[derive(Debug, Default)]
pub struct LiveStores {
    map: Mutex<HashMap<String, watch::Receiver<TailState>>>,
}

impl LiveStores {
    pub fn new() -> LiveStores {
        LiveStores::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, watch::Receiver<TailState>>> {
        // The map stays consistent even if a holder panicked: every operation is one call.
        self.map.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn insert(&self, store_id: &str, tail: watch::Receiver<TailState>) {
        self.lock().insert(store_id.to_string(), tail);
    }

    pub fn remove(&self, store_id: &str) {
        self.lock().remove(store_id);
    }

    /// A receiver of the store's committed state, if it is being written.
    pub fn get(&self, store_id: &str) -> Option<watch::Receiver<TailState>> {
        self.lock().get(store_id).cloned()
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.lock().is_empty()
    }

    /// Registers `tail` until the returned guard is dropped.
    pub fn register(
        self: &Arc<Self>,
        store_id: &str,
        tail: watch::Receiver<TailState>,
    ) -> LiveGuard {
        self.insert(store_id, tail);
        LiveGuard {
            live: Arc::clone(self),
            store_id: store_id.to_string(),
        }
    }
}

/// Removes its store from [`LiveStores`] when dropped.
#[derive(Debug)]
pub struct LiveGuard {
    live: Arc<LiveStores>,
    store_id: String,
}

impl Drop for LiveGuard {
    fn drop(&mut self) {
        self.live.remove(&self.store_id);
    }
}
