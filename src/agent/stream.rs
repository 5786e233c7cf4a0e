//! The member's stream to a relay, for networks where UDP is blocked: plain TCP with 2-byte
//! length framing on the relay's main port, or WebSocket-over-TLS on its TLS endpoint (usually
//! TCP 443), optionally through an HTTP CONNECT proxy (`HTTPS_PROXY`).
//!
//! Either way a [`RelayStream`] carries whole relay datagrams, the bytes one UDP payload would
//! carry. The TLS certificate is not checked: the relay proves its key through the relay
//! protocol itself (sealed replies only its key can make), so a self-signed certificate, a
//! TLS-inspecting middlebox or a proxy's certificate changes nothing about whom the member
//! trusts. TLS here only makes the traffic look like, and pass as, HTTPS.

use std::io;
use std::sync::Arc;

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use futures_util::{SinkExt as _, StreamExt as _};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::rustls::client::danger::{
    HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier,
};
use tokio_rustls::rustls::crypto::{self, WebPkiSupportedAlgorithms};
use tokio_rustls::rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use tokio_rustls::rustls::{self, ClientConfig, DigitallySignedStruct, SignatureScheme};
use tokio_rustls::TlsConnector;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::WebSocketStream;

use crate::relay::tcp::{read_frame, write_frame, CONNECT_TIMEOUT, MAX_FRAME};
use crate::relay::ws::ws_config;
use crate::wire::token::RelayEndpoint;

/// Longest HTTP response header accepted from a CONNECT proxy: real proxies answer in a few
/// hundred bytes; the cap keeps a hostile one from growing our buffer.
const MAX_PROXY_RESPONSE: usize = 8 * 1024;

/// How to reach the relay over a stream (the node's relay session chooses).
pub(crate) use crate::node::StreamKind;

/// An HTTP CONNECT proxy.
#[derive(Clone, PartialEq, Eq)]
pub(crate) struct ProxyConfig {
    /// `host:port` of the proxy.
    pub(crate) host_port: String,
    /// `user:password` for basic authentication, if the URL had it.
    pub(crate) credentials: Option<String>,
}

impl std::fmt::Debug for ProxyConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The password stays out of logs.
        f.debug_struct("ProxyConfig")
            .field("host_port", &self.host_port)
            .field("credentials", &self.credentials.as_ref().map(|_| "…"))
            .finish()
    }
}

impl ProxyConfig {
    /// The proxy named by `HTTPS_PROXY` (or `https_proxy`), if set and valid (an invalid one
    /// is logged and ignored).
    pub(crate) fn from_env() -> Option<Self> {
        let url = ["HTTPS_PROXY", "https_proxy"]
            .iter()
            .find_map(|v| std::env::var(v).ok().filter(|s| !s.trim().is_empty()))?;
        match Self::parse(&url) {
            Ok(p) => Some(p),
            Err(e) => {
                tracing::warn!("ignoring HTTPS_PROXY: {e}");
                None
            }
        }
    }

    /// Parses `[http://][user:password@]host[:port]` (port 80 by default, as curl does).
    pub(crate) fn parse(url: &str) -> Result<Self, String> {
        let rest = url.trim();
        let rest = match rest.split_once("://") {
            Some(("http" | "HTTP", rest)) => rest,
            Some((scheme, _)) => {
                return Err(format!(
                    "proxy scheme {scheme:?} is not supported (use http://)"
                ))
            }
            None => rest,
        };
        let rest = rest.trim_end_matches('/');
        let (credentials, host_port) = match rest.rsplit_once('@') {
            Some((c, h)) => (Some(percent_decode(c)?), h),
            None => (None, rest),
        };
        if host_port.is_empty() || host_port.contains('/') {
            return Err(format!("{url:?} is not a proxy URL"));
        }
        let has_port = match host_port.rsplit_once(':') {
            Some((h, p)) => !h.ends_with(':') && !p.contains(']') && p.parse::<u16>().is_ok(),
            None => false,
        };
        let host_port = if has_port {
            host_port.to_string()
        } else {
            format!("{host_port}:80")
        };
        Ok(Self {
            host_port,
            credentials,
        })
    }
}

/// Decodes `%XX` escapes (proxy URLs escape `@` and `:` in passwords).
fn percent_decode(text: &str) -> Result<String, String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = text
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| "bad %-escape in the proxy credentials".to_string())?;
            out.push(hex);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| "proxy credentials are not UTF-8".to_string())
}

/// A stream to a relay that carries whole relay datagrams.
pub(crate) enum RelayStream {
    /// Length-framed TCP.
    Tcp(TcpStream),
    /// WebSocket binary messages over TLS.
    Tls(Box<WebSocketStream<TlsStream<TcpStream>>>),
}

impl std::fmt::Debug for RelayStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            RelayStream::Tcp(_) => "RelayStream::Tcp",
            RelayStream::Tls(_) => "RelayStream::Tls",
        })
    }
}

impl RelayStream {
    /// The kind of stream.
    pub(crate) fn kind(&self) -> StreamKind {
        match self {
            RelayStream::Tcp(_) => StreamKind::Tcp,
            RelayStream::Tls(_) => StreamKind::Tls,
        }
    }

    /// Sends one datagram.
    pub(crate) async fn send(&mut self, datagram: &[u8]) -> io::Result<()> {
        match self {
            RelayStream::Tcp(s) => write_frame(s, datagram).await,
            RelayStream::Tls(ws) => ws
                .send(Message::Binary(datagram.to_vec().into()))
                .await
                .map_err(ws_error),
        }
    }

    /// The next datagram; `Ok(None)` when the relay closed the stream.
    pub(crate) async fn recv(&mut self) -> io::Result<Option<Vec<u8>>> {
        match self {
            RelayStream::Tcp(s) => read_frame(s).await,
            RelayStream::Tls(ws) => loop {
                match ws.next().await {
                    Some(Ok(Message::Binary(b))) => return Ok(Some(b.to_vec())),
                    Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => {}
                    Some(Ok(Message::Close(_))) | None => return Ok(None),
                    Some(Ok(Message::Text(_))) => {
                        return Err(io::Error::new(
                            io::ErrorKind::InvalidData,
                            "the relay sent a text message",
                        ))
                    }
                    Some(Err(e)) => return Err(ws_error(e)),
                }
            },
        }
    }
}

fn ws_error(e: tungstenite::Error) -> io::Error {
    if let tungstenite::Error::Io(e) = e {
        e
    } else {
        io::Error::other(e)
    }
}

/// Opens a stream of `kind` to `relay` within [`CONNECT_TIMEOUT`]; a TLS stream goes through
/// `proxy` when given (a TCP stream never does: CONNECT proxies usually allow port 443 only).
pub(crate) async fn connect_stream(
    relay: &RelayEndpoint,
    kind: StreamKind,
    proxy: Option<ProxyConfig>,
) -> io::Result<RelayStream> {
    tokio::time::timeout(CONNECT_TIMEOUT, connect(relay, kind, proxy))
        .await
        .map_err(|_| {
            io::Error::new(
                io::ErrorKind::TimedOut,
                format!("connecting to relay {} timed out", relay.host_port()),
            )
        })?
}

async fn connect(
    relay: &RelayEndpoint,
    kind: StreamKind,
    proxy: Option<ProxyConfig>,
) -> io::Result<RelayStream> {
    match kind {
        StreamKind::Tcp => {
            let s = TcpStream::connect(relay.host_port()).await?;
            let _ = s.set_nodelay(true);
            Ok(RelayStream::Tcp(s))
        }
        StreamKind::Tls => {
            let tls = relay.tls.as_ref().ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::NotFound,
                    format!(
                        "relay {} has no TLS endpoint in the token",
                        relay.host_port()
                    ),
                )
            })?;
            let target = host_port(&relay.host, tls.port);
            let tcp = match &proxy {
                Some(p) => proxy_connect(p, &target).await?,
                None => TcpStream::connect(&target).await?,
            };
            let _ = tcp.set_nodelay(true);
            let name = ServerName::try_from(relay.host.clone()).map_err(|e| {
                io::Error::new(io::ErrorKind::InvalidInput, format!("{}: {e}", relay.host))
            })?;
            let tls_stream = TlsConnector::from(Arc::new(any_certificate_config()?))
                .connect(name, tcp)
                .await?;
            let url = format!("wss://{target}{}", tls.path);
            let (ws, _) = tokio_tungstenite::client_async_with_config(
                url,
                tls_stream,
                Some(ws_config(MAX_FRAME)),
            )
            .await
            .map_err(ws_error)?;
            Ok(RelayStream::Tls(Box::new(ws)))
        }
    }
}

fn host_port(host: &str, port: u16) -> String {
    if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

/// Opens a tunnel to `target` through an HTTP CONNECT proxy.
async fn proxy_connect(proxy: &ProxyConfig, target: &str) -> io::Result<TcpStream> {
    let mut s = TcpStream::connect(&proxy.host_port).await?;
    let mut request = format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n");
    if let Some(c) = &proxy.credentials {
        request.push_str(&format!(
            "Proxy-Authorization: Basic {}\r\n",
            STANDARD.encode(c)
        ));
    }
    request.push_str("\r\n");
    s.write_all(request.as_bytes()).await?;
    // Read byte by byte up to the blank line: nothing of the tunnel may be consumed here.
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        if head.len() >= MAX_PROXY_RESPONSE {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "the proxy's answer is too long",
            ));
        }
        head.push(s.read_u8().await?);
    }
    let status = proxy_status(&head).ok_or_else(|| {
        io::Error::new(io::ErrorKind::InvalidData, "the proxy did not answer HTTP")
    })?;
    if !(200..300).contains(&status) {
        return Err(io::Error::new(
            io::ErrorKind::ConnectionRefused,
            format!(
                "proxy {} refused CONNECT {target} with HTTP {status}",
                proxy.host_port
            ),
        ));
    }
    Ok(s)
}

/// The status code of an HTTP response head.
fn proxy_status(head: &[u8]) -> Option<u16> {
    let line = head.split(|b| *b == b'\r').next()?;
    let line = std::str::from_utf8(line).ok()?;
    let mut parts = line.split_whitespace();
    if !parts.next()?.starts_with("HTTP/1.") {
        return None;
    }
    parts.next()?.parse().ok()
}

/// A TLS client configuration that accepts any certificate but still checks the handshake's
/// signatures (so the session is at least bound to the certificate it shows).
fn any_certificate_config() -> io::Result<ClientConfig> {
    let provider = Arc::new(crypto::ring::default_provider());
    let verifier = Arc::new(AnyCertificate {
        algorithms: provider.signature_verification_algorithms,
    });
    Ok(ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(io::Error::other)?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth())
}

/// Accepts every certificate: the relay is authenticated by its key, not by TLS.
#[derive(Debug)]
struct AnyCertificate {
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;
    use std::path::PathBuf;
    use std::time::Duration;

    use tokio::io::{AsyncBufReadExt as _, BufReader};
    use tokio::net::TcpListener;
    use tokio::task::JoinHandle;

    use super::*;
    use crate::keys::PeerKey;
    use crate::relay::driver::{self, RelayOptions};
    use crate::relay::ws::WsOptions;
    use crate::wire::token::{TlsEndpoint, KEY_REQUEST_WITH_TLS_LEN};
    use crate::wire::{self, Frame};

    /// A relay running in this process on loopback, stopped when dropped.
    struct Relay {
        endpoint: RelayEndpoint,
        task: JoinHandle<anyhow::Result<()>>,
        dir: PathBuf,
    }

    impl Drop for Relay {
        fn drop(&mut self) {
            self.task.abort();
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    /// Starts a relay with a TLS listener on free loopback ports (retrying if a port was taken
    /// between probing and binding).
    async fn start_relay(name: &str, path: &str) -> Relay {
        let dir =
            std::env::temp_dir().join(format!("meshvpn-stream-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("temp dir");
        let key = driver::load_or_create_key(&dir)
            .expect("relay key")
            .public();
        for _ in 0..20 {
            let port = std::net::UdpSocket::bind("127.0.0.1:0")
                .and_then(|s| s.local_addr())
                .expect("probe UDP port")
                .port();
            let tls_port = std::net::TcpListener::bind("127.0.0.1:0")
                .and_then(|s| s.local_addr())
                .expect("probe TCP port")
                .port();
            let listen: SocketAddr = ([127, 0, 0, 1], port).into();
            let opts = RelayOptions {
                listen,
                ws: WsOptions {
                    tls_listen: Some(([127, 0, 0, 1], tls_port).into()),
                    cert: None,
                    ws_listen: None,
                    path: path.to_string(),
                    advertise_tls: None,
                },
                config_dir: dir.clone(),
                run_dir: dir.clone(),
                tcp_max_connections: None,
                tcp_per_source: None,
                server: Default::default(),
                metrics: None,
            };
            let task = tokio::spawn(async move { driver::run(&opts).await });
            for _ in 0..100 {
                if task.is_finished() {
                    break;
                }
                if TcpStream::connect(("127.0.0.1", tls_port)).await.is_ok() {
                    return Relay {
                        endpoint: RelayEndpoint {
                            key,
                            host: "127.0.0.1".into(),
                            port,
                            tls: Some(TlsEndpoint {
                                port: tls_port,
                                path: path.into(),
                            }),
                        },
                        task,
                        dir,
                    };
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            task.abort();
        }
        panic!("no relay could start on loopback");
    }

    /// Asks the relay for its key (and TLS endpoint) over `stream`.
    async fn ask_key(stream: &mut RelayStream) -> (PeerKey, Option<TlsEndpoint>) {
        let mut request = Frame::KeyRequest.to_vec();
        request.resize(KEY_REQUEST_WITH_TLS_LEN, 0);
        stream.send(&request).await.expect("send");
        let reply = tokio::time::timeout(Duration::from_secs(5), stream.recv())
            .await
            .expect("an answer within 5 s")
            .expect("read")
            .expect("not closed");
        let Ok(Frame::KeyResponse { relay }) = Frame::parse(&reply) else {
            panic!("not a key response: {reply:?}");
        };
        let tls = reply
            .get(wire::RELAY_OVERHEAD..)
            .and_then(TlsEndpoint::decode);
        (relay, tls)
    }

    #[tokio::test]
    async fn tcp_and_tls_streams_carry_datagrams_to_a_real_relay() {
        let relay = start_relay("direct", "/meshvpn").await;
        for kind in [StreamKind::Tcp, StreamKind::Tls] {
            let mut stream = connect_stream(&relay.endpoint, kind, None)
                .await
                .expect("connect");
            assert_eq!(stream.kind(), kind);
            let (key, tls) = ask_key(&mut stream).await;
            assert_eq!(key, relay.endpoint.key, "{kind:?}");
            assert_eq!(tls, relay.endpoint.tls, "{kind:?}");
        }
        // The wrong path is refused by the relay's HTTP upgrade.
        let mut wrong = relay.endpoint.clone();
        wrong.tls = Some(TlsEndpoint {
            port: relay.endpoint.tls.as_ref().expect("tls").port,
            path: "/other".into(),
        });
        assert!(connect_stream(&wrong, StreamKind::Tls, None).await.is_err());
        // A relay without a TLS endpoint in the token is reported as such.
        let mut none = relay.endpoint.clone();
        none.tls = None;
        let e = connect_stream(&none, StreamKind::Tls, None)
            .await
            .expect_err("no endpoint");
        assert_eq!(e.kind(), io::ErrorKind::NotFound);
    }

    /// A one-connection-at-a-time CONNECT proxy on loopback that requires `credentials`;
    /// returns its address and a channel of the targets it tunnelled to.
    async fn connect_proxy(
        credentials: &'static str,
    ) -> (SocketAddr, tokio::sync::mpsc::UnboundedReceiver<String>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (seen_tx, seen) = tokio::sync::mpsc::unbounded_channel();
        let expected = format!(
            "proxy-authorization: basic {}",
            STANDARD.encode(credentials)
        );
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let mut client = BufReader::new(client);
                let mut target = None;
                let mut authorized = false;
                loop {
                    let mut line = String::new();
                    if client.read_line(&mut line).await.unwrap_or(0) == 0 {
                        break;
                    }
                    let line = line.trim_end();
                    if line.is_empty() {
                        break;
                    }
                    if let Some(rest) = line.strip_prefix("CONNECT ") {
                        target = rest.split_whitespace().next().map(str::to_string);
                    }
                    authorized |= line.eq_ignore_ascii_case(&expected);
                }
                let mut client = client.into_inner();
                let (Some(target), true) = (target, authorized) else {
                    let _ = client
                        .write_all(b"HTTP/1.1 407 Proxy Authentication Required\r\n\r\n")
                        .await;
                    continue;
                };
                let Ok(mut upstream) = TcpStream::connect(&target).await else {
                    let _ = client.write_all(b"HTTP/1.1 502 Bad Gateway\r\n\r\n").await;
                    continue;
                };
                let _ = seen_tx.send(target);
                let _ = client
                    .write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
                    .await;
                tokio::spawn(async move {
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
                });
            }
        });
        (addr, seen)
    }

    #[tokio::test]
    async fn tls_stream_goes_through_an_http_connect_proxy() {
        let relay = start_relay("proxy", "/behind/proxy").await;
        let (proxy, mut seen) = connect_proxy("user:p@ss").await;
        let config = ProxyConfig::parse(&format!("http://user:p%40ss@{proxy}/")).expect("url");
        let mut stream = connect_stream(&relay.endpoint, StreamKind::Tls, Some(config))
            .await
            .expect("connect through the proxy");
        let tls = relay.endpoint.tls.as_ref().expect("tls");
        assert_eq!(
            seen.try_recv().ok(),
            Some(format!("127.0.0.1:{}", tls.port)),
            "the stream went through the proxy"
        );
        let (key, _) = ask_key(&mut stream).await;
        assert_eq!(key, relay.endpoint.key);

        let wrong = ProxyConfig::parse(&format!("user:nope@{proxy}")).expect("url");
        let e = connect_stream(&relay.endpoint, StreamKind::Tls, Some(wrong))
            .await
            .expect_err("wrong credentials");
        assert_eq!(e.kind(), io::ErrorKind::ConnectionRefused);
        assert!(e.to_string().contains("407"), "{e}");
    }

    #[test]
    fn proxy_urls() {
        let p = ProxyConfig::parse("http://proxy.example.org:3128").expect("plain");
        assert_eq!(p.host_port, "proxy.example.org:3128");
        assert_eq!(p.credentials, None);
        let p = ProxyConfig::parse("u:p%3Aw@10.0.0.1").expect("no scheme, no port");
        assert_eq!(p.host_port, "10.0.0.1:80");
        assert_eq!(p.credentials.as_deref(), Some("u:p:w"));
        let p = ProxyConfig::parse("http://[2001:db8::1]:8080/").expect("ipv6");
        assert_eq!(p.host_port, "[2001:db8::1]:8080");
        assert!(!format!(
            "{:?}",
            ProxyConfig::parse("http://u:secret@h:1").expect("ok")
        )
        .contains("secret"));
        assert!(ProxyConfig::parse("socks5://h:1080").is_err());
        assert!(ProxyConfig::parse("http://").is_err());
        assert!(ProxyConfig::parse("http://u:%zz@h:1").is_err());
        assert_eq!(proxy_status(b"HTTP/1.1 200 OK\r\n\r\n"), Some(200));
        assert_eq!(proxy_status(b"HTTP/1.0 407 Auth\r\n\r\n"), Some(407));
        assert_eq!(proxy_status(b"SSH-2.0-x\r\n\r\n"), None);
    }
}
