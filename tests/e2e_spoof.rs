//! End-to-end: the real `meshvpn` binary in network namespaces (needs root; skips otherwise).
//! Cryptokey routing both ways: a member sending with another member's virtual IP as its
//! source gets nothing delivered, whether it lost an address clash and keeps using the
//! owner's address, or crafts the source on purpose (`ping -I` from an address it added).
//!
//! The test builds its own [`Mesh`] and tears it down on drop, even when it fails. Only lab
//! addresses are ever contacted.

#![allow(clippy::disallowed_methods, clippy::print_stdout)] // an end-to-end test: real time, real processes, progress on stdout

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context as _, Result};
use meshvpn_lab::{self as lab, Mesh, Nat};

const EXE: &str = env!("CARGO_BIN_EXE_meshvpn");
const RELAY_PORT: u16 = 3478;
const NETWORK: &str = "e2e";
/// How long members may take to see each other.
const CONVERGE: Duration = Duration::from_secs(30);
/// How long the victim may take to count the spoofed packets it received.
const COUNTED: Duration = Duration::from_secs(10);
/// Spoofed pings sent per attempt.
const SPOOFED: u64 = 5;

/// Packets the agent wrote into `name`'s TUN device (its interface's receive counter).
fn tun_rx(mesh: &Mesh, name: &str) -> Result<u64> {
    let ifname = meshvpn::config::interface_name(NETWORK);
    let path = format!("/sys/class/net/{ifname}/statistics/rx_packets");
    let out = mesh.lab.exec(mesh.host(name)?, &["cat", &path])?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.trim()
        .parse()
        .with_context(|| format!("reading {path} on {name}: {text:?}"))
}

/// Sends [`SPOOFED`] pings from `from` to `to` (from `source` if given), expecting no answer,
/// then waits until `victim` counted them as spoofed and checks none reached its TUN device.
fn spoof(
    mesh: &Mesh,
    from: &str,
    source: Option<Ipv4Addr>,
    victim: &str,
    to: Ipv4Addr,
) -> Result<()> {
    let before = mesh.status(victim)?.dropped.spoofed_source;
    let rx_before = tun_rx(mesh, victim)?;
    let mut args = vec![
        "ping".to_string(),
        "-n".into(),
        "-c".into(),
        SPOOFED.to_string(),
        "-i".into(),
        "0.2".into(),
        "-W".into(),
        "1".into(),
    ];
    if let Some(src) = source {
        args.extend(["-I".into(), src.to_string()]);
    }
    args.push(to.to_string());
    let out = mesh
        .lab
        .run(mesh.host(from)?, &args, Duration::from_secs(10))?;
    ensure!(
        !out.status.success(),
        "{from} got an answer from {victim} with a spoofed source: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    let mut counted = 0;
    let took = lab::wait_until(
        COUNTED,
        Duration::from_millis(200),
        &format!("{victim} to count {SPOOFED} spoofed packets"),
        || {
            counted = mesh.status(victim)?.dropped.spoofed_source - before;
            Ok(counted >= SPOOFED)
        },
    )?;
    let delivered = tun_rx(mesh, victim)? - rx_before;
    println!(
        "  {from} -> {victim} ({to}) from {}: {counted} counted as spoofed after {took:.1?}, {delivered} delivered",
        source.map_or("its own address".to_string(), |s| s.to_string())
    );
    ensure!(
        delivered == 0,
        "{delivered} packets reached {victim}'s TUN device"
    );
    Ok(())
}

#[test]
fn a_member_sending_with_another_members_address_gets_nothing_delivered() -> Result<()> {
    if !lab::is_root() {
        println!("skipping: needs root");
        return Ok(());
    }
    let t0 = Instant::now();
    let names = ["alice", "bob", "mallory", "eve"];
    let hosts: Vec<(&str, Option<Nat>)> = names.iter().map(|n| (*n, None)).collect();
    let mut mesh = Mesh::new("e2e-spoof", EXE.as_ref(), &hosts, RELAY_PORT)?;
    mesh.create_network(NETWORK, Some("10.79.0.0/16"))?;
    for name in ["alice", "bob", "eve"] {
        mesh.join(name)?;
    }
    let statuses = mesh.converge(&["alice", "bob", "eve"], CONVERGE)?;
    let alice_ip = statuses[0].virtual_ipv4()?;
    let bob_ip = statuses[1].virtual_ipv4()?;
    println!(
        "alice {alice_ip}, bob {bob_ip}, eve {} converged after {:.1?}",
        statuses[2].virtual_ipv4()?,
        t0.elapsed()
    );
    // Sanity: real traffic flows (so a missing answer below means something), and eve has a
    // session with alice.
    mesh.ping_until("eve", alice_ip, Duration::from_secs(20))?;
    mesh.ping_until("alice", bob_ip, Duration::from_secs(20))?;

    // Eve adds bob's address to her loopback and pings alice from it.
    mesh.lab.exec(
        mesh.host("eve")?,
        &["ip", "addr", "add", &format!("{bob_ip}/32"), "dev", "lo"],
    )?;
    spoof(&mesh, "eve", Some(bob_ip), "alice", alice_ip)?;

    // Mallory joins claiming bob's address: bob holds it first and keeps it; mallory's own
    // traffic, sourced from that address, is refused too.
    {
        let i = mesh
            .members
            .iter()
            .position(|m| m.name == "mallory")
            .context("no member mallory")?;
        let (lab, token) = (&mesh.lab, mesh.token.clone());
        mesh.members[i].join(lab, &token, &["--ip", &bob_ip.to_string()])?;
    }
    lab::wait_until(
        CONVERGE,
        Duration::from_millis(200),
        "alice to list mallory as the loser of bob's address",
        || {
            let s = mesh.status("alice")?;
            Ok(s.peer("mallory").is_some_and(|p| p.ip_conflict)
                && s.peer("bob").is_some_and(|p| !p.ip_conflict))
        },
    )?;
    ensure!(
        mesh.status("bob")?.ip_conflict.is_none(),
        "bob lost his address to a newcomer"
    );
    ensure!(
        mesh.status("mallory")?.ip_conflict.is_some(),
        "mallory is not told she lost"
    );
    spoof(&mesh, "mallory", None, "alice", alice_ip)?;
    // Bob still has his address and his traffic.
    mesh.ping_until("alice", bob_ip, Duration::from_secs(10))?;
    println!(
        "a_member_sending_with_another_members_address_gets_nothing_delivered: {:.1?}",
        t0.elapsed()
    );
    mesh.shutdown()
}
