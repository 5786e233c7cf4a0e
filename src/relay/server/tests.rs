//! Unit tests of the relay server: admission, return-path proof, budgets, caps, forwarding
//! and expiry, driven on a virtual clock.

use std::collections::BTreeMap;

use super::*;
use crate::keys::{NetworkKeys, NetworkSecret};
use crate::wire::admission::AdmissionClient;

/// The Unix time the tests' relays start at.
pub(super) const T0_MS: u64 = 1_700_000_000_000;

pub(super) fn relay(now: Instant, seed: u64) -> RelayServer {
    RelayServer::new(
        NodeSecret::from_bytes([1; 32]),
        seed,
        UnixClock {
            at: now,
            unix_ms: T0_MS,
        },
    )
}

pub(super) fn ts(relay: &RelayServer, now: Instant) -> u64 {
    relay.clock.unix_ms(now)
}

pub(super) struct Client {
    pub(super) secret: NodeSecret,
    pub(super) link: Link,
    pub(super) keys: NetworkKeys,
    admission: AdmissionClient,
    nonce: u8,
}

impl Client {
    pub(super) fn new(b: u8, port: u16, network: &NetworkSecret) -> Self {
        let keys = network.derive();
        let admission = AdmissionClient::new(
            keys.signing.clone(),
            NodeSecret::from_bytes([1; 32]).public(),
        );
        Self {
            secret: NodeSecret::from_bytes([b; 32]),
            link: Link::Udp(SocketAddr::from(([198, 51, 100, b], port))),
            keys,
            admission,
            nonce: 0,
        }
    }

    fn session(&self, relay: &RelayServer) -> [u8; 32] {
        let me = self.secret.public();
        self.secret.relay_session_key(&me, &relay.public_key())
    }

    fn next_nonce(&mut self) -> [u8; 24] {
        self.nonce = self.nonce.wrapping_add(1);
        [self.nonce; 24]
    }

    /// The datagram for `req` as the member would send it now.
    fn datagram(&mut self, relay: &RelayServer, req: &RelayRequest) -> Vec<u8> {
        let (session, nonce) = (self.session(relay), self.next_nonce());
        self.admission
            .seal(&session, self.secret.public(), req, nonce)
    }

    /// Sends `req`, answers a cookie reply once, and returns the replies meant for this member.
    pub(super) fn send(
        &mut self,
        relay: &mut RelayServer,
        now: Instant,
        req: &RelayRequest,
    ) -> Vec<RelayReply> {
        let d = self.datagram(relay, req);
        relay.handle_datagram(now, self.link, &d);
        self.drain(relay, now)
    }

    pub(super) fn drain(&mut self, relay: &mut RelayServer, now: Instant) -> Vec<RelayReply> {
        let session = self.session(relay);
        let mut out = Vec::new();
        let mut others = Vec::new();
        let mut resend = None;
        while let Some(t) = relay.poll_transmit() {
            if t.link != self.link {
                others.push(t);
                continue;
            }
            match Frame::parse(&t.payload) {
                Ok(Frame::FromRelay { relay: k, sealed }) => {
                    out.push(wire::open_from_relay(&session, &k, sealed).expect("sealed for us"))
                }
                Ok(Frame::CookieReply { echo, cookie }) => {
                    let nonce = self.next_nonce();
                    resend = self.admission.handle_cookie_reply(
                        echo,
                        cookie,
                        &session,
                        self.secret.public(),
                        nonce,
                    );
                }
                other => panic!("unexpected {other:?}"),
            }
        }
        relay.transmits.extend(others);
        if let Some(d) = resend {
            relay.handle_datagram(now, self.link, &d);
            out.extend(self.drain(relay, now));
        }
        out
    }

    pub(super) fn register(&self, relay: &RelayServer, now: Instant) -> RelayRequest {
        RelayRequest::Register {
            network: self.keys.network_id,
            ts_ms: ts(relay, now),
            announcement: vec![1, 2, 3],
        }
    }
}

#[test]
fn registration_sync_forwarding_and_replay() {
    let now = Instant::now();
    let mut relay = relay(now, 7);
    let net = NetworkSecret([3; 32]);
    let (mut a, mut b) = (Client::new(10, 1000, &net), Client::new(11, 1001, &net));
    let req = a.register(&relay, now);
    let replies = a.send(&mut relay, now, &req);
    assert!(matches!(
        replies[0],
        RelayReply::RegisterAck { members: 0, .. }
    ));
    assert!(matches!(replies[1], RelayReply::SyncEmpty { .. }));
    assert_eq!(relay.counters().cookie_replies, 1);

    let req = b.register(&relay, now);
    let to_b = b.send(&mut relay, now, &req);
    assert!(matches!(
        to_b[0],
        RelayReply::RegisterAck { members: 1, .. }
    ));
    // a is told about b at once.
    let to_a = a.drain(&mut relay, now);
    assert!(
        matches!(&to_a[..], [RelayReply::Member { entry, .. }] if entry.key == b.secret.public())
    );

    // A replayed registration is refused (no answer at all).
    let again = b.datagram(&relay, &req);
    relay.handle_datagram(now, b.link, &again);
    assert!(b.drain(&mut relay, now).is_empty());
    assert_eq!(relay.counters().replayed, 1);

    // Relay frames are forwarded by key, from registered links only.
    relay.handle_datagram(
        now,
        a.link,
        &Frame::RelaySend {
            to: b.secret.public(),
            payload: b"wg",
        }
        .to_vec(),
    );
    let t = relay.poll_transmit().expect("forwarded");
    assert_eq!(t.link, b.link);
    assert_eq!(
        Frame::parse(&t.payload),
        Ok(Frame::RelayRecv {
            from: a.secret.public(),
            payload: b"wg"
        })
    );
    let stranger = Link::Udp("192.0.2.9:9".parse().expect("lit"));
    relay.handle_datagram(
        now,
        stranger,
        &Frame::RelaySend {
            to: b.secret.public(),
            payload: b"x",
        }
        .to_vec(),
    );
    assert!(relay.poll_transmit().is_none());

    // A refresh from the registered link needs no new cookie; a sync is answered.
    let later = now + Duration::from_secs(20);
    let req = a.register(&relay, later);
    assert!(matches!(
        a.send(&mut relay, later, &req)[..],
        [RelayReply::RegisterAck { .. }]
    ));
    let sync = RelayRequest::Sync {
        network: a.keys.network_id,
        ts_ms: ts(&relay, later) + 1,
    };
    assert!(matches!(
        a.send(&mut relay, later, &sync)[..],
        [RelayReply::Member { .. }]
    ));
    assert_eq!(relay.counters().cookie_replies, 2);

    // Expiry: b stops refreshing and a is told.
    assert_eq!(relay.poll_timeout(), Some(now + HOUSEKEEPING_INTERVAL));
    relay.handle_timeout(now + MEMBER_TTL);
    let to_a = a.drain(&mut relay, later);
    let gone = RelayReply::MemberGone {
        seq: relay.seq,
        key: b.secret.public(),
    };
    assert_eq!(to_a, vec![gone.clone(), gone], "the goodbye goes out twice");
    assert_eq!(relay.member_count(), 1);
    // a's timer entry moved to its refreshed expiry.
    assert_eq!(
        relay.poll_timeout(),
        Some(now + MEMBER_TTL + HOUSEKEEPING_INTERVAL)
    );
    relay.handle_timeout(later + MEMBER_TTL);
    assert_eq!(relay.member_count(), 0);
    assert_eq!(relay.counters().expired, 2);

    // A leave is honoured only with a newer timestamp.
    let late = later + MEMBER_TTL;
    let req = a.register(&relay, late);
    a.send(&mut relay, late, &req);
    let leave = RelayRequest::Leave {
        network: a.keys.network_id,
        ts_ms: ts(&relay, late) + 1,
    };
    a.send(&mut relay, late, &leave);
    assert_eq!(relay.member_count(), 0);
    assert_eq!(relay.counters().leaves, 1);
}

#[test]
fn networks_are_isolated() {
    let now = Instant::now();
    let mut relay = relay(now, 7);
    let mut a = Client::new(10, 1000, &NetworkSecret([3; 32]));
    let mut b = Client::new(11, 1001, &NetworkSecret([4; 32]));
    let req = a.register(&relay, now);
    a.send(&mut relay, now, &req);
    let req = b.register(&relay, now);
    b.send(&mut relay, now, &req);
    assert!(a
        .drain(&mut relay, now)
        .iter()
        .all(|r| !matches!(r, RelayReply::Member { .. })));
    relay.handle_datagram(
        now,
        a.link,
        &Frame::RelaySend {
            to: b.secret.public(),
            payload: b"x",
        }
        .to_vec(),
    );
    assert!(
        relay.poll_transmit().is_none(),
        "no forwarding across networks"
    );
    assert_eq!(relay.network_count(), 2);
}

/// Bytes received from and sent to each address.
#[derive(Default)]
struct Ledger(BTreeMap<SocketAddr, (usize, usize)>);

impl Ledger {
    fn deliver(&mut self, relay: &mut RelayServer, now: Instant, from: SocketAddr, bytes: &[u8]) {
        self.0.entry(from).or_default().0 += bytes.len();
        relay.handle_datagram(now, Link::Udp(from), bytes);
        while let Some(t) = relay.poll_transmit() {
            self.0.entry(t.link.addr()).or_default().1 += t.payload.len();
        }
    }

    fn assert_no_amplification(&self, proven: &[SocketAddr]) {
        for (addr, (received, sent)) in &self.0 {
            if !proven.contains(addr) {
                assert!(sent <= received, "{addr}: sent {sent} bytes for {received}");
            }
        }
    }
}

#[test]
fn unproven_addresses_never_get_more_than_they_sent() {
    let now = Instant::now();
    let mut relay = relay(now, 7);
    let net = NetworkSecret([3; 32]);
    // A real member with a few peers, so syncs and pushes would be large.
    let mut members: Vec<Client> = (0..4).map(|i| Client::new(10 + i, 1000, &net)).collect();
    for m in &mut members {
        let req = m.register(&relay, now);
        m.send(&mut relay, now, &req);
    }
    for m in &mut members {
        m.drain(&mut relay, now);
    }
    let proven: Vec<SocketAddr> = members.iter().map(|m| m.link.addr()).collect();
    let mut ledger = Ledger::default();
    let mut port = 20_000u16;
    let mut fresh = || {
        port += 1;
        SocketAddr::from(([192, 0, 2, 50], port))
    };
    let victim = &mut members[0];
    let mut requests: Vec<Vec<u8>> = vec![
        stun::binding_request([1; 12]),
        {
            let mut bare = stun::binding_request([2; 12]);
            bare.truncate(20);
            bare[3] = 0;
            bare
        },
        Frame::KeyRequest.to_vec(),
        {
            let mut padded = Frame::KeyRequest.to_vec();
            padded.resize(wire::RELAY_OVERHEAD, 0);
            padded
        },
        Frame::RelaySend {
            to: PeerKey([10; 32]),
            payload: &[0; 100],
        }
        .to_vec(),
        b"garbage".to_vec(),
    ];
    // The victim's own requests, replayed from elsewhere (with and without its cookie).
    for req in [
        victim.register(&relay, now + Duration::from_secs(1)),
        RelayRequest::Sync {
            network: victim.keys.network_id,
            ts_ms: ts(&relay, now) + 2_000,
        },
        RelayRequest::Leave {
            network: victim.keys.network_id,
            ts_ms: ts(&relay, now) + 3_000,
        },
    ] {
        requests.push(victim.datagram(&relay, &req));
        let mut stranger = AdmissionClient::new(victim.keys.signing.clone(), relay.public_key());
        let session = victim.session(&relay);
        requests.push(stranger.seal(&session, victim.secret.public(), &req, [0x77; 24]));
    }
    // Unknown keys (each would cost an X25519) of every request type.
    for (i, req) in [
        RelayRequest::Register {
            network: victim.keys.network_id,
            ts_ms: ts(&relay, now),
            announcement: vec![0; 1000],
        },
        RelayRequest::Sync {
            network: victim.keys.network_id,
            ts_ms: ts(&relay, now),
        },
        RelayRequest::Leave {
            network: victim.keys.network_id,
            ts_ms: ts(&relay, now),
        },
    ]
    .iter()
    .enumerate()
    {
        let stranger = NodeSecret::from_bytes([200 + i as u8; 32]);
        let me = stranger.public();
        let session = stranger.relay_session_key(&me, &relay.public_key());
        requests.push(admission::seal_request(
            &session,
            me,
            &relay.public_key(),
            &victim.keys.signing,
            [0; 16],
            req,
            [9; 24],
        ));
    }
    let mut answered = 0;
    for bytes in &requests {
        let from = fresh();
        ledger.deliver(&mut relay, now, from, bytes);
        // Each from a fresh address; some are answered (small answers), most not at all.
        answered += usize::from(ledger.0[&from].1 > 0);
    }
    ledger.assert_no_amplification(&proven);
    assert!(
        answered >= 5,
        "padded STUN, padded key request and cookie replies are answered"
    );
    // The victim's own (authentic) leave took effect, wherever it came from.
    assert_eq!(relay.member_count(), 3);
    assert_eq!(
        relay.counters().expensive_ops,
        4 * 2 + 2,
        "only the members' registrations and the victim's own sync and leave"
    );
}

#[test]
fn forged_sources_stay_within_the_global_budget() {
    let now = Instant::now();
    let config = ServerConfig {
        expensive_ops_per_second: 100.0,
        expensive_ops_burst: 100.0,
        ..ServerConfig::default()
    };
    let mut relay = relay(now, 7).with_config(config);
    let net = NetworkSecret([3; 32]);
    let keys = net.derive();
    let forged = NodeSecret::from_bytes([99; 32]);
    let session = forged.relay_session_key(&forged.public(), &relay.public_key());
    let bucket = ts(&relay, now) / admission::COOKIE_BUCKET.as_millis() as u64;
    const FLOOD: u32 = 100_000;
    let body = {
        let req = RelayRequest::Register {
            network: keys.network_id,
            ts_ms: ts(&relay, now),
            announcement: vec![0; 8],
        };
        let d = admission::seal_request(
            &session,
            forged.public(),
            &relay.public_key(),
            &keys.signing,
            [0; 16],
            &req,
            [1; 24],
        );
        d[wire::RELAY_OVERHEAD + admission::COOKIE_LEN..].to_vec()
    };
    let flood_time = Duration::from_secs(1);
    for with_cookie in [false, true] {
        for i in 0..FLOOD {
            let at = now + flood_time * i / FLOOD;
            let from = SocketAddr::from((
                std::net::Ipv6Addr::from(
                    0x2001_0db8_0000_0000_0000_0000_0000_0000u128 + (u128::from(i) << 64),
                ),
                4000,
            ));
            // The second wave comes from an attacker that really receives at all those
            // addresses (and so echoes valid cookies), each a fresh source with a full bucket.
            let cookie = if with_cookie {
                relay.cookies.cookie(from, bucket)
            } else {
                [0; 16]
            };
            let mut key = [0u8; 32];
            key[..4].copy_from_slice(&i.to_be_bytes());
            // Forged bodies: the attacker has no session key for any of these keys.
            let d = Frame::ToRelay {
                sender: PeerKey(key),
                cookie,
                sealed: &body,
            }
            .to_vec();
            relay.handle_datagram(at, Link::Udp(from), &d);
            while let Some(t) = relay.poll_transmit() {
                assert!(t.payload.len() <= d.len());
            }
        }
        let c = relay.counters();
        println!("after {FLOOD} forged requests (cookies: {with_cookie}): {c:?}");
        if !with_cookie {
            assert_eq!(
                c.expensive_ops, 0,
                "unproven sources cost no expensive work"
            );
            assert_eq!(c.cookie_replies, u64::from(FLOOD));
        } else {
            // Each request costs one X25519 (then fails to open under the forged key).
            assert!(c.expensive_ops <= 100 + 100 * 2 + 1, "{c:?}");
            assert!(
                c.global_budget_exceeded > 0 && c.source_table_full > 0,
                "{c:?}"
            );
        }
    }
    // The flood is over: a real member gets in once the budgets refilled and housekeeping
    // forgot the idle sources.
    let later = now + HOUSEKEEPING_INTERVAL + Duration::from_secs(1);
    relay.handle_timeout(later);
    let mut a = Client::new(10, 1000, &net);
    let req = a.register(&relay, later);
    assert!(matches!(
        a.send(&mut relay, later, &req).first(),
        Some(RelayReply::RegisterAck { .. })
    ));
}

#[test]
fn a_registrant_with_only_the_network_id_is_refused_and_learns_nothing() {
    let now = Instant::now();
    let mut relay = relay(now, 7);
    let net = NetworkSecret([3; 32]);
    let mut member = Client::new(10, 1000, &net);
    let req = member.register(&relay, now);
    member.send(&mut relay, now, &req);
    // The intruder saw the network id on the wire; it signs with a key of its own.
    let mut intruder = Client::new(66, 6666, &NetworkSecret([66; 32]));
    intruder.keys.network_id = member.keys.network_id;
    let d = intruder.datagram(&relay, &intruder.register(&relay, now));
    relay.handle_datagram(now, intruder.link, &d);
    let mut seen = Vec::new();
    let mut resend = None;
    while let Some(t) = relay.poll_transmit() {
        assert_eq!(t.link, intruder.link, "nobody else hears of it");
        if let Ok(Frame::CookieReply { echo, cookie }) = Frame::parse(&t.payload) {
            let session = intruder.session(&relay);
            resend = intruder.admission.handle_cookie_reply(
                echo,
                cookie,
                &session,
                intruder.secret.public(),
                [0x42; 24],
            );
        }
        seen.push(t);
    }
    relay.handle_datagram(now, intruder.link, &resend.expect("cookie answered"));
    let sync = RelayRequest::Sync {
        network: member.keys.network_id,
        ts_ms: ts(&relay, now) + 1,
    };
    let d = intruder.datagram(&relay, &sync);
    relay.handle_datagram(now, intruder.link, &d);
    while let Some(t) = relay.poll_transmit() {
        seen.push(t);
    }
    assert_eq!(seen.len(), 1, "only the cookie reply: {seen:?}");
    assert_eq!(relay.member_count(), 1);
    assert_eq!(relay.counters().bad_signature, 1);
    assert!(member.drain(&mut relay, now).is_empty());
}

#[test]
fn captured_registrations_are_refused_after_a_restart_and_from_another_address() {
    let now = Instant::now();
    let net = NetworkSecret([3; 32]);
    let mut relay1 = relay(now, 7);
    let mut member = Client::new(10, 1000, &net);
    // Capture the member's registration that carries the cookie.
    let first = member.datagram(&relay1, &member.register(&relay1, now));
    relay1.handle_datagram(now, member.link, &first);
    let Some(Transmit { payload, .. }) = relay1.poll_transmit() else {
        panic!("cookie reply")
    };
    let Ok(Frame::CookieReply { echo, cookie }) = Frame::parse(&payload) else {
        panic!("cookie reply")
    };
    let session = member.session(&relay1);
    let captured = member
        .admission
        .handle_cookie_reply(echo, cookie, &session, member.secret.public(), [5; 24])
        .expect("re-sent");

    // Raced ahead of the real one from another address: only a cookie reply to that address.
    let attacker = Link::Udp("192.0.2.66:4000".parse().expect("lit"));
    relay1.handle_datagram(now, attacker, &captured);
    let t = relay1.poll_transmit().expect("cookie reply");
    assert!(matches!(
        Frame::parse(&t.payload),
        Ok(Frame::CookieReply { .. })
    ));
    assert!(t.payload.len() <= captured.len());
    assert!(relay1.poll_transmit().is_none());
    assert_eq!(relay1.member_count(), 0);
    // The real one still gets in.
    relay1.handle_datagram(now, member.link, &captured);
    assert!(matches!(
        member.drain(&mut relay1, now).first(),
        Some(RelayReply::RegisterAck { .. })
    ));
    assert_eq!(relay1.member_count(), 1);

    // The relay restarts (a new cookie secret): the capture is refused even from the member's
    // own address, within the clock window.
    let soon = now + Duration::from_secs(1);
    let mut relay2 = RelayServer::new(
        NodeSecret::from_bytes([1; 32]),
        8,
        UnixClock {
            at: soon,
            unix_ms: T0_MS + 1_000,
        },
    );
    relay2.handle_datagram(soon, member.link, &captured);
    let t = relay2.poll_transmit().expect("cookie reply");
    assert!(matches!(
        Frame::parse(&t.payload),
        Ok(Frame::CookieReply { .. })
    ));
    assert!(relay2.poll_transmit().is_none());
    assert_eq!(relay2.member_count(), 0);
    assert_eq!(relay2.counters().expensive_ops, 0);
}

#[test]
fn cookies_expire() {
    let now = Instant::now();
    let mut relay = relay(now, 7);
    let net = NetworkSecret([3; 32]);
    let bucket0 = T0_MS / admission::COOKIE_BUCKET.as_millis() as u64;
    let cases = [
        (Duration::ZERO, true),
        (admission::COOKIE_BUCKET, true),
        (admission::COOKIE_BUCKET * 2, false),
    ];
    for (i, (after, accepted)) in cases.into_iter().enumerate() {
        let at = now + after;
        let c = Client::new(10 + i as u8, 1000, &net);
        // A cookie the relay handed this address at the start.
        let cookie = relay.cookies.cookie(c.link.addr(), bucket0);
        let d = admission::seal_request(
            &c.session(&relay),
            c.secret.public(),
            &relay.public_key(),
            &c.keys.signing,
            cookie,
            &c.register(&relay, at),
            [7; 24],
        );
        relay.handle_datagram(at, c.link, &d);
        let t = relay.poll_transmit().expect("an answer");
        let is_cookie = matches!(Frame::parse(&t.payload), Ok(Frame::CookieReply { .. }));
        assert_eq!(!is_cookie, accepted, "after {after:?}");
        while relay.poll_transmit().is_some() {}
    }
    assert_eq!(relay.member_count(), 2);
}

#[test]
fn timestamps_outside_the_clock_window_are_refused() {
    let now = Instant::now();
    let mut relay = relay(now, 7);
    let mut a = Client::new(10, 1000, &NetworkSecret([3; 32]));
    for skew in [CLOCK_WINDOW + Duration::from_secs(1)] {
        for ts_ms in [
            T0_MS - skew.as_millis() as u64,
            T0_MS + skew.as_millis() as u64,
        ] {
            let req = RelayRequest::Register {
                network: a.keys.network_id,
                ts_ms,
                announcement: vec![],
            };
            assert!(a.send(&mut relay, now, &req).is_empty());
        }
    }
    assert_eq!(relay.counters().clock_skew, 2);
    assert_eq!(relay.member_count(), 0);
}

#[test]
fn caps_hold() {
    let now = Instant::now();
    let config = ServerConfig {
        max_members: 3,
        max_members_per_network: 2,
        max_networks: 2,
        ..ServerConfig::default()
    };
    let mut relay = relay(now, 7).with_config(config);
    let (n1, n2, n3) = (
        NetworkSecret([3; 32]),
        NetworkSecret([4; 32]),
        NetworkSecret([5; 32]),
    );
    let mut outcomes = Vec::new();
    for (i, net) in [&n1, &n1, &n1, &n2, &n3, &n2].into_iter().enumerate() {
        let mut c = Client::new(10 + i as u8, 1000, net);
        let req = c.register(&relay, now);
        let replies = c.send(&mut relay, now, &req);
        outcomes.push(match replies.first() {
            Some(RelayReply::RegisterAck { .. }) => "ok".to_string(),
            Some(RelayReply::Error { message }) => message.clone(),
            other => format!("{other:?}"),
        });
    }
    assert_eq!(
        outcomes,
        [
            "ok",
            "ok",
            "network is full on this relay",
            "ok",
            "relay is full (networks)",
            "relay is full (members)"
        ]
    );
    assert_eq!(relay.member_count(), 3);
    let c = relay.counters();
    assert_eq!(
        (
            c.network_member_cap_reached,
            c.network_cap_reached,
            c.member_cap_reached
        ),
        (1, 1, 1)
    );
}

#[test]
fn syncs_are_rate_limited_per_member() {
    let now = Instant::now();
    let mut relay = relay(now, 7);
    let mut a = Client::new(10, 1000, &NetworkSecret([3; 32]));
    let req = a.register(&relay, now);
    a.send(&mut relay, now, &req);
    let mut answered = 0;
    for i in 1..=20 {
        let sync = RelayRequest::Sync {
            network: a.keys.network_id,
            ts_ms: ts(&relay, now) + i,
        };
        answered += a.send(&mut relay, now, &sync).len();
    }
    assert_eq!(answered, SYNC_BURST as usize);
    assert_eq!(relay.counters().sync_rate_exceeded, 20 - SYNC_BURST as u64);
}

#[test]
fn stun_and_key_requests_without_amplification() {
    let now = Instant::now();
    let mut relay = relay(now, 7);
    let from = Link::Udp("203.0.113.7:5555".parse().expect("lit"));
    relay.handle_datagram(now, from, &stun::binding_request([9; 12]));
    let t = relay.poll_transmit().expect("stun answer");
    assert_eq!(
        stun::parse(&t.payload),
        Some(stun::Binding::Response {
            tx: [9; 12],
            mapped: from.addr()
        })
    );
    relay.handle_datagram(now, from, &Frame::KeyRequest.to_vec());
    assert!(
        relay.poll_transmit().is_none(),
        "a short key request is not answered"
    );
    let mut padded = Frame::KeyRequest.to_vec();
    padded.resize(wire::RELAY_OVERHEAD, 0);
    relay.handle_datagram(now, from, &padded);
    let t = relay.poll_transmit().expect("key answer");
    assert_eq!(
        Frame::parse(&t.payload),
        Ok(Frame::KeyResponse {
            relay: relay.public_key()
        })
    );
    for garbage in [
        &b""[..],
        b"\xff",
        b"\x01\x00\x00\x00garbage",
        b"\xffm\x02\x10short",
    ] {
        relay.handle_datagram(now, from, garbage);
    }
    assert!(relay.poll_transmit().is_none());
}

#[test]
fn key_response_names_the_tls_endpoint_only_to_a_request_as_large() {
    use crate::wire::token::KEY_REQUEST_WITH_TLS_LEN;
    let now = Instant::now();
    let tls = TlsEndpoint {
        port: 443,
        path: "/behind/proxy".into(),
    };
    let mut relay = relay(now, 1).with_tls_endpoint(Some(tls.clone()));
    let from = Link::Udp("198.51.100.7:4000".parse().expect("lit"));
    let mut padded = Frame::KeyRequest.to_vec();
    padded.resize(wire::RELAY_OVERHEAD, 0);
    relay.handle_datagram(now, from, &padded);
    let t = relay.poll_transmit().expect("key answer");
    assert_eq!(
        t.payload.len(),
        wire::RELAY_OVERHEAD,
        "no tail to a short request"
    );
    padded.resize(KEY_REQUEST_WITH_TLS_LEN, 0);
    relay.handle_datagram(now, from, &padded);
    let t = relay.poll_transmit().expect("key answer");
    assert!(t.payload.len() <= padded.len());
    assert_eq!(
        Frame::parse(&t.payload),
        Ok(Frame::KeyResponse {
            relay: relay.public_key()
        })
    );
    assert_eq!(
        TlsEndpoint::decode(&t.payload[wire::RELAY_OVERHEAD..]),
        Some(tls)
    );
}

impl Client {
    pub(super) fn refresh(&self, relay: &RelayServer, now: Instant, after_ms: u32) -> RelayRequest {
        RelayRequest::Refresh {
            network: self.keys.network_id,
            ts_ms: ts(relay, now),
            answer_after_ms: after_ms,
        }
    }
}

#[test]
fn refreshes_keep_a_member_and_are_answered_after_the_delay_asked_for() {
    let t0 = Instant::now();
    let mut relay = relay(t0, 7);
    let net = NetworkSecret([3; 32]);
    let (mut a, mut b) = (Client::new(10, 1000, &net), Client::new(11, 1001, &net));
    let req = a.register(&relay, t0);
    a.send(&mut relay, t0, &req);
    let req = b.register(&relay, t0);
    b.send(&mut relay, t0, &req);
    a.drain(&mut relay, t0);

    // A refresh without a delay is acknowledged at once, and carries no announcement.
    let t1 = t0 + Duration::from_secs(10);
    let req = a.refresh(&relay, t1, 0);
    let d = a.datagram(&relay, &req);
    let full = a.datagram(&relay, &a.register(&relay, t1));
    assert!(d.len() < full.len(), "{} vs {}", d.len(), full.len());
    relay.handle_datagram(t1, a.link, &d);
    let echo = ts(&relay, t1);
    assert!(matches!(
        a.drain(&mut relay, t1)[..],
        [RelayReply::RegisterAck { echo_ts_ms, .. }] if echo_ts_ms == echo
    ));
    assert_eq!(relay.counters().refreshes, 1);

    // A refresh asking for 100 s: nothing at once, the answer at 100 s, and a kept alive
    // well beyond the member TTL meanwhile.
    let t2 = t1 + Duration::from_secs(1);
    let req = a.refresh(&relay, t2, 100_000);
    assert!(a.send(&mut relay, t2, &req).is_empty());
    let mut now = t2;
    let due = t2 + Duration::from_secs(100);
    while let Some(at) = relay.poll_timeout().filter(|at| *at < due) {
        now = at;
        relay.handle_timeout(now);
        // b refreshes as an active member would, so only a's silence is tested.
        let req = b.refresh(&relay, now, 0);
        b.send(&mut relay, now, &req);
        assert!(
            a.drain(&mut relay, now).is_empty(),
            "nothing for a before {due:?}"
        );
    }
    assert!(now >= t2 + MEMBER_TTL, "a outlived the plain member TTL");
    assert_eq!(relay.member_count(), 2);
    relay.handle_timeout(due);
    let echo = ts(&relay, t2);
    assert!(matches!(
        a.drain(&mut relay, due)[..],
        [RelayReply::RegisterAck { echo_ts_ms, ttl_s, .. }] if echo_ts_ms == echo && u64::from(ttl_s) <= MEMBER_TTL.as_secs()
    ));
    assert_eq!(relay.counters().delayed_answers, 1);
    // Without a further refresh, a expires a member TTL after the answer.
    let req = b.refresh(&relay, due, 0);
    b.send(&mut relay, due, &req);
    let req = b.refresh(&relay, due + MEMBER_TTL, 0);
    b.send(&mut relay, due + MEMBER_TTL, &req);
    relay.handle_timeout(due + MEMBER_TTL);
    assert_eq!(relay.member_count(), 1);
    assert!(relay.member(&a.secret.public()).is_none(), "a expired");

    // A newer refresh replaces a pending delayed answer: only the newest is answered.
    let t3 = due + MEMBER_TTL;
    let req = b.refresh(&relay, t3 + Duration::from_millis(1), 50_000);
    b.send(&mut relay, t3, &req);
    let req = b.refresh(&relay, t3 + Duration::from_millis(2), 20_000);
    b.send(&mut relay, t3, &req);
    relay.handle_timeout(t3 + Duration::from_secs(60));
    let answers = b.drain(&mut relay, t3 + Duration::from_secs(60));
    assert_eq!(answers.len(), 1, "{answers:?}");
}

#[test]
fn a_refresh_from_a_member_not_held_there_asks_it_to_register() {
    let t0 = Instant::now();
    let mut relay = relay(t0, 7);
    let net = NetworkSecret([3; 32]);
    let mut a = Client::new(10, 1000, &net);
    // Never registered (a relay that restarted): told to register, in fewer bytes than asked.
    let req = a.refresh(&relay, t0, 60_000);
    let d = a.datagram(&relay, &req);
    relay.handle_datagram(t0, a.link, &d);
    let mut sizes = Vec::new();
    let mut replies = Vec::new();
    while let Some(t) = relay.poll_transmit() {
        sizes.push(t.payload.len());
        relay.transmits.push_front(t);
        replies.extend(a.drain(&mut relay, t0));
    }
    assert!(
        sizes.iter().all(|s| *s <= d.len()),
        "{sizes:?} vs {}",
        d.len()
    );
    let echo = ts(&relay, t0);
    assert!(
        matches!(replies[..], [RelayReply::Unregistered { echo_ts_ms }] if echo_ts_ms == echo),
        "{replies:?}"
    );
    assert_eq!(relay.member_count(), 0);
    assert_eq!(relay.counters().unregistered_refreshes, 1);

    // Registered, then the same key refreshes from another address (a new NAT mapping):
    // the relay does not move the member there on a refresh, it asks for a registration.
    let t1 = t0 + Duration::from_secs(1);
    let req = a.register(&relay, t1);
    a.send(&mut relay, t1, &req);
    assert_eq!(relay.member_count(), 1);
    let home = a.link;
    a.link = Link::Udp(SocketAddr::from(([198, 51, 100, 99], 4000)));
    let t2 = t1 + Duration::from_secs(1);
    let req = a.refresh(&relay, t2, 0);
    let moved = a.send(&mut relay, t2, &req);
    assert!(
        matches!(moved[..], [RelayReply::Unregistered { .. }]),
        "{moved:?}"
    );
    assert_eq!(
        relay.by_link.get(&home),
        Some(&a.secret.public()),
        "still at home"
    );

    // A captured refresh played again, from anywhere, is refused as a replay.
    let t3 = t2 + Duration::from_secs(1);
    a.link = home;
    let req = a.refresh(&relay, t3, 0);
    let captured = a.datagram(&relay, &req);
    relay.handle_datagram(t3, home, &captured);
    assert_eq!(a.drain(&mut relay, t3).len(), 1);
    let replayed = relay.counters().replayed;
    relay.handle_datagram(t3, home, &captured);
    relay.handle_datagram(
        t3,
        Link::Udp(SocketAddr::from(([203, 0, 113, 5], 1))),
        &captured,
    );
    assert_eq!(relay.counters().replayed, replayed + 2);
    assert!(relay.poll_transmit().is_none(), "nothing answers a replay");
}
