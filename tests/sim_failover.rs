//! Deterministic simulation of relay failover: members register with two relays; the first
//! dies while two members behind symmetric NATs (relayed, by the oracle) exchange packets.
//!
//! Checked, with latency and 1 % loss:
//! - before the failure every pair has the path the oracle predicts (direct where a punch can
//!   work, relayed where neither side is predictable) and everyone follows relay 0;
//! - the longest gap in the relayed pair's packet stream across the failure stays under 10 s
//!   (printed), every member then follows relay 1, and every pair still delivers;
//! - a member restarted while relay 0 is down joins through relay 1 (time printed);
//! - once relay 0 is back (restarted, empty) everyone moves back to it after the failback
//!   hold, and every pair delivers again.

#![allow(clippy::unwrap_used)]
#![allow(clippy::disallowed_methods, clippy::print_stdout)] // the simulator's start time; the printed seed and timings

mod simnet;

use std::time::Duration;

use meshvpn::relay::server::RelayServer;
use rand::Rng;
use simnet::nat::{self, NatSpec};
use simnet::Sim;

const SPECS: [Option<NatSpec>; 4] = [
    Some(NatSpec::SYMMETRIC),
    Some(NatSpec::SYMMETRIC),
    Some(NatSpec::HOME_ROUTER),
    None,
];
const NAMES: [&str; 4] = ["sym-a", "sym-b", "home", "public"];

fn everyone_knows_everyone(s: &Sim) -> bool {
    let n = s.members.len();
    s.members
        .iter()
        .all(|m| m.node.peer_keys().count() == n - 1)
}

/// Every ordered pair delivers a packet within `within` (one is sent every 500 ms until it
/// arrives, so a lost datagram is not a failure); panics naming a pair that does not.
fn every_pair_delivers(sim: &mut Sim, tag: &mut u32, within: Duration, when: &str) {
    let n = sim.members.len();
    let mut pending: Vec<(usize, usize, Vec<u32>)> = (0..n)
        .flat_map(|a| {
            (0..n)
                .filter(move |b| *b != a)
                .map(move |b| (a, b, Vec::new()))
        })
        .collect();
    let start = sim.now;
    while !pending.is_empty() && sim.now - start < within {
        for (a, b, tags) in &mut pending {
            sim.inject(*a, *b, *tag);
            tags.push(*tag);
            *tag += 1;
        }
        sim.run_for(Duration::from_millis(500));
        pending.retain(|(a, b, tags)| !tags.iter().any(|t| sim.received(*a, *b, *t)));
    }
    if let Some((a, b, _)) = pending.first() {
        panic!(
            "{when}: {} -> {} delivered nothing within {within:?}",
            NAMES[*a], NAMES[*b]
        );
    }
}

#[test]
fn relayed_pairs_and_joins_survive_the_first_relay_dying() {
    let seed = simnet::seed(0x5eed_f411);
    let mut sim = Sim::new(seed, (10, 30), 0.01);
    sim.add_relay();
    let members: Vec<usize> = SPECS
        .iter()
        .map(|s| match s {
            Some(spec) => sim.add_member_behind(*spec),
            None => sim.add_member(None),
        })
        .collect();
    let t = sim
        .run_until(Duration::from_secs(30), everyone_knows_everyone)
        .expect("the members find each other through the relays");
    println!("4 members know each other after {t:?}");
    // Give punches (and birthday probes) time, then check the oracle.
    sim.run_for(Duration::from_secs(60));
    for &a in &members {
        for &b in &members {
            if a == b {
                continue;
            }
            match nat::outcome(SPECS[a].as_ref(), SPECS[b].as_ref()) {
                nat::Outcome::Relay => assert!(
                    !sim.is_direct(a, b),
                    "{} -> {} is direct although the oracle says relay",
                    NAMES[a],
                    NAMES[b]
                ),
                nat::Outcome::Punch => assert!(
                    sim.is_direct(a, b),
                    "{} -> {} is not direct although a punch works",
                    NAMES[a],
                    NAMES[b]
                ),
                nat::Outcome::Birthday => {}
            }
        }
    }
    assert!(sim.members.iter().all(|m| m.node.primary_relay() == 0));
    assert!(
        sim.members.iter().all(|m| m.node.is_synced()),
        "every member holds relay 0's member table"
    );
    let mut tag = 1u32;
    every_pair_delivers(
        &mut sim,
        &mut tag,
        Duration::from_secs(5),
        "before the failure",
    );

    // The relayed pair streams packets both ways every 100 ms; relay 0 dies 5 s in.
    let (a, b) = (members[0], members[1]);
    let mut last = [sim.now; 2];
    let mut longest = [Duration::ZERO; 2];
    let mut outstanding: Vec<(u32, usize)> = Vec::new();
    let start = sim.now;
    let mut killed = false;
    while sim.now - start < Duration::from_secs(30) {
        if !killed && sim.now - start >= Duration::from_secs(5) {
            sim.relay_alive = false;
            killed = true;
        }
        for (dir, (from, to)) in [(a, b), (b, a)].into_iter().enumerate() {
            sim.inject(from, to, tag);
            outstanding.push((tag, dir));
            tag += 1;
        }
        sim.run_for(Duration::from_millis(100));
        let now = sim.now;
        outstanding.retain(|&(t, dir)| {
            let (from, to) = if dir == 0 { (a, b) } else { (b, a) };
            if sim.received(from, to, t) {
                longest[dir] = longest[dir].max(now - last[dir]);
                last[dir] = now;
                false
            } else {
                true
            }
        });
    }
    for dir in 0..2 {
        longest[dir] = longest[dir].max(sim.now - last[dir]);
    }
    println!(
        "relay 0 died: longest gap {} -> {}: {:?}, {} -> {}: {:?}",
        NAMES[a], NAMES[b], longest[0], NAMES[b], NAMES[a], longest[1]
    );
    assert!(
        longest.iter().all(|g| *g < Duration::from_secs(10)),
        "a relayed pair was cut off for 10 s or more: {longest:?}"
    );
    for (i, m) in sim.members.iter().enumerate() {
        assert_eq!(m.node.primary_relay(), 1, "{} follows relay 1", NAMES[i]);
    }
    every_pair_delivers(
        &mut sim,
        &mut tag,
        Duration::from_secs(5),
        "after the failover",
    );
    sim.run_until(Duration::from_secs(30), |s| {
        s.members.iter().all(|m| m.node.is_synced())
    })
    .expect("every member holds relay 1's member table after the failover");

    // A member restarted while relay 0 is down joins through relay 1.
    let c = members[2];
    sim.restart(c);
    let t = sim
        .run_until(Duration::from_secs(30), everyone_knows_everyone)
        .expect("the restarted member rejoins through relay 1");
    println!(
        "{} restarted with relay 0 down; everyone knows it again after {t:?}",
        NAMES[c]
    );
    every_pair_delivers(
        &mut sim,
        &mut tag,
        Duration::from_secs(20),
        "after the restart",
    );

    // Relay 0 comes back (restarted, knowing nobody); members move back after the hold.
    let key = sim.relay_secret.clone();
    let clock = sim.relay_clock();
    sim.relay = RelayServer::new(key, sim.rng.gen(), clock);
    sim.relay_alive = true;
    let t = sim
        .run_until(Duration::from_secs(60), |s| {
            s.members.iter().all(|m| m.node.primary_relay() == 0)
        })
        .expect("everyone follows relay 0 again");
    println!(
        "relay 0 back; everyone follows it again after {t:?} (failback hold {:?})",
        meshvpn::node::relay_session::FAILBACK_AFTER
    );
    assert!(everyone_knows_everyone(&sim));
    every_pair_delivers(
        &mut sim,
        &mut tag,
        Duration::from_secs(5),
        "after the failback",
    );
}
