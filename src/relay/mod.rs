//! The relay: rendezvous, STUN and packet relay for any number of networks.
//!
//! [`server`] is the sans-IO logic; [`driver`] runs it on a UDP socket and a TCP listener on the
//! same port; [`tcp`] frames datagrams on TCP streams.
pub mod driver;
pub mod limits;
pub mod server;
pub mod tcp;
