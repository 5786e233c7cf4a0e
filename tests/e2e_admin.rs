//! End-to-end administration: two networks on the same hosts, `meshvpn ping` reporting direct
//! vs relay, and `meshvpn netcheck` reporting the NAT the lab built (needs root; skips otherwise).
//!
//! Each test builds its own lab and tears it down on drop, even when it fails. Only lab
//! addresses are ever contacted.

#![allow(clippy::print_stdout)] // an end-to-end test reports its progress

use std::net::Ipv4Addr;
use std::time::Duration;

use anyhow::{ensure, Context as _, Result};
use meshvpn_lab::{self as lab, wait_until, Lab, Mesh, Nat, Node, PeerPath, Status};

const EXE: &str = env!("CARGO_BIN_EXE_meshvpn");
const RELAY_PORT: u16 = 3478;
const CONVERGE: Duration = Duration::from_secs(30);

fn skip() -> bool {
    if lab::is_root() {
        return false;
    }
    println!("skipping: needs root");
    true
}

fn status_of(node: &Node, lab: &Lab, network: &str) -> Result<Status> {
    node.status(lab, network)
}

/// Waits until `node`'s status for `network` lists exactly `want` (sorted names).
fn wait_peers(node: &Node, lab: &Lab, network: &str, want: &[&str]) -> Result<Duration> {
    let mut want: Vec<String> = want.iter().map(|s| s.to_string()).collect();
    want.sort();
    wait_until(
        CONVERGE,
        Duration::from_millis(100),
        &format!("{} to list {want:?} in {network}", node.name),
        || Ok(status_of(node, lab, network)?.peer_names() == want),
    )
}

fn vip(node: &Node, lab: &Lab, network: &str) -> Result<Ipv4Addr> {
    Ok(status_of(node, lab, network)?.virtual_ipv4()?)
}

#[test]
fn two_networks_on_the_same_hosts_stay_separate() -> Result<()> {
    if skip() {
        return Ok(());
    }
    let mut lab = Lab::new("twonet")?;
    let relay_host = lab.add_public_host("relay")?;
    let hosts = [
        lab.add_public_host("a")?,
        lab.add_public_host("b")?,
        lab.add_public_host("c")?,
    ];
    let mut relay = Node::new(&lab, EXE.as_ref(), &relay_host, "relay")?;
    let relay_addr = relay.start_relay(&lab, RELAY_PORT)?.to_string();
    let one = relay.create_token(&lab, "one", &relay_addr, Some("10.101.0.0/16"))?;
    let two = relay.create_token(&lab, "two", &relay_addr, Some("10.102.0.0/16"))?;

    // Network "one" on all three hosts; network "two" on a and b only. Each agent has its own
    // config and run directory, TUN (mvpn-one / mvpn-two) and UDP port.
    let names = ["alice", "bob", "carol"];
    let mut net1: Vec<Node> = Vec::new();
    let mut net2: Vec<Node> = Vec::new();
    for (host, name) in hosts.iter().zip(names) {
        let mut n = Node::new(&lab, EXE.as_ref(), host, &format!("{name}-one"))?;
        n.join(&lab, &one, &[])?;
        net1.push(n);
    }
    for (host, name) in hosts.iter().zip(names).take(2) {
        let mut n = Node::new(&lab, EXE.as_ref(), host, &format!("{name}-two"))?;
        n.join(&lab, &two, &[])?;
        net2.push(n);
    }
    let one_names: Vec<String> = names.iter().map(|n| format!("{n}-one")).collect();
    for (i, n) in net1.iter().enumerate() {
        let others: Vec<&str> = one_names
            .iter()
            .enumerate()
            .filter(|(j, _)| *j != i)
            .map(|(_, s)| s.as_str())
            .collect();
        let t = wait_peers(n, &lab, "one", &others)?;
        println!("{} sees {others:?} in network one after {t:.1?}", n.name);
    }
    wait_peers(&net2[0], &lab, "two", &["bob-two"])?;
    wait_peers(&net2[1], &lab, "two", &["alice-two"])?;

    let ip1: Vec<Ipv4Addr> = net1
        .iter()
        .map(|n| vip(n, &lab, "one"))
        .collect::<Result<_>>()?;
    let ip2: Vec<Ipv4Addr> = net2
        .iter()
        .map(|n| vip(n, &lab, "two"))
        .collect::<Result<_>>()?;
    ensure!(
        ip1.iter().all(|ip| ip.octets()[..2] == [10, 101]),
        "network one addresses {ip1:?}"
    );
    ensure!(
        ip2.iter().all(|ip| ip.octets()[..2] == [10, 102]),
        "network two addresses {ip2:?}"
    );

    // Within each network every member reaches every other.
    for (i, from) in hosts.iter().enumerate() {
        for (j, to) in ip1.iter().enumerate() {
            if i != j {
                ensure!(
                    lab.ping(from, *to, 3, Duration::from_secs(1)),
                    "{} cannot ping {to} in network one",
                    names[i]
                );
            }
        }
    }
    ensure!(
        lab.ping(&hosts[0], ip2[1], 3, Duration::from_secs(1)),
        "alice cannot ping bob in network two"
    );
    ensure!(
        lab.ping(&hosts[1], ip2[0], 3, Duration::from_secs(1)),
        "bob cannot ping alice in network two"
    );
    // carol is not in network two: she reaches none of its addresses.
    for ip in &ip2 {
        ensure!(
            !lab.ping(&hosts[2], *ip, 2, Duration::from_secs(1)),
            "carol reached {ip} of network two"
        );
    }
    // Each network's status lists only its own members, and the interfaces carry separate subnets.
    ensure!(status_of(&net2[0], &lab, "two")?.peer_names() == vec!["bob-two".to_string()]);
    let routes =
        String::from_utf8_lossy(&lab.exec(&hosts[0], &["ip", "-4", "route"])?.stdout).to_string();
    ensure!(
        routes.contains("10.101.0.0/16 dev mvpn-one"),
        "routes on a: {routes}"
    );
    ensure!(
        routes.contains("10.102.0.0/16 dev mvpn-two"),
        "routes on a: {routes}"
    );

    // A third network whose subnet overlaps network one is refused on a host running one.
    let three = relay.create_token(&lab, "three", &relay_addr, Some("10.101.128.0/17"))?;
    let mut n3 = Node::new(&lab, EXE.as_ref(), &hosts[2], "carol-three")?;
    let out = n3.run(
        &lab,
        &["join", &three, "--name", "carol"],
        Duration::from_secs(10),
    )?;
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    ensure!(
        !out.status.success() && err.contains("overlaps"),
        "overlapping subnet not refused: {err}"
    );
    println!("overlap refused: {}", err.trim());
    n3.pid = None;
    drop(net2);
    drop(net1);
    drop(relay);
    lab.teardown();
    Ok(())
}

/// Runs `meshvpn ping` on `from` and returns stdout.
fn meshvpn_ping(mesh: &Mesh, from: &str, peer: &str) -> Result<String> {
    let node = mesh.member(from)?;
    let out = node.run(
        &mesh.lab,
        &["ping", peer, "-c", "2"],
        Duration::from_secs(20),
    )?;
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    ensure!(
        out.status.success(),
        "meshvpn ping {peer} failed: {text} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(text)
}

fn netcheck_json(mesh: &Mesh, name: &str) -> Result<serde_json::Value> {
    let node = mesh.member(name)?;
    let out = node.exec(&mesh.lab, &["netcheck", "--json"])?;
    serde_json::from_slice(&out.stdout).context("netcheck --json output")
}

#[test]
fn meshvpn_ping_and_netcheck_report_paths_and_nat() -> Result<()> {
    if skip() {
        return Ok(());
    }
    let members = [
        ("alice", Some(Nat::HomeRouter)),
        ("bob", Some(Nat::HomeRouter)),
        ("carol", Some(Nat::Symmetric)),
        ("dave", Some(Nat::UdpBlocked)),
    ];
    let mut mesh = Mesh::new("admin", EXE.as_ref(), &members, RELAY_PORT)?;
    mesh.create_network("adm", None)?;
    for (name, _) in members {
        mesh.join(name)?;
    }
    mesh.converge(&["alice", "bob", "carol", "dave"], CONVERGE)?;
    wait_until(
        Duration::from_secs(20),
        Duration::from_millis(200),
        "alice <-> bob direct",
        || Ok(mesh.path("alice", "bob")? == Some(PeerPath::Direct)),
    )?;
    wait_until(
        Duration::from_secs(20),
        Duration::from_millis(200),
        "dave on relay-tcp",
        || Ok(mesh.path("dave", "alice")? == Some(PeerPath::RelayTcp)),
    )?;

    let direct = meshvpn_ping(&mesh, "alice", "bob")?;
    println!("alice: meshvpn ping bob\n{direct}");
    ensure!(
        direct.contains("pong from bob direct"),
        "expected a direct pong: {direct}"
    );
    let relayed = meshvpn_ping(&mesh, "alice", "dave")?;
    println!("alice: meshvpn ping dave\n{relayed}");
    ensure!(
        relayed.contains("pong from dave via relay"),
        "expected a relayed pong: {relayed}"
    );
    let dave_ip = mesh.status("dave")?.virtual_ip.to_string();
    let by_ip = meshvpn_ping(&mesh, "dave", &mesh.status("alice")?.virtual_ip.to_string())?;
    ensure!(
        by_ip.contains("via relay-tcp"),
        "dave's pong comes over relay-tcp: {by_ip}"
    );
    println!("dave ({dave_ip}): {by_ip}");

    // netcheck reports the NAT each lab router really is.
    let mapping = |name: &str| -> Result<String> {
        Ok(netcheck_json(&mesh, name)?["nat"]["mapping"]
            .as_str()
            .unwrap_or_default()
            .to_string())
    };
    wait_until(
        Duration::from_secs(20),
        Duration::from_millis(300),
        "NAT verdicts",
        || {
            Ok(mapping("alice")? == "endpoint-independent mapping"
                && mapping("carol")?.starts_with("symmetric")
                && mapping("dave")?.starts_with("UDP blocked"))
        },
    )?;
    for name in ["alice", "carol", "dave"] {
        println!("{name}: netcheck says {}", mapping(name)?);
    }
    let dave = netcheck_json(&mesh, "dave")?;
    let reasons: Vec<String> = dave["peers"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|p| p["relay_reason"].as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default();
    ensure!(
        reasons.len() == 3 && reasons.iter().all(|r| r.contains("UDP blocked here")),
        "dave's reasons: {reasons:?}"
    );
    let text =
        String::from_utf8_lossy(&mesh.member("alice")?.exec(&mesh.lab, &["netcheck"])?.stdout)
            .to_string();
    println!("alice: meshvpn netcheck\n{text}");
    ensure!(
        text.contains("UDP blocked at the peer"),
        "alice explains why dave is relayed: {text}"
    );

    // `list` shows the network up; `down` stops bob, who leaves the others' status at once;
    // `leave --yes` stops carol, tells the relay and deletes her config.
    let list = String::from_utf8_lossy(&mesh.member("alice")?.exec(&mesh.lab, &["list"])?.stdout)
        .to_string();
    ensure!(
        list.contains("adm") && list.contains("up, 3 peer(s)"),
        "list: {list}"
    );
    mesh.member("bob")?.exec(&mesh.lab, &["down", "adm"])?;
    let t = wait_until(
        Duration::from_secs(10),
        Duration::from_millis(100),
        "bob to leave",
        || Ok(mesh.status("alice")?.peer("bob").is_none()),
    )?;
    println!("after meshvpn down, bob left alice's status in {t:.1?}");
    let carol = mesh.member("carol")?;
    let config = carol.config_dir.join("adm.toml");
    ensure!(config.exists());
    carol.exec(&mesh.lab, &["leave", "adm", "--yes"])?;
    ensure!(!config.exists(), "leave deletes the config");
    let t = wait_until(
        Duration::from_secs(10),
        Duration::from_millis(100),
        "carol to leave",
        || Ok(mesh.status("alice")?.peer("carol").is_none()),
    )?;
    println!("after meshvpn leave --yes, carol left alice's status in {t:.1?}");
    let list = String::from_utf8_lossy(&carol.exec(&mesh.lab, &["list"])?.stdout).to_string();
    ensure!(
        list.contains("no networks configured"),
        "carol's list after leaving: {list}"
    );
    mesh.shutdown()
}
