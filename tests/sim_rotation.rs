//! Deterministic simulation of secret rotation: a member kicks another from a network of
//! members behind different NATs, with loss; the rest move to the new secret and keep
//! reaching each other, a member that was offline during the rotation finds its way in when it
//! comes back, and the kicked member reaches nobody and is listed nowhere.

#![allow(clippy::unwrap_used)]
#![allow(clippy::disallowed_methods, clippy::print_stdout)] // the simulator's start instant and the printed seed

mod simnet;

use std::time::Duration;

use meshvpn::keys::{NetworkSecret, NodeSecret};
use meshvpn::node::Event;
use rand::SeedableRng;
use rand_chacha::ChaCha20Rng;
use simnet::nat::NatSpec;
use simnet::Sim;

/// Whether every member in `group` knows every other one in it.
fn all_know_each_other(sim: &Sim, group: &[usize]) -> bool {
    group.iter().all(|&a| {
        group
            .iter()
            .all(|&b| a == b || sim.members[a].node.path_to(&sim.key(b)).is_some())
    })
}

/// Sends a packet tagged `tag` between every ordered pair of `group` every 500 ms (sessions
/// may still be handshaking) until each pair delivered one; how long that took.
fn deliver_all(sim: &mut Sim, group: &[usize], tag: u32) -> Option<Duration> {
    let begin = sim.elapsed();
    for _ in 0..60 {
        let mut missing = false;
        for &a in group {
            for &b in group {
                if a != b && !sim.received(a, b, tag) {
                    missing = true;
                    sim.inject(a, b, tag);
                }
            }
        }
        if !missing {
            return Some(sim.elapsed() - begin);
        }
        sim.run_for(Duration::from_millis(500));
    }
    None
}

#[test]
fn kick_moves_the_rest_to_a_new_secret_and_cuts_the_kicked_member_off() {
    let seed = simnet::seed(0x70_7a7e);
    let mut sim = Sim::new(seed, (5, 30), 0.02);
    let admin = sim.add_member(None);
    let public = sim.add_member(None);
    let home = sim.add_member_behind(NatSpec::HOME_ROUTER);
    let symmetric = sim.add_member_behind(NatSpec::SYMMETRIC);
    let offline = sim.add_member(None);
    let kicked = sim.add_member_behind(NatSpec::HOME_ROUTER);
    let everyone = [admin, public, home, symmetric, offline, kicked];
    let took = sim
        .run_until(Duration::from_secs(60), |s| {
            all_know_each_other(s, &everyone)
        })
        .expect("the network forms");
    println!("6 members know each other after {took:?}");

    // One member is offline while the rotation happens (its machine is off).
    sim.members[offline].alive = false;
    sim.run_for(Duration::from_secs(40));

    let mut recipients: Vec<_> = [public, home, symmetric, offline]
        .iter()
        .map(|&i| sim.key(i))
        .collect();
    // Members seen long ago and offline now: the upload takes several parts.
    let mut rng = ChaCha20Rng::seed_from_u64(seed);
    recipients.extend((0..12).map(|_| NodeSecret::generate(&mut rng).public()));
    let new = NetworkSecret::generate(&mut rng);
    let started = sim.elapsed();
    let now = sim.now;
    sim.members[admin]
        .node
        .start_rotation(now, new.clone(), &recipients, 7)
        .expect("a registered member starts a rotation");
    let online = [admin, public, home, symmetric];
    let took = sim
        .run_until(Duration::from_secs(60), |s| {
            online
                .iter()
                .all(|&i| s.members[i].cfg.network_secret == new)
                && all_know_each_other(s, &online)
        })
        .unwrap_or_else(|| {
            for &i in &online {
                println!(
                    "member {i}: new secret {} events {:?} knows {}",
                    sim.members[i].cfg.network_secret == new,
                    sim.members[i].rotation_events,
                    sim.members[i].node.peer_keys().count()
                );
            }
            println!("relay {:?}", sim.relay.counters());
            panic!("every online member moves to the new secret and they find each other again")
        });
    println!("online members on the new secret and meshed again {took:?} after the rotation began (16 entries in 3 parts)");
    assert!(sim.relay.counters().rotation_requests >= 3);
    assert!(
        matches!(
            sim.members[admin].rotation_events[..],
            [(
                _,
                Event::SecretRotated {
                    request: Some(7),
                    ..
                }
            )]
        ),
        "{:?}",
        sim.members[admin].rotation_events
    );
    // They carry traffic to each other.
    let took = deliver_all(&mut sim, &online, 100).expect("every online pair delivers");
    println!("every online pair delivers on the new secret within {took:?}");

    // The kicked member was told, keeps the old secret, and reaches nobody.
    assert!(matches!(
        sim.members[kicked].rotation_events[..],
        [(_, Event::LeftOutOfRotation)]
    ));
    assert_ne!(sim.members[kicked].cfg.network_secret, new);
    // Give the kicked member's stale sessions every chance (WireGuard keepalives, rekeys).
    sim.run_for(Duration::from_secs(60));
    for &b in &online {
        sim.inject(kicked, b, 900 + b as u32);
        assert!(
            !sim.members[b]
                .node
                .peer_keys()
                .any(|k| *k == sim.key(kicked)),
            "member {b} still lists the kicked member"
        );
    }
    sim.run_for(Duration::from_secs(10));
    for &b in &online {
        assert!(
            !sim.received(kicked, b, 900 + b as u32),
            "the kicked member reached member {b}"
        );
    }
    assert_eq!(
        sim.members[kicked].node.peer_keys().count(),
        0,
        "the old network id lists nobody to the kicked member"
    );

    // The offline member comes back with the old secret and is handed the new one.
    sim.members[offline].alive = true;
    let back = sim.elapsed();
    let mut with_offline = online.to_vec();
    with_offline.push(offline);
    let took = sim
        .run_until(Duration::from_secs(90), |s| {
            s.members[offline].cfg.network_secret == new && all_know_each_other(s, &with_offline)
        })
        .expect("the member offline during the rotation joins the new network when back");
    println!(
        "the offline member rejoined {took:?} after coming back ({:?} after the rotation began)",
        sim.elapsed() - started
    );
    assert!(back > started);
}
