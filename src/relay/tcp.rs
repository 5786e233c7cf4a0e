//! Carrying relay datagrams over TCP, for members whose UDP is blocked: the framing both ends
//! share.
//!
//! Each datagram travels as a 2-byte big-endian length followed by the datagram, exactly the
//! bytes that would have been one UDP payload; the relay treats a TCP connection as one more
//! [`Link`](super::server::Link). The member end lives with the agent
//! (`agent::tcp_client`).

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Largest datagram carried (a UDP payload never exceeds it).
pub const MAX_FRAME: usize = u16::MAX as usize;
/// Datagrams queued towards a slow stream before new ones are dropped (UDP semantics: the
/// stream must not grow an unbounded queue).
pub const QUEUE_DEPTH: usize = 512;
/// How long connecting to the relay over TCP may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Reads one frame; `Ok(None)` on a clean end of stream.
pub async fn read_frame<R: AsyncReadExt + Unpin>(r: &mut R) -> std::io::Result<Option<Vec<u8>>> {
    let mut len = [0u8; 2];
    match r.read_exact(&mut len).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let mut buf = vec![0u8; usize::from(u16::from_be_bytes(len))];
    r.read_exact(&mut buf).await?;
    Ok(Some(buf))
}

/// Writes one frame (datagrams longer than [`MAX_FRAME`] are refused).
pub async fn write_frame<W: AsyncWriteExt + Unpin>(
    w: &mut W,
    datagram: &[u8],
) -> std::io::Result<()> {
    let len = u16::try_from(datagram.len()).map_err(|_| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "datagram too large for a frame",
        )
    })?;
    let mut frame = Vec::with_capacity(2 + datagram.len());
    frame.extend_from_slice(&len.to_be_bytes());
    frame.extend_from_slice(datagram);
    w.write_all(&frame).await
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

    #[tokio::test]
    async fn truncated_frame_is_an_error() {
        let (mut a, mut b) = tokio::io::duplex(64);
        a.write_all(&[0, 10, 1, 2]).await.expect("write");
        drop(a);
        assert!(read_frame(&mut b).await.is_err());
    }
}
