//! Carrying relay datagrams over TCP, for members whose UDP is blocked: the framing both ends
//! share.
//!
//! Each datagram travels as a 2-byte big-endian length followed by the datagram, exactly the
//! bytes that would have been one UDP payload; the relay treats a TCP connection as one more
//! [`Link`](super::server::Link). The member end lives with the agent (`agent::relay_stream`).
//!
//! The relay end reads through a [`FrameDecoder`]: bytes are fed as they arrive and whole frames
//! come out. A length prefix above the decoder's cap is refused as soon as its two bytes are
//! seen, and the buffer only ever grows by bytes actually received, so a peer that sends a
//! length prefix and nothing else costs two bytes of memory, not the 64 KiB it announced.
//!
//! Both ends write through a [`FrameBatch`]: a writer task takes one datagram from its queue,
//! [`gathers`](FrameBatch::gather) every datagram already queued behind it (up to
//! [`WRITE_BATCH_BYTES`]) into one reused buffer and writes them with one `write_all`, so a
//! burst costs one system call and a few full TCP segments instead of one small segment per
//! datagram (the streams run with `TCP_NODELAY`). It flushes only once the queue is empty.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Largest datagram carried (a UDP payload never exceeds it).
pub const MAX_FRAME: usize = u16::MAX as usize;
/// Datagrams queued towards a slow stream before new ones are dropped (UDP semantics: the
/// stream must not grow an unbounded queue).
pub const QUEUE_DEPTH: usize = 512;
/// How long connecting to the relay over TCP may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Bytes of frames gathered into one write: 64 KiB is one TSO super-packet, about 45 full-size
/// datagrams, and a quarter of a relay connection's queue
/// ([`QUEUE_BYTES`](super::limits::QUEUE_BYTES)), so one write drains a burst without
/// letting the buffer, kept for the connection's life, grow past this plus one frame.
pub const WRITE_BATCH_BYTES: usize = 64 * 1024;

/// Length of the big-endian length prefix in front of every frame.
const PREFIX_LEN: usize = 2;

/// Reads one frame; `Ok(None)` on a clean end of stream. The buffer grows with the bytes that
/// arrive, not with the announced length.
pub async fn read_frame<R: AsyncReadExt + Unpin>(r: &mut R) -> std::io::Result<Option<Vec<u8>>> {
    let mut len = [0u8; PREFIX_LEN];
    match r.read_exact(&mut len).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let len = u16::from_be_bytes(len);
    let mut buf = Vec::new();
    r.take(u64::from(len)).read_to_end(&mut buf).await?;
    if buf.len() < usize::from(len) {
        return Err(std::io::ErrorKind::UnexpectedEof.into());
    }
    Ok(Some(buf))
}

/// A frame announced a length above the decoder's cap (the stream cannot be resynchronised:
/// close it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("frame of {announced} bytes is over the {cap}-byte cap")]
pub struct FrameTooLong {
    /// The length the prefix announced.
    pub announced: usize,
    /// The decoder's cap.
    pub cap: usize,
}

/// Splits a byte stream into frames, refusing lengths above a cap before buffering them.
///
/// Feed received bytes with [`handle_bytes`](Self::handle_bytes), then call
/// [`poll_frame`](Self::poll_frame) until it returns `Ok(None)`. After an `Err` the stream is
/// unusable and must be closed.
#[derive(Debug)]
pub struct FrameDecoder {
    cap: usize,
    buf: Vec<u8>,
}

impl FrameDecoder {
    /// A decoder that refuses frames longer than `cap` bytes.
    pub fn new(cap: usize) -> Self {
        Self {
            cap,
            buf: Vec::new(),
        }
    }

    /// Appends bytes received from the stream.
    pub fn handle_bytes(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// The next whole frame, `Ok(None)` if more bytes are needed, or `Err` as soon as a length
    /// prefix above the cap is seen (before any of that frame is buffered).
    pub fn poll_frame(&mut self) -> Result<Option<Vec<u8>>, FrameTooLong> {
        let Some(prefix) = self.buf.get(..PREFIX_LEN) else {
            return Ok(None);
        };
        let len = usize::from(u16::from_be_bytes([prefix[0], prefix[1]]));
        if len > self.cap {
            self.buf = Vec::new();
            return Err(FrameTooLong {
                announced: len,
                cap: self.cap,
            });
        }
        if self.buf.len() < PREFIX_LEN + len {
            return Ok(None);
        }
        let frame = self.buf[PREFIX_LEN..PREFIX_LEN + len].to_vec();
        self.buf.drain(..PREFIX_LEN + len);
        Ok(Some(frame))
    }

    /// Bytes held for a frame not yet complete.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }
}

/// Writes one frame (datagrams longer than [`MAX_FRAME`] are refused).
pub async fn write_frame<W: AsyncWriteExt + Unpin>(
    w: &mut W,
    datagram: &[u8],
) -> std::io::Result<()> {
    let mut frame = Vec::with_capacity(PREFIX_LEN + datagram.len());
    if !encode_frame(&mut frame, datagram) {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "datagram too large for a frame",
        ));
    }
    w.write_all(&frame).await
}

/// Datagrams framed into one buffer for one write (see the module doc).
///
/// [`push`](Self::push) or [`gather`](Self::gather) datagrams, then
/// [`write_to`](Self::write_to) the stream; the buffer is cleared and kept for the next batch,
/// so a busy stream allocates nothing per datagram.
#[derive(Debug, Default)]
pub struct FrameBatch {
    buf: Vec<u8>,
    /// Bytes of the datagrams taken since the last write, framed or not.
    taken: usize,
}

impl FrameBatch {
    /// An empty batch; its buffer grows with the first datagrams and is kept.
    pub fn new() -> Self {
        Self::default()
    }

    /// Frames one datagram into the batch; `false` (and nothing framed) if it is longer than
    /// [`MAX_FRAME`]: it is skipped, never truncated.
    pub fn push(&mut self, datagram: &[u8]) -> bool {
        self.taken += datagram.len();
        encode_frame(&mut self.buf, datagram)
    }

    /// Pushes `first`, then datagrams from `next` (a queue read that does not wait) until it
    /// has none or the batch holds [`WRITE_BATCH_BYTES`].
    pub fn gather(&mut self, first: &[u8], mut next: impl FnMut() -> Option<Vec<u8>>) {
        self.push(first);
        while !self.is_full() {
            let Some(datagram) = next() else { break };
            self.push(&datagram);
        }
    }

    /// Whether the batch holds [`WRITE_BATCH_BYTES`] or more (gathering stops there).
    pub fn is_full(&self) -> bool {
        self.buf.len() >= WRITE_BATCH_BYTES
    }

    /// Whether nothing is framed.
    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    /// Writes the whole batch with one `write_all` (no flush) and empties it, keeping the
    /// buffer; returns the bytes of the datagrams taken (as a queue accounted them, without
    /// the length prefixes). On an error the batch is emptied too: the stream is unusable.
    pub async fn write_to<W: AsyncWrite + Unpin>(&mut self, w: &mut W) -> std::io::Result<usize> {
        let result = w.write_all(&self.buf).await;
        self.buf.clear();
        let taken = std::mem::take(&mut self.taken);
        result.map(|()| taken)
    }
}

/// Appends `datagram` as one frame to `out`; `false` (and nothing appended) if it is longer
/// than [`MAX_FRAME`].
pub fn encode_frame(out: &mut Vec<u8>, datagram: &[u8]) -> bool {
    let Ok(len) = u16::try_from(datagram.len()) else {
        return false;
    };
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(datagram);
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn frames_round_trip_and_eof_is_clean() {
        let (mut a, mut b) = tokio::io::duplex(1 << 16);
        write_frame(&mut a, b"hello").await.expect("write");
        write_frame(&mut a, &[]).await.expect("write empty");
        drop(a);
        assert_eq!(
            read_frame(&mut b).await.expect("read"),
            Some(b"hello".to_vec())
        );
        assert_eq!(read_frame(&mut b).await.expect("read"), Some(Vec::new()));
        assert_eq!(read_frame(&mut b).await.expect("eof"), None);
        let (mut a, _b) = tokio::io::duplex(16);
        assert!(write_frame(&mut a, &vec![0u8; MAX_FRAME + 1])
            .await
            .is_err());
    }

    #[test]
    fn decoder_splits_frames_across_reads() {
        let mut d = FrameDecoder::new(100);
        d.handle_bytes(&[0, 3, b'a']);
        assert_eq!(d.poll_frame(), Ok(None));
        d.handle_bytes(&[b'b', b'c', 0, 0, 0]);
        assert_eq!(d.poll_frame(), Ok(Some(b"abc".to_vec())));
        assert_eq!(d.poll_frame(), Ok(Some(Vec::new())));
        assert_eq!(d.poll_frame(), Ok(None));
        assert_eq!(d.buffered(), 1);
        d.handle_bytes(&[1, b'x']);
        assert_eq!(d.poll_frame(), Ok(Some(b"x".to_vec())));
        assert_eq!(d.buffered(), 0);
    }

    #[test]
    fn decoder_refuses_a_length_over_the_cap_before_buffering_it() {
        let mut d = FrameDecoder::new(1500);
        d.handle_bytes(&[0xFF, 0xFF]);
        assert_eq!(
            d.poll_frame(),
            Err(FrameTooLong {
                announced: 65_535,
                cap: 1500
            })
        );
        assert_eq!(d.buffered(), 0);
        let mut d = FrameDecoder::new(1500);
        d.handle_bytes(&[0x05, 0xDC]);
        assert_eq!(d.poll_frame(), Ok(None), "exactly the cap is allowed");
        assert!(
            d.buf.capacity() < 64,
            "no allocation for the announced length"
        );
    }

    #[tokio::test]
    async fn a_frame_batch_carries_what_was_queued_and_stops_gathering_at_its_cap() {
        let mut queue: std::collections::VecDeque<Vec<u8>> =
            (0..5u8).map(|i| vec![i; usize::from(i) * 10]).collect();
        let mut batch = FrameBatch::new();
        let first = queue.pop_front().expect("queued");
        batch.gather(&first, || queue.pop_front());
        assert!(queue.is_empty(), "everything queued was taken");
        let mut out = Vec::new();
        assert_eq!(batch.write_to(&mut out).await.expect("write"), 100);
        let mut d = FrameDecoder::new(MAX_FRAME);
        d.handle_bytes(&out);
        for i in 0..5u8 {
            assert_eq!(d.poll_frame(), Ok(Some(vec![i; usize::from(i) * 10])));
        }
        assert_eq!(d.poll_frame(), Ok(None));
        assert!(batch.is_empty(), "a write empties the batch");

        let mut queue: std::collections::VecDeque<Vec<u8>> = vec![vec![1u8; 1400]; 100].into();
        let first = queue.pop_front().expect("queued");
        batch.gather(&first, || queue.pop_front());
        assert!(batch.is_full());
        let mut out = Vec::new();
        let bytes = batch.write_to(&mut out).await.expect("write");
        assert!(out.len() >= WRITE_BATCH_BYTES, "{}", out.len());
        assert!(out.len() < WRITE_BATCH_BYTES + 1402, "{}", out.len());
        assert_eq!(bytes, out.len() / 1402 * 1400);
        assert_eq!(queue.len(), 100 - out.len() / 1402, "the rest stays queued");
        assert!(!batch.push(&vec![0; MAX_FRAME + 1]), "too long for a frame");
        assert!(batch.is_empty(), "skipped, not truncated");
    }

    #[tokio::test]
    async fn read_frame_of_a_long_truncated_frame_is_eof() {
        let (mut a, mut b) = tokio::io::duplex(64);
        a.write_all(&[0xFF, 0xFF, 1, 2, 3]).await.expect("write");
        drop(a);
        assert_eq!(
            read_frame(&mut b).await.expect_err("truncated").kind(),
            std::io::ErrorKind::UnexpectedEof
        );
    }

    #[tokio::test]
    async fn truncated_frame_is_an_error() {
        let (mut a, mut b) = tokio::io::duplex(64);
        a.write_all(&[0, 10, 1, 2]).await.expect("write");
        drop(a);
        assert!(read_frame(&mut b).await.is_err());
    }
}
