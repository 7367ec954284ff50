//! SIP itself, free of I/O: messages, URIs, transactions, dialogs, digest auth, registrar,
//! the transports.

pub mod admission;
pub mod auth;
pub mod dialog;
pub mod message;
pub mod registrar;
pub mod transaction;
pub mod transport;
pub mod uri;
