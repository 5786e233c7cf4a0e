//! Writes the seed corpora under `fuzz/corpus/<target>/` from meshvpn's real encoders, so that
//! every target starts from valid messages and mutates from there.
//!
//! Run from `fuzz/`: `cargo run --example make_corpus` (it overwrites the `seed-*` files).

use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;

use meshvpn::config::Config;
use meshvpn::control::Request;
use meshvpn::keys::{NetworkSecret, NodeSecret, PeerKey};
use meshvpn::relay::tcp::write_frame;
use meshvpn::wire::admission::seal_request;
use meshvpn::wire::plain::{
    encode_announcement, encode_disco, encode_relay_reply, encode_relay_request,
};
use meshvpn::wire::rotation::Handover;
use meshvpn::wire::token::{RelayEndpoint, Token};
use meshvpn::wire::{
    frame_aad, open, seal_disco, stun, Announcement, Disco, DiscoStamp, Frame, MemberEntry,
    NatKind, RelayReply, RelayRequest, RotationEntry, SyncTag,
};
use meshvpn_fuzz::{encode_steps, fixture, kind, nonce, Step};

fn main() -> std::io::Result<()> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus");
    let seeds: Vec<(&str, Vec<Vec<u8>>)> = vec![
        (
            "token",
            tokens().iter().map(|t| t.encode().into_bytes()).collect(),
        ),
        ("relay_endpoint", relay_endpoints()),
        ("classify", datagrams()),
        ("frame", frames()),
        ("relay_request", signed_requests()),
        (
            "relay_reply",
            replies().iter().map(encode_relay_reply).collect(),
        ),
        (
            "disco",
            discos()
                .iter()
                .map(|d| {
                    encode_disco(
                        DiscoStamp {
                            ts_ms: 1_700_000_000_000,
                            nonce: 7,
                        },
                        d,
                    )
                })
                .collect(),
        ),
        (
            "announcement",
            announcements().iter().map(encode_announcement).collect(),
        ),
        ("stun", stun_messages()),
        ("tcp_frame", tcp_streams()),
        ("control_request", control_lines()),
        ("config", configs()),
        ("relay_server", relay_sessions()),
        ("node", node_sessions()),
    ];
    for (target, files) in seeds {
        let dir = root.join(target);
        std::fs::create_dir_all(&dir)?;
        for (i, bytes) in files.iter().enumerate() {
            std::fs::write(dir.join(format!("seed-{i}")), bytes)?;
        }
        println!("{target}: {} seeds", files.len());
    }
    Ok(())
}

fn sock(text: &str) -> SocketAddr {
    text.parse().expect("seed addresses are literals")
}

fn tokens() -> Vec<Token> {
    let relay = |b: u8, host: &str, port| RelayEndpoint {
        key: PeerKey([b; 32]),
        host: host.into(),
        port,
        tls: None,
    };
    vec![
        Token {
            network: "friends".into(),
            secret: NetworkSecret([0x5a; 32]),
            subnet: "10.147.0.0/16".parse().expect("literal"),
            relays: vec![relay(3, "relay.example.org", 3478)],
        },
        Token {
            network: "lab-2".into(),
            secret: NetworkSecret([1; 32]),
            subnet: "100.64.8.0/24".parse().expect("literal"),
            relays: vec![relay(4, "198.51.100.1", 3478), relay(5, "2001:db8::1", 443)],
        },
    ]
}

fn relay_endpoints() -> Vec<Vec<u8>> {
    tokens()
        .iter()
        .flat_map(|t| t.relays.iter().map(|r| r.to_string().into_bytes()))
        .collect()
}

fn datagrams() -> Vec<Vec<u8>> {
    let fx = fixture();
    vec![
        vec![1, 0, 0, 0, 7, 7, 7, 7],
        stun::binding_request([9; 12]),
        Frame::KeyRequest.to_vec(),
        seal_disco(
            &fx.disco[0],
            fx.members[0].public(),
            DiscoStamp {
                ts_ms: 1_700_000_000_000,
                nonce: 7,
            },
            &Disco::Spray {
                reflexive: sock("203.0.113.9:40000"),
            },
            [2; 24],
        ),
    ]
}

fn frames() -> Vec<Vec<u8>> {
    let key = PeerKey([6; 32]);
    vec![
        Frame::KeyRequest.to_vec(),
        Frame::KeyResponse { relay: key }.to_vec(),
        Frame::ToRelay {
            sender: key,
            cookie: [3; 16],
            sealed: &[1; 40],
        }
        .to_vec(),
        Frame::CookieReply {
            echo: [1; 16],
            cookie: [3; 16],
        }
        .to_vec(),
        Frame::RelaySend {
            to: key,
            payload: &[4, 0, 0, 0, 1],
        }
        .to_vec(),
        Frame::Disco {
            sender: key,
            sealed: &[2; 41],
        }
        .to_vec(),
    ]
}

fn requests() -> Vec<RelayRequest> {
    let network = fixture().keys.network_id;
    vec![
        RelayRequest::Register {
            network,
            ts_ms: 1,
            announcement: vec![0xAB; 60],
        },
        RelayRequest::Leave { network, ts_ms: 2 },
        RelayRequest::Sync { network, ts_ms: 3 },
        RelayRequest::Refresh {
            network,
            ts_ms: 6,
            answer_after_ms: 0,
        },
        RelayRequest::Refresh {
            network,
            ts_ms: 7,
            answer_after_ms: 25_000,
        },
        RelayRequest::Rotate {
            network,
            ts_ms: 4,
            complete: false,
            entries: vec![rotation_entry(); 2],
        },
        RelayRequest::Rotate {
            network,
            ts_ms: 5,
            complete: true,
            entries: Vec::new(),
        },
    ]
}

/// A sealed handover for member 1 of the fixture, under the fixture's network keys.
fn rotation_entry() -> RotationEntry {
    let fx = fixture();
    let handover = Handover {
        secret: NetworkSecret([0x42; 32]),
        rotated_at_ms: 1_700_000_000_000,
    };
    let mut rng = <rand_chacha::ChaCha20Rng as rand_chacha::rand_core::SeedableRng>::seed_from_u64(7);
    RotationEntry::seal(&fx.keys, fx.members[1].public(), &handover, &mut rng)
}

/// The plaintexts the relay opens from `ToRelay` frames (request and signature), as the
/// `relay_request` target seals them: member 0, cookie `[7; 16]`. The last is signed for
/// another relay.
fn signed_requests() -> Vec<Vec<u8>> {
    let fx = fixture();
    let sender = fx.members[0].public();
    let cookie = [7u8; 16];
    let session = &fx.member_sessions[0];
    let mut aad = frame_aad(kind::TO_RELAY, &sender).to_vec();
    aad.extend_from_slice(&cookie);
    let relays = [fx.relay.public(), PeerKey([9; 32])];
    let mut out: Vec<Vec<u8>> = requests().iter().map(encode_relay_request).collect();
    for (i, req) in requests().iter().enumerate() {
        let relay = relays[usize::from(i == 2)];
        let datagram = seal_request(
            session,
            sender,
            &relay,
            &fx.keys.signing,
            cookie,
            req,
            nonce(0),
        );
        if let Ok(Frame::ToRelay { sealed, .. }) = Frame::parse(&datagram) {
            out.extend(open(session, &aad, sealed).ok());
        }
    }
    out
}

fn replies() -> Vec<RelayReply> {
    vec![
        RelayReply::RegisterAck {
            echo_ts_ms: 1_700_000_000_000,
            observed: sock("203.0.113.10:41641"),
            members: 2,
            digest: [0; 8],
            ttl_s: 30,
            since: 1,
        },
        RelayReply::Member {
            tag: SyncTag {
                generation: 1,
                index: 0,
                total: 1,
                seq: 5,
            },
            entry: MemberEntry {
                key: PeerKey([8; 32]),
                observed: sock("[2001:db8::7]:51820"),
                announcement: vec![0xCD; 48],
                since: 5,
            },
        },
        RelayReply::Unregistered { echo_ts_ms: 9 },
        RelayReply::MemberGone {
            key: PeerKey([8; 32]),
            seq: 6,
        },
        RelayReply::SyncEmpty {
            generation: 2,
            seq: 7,
        },
        RelayReply::Error {
            message: "network full".into(),
        },
        RelayReply::RotateAck {
            echo_ts_ms: 1_700_000_000_004,
            stored: 2,
            complete: true,
        },
        RelayReply::Rotated {
            network: fixture().keys.network_id,
            entry: Some(rotation_entry()),
        },
        RelayReply::Rotated {
            network: fixture().keys.network_id,
            entry: None,
        },
    ]
}

fn discos() -> Vec<Disco> {
    vec![
        Disco::Ping { tx: [1; 12] },
        Disco::Pong {
            tx: [1; 12],
            observed: sock("203.0.113.20:50000"),
        },
        Disco::CallMe {
            endpoints: vec![sock("203.0.113.10:41641"), sock("192.168.1.5:51820")],
        },
        Disco::Spray {
            reflexive: sock("203.0.113.9:40000"),
        },
    ]
}

fn announcement(member: usize, ts_ms: u64) -> Announcement {
    let fx = fixture();
    Announcement {
        key: fx.members[member].public(),
        name: format!("member-{member}"),
        virtual_ip: Ipv4Addr::new(10, 77, 1, member as u8 + 1),
        ts_ms,
        endpoints: vec![meshvpn_fuzz::addr(2 + member as u8)],
        nat: NatKind::EndpointIndependent,
    }
}

fn announcements() -> Vec<Announcement> {
    vec![announcement(0, 10), announcement(1, 20)]
}

fn stun_messages() -> Vec<Vec<u8>> {
    vec![
        stun::binding_request([3; 12]),
        stun::binding_response([3; 12], sock("203.0.113.10:41641")),
        stun::binding_response([4; 12], sock("[2001:db8::7]:1")),
    ]
}

fn tcp_streams() -> Vec<Vec<u8>> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("a current-thread runtime without drivers always builds");
    runtime.block_on(async {
        let mut stream = Vec::new();
        for d in [
            stun::binding_request([5; 12]),
            Frame::KeyRequest.to_vec(),
            Vec::new(),
        ] {
            write_frame(&mut stream, &d)
                .await
                .expect("writing to a vector cannot fail");
        }
        vec![stream]
    })
}

fn control_lines() -> Vec<Vec<u8>> {
    [Request::Status, Request::Ping("bob".into()), Request::Down]
        .iter()
        .map(|r| r.to_line().into_bytes())
        .collect()
}

fn configs() -> Vec<Vec<u8>> {
    tokens()
        .iter()
        .enumerate()
        .map(|(i, t)| {
            let key = NodeSecret::from_bytes([i as u8 + 1; 32]);
            let mut config = Config::from_token(t, format!("host-{i}"), key, None, 51820)
                .expect("seed tokens have roomy subnets");
            config.stun_servers = vec!["stun.example.org:3478".into()];
            config.log_level = Some("debug".into());
            config.to_toml().into_bytes()
        })
        .collect()
}

fn step(kind: u8, from: u8, bytes: Vec<u8>) -> Step {
    Step { kind, from, bytes }
}

/// Relay target: two members register from different UDP links (each sends its registration
/// twice: the relay answers the first with a cookie, the harness puts that cookie on the
/// second, which admits it), sync, relay to each other, time passes, one re-registers and
/// leaves; and two members register over TCP (no cookie needed) and one replays a request.
/// Request timestamps are offsets from the relay's clock. Step kinds as in
/// `fuzz_targets/relay_server.rs`.
fn relay_sessions() -> Vec<Vec<u8>> {
    let network = fixture().keys.network_id;
    let register = |ts_ms| {
        encode_relay_request(&RelayRequest::Register {
            network,
            ts_ms,
            announcement: vec![0xAB; 80],
        })
    };
    let session = vec![
        step(1, 2 << 2, register(1)),
        step(1, 2 << 2, register(1)),
        step(1, 1 | (4 << 2), register(1)),
        step(1, 1 | (4 << 2), register(1)),
        step(
            1,
            2 << 2,
            encode_relay_request(&RelayRequest::Sync { network, ts_ms: 2 }),
        ),
        step(2, 2 << 2, [vec![1], vec![1, 0, 0, 0, 9, 9]].concat()),
        step(0, 5, stun::binding_request([7; 12])),
        step(3, 10, 1000u16.to_be_bytes().to_vec()),
        step(1, 1 | (4 << 2), register(2)),
        step(1, 1 | (4 << 2), register(2)),
        step(3, 2, 1000u16.to_be_bytes().to_vec()),
        step(
            1,
            1 | (4 << 2),
            encode_relay_request(&RelayRequest::Leave { network, ts_ms: 3 }),
        ),
    ];
    let tcp = vec![
        step(1, 8 << 2, register(5)),
        step(1, 3 | (9 << 2), register(5)),
        step(1, 3 | (9 << 2), register(5)),
        step(2, 8 << 2, [vec![3], vec![2, 0, 0, 0, 1]].concat()),
        step(4, 8, Vec::new()),
    ];
    vec![encode_steps(&session), encode_steps(&tcp)]
}

/// Node target: the node registers, the relay acknowledges, two members are pushed, a member
/// pings, a packet goes to a member, time passes, a member sends packets through WireGuard
/// (one with another member's source address). Step kinds as in `fuzz_targets/node.rs`.
fn node_sessions() -> Vec<Vec<u8>> {
    let member = |i: usize, seq: u64, ts| {
        [
            seq.to_be_bytes().to_vec(),
            encode_announcement(&announcement(i, ts)),
        ]
        .concat()
    };
    let ack = |echo_ts_ms| {
        encode_relay_reply(&RelayReply::RegisterAck {
            echo_ts_ms,
            observed: sock("203.0.113.30:40000"),
            members: 3,
            digest: [0; 8],
            ttl_s: 30,
            since: 1,
        })
    };
    let mut packet = vec![
        0x45, 0, 0, 28, 0, 0, 0, 0, 64, 17, 0, 0, 10, 77, 0, 2, 10, 77, 1, 1,
    ];
    packet.extend_from_slice(&[0x30, 0x39, 0x30, 0x39, 0, 8, 0, 0]);
    // The same datagram from member 0 to the node, and one claiming member 1's address.
    let mut inbound = packet.clone();
    inbound[12..20].copy_from_slice(&[10, 77, 1, 1, 10, 77, 0, 2]);
    let mut spoofed = inbound.clone();
    spoofed[15] = 2;
    let ping = encode_disco(
        DiscoStamp {
            ts_ms: 1_700_000_000_000,
            nonce: 5,
        },
        &Disco::Ping { tx: [5; 12] },
    );
    let session = vec![
        step(6, 0, 0u16.to_be_bytes().to_vec()),
        step(1, 0, ack(1_700_000_000_000)),
        step(1, 0, ack(1_700_000_000_001)),
        step(2, 0, member(0, 10, 100)),
        step(2, 1, member(1, 11, 200)),
        step(3, 2 << 2, ping.clone()),
        step(3, 0x80 | 1, ping),
        step(5, 0, packet),
        step(6, 3, 250u16.to_be_bytes().to_vec()),
        step(7, 0, vec![2, 5]),
        step(6, 31, 1000u16.to_be_bytes().to_vec()),
        step(9, 0, vec![0xC0; 16]),
        step(7, 1, vec![0]),
        step(1, 0x40, ack(1_700_000_000_002)),
        step(9, 0x40, vec![0xC1; 16]),
        step(7, 1, vec![2]),
        step(8, 0, inbound.clone()),
        step(8, 0, inbound.clone()),
        step(8, 0x80, inbound),
        step(8, 0, spoofed),
    ];
    let garbage = vec![
        step(0, 0, vec![1, 0, 0, 0, 1, 2, 3, 4]),
        step(4, 2, vec![2, 0, 0, 0, 9, 9, 9, 9]),
        step(
            1,
            0,
            encode_relay_reply(&RelayReply::MemberGone {
                key: fixture().members[0].public(),
                seq: 12,
            }),
        ),
    ];
    vec![encode_steps(&session), encode_steps(&garbage)]
}
