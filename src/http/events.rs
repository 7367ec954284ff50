//! `GET /v1/events` (PROTOCOL 8): Server-Sent Events for the operator (admin token).
//!
//! Each connection runs one task that looks at calls, registrations and receiving stores
//! every [`TICK`] and sends what changed: `event: call` with the listing JSON of
//! `GET /v1/calls` (packet counters included, so a call that carries media changes every
//! tick) and, when it is gone, once more with `"state":"ended"` and `ended_at`;
//! `event: registration` with the JSON of `GET /v1/registrations` (a binding that went away
//! is sent once more with `"expired":true`); `event: store` with the store's metadata plus
//! `ready`, every tick while it receives (received bytes read from the writer's live tail,
//! so progress is not limited by how often the database is updated) and once when it ends.
//!
//! Why polling rather than a push from the core: the listings are the single source of
//! truth, the core stays free of per-client state, and a tick of 250 ms keeps store progress
//! well within the 500 ms the contract asks for. A client that goes away ends its task at
//! the next send.

use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use axum::extract::State;
use axum::http::{HeaderMap, Method, Uri};
use axum::response::sse::{Event, KeepAlive, Sse};
use futures_util::Stream;
use serde_json::{json, Value};
use tokio::sync::mpsc;

use super::admin::{require_admin, visible_calls, visible_registrations};
use super::auth::Caller;
use super::errors::ApiError;
use super::HttpState;
use crate::storage::stores::{rfc3339, ListFilter, Store, StoreState};

/// How often a connection looks for changes.
pub(crate) const TICK: Duration = Duration::from_millis(250);

/// One event: its name and JSON data.
type Out = (&'static str, Value);

pub(crate) async fn events(
    State(state): State<Arc<HttpState>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, ApiError> {
    require_admin(&state, &method, &uri, &headers).await?;
    let (tx, rx) = mpsc::channel::<Out>(256);
    tokio::spawn(watch(state, tx));
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        let (name, data) = rx.recv().await?;
        Some((Ok(Event::default().event(name).data(data.to_string())), rx))
    });
    Ok(Sse::new(stream).keep_alive(KeepAlive::default()))
}

/// What the connection sent last, to send only changes.
#[derive(Default)]
struct Seen {
    calls: BTreeMap<String, Value>,
    registrations: BTreeMap<String, Value>,
    /// Stores that were receiving at the last tick.
    receiving: HashMap<String, Value>,
}

async fn watch(state: Arc<HttpState>, tx: mpsc::Sender<Out>) {
    let mut seen = Seen::default();
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let out = match changes(&state, &mut seen).await {
            Ok(out) => out,
            Err(e) => {
                tracing::warn!(error = ?e, "events: reading the listings failed");
                continue;
            }
        };
        for ev in out {
            if tx.send(ev).await.is_err() {
                return; // the client went away
            }
        }
    }
}

async fn changes(state: &HttpState, seen: &mut Seen) -> Result<Vec<Out>, ApiError> {
    let mut out = Vec::new();
    let now = rfc3339(SystemTime::now());

    let calls = visible_calls(state, &Caller::Admin).await?;
    let mut current = BTreeMap::new();
    for c in calls {
        let v = serde_json::to_value(&c).unwrap_or(Value::Null);
        if seen.calls.get(&c.id) != Some(&v) {
            out.push(("call", v.clone()));
        }
        current.insert(c.id, v);
    }
    for (id, mut last) in std::mem::replace(&mut seen.calls, current) {
        if !seen.calls.contains_key(&id) {
            last["state"] = json!("ended");
            last["ended_at"] = json!(now);
            out.push(("call", last));
        }
    }

    let regs = visible_registrations(state, &Caller::Admin).await?;
    let mut current = BTreeMap::new();
    for r in regs {
        let key = format!("{} {}", r.aor, r.contact);
        let v = serde_json::to_value(&r).unwrap_or(Value::Null);
        if seen.registrations.get(&key) != Some(&v) {
            out.push(("registration", v.clone()));
        }
        current.insert(key, v);
    }
    for (key, mut last) in std::mem::replace(&mut seen.registrations, current) {
        if !seen.registrations.contains_key(&key) {
            last["expired"] = json!(true);
            out.push(("registration", last));
        }
    }

    let filter = ListFilter {
        state: Some(StoreState::Receiving),
        ..ListFilter::default()
    };
    let mut current = HashMap::new();
    for s in state.stores.list(&filter).await? {
        let v = store_event(state, &s);
        out.push(("store", v.clone()));
        current.insert(s.id.clone(), v);
    }
    for (id, _) in std::mem::replace(&mut seen.receiving, current) {
        if seen.receiving.contains_key(&id) {
            continue;
        }
        // It stopped receiving: one last event with its final state (none if deleted).
        if let Some(s) = state.stores.get(&id).await? {
            out.push(("store", store_event(state, &s)));
        }
    }
    Ok(out)
}

/// A store's metadata (PROTOCOL 2.5) plus `ready`; while it is written, `received_bytes`
/// comes from the writer's committed tail when that is further along than the database.
pub(crate) fn store_event(state: &HttpState, s: &Store) -> Value {
    let mut v = serde_json::to_value(s.view()).unwrap_or(Value::Null);
    if let Some(tail) = state.live.get(&s.id) {
        let live = tail.borrow().payload_bytes;
        if live > s.received_bytes {
            v["received_bytes"] = json!(live);
        }
    }
    v["ready"] = json!(s.threshold_at.is_some());
    v
}
