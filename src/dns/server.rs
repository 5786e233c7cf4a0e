//! The DNS server of a member: UDP and TCP on one address, answering from a shared [`Zone`],
//! and the per-link registration of the zone with systemd-resolved.
//!
//! [`DnsServer::bind`] opens UDP and TCP (RFC 1035 §4.2.2: each message preceded by its
//! two-byte length) on the same address and port; [`DnsServer::serve`] answers until its future
//! is dropped, which also ends every TCP connection it runs. The agent binds the member's
//! virtual IP on port 53 and updates the [`SharedZone`] when membership changes.
//!
//! [`register_with_resolved`] tells systemd-resolved, when it runs, to send queries for
//! `NETWORK.mesh.internal` (and only those) to that server over the member's TUN link: per-link
//! DNS server, routing-only domain `~NETWORK.mesh.internal`, and no default route on the link.
//! It never touches the global resolver or `/etc/resolv.conf`; [`ResolvedLink::revert`] (or
//! dropping the handle) undoes it with `resolvectl revert`.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use anyhow::{bail, Context};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::task::JoinSet;
use tracing::{debug, info, warn};

use super::Zone;

/// The zone as the agent shares it with the server: the agent replaces the member table, the
/// server answers from it; each holds the lock only for one answer or one update.
pub type SharedZone = Arc<Mutex<Zone>>;

/// Receive buffer for one UDP query. Queries are one question (well under 300 bytes); 4096 is
/// the largest EDNS payload clients commonly offer, so no sane query is cut short.
const MAX_UDP_QUERY: usize = 4096;

/// Concurrent TCP connections served. Resolvers use TCP only after a truncated UDP answer, which
/// this zone never sends, so a handful is plenty; the cap bounds tasks and memory under a flood.
const MAX_TCP_CONNECTIONS: usize = 16;

/// How long a TCP connection may sit idle (or a query may take to arrive) before we close it.
/// RFC 7766 §6.2.3 asks servers to time out idle clients; resolvers reopen at once if needed,
/// and 10 s keeps a stalled client from holding one of the few slots for long.
const TCP_IDLE_TIMEOUT: Duration = Duration::from_secs(10);

/// Queries answered on one TCP connection before we close it, so one client cannot keep a
/// connection (and our attention) forever; resolvers pipeline far fewer.
const MAX_TCP_QUERIES_PER_CONNECTION: usize = 100;

/// Pause after a failed `accept` (e.g. out of descriptors, which fails at once and would
/// otherwise spin); short enough that service resumes promptly once descriptors free up.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// Longest a `resolvectl`/`systemctl` call may take. They talk D-Bus and return in
/// milliseconds; a hung bus must not hang the agent's start or shutdown.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(5);

/// A bound DNS server: one UDP socket and one TCP listener on the same address and port.
#[derive(Debug)]
pub struct DnsServer {
    udp: UdpSocket,
    tcp: TcpListener,
}

impl DnsServer {
    /// Binds UDP and TCP on `addr` (port 0 picks one port for both).
    pub async fn bind(addr: SocketAddr) -> anyhow::Result<DnsServer> {
        let udp = UdpSocket::bind(addr)
            .await
            .with_context(|| format!("binding DNS UDP socket on {addr}"))?;
        let bound = udp.local_addr().context("reading the DNS UDP address")?;
        let tcp = TcpListener::bind(bound)
            .await
            .with_context(|| format!("binding DNS TCP listener on {bound}"))?;
        Ok(DnsServer { udp, tcp })
    }

    /// The address both sockets are bound to.
    pub fn local_addr(&self) -> anyhow::Result<SocketAddr> {
        self.udp.local_addr().context("reading the DNS UDP address")
    }

    /// Answers queries from `zone` until the returned future is dropped.
    pub async fn serve(self, zone: SharedZone) {
        let mut buf = vec![0u8; MAX_UDP_QUERY];
        let mut connections = JoinSet::new();
        loop {
            tokio::select! {
                received = self.udp.recv_from(&mut buf) => match received {
                    Ok((len, from)) => {
                        let query = buf.get(..len).unwrap_or_default();
                        if let Some(reply) = answer(&zone, query) {
                            if let Err(e) = self.udp.send_to(&reply, from).await {
                                debug!(%from, error = %e, "sending a DNS answer failed");
                            }
                        }
                    }
                    // ICMP errors from earlier sends surface here on Linux; the socket is fine.
                    Err(e) => debug!(error = %e, "DNS UDP receive failed"),
                },
                accepted = self.tcp.accept() => match accepted {
                    Ok((stream, from)) if connections.len() < MAX_TCP_CONNECTIONS => {
                        connections.spawn(serve_tcp(stream, from, zone.clone()));
                    }
                    Ok((_, from)) => debug!(%from, "too many DNS TCP connections: closing"),
                    Err(e) => {
                        warn!(error = %e, "accepting a DNS TCP connection failed");
                        tokio::time::sleep(ACCEPT_BACKOFF).await;
                    }
                },
                Some(_) = connections.join_next(), if !connections.is_empty() => {}
            }
        }
    }
}

/// Answers one message from the shared zone (a poisoned lock still holds a usable zone: no
/// answer leaves it half-updated).
fn answer(zone: &SharedZone, query: &[u8]) -> Option<Vec<u8>> {
    zone.lock()
        .unwrap_or_else(PoisonError::into_inner)
        .answer(query)
}

/// Serves one TCP connection: length-prefixed queries, answered in order, until the client
/// closes, goes idle, sends something we drop, or reaches the per-connection limit.
async fn serve_tcp(mut stream: TcpStream, from: SocketAddr, zone: SharedZone) {
    for _ in 0..MAX_TCP_QUERIES_PER_CONNECTION {
        let len = match tokio::time::timeout(TCP_IDLE_TIMEOUT, stream.read_u16()).await {
            Ok(Ok(len)) => usize::from(len),
            Ok(Err(_)) | Err(_) => return,
        };
        let mut query = vec![0u8; len];
        match tokio::time::timeout(TCP_IDLE_TIMEOUT, stream.read_exact(&mut query)).await {
            Ok(Ok(_)) => {}
            Ok(Err(_)) | Err(_) => return,
        }
        let Some(reply) = answer(&zone, &query) else {
            debug!(%from, "dropping a DNS TCP connection that sent a non-query");
            return;
        };
        let Ok(reply_len) = u16::try_from(reply.len()) else {
            return;
        };
        let mut framed = Vec::with_capacity(reply.len() + 2);
        framed.extend_from_slice(&reply_len.to_be_bytes());
        framed.extend_from_slice(&reply);
        if let Err(e) = stream.write_all(&framed).await {
            debug!(%from, error = %e, "writing a DNS TCP answer failed");
            return;
        }
    }
}

/// Registers `domain` on link `ifname` with systemd-resolved, answered by `dns_ip`, using the
/// system's `resolvectl` and `systemctl`. `Ok(None)` when resolved is not running (nothing to
/// do: the user can still query `dns_ip` directly).
pub async fn register_with_resolved(
    ifname: &str,
    domain: &str,
    dns_ip: IpAddr,
) -> anyhow::Result<Option<ResolvedLink>> {
    ResolvedTools::system()
        .register(ifname, domain, dns_ip)
        .await
}

/// The programs used to talk to systemd-resolved (the system's, or stand-ins in tests).
#[derive(Debug, Clone)]
pub struct ResolvedTools {
    resolvectl: PathBuf,
    systemctl: PathBuf,
}

impl ResolvedTools {
    /// `resolvectl` and `systemctl` found on `PATH`.
    pub fn system() -> ResolvedTools {
        ResolvedTools::with_programs("resolvectl", "systemctl")
    }

    /// Explicit programs, e.g. stand-ins that record their arguments.
    pub fn with_programs(
        resolvectl: impl Into<PathBuf>,
        systemctl: impl Into<PathBuf>,
    ) -> ResolvedTools {
        ResolvedTools {
            resolvectl: resolvectl.into(),
            systemctl: systemctl.into(),
        }
    }

    /// Whether systemd-resolved is active and `resolvectl` is there to configure it.
    pub async fn resolved_running(&self) -> bool {
        let active = run(
            &self.systemctl,
            &["is-active", "--quiet", "systemd-resolved"],
        )
        .await;
        if !matches!(active, Ok(true)) {
            return false;
        }
        matches!(run(&self.resolvectl, &["--version"]).await, Ok(true))
    }

    /// See [`register_with_resolved`].
    pub async fn register(
        &self,
        ifname: &str,
        domain: &str,
        dns_ip: IpAddr,
    ) -> anyhow::Result<Option<ResolvedLink>> {
        check_ifname(ifname)?;
        if domain.is_empty()
            || domain.starts_with(['-', '.', '~'])
            || !domain
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
        {
            bail!("DNS domain {domain:?} is not a plain domain name");
        }
        if !self.resolved_running().await {
            info!("systemd-resolved is not running: {domain} is answered on {dns_ip} but not registered with the system resolver");
            return Ok(None);
        }
        let link = ResolvedLink {
            tools: self.clone(),
            ifname: ifname.to_owned(),
            reverted: false,
        };
        let ip = dns_ip.to_string();
        let routing_domain = format!("~{domain}");
        for args in [
            ["dns", ifname, ip.as_str()],
            ["domain", ifname, routing_domain.as_str()],
        ] {
            match run(&self.resolvectl, &args).await {
                Ok(true) => {}
                Ok(false) => {
                    link.revert().await.ok();
                    bail!("`resolvectl {}` failed", args.join(" "));
                }
                Err(e) => {
                    link.revert().await.ok();
                    return Err(e.context(format!("running `resolvectl {}`", args.join(" "))));
                }
            }
        }
        // Older resolved lacks per-link default-route; with a routing-only domain it does not
        // make the link a default route anyway, so a failure here is only worth a note.
        if !matches!(
            run(&self.resolvectl, &["default-route", ifname, "false"]).await,
            Ok(true)
        ) {
            debug!(ifname, "resolvectl default-route is not supported here");
        }
        info!(ifname, domain, %dns_ip, "registered the network's DNS zone with systemd-resolved");
        Ok(Some(link))
    }
}

/// A link whose DNS settings we changed in systemd-resolved; reverts them when done.
#[derive(Debug)]
pub struct ResolvedLink {
    tools: ResolvedTools,
    ifname: String,
    reverted: bool,
}

impl ResolvedLink {
    /// Undoes the per-link settings (`resolvectl revert IFNAME`).
    pub async fn revert(mut self) -> anyhow::Result<()> {
        self.reverted = true;
        match run(&self.tools.resolvectl, &["revert", &self.ifname]).await {
            Ok(true) => Ok(()),
            Ok(false) => bail!("`resolvectl revert {}` failed", self.ifname),
            Err(e) => Err(e.context(format!("running `resolvectl revert {}`", self.ifname))),
        }
    }
}

impl Drop for ResolvedLink {
    /// A handle dropped without [`ResolvedLink::revert`] (an error path, a panic) still reverts,
    /// synchronously: leaving a dead link's DNS in resolved would send names to nowhere. (When the
    /// TUN link itself is deleted, resolved forgets its settings anyway.)
    fn drop(&mut self) {
        if self.reverted {
            return;
        }
        let status = std::process::Command::new(&self.tools.resolvectl)
            .args(["revert", &self.ifname])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        if !matches!(status, Ok(s) if s.success()) {
            warn!(ifname = %self.ifname, "could not revert the link's DNS settings in systemd-resolved");
        }
    }
}

/// An interface name `resolvectl` can take as an argument: 1–15 bytes (IFNAMSIZ), no slash,
/// whitespace or leading '-' (which it would read as an option).
fn check_ifname(ifname: &str) -> anyhow::Result<()> {
    let ok = (1..=15).contains(&ifname.len())
        && !ifname.starts_with('-')
        && ifname.bytes().all(|b| b.is_ascii_graphic() && b != b'/');
    if !ok {
        bail!("interface name {ifname:?} is not a valid link name");
    }
    Ok(())
}

/// Runs `program args…` with a timeout; `Ok(success)`, or an error if it could not run.
async fn run(program: &PathBuf, args: &[&str]) -> anyhow::Result<bool> {
    let mut command = tokio::process::Command::new(program);
    command
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let output = tokio::time::timeout(COMMAND_TIMEOUT, command.output())
        .await
        .with_context(|| {
            format!(
                "{} did not finish in {COMMAND_TIMEOUT:?}",
                program.display()
            )
        })?
        .with_context(|| format!("starting {}", program.display()))?;
    if !output.status.success() {
        debug!(
            program = %program.display(),
            stderr = %String::from_utf8_lossy(&output.stderr).trim(),
            "command failed"
        );
    }
    Ok(output.status.success())
}

#[cfg(test)]
mod tests;
