//! Deterministic simulation of NAT traversal: every pair of NAT kinds (RFC 4787 models with
//! latency and loss), asserting direct-vs-relay against the oracle and printing the simulated
//! time to the first packet and to the direct path.

#![allow(clippy::unwrap_used)]
#![allow(clippy::disallowed_methods, clippy::print_stdout)] // wall-clock timing and the printed seed

mod simnet;

use std::time::Duration;

use meshvpn::node::peer::Path;
use meshvpn::wire::NatKind;
use simnet::nat::{self, NatSpec};
use simnet::Sim;

const KINDS: [Option<NatSpec>; 7] = [
    None,
    Some(NatSpec::FULL_CONE),
    Some(NatSpec::RESTRICTED_CONE),
    Some(NatSpec::HOME_ROUTER),
    Some(NatSpec::SYMMETRIC_PRESERVING),
    Some(NatSpec::SYMMETRIC_ADDRESS_FILTER),
    Some(NatSpec::SYMMETRIC),
];

fn name(k: &Option<NatSpec>) -> &'static str {
    k.as_ref().map(|s| s.name).unwrap_or("public")
}

fn add(sim: &mut Sim, k: &Option<NatSpec>) -> usize {
    match k {
        None => sim.add_member(None),
        Some(spec) => sim.add_member_behind(*spec),
    }
}

/// Runs one pair; returns (time to first packet both ways, time to direct if any).
fn run_pair(seed: u64, ka: &Option<NatSpec>, kb: &Option<NatSpec>) -> (Duration, Option<Duration>) {
    let mut sim = Sim::new(seed, (10, 40), 0.01);
    let a = add(&mut sim, ka);
    let b = add(&mut sim, kb);
    let start = sim.now;
    sim.run_until(Duration::from_secs(30), |s| {
        s.members[a].node.peer_keys().count() == 1 && s.members[b].node.peer_keys().count() == 1
    })
    .unwrap_or_else(|| panic!("{} and {} never learned each other", name(ka), name(kb)));
    let mut tag = 1u32;
    let first = loop {
        assert!(
            sim.now - start < Duration::from_secs(40),
            "{} <-> {}: no packet got through",
            name(ka),
            name(kb)
        );
        sim.inject(a, b, tag);
        sim.inject(b, a, tag);
        sim.run_for(Duration::from_millis(200));
        if sim.received(a, b, tag) && sim.received(b, a, tag) {
            break sim.now - start;
        }
        tag += 1;
    };
    let direct = sim
        .run_until(Duration::from_secs(40), |s| s.both_direct(a, b))
        .map(|_| sim.now - start);
    // Each side classified its own NAT with STUN against the relay's two ports.
    for (i, k) in [(a, ka), (b, kb)] {
        let expected = match k {
            None => NatKind::Public,
            Some(spec)
                if spec.mapping == nat::Mapping::EndpointIndependent
                    || spec.ports == nat::PortAlloc::Preserve =>
            {
                NatKind::EndpointIndependent
            }
            Some(_) => NatKind::EndpointDependent,
        };
        // STUN retries lost requests every few seconds; the verdict settles within 15 s.
        let settled = sim.run_until(Duration::from_secs(15), |s| {
            s.members[i].node.nat() == expected
        });
        assert!(
            settled.is_some(),
            "NAT verdict behind {}: {:?}, expected {expected:?}",
            name(k),
            sim.members[i].node.status(sim.now).nat
        );
    }
    // Whatever the path, traffic flows on it.
    for t in 0..5 {
        let tag = 10_000 + t;
        sim.inject(a, b, tag);
        sim.inject(b, a, tag);
    }
    sim.run_for(Duration::from_secs(1));
    let ok = (0..5)
        .filter(|t| sim.received(a, b, 10_000 + t) && sim.received(b, a, 10_000 + t))
        .count();
    assert!(
        ok >= 3,
        "{} <-> {}: traffic on the settled path lost ({ok}/5 both ways)",
        name(ka),
        name(kb)
    );
    // A direct path must also stay direct (keepalives hold the mappings open).
    if direct.is_some() {
        sim.run_for(Duration::from_secs(90));
        assert!(
            sim.both_direct(a, b),
            "{} <-> {}: direct path did not hold for 90 s",
            name(ka),
            name(kb)
        );
    }
    (first, direct)
}

#[test]
fn every_pair_of_nat_kinds_matches_the_oracle() {
    let seed = simnet::seed(0x0a7_0001);
    let mut failures = Vec::new();
    println!(
        "{:<26} {:<26} {:>8} {:>12} {:>10}",
        "A", "B", "expected", "first pkt", "direct"
    );
    for (i, ka) in KINDS.iter().enumerate() {
        for kb in KINDS.iter().skip(i) {
            let expect = nat::direct_possible(ka.as_ref(), kb.as_ref());
            let (first, direct) = run_pair(seed + i as u64, ka, kb);
            println!(
                "{:<26} {:<26} {:>8} {:>10.2}s {:>10}",
                name(ka),
                name(kb),
                format!("{:?}", nat::outcome(ka.as_ref(), kb.as_ref())).to_lowercase(),
                first.as_secs_f64(),
                direct
                    .map(|d| format!("{:.2}s", d.as_secs_f64()))
                    .unwrap_or_else(|| "relay".into())
            );
            if expect != direct.is_some() {
                failures.push(format!(
                    "{} <-> {}: expected {}, got {:?}",
                    name(ka),
                    name(kb),
                    if expect { "direct" } else { "relay" },
                    direct
                ));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "outcomes differ from the oracle:\n{}",
        failures.join("\n")
    );
}

#[test]
fn two_members_behind_one_nat_connect_over_their_lan() {
    let seed = simnet::seed(0x0a7_0002);
    let mut sim = Sim::new(seed, (10, 40), 0.0);
    let a = sim.add_member_behind(NatSpec::SYMMETRIC);
    let b = sim.add_member_in_site(0);
    let t = sim
        .run_until(Duration::from_secs(30), |s| s.both_direct(a, b))
        .expect("direct over the LAN");
    println!("same-LAN pair direct after {t:?}");
}

#[test]
fn a_flushed_nat_mapping_recovers() {
    let seed = simnet::seed(0x0a7_0003);
    let mut sim = Sim::new(seed, (10, 40), 0.0);
    let a = sim.add_member_behind(NatSpec::HOME_ROUTER);
    let b = sim.add_member_behind(NatSpec::HOME_ROUTER);
    sim.run_until(Duration::from_secs(30), |s| s.both_direct(a, b))
        .expect("direct first");
    // The router forgets every mapping (reboot, conntrack flush): the next outbound packets get
    // new mappings, the direct path goes silent, traffic falls back to the relay and re-punches.
    sim.nats[0].flush();
    let flushed = sim.now;
    let mut tag = 1;
    let recovered = loop {
        assert!(
            sim.now - flushed < Duration::from_secs(60),
            "traffic never recovered"
        );
        sim.inject(a, b, tag);
        sim.run_for(Duration::from_millis(500));
        if sim.received(a, b, tag) {
            break sim.now - flushed;
        }
        tag += 1;
    };
    println!("after the flush, traffic recovered within {recovered:?}");
    let t = sim
        .run_until(Duration::from_secs(60), |s| s.both_direct(a, b))
        .expect("direct again");
    println!("direct again {t:?} later");
}

#[test]
fn a_failing_birthday_probe_stays_within_its_budget_and_backs_off() {
    use meshvpn::node::birthday::{
        ATTEMPT_DURATION, PROBES_PER_TICK, PROBE_BUDGET, RETRY_MIN, START_AFTER,
    };
    let seed = simnet::seed(0x0a7_0004);
    let mut sim = Sim::new(seed, (10, 40), 0.0);
    let easy = sim.add_member_behind(NatSpec::HOME_ROUTER);
    let hard = sim.add_member_behind(NatSpec::SYMMETRIC);
    sim.run_until(Duration::from_secs(10), |s| {
        s.members[easy].node.peer_keys().count() == 1
    })
    .expect("membership");
    // Every direct datagram is lost from now on: the probe can never land.
    sim.direct_blocked = true;
    let before = sim.members[easy].sent_direct;
    let window = START_AFTER + ATTEMPT_DURATION + Duration::from_secs(5);
    sim.run_for(window);
    let sprayed = sim.members[easy].sent_direct - before;
    println!("easy side sent {sprayed} direct datagrams in {window:?} (budget {PROBE_BUDGET})");
    assert!(
        sprayed >= PROBE_BUDGET as u64 / 2,
        "the easy side must actually spray ({sprayed})"
    );
    // Ordinary probes add at most a few dozen datagrams to the budget.
    assert!(
        sprayed <= PROBE_BUDGET as u64 + 100,
        "budget exceeded: {sprayed}"
    );
    // At most PROBES_PER_TICK per tick: the budget cannot be spent in under budget/rate ticks.
    let min_ticks = u64::from(PROBE_BUDGET / PROBES_PER_TICK);
    assert!(window.as_millis() as u64 / 250 >= min_ticks);
    // The next attempt waits for the backoff: nearly nothing is sprayed in the following minute.
    let before = sim.members[easy].sent_direct;
    sim.run_for(RETRY_MIN - Duration::from_secs(10));
    let quiet = sim.members[easy].sent_direct - before;
    println!("then {quiet} direct datagrams during the backoff");
    assert!(quiet < 200, "no new spray during the backoff ({quiet})");
    let k = sim.key(hard);
    assert_eq!(sim.members[easy].node.path_to(&k), Some(Path::Relayed));
}

#[test]
fn hairpinning_connects_isolated_members_behind_one_nat() {
    for hairpin in [true, false] {
        let seed = simnet::seed(0x0a7_0005);
        let mut sim = Sim::new(seed, (10, 40), 0.0);
        sim.lan_blocked = true;
        let spec = NatSpec {
            hairpin,
            ..NatSpec::HOME_ROUTER
        };
        let a = sim.add_member_behind(spec);
        let b = sim.add_member_in_site(0);
        let direct = sim.run_until(Duration::from_secs(30), |s| s.both_direct(a, b));
        println!("hairpin {hairpin}: direct after {direct:?}");
        assert_eq!(
            direct.is_some(),
            hairpin,
            "a direct path exists exactly when the NAT hairpins"
        );
        // Either way the pair talks (through the relay without hairpinning).
        let mut tag = 1;
        while !sim.received(a, b, tag) {
            tag += 1;
            assert!(tag < 100, "no packet got through");
            sim.inject(a, b, tag);
            sim.run_for(Duration::from_millis(300));
        }
    }
}

#[test]
fn a_claimed_virtual_ip_is_resolved_the_same_way_everywhere() {
    use std::net::Ipv4Addr;
    let seed = simnet::seed(0x0a7_0006);
    let mut sim = Sim::new(seed, (5, 20), 0.0);
    let ip = Ipv4Addr::new(10, 77, 1, 1);
    let observer = sim.add_member(None);
    sim.next_virtual_ip = Some(ip);
    let x = sim.add_member(None);
    sim.next_virtual_ip = Some(ip);
    let y = sim.add_member(None);
    sim.run_until(Duration::from_secs(30), |s| {
        s.members.iter().all(|m| m.node.peer_keys().count() == 2)
    })
    .expect("membership");
    // The first claim the relay took keeps the address; exactly one claimant lost.
    let now = sim.now;
    let x_lost = sim.members[x].node.status(now).ip_conflict.is_some();
    let (owner, loser) = if x_lost { (y, x) } else { (x, y) };
    let loser_status = sim.members[loser].node.status(now);
    let owner_status = sim.members[owner].node.status(now);
    assert!(
        loser_status
            .ip_conflict
            .as_deref()
            .is_some_and(|c| c.contains("10.77.1.1")),
        "{loser_status:?}"
    );
    assert!(owner_status.ip_conflict.is_none());
    let seen = sim.members[observer].node.status(now);
    let flagged: Vec<&str> = seen
        .peers
        .iter()
        .filter(|p| p.ip_conflict)
        .map(|p| p.public_key.as_str())
        .collect();
    assert_eq!(
        flagged,
        vec![sim.key(loser).to_base64().as_str()],
        "the observer flags the loser only"
    );
    // Traffic for the address goes to the owner.
    sim.inject(observer, owner, 77);
    sim.run_for(Duration::from_secs(2));
    assert!(sim.received(observer, owner, 77));
    assert!(!sim.received(observer, loser, 77));
}
