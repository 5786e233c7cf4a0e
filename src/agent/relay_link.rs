//! How the agent reaches its relay: UDP on the one socket, or TCP when UDP is blocked.
//!
//! The agent starts on UDP. When the relay has answered neither a registration nor a STUN
//! request over UDP for [`UDP_FALLBACK_AFTER`] (at start-up, or later when UDP gets blocked),
//! it connects to the relay over TCP (same port) and sends every relay-bound datagram through
//! that stream; the relay bridges TCP- and UDP-attached members. While on TCP the node keeps
//! sending STUN over UDP; as soon as a STUN answer from the relay arrives over UDP, the agent
//! drops the stream and goes back to UDP (direct paths need UDP anyway). Only STUN answers
//! count as proof, since relayed traffic may still trickle in through an old NAT mapping.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use crate::relay::tcp::TcpRelayClient;
use crate::wire::{self, DatagramKind};

/// Unanswered UDP for this long means UDP to the relay is blocked: three registration
/// attempts (at 0, 1 and 3 s) have gone unanswered by then.
pub(crate) const UDP_FALLBACK_AFTER: Duration = Duration::from_secs(4);
/// First delay between TCP connection attempts; doubles up to [`TCP_RETRY_MAX`].
const TCP_RETRY_MIN: Duration = Duration::from_secs(1);
/// Longest delay between TCP connection attempts.
const TCP_RETRY_MAX: Duration = Duration::from_secs(30);
/// UDP from the relay this recent means UDP works again.
const UDP_WORKS_WITHIN: Duration = Duration::from_secs(10);

/// What the relay link has to report to the agent loop.
pub(crate) enum LinkEvent {
    /// A datagram from the relay over TCP.
    Datagram(Vec<u8>),
    /// A connection attempt finished.
    Connected(std::io::Result<TcpRelayClient>),
    /// The TCP connection closed.
    Closed,
}

/// The agent's path to its relay.
pub(crate) struct RelayLink {
    relay: SocketAddr,
    quiet_since: Instant,
    last_udp: Option<Instant>,
    tcp: Option<TcpRelayClient>,
    connecting: Option<oneshot::Receiver<std::io::Result<TcpRelayClient>>>,
    next_attempt: Instant,
    backoff: Duration,
}

impl RelayLink {
    pub(crate) fn new(relay: SocketAddr, now: Instant) -> Self {
        Self {
            relay,
            quiet_since: now,
            last_udp: None,
            tcp: None,
            connecting: None,
            next_attempt: now,
            backoff: TCP_RETRY_MIN,
        }
    }

    /// Whether relay traffic currently goes over TCP.
    pub(crate) fn over_tcp(&self) -> bool {
        self.tcp.is_some()
    }

    /// Notes a UDP datagram from `from`: a STUN answer from the relay's address proves that
    /// UDP to the relay works both ways.
    pub(crate) fn note_udp(&mut self, from: SocketAddr, bytes: &[u8], now: Instant) {
        if from.ip() == self.relay.ip() && wire::classify(bytes) == DatagramKind::Stun {
            self.last_udp = Some(now);
        }
    }

    /// Sends a relay-bound datagram over TCP if attached; otherwise hands it back for UDP.
    pub(crate) fn send<'a>(&mut self, dst: SocketAddr, payload: &'a [u8]) -> Option<&'a [u8]> {
        if dst != self.relay {
            return Some(payload);
        }
        match &self.tcp {
            Some(tcp) => {
                if !tcp.send(payload.to_vec()) {
                    self.tcp = None;
                }
                None
            }
            None => Some(payload),
        }
    }

    /// Decides, once per loop turn, whether to start a TCP connection or to drop back to UDP;
    /// `answering` says whether the relay answers our registrations. Returns `Some(over_tcp)`
    /// when the transport changed.
    pub(crate) fn poll(&mut self, now: Instant, answering: bool) -> Option<bool> {
        let udp_recent = self
            .last_udp
            .is_some_and(|t| now.saturating_duration_since(t) < UDP_WORKS_WITHIN);
        if self.tcp.is_some() {
            if udp_recent {
                tracing::info!(relay = %self.relay, "UDP to the relay works again; leaving TCP");
                self.tcp = None;
                self.backoff = TCP_RETRY_MIN;
                return Some(false);
            }
            return None;
        }
        if answering || udp_recent {
            self.quiet_since = now;
            return None;
        }
        let quiet = now.saturating_duration_since(self.quiet_since) >= UDP_FALLBACK_AFTER;
        if quiet && self.connecting.is_none() && now >= self.next_attempt {
            tracing::info!(relay = %self.relay, "no UDP answer from the relay; trying TCP");
            let (tx, rx) = oneshot::channel();
            let relay = self.relay;
            tokio::spawn(async move {
                let _ = tx.send(TcpRelayClient::connect(relay).await);
            });
            self.connecting = Some(rx);
            self.next_attempt = now + self.backoff;
            self.backoff = (self.backoff * 2).min(TCP_RETRY_MAX);
        }
        None
    }

    /// Takes a finished connection attempt; returns whether TCP is now in use.
    pub(crate) fn handle_connected(&mut self, result: std::io::Result<TcpRelayClient>) -> bool {
        match result {
            Ok(client) => {
                tracing::info!(relay = %self.relay, "attached to the relay over TCP");
                self.tcp = Some(client);
                self.backoff = TCP_RETRY_MIN;
                true
            }
            Err(e) => {
                tracing::warn!(relay = %self.relay, %e, "cannot reach the relay over TCP either; retrying");
                false
            }
        }
    }

    /// Forgets a closed TCP connection.
    pub(crate) fn handle_closed(&mut self, now: Instant) {
        tracing::warn!(relay = %self.relay, "TCP connection to the relay closed");
        self.tcp = None;
        self.quiet_since = now;
    }

    /// Waits for the next event; pending forever when there is nothing to wait for.
    pub(crate) async fn recv(&mut self) -> LinkEvent {
        if let Some(rx) = &mut self.connecting {
            let result = rx
                .await
                .unwrap_or_else(|_| Err(std::io::Error::other("connect task ended")));
            self.connecting = None;
            return LinkEvent::Connected(result);
        }
        match &mut self.tcp {
            Some(tcp) => match tcp.recv().await {
                Some(d) => LinkEvent::Datagram(d),
                None => LinkEvent::Closed,
            },
            None => std::future::pending().await,
        }
    }
}
