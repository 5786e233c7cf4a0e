//! One member's state machine fed a sequence of steps (see `meshvpn_fuzz::steps`): raw
//! datagrams from a few addresses, relay replies and member announcements sealed with the
//! right keys (any plaintext), disco messages from known members (direct or relayed), relayed
//! payloads, TUN packets, driver calls (the relay stream coming up, going down, carrying
//! datagrams), time passing on a synthetic clock, cookie replies answering the node's latest
//! signed request to the relay, and IP packets that known members send through real WireGuard
//! sessions (the harness runs a boringtun `Tunn` per member and answers the node's handshakes,
//! so the fuzzer reaches the decrypted-packet checks). Nothing panics, and only holders of the
//! network's control key become peers.
#![no_main]
// The synthetic clock starts at a real `Instant` (the type has no other constructor); every
// later time is that start plus what the input says.
#![allow(clippy::disallowed_methods)]

use std::time::{Duration, Instant};

use boringtun::noise::{Tunn, TunnResult};
use libfuzzer_sys::fuzz_target;
use meshvpn::keys::PeerKey;
use meshvpn::node::{Node, NodeConfig, RelayTarget, StreamKind, Transport};
use meshvpn::wire::admission::{echo_of, ECHO_LEN};
use meshvpn::wire::plain::decode_announcement;
use meshvpn::wire::{
    classify, seal_from_relay, DatagramKind, Frame, MemberEntry, RelayReply, SyncTag,
};
use meshvpn_fuzz::{addr, fixture, kind, relay_addr, sealed_frame, steps, MEMBERS, START_UNIX_MS};

fuzz_target!(|data: &[u8]| {
    let fx = fixture();
    let start = Instant::now();
    let mut now = start;
    let cfg = NodeConfig {
        secret: fx.node.clone(),
        network_secret: fx.network.clone(),
        network_name: "fuzz".into(),
        name: "under-test".into(),
        virtual_ip: "10.77.0.2".parse().expect("literal"),
        subnet: "10.77.0.0/16".parse().expect("literal"),
        relays: vec![RelayTarget {
            key: fx.relay.public(),
            addr: relay_addr(),
            // A relay with a TLS endpoint, so the stream kinds alternate too.
            tls: true,
        }],
        stun_servers: Vec::new(),
        seed: 3,
        relay_for_peers: true,
    };
    let mut node = Node::new(cfg, now, START_UNIX_MS);
    let relay_key = fx.relay.public();
    let mut wg = WireGuardPeers::new();
    for (n, step) in steps(data).into_iter().enumerate() {
        let n = n as u64;
        match step.kind % 10 {
            0 => {
                let socket = u16::from(step.from >> 6);
                node.handle_udp_on(now, socket, addr(step.from), &step.bytes);
            }
            1 => {
                let datagram = sealed_frame(
                    kind::FROM_RELAY,
                    &fx.node_session,
                    relay_key,
                    &step.bytes,
                    n,
                );
                if step.from & 0x40 != 0 {
                    node.handle_relay_stream(now, 0, &datagram);
                } else if step.from & 0x80 == 0 {
                    node.handle_udp(now, relay_addr(), &datagram);
                } else {
                    node.handle_udp(now, addr(step.from), &datagram);
                }
            }
            2 => {
                // A live push of member `from`'s announcement: [seq u64][announcement body].
                let (_, key) = fx.member(step.from);
                let (seq, body) = step.bytes.split_at(step.bytes.len().min(8));
                let mut seq8 = [0u8; 8];
                seq8[..seq.len()].copy_from_slice(seq);
                let announcement = match decode_announcement(key, body) {
                    Ok(a) => a.seal(&fx.keys.control_key, &fx.keys.network_id, [n as u8; 24]),
                    Err(_) => body.to_vec(),
                };
                let reply = RelayReply::Member {
                    tag: SyncTag {
                        generation: 0,
                        index: 0,
                        total: 1,
                        seq: u64::from_be_bytes(seq8),
                    },
                    entry: MemberEntry {
                        key,
                        observed: addr(step.from >> 2),
                        announcement,
                        // The claim start rides on the change counter the fuzzer chose.
                        since: u64::from_be_bytes(seq8),
                    },
                };
                let datagram = seal_from_relay(&fx.node_session, relay_key, &reply, [1; 24]);
                node.handle_udp(now, relay_addr(), &datagram);
            }
            3 => {
                let (i, key) = fx.member(step.from);
                let disco = sealed_frame(kind::DISCO, &fx.disco[i], key, &step.bytes, n);
                if step.from & 0x80 == 0 {
                    node.handle_udp(now, addr(step.from >> 2), &disco);
                } else {
                    let relayed = Frame::RelayRecv {
                        from: key,
                        payload: &disco,
                    };
                    node.handle_udp(now, relay_addr(), &relayed.to_vec());
                }
            }
            4 => {
                let (_, from) = fx.member(step.from);
                let relayed = Frame::RelayRecv {
                    from,
                    payload: &step.bytes,
                };
                node.handle_udp(now, relay_addr(), &relayed.to_vec());
            }
            5 => node.handle_tun_packet(now, &step.bytes),
            6 => {
                let ms = step
                    .bytes
                    .get(..2)
                    .map_or(250, |b| u64::from(u16::from_be_bytes([b[0], b[1]])));
                now += Duration::from_millis(ms * (1 + u64::from(step.from % 32)));
                node.handle_timeout(now);
            }
            7 => driver_call(&mut node, now, step.from, &step.bytes),
            8 => {
                let (i, _) = fx.member(step.from);
                let via_relay = step.from & 0x80 != 0;
                wg.send(&mut node, now, i, via_relay, &step.bytes);
            }
            _ => {
                // The relay's cookie reply: [cookie 16][echo 16, only with `from` bit 7].
                let mut cookie = [0u8; 16];
                let n = step.bytes.len().min(16);
                cookie[..n].copy_from_slice(&step.bytes[..n]);
                let echo = match step.bytes.get(16..16 + ECHO_LEN) {
                    Some(e) if step.from & 0x80 != 0 => e.try_into().unwrap_or_default(),
                    _ => wg.last_echo,
                };
                let reply = Frame::CookieReply { echo, cookie }.to_vec();
                if step.from & 0x40 != 0 {
                    node.handle_relay_stream(now, 0, &reply);
                } else {
                    node.handle_udp(now, relay_addr(), &reply);
                }
            }
        }
        wg.answer(&mut node, now);
        while node.poll_tun(&mut wg.out).is_some() {}
        while node.poll_event().is_some() {}
        assert!(
            node.peer_keys().count() <= MEMBERS,
            "a stranger became a peer"
        );
        let _ = node.poll_timeout();
    }
    let status = node.status(now);
    let _ = serde_json::to_string(&status);
});

/// The members' ends of their WireGuard sessions with the node under test. Member `i` is
/// reached directly at `addr(2 + i)` (the endpoint its seed announcement names) or through the
/// relay; everything else the node sends is dropped.
struct WireGuardPeers {
    tunnels: Vec<Tunn>,
    buf: Vec<u8>,
    /// What the node's latest request to the relay asks a cookie reply to echo.
    last_echo: [u8; ECHO_LEN],
    /// The node's output (datagrams and TUN packets; `buf` stays full size for boringtun).
    out: Vec<u8>,
}

impl WireGuardPeers {
    fn new() -> Self {
        let fx = fixture();
        let node_key = fx.node.public().to_public();
        let tunnels = (0..MEMBERS)
            .map(|i| {
                let secret = fx.members[i].to_static();
                let psk = Some(fx.keys.preshared_key);
                Tunn::new(secret, node_key, psk, None, i as u32 + 1, None)
            })
            .collect();
        Self {
            tunnels,
            buf: vec![0u8; 65_535 + 64],
            last_echo: [0; ECHO_LEN],
            out: Vec::new(),
        }
    }

    /// Member `i` sends the IP packet `packet` to the node.
    fn send(&mut self, node: &mut Node, now: Instant, i: usize, via_relay: bool, packet: &[u8]) {
        let datagram = match self.tunnels[i].encapsulate(packet, &mut self.buf) {
            TunnResult::WriteToNetwork(d) => d.to_vec(),
            _ => return,
        };
        deliver(node, now, i, via_relay, &datagram);
    }

    /// Feeds what the node sent to members into their tunnels and delivers the answers, for a
    /// few rounds (a handshake takes two).
    fn answer(&mut self, node: &mut Node, now: Instant) {
        let fx = fixture();
        for _ in 0..4 {
            let mut inbound = Vec::new();
            while let Some(t) = node.poll_transmit(&mut self.out) {
                let payload = &self.out[..t.len];
                let (to_relay, direct) = match t.transport {
                    Transport::Udp { dst, .. } => (
                        dst == relay_addr(),
                        (0..MEMBERS).find(|i| addr(2 + *i as u8) == dst),
                    ),
                    Transport::Stream { .. } => (true, None),
                };
                if let Some(i) = direct {
                    if classify(payload) == DatagramKind::WireGuard {
                        inbound.push((i, false, payload.to_vec()));
                    }
                } else if to_relay {
                    match Frame::parse(payload) {
                        Ok(Frame::RelaySend { to, payload }) => {
                            let member = (0..MEMBERS).find(|i| fx.members[*i].public() == to);
                            if let Some(i) =
                                member.filter(|_| classify(payload) == DatagramKind::WireGuard)
                            {
                                inbound.push((i, true, payload.to_vec()));
                            }
                        }
                        Ok(Frame::ToRelay { sealed, .. }) => {
                            if let Some(echo) = echo_of(sealed) {
                                self.last_echo = echo;
                            }
                        }
                        _ => {}
                    }
                }
            }
            if inbound.is_empty() {
                break;
            }
            for (i, via_relay, datagram) in inbound {
                let mut input = datagram;
                loop {
                    let from = Some(node_addr().ip());
                    let out = match self.tunnels[i].decapsulate(from, &input, &mut self.buf) {
                        TunnResult::WriteToNetwork(d) => d.to_vec(),
                        _ => break,
                    };
                    deliver(node, now, i, via_relay, &out);
                    // boringtun flushes queued packets on repeated calls with empty input.
                    input = Vec::new();
                }
            }
        }
        while node.poll_transmit(&mut self.out).is_some() {}
    }
}

/// Where the members see the node under test.
fn node_addr() -> std::net::SocketAddr {
    "203.0.113.30:40000".parse().expect("literal")
}

/// Delivers a WireGuard datagram from member `i` to the node, directly or through the relay.
fn deliver(node: &mut Node, now: Instant, i: usize, via_relay: bool, datagram: &[u8]) {
    let key: PeerKey = fixture().members[i].public();
    if via_relay {
        let frame = Frame::RelayRecv {
            from: key,
            payload: datagram,
        };
        node.handle_udp(now, relay_addr(), &frame.to_vec());
    } else {
        node.handle_udp(now, addr(2 + i as u8), datagram);
    }
}

/// The calls a driver makes besides delivering datagrams.
fn driver_call(node: &mut Node, now: Instant, which: u8, bytes: &[u8]) {
    let fx = fixture();
    match which % 6 {
        0 => {
            let endpoints = bytes.iter().map(|b| addr(*b)).collect();
            node.set_local_endpoints(now, endpoints);
        }
        1 => match bytes.split_first() {
            Some((b, _)) if b % 3 == 0 => {
                let kind = if b & 0x10 == 0 {
                    StreamKind::Tcp
                } else {
                    StreamKind::Tls
                };
                node.handle_relay_stream_up(now, 0, kind)
            }
            Some((b, rest)) if b % 3 == 1 => node.handle_relay_stream(now, 0, rest),
            _ => node.handle_relay_stream_down(now, 0),
        },
        2 => {
            let mapping = bytes.first().map(|b| ("upnp".to_string(), addr(*b)));
            node.set_port_mapping(now, mapping);
        }
        3 => {
            let (_, key) = fx.member(bytes.first().copied().unwrap_or(0));
            let _ = node.ping_peer(now, &key, 1);
        }
        4 => {
            let _ = node.find_peer(&String::from_utf8_lossy(bytes));
            let _ = node.active_sockets();
        }
        _ => node.leave(now),
    }
}
