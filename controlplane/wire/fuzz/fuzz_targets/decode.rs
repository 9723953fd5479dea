#![no_main]
//! Arbitrary bytes through the frame decoder: never a panic, and whatever decodes
//! re-encodes to a frame that decodes to the same message.

use aigw_wire::{decode_frame, encode_frame, Frame, DEFAULT_MAX_FRAME};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut rest = data;
    while let Ok(Some((frame, used))) = decode_frame(rest, DEFAULT_MAX_FRAME) {
        assert!(used <= rest.len() && used >= 6);
        if let Frame::Message(m) = frame {
            let mut again = Vec::new();
            encode_frame(&m, &mut again);
            let (back, n) = decode_frame(&again, DEFAULT_MAX_FRAME)
                .expect("re-encoded frame decodes")
                .expect("complete");
            assert_eq!(n, again.len());
            assert_eq!(back, Frame::Message(m));
        }
        rest = &rest[used..];
    }
});
