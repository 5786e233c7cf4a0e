//! Datagram classification on the shared UDP socket, checked against the parsers it routes to:
//! what is classified as a meshvpn frame or STUN is what those parsers could accept.
#![no_main]

use libfuzzer_sys::fuzz_target;
use meshvpn::wire::{classify, stun, DatagramKind, Frame, WireError};

fuzz_target!(|data: &[u8]| {
    let kind = classify(data);
    let frame = Frame::parse(data);
    match kind {
        DatagramKind::Meshvpn => assert!(!matches!(frame, Err(WireError::NotMeshvpn))),
        DatagramKind::WireGuard | DatagramKind::Stun | DatagramKind::Unknown => {
            assert!(frame.is_err(), "{kind:?} parsed as a frame")
        }
    }
    if stun::parse(data).is_some() {
        assert_eq!(
            kind,
            DatagramKind::Stun,
            "STUN message classified as {kind:?}"
        );
    }
});
