//! One member's state machine fed a sequence of steps (see `meshvpn_fuzz::steps`): raw
//! datagrams from a few addresses, relay replies and member announcements sealed with the
//! right keys (any plaintext), disco messages from known members (direct or relayed), relayed
//! payloads, TUN packets, driver calls, time passing on a synthetic clock, and IP packets that
//! known members send through real WireGuard sessions (the harness runs a boringtun `Tunn` per
//! member and answers the node's handshakes, so the fuzzer reaches the decrypted-packet checks).
//! Nothing panics, and only holders of the network's control key become peers.
#![no_main]

use std::time::{Duration, Instant};

use boringtun::noise::{Tunn, TunnResult};
use libfuzzer_sys::fuzz_target;
use meshvpn::keys::PeerKey;
use meshvpn::node::{Node, NodeConfig, RelayTarget};
use meshvpn::wire::plain::decode_announcement;
use meshvpn::wire::{
    classify, seal_from_relay, DatagramKind, Frame, MemberEntry, RelayReply, SyncTag,
};
use meshvpn_fuzz::{addr, fixture, kind, relay_addr, sealed_frame, steps, MEMBERS};

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
        relay: RelayTarget {
            key: fx.relay.public(),
            addr: relay_addr(),
        },
        stun_servers: Vec::new(),
        seed: 3,
    };
    let mut node = Node::new(cfg, now, 1_700_000_000_000);
    let relay_key = fx.relay.public();
    let mut wg = WireGuardPeers::new();
    for (n, step) in steps(data).into_iter().enumerate() {
        let n = n as u64;
        match step.kind % 9 {
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
                let from = if step.from & 0x80 == 0 {
                    relay_addr()
                } else {
                    addr(step.from)
                };
                node.handle_udp(now, from, &datagram);
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
            _ => {
                let (i, _) = fx.member(step.from);
                let via_relay = step.from & 0x80 != 0;
                wg.send(&mut node, now, i, via_relay, &step.bytes);
            }
        }
        wg.answer(&mut node, now);
        while node.poll_tun().is_some() {}
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
            while let Some(t) = node.poll_transmit() {
                let direct = (0..MEMBERS).find(|i| addr(2 + *i as u8) == t.dst);
                if let Some(i) = direct {
                    if classify(&t.payload) == DatagramKind::WireGuard {
                        inbound.push((i, false, t.payload));
                    }
                } else if t.dst == relay_addr() {
                    if let Ok(Frame::RelaySend { to, payload }) = Frame::parse(&t.payload) {
                        let member = (0..MEMBERS).find(|i| fx.members[*i].public() == to);
                        if let Some(i) =
                            member.filter(|_| classify(payload) == DatagramKind::WireGuard)
                        {
                            inbound.push((i, true, payload.to_vec()));
                        }
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
        while node.poll_transmit().is_some() {}
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
        1 => node.set_relay_over_tcp(now, bytes.first().is_some_and(|b| b & 1 == 1)),
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
