//! The relay's tokio driver: one UDP socket feeding [`RelayServer`].

use std::net::SocketAddr;
use std::path::Path;
use std::time::Instant;

use anyhow::Context as _;
use rand::RngCore;
use std::collections::BTreeMap;

use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::mpsc;

use super::server::{Link, RelayServer, UnixClock};
use super::tcp;
use crate::config::write_atomic;
use crate::keys::NodeSecret;
use crate::sockaddr;
use crate::wire::stun;

/// File in the config directory that holds the relay's private key.
pub const KEY_FILE: &str = "relay.key";

/// Loads the relay key from `<config_dir>/relay.key`, creating it (0600) on first start.
pub fn load_or_create_key(config_dir: &Path) -> anyhow::Result<NodeSecret> {
    let path = config_dir.join(KEY_FILE);
    match std::fs::read_to_string(&path) {
        Ok(text) => NodeSecret::from_base64(&text)
            .with_context(|| format!("{}: not a base64 32-byte private key", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let key = NodeSecret::generate(&mut rand::rngs::OsRng);
            write_atomic(&path, format!("{}\n", key.to_base64()).as_bytes())
                .with_context(|| format!("writing relay key {}", path.display()))?;
            Ok(key)
        }
        Err(e) => Err(e).with_context(|| format!("reading relay key {}", path.display())),
    }
}

/// Most members attached over TCP at once (each costs two tasks and a queue).
const MAX_TCP_CONNECTIONS: usize = 4096;
/// A TCP member that sends nothing for this long is disconnected; members register every 10 s.
const TCP_IDLE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

enum TcpEvent {
    Datagram(Link, Vec<u8>),
    Closed(Link),
}

/// Runs a TCP member's reader and writer; returns the writer's queue.
fn spawn_tcp_connection(
    stream: TcpStream,
    link: Link,
    events: mpsc::Sender<TcpEvent>,
) -> mpsc::Sender<Vec<u8>> {
    let _ = stream.set_nodelay(true);
    let (mut read, mut write) = stream.into_split();
    let (tx, mut rx) = mpsc::channel::<Vec<u8>>(tcp::QUEUE_DEPTH);
    tokio::spawn(async move {
        while let Some(d) = rx.recv().await {
            if tcp::write_frame(&mut write, &d).await.is_err() {
                break;
            }
        }
    });
    tokio::spawn(async move {
        while let Ok(Ok(Some(d))) =
            tokio::time::timeout(TCP_IDLE_TIMEOUT, tcp::read_frame(&mut read)).await
        {
            if events.send(TcpEvent::Datagram(link, d)).await.is_err() {
                return;
            }
        }
        let _ = events.send(TcpEvent::Closed(link)).await;
    });
    tx
}

/// Runs the relay on `listen` until SIGINT or SIGTERM.
pub async fn run(listen: SocketAddr, config_dir: &Path) -> anyhow::Result<()> {
    let key = load_or_create_key(config_dir)?;
    let socket = UdpSocket::bind(listen).await.map_err(|e| {
        if e.kind() == std::io::ErrorKind::AddrInUse {
            anyhow::anyhow!("UDP {listen} is already in use (is another relay running?)")
        } else {
            anyhow::anyhow!("binding UDP {listen}: {e}")
        }
    })?;
    let start_us = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0);
    // A second port that answers STUN only: two destinations let members tell an
    // endpoint-independent mapping from a symmetric one.
    let alt_addr = SocketAddr::new(listen.ip(), listen.port().wrapping_add(1));
    let alt = UdpSocket::bind(alt_addr)
        .await
        .map_err(|e| anyhow::anyhow!("binding the second STUN port UDP {alt_addr}: {e}"))?;
    // TCP on the same port, for members whose UDP is blocked.
    let tcp = TcpListener::bind(listen).await.map_err(|e| {
        if e.kind() == std::io::ErrorKind::AddrInUse {
            anyhow::anyhow!("TCP {listen} is already in use (is another relay running?)")
        } else {
            anyhow::anyhow!("binding TCP {listen}: {e}")
        }
    })?;
    // `--listen [::]:3478` gives a dual-stack socket: IPv4 members arrive IPv4-mapped.
    let dual_stack = listen.is_ipv6();
    let mut server = RelayServer::new(
        key,
        rand::rngs::OsRng.next_u64(),
        UnixClock {
            at: Instant::now(),
            unix_ms: start_us / 1000,
        },
    )
    .with_sequence_start(start_us);
    #[allow(clippy::print_stdout)]
    {
        println!(
            "meshvpn relay listening on {listen} (UDP and TCP; STUN also on UDP port {}), public key {}",
            alt_addr.port(),
            server.public_key()
        );
    }
    tracing::info!(%listen, public_key = %server.public_key(), "relay started");
    let mut sigterm = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut sigint = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let mut buf = vec![0u8; 65_536];
    let mut alt_buf = vec![0u8; 1_500];
    let (tcp_in_tx, mut tcp_in) = mpsc::channel::<TcpEvent>(1024);
    let mut tcp_writers: BTreeMap<u64, mpsc::Sender<Vec<u8>>> = BTreeMap::new();
    let mut next_conn: u64 = 1;
    loop {
        while let Some(t) = server.poll_transmit() {
            match t.link {
                Link::Udp(dst) => {
                    if let Err(e) = socket
                        .send_to(&t.payload, sockaddr::for_socket(dst, dual_stack))
                        .await
                    {
                        tracing::debug!(%e, %dst, "UDP send failed");
                    }
                }
                Link::Tcp { id, .. } => {
                    // A full queue drops the datagram, as congestion on UDP would.
                    if let Some(w) = tcp_writers.get(&id) {
                        let _ = w.try_send(t.payload);
                    }
                }
            }
        }
        let deadline = server
            .poll_timeout()
            .unwrap_or_else(|| Instant::now() + std::time::Duration::from_secs(3600));
        tokio::select! {
            r = socket.recv_from(&mut buf) => match r {
                Ok((n, from)) => server.handle_datagram(Instant::now(), Link::Udp(sockaddr::unmap(from)), &buf[..n]),
                Err(e) => tracing::debug!(%e, "UDP receive failed"),
            },
            _ = tokio::time::sleep_until(tokio::time::Instant::from_std(deadline)) => server.handle_timeout(Instant::now()),
            r = alt.recv_from(&mut alt_buf) => {
                if let Ok((n, from)) = r {
                    if let Some(answer) = stun::answer(&alt_buf[..n], sockaddr::unmap(from)) {
                        let _ = alt.send_to(&answer, from).await;
                    }
                }
            }
            r = tcp.accept() => match r {
                Ok((stream, remote)) if tcp_writers.len() < MAX_TCP_CONNECTIONS => {
                    let id = next_conn;
                    next_conn += 1;
                    let link = Link::Tcp { id, remote: sockaddr::unmap(remote) };
                    tcp_writers.insert(id, spawn_tcp_connection(stream, link, tcp_in_tx.clone()));
                }
                Ok((_, remote)) => tracing::warn!(%remote, "refusing TCP connection: too many"),
                Err(e) => tracing::debug!(%e, "TCP accept failed"),
            },
            Some(ev) = tcp_in.recv() => match ev {
                TcpEvent::Datagram(link, bytes) => server.handle_datagram(Instant::now(), link, &bytes),
                TcpEvent::Closed(link) => {
                    if let Link::Tcp { id, .. } = link {
                        tcp_writers.remove(&id);
                    }
                    server.handle_link_closed(link);
                }
            },
            _ = sigterm.recv() => break,
            _ = sigint.recv() => break,
        }
    }
    let s = server.counters();
    tracing::info!(
        members = server.member_count(),
        forwarded = s.forwarded,
        dropped = s.dropped,
        "relay stopped"
    );
    Ok(())
}
