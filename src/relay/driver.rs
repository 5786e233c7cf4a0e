//! The relay's tokio driver: one UDP socket feeding [`RelayServer`].

use std::net::SocketAddr;
use std::path::Path;
use std::time::Instant;

use anyhow::Context as _;
use rand::RngCore;
use tokio::net::UdpSocket;
use tokio::signal::unix::{signal, SignalKind};

use super::server::{Link, RelayServer};
use crate::config::write_atomic;
use crate::keys::NodeSecret;
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
    let mut server =
        RelayServer::new(key, rand::rngs::OsRng.next_u64()).with_sequence_start(start_us);
    #[allow(clippy::print_stdout)]
    {
        println!(
            "meshvpn relay listening on {listen} (UDP; STUN also on port {}), public key {}",
            alt_addr.port(),
            server.public_key()
        );
    }
    tracing::info!(%listen, public_key = %server.public_key(), "relay started");
    let mut sigterm = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut sigint = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let mut buf = vec![0u8; 65_536];
    let mut alt_buf = vec![0u8; 1_500];
    loop {
        while let Some(t) = server.poll_transmit() {
            if let Err(e) = socket.send_to(&t.payload, t.link.addr()).await {
                tracing::debug!(%e, dst = %t.link.addr(), "UDP send failed");
            }
        }
        let deadline = server
            .poll_timeout()
            .unwrap_or_else(|| Instant::now() + std::time::Duration::from_secs(3600));
        tokio::select! {
            r = socket.recv_from(&mut buf) => match r {
                Ok((n, from)) => server.handle_datagram(Instant::now(), Link::Udp(from), &buf[..n]),
                Err(e) => tracing::debug!(%e, "UDP receive failed"),
            },
            _ = tokio::time::sleep_until(tokio::time::Instant::from_std(deadline)) => server.handle_timeout(Instant::now()),
            r = alt.recv_from(&mut alt_buf) => {
                if let Ok((n, from)) = r {
                    if let Some(stun::Binding::Request(tx)) = stun::parse(&alt_buf[..n]) {
                        let _ = alt.send_to(&stun::binding_response(tx, from), from).await;
                    }
                }
            }
            _ = sigterm.recv() => break,
            _ = sigint.recv() => break,
        }
    }
    let s = server.stats();
    tracing::info!(
        members = server.member_count(),
        forwarded = s.forwarded,
        dropped = s.dropped,
        "relay stopped"
    );
    Ok(())
}
