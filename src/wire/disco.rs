//! Member-to-member path discovery ("disco") messages: ping, pong, call-me, spray, MTU
//! probes and the forwards members pass for each other when no relay answers, each
//! stamped with the sender's clock and a random nonce and sealed under the pair's disco key.
//! The receiver checks the stamp (window and replay cache, `node::peer`) before acting.

use std::net::SocketAddr;

use super::codec::{Reader, Writer};
use super::{frame_aad, kind, open, seal, Frame, WireError, MAX_ENDPOINTS};
use crate::keys::PeerKey;

/// Member-to-member path discovery messages (sealed under the pair's disco key).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Disco {
    /// "Are you there on this path?"; `tx` is random and echoed in the pong.
    Ping { tx: [u8; 12] },
    /// Answer to a ping; `observed` is the address the ping came from, as the answerer saw it.
    Pong { tx: [u8; 12], observed: SocketAddr },
    /// "Probe these addresses of mine now" (sent through the relay so both sides punch together).
    CallMe { endpoints: Vec<SocketAddr> },
    /// "My symmetric NAT now holds many mappings towards you: ping random ports of my address"
    /// (a birthday probe, see `node::birthday`). `reflexive` is the sender's public address as
    /// its own STUN checks see it; the receiver sprays only when the relay observed the same
    /// address, so a relay naming a third party's address gets no spray sent there.
    Spray { reflexive: SocketAddr },
    /// A path MTU probe: `padding` zero bytes make the datagram as large as the size being
    /// tested (see [`probe_padding`]); sealed like every disco message, so only the peer can
    /// acknowledge it.
    Probe { tx: [u8; 12], padding: u16 },
    /// "Your probe `tx` arrived" (small, so it returns whatever the reverse path's MTU).
    ProbeAck { tx: [u8; 12] },
    /// "Pass this to member `to` over your direct path": `inner` is a sealed disco datagram
    /// (a [`Frame::Disco`]) from the sender to `to`, sent to a member with direct paths to
    /// both when no relay answers (see `node::helping`). At most [`MAX_FORWARD_LEN`] bytes.
    Forward { to: PeerKey, inner: Vec<u8> },
    /// "Member `from`, whom I see at `observed`, sent you this": a [`Disco::Forward`] passed
    /// on by the member that received it. `inner` is opened with `from`'s disco key, so the
    /// passer can neither read nor forge it; `observed` is the passer's own word.
    Forwarded {
        from: PeerKey,
        observed: SocketAddr,
        inner: Vec<u8>,
    },
}

/// Largest sealed disco datagram a [`Disco::Forward`] carries: a call-me with every endpoint
/// fits with room to spare, and the passed-on message stays far below any path MTU.
pub const MAX_FORWARD_LEN: usize = 512;

/// Bytes of a sealed probe datagram besides its padding: frame header and sender key (36),
/// nonce (24), version, stamp and type (18), transaction id (12), tag (16).
pub const PROBE_FIXED_LEN: usize = 106;

/// The padding that makes a sealed [`Disco::Probe`] datagram `datagram_len` bytes long (no
/// smaller than an unpadded probe).
pub fn probe_padding(datagram_len: usize) -> u16 {
    u16::try_from(datagram_len.saturating_sub(PROBE_FIXED_LEN)).unwrap_or(u16::MAX)
}

/// Version of the sealed disco body. The body before it carried no version byte and began
/// with the message type (1..=4), so this value lies outside that range: each build refuses the
/// other's bodies instead of misreading them. Version 5 added the [`DiscoStamp`].
pub const DISCO_VERSION: u8 = 5;

/// The freshness stamp inside every sealed disco body: the sender's wall clock and a random
/// nonce. The receiver accepts a message only near its own clock and only once (see
/// `node::peer::ReplayCache`), so a captured disco datagram cannot be replayed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct DiscoStamp {
    /// Milliseconds since the Unix epoch when the sender sealed the message.
    pub ts_ms: u64,
    /// Random per message (from the sender's seeded RNG).
    pub nonce: u64,
}

impl Disco {
    pub(super) fn encode(&self, stamp: DiscoStamp) -> Vec<u8> {
        let mut w = Writer::new();
        w.u8(DISCO_VERSION).u64(stamp.ts_ms).u64(stamp.nonce);
        match self {
            Disco::Ping { tx } => {
                w.u8(1).raw(tx);
            }
            Disco::Pong { tx, observed } => {
                w.u8(2).raw(tx).addr(observed);
            }
            Disco::CallMe { endpoints } => {
                w.u8(3).u8(endpoints.len().min(MAX_ENDPOINTS) as u8);
                for e in endpoints.iter().take(MAX_ENDPOINTS) {
                    w.addr(e);
                }
            }
            Disco::Spray { reflexive } => {
                w.u8(4).addr(reflexive);
            }
            Disco::Probe { tx, padding } => {
                w.u8(5).raw(tx);
                w.buf.resize(w.buf.len() + usize::from(*padding), 0);
            }
            Disco::ProbeAck { tx } => {
                w.u8(6).raw(tx);
            }
            Disco::Forward { to, inner } => {
                w.u8(7)
                    .raw(&to.0)
                    .bytes(&inner[..inner.len().min(MAX_FORWARD_LEN)]);
            }
            Disco::Forwarded {
                from,
                observed,
                inner,
            } => {
                w.u8(8)
                    .raw(&from.0)
                    .addr(observed)
                    .bytes(&inner[..inner.len().min(MAX_FORWARD_LEN)]);
            }
        }
        w.buf
    }

    pub(super) fn decode(b: &[u8]) -> Result<(DiscoStamp, Self), WireError> {
        let mut r = Reader::new(b);
        let version = r.u8()?;
        if version != DISCO_VERSION {
            return Err(WireError::Version(version));
        }
        let stamp = DiscoStamp {
            ts_ms: r.u64()?,
            nonce: r.u64()?,
        };
        let msg = match r.u8()? {
            1 => Disco::Ping { tx: r.array()? },
            2 => Disco::Pong {
                tx: r.array()?,
                observed: r.addr()?,
            },
            3 => {
                let n = usize::from(r.u8()?);
                if n > MAX_ENDPOINTS {
                    return Err(WireError::Malformed("too many endpoints"));
                }
                let endpoints = (0..n).map(|_| r.addr()).collect::<Result<_, _>>()?;
                Disco::CallMe { endpoints }
            }
            4 => Disco::Spray {
                reflexive: r.addr()?,
            },
            5 => {
                let tx = r.array()?;
                let padding = u16::try_from(r.rest().len())
                    .map_err(|_| WireError::Malformed("probe padding too long"))?;
                Disco::Probe { tx, padding }
            }
            6 => Disco::ProbeAck { tx: r.array()? },
            7 => {
                let to = PeerKey(r.array()?);
                Disco::Forward {
                    to,
                    inner: forwarded_bytes(&mut r)?,
                }
            }
            8 => {
                let from = PeerKey(r.array()?);
                let observed = r.addr()?;
                Disco::Forwarded {
                    from,
                    observed,
                    inner: forwarded_bytes(&mut r)?,
                }
            }
            other => return Err(WireError::UnknownType("disco", other)),
        };
        Ok((stamp, msg))
    }
}

/// The passed-on datagram of a forward, refused beyond [`MAX_FORWARD_LEN`].
fn forwarded_bytes(r: &mut Reader<'_>) -> Result<Vec<u8>, WireError> {
    let inner = r.bytes()?;
    if inner.len() > MAX_FORWARD_LEN {
        return Err(WireError::Malformed("forwarded message too long"));
    }
    Ok(inner.to_vec())
}

/// Builds a sealed `Disco` datagram: `msg` stamped with `stamp` (see [`DiscoStamp`]).
pub fn seal_disco(
    pair_key: &[u8; 32],
    sender: PeerKey,
    stamp: DiscoStamp,
    msg: &Disco,
    nonce: [u8; 24],
) -> Vec<u8> {
    let sealed = seal(
        pair_key,
        &frame_aad(kind::DISCO, &sender),
        &msg.encode(stamp),
        nonce,
    );
    Frame::Disco {
        sender,
        sealed: &sealed,
    }
    .to_vec()
}

/// Opens the body of a `Disco` frame: the message and its freshness stamp, which the caller
/// must check (window and replay) before acting on the message.
pub fn open_disco(
    pair_key: &[u8; 32],
    sender: &PeerKey,
    sealed: &[u8],
) -> Result<(DiscoStamp, Disco), WireError> {
    Disco::decode(&open(pair_key, &frame_aad(kind::DISCO, sender), sealed)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probes_are_exactly_as_large_as_asked_and_round_trip() {
        let key = [9u8; 32];
        let sender = PeerKey([3; 32]);
        let stamp = DiscoStamp {
            ts_ms: 1_700_000_000_000,
            nonce: 7,
        };
        for len in [PROBE_FIXED_LEN, 1252, 1412, 1448] {
            let msg = Disco::Probe {
                tx: [5; 12],
                padding: probe_padding(len),
            };
            let dgram = seal_disco(&key, sender, stamp, &msg, [1; 24]);
            assert_eq!(dgram.len(), len);
            let Ok(Frame::Disco { sealed, .. }) = Frame::parse(&dgram) else {
                panic!("a disco frame");
            };
            assert_eq!(
                open_disco(&key, &sender, sealed).expect("opens"),
                (stamp, msg)
            );
        }
        let ack = Disco::ProbeAck { tx: [5; 12] };
        let dgram = seal_disco(&key, sender, stamp, &ack, [1; 24]);
        let Ok(Frame::Disco { sealed, .. }) = Frame::parse(&dgram) else {
            panic!("a disco frame");
        };
        assert_eq!(
            open_disco(&key, &sender, sealed).expect("opens"),
            (stamp, ack)
        );
        assert!(dgram.len() < 120, "an acknowledgement stays small");
    }
}
