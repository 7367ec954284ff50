//! `callvault peer serve`: SIP registration and answering share requests. Not built yet:
//! the command says so and exits non-zero (see the report of the peer agent work).

use super::{PeerError, ServeArgs};

/// `callvault peer serve`.
pub async fn run_cli(a: ServeArgs) -> Result<(), PeerError> {
    Err(PeerError::Sip(format!(
        "peer serve (SIP registration of {} at {}) is not implemented yet; use `peer fetch` with the offer",
        a.user, a.sip
    )))
}
