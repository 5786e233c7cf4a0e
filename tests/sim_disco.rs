//! Deterministic simulation of disco freshness and probe budgets: real sealed disco datagrams
//! captured on the simulated wire and replayed, many times, from forged sources (and from
//! the relay's address, for relayed ones) must add no candidate and trigger no probe, and the
//! pair stays direct; a relay lying about observed addresses gets at most the probe budget
//! sent to the address it names.

#![allow(clippy::unwrap_used)]
#![allow(clippy::disallowed_methods, clippy::print_stdout)] // the simulator's start instant and the printed seed

mod simnet;

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use meshvpn::node::peer::{Path, MAX_CANDIDATES, PROBE_BURST, PROBE_REFILL_PER_SEC};
use meshvpn::wire::{classify, DatagramKind, Frame};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha20Rng;
use simnet::{Sim, Tapped};

/// Whether a datagram is a disco message, sent directly or relayed.
fn is_disco(t: &Tapped) -> bool {
    if classify(&t.payload) != DatagramKind::Meshvpn {
        return false;
    }
    match Frame::parse(&t.payload) {
        Ok(Frame::Disco { .. }) => true,
        Ok(Frame::RelayRecv { payload, .. }) => {
            matches!(Frame::parse(payload), Ok(Frame::Disco { .. }))
        }
        _ => false,
    }
}

#[test]
fn replayed_disco_from_forged_sources_adds_nothing_and_pairs_stay_direct() {
    let seed = simnet::seed(0xd15c0);
    let mut sim = Sim::new(seed, (10, 40), 0.0);
    let a = sim.add_member(None);
    let b = sim.add_member(None);
    let (addr_a, addr_b) = (sim.members[a].addr, sim.members[b].addr);
    // Capture from when both know each other: a datagram that arrived before its receiver
    // knew the sender was dropped unopened, so its stamp was never seen and one replay of it
    // within the window is answered like the original would have been (as with any
    // timestamp-and-cache scheme, WireGuard's handshake included).
    sim.run_until(Duration::from_secs(60), |s| {
        s.members[a].node.path_to(&s.key(b)).is_some()
            && s.members[b].node.path_to(&s.key(a)).is_some()
    })
    .expect("they know each other");
    sim.tap = Some(Vec::new());
    let took = sim
        .run_until(Duration::from_secs(60), |s| s.both_direct(a, b))
        .expect("the pair goes direct");
    println!("direct after {took:?}");
    // Keepalives on the direct path, so the capture holds pings and pongs of both kinds.
    sim.run_for(Duration::from_secs(10));
    let captured: Vec<Tapped> = sim
        .tap
        .take()
        .unwrap()
        .into_iter()
        .filter(|t| (t.dst == addr_a || t.dst == addr_b) && is_disco(t))
        .collect();
    // Let what was still in flight when the capture stopped arrive first: a replay must find
    // every captured stamp already seen, not race its original.
    sim.run_for(Duration::from_millis(100));
    let relayed = captured.iter().filter(|t| t.src == sim.relay_addr).count();
    let direct = captured.len() - relayed;
    println!("captured {direct} direct and {relayed} relayed disco datagrams");
    assert!(direct >= 10 && relayed >= 2, "a capture worth replaying");
    let before = [
        sim.members[a].node.candidates_of(&sim.key(b)),
        sim.members[b].node.candidates_of(&sim.key(a)),
    ];

    // Replay everything, 40 times over 80 s (inside the window and long after it): direct
    // datagrams from forged internet sources, relayed ones from the relay's own address.
    let mut rng = ChaCha20Rng::seed_from_u64(seed ^ 0x5eed);
    let mut forged = BTreeSet::new();
    sim.tap = Some(Vec::new());
    let mut replayed = 0u64;
    for _ in 0..40 {
        for t in &captured {
            let src = if t.src == sim.relay_addr {
                sim.relay_addr
            } else {
                let ip = IpAddr::from([192, 0, 2, rng.gen_range(1..=254)]);
                SocketAddr::new(ip, rng.gen_range(1024..=u16::MAX))
            };
            if src != sim.relay_addr {
                forged.insert(src);
            }
            sim.send_forged(src, t.dst, t.payload.clone());
            replayed += 1;
        }
        sim.run_for(Duration::from_secs(2));
    }
    let after_replay = sim.tap.take().unwrap();
    println!(
        "replayed {replayed} datagrams from {} forged sources",
        forged.len()
    );

    // Nothing was answered towards a forged source: no pong, no ping-back.
    let to_forged = after_replay
        .iter()
        .filter(|t| forged.contains(&t.dst))
        .count();
    assert_eq!(to_forged, 0, "datagrams sent to forged sources");
    // Candidates are unchanged, bounded, and hold no forged address.
    let after = [
        sim.members[a].node.candidates_of(&sim.key(b)),
        sim.members[b].node.candidates_of(&sim.key(a)),
    ];
    for (was, now) in before.iter().zip(&after) {
        assert!(now.len() <= MAX_CANDIDATES);
        assert!(now.iter().all(|c| !forged.contains(c)), "{now:?}");
        assert_eq!(was, now);
    }
    // The replays triggered no probe bursts: what the members sent each other directly is
    // their keepalive pings and pongs (one each per 2 s each way, with slack).
    let direct_disco = after_replay
        .iter()
        .filter(|t| (t.src == addr_a || t.src == addr_b) && t.dst != sim.relay_addr && is_disco(t))
        .count();
    println!("{direct_disco} direct disco datagrams during the replay");
    assert!(direct_disco <= 4 * 80 / 2 + 8, "{direct_disco}");
    assert!(sim.both_direct(a, b), "the pair stayed direct");
}

#[test]
fn a_relay_lying_about_observed_addresses_gets_at_most_the_probe_budget_sent_there() {
    let seed = simnet::seed(0x1a7e);
    let mut sim = Sim::new(seed, (10, 40), 0.0);
    let third_party: IpAddr = "192.0.2.200".parse().unwrap();
    sim.observed_lie = Some(third_party);
    // Each reply arrives in many copies, each naming another port: every copy is news.
    sim.lie_copies = 20;
    sim.tap = Some(Vec::new());
    let a = sim.add_member(None);
    let b = sim.add_member(None);
    // No direct path at first: the members keep probing the candidates they were given.
    sim.direct_blocked = true;
    sim.run_for(Duration::from_secs(40));
    sim.direct_blocked = false;
    let took = sim
        .run_until(Duration::from_secs(60), |s| s.both_direct(a, b))
        .expect("the pair still goes direct");
    let direct_from = sim.tap.as_ref().unwrap().len();
    sim.run_for(Duration::from_secs(20));
    let secs = sim.elapsed().as_secs();
    let tap = sim.tap.take().unwrap();
    let lies = tap
        .iter()
        .filter(|t| t.src == sim.relay_addr && t.dst.ip() != third_party)
        .count();
    let to_third_party = |m: usize| {
        let src = sim.members[m].addr;
        tap.iter()
            .filter(|t| t.src == src && t.dst.ip() == third_party)
            .count() as u64
    };
    let budget = u64::from(PROBE_BURST) + u64::from(PROBE_REFILL_PER_SEC) * secs;
    for m in [a, b] {
        let sent = to_third_party(m);
        println!("member {m}: {sent} probes to the third party in {secs} s (budget {budget}); {lies} relay datagrams");
        assert!(sent > 0, "the lie was believed enough to probe");
        assert!(sent <= budget, "{sent} > {budget}");
    }
    // On a direct path nothing probes the lied-about addresses any more.
    let later = tap[direct_from..]
        .iter()
        .filter(|t| t.dst.ip() == third_party)
        .count();
    assert_eq!(later, 0, "probes to the third party while direct");
    assert!(sim.both_direct(a, b));
    println!("direct {took:?} after the block lifted");
}

#[test]
fn a_relay_lying_about_a_symmetric_members_address_gets_no_birthday_spray_sent_there() {
    use simnet::nat::NatSpec;
    let seed = simnet::seed(0xb1d7);
    let mut sim = Sim::new(seed, (10, 40), 0.0);
    let third_party: IpAddr = "192.0.2.201".parse().unwrap();
    sim.observed_lie = Some(third_party);
    sim.tap = Some(Vec::new());
    // A home router (easy side) and a symmetric NAT (hard side): a birthday pair.
    let easy = sim.add_member_behind(NatSpec::HOME_ROUTER);
    let hard = sim.add_member_behind(NatSpec::SYMMETRIC);
    // Ordinary punching fails (as it would for this pair on most real NATs): birthday time.
    sim.direct_blocked = true;
    sim.run_for(Duration::from_secs(90));
    let secs = sim.elapsed().as_secs();
    let easy_public = IpAddr::V4(sim.nats[0].public_ip);
    let tap = sim.tap.take().unwrap();
    let from_easy = tap
        .iter()
        .filter(|t| t.src.ip() == easy_public && t.dst.ip() == third_party)
        .count() as u64;
    let refused = sim.members[easy].node.status(sim.now).dropped.spray_refused;
    let hard_public = IpAddr::V4(sim.nats[1].public_ip);
    let from_hard = tap
        .iter()
        .filter(|t| t.src.ip() == hard_public && t.dst.ip() == third_party)
        .count();
    let budget = u64::from(PROBE_BURST) + u64::from(PROBE_REFILL_PER_SEC) * secs;
    println!(
        "easy side: {from_easy} datagrams to the third party in {secs} s (probe budget {budget}, a spray is 2000); {refused} spray requests refused"
    );
    println!(
        "hard side: {from_hard} datagrams to the third party (ordinary probes and one ping per extra socket per attempt)"
    );
    assert!(refused >= 1, "the hard side asked for a spray");
    assert!(from_easy <= budget, "{from_easy} > {budget}");
    assert!(
        matches!(
            sim.members[hard].node.path_to(&sim.key(easy)),
            Some(Path::Relayed)
        ),
        "the pair stays relayed"
    );
}
