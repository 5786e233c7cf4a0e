//! Administration commands that talk to running agents or to systemd: `ping`, `peers`,
//! `netcheck`, `list`, `down`, `leave`, and `join --enable`.

use std::io::{BufRead as _, IsTerminal as _, Write as _};
use std::path::Path;
use std::process::Command as Process;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context as _};
use rand::RngCore;

use super::{runtime, Failure};
use crate::config::{self, Config};
use crate::control::{self, PingReply, Request};
use crate::status::{ListReport, ListedNetwork, NetcheckReport, PeersReport, Status};
use crate::wire::{admission, RelayRequest};

/// The network a command is about: the one named, or the only one configured.
fn resolve_network(config_dir: &Path, name: Option<String>) -> anyhow::Result<String> {
    if let Some(n) = name {
        return Ok(n);
    }
    super::exit::check_readable_dir(config_dir)?;
    let all = config::list_networks(config_dir);
    match all.as_slice() {
        [] => bail!(
            "no networks configured in {} (join one with `meshvpn join TOKEN`)",
            config_dir.display()
        ),
        [one] => Ok(one.clone()),
        many => Err(Failure::Usage(format!(
            "several networks are configured ({}); name one",
            many.join(", ")
        ))
        .into()),
    }
}

/// `meshvpn ping --json`: every answer, in order.
#[derive(Debug, serde::Serialize)]
struct PingReport {
    /// [`crate::status::SCHEMA`].
    schema: u32,
    network: String,
    peer: String,
    sent: u32,
    received: u32,
    replies: Vec<PingReply>,
}

/// `meshvpn ping PEER`: pings on the current path and reports direct or relay, and the RTT.
/// Fails with [`Failure::PeerUnreachable`] when no ping is answered or no member is `peer`.
pub(super) fn ping(
    config_dir: &Path,
    run_dir: &Path,
    network: Option<String>,
    peer: &str,
    count: u32,
    json: bool,
) -> anyhow::Result<()> {
    let network = resolve_network(config_dir, network)?;
    let rt = runtime()?;
    let count = count.max(1);
    let mut report = PingReport {
        schema: crate::status::SCHEMA,
        network: network.clone(),
        peer: peer.to_string(),
        sent: 0,
        received: 0,
        replies: Vec::new(),
    };
    for i in 0..count {
        if i > 0 {
            std::thread::sleep(Duration::from_millis(500));
        }
        let line = rt.block_on(control::ask(
            run_dir,
            &network,
            &Request::Ping(peer.to_string()),
        ))?;
        let reply: PingReply =
            serde_json::from_str(&line).context("the agent sent an unreadable ping answer")?;
        report.sent += 1;
        match (reply.ok, reply.error.as_deref()) {
            (true, _) => {
                report.received += 1;
                if !json {
                    let via = match (reply.path.as_deref(), reply.endpoint.as_deref()) {
                        (Some("direct"), Some(e)) => format!("direct {e}"),
                        (Some(p), _) => format!("via {p}"),
                        (None, _) => "?".into(),
                    };
                    println!(
                        "pong from {} {via} in {:.1} ms",
                        reply.peer,
                        reply.rtt_ms.unwrap_or(0.0)
                    );
                }
            }
            (false, Some(e)) if e.starts_with("no member") => {
                let message = format!("{e} in network {network:?}");
                if json {
                    report.replies.push(reply);
                    println!("{}", serde_json::to_string_pretty(&report)?);
                }
                return Err(Failure::PeerUnreachable(message).into());
            }
            (false, e) => {
                if !json {
                    println!("no pong from {}: {}", reply.peer, e.unwrap_or_default());
                }
            }
        }
        report.replies.push(reply);
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    }
    if report.received == 0 {
        return Err(Failure::PeerUnreachable(format!(
            "{peer} did not answer any of {count} pings"
        ))
        .into());
    }
    Ok(())
}

/// `meshvpn peers`: the peer table only.
pub(super) fn peers(
    config_dir: &Path,
    run_dir: &Path,
    name: Option<String>,
    json: bool,
) -> anyhow::Result<()> {
    let network = resolve_network(config_dir, name)?;
    let status = runtime()?
        .block_on(control::query_status(run_dir, &network))?
        .status;
    if json {
        let report = PeersReport {
            schema: crate::status::SCHEMA,
            network: status.network,
            peers: status.peers,
        };
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    if status.peers.is_empty() {
        println!("no peers yet");
    }
    for p in &status.peers {
        println!(
            "{:<20} {:<16} {:<10} {:<22} {:<10} mtu {}",
            p.name,
            p.virtual_ip,
            p.path,
            p.endpoint.as_deref().unwrap_or("-"),
            p.rtt_ms
                .map(|r| format!("{r:.1} ms"))
                .unwrap_or_else(|| "-".into()),
            p.path_mtu
                .map(|m| m.to_string())
                .unwrap_or_else(|| "-".into())
        );
    }
    Ok(())
}

/// `meshvpn netcheck`: the NAT verdict and, per relayed peer, why.
pub(super) fn netcheck(
    config_dir: &Path,
    run_dir: &Path,
    name: Option<String>,
    json: bool,
) -> anyhow::Result<()> {
    let network = resolve_network(config_dir, name)?;
    let status = runtime()?
        .block_on(control::query_status(run_dir, &network))?
        .status;
    if json {
        let report = NetcheckReport::of(&status);
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    print!("{}", netcheck_text(&status));
    Ok(())
}

fn netcheck_text(s: &Status) -> String {
    let mut out = String::new();
    let udp = if s.nat.udp_blocked {
        "blocked: relay reached over TCP"
    } else {
        "works"
    };
    out.push_str(&format!("network {}\n", s.network));
    out.push_str(&format!("  NAT mapping:      {}\n", s.nat.mapping));
    out.push_str(&format!(
        "  port mapping:     {}\n",
        s.nat
            .port_mapping
            .as_deref()
            .unwrap_or("none (no UPnP-IGD, NAT-PMP or PCP gateway answered)")
    ));
    out.push_str(&format!("  UDP to the relay: {udp}\n"));
    out.push_str(&format!(
        "  reflexive addr:   {}\n",
        s.nat.reflexive.as_deref().unwrap_or("unknown")
    ));
    out.push_str(&format!(
        "  relay:            {} ({})\n",
        s.relay.address,
        if s.relay.registered {
            "registered"
        } else {
            "not registered"
        }
    ));
    for r in s.relays.iter().filter(|_| s.relays.len() > 1) {
        out.push_str(&format!(
            "  relay {:<21} {} over {}{}\n",
            r.address,
            if r.answering {
                "answering"
            } else {
                "not answering"
            },
            r.transport,
            r.rtt_ms
                .map(|ms| format!(", {ms:.1} ms"))
                .unwrap_or_default()
        ));
    }
    for a in &s.nat.stun {
        out.push_str(&format!(
            "  STUN {:<22} sees us as {}\n",
            a.server, a.mapped
        ));
    }
    for p in &s.peers {
        match &p.relay_reason {
            Some(reason) => {
                out.push_str(&format!("  peer {:<16} {:<9} {reason}\n", p.name, p.path))
            }
            None => out.push_str(&format!(
                "  peer {:<16} direct    {}\n",
                p.name,
                p.endpoint.as_deref().unwrap_or("-")
            )),
        }
    }
    out
}

/// `meshvpn list`: configured networks and whether each agent answers.
pub(super) fn list(config_dir: &Path, run_dir: &Path, json: bool) -> anyhow::Result<()> {
    super::exit::check_readable_dir(config_dir)?;
    let networks = config::list_networks(config_dir);
    let rt = runtime()?;
    let mut report = ListReport {
        schema: crate::status::SCHEMA,
        networks: Vec::new(),
    };
    for n in networks {
        let cfg = Config::load(config_dir, &n).ok();
        let status = match rt.block_on(control::query_status(run_dir, &n)) {
            Ok(s) => Some(s),
            // Not "down": this user may not ask (exit 4 says so).
            Err(e) if super::ExitCode::of(&e) == super::ExitCode::PermissionDenied => {
                return Err(e)
            }
            Err(_) => None,
        };
        report.networks.push(ListedNetwork {
            virtual_ip: cfg.as_ref().map(|c| c.virtual_ip.to_string()),
            subnet: cfg.as_ref().map(|c| c.subnet.to_string()),
            running: status.is_some(),
            ready: status.as_ref().is_some_and(|s| s.ready),
            peers: status.as_ref().map(|s| s.status.peers.len()),
            network: n,
        });
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    if report.networks.is_empty() {
        println!("no networks configured in {}", config_dir.display());
        return Ok(());
    }
    println!(
        "{:<20} {:<16} {:<18} STATE",
        "NETWORK", "VIRTUAL IP", "SUBNET"
    );
    for n in &report.networks {
        let state = match n.peers {
            Some(peers) => format!("up, {peers} peer(s)"),
            None => "down".into(),
        };
        println!(
            "{:<20} {:<16} {:<18} {state}",
            n.network,
            n.virtual_ip.as_deref().unwrap_or("?"),
            n.subnet.as_deref().unwrap_or("(config unreadable)")
        );
    }
    Ok(())
}

/// How often `meshvpn wait` asks the agent (a status costs the agent well under a millisecond).
const WAIT_POLL: Duration = Duration::from_millis(100);

/// `meshvpn wait [NAME]`: polls the agent until it is ready (registered with its relay and
/// holding the member list), at most `timeout`.
pub(super) fn wait(
    config_dir: &Path,
    run_dir: &Path,
    name: Option<String>,
    timeout: Duration,
) -> anyhow::Result<()> {
    let network = resolve_network(config_dir, name)?;
    let rt = runtime()?;
    let start = Instant::now();
    let last = loop {
        match rt.block_on(control::query_status(run_dir, &network)) {
            Ok(s) if s.ready => {
                println!(
                    "network {network} ready after {:.1} s: registered with relay {}, {}",
                    start.elapsed().as_secs_f64(),
                    s.status.relay.address,
                    s.status.summary()
                );
                return Ok(());
            }
            Err(e) if super::ExitCode::of(&e) == super::ExitCode::PermissionDenied => {
                return Err(e)
            }
            other if start.elapsed() >= timeout => break other,
            Ok(_) | Err(_) => {}
        }
        std::thread::sleep(WAIT_POLL.min(timeout.saturating_sub(start.elapsed())));
    };
    let waited = format!("{:.1} s", timeout.as_secs_f64());
    match last {
        Ok(s) if !s.status.relay.registered => bail!(
            "network {network} not ready after {waited}: the agent is not registered with relay {} (is it running and reachable? see `meshvpn netcheck {network}`)",
            s.status.relay.address
        ),
        Ok(_) => bail!(
            "network {network} not ready after {waited}: registered with the relay, but its member list has not arrived"
        ),
        // Exit 3 when the agent never came up: the cause keeps its code under the context.
        Err(e) => Err(e.context(format!("network {network} not ready after {waited}"))),
    }
}

/// `meshvpn down NAME`: asks the agent to leave and stop.
pub(super) fn down(run_dir: &Path, name: &str) -> anyhow::Result<()> {
    runtime()?.block_on(control::ask(run_dir, name, &Request::Down))?;
    println!("network {name} is going down");
    Ok(())
}

/// `meshvpn leave NAME`: stop the agent (or the service), tell the relay, delete the config.
pub(super) fn leave(
    config_dir: &Path,
    run_dir: &Path,
    name: &str,
    yes: bool,
) -> anyhow::Result<()> {
    let cfg = Config::load(config_dir, name)?;
    if !yes {
        if !std::io::stdin().is_terminal() {
            bail!("leaving deletes the config of network {name:?} (and its key); pass --yes to confirm");
        }
        eprint!(
            "Leave network {name:?} and delete {}? [y/N] ",
            Config::path(config_dir, name).display()
        );
        let _ = std::io::stderr().flush();
        let mut answer = String::new();
        std::io::stdin()
            .lock()
            .read_line(&mut answer)
            .context("reading the answer")?;
        if !matches!(answer.trim(), "y" | "Y" | "yes") {
            bail!("not leaving network {name:?}");
        }
    }
    let unit = format!("meshvpn@{name}.service");
    if systemd_available()
        && Process::new("systemctl")
            .args(["is-enabled", "--quiet", &unit])
            .status()
            .is_ok_and(|s| s.success())
    {
        let status = Process::new("systemctl")
            .args(["disable", "--now", &unit])
            .status()
            .context("running systemctl")?;
        if !status.success() {
            bail!("systemctl disable --now {unit} failed");
        }
    }
    let rt = runtime()?;
    if rt
        .block_on(control::ask(run_dir, name, &Request::Down))
        .is_err()
    {
        // No agent running: tell the relay ourselves.
        rt.block_on(send_leave(&cfg))?;
    }
    std::fs::remove_file(Config::path(config_dir, name))
        .with_context(|| format!("deleting {}", Config::path(config_dir, name).display()))?;
    println!("left network {name}");
    Ok(())
}

/// Sends a sealed Leave to the first relay (three copies, as UDP may lose one).
async fn send_leave(cfg: &Config) -> anyhow::Result<()> {
    let relay = cfg.relays.first().context("the config names no relay")?;
    let addr = tokio::net::lookup_host(relay.host_port())
        .await
        .with_context(|| format!("resolving relay {}", relay.host_port()))?
        .find(std::net::SocketAddr::is_ipv4)
        .with_context(|| format!("relay {} has no IPv4 address", relay.host_port()))?;
    let me = cfg.private_key.public();
    let session = cfg.private_key.relay_session_key(&me, &relay.key);
    let ts_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    let keys = cfg.secret.derive();
    let req = RelayRequest::Leave {
        network: keys.network_id,
        ts_ms,
    };
    let mut nonce = [0u8; 24];
    rand::rngs::OsRng.fill_bytes(&mut nonce);
    let dgram = admission::seal_request(
        &session,
        me,
        &relay.key,
        &keys.signing,
        [0; 16],
        &req,
        nonce,
    );
    let socket = tokio::net::UdpSocket::bind("0.0.0.0:0")
        .await
        .context("binding a UDP socket")?;
    for _ in 0..3 {
        let _ = socket.send_to(&dgram, addr).await;
    }
    Ok(())
}

fn systemd_available() -> bool {
    Path::new("/run/systemd/system").exists()
}

/// `join --enable`: enable and start meshvpn@NETWORK.
pub(super) fn enable_service(network: &str) -> anyhow::Result<()> {
    if !systemd_available() {
        bail!("--enable needs systemd (no /run/systemd/system here); run `meshvpn up {network}` instead");
    }
    let unit = format!("meshvpn@{network}.service");
    let status = Process::new("systemctl")
        .args(["enable", "--now", &unit])
        .status()
        .context("running systemctl")?;
    if !status.success() {
        bail!("systemctl enable --now {unit} failed (see `journalctl -u {unit}`)");
    }
    println!("enabled and started {unit}");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::status::{DropCounters, NatMapping, NatStatus, PeerPath, PeerStatus, RelayStatus};

    #[test]
    fn netcheck_explains_relayed_peers() {
        let s = Status {
            network: "n".into(),
            name: "me".into(),
            virtual_ip: "10.0.0.1".into(),
            virtual_ipv6: None,
            dns_name: None,
            public_key: "k".into(),
            relay: RelayStatus {
                address: "198.51.100.1:3478".into(),
                public_key: "r".into(),
                registered: true,
                observed: None,
                answering: true,
                primary: true,
                transport: "udp".into(),
                rtt_ms: None,
                keepalive_s: None,
            },
            relays: vec![],
            endpoints: vec![],
            nat: NatStatus {
                mapping: NatMapping::EndpointDependent,
                summary: String::new(),
                reflexive: Some("203.0.113.5:4000".into()),
                port_mapping: None,
                udp_blocked: false,
                stun: Vec::new(),
            },
            ip_conflict: None,
            peers: vec![PeerStatus {
                name: "bob".into(),
                public_key: "b".into(),
                virtual_ip: "10.0.0.2".into(),
                virtual_ipv6: None,
                dns_name: None,
                path: PeerPath::Relay,
                endpoint: None,
                rtt_ms: None,
                last_handshake_age_s: None,
                rx_bytes: 0,
                tx_bytes: 0,
                ip_conflict: false,
                relay_reason: Some(
                    "both sides symmetric, no port mapping; next direct attempt in 8 s".into(),
                ),
                path_mtu: None,
            }],
            dropped: DropCounters::default(),
        };
        let text = netcheck_text(&s);
        assert!(
            text.contains("symmetric (endpoint-dependent mapping)"),
            "{text}"
        );
        assert!(
            text.contains("both sides symmetric, no port mapping"),
            "{text}"
        );
        assert!(text.contains("UDP to the relay: works"), "{text}");
    }
}
