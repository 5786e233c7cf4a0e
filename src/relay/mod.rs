//! The relay: rendezvous, STUN and packet relay for any number of networks.
//!
//! [`server`] is the sans-IO logic; [`driver`] runs it on a UDP socket and a TCP listener on the
//! same port; [`tcp`] frames datagrams on TCP streams, [`ws`] in WebSocket messages (over TLS
//! on port 443, or plain behind a reverse proxy). The TCP listener's limits are decided by
//! the sans-IO [`limits::ConnTable`] and carried out by [`listener`]; [`control`] serves a
//! [`status::RelayStatus`] with every counter on a Unix socket for `meshvpn relay-status`.
// The relay's control socket: a driver-side task server.
#[allow(clippy::disallowed_methods)]
pub mod control;
pub mod driver;
// Sans-IO; its unit tests need a starting `Instant`.
#[cfg_attr(test, allow(clippy::disallowed_methods))]
pub mod limits;
// Accept loop and stream tasks of the driver side: they own the clock and spawn tasks.
#[allow(clippy::disallowed_methods)]
pub mod listener;
pub mod metrics;
pub mod rotation_store;
// Its unit tests need a starting `Instant`; the server's own code stays under the clippy.toml bans.
#[cfg_attr(test, allow(clippy::disallowed_methods))]
pub mod server;
pub mod status;
// Stream tasks of the driver side: one reader and one writer task per TCP connection.
#[allow(clippy::disallowed_methods)]
pub mod tcp;
// WebSocket (and TLS) connection tasks of the driver side.
#[allow(clippy::disallowed_methods)]
pub mod ws;
