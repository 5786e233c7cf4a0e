//! The relay server state machine fed a sequence of steps (see `meshvpn_fuzz::steps`): raw
//! datagrams from a few links, requests sealed by known members (any plaintext), relay data
//! between members, link closes and time passing on a synthetic clock. Nothing panics, and
//! nobody without a member's key becomes a member.
#![no_main]

use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use meshvpn::relay::server::RelayServer;
use meshvpn::wire::Frame;
use meshvpn_fuzz::{fixture, kind, link, sealed_frame, steps, MEMBERS};

fuzz_target!(|data: &[u8]| {
    let fx = fixture();
    let mut now = Instant::now();
    let mut relay = RelayServer::new(fx.relay.clone(), 7).with_sequence_start(1000);
    for (n, step) in steps(data).into_iter().enumerate() {
        match step.kind % 5 {
            0 => relay.handle_datagram(now, link(step.from), &step.bytes),
            1 => {
                let (i, key) = fx.member(step.from);
                let datagram = sealed_frame(
                    kind::TO_RELAY,
                    &fx.member_sessions[i],
                    key,
                    &step.bytes,
                    n as u64,
                );
                relay.handle_datagram(now, link(step.from >> 2), &datagram);
            }
            2 => {
                let (to, payload) = step.bytes.split_first().unwrap_or((&0, &[]));
                let (_, to) = fx.member(*to);
                let datagram = Frame::RelaySend { to, payload }.to_vec();
                relay.handle_datagram(now, link(step.from >> 2), &datagram);
            }
            3 => {
                let ms = step
                    .bytes
                    .get(..2)
                    .map_or(1000, |b| u64::from(u16::from_be_bytes([b[0], b[1]])));
                now += Duration::from_millis(ms * (1 + u64::from(step.from % 64)));
                relay.handle_timeout(now);
            }
            _ => relay.handle_link_closed(link(step.from)),
        }
        while relay.poll_transmit().is_some() {}
        assert!(
            relay.member_count() <= MEMBERS,
            "a stranger became a member"
        );
        assert!(relay.network_count() <= relay.member_count());
        let _ = (relay.poll_timeout(), relay.stats());
    }
});
