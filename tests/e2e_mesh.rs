//! End-to-end: the real `meshvpn` binary in network namespaces (needs root; skips otherwise).
//!
//! Each test builds its own [`Lab`] (relay host + member hosts on a private lab "internet") and
//! tears it down on drop, even when it fails. Only lab addresses are ever contacted.

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context as _, Result};
use meshvpn::lab::{self, Lab, Node, Signal, Status};

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

/// A lab with a running relay and some members that joined one network.
struct Mesh {
    // Field order: nodes first, the lab last (its Drop stops everything).
    relay: Node,
    members: Vec<Node>,
    relay_addr: String,
    lab: Lab,
}

impl Mesh {
    /// Lab + relay + one public host per name (members not started yet).
    fn new(tag: &str, names: &[&str]) -> Result<Mesh> {
        let t = Instant::now();
        let mut lab = Lab::new(tag)?;
        let relay_host = lab.add_public_host("relay")?;
        let mut members = Vec::new();
        for name in names {
            let host = lab.add_public_host(name)?;
            members.push(Node::new(&lab, EXE.as_ref(), &host, name)?);
        }
        let mut relay = Node::new(&lab, EXE.as_ref(), &relay_host, "relay")?;
        let relay_addr = relay.start_relay(&lab, RELAY_PORT)?.to_string();
        println!(
            "[{tag}] lab + relay at {relay_addr} up in {:.1?}",
            t.elapsed()
        );
        Ok(Mesh {
            relay,
            members,
            relay_addr,
            lab,
        })
    }

    fn member(&self, name: &str) -> Result<&Node> {
        self.members
            .iter()
            .find(|m| m.name == name)
            .with_context(|| format!("no member {name}"))
    }

    /// Waits until every member in `names` lists exactly the others in `names` (by name);
    /// returns their statuses in `names` order.
    fn converge(&self, network: &str, names: &[&str]) -> Result<Vec<Status>> {
        let mut last: Vec<Option<Status>> = vec![None; names.len()];
        let took = lab::wait_until(
            CONVERGE,
            Duration::from_millis(200),
            &format!("{names:?} to see each other"),
            || {
                for (i, name) in names.iter().enumerate() {
                    let m = self.member(name)?;
                    ensure!(
                        m.is_running(&self.lab),
                        "{name} is not running; see {}",
                        m.log.display()
                    );
                    last[i] = Some(m.status(&self.lab, network)?);
                }
                Ok(last.iter().enumerate().all(|(i, s)| {
                    s.as_ref().is_some_and(|s| {
                        let mut want: Vec<String> = names
                            .iter()
                            .enumerate()
                            .filter(|(j, _)| *j != i)
                            .map(|(_, n)| n.to_string())
                            .collect();
                        want.sort();
                        s.peer_names() == want
                    })
                }))
            },
        )?;
        println!("{names:?} see each other after {took:.1?}");
        last.into_iter().map(|s| s.context("no status")).collect()
    }

    /// Pings `to` from `from` until the first reply (bounded); returns the time it took.
    fn first_ping(&self, from: &str, to: &str, ip: Ipv4Addr) -> Result<Duration> {
        let node = self.member(from)?;
        let mut rtt = Duration::ZERO;
        let took = lab::wait_until(
            FIRST_PING,
            Duration::from_millis(100),
            &format!("a ping from {from} to {to} ({ip})"),
            || {
                Ok(
                    match self.lab.ping_rtt(&node.host, ip, Duration::from_secs(1)) {
                        Some(r) => {
                            rtt = r;
                            true
                        }
                        None => false,
                    },
                )
            },
        )?;
        println!(
            "  ping {from:>6} -> {to:<6} {ip:<15} first reply after {took:>8.1?} (rtt {:.2} ms)",
            rtt.as_secs_f64() * 1000.0
        );
        Ok(took)
    }
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
                p.virtual_ip == other.virtual_ip,
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
    let mut mesh = Mesh::new("e2e-mesh", &names)?;
    let token =
        mesh.members[0].create_token(&mesh.lab, network, &mesh.relay_addr, Some("10.77.0.0/16"))?;
    for i in 0..mesh.members.len() {
        let (lab, m) = (&mesh.lab, &mut mesh.members[i]);
        m.join(lab, &token, &[])?;
    }
    let statuses = mesh.converge(network, &names)?;
    check_peer_ips(&names, &statuses)?;
    let ips: Vec<Ipv4Addr> = statuses.iter().map(|s| s.virtual_ip).collect();
    for (n, ip) in names.iter().zip(&ips) {
        println!("  {n}: virtual IP {ip}");
    }

    println!("ping matrix:");
    for (i, from) in names.iter().enumerate() {
        for (j, to) in names.iter().enumerate() {
            if i != j {
                mesh.first_ping(from, to, ips[j])?;
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
            for m in &mesh.members[..2] {
                if m.status(&mesh.lab, network)?.peer("carol").is_some() {
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
    let again = mesh.converge(network, &names)?;
    println!(
        "carol back in the mesh {:.1?} after `meshvpn up`",
        t.elapsed()
    );
    check_peer_ips(&names, &again)?;
    ensure!(
        again[carol].virtual_ip == ips[carol],
        "carol came back with virtual IP {} instead of {}",
        again[carol].virtual_ip,
        ips[carol]
    );
    for other in [0, 1] {
        mesh.first_ping("carol", names[other], ips[other])?;
        mesh.first_ping(names[other], "carol", ips[carol])?;
    }

    let relay_status = mesh.relay.stop(&mesh.lab, Signal::Term)?;
    println!("relay stopped: {relay_status:?}");
    println!("three_members_mesh_leave_and_return: {:.1?}", t0.elapsed());
    Ok(())
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
    let mut mesh = Mesh::new("e2e-intruder", &["alice", "bob", "mallory"])?;
    let token = mesh.members[0].create_token(&mesh.lab, network, &mesh.relay_addr, Some(subnet))?;
    for i in 0..2 {
        let (lab, m) = (&mesh.lab, &mut mesh.members[i]);
        m.join(lab, &token, &[])?;
    }
    let statuses = mesh.converge(network, &members)?;
    check_peer_ips(&members, &statuses)?;
    let ips: Vec<Ipv4Addr> = statuses.iter().map(|s| s.virtual_ip).collect();
    // Sanity: the members reach each other, so a failed intruder ping means something.
    mesh.first_ping("alice", "bob", ips[1])?;
    mesh.first_ping("bob", "alice", ips[0])?;

    // Same name, same subnet, same relay, but a fresh secret.
    let evil =
        mesh.member("mallory")?
            .create_token(&mesh.lab, network, &mesh.relay_addr, Some(subnet))?;
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
        let (lab, m) = (&mesh.lab, &mut mesh.members[2]);
        m.join(lab, &evil, &["--ip", &evil_ip_text])?;
    }
    let mallory = mesh.member("mallory")?;
    let took = lab::wait_until(
        Duration::from_secs(15),
        Duration::from_millis(200),
        "the intruder's agent to register with the relay",
        || {
            ensure!(mallory.is_running(&mesh.lab), "the intruder's agent exited");
            let s = mallory.status(&mesh.lab, network)?;
            Ok(s.raw
                .pointer("/relay/registered")
                .and_then(serde_json::Value::as_bool)
                .unwrap_or(true))
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
        let s = node.status(&mesh.lab, network)?;
        ensure!(
            s.peer("mallory").is_none() && s.peer_by_ip(evil_ip).is_none(),
            "{name} lists the intruder: {:?}",
            s.peers
        );
        ensure!(
            s.peers.len() == 1 && s.virtual_ip == ips[i],
            "{name}'s status changed: {:?}",
            s.peers
        );
    }
    let s = mallory.status(&mesh.lab, network)?;
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
    Ok(())
}
