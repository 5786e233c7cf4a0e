//! Deterministic simulation of an idle network: how many bytes an idle member moves, split
//! into its path to the peer and its relay session (with the sizes of what it sent), and that
//! idle pairs keep their direct path with sparse keepalives at an interval learned per path
//! and per relay (a NAT that forgets mappings after 30 s, and no NAT at all). Prints the
//! figures per day.

#![allow(clippy::unwrap_used)]
#![allow(clippy::disallowed_methods, clippy::print_stdout)] // the simulator's start instant and the printed seed

mod simnet;

use std::time::Duration;

use meshvpn::node::peer::Path;
use meshvpn::node::{ACK_TIMEOUT, RELAY_KEEPALIVE_MAX};
use meshvpn::relay::server::RelayServer;
use simnet::nat::NatSpec;
use simnet::{Sim, Tapped};

/// IPv4 + UDP headers on the wire.
const HEADERS: u64 = 28;
const IDLE: Duration = Duration::from_secs(3600);

/// Bytes per day to and from `public` (member `a`'s address on the internet): (peer path,
/// relay session).
fn per_day(sim: &Sim, tap: &[Tapped], public: std::net::IpAddr, secs: u64) -> (u64, u64) {
    let relay = sim.relay_addr.ip();
    let (mut path, mut relayed, mut sent) = (0u64, 0u64, 0u64);
    let mut sizes = std::collections::BTreeMap::<(bool, usize), u64>::new();
    for t in tap {
        if t.src.ip() != public && t.dst.ip() != public {
            continue;
        }
        let bytes = t.payload.len() as u64 + HEADERS;
        if t.src.ip() == public {
            let to_relay = t.dst.ip() == relay;
            *sizes.entry((to_relay, t.payload.len())).or_default() += 1;
        }
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
    for ((to_relay, len), n) in &sizes {
        let to = if *to_relay { "relay" } else { "path" };
        println!("    sent to the {to}: {n} of {len} B");
    }
    (path * 86_400 / secs, relayed * 86_400 / secs)
}

/// Runs an idle hour after the pair went direct; returns (time direct, bytes per day).
fn idle_hour(sim: &mut Sim, a: usize, b: usize, public: std::net::IpAddr) -> (Duration, u64, u64) {
    sim.run_until(Duration::from_secs(60), |s| s.both_direct(a, b))
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
        if sim.both_direct(a, b) {
            direct += step;
        }
        // Quiet refreshes keep both members on the relay all along.
        assert_eq!(sim.relay.member_count(), 2, "at {t:?} of the idle hour");
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
    // One side pings every 100 s (~270 bytes a ping and pong, both ways ~0.24 MB a day; at
    // the active interval of 2 s it would be ~26 MB), and the relay hears a refresh every
    // 2 minutes answered after it (~0.3 MB a day): the target is 1 MB a day in all.
    assert!(path < 400_000, "{path} B a day on an idle direct path");
    assert!(
        path + relay < 1_000_000,
        "{} B a day in all for an idle member with one peer",
        path + relay
    );
}

/// A public member and one behind a home router, gone direct and then quiet for 10 minutes.
fn settled_direct_pair(seed: u64) -> (Sim, usize, usize) {
    let mut sim = Sim::new(seed, (10, 30), 0.0);
    let a = sim.add_member(None);
    let b = sim.add_member_behind(NatSpec::HOME_ROUTER);
    sim.run_until(Duration::from_secs(60), |s| s.both_direct(a, b))
        .expect("the pair goes direct");
    sim.run_for(Duration::from_secs(600));
    (sim, a, b)
}

#[test]
fn an_idle_member_wakes_about_once_a_second() {
    let (mut sim, a, b) = settled_direct_pair(simnet::seed(0x1d22));
    let window = Duration::from_secs(600);
    let before = [sim.members[a].timer_wakes, sim.members[b].timer_wakes];
    sim.run_for(window);
    for (i, m) in [a, b].into_iter().enumerate() {
        let wakes = sim.members[m].timer_wakes - before[i];
        println!(
            "member {m}: {wakes} timer wake-ups in {window:?} idle ({:.2} a second)",
            wakes as f64 / window.as_secs_f64()
        );
        // The tick every second (boringtun's timers, the handshake guard, the byte
        // counters), plus the sparse keepalives of the path and the relay session.
        assert!(
            wakes >= window.as_secs() && wakes <= window.as_secs() * 11 / 10,
            "{wakes} wake-ups in {window:?}"
        );
    }
    assert!(sim.both_direct(a, b), "the idle pair stays direct");
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
    // A 30 s NAT needs a datagram out every 25 s on each mapping: ~1 MB a day on the path
    // and as much to the relay; the relay keepalive is learned as the path's is.
    assert!(path < 1_500_000, "{path} B a day on an idle direct path");
    assert!(relay < 1_500_000, "{relay} B a day with the relay");
}

#[test]
fn idle_members_are_back_on_a_restarted_relay_within_one_keepalive() {
    let (mut sim, a, b) = settled_direct_pair(simnet::seed(0x1d20));
    // The relay restarts empty while both are quiet: each learns at its next refresh, which
    // is answered "register again" at once.
    let clock = sim.relay_clock();
    sim.relay = RelayServer::new(sim.relay_secret.clone(), 99, clock);
    let back = sim
        .run_until(
            RELAY_KEEPALIVE_MAX + ACK_TIMEOUT + Duration::from_secs(5),
            |s| s.relay.member_count() == 2,
        )
        .expect("both register again");
    println!("both idle members back on the restarted relay after {back:?}");
    assert!(sim.both_direct(a, b), "the direct path was never touched");
}

#[test]
fn an_idle_relayed_pair_stays_quiet_too() {
    let seed = simnet::seed(0x1d21);
    let mut sim = Sim::new(seed, (10, 30), 0.0);
    // Both behind symmetric NATs: no direct path; everything goes through the relay.
    let a = sim.add_member_behind(NatSpec::SYMMETRIC);
    let b = sim.add_member_behind(NatSpec::SYMMETRIC);
    sim.run_until(Duration::from_secs(60), |s| {
        s.members[a].node.path_to(&s.key(b)) == Some(Path::Relayed)
            && s.members[b].node.path_to(&s.key(a)) == Some(Path::Relayed)
    })
    .expect("they know each other");
    // A packet each way (the session is up), then quiet.
    sim.inject(a, b, 1);
    sim.inject(b, a, 2);
    sim.run_for(Duration::from_secs(2));
    assert!(sim.received(a, b, 1) && sim.received(b, a, 2));
    // Past the backoff ramp: the hour measured is what every later hour of the day looks like.
    sim.run_for(Duration::from_secs(1800));
    sim.tap = Some(Vec::new());
    sim.run_for(IDLE);
    let tap = sim.tap.take().unwrap();
    let public = std::net::IpAddr::V4(sim.nats[0].public_ip);
    let (path, relay) = per_day(&sim, &tap, public, IDLE.as_secs());
    println!(
        "relayed pair (symmetric NATs), idle hour: per day {path} B of direct probes, {relay} B with the relay"
    );
    // Probe rounds (a ping to each candidate and a call-me) backing off, doubling, to 30 minutes
    // apart, the relay RTT measured every 30 minutes; a refresh every 25 s for a NAT that
    // forgets after 30 s.
    assert!(path < 120_000, "{path} B a day of direct probes");
    assert!(relay < 2_000_000, "{relay} B a day with the relay");
    // The pair still works at once.
    sim.inject(a, b, 3);
    sim.run_for(Duration::from_secs(2));
    assert!(sim.received(a, b, 3));
}
