//! The agent's executor for the node's relay stream: it opens the stream to the relay when the
//! node asks ([`crate::node::driver::Output::OpenStream`]) — plain TCP or WebSocket over TLS,
//! the latter through `HTTPS_PROXY` when set, both by [`super::stream::connect_stream`] —
//! closes it when the node no longer wants it, writes the node's stream datagrams to it and
//! hands back what arrives. Which kind to open, and whether and when, is decided inside the
//! node (its relay session); nothing here keeps time or judges the relay.
//!
//! The writer task of a stream writes in batches: it waits for one datagram, takes every
//! datagram already queued behind it and writes them together — TCP frames encoded into one
//! reused [`FrameBatch`] and sent with one `write_all`, WebSocket messages fed to the sink and
//! flushed once — and flushes only when the queue is empty. A bulk transfer over the stream
//! then costs a system call (and a TLS record) per burst rather than per packet. The reader
//! of a TCP stream is buffered for the same reason.

use futures_util::{Sink, SinkExt as _, StreamExt as _};
use tokio::io::{AsyncWrite, AsyncWriteExt as _, BufReader};
use tokio::sync::{mpsc, oneshot};
use tokio_tungstenite::tungstenite::Message;

use super::stream::{self, ProxyConfig, StreamKind};
use crate::relay::tcp::{read_frame, FrameBatch, QUEUE_DEPTH};
use crate::wire::token::RelayEndpoint;

/// Bytes read from a TCP stream at once: one of the relay's write batches
/// ([`WRITE_BATCH_BYTES`](crate::relay::tcp::WRITE_BATCH_BYTES)), so a burst costs one read
/// system call instead of two per frame (length, then body). One buffer per member.
const READ_BUFFER: usize = 64 * 1024;

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
                let (read, mut write) = tcp.into_split();
                let mut read = BufReader::with_capacity(READ_BUFFER, read);
                tokio::spawn(async move {
                    if let Err(e) = write_frames(&mut write, &mut out_rx).await {
                        tracing::debug!(%e, "writing to the relay stream failed");
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
                    if let Err(e) = write_messages(&mut sink, &mut out_rx).await {
                        tracing::debug!(%e, "writing to the relay stream failed");
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

/// Writes the datagrams of `queue` to `w` as frames until the queue closes: each write
/// carries every datagram queued at that moment (up to [`WRITE_BATCH_BYTES`](crate::relay::tcp::WRITE_BATCH_BYTES)), and `w` is
/// flushed only when the queue is empty.
async fn write_frames<W: AsyncWrite + Unpin>(
    w: &mut W,
    queue: &mut mpsc::Receiver<Vec<u8>>,
) -> std::io::Result<()> {
    let mut batch = FrameBatch::new();
    while let Some(first) = queue.recv().await {
        // The node's datagrams are UDP payloads, so they always fit a frame.
        batch.gather(&first, || queue.try_recv().ok());
        batch.write_to(w).await?;
        if queue.is_empty() {
            w.flush().await?;
        }
    }
    // The last write found the queue empty, so it was flushed.
    Ok(())
}

/// Sends the datagrams of `queue` as WebSocket binary messages until the queue closes: each
/// is fed to the sink (which writes when its buffer fills) and the sink is flushed only when
/// the queue is empty.
async fn write_messages<S>(
    sink: &mut S,
    queue: &mut mpsc::Receiver<Vec<u8>>,
) -> Result<(), S::Error>
where
    S: Sink<Message> + Unpin,
{
    while let Some(datagram) = queue.recv().await {
        sink.feed(Message::Binary(datagram.into())).await?;
        if queue.is_empty() {
            sink.flush().await?;
        }
    }
    // The last message found the queue empty, so it was flushed.
    Ok(())
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

#[cfg(test)]
mod tests {
    use std::pin::Pin;
    use std::task::{Context, Poll};
    use std::time::Duration;

    use tokio::io::{AsyncReadExt as _, DuplexStream};
    use tokio_tungstenite::tungstenite::protocol::Role;
    use tokio_tungstenite::WebSocketStream;

    use super::*;
    use crate::relay::tcp::{FrameDecoder, MAX_FRAME};

    /// What a writer did to the stream under it, in order.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    enum Op {
        Write(usize),
        Flush,
    }

    /// A stream that records every write and flush it is asked for, then passes them on.
    struct Recording {
        inner: DuplexStream,
        ops: Vec<Op>,
    }

    impl AsyncWrite for Recording {
        fn poll_write(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<std::io::Result<usize>> {
            let poll = Pin::new(&mut self.inner).poll_write(cx, buf);
            if let Poll::Ready(Ok(n)) = poll {
                self.ops.push(Op::Write(n));
            }
            poll
        }

        fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            let poll = Pin::new(&mut self.inner).poll_flush(cx);
            if poll.is_ready() {
                self.ops.push(Op::Flush);
            }
            poll
        }

        fn poll_shutdown(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<std::io::Result<()>> {
            Pin::new(&mut self.inner).poll_shutdown(cx)
        }
    }

    impl tokio::io::AsyncRead for Recording {
        fn poll_read(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut tokio::io::ReadBuf<'_>,
        ) -> Poll<std::io::Result<()>> {
            Pin::new(&mut self.inner).poll_read(cx, buf)
        }
    }

    /// A closed queue holding `datagrams`.
    fn queued(datagrams: &[Vec<u8>]) -> mpsc::Receiver<Vec<u8>> {
        let (tx, rx) = mpsc::channel(QUEUE_DEPTH);
        for d in datagrams {
            tx.try_send(d.clone()).expect("the queue has room");
        }
        rx
    }

    /// Every byte `stream` yields until it ends, within 5 s.
    async fn read_all(mut stream: DuplexStream) -> Vec<u8> {
        let mut bytes = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut bytes))
            .await
            .expect("the writer finishes within 5 s")
            .expect("read");
        bytes
    }

    fn decode(bytes: &[u8]) -> Vec<Vec<u8>> {
        let mut decoder = FrameDecoder::new(MAX_FRAME);
        decoder.handle_bytes(bytes);
        let mut frames = Vec::new();
        while let Some(frame) = decoder.poll_frame().expect("valid frames") {
            frames.push(frame);
        }
        assert_eq!(decoder.buffered(), 0, "no partial frame left");
        frames
    }

    #[tokio::test]
    async fn queued_frames_go_out_in_one_write_then_one_flush() {
        let datagrams: Vec<Vec<u8>> = (0..8u8).map(|i| vec![i; 40 + usize::from(i)]).collect();
        let mut queue = queued(&datagrams);
        let (a, b) = tokio::io::duplex(64 * 1024);
        let mut w = Recording {
            inner: a,
            ops: Vec::new(),
        };
        write_frames(&mut w, &mut queue).await.expect("write");
        let framed: usize = datagrams.iter().map(|d| d.len() + 2).sum();
        assert_eq!(w.ops, vec![Op::Write(framed), Op::Flush]);
        drop(w);
        assert_eq!(decode(&read_all(b).await), datagrams);
    }

    #[tokio::test]
    async fn a_long_queue_through_a_small_pipe_arrives_whole_and_is_flushed_once() {
        let datagrams: Vec<Vec<u8>> = (0..200u32).map(|i| vec![i as u8; 1400]).collect();
        let mut queue = queued(&datagrams);
        // 4 KiB of pipe: every write is taken a piece at a time while the reader drains it.
        let (a, b) = tokio::io::duplex(4096);
        let reader = tokio::spawn(read_all(b));
        let mut w = Recording {
            inner: a,
            ops: Vec::new(),
        };
        write_frames(&mut w, &mut queue).await.expect("write");
        assert_eq!(w.ops.last(), Some(&Op::Flush));
        assert_eq!(
            w.ops.iter().filter(|op| **op == Op::Flush).count(),
            1,
            "flushed once, when the queue was empty: {:?}",
            w.ops
        );
        drop(w);
        let bytes = reader.await.expect("reader");
        assert_eq!(decode(&bytes), datagrams);
    }

    #[tokio::test]
    async fn queued_websocket_messages_are_fed_and_flushed_in_one_write() {
        let datagrams: Vec<Vec<u8>> = (0..8u8).map(|i| vec![i; 40 + usize::from(i)]).collect();
        let mut queue = queued(&datagrams);
        let (a, b) = tokio::io::duplex(64 * 1024);
        let recording = Recording {
            inner: a,
            ops: Vec::new(),
        };
        let mut client = WebSocketStream::from_raw_socket(recording, Role::Client, None).await;
        write_messages(&mut client, &mut queue)
            .await
            .expect("write");
        let ops = client.get_ref().ops.clone();
        assert_eq!(
            ops.iter().filter(|op| matches!(op, Op::Write(_))).count(),
            1,
            "every queued message in one write: {ops:?}"
        );
        assert_eq!(ops.last(), Some(&Op::Flush));
        drop(client);
        let mut server = WebSocketStream::from_raw_socket(b, Role::Server, None).await;
        let mut got = Vec::new();
        while got.len() < datagrams.len() {
            match tokio::time::timeout(Duration::from_secs(5), server.next()).await {
                Ok(Some(Ok(Message::Binary(b)))) => got.push(b.to_vec()),
                other => panic!("unexpected {other:?}"),
            }
        }
        assert_eq!(got, datagrams);
    }
}
