//! The database half of a [`StoreSession`]'s actions, shared by every driver (RTP store
//! sessions, uploads, recordings): [`run`] carries out `MarkThreshold` and `Finish` against
//! the metadata database and hands back what only the driver can do (the ready note, stopping
//! its ingest). Failures are logged, never fatal: a store the database could not finish is
//! settled by the next start's recovery.

use std::time::SystemTime;

use super::{Action, StoreSession};
use crate::error_code::ErrorCode;
use crate::metrics::METRICS;
use crate::storage::stores::{Store, StoreKind, StoreState, Stores};

/// What the driver must do after [`run`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Note {
    /// Send the ready note (step 331).
    Ready {
        received_bytes: u64,
        state: StoreState,
    },
    /// Stop the ingest (BYE with this reason, stop reading the body).
    Stop(ErrorCode),
    /// The store is finished and settled (None: the database refused; recovery will).
    Finished(Option<Box<Store>>),
}

/// Runs the queued actions of `session` for store `id`, in order.
pub(crate) async fn run(session: &mut StoreSession, stores: &Stores, id: &str) -> Vec<Note> {
    let mut notes = Vec::new();
    while let Some(action) = session.poll_action() {
        match action {
            Action::MarkThreshold {
                received_bytes,
                after,
                by_finish,
            } => {
                METRICS.threshold_seconds.observe_duration(after);
                tracing::info!(
                    store = %id,
                    received_bytes,
                    after_ms = after.as_millis() as u64,
                    by_finish,
                    "threshold reached"
                );
                if let Err(e) = stores.mark_threshold(id, SystemTime::now()).await {
                    tracing::warn!(store = %id, error = %e, "threshold not recorded");
                }
            }
            Action::SendReady {
                received_bytes,
                state,
            } => notes.push(Note::Ready {
                received_bytes,
                state,
            }),
            Action::StopIngest { reason } => notes.push(Note::Stop(reason)),
            Action::Finish { state, stored } => {
                let done = stores.finish(id, state, stored, SystemTime::now()).await;
                if let Err(e) = &done {
                    tracing::warn!(store = %id, error = %e, "store not finished cleanly");
                } else {
                    tracing::info!(store = %id, bytes = stored, %state, "store finished");
                }
                notes.push(Note::Finished(done.ok().map(Box::new)));
            }
        }
    }
    notes
}

/// `callvault_prompt_to_first_packet_seconds` for a store of step 2.3 (recorded calls have no
/// prompt): from the store's creation (the prompt follows it at once) to the first commit of
/// its log that holds payload, i.e. the first packet *stored* in the sense of step 31. Wall
/// clock, since `created_at` is; a clock step backwards skips the sample.
pub(crate) fn observe_first_packet(store: &Store, at: SystemTime) {
    if store.kind != StoreKind::InCall {
        return;
    }
    if let Ok(d) = at.duration_since(store.created_at) {
        METRICS.prompt_to_first_packet_seconds.observe_duration(d);
    }
}
