//! Fixtures shared by the fuzz targets and the seed-corpus generator.
//!
//! The stateful targets (`relay_server`, `node`) read their input as a sequence of [`Step`]s
//! in a plain length-prefixed format (see [`steps`]), so that the seed generator can write
//! real protocol exchanges in it and libFuzzer mutates one datagram at a time. A step that
//! carries a plaintext is sealed by the harness with the right key before it is delivered:
//! the fuzzer never has to forge an AEAD tag to reach the state machines behind it. Requests
//! to the relay are also signed with the network key and carry the cookie the relay last gave
//! their address, so the fuzzer reaches admitted members without forging a signature either.

use std::net::SocketAddr;
use std::sync::OnceLock;

use meshvpn::keys::{NetworkKeys, NetworkSecret, NodeSecret, PeerKey};
use meshvpn::relay::server::Link;
use meshvpn::wire::admission::{seal_request, Cookie};
use meshvpn::wire::plain::decode_relay_request;
use meshvpn::wire::{Frame, RelayRequest};

/// Unix time (milliseconds) of the synthetic clock at the start of every stateful run.
pub const START_UNIX_MS: u64 = 1_700_000_000_000;

/// Members (besides the node under test) that the fixtures know keys for.
pub const MEMBERS: usize = 4;

/// One input event of a stateful target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    /// What to do (each target reduces it modulo its number of step kinds).
    pub kind: u8,
    /// Picks a source (an address, a link or a member), reduced modulo the choices.
    pub from: u8,
    /// The datagram, plaintext or parameters of the step.
    pub bytes: Vec<u8>,
}

/// Splits fuzz input into steps: `kind, from, length (u16 big-endian), bytes`, repeated;
/// a truncated last step keeps what is there.
pub fn steps(mut data: &[u8]) -> Vec<Step> {
    let mut out = Vec::new();
    while data.len() >= 4 && out.len() < 256 {
        let len = usize::from(u16::from_be_bytes([data[2], data[3]]));
        let end = (4 + len).min(data.len());
        out.push(Step {
            kind: data[0],
            from: data[1],
            bytes: data[4..end].to_vec(),
        });
        data = &data[end..];
    }
    out
}

/// Encodes steps in the format [`steps`] reads.
pub fn encode_steps(list: &[Step]) -> Vec<u8> {
    let mut out = Vec::new();
    for s in list {
        let len = u16::try_from(s.bytes.len()).unwrap_or(u16::MAX);
        out.push(s.kind);
        out.push(s.from);
        out.extend_from_slice(&len.to_be_bytes());
        out.extend_from_slice(&s.bytes[..usize::from(len)]);
    }
    out
}

/// Keys and addresses every harness and seed agrees on.
pub struct Fixture {
    /// The relay's static key.
    pub relay: NodeSecret,
    /// The node under test's static key.
    pub node: NodeSecret,
    /// Other members' static keys.
    pub members: Vec<NodeSecret>,
    /// The network's secret.
    pub network: NetworkSecret,
    /// Keys derived from [`Fixture::network`].
    pub keys: NetworkKeys,
    /// Session key of each member (index) with the relay.
    pub member_sessions: Vec<[u8; 32]>,
    /// Session key of the node under test with the relay.
    pub node_session: [u8; 32],
    /// Disco key of each member (index) with the node under test.
    pub disco: Vec<[u8; 32]>,
}

/// The shared fixture (built once per process: each key agreement costs an X25519).
pub fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let relay = NodeSecret::from_bytes([0x11; 32]);
        let node = NodeSecret::from_bytes([0x22; 32]);
        let members: Vec<NodeSecret> = (0..MEMBERS)
            .map(|i| NodeSecret::from_bytes([0x30 + i as u8; 32]))
            .collect();
        let network = NetworkSecret([0x44; 32]);
        let keys = network.derive();
        let relay_key = relay.public();
        let member_sessions = members
            .iter()
            .map(|m| m.relay_session_key(&m.public(), &relay_key))
            .collect();
        let node_session = node.relay_session_key(&node.public(), &relay_key);
        let disco = members
            .iter()
            .map(|m| m.disco_key(&node.public(), &keys.control_key))
            .collect();
        Fixture {
            relay,
            node,
            members,
            network,
            keys,
            member_sessions,
            node_session,
            disco,
        }
    })
}

impl Fixture {
    /// Member `i` (reduced modulo [`MEMBERS`]).
    pub fn member(&self, i: u8) -> (usize, PeerKey) {
        let i = usize::from(i) % MEMBERS;
        (i, self.members[i].public())
    }
}

/// The relay's address as the node under test knows it.
pub fn relay_addr() -> SocketAddr {
    SocketAddr::from(([198, 51, 100, 1], 3478))
}

/// A small palette of source addresses: the relay (and its second STUN port), members' public
/// and private addresses, IPv6, loopback. Few choices make the fuzzer hit the same ones often.
pub fn addr(i: u8) -> SocketAddr {
    const PALETTE: [&str; 8] = [
        "198.51.100.1:3478",
        "198.51.100.1:3479",
        "203.0.113.10:41641",
        "203.0.113.10:41642",
        "203.0.113.20:50000",
        "192.168.1.5:51820",
        "[2001:db8::7]:51820",
        "127.0.0.1:9",
    ];
    PALETTE[usize::from(i) % PALETTE.len()]
        .parse()
        .expect("palette entries are address literals")
}

/// A link to the relay: UDP from a palette address, or one of two TCP connections.
pub fn link(i: u8) -> Link {
    match i % 10 {
        8 => Link::Tcp {
            id: 1,
            remote: addr(2),
        },
        9 => Link::Tcp {
            id: 2,
            remote: addr(4),
        },
        other => Link::Udp(addr(other)),
    }
}

/// Frame kind bytes (byte 3 of a frame header), for sealing a plaintext that is not a valid
/// message, which the typed seal functions cannot express.
pub mod kind {
    /// A member's sealed request to its relay.
    pub const TO_RELAY: u8 = 0x10;
    /// A relay's sealed reply to a member.
    pub const FROM_RELAY: u8 = 0x11;
    /// A sealed disco message between two members.
    pub const DISCO: u8 = 0x30;
}

/// Seals `plain` as the body of a frame of kind `kind` from `sender` under `key`, and frames
/// it: the datagram a holder of `key` would send, whatever the plaintext.
pub fn sealed_frame(kind: u8, key: &[u8; 32], sender: PeerKey, plain: &[u8], n: u64) -> Vec<u8> {
    let body = meshvpn::wire::seal(
        key,
        &meshvpn::wire::frame_aad(kind, &sender),
        plain,
        nonce(n),
    );
    let mut out = vec![meshvpn::wire::MAGIC[0], meshvpn::wire::MAGIC[1]];
    out.extend_from_slice(&[meshvpn::wire::VERSION, kind]);
    out.extend_from_slice(&sender.0);
    out.extend_from_slice(&body);
    out
}

/// The `ToRelay` datagram member `sender` (with relay session key `session`) sends with cookie
/// `cookie`: when `plain` decodes as a [`RelayRequest`], that request with its `ts_ms` taken as
/// an offset from `unix_ms` (wrapping, so large offsets are in the past), signed with the
/// network key; otherwise `plain` itself sealed unsigned, as a member with a bug would.
pub fn request_frame(
    session: &[u8; 32],
    sender: PeerKey,
    cookie: Cookie,
    plain: &[u8],
    unix_ms: u64,
    n: u64,
) -> Vec<u8> {
    let fx = fixture();
    match decode_relay_request(plain) {
        Ok(req) => {
            let req = at_time(req, unix_ms);
            let relay = fx.relay.public();
            seal_request(
                session,
                sender,
                &relay,
                &fx.keys.signing,
                cookie,
                &req,
                nonce(n),
            )
        }
        Err(_) => {
            let mut aad = meshvpn::wire::frame_aad(kind::TO_RELAY, &sender).to_vec();
            aad.extend_from_slice(&cookie);
            let sealed = meshvpn::wire::seal(session, &aad, plain, nonce(n));
            Frame::ToRelay {
                sender,
                cookie,
                sealed: &sealed,
            }
            .to_vec()
        }
    }
}

/// `req` with its timestamp read as an offset from `unix_ms`.
fn at_time(req: RelayRequest, unix_ms: u64) -> RelayRequest {
    let ts = |offset: u64| unix_ms.wrapping_add(offset);
    match req {
        RelayRequest::Register {
            network,
            ts_ms,
            announcement,
        } => RelayRequest::Register {
            network,
            ts_ms: ts(ts_ms),
            announcement,
        },
        RelayRequest::Leave { network, ts_ms } => RelayRequest::Leave {
            network,
            ts_ms: ts(ts_ms),
        },
        RelayRequest::Sync { network, ts_ms } => RelayRequest::Sync {
            network,
            ts_ms: ts(ts_ms),
        },
        RelayRequest::Refresh {
            network,
            ts_ms,
            answer_after_ms,
        } => RelayRequest::Refresh {
            network,
            ts_ms: ts(ts_ms),
            answer_after_ms,
        },
        RelayRequest::Rotate {
            network,
            ts_ms,
            complete,
            entries,
        } => RelayRequest::Rotate {
            network,
            ts_ms: ts(ts_ms),
            complete,
            entries,
        },
    }
}

/// A nonce for sealing, varied by a counter so equal plaintexts give different datagrams.
pub fn nonce(counter: u64) -> [u8; 24] {
    let mut n = [0u8; 24];
    n[..8].copy_from_slice(&counter.to_be_bytes());
    n
}
