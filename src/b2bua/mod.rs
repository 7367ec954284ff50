//! The B2BUA: calls of two dialogs each (leg A towards the caller, leg B towards the callee)
//! with anchored media, routing, and the in-call storage feature on top.

pub mod engine;
pub mod errors;
pub mod media;
pub mod recording;
pub mod share_service;
pub mod store_service;
pub mod wire;

#[cfg(test)]
mod tests;
