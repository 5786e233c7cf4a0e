//! The relay: rendezvous, STUN and packet relay for any number of networks.
//!
//! [`server`] is the sans-IO logic; [`driver`] runs it on a UDP socket and a TCP listener on the
//! same port; [`tcp`] frames datagrams on TCP streams.
pub mod driver;
// Its unit tests need a starting `Instant`; the server's own code stays under the clippy.toml bans.
#[cfg_attr(test, allow(clippy::disallowed_methods))]
pub mod server;
// Stream tasks of the driver side: one reader and one writer task per TCP connection.
#[allow(clippy::disallowed_methods)]
pub mod tcp;
