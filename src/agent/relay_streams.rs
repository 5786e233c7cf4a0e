//! The agent's streams to its relays: one [`RelayStream`] per relay in the token, polled
//! together so the agent's loop waits on all of them in one branch without allocating.

use std::future::poll_fn;
use std::task::Poll;

use super::relay_stream::{RelayStream, StreamEvent};
use crate::wire::token::RelayEndpoint;

/// One stream slot per relay, by relay number (the node's numbering).
pub(crate) struct RelayStreams {
    streams: Vec<RelayStream>,
    /// Where the next poll starts, so a busy stream cannot starve the others.
    next: usize,
}

impl RelayStreams {
    /// No stream yet, to each of `relays`.
    pub(crate) fn new(relays: &[RelayEndpoint]) -> Self {
        Self {
            streams: relays.iter().cloned().map(RelayStream::new).collect(),
            next: 0,
        }
    }

    /// The stream to relay `relay`.
    pub(crate) fn get(&mut self, relay: usize) -> Option<&mut RelayStream> {
        self.streams.get_mut(relay)
    }

    /// Closes every stream (the node restarts).
    pub(crate) fn close_all(&mut self) {
        for s in &mut self.streams {
            s.close();
        }
    }

    /// Whether any stream is up.
    pub(crate) fn any_up(&self) -> bool {
        self.streams.iter().any(RelayStream::is_up)
    }

    /// Waits for the next event of any stream, with the relay it belongs to; pending forever
    /// when no stream has anything to wait for.
    pub(crate) async fn recv(&mut self) -> (usize, StreamEvent) {
        poll_fn(|cx| {
            let n = self.streams.len();
            for i in 0..n {
                let relay = (self.next + i) % n;
                if let Poll::Ready(ev) = self.streams[relay].poll_recv(cx) {
                    self.next = (relay + 1) % n;
                    return Poll::Ready((relay, ev));
                }
            }
            Poll::Pending
        })
        .await
    }
}
