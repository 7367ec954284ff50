#![no_main]
//! frame_stream() must never panic, never claim more bytes than it was given, and agree with
//! itself when more data arrives: a complete frame stays the same frame.

use callvault_parser::sip::message::{frame_stream, parse, Frame};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut buf = data;
    // Walk the buffer like the TCP reader does.
    for _ in 0..64 {
        match frame_stream(buf) {
            Ok(Frame::Incomplete) | Err(_) => break,
            Ok(Frame::KeepAlive(n)) => {
                assert!(n > 0 && n <= buf.len());
                buf = &buf[n..];
            }
            Ok(Frame::Message(n)) => {
                assert!(n > 0 && n <= buf.len());
                // More bytes after a complete frame do not change where it ends.
                let mut longer = buf[..n].to_vec();
                longer.extend_from_slice(b"OPTIONS sip:x SIP/2.0\r\n");
                assert_eq!(frame_stream(&longer), Ok(Frame::Message(n)));
                // The framed message never fails on body length: framing and parsing agree.
                if let Err(e) = parse(&buf[..n]) {
                    assert_ne!(e, callvault_parser::sip::message::ParseError::TruncatedBody);
                }
                buf = &buf[n..];
            }
        }
    }
});
