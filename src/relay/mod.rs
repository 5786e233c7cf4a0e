//! The relay: rendezvous, STUN and packet relay for any number of networks.
//!
//! [`server`] is the sans-IO logic; [`driver`] runs it on a UDP socket and a TCP listener on the
//! same port; [`tcp`] frames datagrams on TCP streams. The TCP listener's limits are decided by
//! the sans-IO [`limits::ConnTable`] and carried out by [`listener`]; [`control`] serves a
//! [`status::RelayStatus`] with every counter on a Unix socket for `meshvpn relay-status`.
pub mod control;
pub mod driver;
pub mod limits;
pub mod listener;
pub mod server;
pub mod status;
pub mod tcp;
