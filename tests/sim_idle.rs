//! Deterministic simulation of an idle network: how many bytes an idle member moves, split
//! into its path to the peer and its relay session, and that idle pairs keep their direct path
//! with sparse keepalives at an interval learned per path (a NAT that forgets mappings after
//! 30 s, and no NAT at all). Prints the figures per day.

#![allow(clippy::unwrap_used)]
#![allow(clippy::disallowed_methods, clippy::print_stdout)] // the simulator's start instant and the printed seed

mod simnet;

use std::time::Duration;

use meshvpn::node::peer::Path;
use simnet::nat::NatSpec;
use simnet::{Sim, Tapped};

/// IPv4 + UDP headers on the wire.
const HEADERS: u64 = 28;
const IDLE: Duration = Duration::from_secs(3600);

fn both_direct(sim: &Sim, a: usize, b: usize) -> bool {
    matches!(
        sim.members[a].node.path_to(&sim.key(b)),
        Some(Path::Direct { .. })
    ) && matches!(
        sim.members[b].node.path_to(&sim.key(a)),
        Some(Path::Direct { .. })
    )
}

/// Bytes per day to and from `public` (member `a`'s address on the internet): (peer path,
/// relay session).
fn per_day(sim: &Sim, tap: &[Tapped], public: std::net::IpAddr, secs: u64) -> (u64, u64) {
    let relay = sim.relay_addr.ip();
    let (mut path, mut relayed, mut sent) = (0u64, 0u64, 0u64);
    for t in tap {
        if t.src.ip() != public && t.dst.ip() != public {
            continue;
        }
        let bytes = t.payload.len() as u64 + HEADERS;
        if t.src.ip() == relay || t.dst.ip() == relay {
            relayed += bytes;
        } else {
            path += bytes;
            if t.src.ip() == public {
                sent += 1;
            }
        }
    }
    println!("  {sent} datagrams sent on the path in {secs} s");
    (path * 86_400 / secs, relayed * 86_400 / secs)
}

/// Runs an idle hour after the pair went direct; returns (time direct, bytes per day).
fn idle_hour(sim: &mut Sim, a: usize, b: usize, public: std::net::IpAddr) -> (Duration, u64, u64) {
    sim.run_until(Duration::from_secs(60), |s| both_direct(s, a, b))
        .expect("the pair goes direct");
    // Settle: the peer turns idle and the keepalive interval is learned.
    sim.run_for(Duration::from_secs(600));
    sim.tap = Some(Vec::new());
    let mut direct = Duration::ZERO;
    let step = Duration::from_secs(1);
    let mut t = Duration::ZERO;
    while t < IDLE {
        sim.run_for(step);
        t += step;
        if both_direct(sim, a, b) {
            direct += step;
        }
    }
    let tap = sim.tap.take().unwrap();
    let (path, relay) = per_day(sim, &tap, public, IDLE.as_secs());
    (direct, path, relay)
}

#[test]
fn an_idle_public_pair_keeps_its_direct_path_with_sparse_keepalives() {
    let seed = simnet::seed(0x1d1e);
    let mut sim = Sim::new(seed, (10, 30), 0.0);
    let a = sim.add_member(None);
    let b = sim.add_member(None);
    let public = sim.members[a].addr.ip();
    let (direct, path, relay) = idle_hour(&mut sim, a, b, public);
    println!(
        "public pair, idle hour: direct {direct:?} of {IDLE:?}; per day {path} B on the path, {relay} B with the relay"
    );
    assert!(direct >= IDLE - Duration::from_secs(10), "{direct:?}");
    // A ping and a pong of ~150 bytes each way every 100 s: ~0.5 MB a day; at the active
    // interval (2 s) it would be ~26 MB.
    assert!(path < 1_000_000, "{path} B a day on an idle direct path");
}

#[test]
fn an_idle_pair_behind_forgetful_nats_keeps_its_direct_path() {
    let seed = simnet::seed(0x1d1f);
    let mut sim = Sim::new(seed, (10, 30), 0.0);
    // NATs that drop a mapping after 30 s without traffic (in either direction).
    let a = sim.add_member_behind(NatSpec::FULL_CONE);
    let b = sim.add_member_behind(NatSpec::FULL_CONE);
    let public = std::net::IpAddr::V4(sim.nats[0].public_ip);
    let (direct, path, relay) = idle_hour(&mut sim, a, b, public);
    println!(
        "NATed pair (30 s mappings), idle hour: direct {direct:?} of {IDLE:?}; per day {path} B on the path, {relay} B with the relay"
    );
    assert!(direct >= IDLE * 95 / 100, "{direct:?}");
    assert!(path < 3_000_000, "{path} B a day on an idle direct path");
}
