//! `meshvpn demo`: a whole mesh behind different NATs on one machine, shown and torn down.
//!
//! Builds a [`Mesh`] (a namespace [`Lab`](meshvpn_lab::Lab)) with a relay on a public host and
//! four members: alice behind a home router, bob behind a symmetric NAT, carol behind a
//! firewall that drops outbound UDP (only TCP gets out), and dave on a public address. It starts
//! `meshvpn relay`, creates a network with `meshvpn create`, joins the members with
//! `meshvpn join`, waits until each member sees the others, pings every pair, gives the paths a
//! few seconds to settle, then prints every member's `meshvpn status`, the ping matrix and one
//! line per pair saying whether it is direct or relayed (over UDP or TCP). Everything is torn
//! down at the end — also on Ctrl-C (SIGINT/SIGTERM set a flag that every wait loop checks) and
//! on failure. Fails if any pair cannot ping.

#![allow(clippy::print_stdout)]

use std::io::Write as _;
use std::net::Ipv4Addr;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};

use meshvpn_lab::{self as lab, Mesh, Nat, PeerPath, Status};

/// Network name used by the demo.
pub const NETWORK: &str = "demo";
/// Relay UDP port used by the demo.
pub const RELAY_PORT: u16 = 3478;
/// Member names used by the demo, with the NAT each sits behind (`None`: public address).
pub const MEMBERS: [(&str, Option<Nat>); 4] = [
    ("alice", Some(Nat::HomeRouter)),
    ("bob", Some(Nat::Symmetric)),
    ("carol", Some(Nat::UdpBlocked)),
    ("dave", None),
];
/// How long the demo waits for the members to find each other.
const CONVERGE_TIMEOUT: Duration = Duration::from_secs(20);
/// How long one ordered pair may take to get its first ping through.
const PING_TIMEOUT: Duration = Duration::from_secs(8);
/// How long the demo waits for the pairs that can go direct to do so.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(10);

/// Runs the demo with `exe` as the meshvpn binary (normally `std::env::current_exe()`).
pub fn run(exe: &Path) -> Result<()> {
    if !lab::is_root() {
        bail!("meshvpn demo needs root (it creates network namespaces)");
    }
    lab::install_signal_handler();
    let started = Instant::now();
    say("building the lab internet: a relay, alice behind a home router, bob behind a symmetric NAT,");
    say("carol behind a firewall that drops outbound UDP, dave on a public address ...");
    let mut mesh = Mesh::new("demo", exe, &MEMBERS, RELAY_PORT)?;
    say(&format!(
        "lab scratch directory: {}",
        mesh.lab.dir().display()
    ));
    let result = run_in(&mut mesh);
    if lab::interrupted() {
        say("interrupted");
    }
    say("tearing down: stopping members and relay, deleting namespaces ...");
    mesh.lab.teardown();
    match &result {
        Ok(()) => say(&format!(
            "demo finished in {:.1?}: every member reached every other",
            started.elapsed()
        )),
        Err(_) => say("demo failed"),
    }
    result
}

fn say(line: &str) {
    println!("{line}");
    let _ = std::io::stdout().flush();
}

fn placement(nat: Option<Nat>) -> &'static str {
    match nat {
        Some(Nat::HomeRouter) => "behind a home router (port-preserving NAT)",
        Some(Nat::Symmetric) => "behind a symmetric NAT (a new port per destination)",
        Some(Nat::UdpBlocked) => "behind a firewall that drops outbound UDP",
        Some(Nat::FullCone) => "behind a full-cone NAT",
        Some(Nat::Cgnat) => "behind a home router behind a carrier-grade NAT",
        Some(Nat::Upnp) => "behind a home router with UPnP/NAT-PMP/PCP",
        None => "on a public address",
    }
}

fn run_in(mesh: &mut Mesh) -> Result<()> {
    for m in &mesh.members {
        say(&format!(
            "  {:<6} {:<15} seen on the internet as {:<15} {}",
            m.name,
            m.host.addr,
            m.host.public_addr,
            placement(m.host.nat)
        ));
    }
    say(&format!("relay listening on {}", mesh.relay_addr));
    say(&format!(
        "creating network {NETWORK:?} (meshvpn create {NETWORK} --relay {}) ...",
        mesh.relay_addr
    ));
    let token = mesh
        .create_network(NETWORK, None)
        .context("creating the network")?
        .to_string();
    say(&format!("  token: {token}"));

    let names: Vec<String> = mesh.members.iter().map(|m| m.name.clone()).collect();
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    for name in &names {
        say(&format!(
            "{name} joins (meshvpn join TOKEN --name {name}) ..."
        ));
        mesh.join(name)?;
    }
    say(&format!(
        "waiting (up to {CONVERGE_TIMEOUT:?}) until every member sees the others ..."
    ));
    let t = Instant::now();
    let statuses = mesh.converge(&names, CONVERGE_TIMEOUT)?;
    say(&format!("  converged after {:.1?}", t.elapsed()));
    let ips: Vec<Ipv4Addr> = statuses
        .iter()
        .map(Status::virtual_ipv4)
        .collect::<Result<_, _>>()
        .context("a member's virtual IP in `meshvpn status --json`")?;

    say("pinging every pair ...");
    let mut rtts: Vec<Vec<Option<Duration>>> = vec![vec![None; names.len()]; names.len()];
    let mut failures = Vec::new();
    for (i, from) in names.iter().enumerate() {
        for (j, to) in names.iter().enumerate() {
            if i == j {
                continue;
            }
            if lab::interrupted() {
                bail!("interrupted");
            }
            match mesh.ping_until(from, ips[j], PING_TIMEOUT) {
                Ok(_) => {
                    rtts[i][j] = mesh.ping_once(from, ips[j], Duration::from_secs(1))?;
                    if rtts[i][j].is_none() {
                        failures.push(format!("{from} -> {to} (lost again)"));
                    }
                }
                Err(_) => failures.push(format!("{from} -> {to}")),
            }
        }
    }

    say(&format!(
        "letting the paths settle (up to {SETTLE_TIMEOUT:?}: pairs that can go direct do) ..."
    ));
    let settled = settle(mesh, &names);
    let statuses: Vec<Option<Status>> = names.iter().map(|n| mesh.status(n).ok()).collect();

    for name in &names {
        say(&format!("\n$ meshvpn status   (on {name})"));
        let table = mesh.member(name)?.status_table(&mesh.lab, NETWORK)?;
        print!("{table}");
    }

    say("\nping matrix (row pings column's virtual IP):");
    let width = names
        .iter()
        .zip(&ips)
        .map(|(n, ip)| n.len() + ip.to_string().len() + 3)
        .max()
        .unwrap_or(20)
        .max(14);
    let mut header = format!("{:<8}", "");
    for (n, ip) in names.iter().zip(&ips) {
        header.push_str(&format!("{:<width$}", format!("{n} {ip}")));
    }
    say(&header);
    for (i, from) in names.iter().enumerate() {
        let mut row = format!("{from:<8}");
        for (j, rtt) in rtts[i].iter().enumerate() {
            let cell = match (i == j, rtt) {
                (true, _) => "-".to_string(),
                (false, Some(rtt)) => format!("OK {:.2}ms", rtt.as_secs_f64() * 1000.0),
                (false, None) => "FAIL".to_string(),
            };
            row.push_str(&format!("{cell:<width$}"));
        }
        say(&row);
    }

    say(&format!(
        "\npaths ({}):",
        match settled {
            Some(d) => format!("settled after {d:.1?}"),
            None => "still settling".to_string(),
        }
    ));
    for (i, a) in names.iter().enumerate() {
        for (j, b) in names.iter().enumerate().skip(i + 1) {
            let path = |k: usize, other: &str| {
                statuses[k]
                    .as_ref()
                    .and_then(|s| s.peer(other))
                    .map(|p| p.path)
            };
            let (pa, pb) = (path(i, b), path(j, a));
            say(&format!("  {a:<6} <-> {b:<6} {}", describe_pair(pa, pb)));
        }
    }
    mesh.relay.stop(&mesh.lab, lab::Signal::Term)?;
    if !failures.is_empty() {
        bail!(
            "{} pair(s) could not ping: {}",
            failures.len(),
            failures.join(", ")
        );
    }
    Ok(())
}

/// "direct", or "relayed (relay-tcp / relay)" with each side's label ("unknown" for a side
/// whose status is missing).
fn describe_pair(pa: Option<PeerPath>, pb: Option<PeerPath>) -> String {
    let label = |p: Option<PeerPath>| p.map_or("unknown", PeerPath::as_str);
    match (pa, pb) {
        (Some(PeerPath::Direct), Some(PeerPath::Direct)) => "direct".to_string(),
        _ if pa == pb => format!("relayed ({})", label(pa)),
        _ => format!("relayed ({} / {})", label(pa), label(pb)),
    }
}

/// Whether the demo waits for the pair to go direct: neither side UDP-blocked and not both
/// symmetric (home router ↔ symmetric NAT goes direct when the birthday probe hits, usually
/// within a few seconds; if it does not within the settle time, the summary says relayed).
fn can_go_direct(a: Option<Nat>, b: Option<Nat>) -> bool {
    let blocked = |n: Option<Nat>| n == Some(Nat::UdpBlocked);
    let symmetric = |n: Option<Nat>| n == Some(Nat::Symmetric);
    !(blocked(a) || blocked(b) || symmetric(a) && symmetric(b))
}

/// Waits (bounded) until every pair that can go direct is direct on both sides; returns how
/// long it took, `None` if some were not by the deadline.
fn settle(mesh: &Mesh, names: &[&str]) -> Option<Duration> {
    let nat = |n: &str| mesh.host(n).ok().and_then(|h| h.nat);
    let pairs: Vec<(&str, &str)> = names
        .iter()
        .enumerate()
        .flat_map(|(i, a)| names[i + 1..].iter().map(move |b| (*a, *b)))
        .filter(|(a, b)| can_go_direct(nat(a), nat(b)))
        .collect();
    lab::wait_until(
        SETTLE_TIMEOUT,
        Duration::from_millis(300),
        "direct paths",
        || {
            for (a, b) in &pairs {
                if mesh.path(a, b)? != Some(PeerPath::Direct)
                    || mesh.path(b, a)? != Some(PeerPath::Direct)
                {
                    return Ok(false);
                }
            }
            Ok(true)
        },
    )
    .ok()
}
