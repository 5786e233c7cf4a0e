//! What the relay opens from a member's `ToRelay` frame. The input is the plaintext inside the
//! seal: a request and its network signature. The request part alone is refused or re-encodes
//! to the same request; sealed and opened as the relay does, the input is refused exactly when
//! it is too short or its request part is, and its signature verifies only for the network
//! whose key made it (the seeds carry signatures of the fixture's network; nobody else's).
#![no_main]

use libfuzzer_sys::fuzz_target;
use meshvpn::keys::PeerKey;
use meshvpn::wire::admission::{open_request, SIGNATURE_LEN};
use meshvpn::wire::plain::{decode_relay_request, encode_relay_request};
use meshvpn_fuzz::{fixture, kind, nonce};

fuzz_target!(|data: &[u8]| {
    if let Ok(req) = decode_relay_request(data) {
        let _ = (req.ts_ms(), req.network());
        assert_eq!(decode_relay_request(&encode_relay_request(&req)), Ok(req));
    }

    let fx = fixture();
    let sender: PeerKey = fx.members[0].public();
    let relay = fx.relay.public();
    let cookie = [7u8; 16];
    let session = &fx.member_sessions[0];
    let mut aad = meshvpn::wire::frame_aad(kind::TO_RELAY, &sender).to_vec();
    aad.extend_from_slice(&cookie);
    let sealed = meshvpn::wire::seal(session, &aad, data, nonce(1));
    let body = data
        .len()
        .checked_sub(SIGNATURE_LEN)
        .map(|end| decode_relay_request(&data[..end]));
    match open_request(session, &sender, &relay, &cookie, &sealed) {
        Ok(signed) => {
            assert_eq!(body, Some(Ok(signed.request.clone())));
            if signed.verify() {
                assert_eq!(
                    signed.request.network(),
                    fx.keys.network_id,
                    "forged signature"
                );
            }
        }
        Err(_) => assert!(!matches!(body, Some(Ok(_))), "a valid request was refused"),
    }
});
