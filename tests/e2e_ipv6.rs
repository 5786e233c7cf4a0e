//! End-to-end direct paths over IPv6: the real `meshvpn` binary, a relay (IPv4) on a public lab
//! host and two public members, alice and bob (needs root; skips otherwise).
//!
//! Direct IPv4 UDP between alice and bob is dropped by the lab's internet router (an nftables
//! rule in its forward chain, both directions; their IPv4 traffic to and from the relay still
//! passes), so the only direct path between them is IPv6.
//!
//! * `direct_path_over_ipv6`: with [`Mesh::enable_ipv6`] both members have a ULA address
//!   (`fd6d:<link>::2`); after the join they must list each other, ping each other's virtual
//!   IPs, and within 20 s show each other on `path == "direct"` with an IPv6 endpoint (`[fd…]`),
//!   namely the other's ULA address.
//! * `without_ipv6_the_pair_stays_relayed`: the control, without IPv6: pings still work, but the
//!   pair never leaves the relay. This proves the first case really goes over IPv6.
//!
//! Both print their timings (from the join) and the endpoints.

#![allow(clippy::print_stdout, clippy::unwrap_used)]
#![allow(clippy::disallowed_methods)] // an end-to-end test: real time and real processes

use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context as _, Result};
use meshvpn_lab::{self as lab, Host, Mesh, PeerPath, Status};

const EXE: &str = env!("CARGO_BIN_EXE_meshvpn");
const RELAY_PORT: u16 = 3478;
/// From the join: both members list each other and ping both ways.
const PING_BOUND: Duration = Duration::from_secs(30);
/// After the pings: both sides show a direct IPv6 path.
const DIRECT_BOUND: Duration = Duration::from_secs(20);
/// After the pings: how long the control pair is watched for a (wrong) direct path.
const RELAY_WATCH: Duration = Duration::from_secs(10);
const POLL: Duration = Duration::from_millis(100);
const NETWORK: &str = "e2ev6";

fn skip() -> bool {
    if lab::is_root() {
        return false;
    }
    println!("skipping: needs root");
    true
}

/// Drops UDP between `a` and `b` over IPv4 in the internet router (both directions), leaving
/// everything else (their traffic with the relay, ICMP, IPv6) alone. Counted, for the report.
fn block_direct_ipv4(mesh: &Mesh, a: Ipv4Addr, b: Ipv4Addr) -> Result<()> {
    let rules = format!(
        "table ip mvlab_e2ev6 {{\n\
         \tchain forward {{\n\
         \t\ttype filter hook forward priority 0; policy accept;\n\
         \t\tip saddr {a} ip daddr {b} ip protocol udp counter drop\n\
         \t\tip saddr {b} ip daddr {a} ip protocol udp counter drop\n\
         \t}}\n\
         }}\n"
    );
    let file = mesh.lab.dir().join("block-direct-ipv4.nft");
    std::fs::write(&file, rules)?;
    mesh.lab
        .exec_in_ns(
            mesh.lab.internet_ns(),
            &["nft", "-f", &file.to_string_lossy()],
            Duration::from_secs(10),
        )
        .context("loading the IPv4 block (is nftables installed?)")?;
    Ok(())
}

/// The packet counters of the block rules, e.g. `[12, 9]` (a→b, b→a).
fn block_counters(mesh: &Mesh) -> Vec<u64> {
    let Ok(text) = mesh.lab.ruleset(mesh.lab.internet_ns()) else {
        return Vec::new();
    };
    text.lines()
        .filter(|l| l.contains("counter packets"))
        .filter_map(|l| {
            let rest = l.split("packets ").nth(1)?;
            rest.split_whitespace().next()?.parse().ok()
        })
        .collect()
}

/// Whether a datagram from host `from` reaches a fresh UDP socket on host `to` (at its IPv4
/// address, or its IPv6 one if `v6`); three tries, 500 ms each.
fn udp_arrives(mesh: &Mesh, hf: &Host, ht: &Host, v6: bool) -> Result<bool> {
    let rx = if v6 {
        mesh.lab.udp_socket6(ht, 0)?
    } else {
        mesh.lab.udp_socket(ht, 0)?
    };
    let port = rx.local_addr()?.port();
    let dest: SocketAddr = if v6 {
        (ht.addr6.context("no IPv6 address")?, port).into()
    } else {
        SocketAddrV4::new(ht.addr, port).into()
    };
    let tx = if v6 {
        mesh.lab.udp_socket6(hf, 0)?
    } else {
        mesh.lab.udp_socket(hf, 0)?
    };
    rx.set_read_timeout(Some(Duration::from_millis(500)))?;
    let mut buf = [0u8; 16];
    for _ in 0..3 {
        tx.send_to(b"e2ev6", dest)?;
        if let Ok((n, _)) = rx.recv_from(&mut buf) {
            if &buf[..n] == b"e2ev6" {
                return Ok(true);
            }
        }
    }
    Ok(false)
}

/// A relay and public members alice and bob (with IPv6 if `ipv6`), direct IPv4 UDP between
/// them blocked and checked to be blocked, the network created. Nobody joined yet.
fn setup(tag: &str, ipv6: bool) -> Result<Mesh> {
    let t = Instant::now();
    let mut mesh = Mesh::new(
        tag,
        EXE.as_ref(),
        &[("alice", None), ("bob", None)],
        RELAY_PORT,
    )?;
    if ipv6 {
        mesh.enable_ipv6()?;
    }
    let (alice, bob) = (mesh.host("alice")?.clone(), mesh.host("bob")?.clone());
    let relay = mesh.relay.host.clone();
    block_direct_ipv4(&mesh, alice.addr, bob.addr)?;
    ensure!(
        !udp_arrives(&mesh, &alice, &bob, false)? && !udp_arrives(&mesh, &bob, &alice, false)?,
        "[{tag}] direct IPv4 UDP between alice and bob still passes"
    );
    ensure!(
        udp_arrives(&mesh, &alice, &relay, false)? && udp_arrives(&mesh, &bob, &relay, false)?,
        "[{tag}] IPv4 UDP to the relay must still pass"
    );
    if ipv6 {
        let (a6, b6) = (
            alice.addr6.context("alice: no IPv6")?,
            bob.addr6.context("bob: no IPv6")?,
        );
        ensure!(
            mesh.lab.ping6(&alice, b6, 2, Duration::from_secs(1))
                && mesh.lab.ping6(&bob, a6, 2, Duration::from_secs(1)),
            "[{tag}] alice ({a6}) and bob ({b6}) cannot ping each other over IPv6"
        );
        ensure!(
            udp_arrives(&mesh, &alice, &bob, true)? && udp_arrives(&mesh, &bob, &alice, true)?,
            "[{tag}] UDP over IPv6 between alice and bob must pass"
        );
    } else {
        ensure!(
            alice.addr6.is_none() && bob.addr6.is_none(),
            "IPv6 is opt-in"
        );
    }
    mesh.create_network(NETWORK, Some("10.93.0.0/16"))?;
    println!(
        "[{tag}] lab (alice {} {}, bob {} {}, relay {}; direct IPv4 UDP alice<->bob dropped) \
         + token in {:.1?}",
        alice.addr,
        alice.addr6.map_or("(no IPv6)".into(), |a| a.to_string()),
        bob.addr,
        bob.addr6.map_or("(no IPv6)".into(), |a| a.to_string()),
        mesh.relay_addr,
        t.elapsed()
    );
    Ok(mesh)
}

/// Joins both, waits until they list each other, pings both ways (bounded). Returns the join
/// instant and both virtual IPs.
fn join_and_ping(mesh: &mut Mesh, tag: &str) -> Result<(Instant, Ipv4Addr, Ipv4Addr)> {
    let t0 = Instant::now();
    mesh.join("alice")?;
    mesh.join("bob")?;
    let st = mesh.converge(&["alice", "bob"], PING_BOUND)?;
    let converged = t0.elapsed();
    let (ip_a, ip_b) = (st[0].virtual_ipv4()?, st[1].virtual_ipv4()?);
    let left = || PING_BOUND.saturating_sub(t0.elapsed());
    mesh.ping_until("alice", ip_b, left())
        .with_context(|| format!("[{tag}] alice -> bob ({ip_b})"))?;
    let ping = t0.elapsed();
    mesh.ping_until("bob", ip_a, left().max(Duration::from_secs(2)))
        .with_context(|| format!("[{tag}] bob -> alice ({ip_a})"))?;
    let back = t0.elapsed();
    println!(
        "[{tag}] converged {:.2}s, first ping alice->bob {:.2}s, bob->alice {:.2}s \
         (alice {ip_a}, bob {ip_b})",
        converged.as_secs_f64(),
        ping.as_secs_f64(),
        back.as_secs_f64()
    );
    Ok((t0, ip_a, ip_b))
}

/// `(path, endpoint)` of `peer` as `st` shows it.
fn view(st: &Status, peer: &str) -> (String, String) {
    st.peer(peer)
        .map_or(("(unlisted)".into(), "-".into()), |p| {
            (
                p.path.to_string(),
                p.endpoint.clone().unwrap_or_else(|| "-".into()),
            )
        })
}

/// One line per member: how it sees the other.
fn describe(mesh: &Mesh) -> String {
    [("alice", "bob"), ("bob", "alice")]
        .iter()
        .map(|(a, b)| match mesh.status(a) {
            Ok(st) => {
                let (path, ep) = view(&st, b);
                format!("{a} sees {b}: path {path}, endpoint {ep}")
            }
            Err(e) => format!("{a}: no status: {e:#}"),
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// Whether `st` shows `peer` on a direct path at an IPv6 endpoint `[fd…]:port` whose address is
/// `want`.
fn direct_v6(st: &Status, peer: &str, want: IpAddr) -> bool {
    st.peer(peer).is_some_and(|p| {
        p.path == PeerPath::Direct
            && p.endpoint_is_ipv6()
            && p.endpoint.as_deref().is_some_and(|e| e.starts_with("[fd"))
            && p.endpoint_addr().is_some_and(|a| a.ip() == want)
    })
}

#[test]
fn direct_path_over_ipv6() -> Result<()> {
    if skip() {
        return Ok(());
    }
    let tag = "e2e-ipv6";
    let mut mesh = setup(tag, true)?;
    let a6 = IpAddr::V6(mesh.host("alice")?.addr6.context("alice: no IPv6")?);
    let b6 = IpAddr::V6(mesh.host("bob")?.addr6.context("bob: no IPv6")?);
    let (t0, ip_a, ip_b) = join_and_ping(&mut mesh, tag)?;

    let wait_start = Instant::now();
    let (mut direct_a, mut direct_b) = (None, None);
    let result = lab::wait_until(
        DIRECT_BOUND,
        POLL,
        "a direct IPv6 path on both sides",
        || {
            if direct_a.is_none() && direct_v6(&mesh.status("alice")?, "bob", b6) {
                direct_a = Some(t0.elapsed());
            }
            if direct_b.is_none() && direct_v6(&mesh.status("bob")?, "alice", a6) {
                direct_b = Some(t0.elapsed());
            }
            Ok(direct_a.is_some() && direct_b.is_some())
        },
    );
    let fmt =
        |d: Option<Duration>| d.map_or("never".into(), |d| format!("{:.2}s", d.as_secs_f64()));
    println!(
        "[{tag}] direct over IPv6 (from the join): alice {} / bob {} (waited {:.2}s after the \
         pings, bound {DIRECT_BOUND:?})",
        fmt(direct_a),
        fmt(direct_b),
        wait_start.elapsed().as_secs_f64()
    );
    println!("[{tag}] {}", describe(&mesh));
    println!(
        "[{tag}] direct IPv4 UDP dropped by the router (alice->bob, bob->alice): {:?} packets",
        block_counters(&mesh)
    );
    if let Err(e) = result {
        for name in ["alice", "bob"] {
            if let Ok(t) = mesh.member(name)?.status_table(&mesh.lab, NETWORK) {
                println!("[{tag}] `meshvpn status` of {name}:\n{t}");
            }
        }
        // A panic (not an error) so the lab prints the tail of every log while tearing down.
        panic!("[{tag}] {e:#}: {}", describe(&mesh));
    }

    // The direct IPv6 path carries traffic both ways.
    for (from, to) in [("alice", ip_b), ("bob", ip_a)] {
        let rtt = mesh.ping_once(from, to, Duration::from_secs(2))?;
        ensure!(
            rtt.is_some(),
            "[{tag}] {from} -> {to} failed on the direct path"
        );
        println!(
            "[{tag}] {from} -> {to} over the direct path: {:.2?}",
            rtt.unwrap()
        );
    }
    assert!(
        direct_v6(&mesh.status("alice")?, "bob", b6)
            && direct_v6(&mesh.status("bob")?, "alice", a6),
        "[{tag}] the IPv6 path did not stay direct: {}",
        describe(&mesh)
    );
    mesh.shutdown()
}

#[test]
fn without_ipv6_the_pair_stays_relayed() -> Result<()> {
    if skip() {
        return Ok(());
    }
    let tag = "e2e-noipv6";
    let mut mesh = setup(tag, false)?;
    let (t0, ip_a, ip_b) = join_and_ping(&mut mesh, tag)?;

    let watch = Instant::now();
    let mut polls = 0u32;
    while watch.elapsed() < RELAY_WATCH {
        ensure!(!lab::interrupted(), "interrupted");
        for (a, b) in [("alice", "bob"), ("bob", "alice")] {
            let st = mesh.status(a)?;
            let (path, ep) = view(&st, b);
            assert_eq!(
                path,
                "relay",
                "[{tag}] {a} shows {b} on {path} (endpoint {ep}) {:.2}s after the join, but \
                 without IPv6 there is no direct path",
                t0.elapsed().as_secs_f64()
            );
        }
        polls += 1;
        std::thread::sleep(POLL);
    }
    for (from, to) in [("alice", ip_b), ("bob", ip_a)] {
        let rtt = mesh.ping_once(from, to, Duration::from_secs(2))?;
        ensure!(
            rtt.is_some(),
            "[{tag}] {from} -> {to} failed on the relayed path"
        );
        println!("[{tag}] {from} -> {to} via the relay: {:.2?}", rtt.unwrap());
    }
    println!(
        "[{tag}] relayed for {:.2}s after the pings ({polls} polls, {:.2}s from the join): {}",
        RELAY_WATCH.as_secs_f64(),
        t0.elapsed().as_secs_f64(),
        describe(&mesh)
    );
    println!(
        "[{tag}] direct IPv4 UDP dropped by the router (alice->bob, bob->alice): {:?} packets",
        block_counters(&mesh)
    );
    mesh.shutdown()
}
