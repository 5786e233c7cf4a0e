//! End-to-end NAT traversal: the real `meshvpn` binary, a relay on a public lab host and two
//! members behind the lab's NAT routers (needs root; skips otherwise).
//!
//! Every case builds its own [`Mesh`] (torn down on drop, also when the case fails), joins two
//! members, waits (bounded) until they list each other, pings both ways and prints the time from
//! the join to the first reply and to `path == "direct"` on both sides, then checks the path the
//! NAT pair should end on. The lab's unit tests check what each NAT kind really does
//! (`cargo test -p meshvpn-lab`), so a failure here is the agent's, not the lab's.
//!
//! Cases: home↔home, fullcone↔home, cgnat↔home, upnp↔symmetric → direct; home↔symmetric →
//! direct or relay (printed); symmetric↔symmetric → relay; udp-blocked↔home → relay-tcp on the
//! blocked side; the relay dying under a direct and under a relayed pair; a NAT mapping change
//! (conntrack flush, then a new public port) in the middle of a ping run.

#![allow(clippy::print_stdout, clippy::unwrap_used)]
#![allow(clippy::disallowed_methods)] // an end-to-end test: real time and real processes

use std::time::{Duration, Instant, SystemTime};

use anyhow::{ensure, Context as _, Result};
use meshvpn_lab::{self as lab, Mesh, Nat, PairReport, PeerPath};

const EXE: &str = env!("CARGO_BIN_EXE_meshvpn");
const RELAY_PORT: u16 = 3478;
/// From the join: both members list each other and ping both ways.
const PING_BOUND: Duration = Duration::from_secs(30);
/// From the join: both sides show a direct path (for pairs that must go direct).
const DIRECT_BOUND: Duration = Duration::from_secs(20);
/// From the join: how long a pair that must stay relayed is watched.
const RELAY_WATCH: Duration = Duration::from_secs(10);

fn skip() -> bool {
    if lab::is_root() {
        return false;
    }
    println!("skipping: needs root");
    true
}

/// Builds a mesh with members `a` and `b` behind `nat_a` / `nat_b` (`None`: public), creates the
/// network, joins both and measures them; prints the report, both members' `nat` status object
/// and the relay's view of them.
fn pair(
    tag: &str,
    (a, nat_a): (&str, Option<Nat>),
    (b, nat_b): (&str, Option<Nat>),
    direct_bound: Duration,
) -> Result<(Mesh, PairReport)> {
    let t = Instant::now();
    let mut mesh = Mesh::new(tag, EXE.as_ref(), &[(a, nat_a), (b, nat_b)], RELAY_PORT)?;
    mesh.create_network("e2enat", Some("10.91.0.0/16"))?;
    println!(
        "[{tag}] lab ({a}: {}, {b}: {}) + relay {} + token in {:.1?}",
        nat_a.map_or("public".into(), |n| n.to_string()),
        nat_b.map_or("public".into(), |n| n.to_string()),
        mesh.relay_addr,
        t.elapsed()
    );
    let report = mesh.measure_pair(a, b, PING_BOUND, direct_bound)?;
    println!("[{tag}] {}", report.summary());
    for name in [a, b] {
        if let Ok(s) = mesh.status(name) {
            println!(
                "[{tag}]   {name}: relay observed {}, nat {}",
                s.relay.observed.as_deref().unwrap_or("?"),
                serde_json::to_string(&s.nat)?
            );
        }
    }
    ensure!(
        report.first_ping.is_some() && report.first_ping_back.is_some(),
        "[{tag}] {a} and {b} could not ping each other within {PING_BOUND:?} of joining: {}",
        report.summary()
    );
    Ok((mesh, report))
}

fn expect_direct(tag: &str, report: &PairReport) -> Result<()> {
    ensure!(
        report.is_direct(),
        "[{tag}] expected a direct path on both sides within {DIRECT_BOUND:?}: {}",
        report.summary()
    );
    Ok(())
}

#[test]
fn home_router_to_home_router_goes_direct() -> Result<()> {
    if skip() {
        return Ok(());
    }
    let (_mesh, r) = pair(
        "nat-home-home",
        ("alice", Some(Nat::HomeRouter)),
        ("bob", Some(Nat::HomeRouter)),
        DIRECT_BOUND,
    )?;
    expect_direct("nat-home-home", &r)
}

#[test]
fn full_cone_to_home_router_goes_direct() -> Result<()> {
    if skip() {
        return Ok(());
    }
    let (_mesh, r) = pair(
        "nat-fc-home",
        ("alice", Some(Nat::FullCone)),
        ("bob", Some(Nat::HomeRouter)),
        DIRECT_BOUND,
    )?;
    expect_direct("nat-fc-home", &r)
}

#[test]
fn home_router_to_symmetric_pings_direct_or_relayed() -> Result<()> {
    if skip() {
        return Ok(());
    }
    let (_mesh, r) = pair(
        "nat-home-sym",
        ("alice", Some(Nat::HomeRouter)),
        ("bob", Some(Nat::Symmetric)),
        DIRECT_BOUND,
    )?;
    println!(
        "[nat-home-sym] {}",
        if r.is_direct() {
            "the birthday probe found a direct path"
        } else {
            "no direct path within the budget: relayed"
        }
    );
    Ok(())
}

#[test]
fn symmetric_to_symmetric_stays_relayed() -> Result<()> {
    if skip() {
        return Ok(());
    }
    let (_mesh, r) = pair(
        "nat-sym-sym",
        ("alice", Some(Nat::Symmetric)),
        ("bob", Some(Nat::Symmetric)),
        RELAY_WATCH,
    )?;
    ensure!(
        r.path_a == Some(PeerPath::Relay) && r.path_b == Some(PeerPath::Relay),
        "[nat-sym-sym] two symmetric NATs should stay on the relay: {}",
        r.summary()
    );
    Ok(())
}

#[test]
fn udp_blocked_falls_back_to_relay_over_tcp() -> Result<()> {
    if skip() {
        return Ok(());
    }
    let tag = "nat-udpblk-home";
    let (mesh, r) = pair(
        tag,
        ("alice", Some(Nat::UdpBlocked)),
        ("bob", Some(Nat::HomeRouter)),
        Duration::ZERO,
    )?;
    let took = lab::wait_until(
        DIRECT_BOUND,
        Duration::from_millis(200),
        "alice (UDP blocked) to show bob on relay-tcp",
        || Ok(mesh.path("alice", "bob")? == Some(PeerPath::RelayTcp)),
    );
    let paths = (mesh.path("alice", "bob")?, mesh.path("bob", "alice")?);
    println!("[{tag}] paths at the end (alice's view, bob's view): {paths:?}");
    let took = took.with_context(|| format!("[{tag}] {}", r.summary()))?;
    println!("[{tag}] alice shows relay-tcp {took:.1?} after the pings worked");
    Ok(())
}

#[test]
fn upnp_to_symmetric_goes_direct_through_the_port_mapping() -> Result<()> {
    if skip() {
        return Ok(());
    }
    let tag = "nat-upnp-sym";
    let (mesh, r) = pair(
        tag,
        ("alice", Some(Nat::Upnp)),
        ("bob", Some(Nat::Symmetric)),
        DIRECT_BOUND,
    )?;
    // The direct path must come from the port mapping (a birthday probe can also find one).
    let router = mesh
        .host("alice")?
        .router_ns
        .clone()
        .context("alice has no router")?;
    let mappings = mesh.lab.exec_in_ns(
        &router,
        &[
            "nft",
            "list",
            "chain",
            "inet",
            "lab",
            "prerouting_miniupnpd",
        ],
        Duration::from_secs(10),
    )?;
    let mappings: Vec<String> = String::from_utf8_lossy(&mappings.stdout)
        .lines()
        .filter(|l| l.contains("dnat"))
        .map(|l| l.trim().to_string())
        .collect();
    println!("[{tag}] miniupnpd's port mappings on alice's router: {mappings:?}");
    ensure!(
        !mappings.is_empty(),
        "[{tag}] alice's agent holds no UPnP/NAT-PMP/PCP mapping on her router ({})",
        r.summary()
    );
    expect_direct(tag, &r)
}

#[test]
fn cgnat_to_home_router_goes_direct() -> Result<()> {
    if skip() {
        return Ok(());
    }
    let (_mesh, r) = pair(
        "nat-cgnat-home",
        ("alice", Some(Nat::Cgnat)),
        ("bob", Some(Nat::HomeRouter)),
        DIRECT_BOUND,
    )?;
    expect_direct("nat-cgnat-home", &r)
}

/// The relay dies (SIGKILL) under two members on a direct path: their pings go on.
#[test]
fn relay_death_keeps_direct_paths_working() -> Result<()> {
    if skip() {
        return Ok(());
    }
    let tag = "nat-relaykill-direct";
    let (mut mesh, r) = pair(
        tag,
        ("alice", Some(Nat::HomeRouter)),
        ("bob", Some(Nat::HomeRouter)),
        DIRECT_BOUND,
    )?;
    expect_direct(tag, &r)?;
    mesh.kill_relay()?;
    let killed = SystemTime::now();
    println!("[{tag}] relay killed with SIGKILL; pinging for 12 s");
    let run =
        mesh.lab
            .start_ping_run(mesh.host("alice")?, r.ip_b, 60, Duration::from_millis(200))?;
    let log = run.finish(&mesh.lab)?;
    let silence = log.longest_silence_after(killed);
    println!(
        "[{tag}] {} of {} pings answered after the relay died (longest silence {silence:?}); paths {:?} / {:?}",
        log.received(),
        log.sent,
        mesh.path("alice", "bob")?,
        mesh.path("bob", "alice")?
    );
    ensure!(
        log.sent >= 55 && log.loss() <= 0.05,
        "[{tag}] pings over the direct path failed after the relay died: {} of {} answered",
        log.received(),
        log.sent
    );
    ensure!(
        silence.is_some_and(|s| s < Duration::from_secs(2)),
        "[{tag}] the direct path went silent for {silence:?} after the relay died"
    );
    Ok(())
}

/// The relay dies under two relayed members: pings stop; the relay comes back (same key,
/// port and config) and pings resume without restarting any agent.
#[test]
fn relay_restart_restores_relayed_paths() -> Result<()> {
    if skip() {
        return Ok(());
    }
    let tag = "nat-relaykill-relayed";
    let (mut mesh, r) = pair(
        tag,
        ("alice", Some(Nat::Symmetric)),
        ("bob", Some(Nat::Symmetric)),
        Duration::ZERO,
    )?;
    let pids: Vec<Option<u32>> = mesh.members.iter().map(|m| m.pid).collect();
    mesh.kill_relay()?;
    println!("[{tag}] relay killed with SIGKILL");
    for i in 0..4 {
        let rtt = mesh.ping_once("alice", r.ip_b, Duration::from_millis(500))?;
        ensure!(
            rtt.is_none(),
            "[{tag}] ping {i} over the dead relay got an answer (path {:?})",
            mesh.path("alice", "bob")?
        );
    }
    println!("[{tag}] 4 pings over the dead relay got no answer, as expected");
    let restarted = Instant::now();
    mesh.restart_relay()?;
    println!(
        "[{tag}] relay restarted on {} in {:.1?}",
        mesh.relay_addr,
        restarted.elapsed()
    );
    let bound = Duration::from_secs(40);
    mesh.ping_until("alice", r.ip_b, bound)
        .with_context(|| format!("[{tag}] pings did not resume after the relay came back"))?;
    let there = restarted.elapsed();
    mesh.ping_until("bob", r.ip_a, bound.saturating_sub(there))
        .with_context(|| format!("[{tag}] pings back did not resume"))?;
    println!(
        "[{tag}] pings resumed {there:.1?} after the relay restart (both ways after {:.1?})",
        restarted.elapsed()
    );
    for (m, pid) in mesh.members.iter().zip(&pids) {
        ensure!(
            m.is_running(&mesh.lab) && m.pid == *pid,
            "[{tag}] {} was restarted or died",
            m.name
        );
    }
    Ok(())
}

/// Two direct members, a continuous ping run, and one router's NAT state changes under it:
/// first its conntrack table is flushed, then its agent's flows move to a new public port.
/// Pings must come back (bounded) and the path must end direct again.
#[test]
fn nat_mapping_change_mid_ping_run() -> Result<()> {
    if skip() {
        return Ok(());
    }
    let tag = "nat-remap";
    let (mesh, r) = pair(
        tag,
        ("alice", Some(Nat::HomeRouter)),
        ("bob", Some(Nat::HomeRouter)),
        DIRECT_BOUND,
    )?;
    expect_direct(tag, &r)?;
    let alice = mesh.host("alice")?.clone();
    let alice_sees_bob = |m: &Mesh| -> Result<Option<String>> {
        Ok(m.status("alice")?
            .peer("bob")
            .and_then(|p| p.endpoint.clone()))
    };
    let lan_port: u16 = mesh
        .status("alice")?
        .endpoints
        .first()
        .and_then(|e| e.rsplit_once(':'))
        .and_then(|(_, p)| p.parse().ok())
        .context("alice's status has no endpoint with her UDP port")?;
    let bound = Duration::from_secs(30);

    for (phase, change) in ["conntrack flush", "new public port"]
        .into_iter()
        .enumerate()
    {
        let before = mesh.path("bob", "alice")?;
        let seen_before = mesh
            .status("bob")?
            .peer("alice")
            .and_then(|p| p.endpoint.clone());
        let run = mesh
            .lab
            .start_ping_run(&alice, r.ip_b, 150, Duration::from_millis(200))?;
        std::thread::sleep(Duration::from_secs(2));
        let (at, changed) = (SystemTime::now(), Instant::now());
        match phase {
            0 => mesh.lab.flush_conntrack(&alice)?,
            _ => {
                let new_port = if lan_port == 45_000 { 45_001 } else { 45_000 };
                mesh.lab.remap_udp_port(&alice, lan_port, new_port)?;
            }
        }
        // Watch the paths while the run goes on (and after it, up to the bound).
        let run_len = Duration::from_millis(200 * 150);
        let (mut left_direct, mut direct_again) = (None, None);
        let end_paths = loop {
            let paths = (mesh.path("alice", "bob")?, mesh.path("bob", "alice")?);
            let both = paths.0 == Some(PeerPath::Direct) && paths.1 == Some(PeerPath::Direct);
            let now = changed.elapsed();
            if !both && left_direct.is_none() {
                left_direct = Some(now);
            }
            if both && left_direct.is_some() && direct_again.is_none() {
                direct_again = Some(now);
            }
            if (both && now >= run_len) || now >= bound.max(run_len) || lab::interrupted() {
                break paths;
            }
            std::thread::sleep(Duration::from_millis(300));
        };
        let log = run.finish(&mesh.lab)?;
        let recovered = log.recovered_after(at, Duration::from_secs(1));
        let silence = log.longest_silence_after(at);
        let seen_after = mesh
            .status("bob")?
            .peer("alice")
            .and_then(|p| p.endpoint.clone());
        println!(
            "[{tag}] {change}: {}/{} pings answered; longest silence after the change \
             {silence:.1?}, replies flowing again {recovered:.1?} after it",
            log.received(),
            log.sent
        );
        println!(
            "[{tag}] {change}: bob saw alice at {seen_before:?} (path {before:?}), then at \
             {seen_after:?}; alice sees bob at {:?}",
            alice_sees_bob(&mesh)?
        );
        match (left_direct, direct_again) {
            (None, _) => println!("[{tag}] {change}: the path stayed direct on both sides"),
            (Some(l), Some(d)) => println!(
                "[{tag}] {change}: the path left direct {l:.1?} after the change and was \
                 direct again on both sides {d:.1?} after it"
            ),
            (Some(l), None) => println!(
                "[{tag}] {change}: the path left direct {l:.1?} after the change and is \
                 {end_paths:?} at the end"
            ),
        }
        ensure!(
            recovered.is_some_and(|d| d <= bound),
            "[{tag}] {change}: pings did not recover within {bound:?} ({}/{} answered)",
            log.received(),
            log.sent
        );
        ensure!(
            end_paths.0 == Some(PeerPath::Direct) && end_paths.1 == Some(PeerPath::Direct),
            "[{tag}] {change}: the path did not end direct within {bound:?}: {end_paths:?}"
        );
    }
    Ok(())
}

#[test]
fn udp_blocked_mid_session_moves_to_relay_over_tcp() -> Result<()> {
    if skip() {
        return Ok(());
    }
    let tag = "e2e-udp-midway";
    let (mesh, report) = pair(tag, ("alice", None), ("bob", None), DIRECT_BOUND)?;
    expect_direct(tag, &report)?;
    // A firewall on alice's host starts dropping all outbound UDP except DNS.
    let host = mesh.host("alice")?.clone();
    let nft = "table inet midway { chain out { type filter hook output priority 0; udp dport != 53 drop; }; }";
    mesh.lab.exec(&host, &["nft", nft])?;
    let blocked = Instant::now();
    let t = lab::wait_until(
        Duration::from_secs(40),
        Duration::from_millis(200),
        "alice on relay-tcp",
        || Ok(mesh.path("alice", "bob")? == Some(PeerPath::RelayTcp)),
    )?;
    println!("[{tag}] UDP blocked mid-session: alice on relay-tcp after {t:.1?}");
    mesh.ping_until("alice", report.ip_b, Duration::from_secs(20))?;
    println!(
        "[{tag}] pings flow again {:.1?} after the block",
        blocked.elapsed()
    );
    mesh.shutdown()
}
