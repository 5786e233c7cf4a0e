//! The relay: rendezvous, STUN and packet relay for any number of networks.
//!
//! [`server`] is the sans-IO logic; [`driver`] runs it on a UDP socket.
pub mod driver;
pub mod server;
