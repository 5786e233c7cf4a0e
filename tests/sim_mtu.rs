//! Simulation: path MTU discovery against underlays that silently drop what does not fit (a
//! per-member MTU in the simulator, as with ICMP "fragmentation needed" filtered on the path).
//! Each pair converges to the largest inner packet its path carries, direct and relayed; a
//! packet with DF set that is larger is answered with ICMP "fragmentation needed" into the
//! sender's TUN instead of vanishing; one without DF arrives in fragments; a SYN's MSS is
//! clamped to fit.

#![allow(clippy::disallowed_methods, clippy::print_stdout)] // the simulator's epoch and the printed seed

mod simnet;

use std::net::Ipv4Addr;
use std::time::Duration;

use simnet::Sim;

/// Generous bound on convergence in simulated time (a search needs a few seconds).
const CONVERGE: Duration = Duration::from_secs(90);

/// An IPv4/UDP packet of `len` bytes from `src` to `dst`, DF as given, valid header checksum.
fn packet(src: Ipv4Addr, dst: Ipv4Addr, len: usize, df: bool, fill: u8) -> Vec<u8> {
    let mut p = vec![fill; len];
    p[..20].fill(0);
    p[0] = 0x45;
    p[2..4].copy_from_slice(&(len as u16).to_be_bytes());
    p[4..6].copy_from_slice(&0x4242u16.to_be_bytes());
    if df {
        p[6] = 0x40;
    }
    p[8] = 64;
    p[9] = 17;
    p[12..16].copy_from_slice(&src.octets());
    p[16..20].copy_from_slice(&dst.octets());
    let sum = checksum(&p[..20]);
    p[10..12].copy_from_slice(&sum.to_be_bytes());
    p
}

fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = data
        .chunks(2)
        .map(|w| u32::from(u16::from_be_bytes([w[0], *w.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

fn mtu(sim: &Sim, a: usize, b: usize) -> Option<u16> {
    sim.members[a].node.path_mtu(&sim.key(b))
}

/// Runs until both directions show `want` on a path that is direct (or not) as asked; prints
/// and returns how long it took.
fn converge(sim: &mut Sim, a: usize, b: usize, direct: bool, want: u16, what: &str) -> Duration {
    let took = sim
        .run_until(CONVERGE, |s| {
            s.is_direct(a, b) == direct
                && s.is_direct(b, a) == direct
                && mtu(s, a, b) == Some(want)
                && mtu(s, b, a) == Some(want)
        })
        .unwrap_or_else(|| {
            panic!(
                "{what}: path MTU {:?} / {:?}, direct {} / {}, wanted {want}",
                mtu(sim, a, b),
                mtu(sim, b, a),
                sim.is_direct(a, b),
                sim.is_direct(b, a)
            )
        });
    println!(
        "{what}: path MTU {want} after {took:?} ({} datagrams lost to the MTU)",
        sim.mtu_dropped
    );
    // Stays there: later probes and keepalives do not move it.
    sim.run_for(Duration::from_secs(30));
    assert_eq!((mtu(sim, a, b), mtu(sim, b, a)), (Some(want), Some(want)));
    took
}

/// Sends `p` from `a` until `b`'s TUN got a packet of its length (the first may wait for the
/// handshake); returns whether it arrived.
fn delivered(sim: &mut Sim, a: usize, b: usize, p: &[u8]) -> bool {
    for _ in 0..5 {
        sim.inject_packet(a, p);
        if sim
            .run_until(Duration::from_secs(2), |s| {
                s.members[b].delivered.iter().any(|d| d == p)
            })
            .is_some()
        {
            return true;
        }
    }
    false
}

/// The ICMP "fragmentation needed" messages in `a`'s TUN, as (source, next-hop MTU).
fn frag_needed(sim: &Sim, a: usize) -> Vec<(Ipv4Addr, u16)> {
    sim.members[a]
        .delivered
        .iter()
        .filter(|p| p.len() >= 56 && p[9] == 1 && p[20] == 3 && p[21] == 4)
        .map(|p| {
            assert_eq!(checksum(&p[..20]), 0, "IPv4 header checksum");
            assert_eq!(checksum(&p[20..]), 0, "ICMP checksum");
            (
                Ipv4Addr::new(p[12], p[13], p[14], p[15]),
                u16::from_be_bytes([p[26], p[27]]),
            )
        })
        .collect()
}

#[test]
fn a_clean_path_confirms_the_tun_mtu_at_once() {
    let mut sim = Sim::new(simnet::seed(0x1500), (10, 40), 0.0);
    let a = sim.add_member(None);
    let b = sim.add_member(None);
    converge(&mut sim, a, b, true, 1380, "1500 underlay, direct");
    assert_eq!(sim.mtu_dropped, 0);
}

#[test]
fn a_1280_underlay_converges_and_large_packets_get_frag_needed() {
    let mut sim = Sim::new(simnet::seed(0x1280), (10, 40), 0.0);
    let a = sim.add_member(None);
    let b = sim.add_member(None);
    sim.members[b].mtu = Some(1280);
    converge(&mut sim, a, b, true, 1220, "1280 underlay, direct");
    assert!(sim.mtu_dropped > 0, "the larger probes were lost");
    let (va, vb) = (
        sim.members[a].node.virtual_ip(),
        sim.members[b].node.virtual_ip(),
    );

    // What fits arrives; what does not, with DF, is answered into the sender's TUN.
    assert!(delivered(&mut sim, a, b, &packet(va, vb, 1220, true, 1)));
    let dropped_before = sim.mtu_dropped;
    let big = packet(va, vb, 1300, true, 2);
    sim.inject_packet(a, &big);
    sim.run_for(Duration::from_secs(1));
    assert_eq!(frag_needed(&sim, a), [(vb, 1220)]);
    assert!(!sim.members[b].delivered.iter().any(|d| d.len() == 1300));
    assert_eq!(
        sim.mtu_dropped, dropped_before,
        "nothing sent into the black hole"
    );

    // Without DF it arrives in fragments that fit.
    let before = sim.members[b].delivered.len();
    sim.inject_packet(a, &packet(va, vb, 1300, false, 3));
    sim.run_for(Duration::from_secs(1));
    let frags: Vec<&Vec<u8>> = sim.members[b].delivered[before..].iter().collect();
    assert_eq!(frags.len(), 2, "two fragments");
    assert!(frags.iter().all(|f| f.len() <= 1220));
    assert_eq!(frags.iter().map(|f| f.len() - 20).sum::<usize>(), 1280);
}

#[test]
fn a_1400_underlay_converges_relayed_then_again_when_direct() {
    let mut sim = Sim::new(simnet::seed(0x1400), (10, 40), 0.0);
    let a = sim.add_member(None);
    let b = sim.add_member(None);
    sim.members[a].mtu = Some(1400);
    sim.direct_blocked = true;
    // Relayed: the relay frame costs 36 bytes more than the direct path.
    converge(&mut sim, a, b, false, 1304, "1400 underlay, relayed");
    // The direct path opens: the search starts over at the direct path's base.
    sim.direct_blocked = false;
    converge(&mut sim, a, b, true, 1340, "1400 underlay, direct");

    // A SYN offering MSS 1460 reaches b clamped to what the path carries (1340 − 40).
    let (va, vb) = (
        sim.members[a].node.virtual_ip(),
        sim.members[b].node.virtual_ip(),
    );
    let mut syn = packet(va, vb, 44, true, 0);
    syn[9] = 6;
    syn[10..12].fill(0);
    let sum = checksum(&syn[..20]);
    syn[10..12].copy_from_slice(&sum.to_be_bytes());
    syn[32] = 6 << 4; // data offset: 24 bytes
    syn[33] = 0x02; // SYN
    syn[40..44].copy_from_slice(&[2, 4, 0x05, 0xb4]);
    let before = sim.members[b].delivered.len();
    for _ in 0..5 {
        sim.inject_packet(a, &syn);
        sim.run_for(Duration::from_secs(1));
        if sim.members[b].delivered.len() > before {
            break;
        }
    }
    let got = sim.members[b].delivered[before..]
        .iter()
        .find(|p| p.len() == 44 && p[9] == 6)
        .expect("the SYN arrives");
    assert_eq!(u16::from_be_bytes([got[42], got[43]]), 1300, "MSS clamped");
}
