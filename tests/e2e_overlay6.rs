//! End-to-end: the real `meshvpn` binary in network namespaces (needs root; skips otherwise).
//! The IPv6 overlay: every member's TUN device carries its ULA address (derived from the
//! network id and its key, reported by `status --json` as `virtual_ipv6`), `ping -6` works
//! between those addresses both ways, `meshvpn ping` finds a member by it, and a member
//! sending from another address of the overlay prefix gets nothing delivered (the receiver
//! counts it as a spoofed source).
//!
//! The underlay stays IPv4 (the lab's NAT-free hosts); only the overlay is IPv6. The test
//! builds its own [`Mesh`] and tears it down on drop, even when it fails.

#![allow(clippy::disallowed_methods, clippy::print_stdout)] // an end-to-end test: real time, real processes, progress on stdout

use std::net::Ipv6Addr;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context as _, Result};
use meshvpn_lab::{self as lab, Mesh, Nat};

const EXE: &str = env!("CARGO_BIN_EXE_meshvpn");
const RELAY_PORT: u16 = 3478;
const NETWORK: &str = "e2e6";
/// How long members may take to see each other.
const CONVERGE: Duration = Duration::from_secs(30);
/// How long the first IPv6 ping may take to get through (handshake, path setup).
const FIRST_PING: Duration = Duration::from_secs(20);
/// How long the receiver may take to count the spoofed packets.
const COUNTED: Duration = Duration::from_secs(10);
/// Spoofed pings sent.
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

/// `ping -6` from `from` to `to`: `count` echoes, `source` as the source address if given.
fn ping6(
    mesh: &Mesh,
    from: &str,
    to: Ipv6Addr,
    count: u64,
    source: Option<Ipv6Addr>,
) -> Result<std::process::Output> {
    let mut args: Vec<String> = ["ping", "-6", "-n", "-c", &count.to_string(), "-i", "0.2"]
        .iter()
        .map(|s| s.to_string())
        .chain(["-W".into(), "1".into()])
        .collect();
    if let Some(src) = source {
        args.extend(["-I".into(), src.to_string()]);
    }
    args.push(to.to_string());
    mesh.lab
        .run(mesh.host(from)?, &args, Duration::from_secs(5 + count))
}

/// Waits until one `ping -6` from `from` to `to` is answered, then requires `ping -6 -c 3`
/// to be answered in full.
fn ping6_works(mesh: &Mesh, from: &str, to: Ipv6Addr) -> Result<()> {
    let took = lab::wait_until(
        FIRST_PING,
        Duration::from_millis(100),
        &format!("{from} to get an IPv6 ping answer from {to}"),
        || Ok(ping6(mesh, from, to, 1, None)?.status.success()),
    )?;
    let out = ping6(mesh, from, to, 3, None)?;
    let text = String::from_utf8_lossy(&out.stdout);
    ensure!(
        out.status.success() && text.contains("3 received"),
        "ping -6 -c 3 {to} from {from}: {text}"
    );
    println!("  {from} -> {to}: first answer after {took:.1?}, then 3 of 3");
    Ok(())
}

/// Whether `name`'s TUN device carries `addr` with prefix /64.
fn tun_has(mesh: &Mesh, name: &str, addr: Ipv6Addr) -> Result<bool> {
    let ifname = meshvpn::config::interface_name(NETWORK);
    let out = mesh.lab.exec(
        mesh.host(name)?,
        &["ip", "-6", "-o", "addr", "show", "dev", &ifname],
    )?;
    Ok(String::from_utf8_lossy(&out.stdout).contains(&format!("{addr}/64")))
}

#[test]
fn members_ping_each_other_over_the_ipv6_overlay_and_spoofed_sources_are_dropped() -> Result<()> {
    if !lab::is_root() {
        println!("skipping: needs root");
        return Ok(());
    }
    let t0 = Instant::now();
    let hosts: Vec<(&str, Option<Nat>)> = vec![("alice", None), ("bob", None)];
    let mut mesh = Mesh::new("e2e-ov6", EXE.as_ref(), &hosts, RELAY_PORT)?;
    mesh.create_network(NETWORK, Some("10.81.0.0/16"))?;
    mesh.join("alice")?;
    mesh.join("bob")?;
    let statuses = mesh.converge(&["alice", "bob"], CONVERGE)?;
    let alice6 = statuses[0]
        .overlay_ipv6()
        .context("alice's status has no virtual_ipv6")?;
    let bob6 = statuses[1]
        .overlay_ipv6()
        .context("bob's status has no virtual_ipv6")?;
    println!(
        "alice {alice6}, bob {bob6} converged after {:.1?}",
        t0.elapsed()
    );
    ensure!(alice6 != bob6, "two members share an overlay address");
    ensure!(
        alice6.segments()[..4] == bob6.segments()[..4] && alice6.segments()[0] >> 8 == 0xfd,
        "the addresses are not in one ULA /64: {alice6} {bob6}"
    );
    // Each member lists the other with the address the other reports for itself.
    ensure!(
        statuses[0].peer("bob").and_then(|p| p.overlay_ipv6()) == Some(bob6),
        "alice lists bob with another IPv6 address"
    );
    ensure!(
        statuses[1].peer("alice").and_then(|p| p.overlay_ipv6()) == Some(alice6),
        "bob lists alice with another IPv6 address"
    );
    ensure!(
        tun_has(&mesh, "alice", alice6)? && tun_has(&mesh, "bob", bob6)?,
        "a TUN device lacks its overlay address"
    );

    ping6_works(&mesh, "alice", bob6)?;
    ping6_works(&mesh, "bob", alice6)?;

    // `meshvpn ping` by the IPv6 overlay address.
    let out = mesh.member("alice")?.run(
        &mesh.lab,
        &["ping", &bob6.to_string(), "-c", "1"],
        Duration::from_secs(20),
    )?;
    ensure!(
        out.status.success(),
        "meshvpn ping {bob6} failed: {} {}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    // Bob adds another address of the overlay prefix to his TUN device and pings alice from
    // it: the source is not the one his key derives, so alice delivers nothing.
    let mut spoofed = bob6.octets();
    spoofed[15] ^= 0x5a;
    let spoofed = Ipv6Addr::from(spoofed);
    let ifname = meshvpn::config::interface_name(NETWORK);
    mesh.lab.exec(
        mesh.host("bob")?,
        &[
            "ip",
            "-6",
            "addr",
            "add",
            &format!("{spoofed}/128"),
            "dev",
            &ifname,
            "nodad",
        ],
    )?;
    let before = mesh.status("alice")?.dropped.spoofed_source;
    let rx_before = tun_rx(&mesh, "alice")?;
    let out = ping6(&mesh, "bob", alice6, SPOOFED, Some(spoofed))?;
    ensure!(
        !out.status.success(),
        "bob got an answer from alice with a spoofed source: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    let mut counted = 0;
    let took = lab::wait_until(
        COUNTED,
        Duration::from_millis(200),
        &format!("alice to count {SPOOFED} spoofed packets"),
        || {
            counted = mesh.status("alice")?.dropped.spoofed_source - before;
            Ok(counted >= SPOOFED)
        },
    )?;
    let delivered = tun_rx(&mesh, "alice")? - rx_before;
    println!(
        "  bob -> alice ({alice6}) from {spoofed}: {counted} counted as spoofed after {took:.1?}, {delivered} delivered"
    );
    ensure!(
        delivered == 0,
        "{delivered} packets reached alice's TUN device"
    );
    // Bob's own address still works (without the added address, which the kernel would
    // otherwise prefer as the source).
    mesh.lab.exec(
        mesh.host("bob")?,
        &[
            "ip",
            "-6",
            "addr",
            "del",
            &format!("{spoofed}/128"),
            "dev",
            &ifname,
        ],
    )?;
    ping6_works(&mesh, "bob", alice6)?;
    println!(
        "members_ping_each_other_over_the_ipv6_overlay_and_spoofed_sources_are_dropped: {:.1?}",
        t0.elapsed()
    );
    mesh.shutdown()
}
