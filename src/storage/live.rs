//! The registry of stores being written ([`LiveStores`]): a reader of a `receiving` store (an
//! HTTP download, a player) follows the writer's committed tail through the watch registered
//! here instead of polling the disk and the database. With store media in an object store
//! (`objects = "s3://..."`) it also says where a store that is not written here is read from:
//! [`LiveStores::reader`] is the one place readers (HTTP download, SIP play) get theirs.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::watch;

use super::objects::chunks::{ChunkSource, FinishedProbe};
use super::objects::Objects;
use super::segments::{SegmentReader, TailState};
use super::stores::{StoreState, Stores};

/// Registry of stores being written, so a reader of a `receiving` store can follow its live
/// tail. The store-session code registers the writer's watch when the session starts and
/// removes it after the log is finished (or holds a [`LiveGuard`], which removes it on drop).
/// A `receiving` store that is not registered is read by polling the disk and the database.
#[derive(Debug, Default)]
pub struct LiveStores {
    map: Mutex<HashMap<String, watch::Receiver<TailState>>>,
    /// The remote object store holding store media; None on the embedded default (`file`),
    /// where the segment logs under `data_dir` are the media.
    objects: Option<Objects>,
}

impl LiveStores {
    pub fn new() -> LiveStores {
        LiveStores::default()
    }

    /// A registry whose stores' media lives in `objects` (ignored when it is the local disk).
    pub fn with_objects(objects: Objects) -> LiveStores {
        LiveStores {
            map: Mutex::default(),
            objects: (!objects.is_local()).then_some(objects),
        }
    }

    /// The remote object store, if store media lives in one.
    pub fn objects(&self) -> Option<&Objects> {
        self.objects.as_ref()
    }

    /// A reader of store `id` from its start, and whether it follows the store to its end by
    /// itself. Written on this node: the local log and its watch (the fastest tail). Else,
    /// with a remote object store: its chunks, following them while `receiving` (`probe`
    /// tells when a store finished without an end object). Else the local log as it is on
    /// disk (the caller polls a receiving store).
    pub fn reader(
        &self,
        dir: &std::path::Path,
        id: &str,
        receiving: bool,
        probe: Option<FinishedProbe>,
    ) -> (SegmentReader, bool) {
        if let Some(tail) = self.get(id) {
            return (SegmentReader::open(dir, 0, Some(tail)), true);
        }
        match &self.objects {
            Some(o) => {
                let src = ChunkSource::new(Arc::clone(o), id, receiving, probe);
                (SegmentReader::from_objects(src, 0), true)
            }
            None => (SegmentReader::open(dir, 0, None), false),
        }
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

/// A [`FinishedProbe`] reading store `id`'s state from the metadata database (a database
/// error keeps the reader following).
pub fn finished_probe(stores: &Stores, id: &str) -> FinishedProbe {
    let stores = stores.clone();
    let id = id.to_string();
    Arc::new(move || {
        let stores = stores.clone();
        let id = id.clone();
        Box::pin(async move {
            match stores.get(&id).await {
                Ok(Some(s)) => s.state != StoreState::Receiving,
                Ok(None) => true,
                Err(_) => false,
            }
        })
    })
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
