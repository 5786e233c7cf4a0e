//! The member's end of a relay stream: a TCP connection carrying relay datagrams in the
//! framing of [`crate::relay::tcp`], with a reader and a writer task so the agent's loop never
//! blocks on the stream.

use std::net::SocketAddr;

use tokio::net::TcpStream;
use tokio::sync::mpsc;

use crate::relay::tcp::{read_frame, write_frame, CONNECT_TIMEOUT, QUEUE_DEPTH};

/// A member's TCP connection to its relay.
pub(crate) struct TcpRelayClient {
    outbound: mpsc::Sender<Vec<u8>>,
    inbound: mpsc::Receiver<Vec<u8>>,
}

impl TcpRelayClient {
    /// Connects to the relay at `addr` over TCP.
    pub(crate) async fn connect(addr: SocketAddr) -> std::io::Result<Self> {
        let stream = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr))
            .await
            .map_err(|_| {
                std::io::Error::new(std::io::ErrorKind::TimedOut, "TCP connect timed out")
            })??;
        stream.set_nodelay(true)?;
        let (mut read, mut write) = stream.into_split();
        let (out_tx, mut out_rx) = mpsc::channel::<Vec<u8>>(QUEUE_DEPTH);
        let (in_tx, in_rx) = mpsc::channel::<Vec<u8>>(QUEUE_DEPTH);
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
        Ok(Self {
            outbound: out_tx,
            inbound: in_rx,
        })
    }

    /// Queues a datagram for the relay; `false` if the connection is gone. A full queue drops
    /// the datagram, as a congested UDP path would.
    pub(crate) fn send(&self, datagram: Vec<u8>) -> bool {
        match self.outbound.try_send(datagram) {
            Ok(()) | Err(mpsc::error::TrySendError::Full(_)) => true,
            Err(mpsc::error::TrySendError::Closed(_)) => false,
        }
    }

    /// The next datagram from the relay; `None` once the connection closed.
    pub(crate) async fn recv(&mut self) -> Option<Vec<u8>> {
        self.inbound.recv().await
    }
}
