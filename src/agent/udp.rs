//! The agent's main UDP socket: batched both ways, many datagrams per system call, by
//! [`crate::udp_batch`] (shared with the relay's main port).

pub(crate) use crate::udp_batch::{UdpIo, SEND_BATCH};
