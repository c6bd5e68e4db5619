//! Control-message frames as the DPM (requests) and the KN (replies) decode them.
//!
//! Checked besides "no panic": whatever decodes re-encodes to a frame that decodes to the
//! same message with the same id; an error reply re-encodes to the same status.
#![no_main]

use dinomo_shared::msg::{Frame, Request, Response, MSG_SIZE};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut bytes = [0u8; MSG_SIZE];
    let n = data.len().min(MSG_SIZE);
    bytes[..n].copy_from_slice(&data[..n]);
    let frame = Frame::from_bytes(&bytes);
    assert_eq!(frame.to_bytes(), bytes, "a frame is its bytes");

    if let Ok(req) = Request::decode(&frame) {
        let again = req.encode(frame.req_id);
        assert_eq!(again.kind, frame.kind);
        assert_eq!(again.req_id, frame.req_id);
        assert_eq!(again.status, 0);
        assert_eq!(Request::decode(&again), Ok(req));
    }

    match Response::decode(&frame) {
        Ok(Ok(resp)) => {
            let again = resp.encode(frame.req_id);
            assert_eq!(again.kind, frame.kind);
            assert_eq!(again.req_id, frame.req_id);
            assert_eq!(Response::decode(&again), Ok(Ok(resp)));
        }
        Ok(Err(code)) => {
            let again = Response::error(&frame, code);
            assert_eq!(again.status, frame.status);
            assert_eq!(Response::decode(&again), Ok(Err(code)));
        }
        Err(_) => {}
    }
});
