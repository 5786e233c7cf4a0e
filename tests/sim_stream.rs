//! Deterministic simulation of members whose UDP is blocked: they reach the relay over a
//! stream (the simulator's TCP, fed to the relay server as `Link::Tcp`), and the choice between
//! UDP and the stream is the node's own. Prints the seed and the simulated times it measures.

#![allow(clippy::unwrap_used)]
#![allow(clippy::disallowed_methods, clippy::print_stdout)] // the virtual clock starts at a real Instant; the seed is printed

mod simnet;

use std::time::Duration;

use meshvpn::node::peer::Path;
use meshvpn::node::peer::{DIRECT_PING_INTERVAL, DIRECT_TIMEOUT};
use meshvpn::node::relay_session::{ACK_TIMEOUT, UDP_FALLBACK_AFTER};
use meshvpn::wire::NatKind;
use simnet::Sim;

/// Sends tagged packets between `a` and every other member both ways, re-sending every
/// 200 ms until all arrive; returns the simulated time it took.
fn both_ways_with_everyone(sim: &mut Sim, a: usize, base_tag: u32, limit: Duration) -> Duration {
    let begin = sim.now;
    let others: Vec<usize> = (0..sim.members.len()).filter(|b| *b != a).collect();
    let mut pending: Vec<(usize, usize)> = others.iter().flat_map(|&b| [(a, b), (b, a)]).collect();
    let tag = |x: usize, y: usize| base_tag + (x * 100 + y) as u32;
    for round in 0.. {
        assert!(round < 10_000, "bounded rounds");
        assert!(
            sim.now - begin < limit,
            "still undelivered after {limit:?}: {pending:?}"
        );
        for &(x, y) in &pending {
            sim.inject(x, y, tag(x, y));
        }
        sim.run_for(Duration::from_millis(200));
        pending.retain(|&(x, y)| !sim.received(x, y, tag(x, y)));
        if pending.is_empty() {
            break;
        }
    }
    sim.now - begin
}

#[test]
fn a_udp_blocked_member_reaches_every_peer_over_the_relay_stream() {
    let seed = simnet::seed(0x57e4_0001);
    let mut sim = Sim::new(seed, (10, 40), 0.01);
    let blocked = sim.add_member(None);
    sim.members[blocked].udp_blocked = true;
    for _ in 0..3 {
        sim.add_member(None);
    }
    let n = sim.members.len();
    let joined = sim
        .run_until(Duration::from_secs(30), |s| {
            s.members
                .iter()
                .all(|m| m.node.peer_keys().count() == n - 1)
        })
        .expect("everyone learns everyone, the blocked member over its stream");
    println!("membership complete after {joined:?}");
    assert!(sim.members[blocked].node.relay_on_stream());
    // Without any UDP answer it takes the quiet time, plus a connection round trip.
    assert!(joined >= UDP_FALLBACK_AFTER, "{joined:?}");

    let took = both_ways_with_everyone(&mut sim, blocked, 1_000, Duration::from_secs(30));
    println!("packets both ways with every peer within {took:?}");
    let me = &sim.members[blocked];
    assert!(me.stream_frames > 0, "the stream carried the traffic");
    for b in 1..n {
        let k = sim.key(b);
        assert_eq!(me.node.path_to(&k), Some(Path::Relayed));
    }
    assert_eq!(
        me.node.nat(),
        NatKind::UdpBlocked,
        "announced as UDP-blocked"
    );
    // The others relay to it over plain UDP.
    let k = sim.key(blocked);
    for b in 1..n {
        assert_eq!(sim.members[b].node.path_to(&k), Some(Path::Relayed));
        assert!(!sim.members[b].node.relay_on_stream());
    }
}

#[test]
fn a_member_whose_udp_is_blocked_mid_session_moves_to_the_stream_within_seconds() {
    let seed = simnet::seed(0x57e4_0002);
    let mut sim = Sim::new(seed, (10, 40), 0.0);
    for _ in 0..3 {
        sim.add_member(None);
    }
    let n = sim.members.len();
    sim.run_until(Duration::from_secs(30), |s| {
        s.members.iter().all(|m| {
            m.node.peer_keys().count() == n - 1
                && m.node
                    .peer_keys()
                    .all(|k| matches!(m.node.path_to(k), Some(Path::Direct { .. })))
        })
    })
    .expect("a direct mesh");
    both_ways_with_everyone(&mut sim, 0, 1_000, Duration::from_secs(10));
    assert!(!sim.members[0].node.relay_on_stream());

    // The firewall starts dropping member 0's UDP; traffic keeps trying to flow.
    sim.members[0].udp_blocked = true;
    let took = both_ways_with_everyone(&mut sim, 0, 2_000, Duration::from_secs(20));
    println!("UDP blocked mid-session: traffic flows again after {took:?} (simulated)");
    assert!(sim.members[0].node.relay_on_stream(), "moved to the stream");
    // The first missed keepalive pong (within two ping intervals) triggers a registration,
    // which goes unanswered for ACK_TIMEOUT; the relay was last heard long enough before that
    // the stream opens at once. Direct paths end after DIRECT_TIMEOUT, then traffic takes the
    // stream; a second of slack covers connecting and the first packets.
    let bound =
        (DIRECT_PING_INTERVAL * 2 + ACK_TIMEOUT).max(DIRECT_TIMEOUT) + Duration::from_secs(1);
    assert!(bound < Duration::from_secs(10));
    assert!(took <= bound, "took {took:?}, bound {bound:?}");

    // UDP comes back: a STUN answer over UDP moves the member back off the stream.
    sim.members[0].udp_blocked = false;
    let back = sim
        .run_until(Duration::from_secs(90), |s| {
            !s.members[0].node.relay_on_stream()
        })
        .expect("back to UDP once STUN answers over UDP");
    println!("back on UDP {back:?} after unblocking");
    both_ways_with_everyone(&mut sim, 0, 3_000, Duration::from_secs(20));
}
