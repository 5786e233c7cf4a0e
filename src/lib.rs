//! # meshvpn
//!
//! A peer-to-peer overlay VPN: members of a network each run an agent that owns a TUN
//! interface with a virtual IP, find each other through a small rendezvous/relay server, and
//! carry IP packets between each other encrypted with WireGuard (boringtun), directly when
//! possible and through the relay otherwise.
//!
//! ## Architecture: sans-IO core, thin drivers
//!
//! ```text
//!              ┌──────────────────────── agent (tokio, src/agent) ────────────────────────┐
//!  TUN device ─┤ read packet ─▶ Node::handle_tun_packet     Output::Tun ─▶ write          ├─ TUN
//!  UDP socket ─┤ recv ───────▶ Node::handle_udp            Output::Udp ─▶ send           ├─ UDP
//!  TCP stream ─┤ frame ──────▶ Node::handle_relay_stream   Output::Stream / Open / Close ├─ TCP
//!  timer ──────┤ deadline ───▶ Node::handle_timeout        Node::poll_timeout ─▶ re-arm   │
//!  control ────┤ `status` ───▶ Node::status                Output::Event ─▶ log          │
//!              └─────────── outputs drained by node::driver::Step (shared with the simulator) ┘
//! ```
//!
//! - [`node`]: one member's protocol engine, composed of a relay session (which also decides
//!   between UDP and the TCP stream to the relay), membership, and per peer a WireGuard link
//!   and path selection; cryptokey routing; a timer table of named deadlines. It reads no
//!   clock and opens no socket: time and randomness are inputs, outputs are polled.
//! - [`relay::server`]: the relay's logic, equally sans-IO — registrations (soft state),
//!   membership pushes and syncs, STUN answers, forwarding relay frames by public key.
//! - [`agent`] and [`relay::driver`]: the tokio loops that do the I/O for those two.
//! - [`wire`]: every byte format that crosses a trust boundary (datagram classification, frames,
//!   sealed messages, STUN, the group token); parsing never panics.
//! - [`keys`]: static keys and the HKDF derivations from the network secret.
//! - [`config`], [`control`], [`status`]: the per-network TOML file, the control socket, and
//!   the status snapshot (its schema is the `meshvpn-status` crate, re-exported here).
//! - [`cli`]: the command line, with the modules only it uses: `cli::generate` (man pages and
//!   completions), `cli::overlap` (the subnet-overlap check before an agent starts) and
//!   `cli::demo` (`meshvpn demo`).
//!
//! The network-namespace lab behind `meshvpn demo`, the end-to-end tests and the benchmark is
//! its own crate, `meshvpn-lab` (`crates/meshvpn-lab`); it reads `status --json` through
//! `meshvpn-status`, so it does not depend on this library.
//!
//! ## Data flow of one packet
//!
//! 1. The kernel routes a packet for `10.x.y.z` into the TUN device; the agent reads it and
//!    hands it to [`node::Node::handle_tun_packet`].
//! 2. The node finds the peer owning the destination virtual IP and seals the packet with that
//!    peer's WireGuard session (`boringtun::noise::Tunn`, with the network's preshared key).
//! 3. The sealed packet leaves on the peer's current path: straight to the peer's confirmed
//!    address, or wrapped in a relay frame addressed by the peer's public key.
//! 4. On the other side the UDP datagram is classified (WireGuard, STUN or meshvpn frame); a
//!    WireGuard message is matched to its peer (by the initiator's key in a handshake, by the
//!    receiver index otherwise), opened, and accepted only if its inner source address is that
//!    peer's virtual IP. Then it is written to the TUN device.
//!
//! Paths are found with sealed disco pings to every candidate address of a peer (its announced
//! host addresses and the address the relay sees); the first answered ping makes the path
//! direct, and a direct path that goes silent falls back to the relay without touching the
//! WireGuard session.
pub mod addressing;
pub mod agent;
pub mod cli;
pub mod config;
pub mod control;
pub mod dns;
pub mod keys;
pub mod metrics;
// Its unit tests need a starting `Instant`; the node's own code stays under the clippy.toml bans.
#[cfg_attr(test, allow(clippy::disallowed_methods))]
pub mod node;
pub mod relay;
pub mod sockaddr;
pub mod status;
pub(crate) mod udp_batch;
pub mod wire;
