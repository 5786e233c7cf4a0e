//! `meshvpn demo`: a whole mesh on one machine, shown and torn down.
//!
//! Builds a [`Lab`] with a relay host and three member hosts (alice, bob, carol) on its
//! "internet", starts `meshvpn relay`, creates a network with `meshvpn create`, joins the three
//! members with `meshvpn join`, waits until each member sees the other two, prints every
//! member's `meshvpn status` and a ping matrix between the virtual IPs, then tears everything
//! down — also on Ctrl-C (SIGINT/SIGTERM set a flag that every wait loop checks) and on failure.
//! Fails if any pair cannot ping.

#![allow(clippy::print_stdout)]

use std::io::Write as _;
use std::net::Ipv4Addr;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};

use crate::lab::{self, Lab, Node, Status};

/// Network name used by the demo.
pub const NETWORK: &str = "demo";
/// Relay UDP port used by the demo.
pub const RELAY_PORT: u16 = 3478;
/// Member names used by the demo.
pub const MEMBERS: [&str; 3] = ["alice", "bob", "carol"];
/// How long the demo waits for the members to find each other.
const CONVERGE_TIMEOUT: Duration = Duration::from_secs(30);
/// Ping attempts per pair (each `ping -c 1 -W 1`).
const PING_ATTEMPTS: u32 = 4;

/// Runs the demo with `exe` as the meshvpn binary (normally `std::env::current_exe()`).
pub fn run(exe: &Path) -> Result<()> {
    if !lab::is_root() {
        bail!("meshvpn demo needs root (it creates network namespaces)");
    }
    lab::install_signal_handler();
    let started = Instant::now();
    let mut lab = Lab::new("demo")?;
    say(&format!("lab scratch directory: {}", lab.dir().display()));
    let result = run_in(&mut lab, exe);
    if lab::interrupted() {
        say("interrupted");
    }
    say("tearing down: stopping members and relay, deleting namespaces ...");
    lab.teardown();
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

fn run_in(lab: &mut Lab, exe: &Path) -> Result<()> {
    say("building the lab internet ...");
    let relay_host = lab.add_public_host("relay")?;
    let mut members = Vec::new();
    for name in MEMBERS {
        let host = lab.add_public_host(name)?;
        say(&format!(
            "  host {name}: {} (namespace {})",
            host.addr, host.ns
        ));
        members.push(Node::new(lab, exe, &host, name)?);
    }

    say(&format!(
        "starting relay on {}:{RELAY_PORT} ...",
        relay_host.addr
    ));
    let mut relay = Node::new(lab, exe, &relay_host, "relay")?;
    let relay_addr = relay.start_relay(lab, RELAY_PORT)?;

    say(&format!(
        "creating network {NETWORK:?} (meshvpn create {NETWORK} --relay {relay_addr}) ..."
    ));
    let token = members[0]
        .create_token(lab, NETWORK, &relay_addr.to_string(), None)
        .context("creating the network")?;
    say(&format!("  token: {token}"));

    for m in &mut members {
        say(&format!(
            "{} joins (meshvpn join TOKEN --name {}) ...",
            m.name, m.name
        ));
        m.join(lab, &token, &[])?;
    }

    say(&format!(
        "waiting (up to {CONVERGE_TIMEOUT:?}) until every member sees the other two ..."
    ));
    let mut statuses: Vec<Option<Status>> = vec![None; members.len()];
    let took = lab::wait_until(
        CONVERGE_TIMEOUT,
        Duration::from_millis(250),
        "the members to find each other",
        || {
            for (i, m) in members.iter().enumerate() {
                if !m.is_running(lab) {
                    bail!("{} exited early; see {}", m.name, m.log.display());
                }
                let ok = statuses[i]
                    .as_ref()
                    .is_some_and(|s| sees_all(s, &members, i));
                if !ok {
                    statuses[i] = m.status(lab, NETWORK).ok();
                }
            }
            Ok(statuses
                .iter()
                .enumerate()
                .all(|(i, s)| s.as_ref().is_some_and(|s| sees_all(s, &members, i))))
        },
    )?;
    say(&format!("  converged after {took:.1?}"));

    for m in &members {
        say(&format!("\n$ meshvpn status   (on {})", m.name));
        let table = m.status_table(lab, NETWORK)?;
        print!("{table}");
    }

    let ips: Vec<Ipv4Addr> = statuses.iter().flatten().map(|s| s.virtual_ip).collect();
    say("\nping matrix (row pings column's virtual IP):");
    let width = members
        .iter()
        .zip(&ips)
        .map(|(m, ip)| m.name.len() + ip.to_string().len() + 3)
        .max()
        .unwrap_or(20)
        .max(14);
    let mut header = format!("{:<8}", "");
    for (m, ip) in members.iter().zip(&ips) {
        header.push_str(&format!("{:<width$}", format!("{} {ip}", m.name)));
    }
    say(&header);
    let mut failures = Vec::new();
    for (i, from) in members.iter().enumerate() {
        let mut row = format!("{:<8}", from.name);
        for (j, to) in members.iter().enumerate() {
            let cell = if i == j {
                "-".to_string()
            } else {
                match ping_with_retries(lab, from, ips[j])? {
                    Some(rtt) => format!("OK {:.2}ms", rtt.as_secs_f64() * 1000.0),
                    None => {
                        failures.push(format!("{} -> {}", from.name, to.name));
                        "FAIL".to_string()
                    }
                }
            };
            row.push_str(&format!("{cell:<width$}"));
        }
        say(&row);
    }
    relay.stop(lab, lab::Signal::Term)?;
    if !failures.is_empty() {
        bail!(
            "{} pair(s) could not ping: {}",
            failures.len(),
            failures.join(", ")
        );
    }
    Ok(())
}

fn sees_all(status: &Status, members: &[Node], me: usize) -> bool {
    members
        .iter()
        .enumerate()
        .filter(|(j, _)| *j != me)
        .all(|(_, other)| status.peer(&other.name).is_some())
}

fn ping_with_retries(lab: &Lab, from: &Node, to: Ipv4Addr) -> Result<Option<Duration>> {
    for _ in 0..PING_ATTEMPTS {
        if lab::interrupted() {
            bail!("interrupted");
        }
        if let Some(rtt) = lab.ping_rtt(&from.host, to, Duration::from_secs(1)) {
            return Ok(Some(rtt));
        }
    }
    Ok(None)
}
