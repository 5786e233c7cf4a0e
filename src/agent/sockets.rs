//! The extra UDP sockets of birthday probes (see `node::birthday`): opened on first use on any
//! free port, each read by its own task, closed when the node no longer lists them.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

/// A datagram that arrived on an extra socket: (socket number, sender, bytes).
pub(crate) type Received = (u16, SocketAddr, Vec<u8>);

/// The agent's extra sockets.
pub(crate) struct ExtraSockets {
    open: BTreeMap<u16, (Arc<UdpSocket>, JoinHandle<()>)>,
    tx: mpsc::Sender<Received>,
}

impl ExtraSockets {
    /// No sockets yet; received datagrams will be sent to the returned receiver.
    pub(crate) fn new() -> (Self, mpsc::Receiver<Received>) {
        let (tx, rx) = mpsc::channel(1024);
        (
            Self {
                open: BTreeMap::new(),
                tx,
            },
            rx,
        )
    }

    /// Sends `payload` to `dst` from socket `n`, opening it first if needed.
    pub(crate) async fn send(&mut self, n: u16, dst: SocketAddr, payload: &[u8]) {
        let socket = match self.open.get(&n) {
            Some((s, _)) => s.clone(),
            None => match UdpSocket::bind(("0.0.0.0", 0)).await {
                Ok(s) => {
                    let s = Arc::new(s);
                    let reader = s.clone();
                    let tx = self.tx.clone();
                    let task = tokio::spawn(async move {
                        let mut buf = vec![0u8; 2048];
                        while let Ok((len, from)) = reader.recv_from(&mut buf).await {
                            if tx.send((n, from, buf[..len].to_vec())).await.is_err() {
                                break;
                            }
                        }
                    });
                    self.open.insert(n, (s.clone(), task));
                    s
                }
                Err(e) => {
                    tracing::debug!(%e, socket = n, "cannot open an extra UDP socket");
                    return;
                }
            },
        };
        if let Err(e) = socket.send_to(payload, dst).await {
            tracing::trace!(%e, %dst, socket = n, "UDP send on extra socket failed");
        }
    }

    /// Closes every socket not in `keep`.
    pub(crate) fn retain(&mut self, keep: &BTreeSet<u16>) {
        self.open.retain(|n, (_, task)| {
            let kept = keep.contains(n);
            if !kept {
                task.abort();
            }
            kept
        });
    }
}
