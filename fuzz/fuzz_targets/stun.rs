//! STUN Binding messages as the relay and members decode them: garbage is refused, and a
//! decoded request or response re-encodes to a message that decodes the same.
#![no_main]

use libfuzzer_sys::fuzz_target;
use meshvpn::wire::stun::{self, Binding};

fuzz_target!(|data: &[u8]| {
    match stun::parse(data) {
        Some(Binding::Request(tx)) => {
            assert_eq!(
                stun::parse(&stun::binding_request(tx)),
                Some(Binding::Request(tx))
            )
        }
        Some(Binding::Response { tx, mapped }) => {
            let again = stun::parse(&stun::binding_response(tx, mapped));
            assert_eq!(again, Some(Binding::Response { tx, mapped }))
        }
        None => {}
    }
});
