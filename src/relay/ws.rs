//! The relay over WebSocket, with or without TLS, for members whose network lets only HTTPS out.
//!
//! Each WebSocket binary message carries one relay datagram, the bytes a UDP payload or a TCP
//! frame would carry. A WebSocket connection is one more stream in the relay's
//! [`ConnTable`](super::limits::ConnTable): the same per-source caps, registration deadline,
//! queue caps and counters as a TCP connection, the same [`ConnEvent`]s to the relay's loop; only
//! the framing differs ([`serve_websocket`] instead of [`super::listener::serve_connection`]).
//! Outbound datagrams are written as a TCP connection writes them, in batches: every datagram
//! already queued (up to [`WRITE_BATCH_BYTES`]) is fed to the sink, and the sink is flushed once
//! the queue is empty, so a burst becomes a few large TLS records rather than one per datagram.
//!
//! The TLS handshake and the HTTP upgrade happen inside the connection's task, after the table
//! accepted the connection, so a client that stalls in the handshake holds one slot until the
//! table's registration deadline closes it, exactly like a TCP client that never registers.
//!
//! The certificate is not what members trust: they check the relay's key through the protocol
//! as over UDP and TCP. So by default the relay makes a self-signed certificate once and keeps it
//! beside its key ([`CERT_FILE`], [`CERT_KEY_FILE`]); `--tls-cert`/`--tls-key` replace it with a
//! real one (for a relay that also serves browsers or sits behind a strict proxy).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context as _;
use futures_util::{Sink, SinkExt as _, StreamExt as _};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_rustls::rustls::pki_types::pem::PemObject as _;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::{self, ServerConfig};
use tokio_rustls::TlsAcceptor;
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::http::StatusCode;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::WebSocketStream;

use super::listener::ConnEvent;
use super::tcp::WRITE_BATCH_BYTES;
use crate::config::write_atomic;

/// File in the config directory holding the self-signed certificate (PEM).
pub const CERT_FILE: &str = "relay-tls.crt";
/// File in the config directory holding that certificate's private key (PEM, 0600).
pub const CERT_KEY_FILE: &str = "relay-tls.key";
/// Name in the self-signed certificate (members do not check it; it only has to be valid).
const CERT_NAME: &str = "meshvpn-relay";

/// The WebSocket listeners a relay runs besides UDP and TCP.
#[derive(Debug, Clone, Default)]
pub struct WsOptions {
    /// TCP address for WebSocket-over-TLS (usually port 443).
    pub tls_listen: Option<SocketAddr>,
    /// Certificate chain and private key (PEM files); a self-signed one when absent.
    pub cert: Option<(PathBuf, PathBuf)>,
    /// TCP address for plain WebSocket, behind a reverse proxy that terminates TLS.
    pub ws_listen: Option<SocketAddr>,
    /// HTTP path the WebSocket is served on; other paths get 404.
    pub path: String,
    /// TLS port key responses name instead of `tls_listen`'s, e.g. a reverse proxy's 443 in
    /// front of `ws_listen` (at `path`), so `create` records it in the token.
    pub advertise_tls: Option<u16>,
}

/// How a stream accepted on one of the relay's listeners is framed.
#[derive(Clone)]
pub enum Framing {
    /// 2-byte length prefixes (the relay's main TCP port).
    Tcp,
    /// WebSocket binary messages, inside TLS when `tls` is set.
    WebSocket {
        /// The TLS server configuration, or `None` for plain WebSocket.
        tls: Option<TlsAcceptor>,
        /// The HTTP path to accept.
        path: Arc<str>,
    },
}

impl std::fmt::Debug for Framing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Framing::Tcp => f.write_str("Tcp"),
            Framing::WebSocket { tls, path } => f
                .debug_struct("WebSocket")
                .field("tls", &tls.is_some())
                .field("path", path)
                .finish(),
        }
    }
}

/// The TLS acceptor: the given certificate, or the self-signed one in `config_dir` (made on
/// first start).
pub fn tls_acceptor(
    cert: Option<&(PathBuf, PathBuf)>,
    config_dir: &Path,
) -> anyhow::Result<TlsAcceptor> {
    let (cert_path, key_path) = match cert {
        Some((c, k)) => (c.clone(), k.clone()),
        None => load_or_create_self_signed(config_dir)?,
    };
    let chain = CertificateDer::pem_file_iter(&cert_path)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| anyhow::anyhow!("reading certificate {}: {e}", cert_path.display()))?;
    if chain.is_empty() {
        anyhow::bail!("{}: no certificate in the file", cert_path.display());
    }
    let key = PrivateKeyDer::from_pem_file(&key_path)
        .map_err(|e| anyhow::anyhow!("reading TLS key {}: {e}", key_path.display()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .with_context(|| {
            format!(
                "TLS certificate {} does not match key {}",
                cert_path.display(),
                key_path.display()
            )
        })?;
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// Paths of the self-signed certificate and key in `config_dir`, made (key 0600) if missing.
fn load_or_create_self_signed(config_dir: &Path) -> anyhow::Result<(PathBuf, PathBuf)> {
    let cert_path = config_dir.join(CERT_FILE);
    let key_path = config_dir.join(CERT_KEY_FILE);
    if cert_path.exists() && key_path.exists() {
        return Ok((cert_path, key_path));
    }
    let made = rcgen::generate_simple_self_signed(vec![CERT_NAME.to_string()])
        .context("making a self-signed TLS certificate")?;
    write_atomic(&key_path, made.signing_key.serialize_pem().as_bytes())
        .with_context(|| format!("writing {}", key_path.display()))?;
    write_atomic(&cert_path, made.cert.pem().as_bytes())
        .with_context(|| format!("writing {}", cert_path.display()))?;
    tracing::info!(cert = %cert_path.display(), "made a self-signed TLS certificate");
    Ok((cert_path, key_path))
}

/// WebSocket limits: a message or frame above `max_frame` bytes is refused while being read.
pub fn ws_config(max_frame: usize) -> WebSocketConfig {
    WebSocketConfig::default()
        .max_message_size(Some(max_frame))
        .max_frame_size(Some(max_frame))
}

/// Serves connection `id` accepted with WebSocket framing: TLS (if any), the HTTP upgrade on
/// `path`, then datagrams in and out as in [`super::listener::serve_connection`]. Always ends with
/// [`ConnEvent::Closed`] (or [`ConnEvent::FrameTooLong`]).
pub async fn serve_websocket(
    stream: TcpStream,
    tls: Option<TlsAcceptor>,
    path: Arc<str>,
    id: u64,
    max_frame: usize,
    outbound: mpsc::UnboundedReceiver<Vec<u8>>,
    events: mpsc::Sender<ConnEvent>,
) {
    let _ = stream.set_nodelay(true);
    match tls {
        Some(acceptor) => match acceptor.accept(stream).await {
            Ok(tls) => upgrade_and_serve(tls, &path, id, max_frame, outbound, events).await,
            Err(e) => {
                tracing::debug!(id, %e, "TLS handshake failed");
                let _ = events.send(ConnEvent::Closed { id }).await;
            }
        },
        None => upgrade_and_serve(stream, &path, id, max_frame, outbound, events).await,
    }
}

async fn upgrade_and_serve<S: AsyncRead + AsyncWrite + Unpin>(
    stream: S,
    path: &str,
    id: u64,
    max_frame: usize,
    outbound: mpsc::UnboundedReceiver<Vec<u8>>,
    events: mpsc::Sender<ConnEvent>,
) {
    // The error type is the callback's, fixed by tungstenite.
    #[allow(clippy::result_large_err)]
    let check_path = |req: &Request, resp: Response| -> Result<Response, ErrorResponse> {
        if req.uri().path() == path {
            Ok(resp)
        } else {
            let mut refusal = ErrorResponse::new(Some("not found".into()));
            *refusal.status_mut() = StatusCode::NOT_FOUND;
            Err(refusal)
        }
    };
    match tokio_tungstenite::accept_hdr_async_with_config(
        stream,
        check_path,
        Some(ws_config(max_frame)),
    )
    .await
    {
        Ok(ws) => serve_messages(ws, id, outbound, events).await,
        Err(e) => {
            tracing::debug!(id, %e, "WebSocket upgrade failed");
            let _ = events.send(ConnEvent::Closed { id }).await;
        }
    }
}

/// Moves datagrams between an upgraded WebSocket and the relay's loop.
async fn serve_messages<S: AsyncRead + AsyncWrite + Unpin>(
    ws: WebSocketStream<S>,
    id: u64,
    mut outbound: mpsc::UnboundedReceiver<Vec<u8>>,
    events: mpsc::Sender<ConnEvent>,
) {
    let (mut sink, mut messages) = ws.split();
    loop {
        tokio::select! {
            message = messages.next() => {
                let frame = match message {
                    Some(Ok(Message::Binary(bytes))) => bytes.to_vec(),
                    // Control frames are answered by tungstenite itself.
                    Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => continue,
                    Some(Err(tungstenite::Error::Capacity(
                        tungstenite::error::CapacityError::MessageTooLong { size, .. },
                    ))) => {
                        let _ = events.send(ConnEvent::FrameTooLong { id, announced: size }).await;
                        return;
                    }
                    // A text message is not a datagram: the peer does not speak this protocol.
                    Some(Ok(Message::Text(_) | Message::Close(_)) | Err(_)) | None => break,
                };
                if events.send(ConnEvent::Frames { id, frames: vec![frame] }).await.is_err() {
                    return;
                }
            }
            first = outbound.recv() => {
                let Some(first) = first else { break };
                let Ok(bytes) = feed_queued(&mut sink, first, &mut outbound).await else { break };
                // Flushed only once the queue is empty: what is still queued joins this write.
                if outbound.is_empty() && sink.flush().await.is_err() {
                    break;
                }
                if events.send(ConnEvent::Sent { id, bytes }).await.is_err() {
                    return;
                }
            }
        }
    }
    let _ = sink.close().await;
    let _ = events.send(ConnEvent::Closed { id }).await;
}

/// Feeds `first` and the datagrams queued behind it, up to [`WRITE_BATCH_BYTES`], to `sink` as
/// binary messages (the sink writes when its buffer fills; nothing is flushed); returns their
/// bytes.
async fn feed_queued<S: Sink<Message> + Unpin>(
    sink: &mut S,
    first: Vec<u8>,
    outbound: &mut mpsc::UnboundedReceiver<Vec<u8>>,
) -> Result<usize, S::Error> {
    let mut bytes = first.len();
    sink.feed(Message::Binary(first.into())).await?;
    while bytes < WRITE_BATCH_BYTES {
        let Ok(datagram) = outbound.try_recv() else {
            break;
        };
        bytes += datagram.len();
        sink.feed(Message::Binary(datagram.into())).await?;
    }
    Ok(bytes)
}

#[cfg(test)]
// "Any other event" is exactly what these tests mean to reject.
#[allow(clippy::wildcard_enum_match_arm)]
mod tests {
    use std::time::Duration;

    use tokio::net::TcpListener;

    use super::*;

    async fn next(events: &mut mpsc::Receiver<ConnEvent>) -> ConnEvent {
        tokio::time::timeout(Duration::from_secs(5), events.recv())
            .await
            .expect("an event within 5 s")
            .expect("task alive")
    }

    /// A plain WebSocket connection served as connection 9 with a 100-byte cap, and the
    /// client's result of upgrading on `path`.
    async fn serve(
        path: &str,
    ) -> (
        Result<WebSocketStream<TcpStream>, tungstenite::Error>,
        mpsc::UnboundedSender<Vec<u8>>,
        mpsc::Receiver<ConnEvent>,
    ) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let client = TcpStream::connect(addr).await.expect("connect");
        let (server, _) = listener.accept().await.expect("accept");
        let (out_tx, out_rx) = mpsc::unbounded_channel();
        let (ev_tx, events) = mpsc::channel(16);
        tokio::spawn(serve_websocket(
            server,
            None,
            "/meshvpn".into(),
            9,
            100,
            out_rx,
            ev_tx,
        ));
        let ws = tokio_tungstenite::client_async(format!("ws://{addr}{path}"), client)
            .await
            .map(|(ws, _)| ws);
        (ws, out_tx, events)
    }

    #[tokio::test]
    async fn binary_messages_are_datagrams_both_ways_and_an_oversized_one_closes() {
        let (ws, out_tx, mut events) = serve("/meshvpn").await;
        let mut ws = ws.expect("upgrade on the right path");
        for m in [&b"one"[..], b"two"] {
            ws.send(Message::Binary(m.to_vec().into()))
                .await
                .expect("send");
        }
        let mut got = Vec::new();
        while got.len() < 2 {
            match next(&mut events).await {
                ConnEvent::Frames { id: 9, frames } => got.extend(frames),
                other => panic!("unexpected {other:?}"),
            }
        }
        assert_eq!(got, vec![b"one".to_vec(), b"two".to_vec()]);

        for d in [&b"a"[..], b"bc"] {
            out_tx.send(d.to_vec()).expect("queue");
        }
        let mut back = Vec::new();
        while back.len() < 2 {
            match ws.next().await {
                Some(Ok(Message::Binary(b))) => back.push(b.to_vec()),
                other => panic!("unexpected {other:?}"),
            }
        }
        assert_eq!(back, vec![b"a".to_vec(), b"bc".to_vec()]);
        let mut sent = 0;
        while sent < 3 {
            match next(&mut events).await {
                ConnEvent::Sent { id: 9, bytes } => sent += bytes,
                other => panic!("unexpected {other:?}"),
            }
        }

        ws.send(Message::Binary(vec![0; 101].into()))
            .await
            .expect("send");
        match next(&mut events).await {
            ConnEvent::FrameTooLong { id: 9, announced } => assert_eq!(announced, 101),
            other => panic!("unexpected {other:?}"),
        }
    }

    #[tokio::test]
    async fn datagrams_queued_together_are_sent_together() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let client = TcpStream::connect(addr).await.expect("connect");
        let (server, _) = listener.accept().await.expect("accept");
        let (out_tx, out_rx) = mpsc::unbounded_channel();
        // Queued before the upgrade: all of it is waiting at the writer's first look.
        let datagrams: Vec<Vec<u8>> = (0..6u8).map(|i| vec![i; 30 + usize::from(i)]).collect();
        for d in &datagrams {
            out_tx.send(d.clone()).expect("queue");
        }
        let (ev_tx, mut events) = mpsc::channel(16);
        tokio::spawn(serve_websocket(
            server,
            None,
            "/meshvpn".into(),
            4,
            100,
            out_rx,
            ev_tx,
        ));
        let (mut ws, _) = tokio_tungstenite::client_async(format!("ws://{addr}/meshvpn"), client)
            .await
            .expect("upgrade");
        match next(&mut events).await {
            ConnEvent::Sent { id: 4, bytes } => {
                assert_eq!(bytes, datagrams.iter().map(Vec::len).sum::<usize>())
            }
            other => panic!("unexpected {other:?}"),
        }
        let mut back = Vec::new();
        while back.len() < datagrams.len() {
            match tokio::time::timeout(Duration::from_secs(5), ws.next()).await {
                Ok(Some(Ok(Message::Binary(b)))) => back.push(b.to_vec()),
                other => panic!("unexpected {other:?}"),
            }
        }
        assert_eq!(back, datagrams);
    }

    #[tokio::test]
    async fn another_path_is_refused_and_the_connection_reported_closed() {
        let (ws, _out, mut events) = serve("/elsewhere").await;
        assert!(ws.is_err(), "upgrade on another path must fail");
        match next(&mut events).await {
            ConnEvent::Closed { id: 9 } => {}
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn self_signed_certificate_is_made_once_and_reused() {
        let dir = std::env::temp_dir().join(format!("meshvpn-ws-cert-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("temp dir");
        tls_acceptor(None, &dir).expect("made");
        let first = std::fs::read(dir.join(CERT_FILE)).expect("certificate kept");
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(dir.join(CERT_KEY_FILE))
                .expect("key kept")
                .permissions(),
        );
        assert_eq!(mode & 0o777, 0o600, "the certificate's key is private");
        tls_acceptor(None, &dir).expect("reused");
        assert_eq!(
            std::fs::read(dir.join(CERT_FILE)).expect("still there"),
            first
        );
        let bad = (dir.join(CERT_KEY_FILE), dir.join(CERT_FILE));
        assert!(tls_acceptor(Some(&bad), &dir).is_err(), "files swapped");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
