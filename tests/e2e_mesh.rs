//! End-to-end: the real `meshvpn` binary in network namespaces (needs root; skips otherwise).
//!
//! Each test builds its own [`Mesh`] (relay host + member hosts on a private lab "internet") and
//! tears it down on drop, even when it fails. Only lab addresses are ever contacted.

#![allow(clippy::disallowed_methods, clippy::print_stdout)] // an end-to-end test: real time, real processes, progress on stdout

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context as _, Result};
use meshvpn_lab::{self as lab, Mesh, Nat, Signal, Status};

const EXE: &str = env!("CARGO_BIN_EXE_meshvpn");
const RELAY_PORT: u16 = 3478;
/// How long members may take to see each other.
const CONVERGE: Duration = Duration::from_secs(30);
/// How long one ordered pair may take to get its first ping through.
const FIRST_PING: Duration = Duration::from_secs(20);
/// A member that leaves with SIGTERM must vanish from the others' status within this.
const LEAVE: Duration = Duration::from_secs(10);

fn skip() -> bool {
    if lab::is_root() {
        return false;
    }
    println!("skipping: needs root");
    true
}

/// A [`Mesh`] with a running relay and one public host per name (members not started yet).
fn new_mesh(tag: &str, names: &[&str]) -> Result<Mesh> {
    let t = Instant::now();
    let members: Vec<(&str, Option<Nat>)> = names.iter().map(|n| (*n, None)).collect();
    let mesh = Mesh::new(tag, EXE.as_ref(), &members, RELAY_PORT)?;
    println!(
        "[{tag}] lab + relay at {} up in {:.1?}",
        mesh.relay_addr,
        t.elapsed()
    );
    Ok(mesh)
}

/// [`Mesh::converge`] within [`CONVERGE`], printing how long it took; returns the statuses in
/// `names` order.
fn converge(mesh: &Mesh, names: &[&str]) -> Result<Vec<Status>> {
    let t = Instant::now();
    let statuses = mesh.converge(names, CONVERGE)?;
    println!("{names:?} see each other after {:.1?}", t.elapsed());
    Ok(statuses)
}

/// Pings `to` from `from` until the first reply (bounded); returns the time it took.
fn first_ping(mesh: &Mesh, from: &str, to: &str, ip: Ipv4Addr) -> Result<Duration> {
    let host = mesh.host(from)?;
    let mut rtt = Duration::ZERO;
    let took = lab::wait_until(
        FIRST_PING,
        Duration::from_millis(100),
        &format!("a ping from {from} to {to} ({ip})"),
        || {
            Ok(match mesh.lab.ping_rtt(host, ip, Duration::from_secs(1)) {
                Some(r) => {
                    rtt = r;
                    true
                }
                None => false,
            })
        },
    )?;
    println!(
        "  ping {from:>6} -> {to:<6} {ip:<15} first reply after {took:>8.1?} (rtt {:.2} ms)",
        rtt.as_secs_f64() * 1000.0
    );
    Ok(took)
}

/// Checks that each status lists the other members with the virtual IPs they report themselves.
fn check_peer_ips(names: &[&str], statuses: &[Status]) -> Result<()> {
    for (i, s) in statuses.iter().enumerate() {
        for (j, other) in statuses.iter().enumerate() {
            if i == j {
                continue;
            }
            let p = s
                .peer(names[j])
                .with_context(|| format!("{} does not list {}", names[i], names[j]))?;
            ensure!(
                p.virtual_ipv4()? == other.virtual_ipv4()?,
                "{} lists {} with virtual IP {}, but {} says its IP is {}",
                names[i],
                names[j],
                p.virtual_ip,
                names[j],
                other.virtual_ip
            );
            ensure!(
                p.public_key == other.public_key,
                "{} lists {} with key {}, but {} says {}",
                names[i],
                names[j],
                p.public_key,
                names[j],
                other.public_key
            );
        }
    }
    Ok(())
}

#[test]
fn three_members_mesh_leave_and_return() -> Result<()> {
    if skip() {
        return Ok(());
    }
    let t0 = Instant::now();
    let network = "e2e";
    let names = ["alice", "bob", "carol"];
    let mut mesh = new_mesh("e2e-mesh", &names)?;
    mesh.create_network(network, Some("10.77.0.0/16"))?;
    for name in names {
        mesh.join(name)?;
    }
    let statuses = converge(&mesh, &names)?;
    check_peer_ips(&names, &statuses)?;
    let ips: Vec<Ipv4Addr> = statuses
        .iter()
        .map(Status::virtual_ipv4)
        .collect::<Result<_, _>>()?;
    for (n, ip) in names.iter().zip(&ips) {
        println!("  {n}: virtual IP {ip}");
    }

    println!("ping matrix:");
    for (i, from) in names.iter().enumerate() {
        for (j, to) in names.iter().enumerate() {
            if i != j {
                first_ping(&mesh, from, to, ips[j])?;
            }
        }
    }

    // carol leaves politely: the others must drop her promptly.
    let carol = 2;
    let t = Instant::now();
    let status = mesh.members[carol].stop(&mesh.lab, Signal::Term)?;
    println!(
        "carol stopped with SIGTERM in {:.1?} ({status:?})",
        t.elapsed()
    );
    let gone = lab::wait_until(
        LEAVE,
        Duration::from_millis(200),
        "carol to disappear from alice's and bob's status",
        || {
            for name in ["alice", "bob"] {
                if mesh.status(name)?.peer("carol").is_some() {
                    return Ok(false);
                }
            }
            Ok(true)
        },
    )?;
    println!("carol disappeared from the others' status {gone:.1?} after SIGTERM");

    // carol comes back with `meshvpn up` and the same config: same virtual IP, pings work.
    {
        let (lab, m) = (&mesh.lab, &mut mesh.members[carol]);
        m.up(lab, network)?;
    }
    let t = Instant::now();
    let again = converge(&mesh, &names)?;
    println!(
        "carol back in the mesh {:.1?} after `meshvpn up`",
        t.elapsed()
    );
    check_peer_ips(&names, &again)?;
    ensure!(
        again[carol].virtual_ipv4()? == ips[carol],
        "carol came back with virtual IP {} instead of {}",
        again[carol].virtual_ip,
        ips[carol]
    );
    for other in [0, 1] {
        first_ping(&mesh, "carol", names[other], ips[other])?;
        first_ping(&mesh, names[other], "carol", ips[carol])?;
    }

    let relay_status = mesh.relay.stop(&mesh.lab, Signal::Term)?;
    println!("relay stopped: {relay_status:?}");
    println!("three_members_mesh_leave_and_return: {:.1?}", t0.elapsed());
    mesh.shutdown()
}

#[test]
fn intruder_with_same_name_and_subnet_is_isolated() -> Result<()> {
    if skip() {
        return Ok(());
    }
    let t0 = Instant::now();
    let network = "e2e";
    let subnet = "10.78.0.0/16";
    let members = ["alice", "bob"];
    let mut mesh = new_mesh("e2e-intruder", &["alice", "bob", "mallory"])?;
    let token = mesh.create_network(network, Some(subnet))?.to_string();
    for name in members {
        mesh.join(name)?;
    }
    let statuses = converge(&mesh, &members)?;
    check_peer_ips(&members, &statuses)?;
    let ips: Vec<Ipv4Addr> = statuses
        .iter()
        .map(Status::virtual_ipv4)
        .collect::<Result<_, _>>()?;
    // Sanity: the members reach each other, so a failed intruder ping means something.
    first_ping(&mesh, "alice", "bob", ips[1])?;
    first_ping(&mesh, "bob", "alice", ips[0])?;

    // Same name, same subnet, same relay, but a fresh secret.
    let evil = mesh.member("mallory")?.create_token(
        &mesh.lab,
        network,
        &mesh.relay_addr.to_string(),
        Some(subnet),
    )?;
    ensure!(
        evil != token,
        "a second `meshvpn create` gave the same token"
    );
    // An address no member holds (so a reply could only come from a member).
    let evil_ip = [
        Ipv4Addr::new(10, 78, 255, 254),
        Ipv4Addr::new(10, 78, 255, 253),
    ]
    .into_iter()
    .find(|ip| !ips.contains(ip))
    .context("no free address for the intruder")?;
    let evil_ip_text = evil_ip.to_string();
    {
        // `Mesh::join` joins with the mesh's token; the intruder uses its own.
        let i = mesh.members.iter().position(|m| m.name == "mallory");
        let i = i.context("no member mallory")?;
        let (lab, m) = (&mesh.lab, &mut mesh.members[i]);
        m.join(lab, &evil, &["--ip", &evil_ip_text])?;
    }
    let mallory = mesh.member("mallory")?;
    let took = lab::wait_until(
        Duration::from_secs(15),
        Duration::from_millis(200),
        "the intruder's agent to register with the relay",
        || {
            ensure!(mallory.is_running(&mesh.lab), "the intruder's agent exited");
            let s = mesh.status("mallory")?;
            Ok(s.relay.registered)
        },
    )?;
    println!("intruder registered after {took:.1?}");

    for (name, ip) in members.iter().zip(&ips) {
        for attempt in 1..=3 {
            if mesh.lab.ping(&mallory.host, *ip, 1, Duration::from_secs(1)) {
                bail!("the intruder pinged {name} ({ip}) on attempt {attempt}");
            }
        }
        println!("  intruder -> {name} ({ip}): 3 pings, no reply (as it should be)");
    }
    // And the other direction, towards the intruder's address.
    for (i, name) in members.iter().enumerate() {
        let node = mesh.member(name)?;
        ensure!(
            !mesh
                .lab
                .ping(&node.host, evil_ip, 1, Duration::from_secs(1)),
            "{name} reached the intruder at {evil_ip}"
        );
        let s = mesh.status(name)?;
        ensure!(
            s.peer("mallory").is_none() && s.peer_by_ip(evil_ip).is_none(),
            "{name} lists the intruder: {:?}",
            s.peers
        );
        ensure!(
            s.peers.len() == 1 && s.virtual_ipv4()? == ips[i],
            "{name}'s status changed: {:?}",
            s.peers
        );
    }
    let s = mesh.status("mallory")?;
    ensure!(
        s.peers.is_empty(),
        "the intruder lists members: {:?}",
        s.peers
    );
    println!("members and intruder do not see each other");
    println!(
        "intruder_with_same_name_and_subnet_is_isolated: {:.1?}",
        t0.elapsed()
    );
    mesh.shutdown()
}
