//! Feeds arbitrary bytes to the socket protocol's request decoder: it must answer every
//! input with a request or a coded error, never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    match jitd::api::protocol::decode_request(data) {
        Ok(request) => {
            // whatever decodes must encode again
            let line = jitd::api::protocol::encode_request(&request);
            assert!(line.ends_with(b"\n"));
        }
        Err(reply) => assert!(reply.error.is_some_and(|e| !e.code.is_empty())),
    }
});
