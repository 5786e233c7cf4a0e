//! The agent's executor for the node's relay stream: it opens the TCP connection to the relay
//! when the node asks ([`crate::node::driver::Output::OpenStream`]), closes it when the node
//! no longer wants it, writes the node's stream datagrams to it and hands back what arrives.
//! Whether and when to use the stream is decided inside the node (its relay session); nothing
//! here keeps time or judges the relay.

use std::net::SocketAddr;

use tokio::sync::oneshot;

use super::tcp_client::TcpRelayClient;

/// What the stream has to report to the agent loop.
pub(crate) enum StreamEvent {
    /// A connection attempt finished.
    Connected(std::io::Result<TcpRelayClient>),
    /// A datagram from the relay.
    Datagram(Vec<u8>),
    /// The connection closed.
    Closed,
}

/// The agent's stream to its relay.
pub(crate) struct RelayStream {
    relay: SocketAddr,
    tcp: Option<TcpRelayClient>,
    connecting: Option<oneshot::Receiver<std::io::Result<TcpRelayClient>>>,
}

impl RelayStream {
    /// No stream yet, to the relay at `relay`.
    pub(crate) fn new(relay: SocketAddr) -> Self {
        Self {
            relay,
            tcp: None,
            connecting: None,
        }
    }

    /// Starts connecting, unless connected or connecting already.
    pub(crate) fn open(&mut self) {
        if self.tcp.is_some() || self.connecting.is_some() {
            return;
        }
        tracing::info!(relay = %self.relay, "connecting to the relay over TCP");
        let (tx, rx) = oneshot::channel();
        let relay = self.relay;
        tokio::spawn(async move {
            let _ = tx.send(TcpRelayClient::connect(relay).await);
        });
        self.connecting = Some(rx);
    }

    /// Closes the connection or abandons the attempt.
    pub(crate) fn close(&mut self) {
        if self.tcp.take().is_some() {
            tracing::info!(relay = %self.relay, "closing the TCP connection to the relay");
        }
        self.connecting = None;
    }

    /// Keeps a finished connection attempt; `false` if it failed.
    pub(crate) fn handle_connected(&mut self, result: std::io::Result<TcpRelayClient>) -> bool {
        match result {
            Ok(client) => {
                tracing::info!(relay = %self.relay, "attached to the relay over TCP");
                self.tcp = Some(client);
                true
            }
            Err(e) => {
                tracing::warn!(relay = %self.relay, %e, "cannot reach the relay over TCP");
                false
            }
        }
    }

    /// Whether a connection is up.
    pub(crate) fn is_up(&self) -> bool {
        self.tcp.is_some()
    }

    /// Writes one datagram; `false` if the connection is gone (it is then forgotten).
    pub(crate) fn send(&mut self, datagram: &[u8]) -> bool {
        let Some(tcp) = &self.tcp else {
            return false;
        };
        if tcp.send(datagram.to_vec()) {
            return true;
        }
        self.tcp = None;
        false
    }

    /// Forgets a closed connection.
    pub(crate) fn handle_closed(&mut self) {
        tracing::warn!(relay = %self.relay, "TCP connection to the relay closed");
        self.tcp = None;
    }

    /// Waits for the next event; pending forever when there is nothing to wait for.
    pub(crate) async fn recv(&mut self) -> StreamEvent {
        if let Some(rx) = &mut self.connecting {
            let result = rx
                .await
                .unwrap_or_else(|_| Err(std::io::Error::other("connect task ended")));
            self.connecting = None;
            return StreamEvent::Connected(result);
        }
        match &mut self.tcp {
            Some(tcp) => match tcp.recv().await {
                Some(d) => StreamEvent::Datagram(d),
                None => StreamEvent::Closed,
            },
            None => std::future::pending().await,
        }
    }
}
