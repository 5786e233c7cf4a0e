//! Deterministic simulation of a relay and many members: membership, packets between every
//! ordered pair, and departures — with latency and loss, on a virtual clock.

#![allow(clippy::unwrap_used)]
#![allow(clippy::disallowed_methods, clippy::print_stdout)] // wall-clock timing and the printed seed

mod simnet;

use std::time::{Duration, Instant};

use meshvpn::node::peer::Path;
use meshvpn::relay::server::MEMBER_TTL;
use simnet::Sim;

const MEMBERS: usize = 20;

fn everyone_knows_everyone(sim: &Sim) -> bool {
    sim.members
        .iter()
        .filter(|m| m.alive)
        .all(|m| m.node.peer_keys().count() == sim.members.iter().filter(|o| o.alive).count() - 1)
}

/// Sends a tagged packet across every ordered pair, re-sending every second until it arrives;
/// returns the simulated time until the last pair got through.
fn every_pair_delivers(sim: &mut Sim, base_tag: u32, limit: Duration) -> Duration {
    let n = sim.members.len();
    let pairs: Vec<(usize, usize)> = (0..n)
        .flat_map(|a| (0..n).map(move |b| (a, b)))
        .filter(|(a, b)| a != b)
        .collect();
    let begin = sim.now;
    let mut pending = pairs.clone();
    let mut rounds = 0;
    while !pending.is_empty() {
        assert!(
            sim.now - begin < limit,
            "{} ordered pairs still undelivered after {limit:?}: {:?}",
            pending.len(),
            &pending[..pending.len().min(5)]
        );
        rounds += 1;
        assert!(rounds < 1_000);
        for &(a, b) in &pending {
            let tag = base_tag + (a * n + b) as u32;
            sim.inject(a, b, tag);
        }
        sim.run_for(Duration::from_secs(1));
        pending.retain(|&(a, b)| !sim.received(a, b, base_tag + (a * n + b) as u32));
    }
    sim.now - begin
}

#[test]
fn twenty_members_mesh_with_latency_and_loss() {
    let seed = simnet::seed(0x5eed_0001);
    let wall = Instant::now();
    let mut sim = Sim::new(seed, (5, 60), 0.02);
    for _ in 0..MEMBERS {
        sim.add_member(None);
    }
    let t = sim
        .run_until(Duration::from_secs(60), everyone_knows_everyone)
        .expect("every member learns every other within 60 s");
    println!("membership converged after {t:?} (simulated)");

    let t = every_pair_delivers(&mut sim, 1_000, Duration::from_secs(60));
    println!(
        "a packet crossed all {} ordered pairs within {t:?} (simulated)",
        MEMBERS * (MEMBERS - 1)
    );

    // With every member on a public address, every path ends up direct.
    let t = sim
        .run_until(Duration::from_secs(30), |s| {
            s.members.iter().all(|m| {
                m.node
                    .peer_keys()
                    .all(|k| matches!(m.node.path_to(k), Some(Path::Direct { .. })))
            })
        })
        .expect("all paths direct");
    println!("all paths direct within a further {t:?}");

    // A member that leaves gracefully disappears at once; one that vanishes within the relay's TTL.
    let leaver = sim.key(3);
    let now = sim.now;
    sim.members[3].node.leave(now);
    sim.run_for(Duration::from_millis(1));
    sim.members[3].alive = false;
    // Immediate when the relay's goodbye push arrives; when loss eats it, the next
    // registration's digest triggers a sync that drops the leaver.
    let bound = meshvpn::node::REGISTER_INTERVAL + Duration::from_secs(5);
    let t = sim
        .run_until(bound, |s| {
            s.members
                .iter()
                .filter(|m| m.alive)
                .all(|m| m.node.path_to(&leaver).is_none())
        })
        .expect("graceful leaver gone from everyone within the bound");
    println!("graceful leave seen by all after {t:?}");

    let crashed = sim.key(7);
    sim.members[7].alive = false;
    let bound = MEMBER_TTL + meshvpn::node::REGISTER_INTERVAL + Duration::from_secs(5);
    let t = sim
        .run_until(bound, |s| {
            s.members
                .iter()
                .filter(|m| m.alive)
                .all(|m| m.node.path_to(&crashed).is_none())
        })
        .expect("crashed member gone from everyone within the documented bound");
    println!("crashed member gone from all after {t:?} (bound {bound:?})");
    // The relay counts the TTL from the last refresh, at most one interval before the crash.
    let earliest = MEMBER_TTL - meshvpn::node::REGISTER_INTERVAL - Duration::from_secs(1);
    assert!(
        t >= earliest,
        "a silent member must not vanish before its TTL: {t:?}"
    );

    println!(
        "datagrams delivered {}, lost {}; wall time {:?}",
        sim.delivered_datagrams,
        sim.lost_datagrams,
        wall.elapsed()
    );
}

#[test]
fn relay_carries_every_pair_when_no_direct_path_exists() {
    let seed = simnet::seed(0x5eed_0002);
    let mut sim = Sim::new(seed, (10, 30), 0.01);
    sim.direct_blocked = true;
    for _ in 0..6 {
        sim.add_member(None);
    }
    sim.run_until(Duration::from_secs(30), everyone_knows_everyone)
        .expect("membership");
    let t = every_pair_delivers(&mut sim, 5_000, Duration::from_secs(30));
    println!("all pairs delivered through the relay within {t:?}");
    for m in &sim.members {
        for k in m.node.peer_keys() {
            assert_eq!(m.node.path_to(k), Some(Path::Relayed));
        }
    }
    // Once direct datagrams pass again, every pair upgrades without losing its session.
    sim.direct_blocked = false;
    let t = sim
        .run_until(
            meshvpn::node::peer::PROBE_BACKOFF_MAX + Duration::from_secs(5),
            |s| {
                s.members.iter().all(|m| {
                    m.node
                        .peer_keys()
                        .all(|k| matches!(m.node.path_to(k), Some(Path::Direct { .. })))
                })
            },
        )
        .expect("all paths upgrade to direct");
    println!("all paths upgraded to direct after {t:?}");
    every_pair_delivers(&mut sim, 7_000, Duration::from_secs(5));
}

#[test]
fn a_different_secret_never_joins_the_mesh() {
    let seed = simnet::seed(0x5eed_0003);
    let mut sim = Sim::new(seed, (5, 20), 0.0);
    for _ in 0..3 {
        sim.add_member(None);
    }
    let other = meshvpn::keys::NetworkSecret([0x42; 32]);
    let intruder = sim.add_member(Some(other));
    sim.run_for(Duration::from_secs(20));
    let ikey = sim.key(intruder);
    for i in 0..3 {
        assert_eq!(
            sim.members[i].node.peer_keys().count(),
            2,
            "member {i} sees only the real members"
        );
        assert!(sim.members[i].node.path_to(&ikey).is_none());
    }
    assert_eq!(sim.members[intruder].node.peer_keys().count(), 0);
    for i in 0..3 {
        sim.inject(intruder, i, 9_000 + i as u32);
    }
    sim.run_for(Duration::from_secs(5));
    for i in 0..3 {
        assert!(!sim.received(intruder, i, 9_000 + i as u32));
    }
}

#[test]
fn members_keep_retrying_an_unreachable_relay_and_register_once_it_is_up() {
    let seed = simnet::seed(0x5eed_0004);
    let mut sim = Sim::new(seed, (5, 20), 0.0);
    sim.relay_alive = false;
    for _ in 0..3 {
        sim.add_member(None);
    }
    sim.run_for(Duration::from_secs(40));
    assert!(sim
        .members
        .iter()
        .all(|m| !m.node.is_registered() && m.node.peer_keys().count() == 0));
    sim.relay_alive = true;
    let t = sim
        .run_until(Duration::from_secs(30), everyone_knows_everyone)
        .expect("registers after the relay comes up");
    println!(
        "relay came up; members converged after {t:?} (retry backoff at most {:?})",
        meshvpn::node::REGISTER_RETRY_MAX
    );
    assert!(t <= meshvpn::node::REGISTER_RETRY_MAX + Duration::from_secs(5));
}

#[test]
fn a_relay_that_cannot_prove_its_key_is_not_trusted() {
    let seed = simnet::seed(0x5eed_0005);
    let mut sim = Sim::new(seed, (5, 20), 0.0);
    sim.add_member(None);
    sim.add_member(None);
    // The members expect the original relay's key; an impostor now answers at its address.
    let real_key = sim.relay.public_key();
    sim.relay = meshvpn::relay::server::RelayServer::new(
        meshvpn::keys::NodeSecret::from_bytes([0x11; 32]),
        1,
        sim.relay_clock(),
    );
    sim.run_for(Duration::from_secs(20));
    for m in &sim.members {
        assert!(
            !m.node.is_registered(),
            "a member must not accept a relay that cannot prove the token's key"
        );
        assert_eq!(m.node.peer_keys().count(), 0);
    }
    // An active forger: replies claiming the right key but sealed without it, and replies
    // under its own key, are both refused.
    let forged = meshvpn::wire::seal_from_relay(
        &[7u8; 32],
        real_key,
        &meshvpn::wire::RelayReply::SyncEmpty {
            generation: 1,
            seq: 1,
        },
        [0; 24],
    );
    let own = meshvpn::wire::seal_from_relay(
        &[7u8; 32],
        sim.relay.public_key(),
        &meshvpn::wire::RelayReply::SyncEmpty {
            generation: 2,
            seq: 2,
        },
        [0; 24],
    );
    let (now, relay_addr) = (sim.now, sim.relay_addr);
    sim.members[0].node.handle_udp(now, relay_addr, &forged);
    sim.members[0].node.handle_udp(now, relay_addr, &own);
    let status = sim.members[0].node.status(now);
    assert_eq!(status.dropped.unauthenticated, 2);
    assert!(!status.relay.registered);
}

#[test]
fn cryptokey_routing_drops_spoofed_inner_sources() {
    let seed = simnet::seed(0x5eed_0006);
    let mut sim = Sim::new(seed, (5, 20), 0.0);
    for _ in 0..3 {
        sim.add_member(None);
    }
    sim.run_until(Duration::from_secs(30), everyone_knows_everyone)
        .expect("membership");
    every_pair_delivers(&mut sim, 100, Duration::from_secs(10));
    // Member 0 sends a packet to member 1 claiming member 2's virtual IP as its source.
    let spoofed = simnet::ipv4_packet(
        sim.members[2].node.virtual_ip(),
        sim.members[1].node.virtual_ip(),
        4242,
    );
    let now = sim.now;
    sim.members[0].node.handle_tun_packet(now, &spoofed);
    sim.run_for(Duration::from_secs(2));
    assert!(
        !sim.received(2, 1, 4242),
        "a spoofed packet must not reach the TUN"
    );
    assert_eq!(
        sim.members[1].node.status(sim.now).dropped.spoofed_source,
        1
    );
}

#[test]
fn a_relay_restart_keeps_direct_paths_and_restores_relayed_ones() {
    let seed = simnet::seed(0x5eed_0007);
    let mut sim = Sim::new(seed, (5, 20), 0.0);
    let relay_secret = meshvpn::keys::NodeSecret::from_bytes([0x33; 32]);
    sim.relay =
        meshvpn::relay::server::RelayServer::new(relay_secret.clone(), 1, sim.relay_clock());
    for _ in 0..3 {
        sim.add_member(None);
    }
    sim.run_until(Duration::from_secs(30), everyone_knows_everyone)
        .expect("membership");
    sim.run_until(Duration::from_secs(10), |s| {
        s.members.iter().all(|m| {
            m.node
                .peer_keys()
                .all(|k| matches!(m.node.path_to(k), Some(Path::Direct { .. })))
        })
    })
    .expect("all direct");
    let (k0, k1) = (sim.key(0), sim.key(1));
    // The relay process restarts: same key, empty memory, a larger change counter.
    sim.relay_alive = false;
    sim.run_for(Duration::from_secs(5));
    sim.relay = meshvpn::relay::server::RelayServer::new(relay_secret, 2, sim.relay_clock())
        .with_sequence_start(1 << 40);
    sim.relay_alive = true;
    let restarted = sim.now;
    // Direct paths never drop while the relay relearns the members.
    let mut worst = Duration::ZERO;
    while sim.now - restarted < Duration::from_secs(40) {
        sim.run_for(Duration::from_millis(500));
        assert!(
            matches!(sim.members[0].node.path_to(&k1), Some(Path::Direct { .. })),
            "direct path lost after the relay restart"
        );
        if sim.relay.member_count() < 3 {
            worst = sim.now - restarted;
        }
    }
    println!("all members registered with the restarted relay within {worst:?}");
    assert!(worst > Duration::ZERO, "the restarted relay starts empty");
    assert!(worst <= meshvpn::node::REGISTER_INTERVAL + meshvpn::node::REGISTER_RETRY_MAX);
    assert!(everyone_knows_everyone(&sim));

    // Relayed pair: traffic resumes through the restarted relay without any restart of members.
    sim.direct_blocked = true;
    // With traffic flowing (an idle pair notices only at its next sparse keepalive).
    let mut fell_back = false;
    for tag in 40_000..40_030 {
        sim.inject(1, 0, tag);
        sim.run_for(Duration::from_millis(500));
        if matches!(sim.members[1].node.path_to(&k0), Some(Path::Relayed)) {
            println!("fell back after {} packets", tag - 40_000);
            fell_back = true;
            break;
        }
    }
    assert!(fell_back, "falls back to the relay");
    sim.relay_alive = false;
    sim.run_for(Duration::from_secs(5));
    sim.relay = meshvpn::relay::server::RelayServer::new(
        meshvpn::keys::NodeSecret::from_bytes([0x33; 32]),
        3,
        sim.relay_clock(),
    )
    .with_sequence_start(1 << 41);
    sim.relay_alive = true;
    let back = sim.now;
    let mut tag = 50_000;
    let t = loop {
        assert!(
            sim.now - back < Duration::from_secs(40),
            "relayed traffic never resumed"
        );
        sim.inject(0, 1, tag);
        sim.run_for(Duration::from_millis(500));
        if sim.received(0, 1, tag) {
            break sim.now - back;
        }
        tag += 1;
    };
    println!("relayed traffic resumed {t:?} after the relay came back");
}
