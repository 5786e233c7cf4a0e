//! Deterministic simulations of a hostile relay and of an insider after another member's
//! address: false "member gone" for a peer on a direct path, sync rounds announcing huge
//! totals, floods of made-up members, ghost announcements replayed to a restarted member,
//! key grinding for a live member's address, and simultaneous joins. The hostile relay is
//! played by sealing replies with the simulated relay's own key.

#![allow(clippy::unwrap_used)]
#![allow(clippy::disallowed_methods, clippy::print_stdout)] // wall-clock timing of the key grind, the printed seed

mod simnet;

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use meshvpn::addressing;
use meshvpn::keys::{NodeSecret, PeerKey};
use meshvpn::node::{Node, NodeConfig, RelayTarget};
use meshvpn::wire::{self, Announcement, MemberEntry, NatKind, RelayReply, SyncTag};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha20Rng;
use simnet::Sim;

/// The member-side cap on members (`node::membership::MAX_MEMBERS`).
const MAX_MEMBERS: usize = 4096;
/// How long a peer on a live direct path survives a removal (`membership::STALE_GRACE`).
const STALE_GRACE: Duration = Duration::from_secs(30);

/// Delivers `reply` to `node` as if the simulated relay had sealed and sent it.
fn forge(sim: &mut Sim, node: &mut Node, reply: &RelayReply) {
    let session = session(sim, node);
    forge_in(sim, node, &session, reply);
}

/// The relay's session key with `node`.
fn session(sim: &Sim, node: &Node) -> [u8; 32] {
    let relay = sim.relay_secret.public();
    sim.relay_secret
        .relay_session_key(&node.public_key(), &relay)
}

/// [`forge`] with the session key already derived (floods derive it once).
fn forge_in(sim: &mut Sim, node: &mut Node, session: &[u8; 32], reply: &RelayReply) {
    let relay = sim.relay_secret.public();
    let dgram = wire::seal_from_relay(session, relay, reply, sim.rng.gen());
    node.handle_udp(sim.now, sim.relay_addr, &dgram);
}

/// A live push of `entry` at change counter `seq`.
fn push(seq: u64, entry: MemberEntry) -> RelayReply {
    RelayReply::Member {
        tag: SyncTag {
            generation: 0,
            index: 0,
            total: 1,
            seq,
        },
        entry,
    }
}

/// An announcement of `key` at `ip` with timestamp `ts_ms`, sealed with the network's key.
fn announcement(sim: &Sim, key: PeerKey, ip: Ipv4Addr, ts_ms: u64) -> Vec<u8> {
    let keys = sim.secret.derive();
    Announcement {
        key,
        name: "ghost".into(),
        virtual_ip: ip,
        ts_ms,
        endpoints: vec!["198.51.100.200:4000".parse().unwrap()],
        nat: NatKind::Unknown,
    }
    .seal(&keys.control_key, &keys.network_id, [7; 24])
}

/// A node of the simulated network that is not driven (hostile replies are fed to it).
fn standalone(sim: &mut Sim) -> Node {
    let secret = NodeSecret::generate(&mut sim.rng);
    let ip = addressing::derive_virtual_ip(&sim.subnet, &secret.public(), 0).unwrap();
    let cfg = NodeConfig {
        secret,
        network_secret: sim.secret.clone(),
        network_name: "sim".into(),
        name: "restarted".into(),
        virtual_ip: ip,
        subnet: sim.subnet,
        relays: vec![RelayTarget {
            key: sim.relay_secret.public(),
            addr: sim.relay_addr,
            tls: false,
        }],
        stun_servers: Vec::new(),
        seed: sim.rng.gen(),
        relay_for_peers: true,
    };
    Node::new(
        cfg,
        sim.now,
        simnet::SIM_UNIX_MS + sim.elapsed().as_millis() as u64,
    )
}

/// Sends tagged packets from `a` to `b` until one arrives, at most `tries` times.
fn reaches(sim: &mut Sim, a: usize, b: usize, first_tag: u32, tries: u32) -> bool {
    for tag in first_tag..first_tag + tries {
        sim.inject(a, b, tag);
        sim.run_for(Duration::from_millis(300));
        if sim.received(a, b, tag) {
            return true;
        }
    }
    false
}

fn all_know(sim: &Sim, n: usize) -> bool {
    sim.members
        .iter()
        .filter(|m| m.alive)
        .all(|m| m.node.peer_keys().count() == n)
}

#[test]
fn a_false_member_gone_leaves_a_direct_session_up_for_the_grace_period() {
    let seed = simnet::seed(0x4057_0001);
    let mut sim = Sim::new(seed, (5, 20), 0.0);
    let a = sim.add_member(None);
    let b = sim.add_member(None);
    let took = sim
        .run_until(Duration::from_secs(30), |s| s.both_direct(a, b))
        .expect("direct path");
    println!("direct after {took:?}");
    let kb = sim.key(b);
    let placeholder = standalone(&mut sim);
    let mut node = std::mem::replace(&mut sim.members[a].node, placeholder);
    forge(
        &mut sim,
        &mut node,
        &RelayReply::MemberGone {
            key: kb,
            seq: 1 << 40,
        },
    );
    sim.members[a].node = node;
    let lied_at = sim.now;
    sim.run_for(Duration::from_secs(10));
    assert!(
        sim.members[a].node.peer_keys().any(|k| *k == kb),
        "the peer survives a false removal"
    );
    assert!(sim.both_direct(a, b), "still direct");
    assert!(reaches(&mut sim, a, b, 1, 5), "traffic still flows a -> b");
    assert!(
        reaches(&mut sim, b, a, 100, 5),
        "traffic still flows b -> a"
    );
    // The grace is bounded: a relay that keeps saying so is believed in the end.
    let gone = sim.run_until(STALE_GRACE * 2, |s| {
        !s.members[a].node.peer_keys().any(|k| *k == kb)
    });
    let gone = gone
        .map(|_| sim.now - lied_at)
        .expect("removed after the grace");
    println!("removed {gone:?} after the false removal");
    assert!(gone >= STALE_GRACE, "{gone:?}");
}

/// Resident memory of this process in bytes.
fn rss() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap();
    let pages: u64 = statm.split_whitespace().nth(1).unwrap().parse().unwrap();
    pages * 4096
}

#[test]
fn huge_sync_totals_and_floods_of_members_leave_memory_bounded() {
    let seed = simnet::seed(0x4057_0002);
    let mut sim = Sim::new(seed, (5, 20), 0.0);
    let a = sim.add_member(None);
    let b = sim.add_member(None);
    sim.run_until(Duration::from_secs(30), |s| all_know(s, 1))
        .expect("membership");
    let before = rss();
    let placeholder = standalone(&mut sim);
    let mut node = std::mem::replace(&mut sim.members[a].node, placeholder);
    let big = vec![0xA5u8; 50_000];
    let made_up = |i: u64| {
        let mut k = [0xEEu8; 32];
        k[..8].copy_from_slice(&i.to_be_bytes());
        PeerKey(k)
    };
    let entry = |i: u64, announcement: Vec<u8>| MemberEntry {
        key: made_up(i),
        observed: "198.51.100.99:1".parse().unwrap(),
        announcement,
        since: 1,
    };
    // A round announcing 65,535 entries, then one within the member cap: 640 entries of
    // 50 kB each would hold 32 MB if collected.
    let key = session(&sim, &node);
    for (generation, total, sent) in [(7u32, u16::MAX, 100u16), (8, 4000, 640)] {
        for i in 0..sent {
            let reply = RelayReply::Member {
                tag: SyncTag {
                    generation,
                    index: i,
                    total,
                    seq: 50,
                },
                entry: entry(u64::from(i), big.clone()),
            };
            forge_in(&mut sim, &mut node, &key, &reply);
        }
    }
    // Live pushes of more made-up members than the cap.
    for i in 0..(MAX_MEMBERS as u64 + 500) {
        let reply = push(100 + i, entry(10_000 + i, vec![1; 40]));
        forge_in(&mut sim, &mut node, &key, &reply);
    }
    let grown = rss().saturating_sub(before);
    let dropped = node.status(sim.now).dropped;
    println!(
        "resident memory grew by {} kB; {} pushes refused as beyond the cap",
        grown / 1024,
        dropped.members_full
    );
    assert!(dropped.members_full >= 500, "{dropped:?}");
    assert!(grown < 16 << 20, "memory grew by {grown} bytes");
    assert_eq!(
        node.peer_keys().count(),
        1,
        "no made-up member became a peer"
    );
    sim.members[a].node = node;
    assert!(
        reaches(&mut sim, a, b, 1, 10),
        "the real peer is still reached"
    );
}

#[test]
fn ghost_announcements_are_refused_after_a_restart() {
    let seed = simnet::seed(0x4057_0003);
    let mut sim = Sim::new(seed, (5, 20), 0.0);
    let a = sim.add_member(None);
    let m = sim.add_member(None);
    sim.run_until(Duration::from_secs(30), |s| all_know(s, 1))
        .expect("membership");
    let (km, ip) = (sim.key(m), sim.members[m].node.virtual_ip());
    // What a relay kept of m: an announcement older than the one a saw last.
    let old = announcement(&sim, km, ip, simnet::SIM_UNIX_MS - 60_000);
    let now = sim.now;
    sim.members[m].node.leave(now);
    sim.run_for(Duration::from_millis(200));
    sim.members[m].alive = false;
    sim.run_until(Duration::from_secs(10), |s| all_know(s, 0))
        .expect("m left");
    let floors = sim.members[a].node.announcement_floors();
    assert!(floors.iter().any(|(k, _)| *k == km), "{floors:?}");
    let ghost = push(
        1_000,
        MemberEntry {
            key: km,
            observed: "198.51.100.200:4000".parse().unwrap(),
            announcement: old,
            since: 1_000,
        },
    );

    refused_after_a_restart_only_with_floors(&mut sim, floors, &ghost);
}

/// A freshly started member that remembers `floors` refuses `ghost`; one without them would
/// have believed it.
fn refused_after_a_restart_only_with_floors(
    sim: &mut Sim,
    floors: Vec<(PeerKey, u64)>,
    ghost: &RelayReply,
) {
    let mut restarted = standalone(sim);
    restarted.restore_announcement_floors(floors);
    forge(sim, &mut restarted, ghost);
    assert_eq!(restarted.peer_keys().count(), 0, "the ghost was refused");
    assert_eq!(restarted.status(sim.now).dropped.stale_announcement, 1);
    let mut forgetful = standalone(sim);
    forge(sim, &mut forgetful, ghost);
    assert_eq!(forgetful.peer_keys().count(), 1);
}

#[test]
fn the_exact_last_announcement_of_a_member_that_left_is_refused_too() {
    let seed = simnet::seed(0x4057_0005);
    let mut sim = Sim::new(seed, (5, 20), 0.0);
    let a = sim.add_member(None);
    let m = sim.add_member(None);
    let addr_a = sim.members[a].addr;
    sim.tap = Some(Vec::new());
    sim.run_until(Duration::from_secs(30), |s| all_know(s, 1))
        .expect("membership");
    let km = sim.key(m);
    // What the relay last sent a about m: the exact entry a hostile relay would replay.
    let session_a = session(&sim, &sim.members[a].node);
    let last = sim
        .tap
        .take()
        .unwrap()
        .into_iter()
        .filter(|t| t.src == sim.relay_addr && t.dst == addr_a)
        .filter_map(|t| match wire::Frame::parse(&t.payload) {
            Ok(wire::Frame::FromRelay { relay, sealed }) => {
                wire::open_from_relay(&session_a, &relay, sealed).ok()
            }
            _ => None,
        })
        .filter_map(|r| match r {
            RelayReply::Member { entry, .. } => (entry.key == km).then_some(entry),
            RelayReply::RegisterAck { .. }
            | RelayReply::MemberGone { .. }
            | RelayReply::Unregistered { .. }
            | RelayReply::SyncEmpty { .. }
            | RelayReply::Error { .. }
            | RelayReply::RotateAck { .. }
            | RelayReply::Rotated { .. } => None,
        })
        .next_back()
        .expect("the relay told a about m");
    let now = sim.now;
    sim.members[m].node.leave(now);
    sim.run_for(Duration::from_millis(200));
    sim.members[m].alive = false;
    sim.run_until(Duration::from_secs(10), |s| all_know(s, 0))
        .expect("m left");

    // Replayed to a, which saw m leave: refused.
    let ghost = push(1_000_000_000_000_000, last);
    let spare = standalone(&mut sim);
    let mut node = std::mem::replace(&mut sim.members[a].node, spare);
    forge(&mut sim, &mut node, &ghost);
    assert_eq!(node.peer_keys().count(), 0, "the ghost was refused");
    // And to a restarted a that kept its floors.
    let floors = node.announcement_floors();
    refused_after_a_restart_only_with_floors(&mut sim, floors, &ghost);
}

#[test]
fn key_grinding_does_not_take_a_live_members_address() {
    let seed = simnet::seed(0x4057_0004);
    let mut sim = Sim::new(seed, (5, 20), 0.0);
    sim.subnet = "10.77.0.0/24".parse().unwrap();
    let observer = sim.add_member(None);
    let target = Ipv4Addr::new(10, 77, 0, 77);
    sim.next_virtual_ip = Some(target);
    let victim = sim.add_member(None);
    sim.run_until(Duration::from_secs(30), |s| all_know(s, 1))
        .expect("membership");
    let kv = sim.key(victim);

    // The insider generates keys until one derives the victim's address and is smaller.
    let mut rng = ChaCha20Rng::seed_from_u64(seed ^ 0x9121);
    let started = Instant::now();
    let (tries, grinder_secret) = (1..=200_000u32)
        .find_map(|n| {
            let s = NodeSecret::generate(&mut rng);
            let k = s.public();
            let hit = addressing::derive_virtual_ip(&sim.subnet, &k, 0) == Some(target) && k < kv;
            hit.then_some((n, s))
        })
        .expect("a ground key");
    println!(
        "ground a key for {target} in {tries} tries ({:?})",
        started.elapsed()
    );
    let kg = grinder_secret.public();
    assert!(
        addressing::owner_rank(&sim.subnet, &kg, target)
            < addressing::owner_rank(&sim.subnet, &kv, target),
        "by key alone the ground key would win"
    );
    sim.next_secret = Some(grinder_secret);
    sim.next_virtual_ip = Some(target);
    let grinder = sim.add_member(None);
    sim.run_until(Duration::from_secs(30), |s| all_know(s, 2))
        .expect("membership with the grinder");
    sim.run_for(Duration::from_secs(3));

    let now = sim.now;
    assert!(sim.members[victim].node.status(now).ip_conflict.is_none());
    assert!(sim.members[grinder].node.status(now).ip_conflict.is_some());
    let seen = sim.members[observer].node.status(now);
    let flagged: Vec<&str> = seen
        .peers
        .iter()
        .filter(|p| p.ip_conflict)
        .map(|p| p.public_key.as_str())
        .collect();
    assert_eq!(flagged, vec![kg.to_base64().as_str()]);

    // Traffic for the address still goes to the victim.
    assert!(reaches(&mut sim, observer, victim, 1, 10));
    assert!(
        !sim.members[grinder]
            .delivered
            .iter()
            .any(|p| p.len() >= 20 && p[16..20] == target.octets()),
        "the grinder received traffic for the victim's address"
    );
    // The grinder sending with the victim's address as source is dropped.
    let spoofed_before = sim.members[observer]
        .node
        .status(sim.now)
        .dropped
        .spoofed_source;
    for tag in 500..510 {
        sim.inject(grinder, observer, tag);
        sim.run_for(Duration::from_millis(300));
        assert!(!sim.received(grinder, observer, tag));
    }
    let spoofed = sim.members[observer]
        .node
        .status(sim.now)
        .dropped
        .spoofed_source;
    assert!(spoofed > spoofed_before, "spoofed packets counted");
}

#[test]
fn simultaneous_joins_resolve_the_same_everywhere() {
    let base = simnet::seed(0x4057_0005);
    for round in 0..4u64 {
        let seed = base + round;
        let mut sim = Sim::new(seed, (5, 40), 0.0);
        let ip = Ipv4Addr::new(10, 77, 1, 1);
        let early = sim.add_member(None);
        sim.next_virtual_ip = Some(ip);
        let x = sim.add_member(None);
        sim.next_virtual_ip = Some(ip);
        let y = sim.add_member(None);
        sim.run_until(Duration::from_secs(30), |s| all_know(s, 2))
            .expect("membership");
        // A member joining later learns both claims from a snapshot.
        let late = sim.add_member(None);
        sim.run_until(Duration::from_secs(30), |s| all_know(s, 3))
            .expect("membership with the late member");
        sim.run_for(Duration::from_secs(2));
        let now = sim.now;
        let lost = |i: usize| sim.members[i].node.status(now).ip_conflict.is_some();
        assert!(
            lost(x) != lost(y),
            "exactly one claimant lost (seed {seed})"
        );
        let loser = if lost(x) { sim.key(x) } else { sim.key(y) };
        for observer in [early, late] {
            let status = sim.members[observer].node.status(now);
            let flagged: Vec<String> = status
                .peers
                .iter()
                .filter(|p| p.ip_conflict)
                .map(|p| p.public_key.clone())
                .collect();
            assert_eq!(flagged, vec![loser.to_base64()], "seed {seed}");
        }
        let owner = if lost(x) { y } else { x };
        assert!(reaches(&mut sim, late, owner, 1, 10), "seed {seed}");
    }
}
