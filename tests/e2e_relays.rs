//! End-to-end relay failover: the real `meshvpn` binary, two relays on public lab hosts and
//! three members, alice and bob behind symmetric NATs (so they can only be relayed) and carol
//! behind a home router (needs root; skips otherwise).
//!
//! The token names both relays (`meshvpn create --relay A --relay B`). The test checks that
//! every member registers with both (`status` lists two answering relays, the first primary),
//! then kills the first relay with SIGKILL while alice pings bob every 200 ms: the longest gap
//! in the replies is printed and must stay under 10 s, and both members must then follow the
//! second relay. Then carol is restarted while the first relay is still down: she must rejoin
//! through the second (time printed) and reach alice.

#![allow(clippy::print_stdout, clippy::unwrap_used)]
#![allow(clippy::disallowed_methods)] // an end-to-end test: real time and real processes

use std::time::{Duration, Instant, SystemTime};

use anyhow::{ensure, Context as _, Result};
use meshvpn_lab::{self as lab, Mesh, Nat, Node, Signal, Status};

const EXE: &str = env!("CARGO_BIN_EXE_meshvpn");
const RELAY_PORT: u16 = 3478;
const NETWORK: &str = "e2erelays";
/// From the join: every member lists the others.
const CONVERGE_BOUND: Duration = Duration::from_secs(30);
/// The longest the relayed pair may go without a reply when a relay dies.
const FAILOVER_BOUND: Duration = Duration::from_secs(10);

fn skip() -> bool {
    if lab::is_root() {
        return false;
    }
    println!("skipping: needs root");
    true
}

/// The relays in `status`, as `(address, answering, primary)`.
fn relays(s: &Status) -> Vec<(String, bool, bool)> {
    s.relays
        .iter()
        .map(|r| (r.address.clone(), r.answering, r.primary))
        .collect()
}

#[test]
fn a_relay_dying_moves_relayed_pairs_and_joins_to_the_other() -> Result<()> {
    if skip() {
        return Ok(());
    }
    let tag = "relays";
    let t0 = Instant::now();
    let mut mesh = Mesh::new(
        tag,
        EXE.as_ref(),
        &[
            ("alice", Some(Nat::Symmetric)),
            ("bob", Some(Nat::Symmetric)),
            ("carol", Some(Nat::HomeRouter)),
        ],
        RELAY_PORT,
    )?;
    let host = mesh.lab.add_public_host("relay2")?;
    let mut relay2 = Node::new(&mesh.lab, EXE.as_ref(), &host, "relay2")?;
    let relay2_addr = relay2.start_relay(&mesh.lab, RELAY_PORT)?;
    let (a1, a2) = (mesh.relay_addr.to_string(), relay2_addr.to_string());
    let out = mesh.relay.run(
        &mesh.lab,
        &[
            "create",
            NETWORK,
            "--relay",
            &a1,
            "--relay",
            &a2,
            "--subnet",
            "10.93.0.0/16",
        ],
        Duration::from_secs(20),
    )?;
    ensure!(
        out.status.success(),
        "`meshvpn create` with two relays failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    mesh.token = String::from_utf8_lossy(&out.stdout).trim().to_string();
    mesh.network = NETWORK.to_string();
    println!(
        "[{tag}] lab, relays {a1} and {a2}, token in {:.1?}",
        t0.elapsed()
    );

    let joined = Instant::now();
    for name in ["alice", "bob", "carol"] {
        mesh.join(name)?;
    }
    let statuses = mesh.converge(&["alice", "bob", "carol"], CONVERGE_BOUND)?;
    println!(
        "[{tag}] three members list each other {:.1?} after the join",
        joined.elapsed()
    );
    let ip_a = statuses[0].virtual_ipv4()?;
    let ip_b = statuses[1].virtual_ipv4()?;
    mesh.ping_until("alice", ip_b, CONVERGE_BOUND)
        .context("alice cannot ping bob")?;
    // Every member registers with both relays; the first is the primary.
    lab::wait_until(
        Duration::from_secs(20),
        Duration::from_millis(200),
        "every member to answer on both relays",
        || {
            for name in ["alice", "bob", "carol"] {
                let r = relays(&mesh.status(name)?);
                if r != [(a1.clone(), true, true), (a2.clone(), true, false)] {
                    return Ok(false);
                }
            }
            Ok(true)
        },
    )?;
    let s = mesh.status("alice")?;
    println!(
        "[{tag}] alice: bob on {:?}, relays {:?}",
        s.peer("bob").map(|p| p.path),
        relays(&s)
    );

    // Relay 1 dies under a relayed ping run.
    let run =
        mesh.lab
            .start_ping_run(mesh.host("alice")?, ip_b, 150, Duration::from_millis(200))?;
    std::thread::sleep(Duration::from_secs(4));
    mesh.kill_relay()?;
    let killed = SystemTime::now();
    println!("[{tag}] first relay killed with SIGKILL; alice keeps pinging bob");
    let log = run.finish(&mesh.lab)?;
    let silence = log.longest_silence_after(killed);
    println!(
        "[{tag}] {} of {} pings answered; longest gap after the relay died: {silence:?} (bound {FAILOVER_BOUND:?})",
        log.received(),
        log.sent
    );
    ensure!(
        silence.is_some_and(|s| s < FAILOVER_BOUND),
        "[{tag}] the relayed pair was cut off for {silence:?} when the first relay died"
    );
    ensure!(
        log.first_reply_after(killed + Duration::from_secs(20))
            .is_some(),
        "[{tag}] no replies at the end of the run"
    );
    for name in ["alice", "bob"] {
        let r = relays(&mesh.status(name)?);
        ensure!(
            r.get(1)
                .is_some_and(|(_, answering, primary)| *answering && *primary),
            "[{tag}] {name} does not follow the second relay: {r:?}"
        );
    }

    // Carol restarts while the first relay is down and rejoins through the second.
    let carol = mesh
        .members
        .iter_mut()
        .find(|m| m.name == "carol")
        .context("carol")?;
    carol.stop(&mesh.lab, Signal::Term)?;
    let restarted = Instant::now();
    carol.up(&mesh.lab, NETWORK)?;
    lab::wait_until(
        CONVERGE_BOUND,
        Duration::from_millis(100),
        "carol to list the others again",
        || Ok(mesh.status("carol")?.peers.len() == 2),
    )?;
    let listed = restarted.elapsed();
    mesh.ping_until("carol", ip_a, CONVERGE_BOUND)
        .context("carol cannot reach alice after her restart")?;
    println!(
        "[{tag}] carol restarted with the first relay down: lists the others after {listed:.1?}, pings alice after {:.1?}; relays {:?}",
        restarted.elapsed(),
        relays(&mesh.status("carol")?)
    );
    relay2.stop(&mesh.lab, Signal::Term)?;
    mesh.shutdown()
}
