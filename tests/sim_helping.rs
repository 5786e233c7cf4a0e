//! Deterministic simulation of members helping each other while no relay answers.
//!
//! Three members: a public one (`helper`) and two behind home routers (`carol`, `dave`), all
//! on direct paths. The relay dies; carol restarts on a new port, so her NAT gives her a new
//! public port that dave has never sent to (his NAT filters her probes) and dave keeps probing
//! her old one. She remembers the members (as the agent's state file does). Checked, with
//! latency and 1 % loss:
//! - she reaches the public helper directly at once (its remembered address);
//! - she reaches dave directly because the helper passes her call-me (with the address it sees
//!   her at): the time is printed, and the helper's and dave's counters show the pass;
//! - the control: the same restart with the helper down never gets carol and dave direct;
//! - two members behind symmetric NATs (relayed, by the oracle) keep exchanging packets
//!   through a public member once the relay dies, and not when that member has
//!   `relay_for_peers` off;
//! - every NAT pair (public, full cone, restricted cone, home router, symmetric), one side
//!   restarted on a new port with the relay down: punchable pairs go direct again through the
//!   passed call-me, the rest still deliver (carried), each against the oracle;
//! - forged carry requests stay within the budget and deliver nothing.

#![allow(clippy::unwrap_used)]
#![allow(clippy::disallowed_methods, clippy::print_stdout)] // the simulator's start time; the printed seed and timings

mod simnet;

use std::time::Duration;

use meshvpn::node::peer::Path;
use simnet::nat::NatSpec;
use simnet::Sim;

/// Sends a packet each way between `a` and `b` every 500 ms until both arrived or `within`
/// passes; how long it took, if both arrived.
fn delivers_both_ways(sim: &mut Sim, a: usize, b: usize, within: Duration) -> Option<Duration> {
    let mut tag = 1u32;
    let start = sim.now;
    let mut got = (false, false);
    while sim.now - start < within && !(got.0 && got.1) {
        sim.inject(a, b, tag);
        sim.inject(b, a, tag + 1);
        sim.run_for(Duration::from_millis(500));
        got.0 |= sim.received(a, b, tag);
        got.1 |= sim.received(b, a, tag + 1);
        tag += 2;
    }
    (got.0 && got.1).then(|| sim.now - start)
}

/// The three members on direct paths, then the relay dead; returns `(helper, carol, dave)`.
fn meshed_then_relay_dies(seed: u64) -> (Sim, usize, usize, usize) {
    let mut sim = Sim::new(seed, (10, 30), 0.01);
    let helper = sim.add_member(None);
    let carol = sim.add_member_behind(NatSpec::HOME_ROUTER);
    let dave = sim.add_member_behind(NatSpec::HOME_ROUTER);
    sim.run_until(Duration::from_secs(40), |s| {
        s.both_direct(helper, carol) && s.both_direct(helper, dave) && s.both_direct(carol, dave)
    })
    .expect("every pair goes direct with the relay up");
    sim.relay_alive = false;
    sim.run_for(Duration::from_secs(5));
    (sim, helper, carol, dave)
}

#[test]
fn a_member_restarted_with_every_relay_down_finds_its_peers_through_a_helper() {
    let seed = simnet::seed(0x5eed_4e1d);
    let (mut sim, helper, carol, dave) = meshed_then_relay_dies(seed);
    let old = sim.members[carol].addr;
    sim.restart_on_port(carol, old.port() + 1000);
    let t = sim
        .run_until(Duration::from_secs(30), |s| s.both_direct(carol, helper))
        .expect("carol reaches the public helper at its remembered address");
    println!("relay down, carol restarted on a new port: direct to the public helper after {t:?}");
    let t = sim
        .run_until(Duration::from_secs(30), |s| s.both_direct(carol, dave))
        .expect("carol and dave go direct through the passed call-me");
    let (h, d, c) = (
        sim.members[helper].node.forward_counters(),
        sim.members[dave].node.forward_counters(),
        sim.members[carol].node.forward_counters(),
    );
    println!(
        "carol and dave direct again {t:?} later (carol asked {}, helper passed {} refused {}, dave acted on {})",
        c.asked, h.passed, h.refused, d.received
    );
    assert!(
        c.asked >= 1 && h.passed >= 1 && d.received >= 1,
        "{c:?} {h:?} {d:?}"
    );
    // And packets flow both ways.
    for (tag, (a, b)) in [
        (carol, dave),
        (dave, carol),
        (carol, helper),
        (helper, carol),
    ]
    .into_iter()
    .enumerate()
    {
        let tag = 100 + tag as u32;
        sim.inject(a, b, tag);
        let got = sim
            .run_until(Duration::from_secs(5), |s| s.received(a, b, tag))
            .is_some();
        assert!(got, "member {a} -> {b}: nothing delivered");
    }
}

#[test]
fn without_a_helper_the_restarted_member_stays_cut_off_from_its_punchable_peer() {
    let seed = simnet::seed(0x5eed_4e1e);
    let (mut sim, helper, carol, dave) = meshed_then_relay_dies(seed);
    sim.members[helper].alive = false;
    let old = sim.members[carol].addr;
    sim.restart_on_port(carol, old.port() + 1000);
    let got = sim.run_until(Duration::from_secs(30), |s| s.both_direct(carol, dave));
    assert!(
        got.is_none(),
        "carol and dave went direct with no helper and no relay: the helped case proves nothing"
    );
    println!("control: with the helper down too, carol and dave stay apart for 30 s, as expected");
}

/// Two members behind symmetric NATs and a public one; the relay dies; returns whether the
/// symmetric pair still delivers both ways within 10 s, and the public member's counters.
fn symmetric_pair_after_relay_death(
    seed: u64,
    carry: bool,
) -> (bool, meshvpn::node::ForwardCounters) {
    let mut sim = Sim::new(seed, (10, 30), 0.01);
    sim.next_no_carry = !carry;
    let helper = sim.add_member(None);
    let a = sim.add_member_behind(NatSpec::SYMMETRIC);
    let b = sim.add_member_behind(NatSpec::SYMMETRIC);
    sim.run_until(Duration::from_secs(40), |s| {
        s.both_direct(helper, a) && s.both_direct(helper, b)
    })
    .expect("the public member goes direct with both");
    assert!(!sim.is_direct(a, b), "the symmetric pair cannot be direct");
    sim.relay_alive = false;
    // Long enough for every relay session to count the relay as gone.
    sim.run_for(Duration::from_secs(30));
    let took = delivers_both_ways(&mut sim, a, b, Duration::from_secs(10));
    if let Some(t) = took {
        println!(
            "relay dead for 30 s: the symmetric pair delivers both ways through the public member within {t:?} ({} datagrams carried)",
            sim.members[helper].node.forward_counters().carried
        );
    }
    (took.is_some(), sim.members[helper].node.forward_counters())
}

#[test]
fn a_public_member_carries_a_relayed_pair_while_the_relay_is_down_unless_told_not_to() {
    let seed = simnet::seed(0x5eed_ca77);
    let (delivered, counters) = symmetric_pair_after_relay_death(seed, true);
    assert!(
        delivered,
        "the pair was cut off although a member reaches both: {counters:?}"
    );
    assert!(counters.carried > 0, "{counters:?}");
    let (delivered, counters) = symmetric_pair_after_relay_death(seed, false);
    assert!(!delivered, "delivered with carrying off: {counters:?}");
    assert_eq!(counters.carried, 0);
    println!(
        "with relay_for_peers off nothing is carried ({} refused)",
        counters.carry_refused
    );
}

/// A stranger forging a member's address cannot make a helper carry more than its budget, and
/// what it gets carried is never delivered (it does not decrypt); from any other address
/// nothing is carried at all.
#[test]
fn forged_carry_requests_are_bounded_and_never_delivered() {
    use meshvpn::node::{CARRY_BURST, CARRY_PER_SEC};
    use meshvpn::wire::Frame;
    use rand::RngCore;
    let seed = simnet::seed(0x5eed_f04e);
    let mut sim = Sim::new(seed, (10, 30), 0.0);
    let helper = sim.add_member(None);
    let carol = sim.add_member_behind(NatSpec::HOME_ROUTER);
    let dave = sim.add_member_behind(NatSpec::HOME_ROUTER);
    sim.run_until(Duration::from_secs(40), |s| {
        s.both_direct(helper, carol) && s.both_direct(helper, dave)
    })
    .expect("the helper goes direct with both");
    let Some(Path::Direct {
        addr: carol_seen, ..
    }) = sim.members[helper].node.path_to(&sim.key(carol))
    else {
        panic!("no direct path to carol");
    };
    let helper_addr = sim.members[helper].addr;
    let dave_key = sim.key(dave);
    let delivered_before = sim.members[dave].delivered.len();
    let forged = |sim: &mut Sim, src, n: usize| {
        for _ in 0..n {
            let mut payload = vec![0u8; 148];
            sim.rng.fill_bytes(&mut payload);
            payload[..4].copy_from_slice(&[4, 0, 0, 0]); // a WireGuard data message header
            let frame = Frame::RelaySend {
                to: dave_key,
                payload: &payload,
            }
            .to_vec();
            sim.send_forged(src, helper_addr, frame);
        }
    };
    // From an address that is no member's path: nothing carried.
    let stranger: std::net::SocketAddr = "198.51.100.250:4444".parse().unwrap();
    forged(&mut sim, stranger, 500);
    sim.run_for(Duration::from_millis(200));
    let c = sim.members[helper].node.forward_counters();
    assert_eq!(c.carried, 0, "{c:?}");
    assert!(c.carry_refused >= 500, "{c:?}");
    // From carol's own address (forged): at most the budget, and dave delivers none of it.
    let start = sim.now;
    forged(&mut sim, carol_seen, 5000);
    sim.run_for(Duration::from_secs(1));
    let elapsed_ms = (sim.now - start).as_millis() as u64;
    let c = sim.members[helper].node.forward_counters();
    let bound = u64::from(CARRY_BURST) + u64::from(CARRY_PER_SEC) * elapsed_ms / 1000;
    println!(
        "5,000 forged carry requests from carol's address: {} carried (bound {bound}), {} refused; dave delivered {} of them",
        c.carried,
        c.carry_refused - 500,
        sim.members[dave].delivered.len() - delivered_before
    );
    assert!(c.carried <= bound, "{c:?}");
    assert!(c.carried < 5000, "the budget held: {c:?}");
    assert_eq!(
        sim.members[dave].delivered.len(),
        delivered_before,
        "forged ciphertext reached dave's TUN"
    );
}

/// Every NAT pair, with the relay down and one side restarted on a new port: pairs the oracle
/// lets punch go direct again through the passed call-me; the others still deliver (carried by
/// the public member, or direct after a birthday probe).
#[test]
fn every_nat_pair_recovers_without_a_relay_as_the_oracle_says() {
    use simnet::nat::{outcome, Outcome};
    let kinds: [Option<NatSpec>; 5] = [
        None,
        Some(NatSpec::FULL_CONE),
        Some(NatSpec::RESTRICTED_CONE),
        Some(NatSpec::HOME_ROUTER),
        Some(NatSpec::SYMMETRIC),
    ];
    let name = |k: &Option<NatSpec>| k.map_or("public", |s| s.name);
    let seed = simnet::seed(0x5eed_a11a);
    for (i, ka) in kinds.iter().enumerate() {
        for kb in &kinds[i..] {
            let mut sim = Sim::new(seed, (10, 30), 0.01);
            let helper = sim.add_member(None);
            let add = |sim: &mut Sim, k: &Option<NatSpec>| match k {
                Some(spec) => sim.add_member_behind(*spec),
                None => sim.add_member(None),
            };
            let a = add(&mut sim, ka);
            let b = add(&mut sim, kb);
            sim.run_until(Duration::from_secs(60), |s| {
                s.both_direct(helper, a) && s.both_direct(helper, b)
            })
            .unwrap_or_else(|| panic!("{} / {}: the helper never went direct", name(ka), name(kb)));
            sim.relay_alive = false;
            sim.run_for(Duration::from_secs(30));
            let port = sim.members[a].addr.port() + 1000;
            sim.restart_on_port(a, port);
            let want = outcome(ka.as_ref(), kb.as_ref());
            let direct_after = sim.run_until(Duration::from_secs(30), |s| s.both_direct(a, b));
            let delivered = delivers_both_ways(&mut sim, a, b, Duration::from_secs(20)).is_some();
            println!(
                "{} (restarted) / {}: oracle {want:?}, direct again after {direct_after:?}, delivers both ways: {}",
                name(ka),
                name(kb),
                delivered
            );
            assert!(delivered, "{} / {}: cut off", name(ka), name(kb));
            match want {
                Outcome::Punch => assert!(
                    direct_after.is_some(),
                    "{} / {}: a punchable pair stayed apart",
                    name(ka),
                    name(kb)
                ),
                Outcome::Relay => assert!(
                    !sim.both_direct(a, b),
                    "{} / {}: direct against the oracle",
                    name(ka),
                    name(kb)
                ),
                Outcome::Birthday => {}
            }
        }
    }
}
