//! End-to-end: the real `meshvpn` binary in network namespaces (needs root; skips otherwise).
//! Revocation: `meshvpn kick` cuts a member off within a printed time while the others keep
//! pinging; a machine joining with the old token reaches nobody and is listed nowhere; the
//! token `meshvpn invite` prints (on any member, which received the new secret) admits; a
//! plain `meshvpn rotate` moves everyone again; a member that was down during the kick finds
//! the new network when it comes back, even after the relay restarted in between.
//!
//! The test builds its own [`Mesh`] and tears it down on drop, even when it fails. Only lab
//! addresses are ever contacted.

#![allow(clippy::disallowed_methods, clippy::print_stdout)] // an end-to-end test: real time, real processes, progress on stdout

use std::net::Ipv4Addr;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{ensure, Context as _, Result};
use meshvpn_lab::{self as lab, Mesh, Nat, Signal};

const EXE: &str = env!("CARGO_BIN_EXE_meshvpn");
const RELAY_PORT: u16 = 3478;
const NETWORK: &str = "e2e";
/// How long members may take to see each other.
const CONVERGE: Duration = Duration::from_secs(30);
/// Ping interval of the runs that watch the kick.
const PING_INTERVAL: Duration = Duration::from_millis(200);

/// `meshvpn <args>` on member `name`, which must succeed; its stdout, trimmed.
fn meshvpn(mesh: &Mesh, name: &str, args: &[&str]) -> Result<String> {
    let out = mesh
        .member(name)?
        .run(&mesh.lab, args, Duration::from_secs(30))?;
    ensure!(
        out.status.success(),
        "meshvpn {args:?} on {name} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// Where member `name` sits in `mesh.members`.
fn index_of(mesh: &Mesh, name: &str) -> Result<usize> {
    mesh.members
        .iter()
        .position(|m| m.name == name)
        .with_context(|| format!("no member {name}"))
}

/// Starts member `name` joining with `token` (through a token file).
fn join_with(mesh: &mut Mesh, name: &str, token: &str) -> Result<u32> {
    let i = index_of(mesh, name)?;
    let lab = &mesh.lab;
    mesh.members[i].join(lab, token, &[])
}

/// Waits until member `name`'s agent logged that the network was rotated without it.
fn wait_left_out(mesh: &Mesh, name: &str) -> Result<Duration> {
    let log = mesh.member(name)?.log.clone();
    lab::wait_until(
        CONVERGE,
        Duration::from_millis(200),
        &format!("{name} to be told it was left out of the rotation"),
        || {
            Ok(std::fs::read_to_string(&log)
                .unwrap_or_default()
                .contains("rotated without this member"))
        },
    )
}

fn ip_of(mesh: &Mesh, name: &str) -> Result<Ipv4Addr> {
    Ok(mesh.status(name)?.virtual_ipv4()?)
}

#[test]
fn kick_cuts_a_member_off_and_the_old_token_admits_nobody() -> Result<()> {
    if !lab::is_root() {
        println!("skipping: needs root");
        return Ok(());
    }
    let t0 = Instant::now();
    let hosts: Vec<(&str, Option<Nat>)> = vec![
        ("alice", None),
        ("bob", Some(Nat::HomeRouter)),
        ("carol", None),
        ("mallory", None),
        ("stranger", None),
        ("dave", None),
    ];
    let mut mesh = Mesh::new("e2e-kick", EXE.as_ref(), &hosts, RELAY_PORT)?;
    let old_token = mesh
        .create_network(NETWORK, Some("10.81.0.0/16"))?
        .to_string();
    for name in ["alice", "bob", "carol", "mallory"] {
        mesh.join(name)?;
    }
    mesh.converge(&["alice", "bob", "carol", "mallory"], CONVERGE)?;
    let (alice, bob, carol) = (
        ip_of(&mesh, "alice")?,
        ip_of(&mesh, "bob")?,
        ip_of(&mesh, "carol")?,
    );
    mesh.ping_until("mallory", alice, Duration::from_secs(20))?;
    mesh.ping_until("alice", bob, Duration::from_secs(20))?;
    mesh.ping_until("bob", carol, Duration::from_secs(20))?;
    println!("4 members up and pinging after {:.1?}", t0.elapsed());

    // Carol is down while the kick happens (her machine is off).
    let carol_status_before = mesh.status("carol")?;
    {
        let i = index_of(&mesh, "carol")?;
        let lab = &mesh.lab;
        mesh.members[i].stop(lab, Signal::Kill)?;
    }

    // Pings run through the kick: alice -> bob (must keep flowing) and mallory -> alice (must
    // stop).
    let count = 100u32;
    let kept = mesh
        .lab
        .start_ping_run(mesh.host("alice")?, bob, count, PING_INTERVAL)?;
    let cut = mesh
        .lab
        .start_ping_run(mesh.host("mallory")?, alice, count, PING_INTERVAL)?;
    std::thread::sleep(Duration::from_secs(3));
    let kicked_at = SystemTime::now();
    let kick_started = Instant::now();
    let new_token = meshvpn(&mesh, "alice", &["kick", NETWORK, "mallory"])?;
    println!(
        "`meshvpn kick {NETWORK} mallory` answered in {:.1?}",
        kick_started.elapsed()
    );
    ensure!(
        new_token.starts_with("mvpn2") && new_token != old_token,
        "kick printed no new token: {new_token:?}"
    );
    let kept = kept.finish(&mesh.lab)?;
    let cut = cut.finish(&mesh.lab)?;
    let last_reply = cut
        .replies
        .iter()
        .map(|(_, at)| *at)
        .max()
        .and_then(|at| at.duration_since(kicked_at).ok());
    let after_kick = cut
        .replies
        .iter()
        .filter(|(_, at)| *at > kicked_at + Duration::from_secs(5))
        .count();
    let gap = kept
        .longest_silence_after(kicked_at)
        .unwrap_or(Duration::ZERO);
    println!(
        "kick: mallory's last reply {} after the kick; {after_kick} replies later than 5 s after it",
        last_reply.map_or("came before".to_string(), |d| format!("{d:.1?}"))
    );
    println!(
        "kick: alice -> bob kept pinging: {} of {} replies, longest gap after the kick {gap:.1?}",
        kept.received(),
        kept.sent
    );
    ensure!(
        after_kick == 0,
        "mallory still reached alice after the kick"
    );
    ensure!(
        gap < Duration::from_secs(5),
        "alice -> bob stalled {gap:?} through the kick"
    );

    // Alice's and bob's agents moved to the new secret and saved it: `invite` prints it.
    for name in ["alice", "bob"] {
        let invite = meshvpn(&mesh, name, &["invite", NETWORK])?;
        ensure!(invite == new_token, "{name}'s invite is not the new token");
    }
    // Nobody lists mallory; mallory reaches nobody and is told why.
    lab::wait_until(
        CONVERGE,
        Duration::from_millis(200),
        "alice and bob to list each other only",
        || {
            Ok(["alice", "bob"].iter().all(|n| {
                mesh.status(n)
                    .map(|s| s.peer("mallory").is_none() && s.peer_names().len() == 1)
                    .unwrap_or(false)
            }))
        },
    )?;
    ensure!(
        mesh.ping_once("mallory", bob, Duration::from_secs(1))?
            .is_none(),
        "mallory reached bob after the kick"
    );
    wait_left_out(&mesh, "mallory")?;
    // Mallory cannot rotate her way back in: the relay admits nobody under the old id.
    let out =
        mesh.member("mallory")?
            .run(&mesh.lab, &["rotate", NETWORK], Duration::from_secs(30))?;
    ensure!(
        !out.status.success(),
        "a kicked member's rotate succeeded: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    println!(
        "mallory's own rotate is refused: {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );

    // A machine with the old token is admitted nowhere and lists nobody.
    join_with(&mut mesh, "stranger", &old_token)?;
    wait_left_out(&mesh, "stranger")?;
    let s = mesh.status("stranger")?;
    ensure!(
        s.peer_names().is_empty(),
        "the old token lists {:?}",
        s.peer_names()
    );
    ensure!(
        mesh.ping_once("stranger", alice, Duration::from_secs(1))?
            .is_none(),
        "the old token reaches alice"
    );
    for n in ["alice", "bob"] {
        ensure!(
            mesh.status(n)?.peer("stranger").is_none(),
            "{n} lists the holder of the old token"
        );
    }
    println!("old token: lists nobody, reaches nobody, listed nowhere");

    // The relay restarts (an upgrade) before carol is back: it keeps the rotation on disk.
    mesh.restart_relay()?;
    mesh.converge(&["alice", "bob"], CONVERGE)?;
    println!("relay restarted; alice and bob found each other again");

    // Carol comes back with the old secret in her config and is handed the new one.
    let back = Instant::now();
    {
        let i = index_of(&mesh, "carol")?;
        let lab = &mesh.lab;
        mesh.members[i].up(lab, NETWORK)?;
    }
    mesh.converge(&["alice", "bob", "carol"], CONVERGE)?;
    mesh.ping_until("carol", alice, Duration::from_secs(20))?;
    println!(
        "carol, down during the kick, rejoined under the new secret {:.1?} after coming back",
        back.elapsed()
    );
    ensure!(
        ip_of(&mesh, "carol")? == carol_status_before.virtual_ipv4()?,
        "carol came back with another address"
    );

    // The invite token admits a newcomer.
    let invite = meshvpn(&mesh, "bob", &["invite", NETWORK])?;
    join_with(&mut mesh, "dave", &invite)?;
    mesh.converge(&["alice", "bob", "carol", "dave"], CONVERGE)?;
    mesh.ping_until("dave", bob, Duration::from_secs(20))?;

    // A plain rotate (no kick) moves everyone again.
    let rotated = meshvpn(&mesh, "dave", &["rotate", NETWORK])?;
    ensure!(rotated != invite, "rotate printed the old token");
    lab::wait_until(
        CONVERGE,
        Duration::from_millis(500),
        "every member to hold the rotated secret",
        || {
            for n in ["alice", "bob", "carol", "dave"] {
                if meshvpn(&mesh, n, &["invite", NETWORK])? != rotated {
                    return Ok(false);
                }
            }
            Ok(true)
        },
    )?;
    mesh.converge(&["alice", "bob", "carol", "dave"], CONVERGE)?;
    mesh.ping_until("alice", carol, Duration::from_secs(20))?;
    println!(
        "kick_cuts_a_member_off_and_the_old_token_admits_nobody: {:.1?}",
        t0.elapsed()
    );
    mesh.shutdown()
}
