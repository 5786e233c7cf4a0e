//! meshvpn frame headers: any bytes parse or are refused, and a parsed frame re-encodes to
//! bytes that parse to the same frame.
#![no_main]

use libfuzzer_sys::fuzz_target;
use meshvpn::wire::Frame;

fuzz_target!(|data: &[u8]| {
    if let Ok(frame) = Frame::parse(data) {
        let bytes = frame.to_vec();
        assert_eq!(Frame::parse(&bytes), Ok(frame));
        assert!(bytes.len() <= data.len(), "encoding grew the frame");
    }
});
