//! The lab's own tests: routing, NAT behaviour per [`Nat`] kind, process tracking, teardown.
//! The namespace tests need root and skip otherwise.

#![allow(clippy::unwrap_used, clippy::print_stdout)]

use super::*;
use std::collections::HashSet;
use std::net::SocketAddrV4;
use std::path::Path;
use std::time::Duration;

use anyhow::Context as _;

#[test]
fn wait_until_times_out_with_message() {
    let r = wait_until(
        Duration::from_millis(50),
        Duration::from_millis(10),
        "nothing",
        || Ok(false),
    );
    assert!(r.is_err_and(|e| e.to_string().contains("nothing")));
    let r = wait_until(
        Duration::from_secs(1),
        Duration::from_millis(10),
        "x",
        || Ok(true),
    );
    assert!(r.is_ok());
}

fn namespaces() -> String {
    Command::new("ip")
        .args(["netns", "list"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default()
}

/// Routing between public hosts, masquerading for NATed hosts, process tracking and
/// teardown. Needs root (skips otherwise).
#[test]
fn lab_routes_nats_and_cleans_up() -> Result<()> {
    if !is_root() {
        println!("skipping: needs root");
        return Ok(());
    }
    let mut lab = Lab::new("selftest")?;
    let a = lab.add_public_host("a")?;
    let b = lab.add_public_host("b")?;
    let home = lab.add_natted_host("home", Nat::HomeRouter)?;
    let sym = lab.add_natted_host("sym", Nat::Symmetric)?;
    assert!(
        lab.add_public_host("a").is_err(),
        "duplicate names are refused"
    );
    assert!(lab.add_public_host("Bad_Name").is_err());
    assert_ne!(home.addr, home.public_addr);
    assert!(lab.ping(&a, b.addr, 1, Duration::from_secs(1)));
    assert!(lab.ping(&home, a.addr, 1, Duration::from_secs(1)));
    assert!(lab.ping(&sym, home.public_addr, 1, Duration::from_secs(1)));
    assert!(lab.ping_rtt(&b, a.addr, Duration::from_secs(1)).is_some());
    // Nothing gets through a NAT unsolicited (the router itself answers, like a real one).
    assert!(lab.ping(&a, home.public_addr, 1, Duration::from_secs(1)));
    assert!(!lab.ping(&a, home.addr, 1, Duration::from_secs(1)));

    let log = lab.dir().join("sleep.log");
    let pid = lab.spawn(&a, "sleep", &["30"], &log)?;
    assert!(lab.is_running(pid));
    let st = lab.stop(pid, Signal::Term)?;
    assert!(!st.success(), "sleep was killed by SIGTERM");
    assert!(!lab.is_running(pid));
    let pid2 = lab.spawn(&b, "sleep", &["30"], &log)?;

    let err = lab.exec(&a, &["false"]).err().map(|e| e.to_string());
    assert!(err.is_some_and(|e| e.contains("false")));
    let timed = lab.exec_timeout(&a, &["sleep", "5"], Duration::from_millis(100));
    assert!(timed.is_err_and(|e| e.to_string().contains("timed out")));

    let prefix = lab.prefix.clone();
    let dir = lab.dir().to_path_buf();
    lab.teardown();
    lab.teardown();
    assert!(!Path::new("/proc").join(pid2.to_string()).exists());
    assert!(
        !namespaces().contains(&prefix),
        "namespaces left: {}",
        namespaces()
    );
    assert!(!dir.exists());
    Ok(())
}

/// IPv6 between public hosts: a host added before [`Lab::enable_ipv6`] and one added after
/// both get a usable (not tentative) ULA address at once and ping each other with `ping -6`
/// through the internet router; a NATed host stays IPv4-only. Needs root (skips otherwise).
#[test]
fn lab_ipv6_between_public_hosts() -> Result<()> {
    if !is_root() {
        println!("skipping: needs root");
        return Ok(());
    }
    let mut lab = Lab::new("ipv6")?;
    let a = lab.add_public_host("a")?;
    assert_eq!(a.addr6, None, "IPv6 is opt-in");
    let t = std::time::Instant::now();
    lab.enable_ipv6()?;
    assert!(lab.ipv6_enabled());
    lab.enable_ipv6()?;
    let b = lab.add_public_host("b")?;
    let home = lab.add_natted_host("home", Nat::HomeRouter)?;
    let a = lab.host("a").context("no host a")?.clone();
    let a6 = a.addr6.context("a got no IPv6 address")?;
    let b6 = b.addr6.context("b got no IPv6 address")?;
    assert_eq!(home.addr6, None, "NATed hosts stay IPv4-only");
    assert_ne!(a6, b6);
    assert_eq!(a6.segments()[0], 0xfd6d, "a unique-local address: {a6}");
    for h in [&a, &b] {
        let out = lab.exec(h, &["ip", "-6", "addr", "show", "dev", "eth0"])?;
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            !text.contains("tentative"),
            "{}: addresses still in DAD: {text}",
            h.name
        );
    }
    assert!(
        lab.ping6(&a, b6, 1, Duration::from_secs(2)),
        "a -> b over IPv6"
    );
    assert!(
        lab.ping6(&b, a6, 1, Duration::from_secs(2)),
        "b -> a over IPv6"
    );
    println!(
        "IPv6 {a6} <-> {b6}: set up and pinged both ways in {:.2?}",
        t.elapsed()
    );
    assert!(
        lab.ping(&a, b.addr, 1, Duration::from_secs(1)),
        "IPv4 still works"
    );
    // UDP over IPv6 between dual-stack sockets, and IPv4 into one (as a v4-mapped source).
    let sa = lab.udp_socket6(&a, 0)?;
    let sb = lab.udp_socket6(&b, 0)?;
    sb.set_read_timeout(Some(Duration::from_secs(2)))?;
    let to_b = std::net::SocketAddr::from((b6, sb.local_addr()?.port()));
    let mut buf = [0u8; 16];
    sa.send_to(b"six", to_b)?;
    let (n, from) = sb.recv_from(&mut buf)?;
    assert_eq!((&buf[..n], from.ip()), (&b"six"[..], IpAddr::V6(a6)));
    sa.send_to(b"four", SocketAddrV4::new(b.addr, sb.local_addr()?.port()))?;
    let (n, from) = sb.recv_from(&mut buf)?;
    let mapped = match from.ip() {
        IpAddr::V6(ip) => ip.to_ipv4_mapped(),
        IpAddr::V4(ip) => Some(ip),
    };
    assert_eq!((&buf[..n], mapped), (&b"four"[..], Some(a.addr)));
    assert!(
        !lab.ping6(&home, a6, 1, Duration::from_secs(1)),
        "a NATed host has no IPv6"
    );
    let routes = lab.exec_in_ns(lab.internet_ns(), &["ip", "-6", "route"], SETUP_TIMEOUT)?;
    let routes = String::from_utf8_lossy(&routes.stdout).into_owned();
    assert!(routes.contains("fd6d:"), "router has the links: {routes}");
    Ok(())
}

/// A lab dropped during a panic still stops its processes and deletes its namespaces.
#[test]
fn lab_cleans_up_on_panic() {
    if !is_root() {
        println!("skipping: needs root");
        return;
    }
    let (tx, rx) = std::sync::mpsc::channel();
    let joined = thread::spawn(move || {
        let mut lab = Lab::new("paniccheck").expect("lab");
        let h = lab.add_public_host("h").expect("host");
        let log = lab.dir().join("sleep.log");
        let pid = lab.spawn(&h, "sleep", &["30"], &log).expect("spawn");
        tx.send((lab.prefix.clone(), pid)).expect("send");
        panic!("deliberate panic with a live lab");
    })
    .join();
    assert!(joined.is_err());
    let (prefix, pid) = rx.recv().expect("lab info");
    assert!(!Path::new("/proc").join(pid.to_string()).exists());
    assert!(
        !namespaces().contains(&prefix),
        "namespaces left: {}",
        namespaces()
    );
}

/// A lab with two public servers `a`, `b` and one host behind `nat`, probed with
/// [`Lab::probe_nat`]; checks the probe against [`Nat::expected_mapping`] and
/// [`Nat::expected_filtering`]. `None` when not root.
fn probe_kind(nat: Nat) -> Result<Option<(Lab, [Host; 3], NatBehavior)>> {
    if !is_root() {
        println!("skipping: needs root");
        return Ok(None);
    }
    let mut lab = Lab::new(&format!("probe-{}", nat.label()))?;
    let a = lab.add_public_host("a")?;
    let b = lab.add_public_host("b")?;
    let h = lab.add_natted_host("h", nat)?;
    let seen = lab.probe_nat(&h, &a, &b)?;
    println!("{nat}: {seen}");
    assert_eq!(
        seen.mapping,
        nat.expected_mapping(),
        "{nat} mapping: {seen}"
    );
    assert_eq!(
        seen.filtering,
        nat.expected_filtering(),
        "{nat} filtering: {seen}"
    );
    assert!(seen.tcp, "{nat}: TCP must pass: {seen}");
    assert!(seen.udp_dns, "{nat}: UDP to port 53 must pass: {seen}");
    if seen.udp {
        assert!(
            seen.observed.iter().all(|o| *o.ip() == h.public_addr),
            "{nat}: the servers must see the NAT's public address {}: {seen}",
            h.public_addr
        );
    }
    Ok(Some((lab, [a, b, h], seen)))
}

#[test]
fn public_host_has_no_nat() -> Result<()> {
    if !is_root() {
        return Ok(());
    }
    let mut lab = Lab::new("probe-public")?;
    let a = lab.add_public_host("a")?;
    let b = lab.add_public_host("b")?;
    let c = lab.add_public_host("c")?;
    let seen = lab.probe_nat(&c, &a, &b)?;
    assert_eq!(seen.mapping, Some(Mapping::EndpointIndependent), "{seen}");
    assert_eq!(
        seen.filtering,
        Some(Filtering::EndpointIndependent),
        "{seen}"
    );
    assert_eq!(seen.port_preserved, Some(true), "{seen}");
    Ok(())
}

#[test]
fn nat_home_router_is_eim_apdf_and_port_preserving() -> Result<()> {
    let Some((lab, [a, b, h], seen)) = probe_kind(Nat::HomeRouter)? else {
        return Ok(());
    };
    assert_eq!(seen.port_preserved, Some(true), "{seen}");

    // Flushing conntrack forgets the mappings: an answer to an old flow no longer gets in.
    let c = lab.udp_socket(&h, 0)?;
    let srv = lab.udp_socket(&a, 0)?;
    let srv_addr = SocketAddrV4::new(a.addr, srv.local_addr()?.port());
    c.send_to(b"hello", srv_addr)?;
    srv.set_read_timeout(Some(Duration::from_secs(2)))?;
    let mut buf = [0u8; 64];
    let (_, mapped) = srv.recv_from(&mut buf)?;
    lab.flush_conntrack(&h)?;
    srv.send_to(b"late", mapped)?;
    c.set_read_timeout(Some(Duration::from_millis(400)))?;
    assert!(
        c.recv_from(&mut buf).is_err(),
        "an answer got in after the flush"
    );

    // Remapping moves the LAN port to a new public port (still endpoint-independent).
    let lan_port = c.local_addr()?.port();
    let new_port = if lan_port == 40_000 { 40_001 } else { 40_000 };
    lab.remap_udp_port(&h, lan_port, new_port)?;
    c.send_to(b"again", srv_addr)?;
    let (_, now) = srv.recv_from(&mut buf)?;
    assert_eq!(now.port(), new_port, "remapped source port");
    let other = lab.udp_socket(&b, 0)?;
    other.set_read_timeout(Some(Duration::from_secs(2)))?;
    c.send_to(b"b", SocketAddrV4::new(b.addr, other.local_addr()?.port()))?;
    let (_, at_b) = other.recv_from(&mut buf)?;
    assert_eq!(
        at_b.port(),
        new_port,
        "remapped port is endpoint-independent"
    );
    Ok(())
}

#[test]
fn nat_symmetric_is_edm_apdf() -> Result<()> {
    let Some((_lab, _, seen)) = probe_kind(Nat::Symmetric)? else {
        return Ok(());
    };
    let ports: HashSet<u16> = seen.observed.iter().map(|o| o.port()).collect();
    assert_eq!(ports.len(), 3, "a new port per destination: {seen}");
    Ok(())
}

#[test]
fn nat_full_cone_is_eim_eif() -> Result<()> {
    let Some((_lab, _, seen)) = probe_kind(Nat::FullCone)? else {
        return Ok(());
    };
    assert_eq!(seen.port_preserved, Some(true), "{seen}");
    Ok(())
}

#[test]
fn nat_udp_blocked_passes_only_dns_and_tcp() -> Result<()> {
    let Some((_lab, _, seen)) = probe_kind(Nat::UdpBlocked)? else {
        return Ok(());
    };
    assert!(!seen.udp, "{seen}");
    Ok(())
}

#[test]
fn nat_cgnat_is_two_eim_nats_in_series() -> Result<()> {
    let Some((lab, [_, _, h], seen)) = probe_kind(Nat::Cgnat)? else {
        return Ok(());
    };
    assert_eq!(seen.port_preserved, Some(true), "{seen}");
    let carrier = h.carrier_ns.clone().context("no carrier router")?;
    let home = h.router_ns.clone().context("no home router")?;
    let wan = lab.exec_in_ns(
        &home,
        &["ip", "-4", "-o", "addr", "show", "dev", "wan"],
        SETUP_TIMEOUT,
    )?;
    assert!(
        String::from_utf8_lossy(&wan.stdout).contains("100.64."),
        "home router WAN is on the carrier network"
    );
    assert!(lab.ruleset(&carrier)?.contains("masquerade"));
    let routes = lab.exec_in_ns(lab.internet_ns(), &["ip", "-4", "route"], SETUP_TIMEOUT)?;
    let routes = String::from_utf8_lossy(&routes.stdout);
    assert!(
        !routes.contains("100.64.") && !routes.contains("192.168."),
        "the internet must not route carrier or LAN networks: {routes}"
    );
    Ok(())
}

#[test]
fn nat_upnp_maps_ports_with_natpmp() -> Result<()> {
    let Some((lab, [a, b, h], _seen)) = probe_kind(Nat::Upnp)? else {
        return Ok(());
    };
    assert_eq!(h.public_addr.octets()[..2], [11, 0], "routable-looking WAN");
    // A NAT-PMP mapping admits unsolicited UDP from anyone to the mapped port.
    let sock = lab.udp_socket(&h, 0)?;
    let mapped = lab.natpmp_map(&h, &sock, 120)?;
    assert_eq!(*mapped.ip(), h.public_addr, "NAT-PMP external address");
    let rules = lab.ruleset(h.router_ns.as_deref().context("no router")?)?;
    assert!(
        rules.contains(&format!("dport {}", mapped.port())),
        "miniupnpd put its DNAT rule into the lab's chains: {rules}"
    );
    let mut buf = [0u8; 64];
    sock.set_read_timeout(Some(Duration::from_millis(500)))?;
    for (i, from) in [&a, &b].into_iter().enumerate() {
        let s = lab.udp_socket(from, 0)?;
        let tag = [b'u', b'0' + i as u8];
        let mut got = false;
        for _ in 0..3 {
            s.send_to(&tag, mapped)?;
            if let Ok((n, _)) = sock.recv_from(&mut buf) {
                if buf[..n] == tag {
                    got = true;
                    break;
                }
            }
        }
        assert!(
            got,
            "unsolicited UDP from {} did not reach the mapped port {mapped}",
            from.name
        );
    }
    Ok(())
}

/// A UPnP router site with no mapping service: nothing answers NAT-PMP, a forwarded port lets
/// unsolicited UDP from the internet in (and only that port), and code run in a namespace sees
/// that namespace and re-raises its panics. Needs root (skips otherwise).
#[test]
fn silent_upnp_site_forwards_ports_and_runs_code_inside() -> Result<()> {
    if !is_root() {
        println!("skipping: needs root");
        return Ok(());
    }
    let mut lab = Lab::new("gateway")?;
    let peer = lab.add_public_host("peer")?;
    let h = lab.add_upnp_host("h", PortMapService::Silent)?;
    let router = h.router_ns.clone().context("no router")?;
    assert_eq!(h.nat, Some(Nat::Upnp));
    assert_eq!(h.public_addr.octets()[..2], [11, 0], "routable-looking WAN");
    assert!(
        !lab.udp_listening_ns(&router, gateway::NATPMP_PORT)?,
        "no service answers NAT-PMP"
    );
    assert!(lab.forward_udp_port(&peer, 40_000, 40_000).is_err());

    let forwarded = lab.udp_socket(&h, 40_001)?;
    let closed = lab.udp_socket(&h, 40_002)?;
    for s in [&forwarded, &closed] {
        s.set_read_timeout(Some(Duration::from_millis(300)))?;
    }
    lab.forward_udp_port(&h, 41_001, 40_001)?;
    let from = lab.udp_socket(&peer, 0)?;
    let mut buf = [0u8; 16];
    let mut got = None;
    for _ in 0..3 {
        from.send_to(b"in", (h.public_addr, 41_001))?;
        if let Ok((n, src)) = forwarded.recv_from(&mut buf) {
            got = Some((buf[..n].to_vec(), src));
            break;
        }
    }
    let (data, src) = got.context("forwarded UDP did not arrive")?;
    assert_eq!(data, b"in");
    assert_eq!(src.ip(), IpAddr::V4(peer.addr));
    from.send_to(b"no", (h.public_addr, 40_002))?;
    assert!(
        closed.recv_from(&mut buf).is_err(),
        "an unforwarded port let unsolicited UDP in"
    );

    let routes =
        lab.in_namespace(&h.ns, || fs::read_to_string("/proc/thread-self/net/route"))??;
    let gw = h.gateway.context("no gateway")?;
    assert!(
        routes.contains(&format!("{:08X}", u32::from_le_bytes(gw.octets()))),
        "the host's default route via {gw}: {routes}"
    );
    let panic = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        lab.in_namespace(&h.ns, || panic!("inside {}", h.name))
    }));
    let message = panic
        .err()
        .and_then(|p| p.downcast_ref::<String>().cloned())
        .context("the panic was not re-raised")?;
    assert_eq!(message, "inside h");
    assert!(lab.in_namespace("not-ours", || ()).is_err());
    Ok(())
}
