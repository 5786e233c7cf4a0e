//! The agent's executor for the node's relay stream: it opens the stream to the relay when the
//! node asks ([`crate::node::driver::Output::OpenStream`]) — plain TCP or WebSocket over TLS,
//! the latter through `HTTPS_PROXY` when set, both by [`super::stream::connect_stream`] —
//! closes it when the node no longer wants it, writes the node's stream datagrams to it and
//! hands back what arrives. Which kind to open, and whether and when, is decided inside the
//! node (its relay session); nothing here keeps time or judges the relay.

use futures_util::{SinkExt as _, StreamExt as _};
use tokio::sync::{mpsc, oneshot};
use tokio_tungstenite::tungstenite::Message;

use super::stream::{self, ProxyConfig, StreamKind};
use crate::relay::tcp::{read_frame, write_frame, QUEUE_DEPTH};
use crate::wire::token::RelayEndpoint;

/// What the stream has to report to the agent loop.
pub(crate) enum StreamEvent {
    /// A connection attempt finished.
    Connected(std::io::Result<Link>),
    /// A datagram from the relay.
    Datagram(Vec<u8>),
    /// The connection closed.
    Closed,
}

/// A connected stream, served by a reader and a writer task so the agent's loop never blocks
/// on it.
pub(crate) struct Link {
    kind: StreamKind,
    outbound: mpsc::Sender<Vec<u8>>,
    inbound: mpsc::Receiver<Vec<u8>>,
}

impl Link {
    /// Starts the reader and writer tasks of `stream`.
    fn spawn(stream: stream::RelayStream) -> Self {
        let kind = stream.kind();
        let (out_tx, mut out_rx) = mpsc::channel::<Vec<u8>>(QUEUE_DEPTH);
        let (in_tx, in_rx) = mpsc::channel::<Vec<u8>>(QUEUE_DEPTH);
        match stream {
            stream::RelayStream::Tcp(tcp) => {
                let (mut read, mut write) = tcp.into_split();
                tokio::spawn(async move {
                    while let Some(d) = out_rx.recv().await {
                        if write_frame(&mut write, &d).await.is_err() {
                            break;
                        }
                    }
                });
                tokio::spawn(async move {
                    while let Ok(Some(d)) = read_frame(&mut read).await {
                        if in_tx.send(d).await.is_err() {
                            break;
                        }
                    }
                });
            }
            stream::RelayStream::Tls(ws) => {
                let (mut sink, mut source) = ws.split();
                tokio::spawn(async move {
                    while let Some(d) = out_rx.recv().await {
                        if sink.send(Message::Binary(d.into())).await.is_err() {
                            break;
                        }
                    }
                    let _ = sink.close().await;
                });
                tokio::spawn(async move {
                    while let Some(Ok(msg)) = source.next().await {
                        let d = match msg {
                            Message::Binary(b) => b.to_vec(),
                            Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => continue,
                            Message::Text(_) | Message::Close(_) => break,
                        };
                        if in_tx.send(d).await.is_err() {
                            break;
                        }
                    }
                });
            }
        }
        Self {
            kind,
            outbound: out_tx,
            inbound: in_rx,
        }
    }

    /// TCP or TLS.
    pub(crate) fn kind(&self) -> StreamKind {
        self.kind
    }

    /// Queues a datagram for the relay; `false` if the connection is gone. A full queue drops
    /// the datagram, as a congested UDP path would.
    fn send(&self, datagram: Vec<u8>) -> bool {
        match self.outbound.try_send(datagram) {
            Ok(()) | Err(mpsc::error::TrySendError::Full(_)) => true,
            Err(mpsc::error::TrySendError::Closed(_)) => false,
        }
    }
}

/// The agent's stream to its relay.
pub(crate) struct RelayStream {
    relay: RelayEndpoint,
    link: Option<Link>,
    connecting: Option<oneshot::Receiver<std::io::Result<Link>>>,
}

impl RelayStream {
    /// No stream yet, to `relay` (its main port for TCP, its TLS endpoint for TLS).
    pub(crate) fn new(relay: RelayEndpoint) -> Self {
        Self {
            relay,
            link: None,
            connecting: None,
        }
    }

    /// Starts connecting with `kind`, unless connected or connecting already.
    pub(crate) fn open(&mut self, kind: StreamKind) {
        if self.link.is_some() || self.connecting.is_some() {
            return;
        }
        let proxy = match kind {
            StreamKind::Tls => ProxyConfig::from_env(),
            StreamKind::Tcp => None,
        };
        tracing::info!(relay = %self.relay.host_port(), ?kind, proxy = ?proxy, "connecting to the relay over a stream");
        let (tx, rx) = oneshot::channel();
        let relay = self.relay.clone();
        tokio::spawn(async move {
            let result = stream::connect_stream(&relay, kind, proxy).await;
            let _ = tx.send(result.map(Link::spawn));
        });
        self.connecting = Some(rx);
    }

    /// Closes the connection or abandons the attempt.
    pub(crate) fn close(&mut self) {
        if let Some(link) = self.link.take() {
            tracing::info!(relay = %self.relay.host_port(), kind = ?link.kind(), "closing the stream to the relay");
        }
        self.connecting = None;
    }

    /// Keeps a finished connection attempt; its kind, or `None` if it failed.
    pub(crate) fn handle_connected(&mut self, result: std::io::Result<Link>) -> Option<StreamKind> {
        match result {
            Ok(link) => {
                let kind = link.kind();
                tracing::info!(relay = %self.relay.host_port(), ?kind, "attached to the relay over a stream");
                self.link = Some(link);
                Some(kind)
            }
            Err(e) => {
                tracing::warn!(relay = %self.relay.host_port(), %e, "cannot reach the relay over this stream");
                None
            }
        }
    }

    /// Whether a connection is up.
    pub(crate) fn is_up(&self) -> bool {
        self.link.is_some()
    }

    /// Writes one datagram; `false` if the connection is gone (it is then forgotten).
    pub(crate) fn send(&mut self, datagram: &[u8]) -> bool {
        let Some(link) = &self.link else {
            return false;
        };
        if link.send(datagram.to_vec()) {
            return true;
        }
        self.link = None;
        false
    }

    /// Forgets a closed connection.
    pub(crate) fn handle_closed(&mut self) {
        tracing::warn!(relay = %self.relay.host_port(), "stream to the relay closed");
        self.link = None;
    }

    /// Polls for the next event: a finished connection attempt, a datagram from the relay,
    /// or the close of the connection; pending when there is nothing to wait for.
    pub(crate) fn poll_recv(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<StreamEvent> {
        use std::future::Future as _;
        use std::task::Poll;
        if let Some(rx) = &mut self.connecting {
            let Poll::Ready(result) = std::pin::Pin::new(rx).poll(cx) else {
                return Poll::Pending;
            };
            self.connecting = None;
            let result =
                result.unwrap_or_else(|_| Err(std::io::Error::other("connect task ended")));
            return Poll::Ready(StreamEvent::Connected(result));
        }
        match &mut self.link {
            Some(link) => link.inbound.poll_recv(cx).map(|d| match d {
                Some(d) => StreamEvent::Datagram(d),
                None => StreamEvent::Closed,
            }),
            None => Poll::Pending,
        }
    }
}
