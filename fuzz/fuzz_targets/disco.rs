//! The plaintext of a disco message between two members: garbage is refused, and what decodes
//! re-encodes to the same message.
#![no_main]

use libfuzzer_sys::fuzz_target;
use meshvpn::wire::plain::{decode_disco, encode_disco};

fuzz_target!(|data: &[u8]| {
    if let Ok((stamp, msg)) = decode_disco(data) {
        assert_eq!(decode_disco(&encode_disco(stamp, &msg)), Ok((stamp, msg)));
    }
});
