//! The relay's TCP plumbing: the open-file limit, the accept task and one task per connection.
//!
//! Decisions (accept or refuse, when to close, what to queue) are made by the relay's loop with
//! a [`ConnTable`](super::limits::ConnTable); this module only moves bytes and reports:
//!
//! - [`raise_descriptor_limit`] lifts the soft `RLIMIT_NOFILE` to the hard limit at start, so a
//!   relay started from a shell (soft limit 1,024) gets what the system allows;
//! - [`accept_loop`] accepts streams and hands them to the loop; when `accept` fails for lack
//!   of descriptors (`EMFILE`/`ENFILE`) it reports it and pauses [`ACCEPT_BACKOFF`] instead of
//!   retrying at once (the pending connection stays in the backlog, so an immediate retry fails
//!   again and the task would spin at full CPU);
//! - [`serve_connection`] reads frames through a [`FrameDecoder`] and writes queued datagrams
//!   in batches — every datagram already queued, framed into one reused [`FrameBatch`] and
//!   written at once — reporting frames, written bytes and the end of the stream as
//!   [`ConnEvent`]s.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

use super::status::Descriptors;
use super::tcp::{FrameBatch, FrameDecoder};
use super::ws::Framing;

/// Pause after `accept` failed for lack of descriptors: long enough that a relay at its limit
/// uses no measurable CPU, short enough that a slot freed by a closing connection is reused
/// within a round trip or two.
pub const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);
/// Pause after any other `accept` failure (usually a connection reset while queued), which
/// does not repeat by itself.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(5);
/// Bytes read from a stream at once: a couple of full-size frames; small because every idle
/// connection keeps this buffer.
const READ_CHUNK: usize = 2048;
/// Ceiling for the raised soft limit when the hard limit is "unlimited" (Linux's default
/// `fs.nr_open`).
const NOFILE_FALLBACK_CEILING: u64 = 1 << 20;

/// What the accept task hands to the relay's loop.
#[derive(Debug)]
pub enum Accepted {
    /// A new stream, and how the listener it came from frames datagrams.
    Stream(TcpStream, SocketAddr, Framing),
    /// `accept` failed; `descriptors` if for lack of file descriptors.
    Error {
        /// `EMFILE` or `ENFILE`.
        descriptors: bool,
        /// The error, for the log.
        error: std::io::Error,
    },
}

/// What a connection task reports to the relay's loop.
#[derive(Debug)]
pub enum ConnEvent {
    /// Whole frames received, in order.
    Frames {
        /// The connection.
        id: u64,
        /// The frames.
        frames: Vec<Vec<u8>>,
    },
    /// Queued datagrams of `bytes` bytes in total were written.
    Sent {
        /// The connection.
        id: u64,
        /// Their length, as accounted when queued.
        bytes: usize,
    },
    /// The peer announced a frame over the cap; the task closed the stream.
    FrameTooLong {
        /// The connection.
        id: u64,
        /// The announced length.
        announced: usize,
    },
    /// The stream ended (end of stream, error, or the loop dropped its queue).
    Closed {
        /// The connection.
        id: u64,
    },
}

/// Raises the soft open-file limit to the hard one (when below it) and logs both. Never fails:
/// a sandbox that forbids `setrlimit` leaves the limit as it was, and the relay sizes its
/// connection table to what it has.
pub fn raise_descriptor_limit() -> Descriptors {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we own.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        let e = std::io::Error::last_os_error();
        tracing::warn!(%e, "cannot read the open-file limit; assuming 1024");
        return Descriptors {
            soft_at_start: 1024,
            hard: 1024,
            soft: 1024,
        };
    }
    let soft_at_start = limit.rlim_cur;
    let hard = limit.rlim_max;
    let target = if hard == libc::RLIM_INFINITY {
        std::fs::read_to_string("/proc/sys/fs/nr_open")
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(NOFILE_FALLBACK_CEILING)
    } else {
        hard
    };
    let mut soft = soft_at_start;
    if soft < target {
        let raised = libc::rlimit {
            rlim_cur: target,
            rlim_max: hard,
        };
        // SAFETY: setrlimit reads the struct we own.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            soft = target;
        } else {
            let e = std::io::Error::last_os_error();
            tracing::warn!(%e, soft, hard, "cannot raise the open-file limit");
        }
    }
    tracing::info!(soft_at_start, hard, soft, "open-file limit");
    Descriptors {
        soft_at_start,
        hard,
        soft,
    }
}

/// Accepts streams and hands them to the loop, each with `framing`, until the loop is gone.
pub async fn accept_loop(listener: TcpListener, framing: Framing, to_loop: mpsc::Sender<Accepted>) {
    loop {
        let accepted = match listener.accept().await {
            Ok((stream, remote)) => Accepted::Stream(stream, remote, framing.clone()),
            Err(error) => {
                let descriptors = matches!(error.raw_os_error(), Some(libc::EMFILE | libc::ENFILE));
                let pause = if descriptors {
                    ACCEPT_BACKOFF
                } else {
                    ACCEPT_ERROR_PAUSE
                };
                // The report is best effort: a busy loop loses a count, never the pause.
                match to_loop.try_send(Accepted::Error { descriptors, error }) {
                    Ok(()) | Err(mpsc::error::TrySendError::Full(_)) => {}
                    Err(mpsc::error::TrySendError::Closed(_)) => return,
                }
                tokio::time::sleep(pause).await;
                continue;
            }
        };
        if to_loop.send(accepted).await.is_err() {
            return;
        }
    }
}

/// Serves connection `id`: frames in (capped at `max_frame` bytes), queued datagrams out.
/// Ends when the stream ends, a frame is over the cap, or the loop drops `outbound`.
pub async fn serve_connection(
    stream: TcpStream,
    id: u64,
    max_frame: usize,
    mut outbound: mpsc::UnboundedReceiver<Vec<u8>>,
    events: mpsc::Sender<ConnEvent>,
) {
    let _ = stream.set_nodelay(true);
    let (mut read, mut write) = stream.into_split();
    let mut decoder = FrameDecoder::new(max_frame);
    let mut chunk = vec![0u8; READ_CHUNK];
    let mut batch = FrameBatch::new();
    loop {
        tokio::select! {
            r = read.read(&mut chunk) => {
                let n = match r {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                };
                decoder.handle_bytes(&chunk[..n]);
                let mut frames = Vec::new();
                loop {
                    match decoder.poll_frame() {
                        Ok(Some(frame)) => frames.push(frame),
                        Ok(None) => break,
                        Err(e) => {
                            let _ = events.send(ConnEvent::FrameTooLong { id, announced: e.announced }).await;
                            return;
                        }
                    }
                }
                if !frames.is_empty() && events.send(ConnEvent::Frames { id, frames }).await.is_err() {
                    return;
                }
            }
            first = outbound.recv() => {
                let Some(first) = first else { break };
                // Datagrams come from one UDP payload or one frame, so they always fit a frame.
                batch.gather(&first, || outbound.try_recv().ok());
                let Ok(bytes) = batch.write_to(&mut write).await else { break };
                // Flushed only once the queue is empty (a no-op on a plain TCP stream, where
                // `write_all` already handed every byte to the kernel).
                if outbound.is_empty() && write.flush().await.is_err() {
                    break;
                }
                if events.send(ConnEvent::Sent { id, bytes }).await.is_err() {
                    return;
                }
            }
        }
    }
    let _ = events.send(ConnEvent::Closed { id }).await;
}

#[cfg(test)]
// "Any other event" is exactly what these tests mean to reject.
#[allow(clippy::wildcard_enum_match_arm)]
mod tests {
    use super::*;
    use crate::relay::tcp::{encode_frame, MAX_FRAME, WRITE_BATCH_BYTES};

    async fn pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let client = TcpStream::connect(addr).await.expect("connect");
        let (server, _) = listener.accept().await.expect("accept");
        (client, server)
    }

    async fn next(events: &mut mpsc::Receiver<ConnEvent>) -> ConnEvent {
        tokio::time::timeout(Duration::from_secs(5), events.recv())
            .await
            .expect("an event within 5 s")
            .expect("task alive")
    }

    #[tokio::test]
    async fn frames_in_batches_out_and_an_oversized_length_closes() {
        let (mut client, server) = pair().await;
        let (out_tx, out_rx) = mpsc::unbounded_channel();
        let (ev_tx, mut events) = mpsc::channel(16);
        let task = tokio::spawn(serve_connection(server, 7, 100, out_rx, ev_tx));

        let mut two = Vec::new();
        encode_frame(&mut two, b"one");
        encode_frame(&mut two, b"two");
        client.write_all(&two).await.expect("write");
        let mut got = Vec::new();
        while got.len() < 2 {
            match next(&mut events).await {
                ConnEvent::Frames { id: 7, frames } => got.extend(frames),
                other => panic!("unexpected {other:?}"),
            }
        }
        assert_eq!(got, vec![b"one".to_vec(), b"two".to_vec()]);

        for d in [&b"a"[..], b"bc", b"def"] {
            out_tx.send(d.to_vec()).expect("queue");
        }
        let mut sent = 0;
        while sent < 6 {
            match next(&mut events).await {
                ConnEvent::Sent { id: 7, bytes } => sent += bytes,
                other => panic!("unexpected {other:?}"),
            }
        }
        let mut back = [0u8; 12];
        client.read_exact(&mut back).await.expect("read");
        assert_eq!(&back, b"\x00\x01a\x00\x02bc\x00\x03def");

        client.write_all(&[0x01, 0x00]).await.expect("write");
        match next(&mut events).await {
            ConnEvent::FrameTooLong { id: 7, announced } => assert_eq!(announced, 256),
            other => panic!("unexpected {other:?}"),
        }
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("task ends")
            .expect("task ok");
        let mut rest = Vec::new();
        let n = tokio::time::timeout(Duration::from_secs(5), client.read_to_end(&mut rest))
            .await
            .expect("eof within 5 s")
            .unwrap_or(0);
        assert_eq!(n, 0, "the stream is closed");
    }

    #[tokio::test]
    async fn datagrams_queued_together_go_out_in_one_write_and_a_long_queue_in_bounded_ones() {
        let (mut client, server) = pair().await;
        let (out_tx, out_rx) = mpsc::unbounded_channel();
        // Queued before the task runs: all of it is waiting at its first look.
        let small: Vec<Vec<u8>> = (0..10u8).map(|i| vec![i; 100 + usize::from(i)]).collect();
        for d in &small {
            out_tx.send(d.clone()).expect("queue");
        }
        let (ev_tx, mut events) = mpsc::channel(16);
        tokio::spawn(serve_connection(server, 5, 100, out_rx, ev_tx));
        let total: usize = small.iter().map(Vec::len).sum();
        match next(&mut events).await {
            ConnEvent::Sent { id: 5, bytes } => {
                assert_eq!(bytes, total, "one write carried every queued datagram")
            }
            other => panic!("unexpected {other:?}"),
        }
        let mut decoder = FrameDecoder::new(MAX_FRAME);
        let mut got = Vec::new();
        let mut chunk = [0u8; 4096];
        while got.len() < small.len() {
            let n = tokio::time::timeout(Duration::from_secs(5), client.read(&mut chunk))
                .await
                .expect("bytes within 5 s")
                .expect("read");
            assert_ne!(n, 0, "stream ended early");
            decoder.handle_bytes(&chunk[..n]);
            while let Some(frame) = decoder.poll_frame().expect("valid frames") {
                got.push(frame);
            }
        }
        assert_eq!(got, small);

        // More than one batch's worth waiting: several writes, none much over the cap.
        tokio::spawn(async move { tokio::io::copy(&mut client, &mut tokio::io::sink()).await });
        let big = vec![7u8; 1400];
        let count = 3 * WRITE_BATCH_BYTES / big.len();
        for _ in 0..count {
            out_tx.send(big.clone()).expect("queue");
        }
        let mut sent = Vec::new();
        while sent.iter().sum::<usize>() < count * big.len() {
            match next(&mut events).await {
                ConnEvent::Sent { id: 5, bytes } => sent.push(bytes),
                other => panic!("unexpected {other:?}"),
            }
        }
        assert!(sent.len() >= 3, "{sent:?}");
        assert!(
            sent.iter().all(|b| *b < WRITE_BATCH_BYTES + big.len()),
            "every write stays within the cap plus one datagram: {sent:?}"
        );
    }

    #[tokio::test]
    async fn dropping_the_queue_closes_the_connection() {
        let (mut client, server) = pair().await;
        let (out_tx, out_rx) = mpsc::unbounded_channel();
        let (ev_tx, mut events) = mpsc::channel(16);
        tokio::spawn(serve_connection(server, 3, 100, out_rx, ev_tx));
        drop(out_tx);
        match next(&mut events).await {
            ConnEvent::Closed { id: 3 } => {}
            other => panic!("unexpected {other:?}"),
        }
        let mut rest = Vec::new();
        let n = tokio::time::timeout(Duration::from_secs(5), client.read_to_end(&mut rest))
            .await
            .expect("eof within 5 s")
            .expect("clean eof");
        assert_eq!(n, 0);
    }
}
