//! Port mapper tests: pure helpers, and namespace tests against Debian's miniupnpd (root).
use super::*;

const ROUTES: &str = "\
Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT
eth0\t0000A8C0\t00000000\t0001\t0\t0\t100\t00FFFFFF\t0\t0\t0
wlan0\t00000000\t0101A8C0\t0003\t0\t0\t600\t00000000\t0\t0\t0
eth0\t00000000\t0100A8C0\t0003\t0\t0\t100\t00000000\t0\t0\t0
mesh0\t00000000\t00000000\t0001\t0\t0\t0\t00000000\t0\t0\t0
";

#[test]
#[cfg(target_endian = "little")]
fn picks_lowest_metric_default_route_via_a_gateway() {
    // mesh0's default route has no gateway (a point-to-point device): skipped.
    assert_eq!(
        parse_default_route(ROUTES),
        Some(("eth0".to_owned(), Ipv4Addr::new(192, 168, 0, 1)))
    );
}

#[test]
#[cfg(target_endian = "little")]
fn skips_down_and_non_default_routes() {
    let table = "\
Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT
eth0\t00000000\t0100A8C0\t0002\t0\t0\t0\t00000000\t0\t0\t0
eth0\t0000000A\t0100A8C0\t0003\t0\t0\t0\t000000FF\t0\t0\t0
eth1\t00000000\t014DA8C0\t0003\t0\t0\t5\t00000000\t0\t0\t0
";
    assert_eq!(
        parse_default_route(table),
        Some(("eth1".to_owned(), Ipv4Addr::new(192, 168, 77, 1)))
    );
}

#[test]
fn no_default_route_or_garbage_gives_none() {
    assert_eq!(parse_default_route(""), None);
    assert_eq!(parse_default_route("Iface\tDestination\n"), None);
    let table = "\
Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT
eth0\t0000A8C0\t00000000\t0001\t0\t0\t100\t00FFFFFF\t0\t0\t0
eth0\tzz\t0100A8C0\t0003\t0\t0\t0\t00000000
eth0\t00000000\t0100A8C0\t0003\t0\t0\tbad\t00000000\t0\t0\t0
eth0\t00000000\t0100A8C0\tzz03\t0\t0\t0\t00000000
eth0\t00000000\t0100A8C0\t0003
\t\t
\u{0}\u{ffff}
";
    assert_eq!(parse_default_route(table), None);
}

#[test]
fn protocol_names() {
    assert_eq!(MapProtocol::Upnp.to_string(), "UPnP");
    assert_eq!(MapProtocol::NatPmp.to_string(), "NAT-PMP");
    assert_eq!(MapProtocol::Pcp.to_string(), "PCP");
}

#[test]
fn renewal_at_half_lifetime_within_bounds() {
    assert_eq!(
        renew_delay(Duration::from_secs(7200)),
        Duration::from_secs(3600)
    );
    assert_eq!(
        renew_delay(Duration::from_secs(600)),
        Duration::from_secs(300)
    );
    assert_eq!(renew_delay(Duration::from_secs(10)), MIN_RENEW);
    assert_eq!(
        renew_delay(Duration::from_secs(u64::from(u32::MAX))),
        MAX_RENEW
    );
    assert_eq!(renew_delay(Duration::ZERO), MAX_RENEW);
}

#[test]
fn backoff_doubles_up_to_the_cap() {
    let mut d = RETRY_MIN;
    let mut seen = vec![d];
    for _ in 0..10 {
        d = next_backoff(d);
        seen.push(d);
    }
    assert_eq!(seen[1], Duration::from_secs(10));
    assert_eq!(seen[2], Duration::from_secs(20));
    assert_eq!(*seen.last().unwrap_or(&Duration::ZERO), RETRY_MAX);
    assert!(seen.windows(2).all(|w| w[0] <= w[1]));
}

#[test]
fn a_gateway_without_mappings_is_asked_less_and_less_and_a_new_one_at_once() {
    let route = |g: u8| Route {
        gateway: Ipv4Addr::new(192, 168, g, 1),
        local: Ipv4Addr::new(192, 168, g, 2),
    };
    let at = Instant::now();
    let mut refused = None;
    let mut seen = Vec::new();
    for _ in 0..8 {
        let d = gateway_retry(refused, route(1));
        refused = Some((route(1), at, d));
        seen.push(d.as_secs());
    }
    assert_eq!(seen, [300, 600, 1200, 2400, 3600, 3600, 3600, 3600]);
    assert_eq!(
        gateway_retry(refused, route(2)),
        GATEWAY_RETRY,
        "another gateway"
    );
}

#[test]
fn external_address_checks() {
    assert!(usable_external(Ipv4Addr::new(11, 0, 0, 1).into()).is_ok());
    assert!(usable_external(Ipv4Addr::new(100, 64, 0, 1).into()).is_ok());
    assert!(usable_external(Ipv4Addr::UNSPECIFIED.into()).is_err());
    assert!(usable_external(Ipv4Addr::LOCALHOST.into()).is_err());
    assert!(usable_external(Ipv4Addr::BROADCAST.into()).is_err());
    assert!(usable_external(Ipv4Addr::new(224, 0, 0, 1).into()).is_err());
    assert!(usable_external(
        "2001:db8::1"
            .parse()
            .unwrap_or(IpAddr::V4(Ipv4Addr::LOCALHOST))
    )
    .is_err());
}

#[tokio::test]
async fn port_zero_is_never_mapped_and_shuts_down_at_once() {
    let (mapper, rx) = PortMapper::spawn(0);
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(*rx.borrow(), None);
    let started = std::time::Instant::now();
    mapper.shutdown().await;
    assert!(started.elapsed() < Duration::from_secs(1));
}

// ---- End-to-end, in network namespaces (root only) ----
//
// A lab (meshvpn-lab) with a public host `peer` and a host `h` behind a UPnP router (WAN
// 11.0.<n>.2, a routable-looking address: miniupnpd refuses private ones) that runs miniupnpd
// (UPnP-IGD, NAT-PMP and PCP), or no service at all so that a test can stand in its own
// gateway. The mapper runs on a thread moved into `h`'s namespace. All traffic stays inside the
// lab's namespaces, which the lab deletes (stopping every process it started) when dropped,
// also when an assertion fails.

use meshvpn_lab::{Host, Lab, PortMapService};

/// The port mapped in the namespace tests (the agent's default port).
const LAB_PORT: u16 = 41641;

/// The lab of one test: `host` behind its UPnP router, `peer` on the internet.
struct Site {
    lab: Lab,
    host: Host,
    peer: Host,
}

impl Site {
    /// Builds the lab `tag` with `service` on the router; `None` (after saying why) when the
    /// test cannot run here.
    fn new(tag: &str, service: PortMapService) -> Option<Site> {
        if !meshvpn_lab::is_root() {
            println!("skipping: needs root");
            return None;
        }
        if !service.available() {
            println!(
                "skipping: miniupnpd not installed (apt-get install miniupnpd miniupnpd-nftables)"
            );
            return None;
        }
        init_tracing();
        let mut lab = Lab::new(tag).expect("namespace lab");
        let peer = lab.add_public_host("peer").expect("the internet host");
        let host = lab
            .add_upnp_host("h", service)
            .expect("the host behind the UPnP router");
        Some(Site { lab, host, peer })
    }

    /// The router in front of the host.
    fn router(&self) -> &str {
        self.host
            .router_ns
            .as_deref()
            .expect("a UPnP host has a router")
    }

    /// The host's default gateway (the router's LAN address).
    fn gateway(&self) -> Ipv4Addr {
        self.host.gateway.expect("a UPnP host has a gateway")
    }

    /// The router's nftables ruleset.
    fn router_rules(&self) -> String {
        self.lab
            .ruleset(self.router())
            .unwrap_or_else(|e| format!("<{e:#}>"))
    }
}

/// Logs of the mapper on the test's output (shown for failing tests).
fn init_tracing() {
    tracing_subscriber::fmt()
        .with_env_filter("meshvpn=debug")
        .with_test_writer()
        .try_init()
        .ok();
}

/// In the host namespace: maps [`LAB_PORT`], expects `protocol` and `external`, checks a
/// datagram from the internet host reaches the agent's socket through the mapping and that
/// `mapped_on_router` holds while mapped and not after `shutdown`; then maps, renews and
/// removes once more through the internal functions.
fn map_in_lab(
    site: &Site,
    protocol: MapProtocol,
    external: SocketAddr,
    mapped_on_router: &(dyn Fn() -> bool + Sync),
) {
    let internet = site
        .lab
        .udp_socket(&site.peer, 0)
        .expect("a socket on the internet host");
    let (gateway, local) = (site.gateway(), site.host.addr);
    let ran = site.lab.in_namespace(&site.host.ns, || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("tokio runtime");
        rt.block_on(async {
            // The agent's socket.
            let agent = tokio::net::UdpSocket::bind((Ipv4Addr::UNSPECIFIED, LAB_PORT))
                .await
                .expect("bind the agent's port");
            let started = std::time::Instant::now();
            let (mapper, mut rx) = PortMapper::spawn(LAB_PORT);
            let mapping = timeout(Duration::from_secs(10), rx.wait_for(Option::is_some))
                .await
                .expect("a mapping within 10 s")
                .map(|m| *m)
                .expect("the mapper is running")
                .expect("wait_for returned a mapping");
            eprintln!("mapped in {:?}: {mapping:?}", started.elapsed());
            assert_eq!(mapping.protocol, protocol);
            assert_eq!(mapping.external, external);
            assert!(
                mapping.lifetime > Duration::ZERO
                    && mapping.lifetime <= Duration::from_secs(u64::from(REQUESTED_LIFETIME_SECS)),
                "{mapping:?}"
            );
            assert!(mapped_on_router(), "the router holds no mapping");

            // A datagram from the internet to the external address reaches the agent.
            let probe = b"meshvpn portmap probe";
            internet
                .send_to(probe, mapping.external)
                .expect("send the probe");
            let mut buf = [0u8; 64];
            let (n, from) = timeout(Duration::from_secs(3), agent.recv_from(&mut buf))
                .await
                .expect("the probe through the mapping within 3 s")
                .expect("recv");
            assert_eq!(buf.get(..n), Some(&probe[..]));
            assert_eq!(from.ip(), IpAddr::V4(site.peer.addr));

            let stopping = std::time::Instant::now();
            mapper.shutdown().await;
            assert!(
                stopping.elapsed() < Duration::from_secs(3),
                "shutdown took {:?}",
                stopping.elapsed()
            );
            assert_eq!(*rx.borrow(), None, "None is published at shutdown");
            assert!(
                !mapped_on_router(),
                "the mapping is still on the router after shutdown"
            );

            // The renewal path, driven directly (leases are too long to wait for).
            let route = default_route().expect("the host's default route");
            assert_eq!(route, Route { gateway, local });
            let port = NonZeroU16::new(LAB_PORT).expect("non-zero port");
            let mut active = map(route, port).await.expect("mapping again");
            assert_eq!(active.mapping.protocol, protocol);
            let renewed = renew(&mut active, port).await.expect("renewal");
            assert_eq!(
                renewed, active.mapping,
                "renewal keeps the mapping as it was"
            );
            assert!(
                mapped_on_router(),
                "the router holds no mapping after renewal"
            );
            remove(active, "test").await;
            assert!(
                !mapped_on_router(),
                "the mapping is still on the router after removal"
            );
        });
    });
    ran.expect("entering the host's namespace");
}

/// The UPnP-IGD path against miniupnpd.
#[test]
fn upnp_mapping_through_miniupnpd() {
    miniupnpd_scenario("pm-upnp", true, MapProtocol::Upnp);
}

/// The PCP path against miniupnpd with UPnP disabled.
#[test]
fn pcp_mapping_through_miniupnpd() {
    miniupnpd_scenario("pm-pcp", false, MapProtocol::Pcp);
}

/// Maps through miniupnpd in a fresh lab and checks its nftables rules follow the mapping.
fn miniupnpd_scenario(tag: &str, igd: bool, protocol: MapProtocol) {
    let Some(site) = Site::new(tag, PortMapService::Miniupnpd { igd }) else {
        return;
    };
    let rule = format!("dport {LAB_PORT} dnat ip to {}:{LAB_PORT}", site.host.addr);
    let mapped = || site.router_rules().contains(&rule);
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        map_in_lab(
            &site,
            protocol,
            SocketAddr::new(site.host.public_addr.into(), LAB_PORT),
            &mapped,
        );
    }));
    if let Err(panic) = outcome {
        eprintln!(
            "router rules:\n{}\nminiupnpd log:\n{}",
            site.router_rules(),
            std::fs::read_to_string(site.lab.miniupnpd_log(&site.host)).unwrap_or_default()
        );
        std::panic::resume_unwind(panic);
    }
}

/// A NAT-PMP-only gateway on `gateway`: answers PCP with "unsupported version", maps UDP
/// `port` to `port + 1000` for at most an hour, and tells `wan` as its address. Records the
/// requests.
fn fake_natpmp(
    gateway: Ipv4Addr,
    wan: Ipv4Addr,
    stop: &std::sync::atomic::AtomicBool,
    seen: &std::sync::Mutex<Vec<Vec<u8>>>,
) {
    use std::sync::atomic::Ordering;
    let socket = std::net::UdpSocket::bind((gateway, crab_nat::GATEWAY_PORT)).expect("bind 5351");
    socket
        .set_read_timeout(Some(Duration::from_millis(50)))
        .expect("read timeout");
    let deadline = std::time::Instant::now() + Duration::from_secs(25);
    let epoch = 1234u32.to_be_bytes();
    let mut buf = [0u8; 1100];
    while !stop.load(Ordering::Relaxed) && std::time::Instant::now() < deadline {
        let Ok((n, from)) = socket.recv_from(&mut buf) else {
            continue;
        };
        let req = buf.get(..n).unwrap_or_default().to_vec();
        let mut resp = Vec::new();
        match req.as_slice() {
            // PCP (version 2): "unsupported version", in NAT-PMP's format.
            [2, op, ..] => resp.extend([0, 0x80 | op, 0, 1]),
            [0, 0] => {
                resp.extend([0, 128, 0, 0]);
                resp.extend(epoch);
                resp.extend(wan.octets());
            }
            [0, 1, 0, 0, i0, i1, _, _, l0, l1, l2, l3] => {
                let internal = u16::from_be_bytes([*i0, *i1]);
                let asked = u32::from_be_bytes([*l0, *l1, *l2, *l3]);
                let (external, lifetime) = if asked == 0 {
                    (0, 0)
                } else {
                    (internal.wrapping_add(1000), asked.min(3600))
                };
                resp.extend([0, 129, 0, 0]);
                resp.extend(epoch);
                resp.extend(internal.to_be_bytes());
                resp.extend(external.to_be_bytes());
                resp.extend(lifetime.to_be_bytes());
            }
            _ => continue,
        }
        if let Ok(mut seen) = seen.lock() {
            seen.push(req);
        }
        socket.send_to(&resp, from).ok();
    }
}

/// The NAT-PMP fallback (PCP refused, no IGD) against a fake NAT-PMP gateway.
#[test]
fn natpmp_fallback_against_a_fake_gateway() {
    let Some(site) = Site::new("pm-natpmp", PortMapService::Silent) else {
        return;
    };
    let stop = std::sync::atomic::AtomicBool::new(false);
    let seen = std::sync::Mutex::new(Vec::<Vec<u8>>::new());
    // Mapped: the last UDP mapping request seen asked for a non-zero lifetime.
    let mapped = || {
        seen.lock()
            .map(|s| {
                s.iter()
                    .rev()
                    .find(|r| r.len() == 12 && r.get(1) == Some(&1))
                    .is_some_and(|r| r.get(8..) != Some(&[0, 0, 0, 0][..]))
            })
            .unwrap_or(false)
    };
    let (gateway, wan) = (site.gateway(), site.host.public_addr);
    std::thread::scope(|s| {
        let server = s.spawn(|| {
            site.lab
                .in_namespace(site.router(), || fake_natpmp(gateway, wan, &stop, &seen))
        });
        // Let the responder bind before the mapper asks.
        std::thread::sleep(Duration::from_millis(200));
        // Forward the mapped port as the fake gateway promised, so the probe arrives.
        let outcome = site
            .lab
            .forward_udp_port(&site.host, LAB_PORT + 1000, LAB_PORT)
            .map(|()| {
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    map_in_lab(
                        &site,
                        MapProtocol::NatPmp,
                        SocketAddr::new(wan.into(), LAB_PORT + 1000),
                        &mapped,
                    );
                }))
            });
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let served = server.join();
        match outcome {
            Ok(Ok(())) => {}
            Ok(Err(panic)) => std::panic::resume_unwind(panic),
            Err(e) => panic!("{e:#}"),
        }
        match served {
            Ok(Ok(())) => {}
            Ok(Err(e)) => panic!("the fake gateway: {e:#}"),
            Err(panic) => std::panic::resume_unwind(panic),
        }
    });
    let seen = seen.lock().map(|s| s.clone()).unwrap_or_default();
    assert!(
        seen.iter().any(|r| r.first() == Some(&2)),
        "PCP was tried first: {seen:?}"
    );
}

/// A gateway that speaks none of the protocols: the attempt fails within its bounds, and a
/// shutdown in the middle of it is prompt.
#[test]
fn silent_gateway_fails_quietly_and_in_bounded_time() {
    let Some(site) = Site::new("pm-silent", PortMapService::Silent) else {
        return;
    };
    let ran = site.lab.in_namespace(&site.host.ns, || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("tokio runtime");
        rt.block_on(async {
            let (mapper, rx) = PortMapper::spawn(LAB_PORT);
            tokio::time::sleep(Duration::from_millis(500)).await;
            assert_eq!(*rx.borrow(), None);
            let stopping = std::time::Instant::now();
            mapper.shutdown().await;
            assert!(
                stopping.elapsed() < Duration::from_secs(1),
                "shutdown took {:?}",
                stopping.elapsed()
            );

            let route = default_route().expect("the host's default route");
            let port = NonZeroU16::new(LAB_PORT).expect("non-zero port");
            let started = std::time::Instant::now();
            let err = match map(route, port).await {
                Ok(active) => panic!("mapped {:?} with no gateway service", active.mapping),
                Err(e) => e,
            };
            eprintln!("failed after {:?}: {err:#}", started.elapsed());
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "took {:?}",
                started.elapsed()
            );
        });
    });
    ran.expect("entering the host's namespace");
}
