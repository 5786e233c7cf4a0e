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
// internet ns `…i` (11.0.0.2/24) ── wan0 │ router ns `…r` │ lan0 ── eth0 (192.168.77.2/24) host ns `…h`
//                                  11.0.0.1/24       192.168.77.1/24, default route via .1
//
// The router masquerades on wan0 and runs miniupnpd (UPnP-IGD, NAT-PMP and PCP) or a fake
// NAT-PMP responder; the mapper runs on a thread moved into the host namespace. All traffic
// stays inside the namespaces the test created, which are deleted (and every process the
// test started is stopped) by `Lab`'s Drop, also when an assertion fails.

/// The port mapped in the namespace tests (the agent's default port).
const LAB_PORT: u16 = 41641;
/// The router's WAN address: miniupnpd refuses to map behind a private/reserved one.
const LAB_WAN: Ipv4Addr = Ipv4Addr::new(11, 0, 0, 1);
/// The "internet" end of the router's WAN link.
const LAB_INTERNET: Ipv4Addr = Ipv4Addr::new(11, 0, 0, 2);
/// The router's LAN address (the host's default gateway).
const LAB_GATEWAY: Ipv4Addr = Ipv4Addr::new(192, 168, 77, 1);
/// The host's LAN address.
const LAB_HOST: Ipv4Addr = Ipv4Addr::new(192, 168, 77, 2);

/// The router's nftables: the tables and chains miniupnpd's nftables backend expects
/// (table `inet filter`, chains `miniupnpd`, `prerouting_miniupnpd`, `postrouting_miniupnpd`),
/// hooked into forward / prerouting / postrouting, plus masquerading on the WAN.
const LAB_NFT: &str = "\
table inet filter {
  chain miniupnpd {
  }
  chain prerouting_miniupnpd {
  }
  chain postrouting_miniupnpd {
  }
  chain forward {
type filter hook forward priority 0; policy accept;
jump miniupnpd
  }
  chain prerouting {
type nat hook prerouting priority -100; policy accept;
jump prerouting_miniupnpd
  }
  chain postrouting {
type nat hook postrouting priority 100; policy accept;
jump postrouting_miniupnpd
oifname \"wan0\" masquerade
  }
}
";

/// Whether this process runs as root.
fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Where miniupnpd is installed, if it is.
fn miniupnpd_path() -> Option<std::path::PathBuf> {
    [
        "/usr/sbin/miniupnpd",
        "/usr/local/sbin/miniupnpd",
        "/sbin/miniupnpd",
    ]
    .into_iter()
    .map(std::path::PathBuf::from)
    .find(|p| p.is_file())
}

/// Runs a command; its stdout, or an error naming it with its stderr.
fn cmd(args: &[&str]) -> Result<String, String> {
    let (prog, rest) = args.split_first().ok_or("empty command")?;
    let out = std::process::Command::new(prog)
        .args(rest)
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|e| format!("{}: {e}", args.join(" ")))?;
    if !out.status.success() {
        return Err(format!(
            "{} failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs `f` on a thread moved into network namespace `name` (via `setns`); a panic in `f`
/// is re-raised here.
fn in_netns<T: Send>(name: &str, f: impl FnOnce() -> T + Send) -> T {
    use std::os::fd::AsRawFd as _;
    let path = format!("/run/netns/{name}");
    let joined = std::thread::scope(|s| {
        s.spawn(move || {
            let ns = std::fs::File::open(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
            // SAFETY: `ns` is an open namespace file; setns only changes this thread's
            // network namespace, and this thread ends with the scope.
            let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns({path}): {}", std::io::Error::last_os_error());
            f()
        })
        .join()
    });
    match joined {
        Ok(v) => v,
        Err(panic) => std::panic::resume_unwind(panic),
    }
}

/// The three namespaces; Drop stops the daemon and deletes them.
struct Lab {
    /// Namespace name prefix, unique per process and test.
    prefix: String,
    /// Namespaces created so far.
    created: Vec<String>,
    /// Scratch directory (daemon config, log, pid and lease files).
    dir: std::path::PathBuf,
    /// The miniupnpd this test started (the child of `ip netns exec`, which execs it).
    daemon: Option<std::process::Child>,
}

impl Lab {
    /// Builds the topology; `tag` keeps concurrent tests apart.
    fn new(tag: &str) -> Result<Lab, String> {
        let prefix = format!("pm{}{tag}", std::process::id());
        let dir = std::env::temp_dir().join(format!("meshvpn-portmap-{prefix}"));
        let mut lab = Lab {
            prefix,
            created: Vec::new(),
            dir,
            daemon: None,
        };
        std::fs::create_dir_all(&lab.dir).map_err(|e| e.to_string())?;
        for role in ["i", "r", "h"] {
            let ns = lab.ns(role);
            cmd(&["ip", "netns", "add", &ns])?;
            lab.created.push(ns);
        }
        let (i, r, h) = (lab.ns("i"), lab.ns("r"), lab.ns("h"));
        let nft = lab.dir.join("router.nft");
        std::fs::write(&nft, LAB_NFT).map_err(|e| e.to_string())?;
        let nft = nft.to_string_lossy().into_owned();
        let wan = format!("{LAB_WAN}/24");
        let internet = format!("{LAB_INTERNET}/24");
        let lan = format!("{LAB_GATEWAY}/24");
        let host = format!("{LAB_HOST}/24");
        let gateway = LAB_GATEWAY.to_string();
        let steps: [&[&str]; 16] = [
            &[
                "ip", "link", "add", "wan0", "netns", &r, "type", "veth", "peer", "name", "i0",
                "netns", &i,
            ],
            &[
                "ip", "link", "add", "lan0", "netns", &r, "type", "veth", "peer", "name", "eth0",
                "netns", &h,
            ],
            &["ip", "-n", &i, "addr", "add", &internet, "dev", "i0"],
            &["ip", "-n", &r, "addr", "add", &wan, "dev", "wan0"],
            &["ip", "-n", &r, "addr", "add", &lan, "dev", "lan0"],
            &["ip", "-n", &h, "addr", "add", &host, "dev", "eth0"],
            &["ip", "-n", &i, "link", "set", "lo", "up"],
            &["ip", "-n", &r, "link", "set", "lo", "up"],
            &["ip", "-n", &h, "link", "set", "lo", "up"],
            &["ip", "-n", &i, "link", "set", "i0", "up"],
            &["ip", "-n", &r, "link", "set", "wan0", "up"],
            &["ip", "-n", &r, "link", "set", "lan0", "up"],
            &["ip", "-n", &h, "link", "set", "eth0", "up"],
            &["ip", "-n", &h, "route", "add", "default", "via", &gateway],
            &[
                "ip",
                "netns",
                "exec",
                &r,
                "sysctl",
                "-qw",
                "net.ipv4.ip_forward=1",
            ],
            &["ip", "netns", "exec", &r, "nft", "-f", &nft],
        ];
        for step in steps {
            cmd(step)?;
        }
        Ok(lab)
    }

    /// The name of namespace `role` ("i", "r" or "h").
    fn ns(&self, role: &str) -> String {
        format!("{}{role}", self.prefix)
    }

    /// The daemon's log so far.
    fn daemon_log(&self) -> String {
        std::fs::read_to_string(self.dir.join("miniupnpd.log")).unwrap_or_default()
    }

    /// Starts miniupnpd in the router (NAT-PMP and PCP always; UPnP-IGD if `upnp`) and
    /// waits (at most 5 s) until it listens.
    fn start_miniupnpd(&mut self, path: &std::path::Path, upnp: bool) -> Result<(), String> {
        let conf = self.dir.join("miniupnpd.conf");
        let text = format!(
            "ext_ifname=wan0\n\
             listening_ip=lan0\n\
             http_port=0\n\
             enable_natpmp=yes\n\
             enable_upnp={}\n\
             secure_mode=yes\n\
             system_uptime=yes\n\
             lease_file={}\n\
             uuid=6d2f8a1e-3c4b-4e5f-9a0b-1c2d3e4f5a6b\n\
             allow 1024-65535 192.168.77.0/24 1024-65535\n\
             deny 0-65535 0.0.0.0/0 0-65535\n",
            if upnp { "yes" } else { "no" },
            self.dir.join("leases").display()
        );
        std::fs::write(&conf, text).map_err(|e| e.to_string())?;
        let log =
            std::fs::File::create(self.dir.join("miniupnpd.log")).map_err(|e| e.to_string())?;
        let log2 = log.try_clone().map_err(|e| e.to_string())?;
        let child = std::process::Command::new("ip")
            .args(["netns", "exec", &self.ns("r")])
            .arg(path)
            .arg("-d")
            .arg("-f")
            .arg(&conf)
            .arg("-P")
            .arg(self.dir.join("miniupnpd.pid"))
            .stdin(std::process::Stdio::null())
            .stdout(log)
            .stderr(log2)
            .spawn()
            .map_err(|e| format!("starting miniupnpd: {e}"))?;
        let log_path = self.dir.join("miniupnpd.log");
        let daemon = self.daemon.insert(child);
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        loop {
            let log = std::fs::read_to_string(&log_path).unwrap_or_default();
            if log.contains("Listening for NAT-PMP/PCP traffic")
                && (!upnp || log.contains("HTTP listening on port"))
            {
                return Ok(());
            }
            if let Ok(Some(status)) = daemon.try_wait() {
                return Err(format!("miniupnpd exited ({status}):\n{log}"));
            }
            if std::time::Instant::now() > deadline {
                return Err(format!("miniupnpd not listening after 5 s:\n{log}"));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The router's nftables ruleset.
    fn router_rules(&self) -> String {
        cmd(&[
            "ip",
            "netns",
            "exec",
            &self.ns("r"),
            "nft",
            "list",
            "ruleset",
        ])
        .unwrap_or_else(|e| format!("<{e}>"))
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if let Some(mut child) = self.daemon.take() {
            if let Ok(pid) = libc::pid_t::try_from(child.id()) {
                // SAFETY: kill on the PID of our own child, not yet reaped.
                unsafe { libc::kill(pid, libc::SIGTERM) };
            }
            let deadline = std::time::Instant::now() + Duration::from_secs(2);
            while matches!(child.try_wait(), Ok(None)) && std::time::Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            if matches!(child.try_wait(), Ok(None)) {
                child.kill().ok();
            }
            child.wait().ok();
        }
        for ns in self.created.drain(..) {
            if let Err(e) = cmd(&["ip", "netns", "del", &ns]) {
                eprintln!("cleanup: {e}");
            }
        }
        std::fs::remove_dir_all(&self.dir).ok();
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
/// datagram from the internet namespace reaches the agent's socket through the mapping and
/// that `mapped_on_router` holds while mapped and not after `shutdown`; then maps, renews and
/// removes once more through the internal functions.
fn map_in_lab(
    lab: &Lab,
    protocol: MapProtocol,
    external: SocketAddr,
    mapped_on_router: &(dyn Fn() -> bool + Sync),
) {
    let internet = lab.ns("i");
    in_netns(&lab.ns("h"), || {
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
            in_netns(&internet, || {
                let s =
                    std::net::UdpSocket::bind((LAB_INTERNET, 0)).expect("bind in the internet ns");
                s.send_to(probe, mapping.external).expect("send the probe");
            });
            let mut buf = [0u8; 64];
            let (n, from) = timeout(Duration::from_secs(3), agent.recv_from(&mut buf))
                .await
                .expect("the probe through the mapping within 3 s")
                .expect("recv");
            assert_eq!(buf.get(..n), Some(&probe[..]));
            assert_eq!(from.ip(), IpAddr::V4(LAB_INTERNET));

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
            assert_eq!(
                route,
                Route {
                    gateway: LAB_GATEWAY,
                    local: LAB_HOST
                }
            );
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
}

/// The UPnP-IGD path against miniupnpd.
#[test]
fn upnp_mapping_through_miniupnpd() {
    miniupnpd_scenario("u", true, MapProtocol::Upnp);
}

/// The PCP path against miniupnpd with UPnP disabled.
#[test]
fn pcp_mapping_through_miniupnpd() {
    miniupnpd_scenario("p", false, MapProtocol::Pcp);
}

/// Maps through miniupnpd in a fresh lab and checks its nftables rules follow the mapping.
fn miniupnpd_scenario(tag: &str, upnp: bool, protocol: MapProtocol) {
    if !is_root() {
        println!("skipping: needs root");
        return;
    }
    let Some(daemon) = miniupnpd_path() else {
        println!("skipping: miniupnpd not installed");
        return;
    };
    init_tracing();
    let mut lab = Lab::new(tag).expect("namespace lab");
    lab.start_miniupnpd(&daemon, upnp).expect("miniupnpd");
    let rule = format!("dport {LAB_PORT} dnat ip to {LAB_HOST}:{LAB_PORT}");
    let mapped = || lab.router_rules().contains(&rule);
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        map_in_lab(
            &lab,
            protocol,
            SocketAddr::new(LAB_WAN.into(), LAB_PORT),
            &mapped,
        );
    }));
    if let Err(panic) = outcome {
        eprintln!(
            "router rules:\n{}\nminiupnpd log:\n{}",
            lab.router_rules(),
            lab.daemon_log()
        );
        std::panic::resume_unwind(panic);
    }
}

/// A NAT-PMP-only gateway: answers PCP with "unsupported version", maps UDP `port` to
/// `port + 1000` for at most an hour, and tells 11.0.0.1 as its address. Records the requests.
fn fake_natpmp(stop: &std::sync::atomic::AtomicBool, seen: &std::sync::Mutex<Vec<Vec<u8>>>) {
    use std::sync::atomic::Ordering;
    let socket =
        std::net::UdpSocket::bind((LAB_GATEWAY, crab_nat::GATEWAY_PORT)).expect("bind 5351");
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
                resp.extend(LAB_WAN.octets());
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
    if !is_root() {
        println!("skipping: needs root");
        return;
    }
    init_tracing();
    let lab = Lab::new("n").expect("namespace lab");
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
    std::thread::scope(|s| {
        let server = s.spawn(|| in_netns(&lab.ns("r"), || fake_natpmp(&stop, &seen)));
        // Let the responder bind before the mapper asks.
        std::thread::sleep(Duration::from_millis(200));
        // Forward the mapped port as the fake gateway promised, so the probe arrives.
        let forward = format!(
            "add rule inet filter prerouting_miniupnpd iifname \"wan0\" udp dport {} dnat ip to {LAB_HOST}:{LAB_PORT}",
            LAB_PORT + 1000
        );
        let outcome = cmd(&["ip", "netns", "exec", &lab.ns("r"), "nft", &forward]).map(|_| {
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                map_in_lab(
                    &lab,
                    MapProtocol::NatPmp,
                    SocketAddr::new(LAB_WAN.into(), LAB_PORT + 1000),
                    &mapped,
                );
            }))
        });
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        server.join().ok();
        match outcome {
            Ok(Ok(())) => {}
            Ok(Err(panic)) => std::panic::resume_unwind(panic),
            Err(e) => panic!("{e}"),
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
    if !is_root() {
        println!("skipping: needs root");
        return;
    }
    init_tracing();
    let lab = Lab::new("s").expect("namespace lab");
    in_netns(&lab.ns("h"), || {
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
}
