//! Data-plane benchmark: throughput, latency, agent CPU and memory, idle traffic and time to
//! first packet of meshvpn against the raw underlay and (when installed) Nebula and
//! wireguard-go, with real processes in the namespace lab.
//!
//! `cargo bench --bench dataplane` (root; needs Debian's `iperf3`; without either it says so
//! and exits 0). `cargo bench` builds the `meshvpn` binary with the release profile. Paths:
//!
//! * **raw**: two public hosts through the internet router, no tunnel (the 100 % line);
//! * **userspace floor**: the same hosts joined by the least a userspace tunnel does (this
//!   binary re-run as a TUN ↔ UDP forwarder in each host, see `floor_forwarder`): no crypto,
//!   no batching, one thread blocked in poll(2). What it adds to a ping is what waking a
//!   process costs here, and no userspace tunnel gets below it.
//!   `MESHVPN_BENCH_FLOOR_SPIN_US=N` makes the forwarders busy-poll for N µs after every
//!   packet before blocking again, to see whether spinning buys latency on this machine;
//! * **meshvpn direct**: two public members, checked to be on a direct path;
//! * **meshvpn relayed**: two members behind [`Nat::Symmetric`], checked to stay on the relay;
//! * **nebula**: two public hosts, no lighthouse (`static_host_map`), a CA from `nebula-cert`,
//!   when `nebula` and `nebula-cert` are installed;
//! * **wireguard-go**: `wireguard-go -f <if>` in both hosts, configured with `wg set` and `ip`,
//!   when `wireguard-go` and `wg` are installed.
//!
//! First it sets up every tunnel at once, each in its own lab, and counts the underlay bytes
//! of one member of each over the same `MESHVPN_BENCH_IDLE_S` idle seconds (default 900; 0
//! skips it), after `MESHVPN_BENCH_IDLE_SETTLE_S` of quiet (default 600, whose bytes are
//! printed as the start-up cost): bytes do not depend on CPU, so the tunnels share the
//! window, and a long window after the start-up sees the sparse timers of an idle day (relay
//! refreshes every 1–2 minutes, idle relayed probe rounds doubling to 30 minutes apart)
//! rather than the learning and backoff that follow a start. Then every path
//! gets a fresh lab in every run: it reads the agents' RSS,
//! pings (20 at 0.05 s, then 200 back to back), runs `iperf3` with 1 and 4 streams both ways for
//! `MESHVPN_BENCH_SECONDS` (default 5) each while summing both agents' CPU time, pings again
//! during a 1-stream run, and reads the RSS again. `MESHVPN_BENCH_RUNS` (default 3) runs; the
//! tables print medians, then the targets of issue 11 as "target / measured / met?". It
//! asserts nothing about timings: it fails (non-zero exit) only when a tunnel does not come up
//! or a tool fails. Positional arguments (e.g. `-- raw direct`) keep only the paths whose
//! label contains one of them. Agents log at the product's default level unless
//! `MESHVPN_LAB_LOG_LEVEL` says otherwise.

#![allow(clippy::print_stdout, clippy::unwrap_used)]
#![allow(clippy::disallowed_methods)] // a benchmark: real time and real processes
#![cfg_attr(test, allow(dead_code))]

use std::fs;
use std::net::Ipv4Addr;
use std::process::ExitCode;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use meshvpn_lab::{
    self as lab, cpu_seconds, machine_busy_seconds, rss_kb, wait_until, which, Host, Iperf3Test,
    Lab, Mesh, Nat, PeerPath,
};

const EXE: &str = env!("CARGO_BIN_EXE_meshvpn");
const RELAY_PORT: u16 = 3478;
const IPERF_PORT: u16 = 5201;
/// Pings per RTT figure, and their spacing: a second of samples, enough for a stable average.
const PING_COUNT: u32 = 20;
const PING_INTERVAL: Duration = Duration::from_millis(50);
/// Pings sent back to back (each as soon as the previous reply came): the same path with its
/// code and data still in the caches and no CPU idle between hops, so the difference from the
/// idle figure is what waking from idle costs on this machine rather than the tunnel's work.
const WARM_PING_COUNT: u32 = 200;
/// How long each ping of the first-packet loop waits: the resolution of that figure.
const FIRST_PING_WAIT: Duration = Duration::from_millis(200);
/// From the second member's start to its first echo reply, at most.
const FIRST_PACKET_BOUND: Duration = Duration::from_secs(30);
/// Two public members must show each other on a direct path within this.
const DIRECT_BOUND: Duration = Duration::from_secs(20);
/// Nebula or wireguard-go must answer a ping within this after starting.
const TUNNEL_UP_BOUND: Duration = Duration::from_secs(20);
/// Default quiet time before the idle window (`MESHVPN_BENCH_IDLE_SETTLE_S`), so the window
/// sees the steady state of an idle day rather than what follows a start once: a meshvpn
/// member learns its NAT keepalive from delayed relay answers (a few failed delays, minutes),
/// its idle probe rounds back off to 30 minutes, and a port-mapping retry follows 5 minutes
/// after start. The bytes of the settle time are printed too, as the start-up cost.
const IDLE_SETTLE_S: u64 = 600;
/// The underlay interface of every lab host (public or NATed).
const UNDERLAY_IF: &str = "eth0";
const SECONDS_PER_DAY: f64 = 86_400.0;

/// One benchmarked path.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Raw,
    Floor,
    Direct,
    OneThread,
    Relayed,
    Nebula,
    WireguardGo,
}

impl Kind {
    const ALL: [Kind; 7] = [
        Kind::Raw,
        Kind::Floor,
        Kind::Direct,
        Kind::OneThread,
        Kind::Relayed,
        Kind::Nebula,
        Kind::WireguardGo,
    ];

    fn label(self) -> &'static str {
        match self {
            Kind::Raw => "raw underlay",
            Kind::Floor => "userspace floor",
            Kind::Direct => "meshvpn direct",
            Kind::OneThread => "meshvpn 1 thread",
            Kind::Relayed => "meshvpn relayed",
            Kind::Nebula => "nebula",
            Kind::WireguardGo => "wireguard-go",
        }
    }

    /// Why this path cannot run here (a missing tool and how to install it), if so.
    fn missing(self) -> Option<&'static str> {
        let need: &[(&str, &str)] = match self {
            Kind::Raw | Kind::Floor | Kind::Direct | Kind::OneThread | Kind::Relayed => &[],
            Kind::Nebula => &[("nebula", "nebula"), ("nebula-cert", "nebula")],
            Kind::WireguardGo => &[("wireguard-go", "wireguard-go"), ("wg", "wireguard-tools")],
        };
        need.iter()
            .find(|(tool, _)| which(tool).is_none())
            .map(|(_, pkg)| match *pkg {
                "nebula" => "not installed (apt-get install nebula)",
                "wireguard-go" => "not installed (apt-get install wireguard-go)",
                _ => "not installed (apt-get install wireguard-tools)",
            })
    }
}

/// Settings from the environment.
struct Config {
    runs: usize,
    test: Duration,
    idle: Duration,
    settle: Duration,
}

/// The four iperf3 runs of a throughput row, in column order.
const TESTS: [(u32, bool); 4] = [(1, false), (1, true), (4, false), (4, true)];

/// One run's figures on one path (`None`: not measured there).
#[derive(Clone, Debug, Default)]
struct Sample {
    /// Mbit/s of each [`TESTS`] entry.
    mbit: [Option<f64>; 4],
    ping_idle_ms: Option<f64>,
    ping_warm_ms: Option<f64>,
    ping_load_ms: Option<f64>,
    /// Both agents' CPU seconds per Gbit moved during the four throughput runs.
    cpu_per_gbit: Option<f64>,
    /// Cores busy during the four throughput runs: both agents', and the whole machine's
    /// (agents, iperf3 and the kernel's forwarding).
    agent_cores: Option<f64>,
    machine_cores: Option<f64>,
    /// The larger of the two agents' RSS, MB.
    rss_idle_mb: Option<f64>,
    rss_after_mb: Option<f64>,
    idle_bytes_per_day: Option<f64>,
    first_packet_s: Option<f64>,
}

/// A path ready to measure: traffic from `a` to `target` (an address of `b`).
struct Setup {
    holder: Holder,
    a: Host,
    b: Host,
    target: Ipv4Addr,
    /// The tunnel processes of both ends (empty for the raw path).
    agents: Vec<u32>,
    first_packet: Option<Duration>,
}

enum Holder {
    Lab(Lab),
    Mesh(Box<Mesh>),
}

impl Setup {
    fn lab(&self) -> &Lab {
        match &self.holder {
            Holder::Lab(lab) => lab,
            Holder::Mesh(mesh) => &mesh.lab,
        }
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some(FLOOR_ARG) {
        return match floor_forwarder(&args[2..]) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                println!("floor forwarder: {e:#}");
                ExitCode::FAILURE
            }
        };
    }
    if !lab::is_root() {
        println!("dataplane: needs root (it builds network namespaces); skipping");
        return ExitCode::SUCCESS;
    }
    for (tool, package) in [("iperf3", "iperf3"), ("ping", "iputils-ping")] {
        if which(tool).is_none() {
            println!("dataplane: {tool} not installed (apt-get install {package}); skipping");
            return ExitCode::SUCCESS;
        }
    }
    lab::install_signal_handler();
    if std::env::var_os("MESHVPN_LAB_LOG_LEVEL").is_none() {
        // The lab's default for agents is `debug`; measure what users run (the product's
        // default level). Still single-threaded here.
        std::env::set_var("MESHVPN_LAB_LOG_LEVEL", "");
    }
    let cfg = Config {
        runs: env_u64("MESHVPN_BENCH_RUNS", 3).clamp(1, 20) as usize,
        test: Duration::from_secs(env_u64("MESHVPN_BENCH_SECONDS", 5).clamp(1, 60)),
        idle: Duration::from_secs(env_u64("MESHVPN_BENCH_IDLE_S", 900).min(7200)),
        settle: Duration::from_secs(
            env_u64("MESHVPN_BENCH_IDLE_SETTLE_S", IDLE_SETTLE_S).clamp(30, 7200),
        ),
    };
    let filters: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let kinds: Vec<Kind> = Kind::ALL
        .into_iter()
        .filter(|k| filters.is_empty() || filters.iter().any(|f| k.label().contains(f.as_str())))
        .collect();
    let started = Instant::now();
    println!(
        "dataplane: {} run(s) per path, a fresh lab each; iperf3 TCP tests of {:?}; idle window \
         {:?}; meshvpn {}",
        cfg.runs, cfg.test, cfg.idle, EXE
    );
    if !EXE.contains("/release/") {
        println!("  note: meshvpn is not a release build here; run with `cargo bench`");
    }
    println!(
        "  first packet = from starting the second member's agent (the first one registered \
         with the relay) to the first echo reply from its virtual IP, the first member pinging \
         every {FIRST_PING_WAIT:?} once it lists it"
    );

    let mut samples: Vec<(Kind, Vec<Sample>)> = kinds.iter().map(|k| (*k, Vec::new())).collect();
    let mut failed = false;
    let idle = if cfg.idle.is_zero() {
        Vec::new()
    } else {
        match idle_phase(&kinds, &cfg) {
            Ok(idle) => idle,
            Err(e) => {
                failed = true;
                println!("  idle traffic FAILED: {e:#}");
                Vec::new()
            }
        }
    };
    for run in 0..cfg.runs {
        for (kind, got) in samples.iter_mut() {
            if kind.missing().is_some() {
                continue;
            }
            if lab::interrupted() {
                println!("interrupted");
                return ExitCode::FAILURE;
            }
            let t = Instant::now();
            match one_run(*kind, run, &cfg) {
                Ok(s) => {
                    println!(
                        "  run {} {:<16} {:>6} / {:>6} / {:>6} / {:>6} Mbit/s, ping {} / {} ms, \
                         first packet {} ({:.0?})",
                        run + 1,
                        kind.label(),
                        num(s.mbit[0], 0),
                        num(s.mbit[1], 0),
                        num(s.mbit[2], 0),
                        num(s.mbit[3], 0),
                        num(s.ping_idle_ms, 3),
                        num(s.ping_load_ms, 3),
                        s.first_packet_s
                            .map_or_else(|| "-".to_string(), |s| format!("{s:.2}s")),
                        t.elapsed()
                    );
                    got.push(s);
                }
                Err(e) => {
                    failed = true;
                    println!("  run {} {:<16} FAILED: {e:#}", run + 1, kind.label());
                }
            }
        }
    }
    for (kind, per_day) in idle {
        if let Some(first) = samples
            .iter_mut()
            .find(|(k, _)| *k == kind)
            .and_then(|(_, got)| got.first_mut())
        {
            first.idle_bytes_per_day = Some(per_day);
        }
    }
    print_report(&samples, &cfg);
    println!("(total {:.0?})", started.elapsed());
    if failed {
        println!("dataplane: some runs failed (see FAILED above)");
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

fn setup(kind: Kind, tag: &str) -> Result<Setup> {
    match kind {
        Kind::Raw => setup_raw(tag),
        Kind::Floor => setup_floor(tag),
        Kind::Direct => setup_meshvpn(tag, None, EXE.as_ref()),
        Kind::OneThread => setup_meshvpn(tag, None, &one_thread_wrapper()?),
        Kind::Relayed => setup_meshvpn(tag, Some(Nat::Symmetric), EXE.as_ref()),
        Kind::Nebula => setup_nebula(tag),
        Kind::WireguardGo => setup_wireguard_go(tag),
    }
}

fn one_run(kind: Kind, run: usize, cfg: &Config) -> Result<Sample> {
    let tag = format!("dp{run}-{kind:?}").to_lowercase();
    measure(&setup(kind, &tag)?, cfg)
}

/// Idle traffic of every tunnel at once, each in its own lab (bytes do not depend on CPU, so
/// the labs share the window): sets them all up, leaves them alone for `cfg.settle`, then
/// counts one member's underlay bytes (both directions) over `cfg.idle`. Per day, by kind.
fn idle_phase(kinds: &[Kind], cfg: &Config) -> Result<Vec<(Kind, f64)>> {
    let mut setups = Vec::new();
    for &kind in kinds {
        // One data-path thread sends exactly what the default per-CPU threads do while idle.
        if kind == Kind::Raw || kind == Kind::OneThread || kind.missing().is_some() {
            continue;
        }
        let tag = format!("dpi-{kind:?}").to_lowercase();
        setups.push((kind, setup(kind, &tag).with_context(|| kind.label())?));
    }
    println!(
        "  idle: {} tunnel(s) up; {:?} to settle (counted as start-up), then counting for {:?}",
        setups.len(),
        cfg.settle,
        cfg.idle
    );
    let mut start = Vec::new();
    for (_, s) in &setups {
        start.push(s.lab().interface_bytes(&s.a, UNDERLAY_IF)?);
    }
    sleep_bounded(cfg.settle)?;
    let mut before = Vec::new();
    for ((kind, s), start) in setups.iter().zip(start) {
        let now = s.lab().interface_bytes(&s.a, UNDERLAY_IF)?;
        println!(
            "  start-up {:<12} {} B in the first {:?} idle",
            kind.label(),
            now.since(start),
            cfg.settle
        );
        before.push(now);
    }
    let t0 = Instant::now();
    sleep_bounded(cfg.idle)?;
    let secs = t0.elapsed().as_secs_f64();
    let mut out = Vec::new();
    for ((kind, s), before) in setups.iter().zip(before) {
        check_running(s).with_context(|| kind.label())?;
        let bytes = s.lab().interface_bytes(&s.a, UNDERLAY_IF)?.since(before);
        let per_day = bytes as f64 / secs * SECONDS_PER_DAY;
        println!("  idle {:<16} {bytes} B in {secs:.0} s", kind.label());
        out.push((*kind, per_day));
    }
    Ok(out)
}

/// Runs every measurement on a ready path, in the order that keeps each clean: idle RSS
/// before any load, the idle ping before the throughput runs.
fn measure(s: &Setup, cfg: &Config) -> Result<Sample> {
    let lab = s.lab();
    let mut out = Sample {
        first_packet_s: s.first_packet.map(|d| d.as_secs_f64()),
        ..Sample::default()
    };
    let tunnel = !s.agents.is_empty();
    if tunnel {
        check_running(s)?;
        out.rss_idle_mb = Some(max_rss_mb(&s.agents)?);
    }
    out.ping_idle_ms = Some(ping_ms(lab, &s.a, s.target, "idle")?);
    out.ping_warm_ms = Some(ping_ms_at(
        lab,
        &s.a,
        s.target,
        WARM_PING_COUNT,
        Duration::ZERO,
        "back to back",
    )?);

    lab.start_iperf3_server(&s.b, IPERF_PORT)?;
    let cpu_before = agents_cpu(&s.agents)?;
    let (machine_before, wall) = (machine_busy_seconds()?, Instant::now());
    let mut bits = 0.0;
    for (i, (streams, reverse)) in TESTS.into_iter().enumerate() {
        let test = Iperf3Test {
            streams,
            reverse,
            duration: cfg.test,
        };
        let r = lab.iperf3(&s.a, s.target, IPERF_PORT, test)?;
        out.mbit[i] = Some(r.mbit_per_second());
        bits += r.bytes as f64 * 8.0;
    }
    let wall = wall.elapsed().as_secs_f64();
    out.machine_cores = Some((machine_busy_seconds()? - machine_before) / wall);
    if tunnel {
        let cpu = agents_cpu(&s.agents)? - cpu_before;
        out.cpu_per_gbit = (bits > 0.0).then(|| cpu / (bits / 1e9));
        out.agent_cores = Some(cpu / wall);
    }

    // Ping under load: pings start a second into a 1-stream run, once TCP has ramped up.
    let load = Iperf3Test {
        streams: 1,
        reverse: false,
        duration: cfg.test.max(Duration::from_secs(3)),
    };
    let (load_result, ping) = thread::scope(|scope| {
        let iperf = scope.spawn(|| lab.iperf3(&s.a, s.target, IPERF_PORT, load));
        let ping = sleep_bounded(Duration::from_secs(1))
            .and_then(|()| ping_ms(lab, &s.a, s.target, "under load"));
        (iperf.join(), ping)
    });
    match load_result {
        Ok(r) => {
            r?;
        }
        Err(_) => bail!("the iperf3 thread panicked"),
    }
    out.ping_load_ms = Some(ping?);
    if tunnel {
        check_running(s)?;
        out.rss_after_mb = Some(max_rss_mb(&s.agents)?);
    }
    Ok(out)
}

fn setup_raw(tag: &str) -> Result<Setup> {
    let mut lab = Lab::new(tag)?;
    let a = lab.add_public_host("alice")?;
    let b = lab.add_public_host("bob")?;
    ensure!(
        lab.ping(&a, b.addr, 1, Duration::from_secs(2)),
        "raw: alice cannot ping bob's underlay address {}",
        b.addr
    );
    Ok(Setup {
        target: b.addr,
        a,
        b,
        holder: Holder::Lab(lab),
        agents: Vec::new(),
        first_packet: None,
    })
}

/// The argument that makes this binary the floor forwarder (see [`floor_forwarder`]).
const FLOOR_ARG: &str = "--floor-forwarder";
/// How long a floor forwarder runs at most (the lab ends it long before).
const FLOOR_LIFETIME: Duration = Duration::from_secs(3600);
/// The floor forwarders' UDP port.
const FLOOR_PORT: u16 = 51821;

/// The userspace floor: the least any userspace tunnel does, and what it costs in this VM. A
/// TUN device and a UDP socket in one thread blocked in poll(2); every packet read from one
/// is written to the other, one system call each way, no crypto, no batching, no state.
/// Arguments: `IFNAME IPV4 PEER_ADDR:PORT` (a /24 on the TUN; the socket on [`FLOOR_PORT`]).
fn floor_forwarder(args: &[String]) -> Result<()> {
    use std::os::fd::AsRawFd;
    let [name, ip, peer] = args else {
        bail!("usage: {FLOOR_ARG} IFNAME IPV4 PEER_ADDR:PORT");
    };
    let ip: Ipv4Addr = ip.parse().context("the TUN address")?;
    let peer: std::net::SocketAddr = peer.parse().context("the peer's address")?;
    let dev = tun_rs::DeviceBuilder::new()
        .name(name)
        .ipv4(ip, 24, None)
        .mtu(1420)
        .build_sync()
        .context("creating the TUN device")?;
    let udp = std::net::UdpSocket::bind(("0.0.0.0", FLOOR_PORT)).context("binding UDP")?;
    let mut fds = [
        libc::pollfd {
            fd: dev.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
        libc::pollfd {
            fd: udp.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
    ];
    let mut buf = vec![0u8; 65_536];
    let spin = Duration::from_micros(env_u64("MESHVPN_BENCH_FLOOR_SPIN_US", 0));
    let mut last = Instant::now() - spin;
    let until = Instant::now() + FLOOR_LIFETIME;
    while Instant::now() < until {
        let timeout = if last.elapsed() < spin { 0 } else { 1000 };
        // SAFETY: `fds` is a valid array of two pollfd structs for the whole call.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, timeout) };
        if n <= 0 {
            continue;
        }
        last = Instant::now();
        if fds[0].revents & libc::POLLIN != 0 {
            if let Ok(len) = dev.recv(&mut buf) {
                let _ = udp.send_to(&buf[..len], peer);
            }
        }
        if fds[1].revents & libc::POLLIN != 0 {
            if let Ok((len, _)) = udp.recv_from(&mut buf) {
                let _ = dev.send(&buf[..len]);
            }
        }
    }
    Ok(())
}

/// Two public hosts joined by [`floor_forwarder`]s (this binary, re-run in each host).
fn setup_floor(tag: &str) -> Result<Setup> {
    let mut lab = Lab::new(tag)?;
    let a = lab.add_public_host("alice")?;
    let b = lab.add_public_host("bob")?;
    let exe = std::env::current_exe().context("finding this benchmark's binary")?;
    let overlay = [Ipv4Addr::new(10, 96, 0, 1), Ipv4Addr::new(10, 96, 0, 2)];
    let hosts = [&a, &b];
    let mut agents = Vec::new();
    for (i, h) in hosts.iter().enumerate() {
        let ifname = format!("flb{}{}", std::process::id() % 1_000_000, &h.name[..1]);
        let peer = format!("{}:{FLOOR_PORT}", hosts[1 - i].addr);
        let log = lab.dir().join(format!("floor-{}.log", h.name));
        let ip = overlay[i].to_string();
        agents.push(lab.spawn(h, &exe, &[FLOOR_ARG, &ifname, &ip, &peer], &log)?);
    }
    wait_until(
        TUNNEL_UP_BOUND,
        Duration::from_millis(50),
        "the floor forwarders",
        || {
            for pid in &agents {
                ensure!(lab.is_running(*pid), "a floor forwarder exited");
            }
            Ok(lab.ping(&a, overlay[1], 1, Duration::from_millis(200)))
        },
    )?;
    Ok(Setup {
        target: overlay[1],
        a,
        b,
        holder: Holder::Lab(lab),
        agents,
        first_packet: None,
    })
}

/// A script that runs the meshvpn binary with `MESHVPN_PER_CPU=0`: the whole data path in
/// the control loop, one thread (the default before the per-CPU threads), for comparison.
fn one_thread_wrapper() -> Result<std::path::PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let dir = std::env::temp_dir().join(format!("meshvpn-bench-{}", std::process::id()));
    fs::create_dir_all(&dir)?;
    let path = dir.join("meshvpn");
    fs::write(
        &path,
        format!("#!/bin/sh\nexec env MESHVPN_PER_CPU=0 '{EXE}' \"$@\"\n"),
    )?;
    fs::set_permissions(&path, fs::Permissions::from_mode(0o755))?;
    Ok(path)
}

/// Two members, both public (`nat` = `None`: must go direct) or both behind `nat` (must stay
/// relayed); measures the time to first packet on the way.
fn setup_meshvpn(tag: &str, nat: Option<Nat>, exe: &std::path::Path) -> Result<Setup> {
    let mut mesh = Mesh::new(tag, exe, &[("alice", nat), ("bob", nat)], RELAY_PORT)?;
    mesh.create_network("bench", Some("10.93.0.0/16"))?;
    mesh.join("alice")?;
    wait_until(
        Duration::from_secs(20),
        Duration::from_millis(20),
        "alice to register with the relay",
        || Ok(mesh.status("alice")?.relay.registered),
    )?;
    let t0 = Instant::now();
    mesh.join("bob")?;
    let mut ip_b = None;
    wait_until(
        FIRST_PACKET_BOUND,
        Duration::from_millis(10),
        "alice to list bob",
        || {
            ip_b = mesh
                .status("alice")?
                .peer("bob")
                .map(|p| p.virtual_ipv4())
                .transpose()?;
            Ok(ip_b.is_some())
        },
    )?;
    let ip_b = ip_b.context("bob has no virtual IP")?;
    wait_until(
        FIRST_PACKET_BOUND.saturating_sub(t0.elapsed()),
        Duration::from_millis(1),
        &format!("an echo reply from bob ({ip_b})"),
        || Ok(mesh.ping_once("alice", ip_b, FIRST_PING_WAIT)?.is_some()),
    )?;
    let first_packet = t0.elapsed();

    let want_direct = nat.is_none();
    if want_direct {
        wait_until(
            DIRECT_BOUND,
            Duration::from_millis(100),
            "both members to show a direct path",
            || {
                Ok(mesh.path("alice", "bob")? == Some(PeerPath::Direct)
                    && mesh.path("bob", "alice")? == Some(PeerPath::Direct))
            },
        )?;
    } else {
        for (x, y) in [("alice", "bob"), ("bob", "alice")] {
            let path = mesh.path(x, y)?;
            ensure!(
                path == Some(PeerPath::Relay),
                "{x} shows {y} on {path:?}, expected the UDP relay"
            );
        }
    }
    let agents = ["alice", "bob"]
        .iter()
        .map(|n| mesh.member(n)?.pid.context("member not started"))
        .collect::<Result<Vec<u32>>>()?;
    let a = mesh.host("alice")?.clone();
    let b = mesh.host("bob")?.clone();
    Ok(Setup {
        holder: Holder::Mesh(Box::new(mesh)),
        a,
        b,
        target: ip_b,
        agents,
        first_packet: Some(first_packet),
    })
}

/// Nebula between two public hosts without a lighthouse: each knows the other's underlay
/// address from `static_host_map`; certificates from a CA made with `nebula-cert`.
fn setup_nebula(tag: &str) -> Result<Setup> {
    let mut lab = Lab::new(tag)?;
    let a = lab.add_public_host("alice")?;
    let b = lab.add_public_host("bob")?;
    let dir = lab.dir().join("nebula");
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let file = |name: &str| dir.join(name).to_string_lossy().into_owned();
    lab.exec(
        &a,
        &[
            "nebula-cert",
            "ca",
            "-name",
            "meshvpn-bench",
            "-out-crt",
            &file("ca.crt"),
            "-out-key",
            &file("ca.key"),
        ],
    )?;
    let overlay = [Ipv4Addr::new(10, 94, 0, 1), Ipv4Addr::new(10, 94, 0, 2)];
    let hosts = [&a, &b];
    let mut agents = Vec::new();
    for i in 0..2 {
        let (me, peer) = (hosts[i], hosts[1 - i]);
        lab.exec(
            me,
            &[
                "nebula-cert",
                "sign",
                "-name",
                &me.name,
                "-ip",
                &format!("{}/24", overlay[i]),
                "-ca-crt",
                &file("ca.crt"),
                "-ca-key",
                &file("ca.key"),
                "-out-crt",
                &file(&format!("{}.crt", me.name)),
                "-out-key",
                &file(&format!("{}.key", me.name)),
            ],
        )?;
        let config = format!(
            "pki:\n  ca: {ca}\n  cert: {crt}\n  key: {key}\n\
             static_host_map:\n  \"{peer_ip}\": [\"{peer_addr}:4242\"]\n\
             lighthouse:\n  am_lighthouse: false\n  hosts: []\n\
             listen:\n  host: 0.0.0.0\n  port: 4242\n\
             punchy:\n  punch: false\n\
             tun:\n  disabled: false\n  dev: nebula1\n\
             logging:\n  level: info\n\
             firewall:\n  outbound:\n    - port: any\n      proto: any\n      host: any\n\
             \x20 inbound:\n    - port: any\n      proto: any\n      host: any\n",
            ca = file("ca.crt"),
            crt = file(&format!("{}.crt", me.name)),
            key = file(&format!("{}.key", me.name)),
            peer_ip = overlay[1 - i],
            peer_addr = peer.addr,
        );
        let path = dir.join(format!("{}.yml", me.name));
        fs::write(&path, config).with_context(|| format!("writing {}", path.display()))?;
        let log = dir.join(format!("{}.log", me.name));
        let path = path.to_string_lossy().into_owned();
        agents.push(lab.spawn(me, "nebula", &["-config", &path], &log)?);
    }
    wait_tunnel(&lab, &a, overlay[1], &agents, "nebula")?;
    Ok(Setup {
        holder: Holder::Lab(lab),
        a,
        b,
        target: overlay[1],
        agents,
        first_packet: None,
    })
}

/// wireguard-go in the foreground (`-f`, so the lab tracks its PID) in both hosts, keys from
/// `wg genkey`, configured with `wg set` and `ip addr`.
///
/// The interface is not `wg0`: wireguard-go's control socket `/var/run/wireguard/<if>.sock`
/// lives in the shared filesystem, not the namespace, so two instances (or another test's)
/// with one name would take each other's socket. The names carry this process's PID.
fn setup_wireguard_go(tag: &str) -> Result<Setup> {
    let mut lab = Lab::new(tag)?;
    let a = lab.add_public_host("alice")?;
    let b = lab.add_public_host("bob")?;
    let dir = lab.dir().join("wg");
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let file = |name: &str| dir.join(name).to_string_lossy().into_owned();
    let hosts = [&a, &b];
    let overlay = [Ipv4Addr::new(10, 95, 0, 1), Ipv4Addr::new(10, 95, 0, 2)];
    let ifname = |h: &Host| format!("wgb{}{}", std::process::id() % 1_000_000, &h.name[..1]);
    let mut agents = Vec::new();
    for h in hosts {
        let (key, public) = (
            file(&format!("{}.key", h.name)),
            file(&format!("{}.pub", h.name)),
        );
        lab.exec(
            h,
            &[
                "sh",
                "-c",
                &format!("umask 077 && wg genkey > '{key}' && wg pubkey < '{key}' > '{public}'"),
            ],
        )?;
        let log = dir.join(format!("{}.log", h.name));
        agents.push(lab.spawn(h, "wireguard-go", &["-f", &ifname(h)], &log)?);
    }
    for (i, h) in hosts.iter().enumerate() {
        let pid = agents[i];
        wait_until(
            Duration::from_secs(10),
            Duration::from_millis(20),
            &format!("wireguard-go to create {} in {}", ifname(h), h.name),
            || {
                ensure!(
                    lab.is_running(pid),
                    "wireguard-go exited; see {}",
                    file(&format!("{}.log", h.name))
                );
                Ok(lab.exec(h, &["ip", "link", "show", &ifname(h)]).is_ok())
            },
        )?;
    }
    for i in 0..2 {
        let (me, peer) = (hosts[i], hosts[1 - i]);
        let peer_pub = fs::read_to_string(file(&format!("{}.pub", peer.name)))
            .context("reading a wg public key")?;
        let dev = ifname(me);
        lab.exec(
            me,
            &[
                "wg",
                "set",
                &dev,
                "listen-port",
                "51820",
                "private-key",
                &file(&format!("{}.key", me.name)),
                "peer",
                peer_pub.trim(),
                "endpoint",
                &format!("{}:51820", peer.addr),
                "allowed-ips",
                &format!("{}/32", overlay[1 - i]),
            ],
        )?;
        lab.exec(
            me,
            &[
                "ip",
                "addr",
                "add",
                &format!("{}/24", overlay[i]),
                "dev",
                &dev,
            ],
        )?;
        lab.exec(me, &["ip", "link", "set", &dev, "up"])?;
    }
    wait_tunnel(&lab, &a, overlay[1], &agents, "wireguard-go")?;
    Ok(Setup {
        holder: Holder::Lab(lab),
        a,
        b,
        target: overlay[1],
        agents,
        first_packet: None,
    })
}

/// Waits until `a` gets an echo reply from `target` through a tunnel run by `agents`.
fn wait_tunnel(lab: &Lab, a: &Host, target: Ipv4Addr, agents: &[u32], what: &str) -> Result<()> {
    wait_until(
        TUNNEL_UP_BOUND,
        Duration::from_millis(50),
        &format!("an echo reply from {target} over {what}"),
        || {
            for pid in agents {
                ensure!(
                    lab.is_running(*pid),
                    "{what} (pid {pid}) exited; see {}",
                    lab.dir().display()
                );
            }
            Ok(lab.ping(a, target, 1, Duration::from_secs(1)))
        },
    )?;
    Ok(())
}

fn check_running(s: &Setup) -> Result<()> {
    for pid in &s.agents {
        ensure!(s.lab().is_running(*pid), "tunnel process {pid} exited");
    }
    Ok(())
}

fn agents_cpu(agents: &[u32]) -> Result<f64> {
    agents.iter().map(|pid| cpu_seconds(*pid)).sum()
}

fn max_rss_mb(agents: &[u32]) -> Result<f64> {
    let mut max = 0;
    for pid in agents {
        max = max.max(rss_kb(*pid)?);
    }
    Ok(max as f64 / 1024.0)
}

/// Average RTT of [`PING_COUNT`] pings in ms; fails if none came back.
fn ping_ms(lab: &Lab, from: &Host, to: Ipv4Addr, when: &str) -> Result<f64> {
    ping_ms_at(lab, from, to, PING_COUNT, PING_INTERVAL, when)
}

/// Average RTT of `count` pings `interval` apart in ms; fails if none came back.
fn ping_ms_at(
    lab: &Lab,
    from: &Host,
    to: Ipv4Addr,
    count: u32,
    interval: Duration,
    when: &str,
) -> Result<f64> {
    let p = lab.ping_stats(from, to, count, interval)?;
    match p.avg {
        Some(avg) if p.received > 0 => Ok(avg.as_secs_f64() * 1000.0),
        _ => bail!("ping {when}: no reply from {to} ({} sent)", p.sent),
    }
}

/// Sleeps `d`, waking every 200 ms to give up when interrupted.
fn sleep_bounded(d: Duration) -> Result<()> {
    let end = Instant::now() + d;
    loop {
        ensure!(!lab::interrupted(), "interrupted");
        let now = Instant::now();
        if now >= end {
            return Ok(());
        }
        thread::sleep((end - now).min(Duration::from_millis(200)));
    }
}

// ---- the report ----

fn print_report(samples: &[(Kind, Vec<Sample>)], cfg: &Config) {
    let med = |kind: Kind, f: &dyn Fn(&Sample) -> Option<f64>| -> Option<f64> {
        samples
            .iter()
            .find(|(k, _)| *k == kind)
            .and_then(|(_, v)| median(v.iter().filter_map(f).collect()))
    };
    let rows: Vec<Kind> = samples.iter().map(|(k, _)| *k).collect();
    let raw_mbit = |i: usize| med(Kind::Raw, &|s| s.mbit[i]);
    let not_run = |k: Kind| -> Option<String> {
        if let Some(why) = k.missing() {
            return Some(why.to_string());
        }
        let n = samples
            .iter()
            .find(|(x, _)| *x == k)
            .map_or(0, |(_, v)| v.len());
        (n == 0).then(|| "no successful run".to_string())
    };

    println!();
    println!(
        "Throughput, Mbit/s (% of raw); medians of {} run(s), {:?} iperf3 TCP each; → = alice \
         sends, ← = bob sends (-R)",
        cfg.runs, cfg.test
    );
    println!(
        "{:<17} {:>15} {:>15} {:>15} {:>15}",
        "path", "1 stream →", "1 stream ←", "4 streams →", "4 streams ←"
    );
    for &k in &rows {
        if let Some(why) = not_run(k) {
            println!("{:<17} {why}", k.label());
            continue;
        }
        let cells: Vec<String> = (0..4)
            .map(|i| {
                let v = med(k, &|s| s.mbit[i]);
                match (v, raw_mbit(i)) {
                    (Some(v), Some(raw)) if raw > 0.0 => {
                        format!("{v:.0} ({:.0}%)", v / raw * 100.0)
                    }
                    (v, _) => num(v, 0),
                }
            })
            .collect();
        println!(
            "{:<17} {:>15} {:>15} {:>15} {:>15}",
            k.label(),
            cells[0],
            cells[1],
            cells[2],
            cells[3]
        );
    }

    println!();
    println!(
        "Ping RTT, ms (average of {PING_COUNT} at {PING_INTERVAL:?}); back to back = \
         {WARM_PING_COUNT} pings each sent when the previous reply came (caches warm, no CPU \
         idle between hops); under load = during a 1-stream iperf3 →; overhead = minus raw"
    );
    println!(
        "{:<17} {:>9} {:>10} {:>13} {:>10} {:>11} {:>10}",
        "path", "idle", "overhead", "back to back", "overhead", "under load", "overhead"
    );
    let raw_idle = med(Kind::Raw, &|s| s.ping_idle_ms);
    let raw_warm = med(Kind::Raw, &|s| s.ping_warm_ms);
    let raw_load = med(Kind::Raw, &|s| s.ping_load_ms);
    for &k in &rows {
        if let Some(why) = not_run(k) {
            println!("{:<17} {why}", k.label());
            continue;
        }
        let idle = med(k, &|s| s.ping_idle_ms);
        let warm = med(k, &|s| s.ping_warm_ms);
        let load = med(k, &|s| s.ping_load_ms);
        println!(
            "{:<17} {:>9} {:>10} {:>13} {:>10} {:>11} {:>10}",
            k.label(),
            num(idle, 3),
            signed(diff(idle, raw_idle), 3),
            num(warm, 3),
            signed(diff(warm, raw_warm), 3),
            num(load, 3),
            signed(diff(load, raw_load), 3)
        );
    }

    println!();
    println!(
        "Agents: CPU = both agents' CPU seconds per Gbit moved in the four throughput runs (= cores \
         busy per Gbit/s); cores = cores busy during those runs, both agents / the whole machine \
         ({} cores; at its core count, a tunnel thread more has nowhere to run); RSS = \
         the larger agent's VmRSS; idle = one member's underlay bytes (both directions) over {:?} \
         idle ({:?} after setup), per day",
        thread::available_parallelism().map_or(0, |n| n.get()),
        cfg.idle,
        cfg.settle
    );
    println!(
        "{:<17} {:>12} {:>13} {:>12} {:>13} {:>14} {:>13}",
        "path",
        "CPU s/Gbit",
        "cores",
        "RSS idle MB",
        "RSS after MB",
        "idle per day",
        "first packet"
    );
    for &k in &rows {
        if k == Kind::Raw {
            continue;
        }
        if let Some(why) = not_run(k) {
            println!("{:<17} {why}", k.label());
            continue;
        }
        let cores = format!(
            "{} / {}",
            num(med(k, &|s| s.agent_cores), 2),
            num(med(k, &|s| s.machine_cores), 2)
        );
        println!(
            "{:<17} {:>12} {:>13} {:>12} {:>13} {:>14} {:>13}",
            k.label(),
            num(med(k, &|s| s.cpu_per_gbit), 2),
            cores,
            num(med(k, &|s| s.rss_idle_mb), 1),
            num(med(k, &|s| s.rss_after_mb), 1),
            bytes(med(k, &|s| s.idle_bytes_per_day)),
            med(k, &|s| s.first_packet_s).map_or_else(|| "-".to_string(), |s| format!("{s:.2} s"))
        );
    }

    // Targets of issue 11.
    let direct_1 = med(Kind::Direct, &|s| s.mbit[0]);
    let relayed_1 = med(Kind::Relayed, &|s| s.mbit[0]);
    let vs_nebula = {
        let direct: Vec<Option<f64>> = run_values(samples, Kind::Direct, |s| s.mbit[0]);
        let nebula: Vec<Option<f64>> = run_values(samples, Kind::Nebula, |s| s.mbit[0]);
        median(
            direct
                .iter()
                .zip(&nebula)
                .filter_map(|(d, n)| Some(d.as_ref()? / n.as_ref().filter(|n| **n > 0.0)?))
                .collect(),
        )
    };
    let idle_overhead = diff(med(Kind::Direct, &|s| s.ping_idle_ms), raw_idle);
    let floor_overhead = diff(
        med(Kind::Direct, &|s| s.ping_idle_ms),
        med(Kind::Floor, &|s| s.ping_idle_ms),
    );
    let rss = [Kind::Direct, Kind::Relayed]
        .iter()
        .filter_map(|k| med(*k, &|s| s.rss_idle_mb))
        .reduce(f64::max);
    let ratio = |a: Option<f64>, b: Option<f64>| Some(a? / b.filter(|b| *b > 0.0)?);
    let targets: [(&str, String, Option<f64>, String, bool); 8] = [
        (
            "direct 1 stream vs nebula (same run)",
            "≥ 3.0×".into(),
            vs_nebula,
            vs_nebula.map_or_else(
                || Kind::Nebula.missing().unwrap_or("-").to_string(),
                |v| format!("{v:.2}×"),
            ),
            vs_nebula.is_some_and(|v| v >= 3.0),
        ),
        (
            "direct 1 stream vs raw",
            "≥ 13 %".into(),
            ratio(direct_1, raw_mbit(0)),
            pct(ratio(direct_1, raw_mbit(0))),
            ratio(direct_1, raw_mbit(0)).is_some_and(|v| v >= 0.13),
        ),
        (
            "relayed 1 stream vs direct",
            "≥ 50 %".into(),
            ratio(relayed_1, direct_1),
            pct(ratio(relayed_1, direct_1)),
            ratio(relayed_1, direct_1).is_some_and(|v| v >= 0.5),
        ),
        (
            "ping overhead idle (direct)",
            "≤ 0.100 ms".into(),
            idle_overhead,
            idle_overhead.map_or_else(|| "-".into(), |v| format!("{v:+.3} ms")),
            idle_overhead.is_some_and(|v| v <= 0.1),
        ),
        (
            "  of which over the userspace floor",
            "≤ 0.100 ms".into(),
            floor_overhead,
            floor_overhead.map_or_else(|| "-".into(), |v| format!("{v:+.3} ms")),
            floor_overhead.is_some_and(|v| v <= 0.1),
        ),
        (
            "agent RSS idle (larger agent)",
            "≤ 20 MB".into(),
            rss,
            rss.map_or_else(|| "-".into(), |v| format!("{v:.1} MB")),
            rss.is_some_and(|v| v <= 20.0),
        ),
        (
            "idle member per day (direct)",
            "≤ 1 MB".into(),
            med(Kind::Direct, &|s| s.idle_bytes_per_day),
            bytes(med(Kind::Direct, &|s| s.idle_bytes_per_day)),
            med(Kind::Direct, &|s| s.idle_bytes_per_day).is_some_and(|v| v <= 1e6),
        ),
        (
            "idle member per day (relayed)",
            "≤ 1 MB".into(),
            med(Kind::Relayed, &|s| s.idle_bytes_per_day),
            bytes(med(Kind::Relayed, &|s| s.idle_bytes_per_day)),
            med(Kind::Relayed, &|s| s.idle_bytes_per_day).is_some_and(|v| v <= 1e6),
        ),
    ];
    println!();
    println!("Targets (issue 11)");
    println!("{:<38} {:>11} {:>14}  met?", "target", "target", "measured");
    for (label, target, value, shown, met) in targets {
        let met = match value {
            None => "n/a",
            Some(_) if met => "yes",
            Some(_) => "no",
        };
        println!("{label:<38} {target:>11} {shown:>14}  {met}");
    }
}

/// Per run (in run order) one figure of `kind`, `None` where the run failed to give it.
fn run_values(
    samples: &[(Kind, Vec<Sample>)],
    kind: Kind,
    f: impl Fn(&Sample) -> Option<f64>,
) -> Vec<Option<f64>> {
    samples
        .iter()
        .find(|(k, _)| *k == kind)
        .map(|(_, v)| v.iter().map(f).collect())
        .unwrap_or_default()
}

fn median(mut v: Vec<f64>) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    Some(if v.len() % 2 == 1 {
        v[v.len() / 2]
    } else {
        (v[v.len() / 2 - 1] + v[v.len() / 2]) / 2.0
    })
}

fn diff(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    Some(a? - b?)
}

fn num(v: Option<f64>, decimals: usize) -> String {
    v.map_or_else(|| "-".to_string(), |v| format!("{v:.decimals$}"))
}

fn signed(v: Option<f64>, decimals: usize) -> String {
    v.map_or_else(|| "-".to_string(), |v| format!("{v:+.decimals$}"))
}

fn pct(v: Option<f64>) -> String {
    v.map_or_else(|| "-".to_string(), |v| format!("{:.1} %", v * 100.0))
}

fn bytes(v: Option<f64>) -> String {
    match v {
        None => "-".to_string(),
        Some(b) if b >= 1e6 => format!("{:.1} MB", b / 1e6),
        Some(b) => format!("{:.0} kB", b / 1e3),
    }
}

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(default)
}
