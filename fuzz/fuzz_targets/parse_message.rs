#![no_main]
//! parse() must never panic; whatever it accepts must survive serialise + re-parse with the
//! same method/status, Call-ID, CSeq and body. A rejected request must get a buildable reply.

use callvault_parser::sip::message::{
    error_response_for, parse, same_header, HeaderAccess, SipMessage,
};
use libfuzzer_sys::fuzz_target;

fn key(m: &SipMessage) -> (String, Option<String>, Option<String>, Vec<u8>) {
    let (first, cseq, call_id, body) = match m {
        SipMessage::Request(r) => (r.method.to_string(), r.cseq(), r.call_id(), &r.body),
        SipMessage::Response(r) => (r.status.to_string(), r.cseq(), r.call_id(), &r.body),
    };
    (
        first,
        call_id.map(str::to_string),
        cseq.map(|c| c.to_string()),
        body.to_vec(),
    )
}

fuzz_target!(|data: &[u8]| {
    match parse(data) {
        Ok(msg) => {
            let bytes = msg.to_bytes();
            let again = match parse(&bytes) {
                Ok(m) => m,
                Err(e) => panic!("re-parse failed: {e}\n{}", String::from_utf8_lossy(&bytes)),
            };
            assert_eq!(key(&msg), key(&again));
            // Every header but Content-Length (rewritten from the body) comes back as it was.
            let others = |m: &SipMessage| -> Vec<(String, String)> {
                m.headers()
                    .iter()
                    .filter(|h| !same_header(&h.name, "Content-Length"))
                    .map(|h| (h.name.clone(), h.value.clone()))
                    .collect()
            };
            assert_eq!(others(&msg), others(&again));
        }
        Err(e) => {
            if let Some(resp) = error_response_for(data, &e) {
                // The answer must be serialisable, and its Via must be what the request carried.
                let _ = resp.to_bytes();
                assert!(resp.headers.has("Via"));
            }
        }
    }
});
