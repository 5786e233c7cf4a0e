//! End-to-end: a member restarted while every relay is down finds its peers again — the real
//! `meshvpn` binary in lab namespaces (needs root; skips otherwise).
//!
//! Three members: `pub` on a public host, `carol` and `dave` behind home routers; all pairs
//! go direct. The relay is killed with SIGKILL, then carol is restarted. Her agent binds a new
//! UDP port, so her router maps her to a public port dave's router has never seen, and the
//! relay cannot pass her call-me. She remembers the members (`<network>.peers`), reaches the
//! public member at its remembered address, and reaches dave because `pub` passes her call-me
//! to him (dave's log shows it). Both times are printed.

#![allow(clippy::print_stdout, clippy::unwrap_used)]
#![allow(clippy::disallowed_methods)] // an end-to-end test: real time and real processes

use std::time::{Duration, Instant};

use anyhow::{ensure, Context as _, Result};
use meshvpn_lab::{self as lab, Mesh, Nat, PeerPath, Signal};

const EXE: &str = env!("CARGO_BIN_EXE_meshvpn");
const RELAY_PORT: u16 = 3478;
/// From the join: every pair on a direct path.
const DIRECT_BOUND: Duration = Duration::from_secs(40);
/// From carol's restart: she pings each peer.
const REJOIN_BOUND: Duration = Duration::from_secs(30);

#[test]
fn a_member_restarted_with_the_relay_down_finds_a_public_and_a_punchable_peer() -> Result<()> {
    if !lab::is_root() {
        println!("skipping: needs root");
        return Ok(());
    }
    let tag = "helping";
    let names = ["pub", "carol", "dave"];
    let mut mesh = Mesh::new(
        tag,
        EXE.as_ref(),
        &[
            ("pub", None),
            ("carol", Some(Nat::HomeRouter)),
            ("dave", Some(Nat::HomeRouter)),
        ],
        RELAY_PORT,
    )?;
    mesh.create_network("e2ehelp", Some("10.94.0.0/16"))?;
    for name in names {
        mesh.join(name)?;
    }
    let statuses = mesh.converge(&names, Duration::from_secs(30))?;
    let ips: Vec<_> = statuses
        .iter()
        .map(|s| s.virtual_ipv4())
        .collect::<Result<_, _>>()?;
    let joined = Instant::now();
    lab::wait_until(
        DIRECT_BOUND,
        Duration::from_millis(200),
        "every pair to go direct",
        || {
            for (i, a) in names.iter().enumerate() {
                for (j, b) in names.iter().enumerate() {
                    if i != j && mesh.path(a, b)? != Some(PeerPath::Direct) {
                        // Traffic makes the punch happen sooner.
                        let _ = mesh.ping_once(a, ips[j], Duration::from_millis(200));
                        return Ok(false);
                    }
                }
            }
            Ok(true)
        },
    )?;
    println!(
        "[{tag}] every pair direct {:.1?} after the join",
        joined.elapsed()
    );

    mesh.kill_relay()?;
    println!("[{tag}] relay killed with SIGKILL");
    std::thread::sleep(Duration::from_secs(2));
    let carol = mesh
        .members
        .iter_mut()
        .find(|m| m.name == "carol")
        .context("carol")?;
    carol.stop(&mesh.lab, Signal::Term)?;
    let peers_file = carol.config_dir.join("e2ehelp.peers");
    ensure!(
        std::fs::read_to_string(&peers_file).is_ok_and(|t| t.lines().count() == 2),
        "carol's agent did not remember her two peers in {}",
        peers_file.display()
    );
    let restarted = Instant::now();
    carol.up(&mesh.lab, "e2ehelp")?;
    mesh.ping_until("carol", ips[0], REJOIN_BOUND)
        .context("carol cannot reach the public member after her restart")?;
    let to_pub = restarted.elapsed();
    mesh.ping_until("carol", ips[2], REJOIN_BOUND.saturating_sub(to_pub))
        .context("carol cannot reach dave after her restart")?;
    let to_dave = restarted.elapsed();
    println!(
        "[{tag}] relay down, carol restarted: pings the public member after {to_pub:.1?}, dave after {to_dave:.1?}"
    );
    let status = mesh.status("carol")?;
    println!(
        "[{tag}] carol's paths: pub {:?}, dave {:?}; relays {:?}",
        status.peer("pub").map(|p| p.path),
        status.peer("dave").map(|p| p.path),
        status
            .relays
            .iter()
            .map(|r| (&r.address, r.answering))
            .collect::<Vec<_>>()
    );
    ensure!(
        status
            .peer("dave")
            .is_some_and(|p| p.path == PeerPath::Direct),
        "[{tag}] carol reaches dave, but not directly (no relay is up): {:?}",
        status.peer("dave")
    );
    let dave_log = std::fs::read_to_string(&mesh.member("dave")?.log).unwrap_or_default();
    ensure!(
        dave_log.contains("probing a caller whose call-me a member passed on"),
        "[{tag}] dave's log shows no passed call-me; was the helper needed at all?"
    );
    mesh.shutdown()
}
