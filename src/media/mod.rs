//! Media plane: RTP parsing, DTMF, port allocation and the anchored relay.

/// RFC 4733 telephone-event payloads and a once-per-key-press detector (sans-IO).
pub mod dtmf;
/// RTP/RTCP port-pair allocator binding real UDP sockets from `media.rtp_ports`.
pub mod ports;
/// The per-call anchored RTP/RTCP relay task with symmetric-RTP latching.
pub mod relay;
/// Zero-copy RTP header views (RFC 3550) and RTP/RTCP demultiplexing (RFC 5761).
pub mod rtp;
