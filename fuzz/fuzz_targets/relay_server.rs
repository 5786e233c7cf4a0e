//! The relay server state machine fed a sequence of steps (see `meshvpn_fuzz::steps`): raw
//! datagrams from a few links, requests from known members (signed with the network key when
//! the plaintext is a request, sealed either way, carrying the cookie the relay last gave that
//! address or, for kinds 128 and up, none), relay data between members, link closes and time
//! passing on a synthetic clock. Nothing panics, nobody without a member's key becomes a
//! member, and a cookie reply is never larger than the datagram it answers.
#![no_main]
// The synthetic clock starts at a real `Instant` (the type has no other constructor); every
// later time is that start plus what the input says.
#![allow(clippy::disallowed_methods)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use meshvpn::relay::server::{Link, RelayServer, UnixClock};
use meshvpn::wire::admission::{Cookie, COOKIE_LEN};
use meshvpn::wire::Frame;
use meshvpn_fuzz::{fixture, link, request_frame, steps, MEMBERS, START_UNIX_MS};

fuzz_target!(|data: &[u8]| {
    let fx = fixture();
    let start = Instant::now();
    let clock = UnixClock {
        at: start,
        unix_ms: START_UNIX_MS,
    };
    let mut now = start;
    let mut relay = RelayServer::new(fx.relay.clone(), 7, clock).with_sequence_start(1000);
    // The cookie the relay last sent to each address, as the member there would keep it.
    let mut cookies: BTreeMap<SocketAddr, Cookie> = BTreeMap::new();
    for (n, step) in steps(data).into_iter().enumerate() {
        let sent = match step.kind % 5 {
            0 => {
                relay.handle_datagram(now, link(step.from), &step.bytes);
                step.bytes.len()
            }
            1 => {
                let (i, key) = fx.member(step.from);
                let from = link(step.from >> 2);
                let cookie = match from {
                    Link::Udp(addr) if step.kind < 128 => cookies.get(&addr).copied(),
                    _ => None,
                };
                let datagram = request_frame(
                    &fx.member_sessions[i],
                    key,
                    cookie.unwrap_or([0; COOKIE_LEN]),
                    &step.bytes,
                    clock.unix_ms(now),
                    n as u64,
                );
                relay.handle_datagram(now, from, &datagram);
                datagram.len()
            }
            2 => {
                let (to, payload) = step.bytes.split_first().unwrap_or((&0, &[]));
                let (_, to) = fx.member(*to);
                let datagram = Frame::RelaySend { to, payload }.to_vec();
                relay.handle_datagram(now, link(step.from >> 2), &datagram);
                datagram.len()
            }
            3 => {
                let ms = step
                    .bytes
                    .get(..2)
                    .map_or(1000, |b| u64::from(u16::from_be_bytes([b[0], b[1]])));
                now += Duration::from_millis(ms * (1 + u64::from(step.from % 64)));
                relay.handle_timeout(now);
                0
            }
            _ => {
                relay.handle_link_closed(link(step.from));
                0
            }
        };
        while let Some(t) = relay.poll_transmit() {
            if let Ok(Frame::CookieReply { cookie, .. }) = Frame::parse(&t.payload) {
                assert!(t.payload.len() <= sent, "a cookie reply amplified");
                if let Link::Udp(addr) = t.link {
                    cookies.insert(addr, cookie);
                }
            }
        }
        assert!(
            relay.member_count() <= MEMBERS,
            "a stranger became a member"
        );
        assert!(relay.network_count() <= relay.member_count());
        let _ = (relay.poll_timeout(), relay.counters());
    }
});
