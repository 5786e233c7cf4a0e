//! The plaintext body of a member's announcement (what members decode after opening it with
//! the control key): garbage is refused, and what decodes re-encodes to the same announcement.
#![no_main]

use libfuzzer_sys::fuzz_target;
use meshvpn::keys::PeerKey;
use meshvpn::wire::plain::{decode_announcement, encode_announcement};

fuzz_target!(|data: &[u8]| {
    let key = PeerKey([7; 32]);
    if let Ok(a) = decode_announcement(key, data) {
        assert_eq!(decode_announcement(key, &encode_announcement(&a)), Ok(a));
    }
});
