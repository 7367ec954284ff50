//! Media plane: RTP parsing, DTMF, port allocation and the anchored relay.

/// RFC 4733 telephone-event payloads and a once-per-key-press detector (sans-IO).
pub mod dtmf;
/// The `*7 PIN #` feature-code detector (sans-IO), shared by INFO digits and RFC 4733 events.
pub mod feature_code;
/// The tc eBPF fast path: forwards latched RTP in the kernel (the relay's second gear).
pub mod kernel;
/// Strict-source RTP latching policy (RTP-bleed defence) shared by relay, recorder, player.
pub mod latch;
/// Paced playback of a store to its receiver, following the live tail (step 333).
pub mod player;
/// RTP/RTCP port-pair allocator binding real UDP sockets from `media.rtp_ports`.
pub mod ports;
/// Store-session RTP ingest into the segment log, with threshold and limits (steps 31/32).
pub mod recorder;
/// The per-call anchored RTP/RTCP relay task with strict-source latching.
pub mod relay;
/// Zero-copy RTP header views (RFC 3550) and RTP/RTCP demultiplexing (RFC 5761).
pub mod rtp;
/// SRTP/SRTCP contexts (RFC 3711), AES_CM_128_HMAC_SHA1_80/_32, in place.
pub mod srtp;
/// Thread-per-core runtimes the call relays run on.
pub mod threads;
