//! Deterministic simulation of the first packets between members: the first packet sent to a
//! member whose WireGuard handshake has not happened yet, or who has not even joined yet, is
//! delivered once (not lost and left to the sender's retry), directly and through the relay.
//! Prints the simulated time from that one packet to its delivery.

#![allow(clippy::unwrap_used)]
#![allow(clippy::disallowed_methods, clippy::print_stdout)] // the printed seed and figures

mod simnet;

use std::time::Duration;

use meshvpn::node::peer::Path;
use simnet::nat::NatSpec;
use simnet::Sim;

/// `ping` sends its next echo request after 1 s: a first packet that is lost shows as a first
/// reply after more than that, so every first delivery here must take less.
const PING_INTERVAL: Duration = Duration::from_secs(1);

fn know_each_other(sim: &mut Sim, a: usize, b: usize) {
    let (ka, kb) = (sim.key(a), sim.key(b));
    sim.run_until(Duration::from_secs(30), |s| {
        s.members[a].node.path_to(&kb).is_some() && s.members[b].node.path_to(&ka).is_some()
    })
    .expect("the members learn each other through the relay");
}

/// Sends one packet `a` → `b` (tag `tag`) and returns how long it took to arrive; panics if it
/// did not arrive within `PING_INTERVAL` (nothing is re-sent).
fn one_packet(sim: &mut Sim, label: &str, a: usize, b: usize, tag: u32) -> Duration {
    sim.inject(a, b, tag);
    let took = sim.run_until(PING_INTERVAL, |s| s.received(a, b, tag));
    let dropped = sim.members[a].node.status(sim.now).dropped;
    took.unwrap_or_else(|| {
        panic!("{label}: the first packet m{a} -> m{b} was lost (drops at m{a}: {dropped:?})")
    })
}

/// The first packet both ways, like a ping and its reply; returns (first, reply) times.
fn ping(sim: &mut Sim, label: &str, a: usize, b: usize) -> (Duration, Duration) {
    let first = one_packet(sim, label, a, b, 1);
    let reply = one_packet(sim, label, b, a, 2);
    println!(
        "{label}: first packet delivered after {:.0} ms, reply after {:.0} ms (simulated)",
        first.as_secs_f64() * 1e3,
        reply.as_secs_f64() * 1e3
    );
    (first, reply)
}

#[test]
fn first_packet_to_a_fresh_direct_peer_is_delivered() {
    let seed = simnet::seed(0xf1_0001);
    let mut sim = Sim::new(seed, (10, 40), 0.0);
    let a = sim.add_member(None);
    let b = sim.add_member(None);
    know_each_other(&mut sim, a, b);
    ping(&mut sim, "direct pair", a, b);
}

#[test]
fn first_packet_to_a_fresh_relayed_peer_is_delivered() {
    let seed = simnet::seed(0xf1_0002);
    let mut sim = Sim::new(seed, (10, 40), 0.0);
    let a = sim.add_member_behind(NatSpec::SYMMETRIC);
    let b = sim.add_member_behind(NatSpec::SYMMETRIC);
    know_each_other(&mut sim, a, b);
    ping(&mut sim, "relayed pair (two symmetric NATs)", a, b);
    // Two symmetric NATs never get a direct path: all of it went through the relay.
    sim.run_for(Duration::from_secs(10));
    assert_eq!(
        sim.members[a].node.path_to(&sim.key(b)),
        Some(Path::Relayed)
    );
}

/// How many seeds the crossing test runs per kind of pair: whether crossing handshakes lose a
/// packet depends on the order their messages meet, which the latencies decide.
const CROSSING_RUNS: u64 = 12;

#[test]
fn first_packets_sent_both_ways_at_once_are_delivered() {
    let seed = simnet::seed(0xf1_0003);
    for (label, nat) in [
        ("crossing, direct pair", None),
        ("crossing, relayed pair", Some(NatSpec::SYMMETRIC)),
    ] {
        let mut slowest = Duration::ZERO;
        let mut lost = Vec::new();
        for run in 0..CROSSING_RUNS {
            let mut sim = Sim::new(seed + run, (10, 40), 0.0);
            let (a, b) = match nat {
                None => (sim.add_member(None), sim.add_member(None)),
                Some(spec) => (sim.add_member_behind(spec), sim.add_member_behind(spec)),
            };
            know_each_other(&mut sim, a, b);
            // Both handshakes start together and cross on the wire.
            sim.inject(a, b, 1);
            sim.inject(b, a, 2);
            match sim.run_until(PING_INTERVAL, |s| {
                s.received(a, b, 1) && s.received(b, a, 2)
            }) {
                Some(took) => slowest = slowest.max(took),
                None => lost.push(seed + run),
            }
        }
        println!(
            "{label}: both first packets delivered in {}/{CROSSING_RUNS} runs, the slowest after {:.0} ms (simulated)",
            CROSSING_RUNS - lost.len() as u64,
            slowest.as_secs_f64() * 1e3
        );
        assert!(
            lost.is_empty(),
            "{label}: a first packet was lost with seeds {lost:?}"
        );
    }
}

#[test]
fn first_packet_to_a_member_that_has_not_joined_yet_is_delivered() {
    let seed = simnet::seed(0xf1_0004);
    let mut sim = Sim::new(seed, (10, 40), 0.0);
    let a = sim.add_member(None);
    sim.run_until(Duration::from_secs(10), |s| {
        s.members[a].node.is_registered()
    })
    .expect("a registers");
    // b starts; a sends to b's address before the relay has told it about b.
    let b = sim.add_member(None);
    assert!(sim.members[a].node.path_to(&sim.key(b)).is_none());
    let took = one_packet(&mut sim, "not yet joined", a, b, 1);
    println!(
        "member not yet joined: first packet delivered after {:.0} ms (simulated)",
        took.as_secs_f64() * 1e3
    );
    assert_eq!(sim.members[a].node.status(sim.now).dropped.no_route, 0);
}
