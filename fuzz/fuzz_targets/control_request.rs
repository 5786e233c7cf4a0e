//! Request lines on the control socket: any line parses or is refused, and a parsed request
//! turns back into a line that parses the same.
#![no_main]

use libfuzzer_sys::fuzz_target;
use meshvpn::control::Request;

fuzz_target!(|data: &[u8]| {
    let line = String::from_utf8_lossy(data);
    if let Some(req) = Request::parse(&line) {
        assert_eq!(Request::parse(&req.to_line()), Some(req));
    }
});
