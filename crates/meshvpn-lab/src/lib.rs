//! A network-namespace lab: a tiny "internet" on one Linux machine, for `meshvpn demo`, the
//! end-to-end tests, the port-mapping tests and the NAT benchmark.
//!
//! A [`Lab`] owns a router namespace (the *internet*, with IPv4 forwarding on) and any number of
//! host namespaces attached to it by veth pairs:
//!
//! * [`Lab::add_public_host`]: a host with a public-looking address from the documentation ranges
//!   (198.51.100.0/24, then 203.0.113.0/24; one /30 per link) and a default route via the
//!   internet router;
//! * [`Lab::add_natted_host`]: a host on a private LAN (192.168.*n*.0/24) behind one or two
//!   router namespaces doing NAT with nftables ([`Nat`] picks the behaviour: home router,
//!   symmetric, full cone, UDP-blocking firewall, carrier-grade NAT in series, or a home router
//!   running `miniupnpd` with UPnP IGD, NAT-PMP and PCP). See [`Nat`] for the rules of each.
//!
//! The internet router only knows its directly connected /30s: it has no route to any LAN or
//! carrier (100.64/10) network, so nothing reaches a NATed host except through its NAT.
//!
//! IPv6 is opt-in: after [`Lab::enable_ipv6`] the internet router also forwards IPv6 and every
//! public host (those added before and after the call) gets a unique-local address
//! `fd6d:<link>::2/64` on its link (the router is `fd6d:<link>::1`, the host's default IPv6
//! route; see [`Host::addr6`]), so public hosts reach each other over IPv6 too. Duplicate
//! address detection is off in those namespaces, so the addresses work at once. NATed hosts
//! and their routers stay IPv4-only.
//!
//! [`Lab::probe_nat`] measures what a NAT really does (mapping and filtering behaviour, after
//! RFC 4787) with plain UDP sockets opened inside the namespaces, and [`Lab::natpmp_map`] asks a
//! UPnP router for a port mapping; the lab's unit tests check every [`Nat`] kind this way.
//! [`Lab::flush_conntrack`] and [`Lab::remap_udp_port`] change NAT state under running flows,
//! and [`Lab::start_ping_run`] records a long ping run with timestamps ([`PingLog`]).
//!
//! Everything is synchronous ([`std::process::Command`]) and bounded: every command runs with a
//! timeout, every wait loop has a deadline, and all of them give up early once
//! [`interrupted`] is set (see [`install_signal_handler`]). Traffic only ever goes to
//! addresses inside namespaces the lab created.
//!
//! Names are unique per process and lab: namespaces are called `mvl<pid>-<n>-<name>` and veth
//! interfaces are created directly inside their namespaces (so their short names never meet in
//! the root namespace). Parallel test runs therefore never collide.
//!
//! Processes started with [`Lab::spawn`] are tracked by PID, get their own process group (a
//! terminal's Ctrl-C does not reach them; the lab stops them in order) and receive SIGTERM if the
//! thread that spawned them dies. Dropping the lab (or [`Lab::teardown`]) stops them
//! (SIGTERM, a bounded wait, then SIGKILL), deletes every namespace it created and removes its
//! scratch directory. When the drop happens during a panic, the tail of every process log is
//! printed to stderr first; set `MESHVPN_LAB_KEEP=1` to keep the scratch directory.
//!
//! The rest drives the `meshvpn` binary inside the lab: a [`Node`] is one `meshvpn` instance
//! (relay or member) with its own config and run directories, [`Status`] (the product's own
//! schema, from the `meshvpn-status` crate) is what `meshvpn status --json` parses into, and a [`Mesh`] is a lab with a relay and some members (the building
//! block of the demo, the NAT end-to-end tests and the benchmark).
//!
//! Submodules: `cmd` (bounded commands and waits, the interrupt flag, signals), `nat` (the NAT routers), `gateway`
//! (port-mapping gateways: [`Lab::add_upnp_host`] with `miniupnpd` or no service), `probe`
//! (sockets and code in namespaces, NAT probing, ping runs), `node` ([`Node`]), `mesh`
//! ([`Mesh`]), `perf` (iperf3, ping statistics, interface byte counters, process CPU and RSS,
//! for the data-plane benchmark).

// A test harness, not protocol code: it waits on real time, and reports progress and log tails.
#![allow(clippy::disallowed_methods, clippy::disallowed_types)]
#![allow(clippy::print_stdout, clippy::print_stderr)]

mod cmd;
mod gateway;
mod mesh;
mod nat;
mod node;
mod perf;
mod probe;
#[cfg(test)]
mod tests;

pub use gateway::PortMapService;
pub use mesh::{Mesh, PairReport};
pub use meshvpn_status::{
    self as status, NatMapping, NetworkStatus, PeerPath, PeerStatus, Status, StatusReport,
};
pub use nat::Nat;
pub use node::{cpu_share, cpu_ticks, relay_counter, Node};
pub use perf::{
    cpu_seconds, machine_busy_seconds, rss_kb, which, InterfaceBytes, Iperf3Result, Iperf3Test,
    PingStats,
};
pub use probe::{Filtering, Mapping, NatBehavior, PingLog, PingRun};

use std::ffi::OsStr;
use std::fs::{self, OpenOptions};
use std::io::Write;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};

pub use cmd::{install_signal_handler, interrupted, is_root, wait_until, Signal};

use cmd::{
    dump_log_tail, netns_command, output_bounded, output_timeout, remove_stale_namespaces,
    run_checked, send_signal, Proc,
};

/// Prefix of every namespace a lab creates (`mvl<pid>-<n>-<name>`).
pub(crate) const NS_PREFIX: &str = "mvl";
/// Timeout for one setup command (`ip`, `nft`, ...).
pub(crate) const SETUP_TIMEOUT: Duration = Duration::from_secs(10);
/// Default timeout for [`Lab::exec`].
pub const EXEC_TIMEOUT: Duration = Duration::from_secs(20);
/// How long [`Lab::stop`] waits after SIGTERM/SIGINT before it sends SIGKILL.
pub const STOP_GRACE: Duration = Duration::from_secs(5);
/// How long teardown waits for all processes after SIGTERM before it sends SIGKILL.
const TEARDOWN_GRACE: Duration = Duration::from_secs(3);
/// Lines of each process log printed when a lab is dropped during a panic.
pub(crate) const LOG_TAIL_LINES: usize = 40;

static LAB_COUNTER: AtomicU32 = AtomicU32::new(0);
/// A host namespace in a [`Lab`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Host {
    /// The short name given to [`Lab::add_public_host`] (e.g. `alice`).
    pub name: String,
    /// The namespace name (for `ip netns exec`).
    pub ns: String,
    /// The host's own address (public for a public host, on the LAN for a NATed one).
    pub addr: Ipv4Addr,
    /// The address the internet sees: `addr` for a public host, the router's WAN address
    /// for a NATed one.
    pub public_addr: Ipv4Addr,
    /// For a NATed host: the router namespace in front of it.
    pub router_ns: Option<String>,
    /// For a NATed host: the kind of NAT.
    pub nat: Option<Nat>,
    /// For a [`Nat::Cgnat`] host: the carrier's router namespace between `router_ns` and the
    /// internet.
    pub carrier_ns: Option<String>,
    /// For a NATed host: its default gateway (the LAN address of `router_ns`).
    pub gateway: Option<Ipv4Addr>,
    /// For a public host once [`Lab::enable_ipv6`] ran: its IPv6 address (`fd6d:<link>::2`,
    /// unique-local, reachable from every other public host with IPv6).
    pub addr6: Option<Ipv6Addr>,
}

/// A set of network namespaces wired into a small internet, plus the processes running in them.
///
/// See the [module documentation](self). Needs root. Dropping it tears everything down.
pub struct Lab {
    prefix: String,
    inet: String,
    dir: PathBuf,
    namespaces: Vec<String>,
    hosts: Vec<Host>,
    procs: Mutex<Vec<Proc>>,
    next_link: u32,
    next_site: u32,
    /// Whether [`Lab::enable_ipv6`] ran.
    ipv6: bool,
    /// The internet link number of each public host, by namespace (for IPv6).
    public_links: Vec<(String, u32)>,
    torn_down: bool,
}

impl Lab {
    /// Creates the internet router namespace and a scratch directory.
    ///
    /// `tag` (letters, digits, `-`; shortened to 16 chars) only labels the scratch directory
    /// `$TMPDIR/mvlab-<pid>-<n>-<tag>`. Fails unless running as root with `ip` available.
    /// Namespaces left behind by earlier labs whose process no longer exists are deleted.
    pub fn new(tag: &str) -> Result<Lab> {
        if !is_root() {
            bail!("the namespace lab needs root");
        }
        run_checked(Command::new("ip").arg("-V"), SETUP_TIMEOUT)
            .context("the namespace lab needs `ip` (iproute2)")?;
        remove_stale_namespaces();

        let pid = std::process::id();
        let n = LAB_COUNTER.fetch_add(1, Ordering::SeqCst);
        let prefix = format!("{NS_PREFIX}{pid}-{n}");
        let tag: String = tag
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' {
                    c
                } else {
                    '-'
                }
            })
            .take(16)
            .collect();
        let dir = std::env::temp_dir().join(format!("mvlab-{pid}-{n}-{tag}"));
        if dir.exists() {
            fs::remove_dir_all(&dir)
                .with_context(|| format!("removing stale {}", dir.display()))?;
        }
        fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;

        let mut lab = Lab {
            inet: format!("{prefix}-inet"),
            prefix,
            dir,
            namespaces: Vec::new(),
            hosts: Vec::new(),
            procs: Mutex::new(Vec::new()),
            next_link: 1,
            next_site: 1,
            ipv6: false,
            public_links: Vec::new(),
            torn_down: false,
        };
        let inet = lab.inet.clone();
        lab.add_namespace(&inet)?;
        lab.enable_forwarding(&inet)?;
        Ok(lab)
    }

    /// The lab's scratch directory (removed on teardown): a good place for logs and configs.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The internet router's namespace name.
    pub fn internet_ns(&self) -> &str {
        &self.inet
    }

    /// All hosts added so far, in order.
    pub fn hosts(&self) -> &[Host] {
        &self.hosts
    }

    /// The host called `name` as it is now (e.g. with the [`Host::addr6`] that
    /// [`enable_ipv6`](Self::enable_ipv6) gave it after it was added).
    pub fn host(&self, name: &str) -> Option<&Host> {
        self.hosts.iter().find(|h| h.name == name)
    }

    /// Whether [`enable_ipv6`](Self::enable_ipv6) ran.
    pub fn ipv6_enabled(&self) -> bool {
        self.ipv6
    }

    /// Turns on IPv6 between public hosts: IPv6 forwarding in the internet router and an
    /// address `fd6d:<link>::2/64` (router `fd6d:<link>::1`, the default IPv6 route) on every
    /// public host, those already added (updated in [`hosts`](Self::hosts); re-read copies with
    /// [`host`](Self::host)) and those added later. DAD is off (`accept_dad=0`, `nodad`), so the
    /// addresses are usable at once. NATed hosts stay IPv4-only. Idempotent.
    pub fn enable_ipv6(&mut self) -> Result<()> {
        if self.ipv6 {
            return Ok(());
        }
        self.ipv6_sysctls(&self.inet, true, &[])
            .context("enabling IPv6 forwarding in the internet router")?;
        self.ipv6 = true;
        for (ns, link) in self.public_links.clone() {
            let addr6 = self.attach_ipv6(&ns, "eth0", link)?;
            if let Some(h) = self.hosts.iter_mut().find(|h| h.ns == ns) {
                h.addr6 = Some(addr6);
            }
        }
        Ok(())
    }

    /// Adds a host with a public address directly on the internet.
    ///
    /// `name`: 1–15 chars of `a-z`, `0-9`, `-`, unique within the lab. The host's interface is
    /// `eth0`, its default route goes via the internet router.
    pub fn add_public_host(&mut self, name: &str) -> Result<Host> {
        self.check_new_name(name)?;
        let ns = format!("{}-{name}", self.prefix);
        self.add_namespace(&ns)?;
        if self.ipv6 {
            // Before the interface exists, so it never runs DAD.
            self.ipv6_sysctls(&ns, false, &[])?;
        }
        let link = self.next_link;
        let (router_ip, host_ip) = self.attach_to_internet(&ns, "eth0", None)?;
        self.public_links.push((ns.clone(), link));
        self.ip(&[
            "-n",
            &ns,
            "route",
            "add",
            "default",
            "via",
            &router_ip.to_string(),
        ])?;
        let addr6 = if self.ipv6 {
            Some(self.attach_ipv6(&ns, "eth0", link)?)
        } else {
            None
        };
        let host = Host {
            name: name.to_string(),
            ns,
            addr: host_ip,
            public_addr: host_ip,
            router_ns: None,
            nat: None,
            carrier_ns: None,
            gateway: None,
            addr6,
        };
        self.hosts.push(host.clone());
        Ok(host)
    }

    /// Runs `args[0] args[1..]` inside `host` with [`EXEC_TIMEOUT`]; fails on a non-zero exit
    /// (the error carries the command, its status and its stderr).
    pub fn exec<S: AsRef<OsStr>>(&self, host: &Host, args: &[S]) -> Result<Output> {
        self.exec_timeout(host, args, EXEC_TIMEOUT)
    }

    /// Like [`exec`](Self::exec) with an explicit timeout.
    pub fn exec_timeout<S: AsRef<OsStr>>(
        &self,
        host: &Host,
        args: &[S],
        timeout: Duration,
    ) -> Result<Output> {
        let mut cmd = netns_command(&host.ns, args)?;
        run_checked(&mut cmd, timeout)
    }

    /// Runs a command inside `host` and returns its output whatever its exit status; fails only
    /// if it cannot be started, times out or is [`interrupted`].
    pub fn run<S: AsRef<OsStr>>(
        &self,
        host: &Host,
        args: &[S],
        timeout: Duration,
    ) -> Result<Output> {
        let mut cmd = netns_command(&host.ns, args)?;
        output_timeout(&mut cmd, timeout)
    }

    /// Starts a long-running `program args` inside `host`, stdout and stderr appended to `log`.
    ///
    /// Returns its PID (the process is exec'd by `ip netns exec`, so the PID is the program's).
    /// The lab tracks it; see [`stop`](Self::stop), [`is_running`](Self::is_running).
    pub fn spawn<S: AsRef<OsStr>>(
        &self,
        host: &Host,
        program: impl AsRef<OsStr>,
        args: &[S],
        log: &Path,
    ) -> Result<u32> {
        self.spawn_in_ns(&host.ns, &host.name, program.as_ref(), args, log)
    }

    /// [`spawn`](Self::spawn) in any namespace of the lab (e.g. a router's); `who` labels it.
    fn spawn_in_ns<S: AsRef<OsStr>>(
        &self,
        ns: &str,
        who: &str,
        program: &OsStr,
        args: &[S],
        log: &Path,
    ) -> Result<u32> {
        if let Some(parent) = log.parent() {
            fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
        }
        let mut out = OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .with_context(|| format!("opening log {}", log.display()))?;
        let label = std::iter::once(program)
            .chain(args.iter().map(AsRef::as_ref))
            .map(|s| s.to_string_lossy().into_owned())
            .collect::<Vec<_>>()
            .join(" ");
        writeln!(out, "=== lab: starting in {ns}: {label}")?;
        let err = out.try_clone()?;
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", ns])
            .arg(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err);
        // SAFETY: only async-signal-safe syscalls between fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                libc::setpgid(0, 0);
                libc::prctl(
                    libc::PR_SET_PDEATHSIG,
                    libc::SIGTERM as libc::c_ulong,
                    0,
                    0,
                    0,
                );
                Ok(())
            });
        }
        let child = cmd
            .spawn()
            .with_context(|| format!("starting {label} in {ns}"))?;
        let pid = child.id();
        self.procs().push(Proc {
            pid,
            label: format!("{label} [{who}]"),
            log: log.to_path_buf(),
            child,
            status: None,
        });
        Ok(pid)
    }

    /// Whether a process started by [`spawn`](Self::spawn) is still running.
    pub fn is_running(&self, pid: u32) -> bool {
        self.procs()
            .iter_mut()
            .find(|p| p.pid == pid)
            .is_some_and(|p| p.poll().is_none())
    }

    /// The exit status of a spawned process, if it has exited.
    pub fn exit_status(&self, pid: u32) -> Option<ExitStatus> {
        self.procs()
            .iter_mut()
            .find(|p| p.pid == pid)
            .and_then(Proc::poll)
    }

    /// Sends `signal` to a spawned process without waiting.
    pub fn signal(&self, pid: u32, signal: Signal) -> Result<()> {
        let mut procs = self.procs();
        let p = procs
            .iter_mut()
            .find(|p| p.pid == pid)
            .ok_or_else(|| anyhow!("pid {pid} was not started by this lab"))?;
        if p.poll().is_some() {
            return Ok(());
        }
        send_signal(pid, signal)
    }

    /// Sends `signal` to a spawned process and waits for it to exit: up to [`STOP_GRACE`],
    /// then SIGKILL. Returns the exit status.
    pub fn stop(&self, pid: u32, signal: Signal) -> Result<ExitStatus> {
        self.stop_timeout(pid, signal, STOP_GRACE)
    }

    /// Like [`stop`](Self::stop) with an explicit grace period before SIGKILL.
    pub fn stop_timeout(&self, pid: u32, signal: Signal, grace: Duration) -> Result<ExitStatus> {
        let mut procs = self.procs();
        let p = procs
            .iter_mut()
            .find(|p| p.pid == pid)
            .ok_or_else(|| anyhow!("pid {pid} was not started by this lab"))?;
        if let Some(st) = p.poll() {
            return Ok(st);
        }
        send_signal(pid, signal)?;
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if let Some(st) = p.poll() {
                return Ok(st);
            }
            thread::sleep(Duration::from_millis(20));
        }
        send_signal(pid, Signal::Kill)?;
        let st = p
            .child
            .wait()
            .with_context(|| format!("waiting for pid {pid}"))?;
        p.status = Some(st);
        Ok(st)
    }

    /// Waits up to `timeout` for a spawned process to exit on its own.
    pub fn wait_exit(&self, pid: u32, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(st) = self.exit_status(pid) {
                return Some(st);
            }
            if Instant::now() >= deadline || interrupted() {
                return None;
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Pings `to` from `from` (`count` echo requests, `timeout` for each reply, rounded up to
    /// whole seconds); true if any reply came back.
    pub fn ping(&self, from: &Host, to: Ipv4Addr, count: u32, timeout: Duration) -> bool {
        self.ping_ip(from, to.into(), count, timeout)
    }

    /// [`ping`](Self::ping) over IPv6 (`ping -6`), e.g. to another public host's
    /// [`Host::addr6`] after [`enable_ipv6`](Self::enable_ipv6).
    pub fn ping6(&self, from: &Host, to: Ipv6Addr, count: u32, timeout: Duration) -> bool {
        self.ping_ip(from, to.into(), count, timeout)
    }

    fn ping_ip(&self, from: &Host, to: IpAddr, count: u32, timeout: Duration) -> bool {
        let secs = timeout.as_secs_f64().ceil().max(1.0) as u64;
        let args = [
            "ping".to_string(),
            if to.is_ipv6() { "-6" } else { "-4" }.into(),
            "-n".into(),
            "-q".into(),
            "-c".into(),
            count.max(1).to_string(),
            "-i".into(),
            "0.2".into(),
            "-W".into(),
            secs.to_string(),
            to.to_string(),
        ];
        let limit = Duration::from_secs(secs * u64::from(count.max(1)) + 5);
        self.run(from, &args, limit)
            .is_ok_and(|o| o.status.success())
    }

    /// Sends one ping from `from` to `to`, waiting up to `timeout` (whole seconds, at least 1);
    /// returns the round-trip time if a reply came back.
    pub fn ping_rtt(&self, from: &Host, to: Ipv4Addr, timeout: Duration) -> Option<Duration> {
        let secs = timeout.as_secs_f64().ceil().max(1.0) as u64;
        let args = [
            "ping".to_string(),
            "-n".into(),
            "-c".into(),
            "1".into(),
            "-W".into(),
            secs.to_string(),
            to.to_string(),
        ];
        let out = self.run(from, &args, Duration::from_secs(secs + 5)).ok()?;
        if !out.status.success() {
            return None;
        }
        let text = String::from_utf8_lossy(&out.stdout);
        let ms: f64 = text
            .split_whitespace()
            .find_map(|w| w.strip_prefix("time="))?
            .parse()
            .ok()?;
        Some(Duration::from_secs_f64(ms / 1000.0))
    }

    /// Whether some socket in `host` is bound to UDP `port` (reads the namespace's
    /// `/proc/net/udp` and `/proc/net/udp6`).
    pub fn udp_listening(&self, host: &Host, port: u16) -> Result<bool> {
        self.udp_listening_ns(&host.ns, port)
    }

    /// [`udp_listening`](Self::udp_listening) for any namespace of the lab.
    pub fn udp_listening_ns(&self, ns: &str, port: u16) -> Result<bool> {
        let mut cmd = netns_command(ns, &["cat", "/proc/net/udp", "/proc/net/udp6"])?;
        let out = run_checked(&mut cmd, EXEC_TIMEOUT)?;
        let wanted = format!(":{port:04X}");
        Ok(String::from_utf8_lossy(&out.stdout)
            .lines()
            .skip(1)
            .filter_map(|l| l.split_whitespace().nth(1))
            .any(|local| local.ends_with(&wanted)))
    }

    /// Stops every process (SIGTERM, up to 3 s, then SIGKILL), deletes every namespace and
    /// removes the scratch directory. Idempotent; also run by `Drop`.
    pub fn teardown(&mut self) {
        if self.torn_down {
            return;
        }
        self.torn_down = true;
        let panicking = thread::panicking();
        {
            let mut procs = self.procs();
            for p in procs.iter_mut() {
                if p.poll().is_none() {
                    let _ = send_signal(p.pid, Signal::Term);
                }
            }
            let deadline = Instant::now() + TEARDOWN_GRACE;
            while Instant::now() < deadline && procs.iter_mut().any(|p| p.poll().is_none()) {
                thread::sleep(Duration::from_millis(20));
            }
            for p in procs.iter_mut() {
                if p.poll().is_none() {
                    let _ = send_signal(p.pid, Signal::Kill);
                    if let Ok(st) = p.child.wait() {
                        p.status = Some(st);
                    }
                }
            }
            if panicking {
                for p in procs.iter() {
                    dump_log_tail(p);
                }
            }
        }
        for ns in self.namespaces.drain(..).rev() {
            let mut cmd = Command::new("ip");
            cmd.args(["netns", "del", &ns]);
            match output_bounded(&mut cmd, SETUP_TIMEOUT, false) {
                Ok(out) if out.status.success() => {}
                Ok(out) => eprintln!(
                    "lab: could not delete namespace {ns}: {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                ),
                Err(e) => eprintln!("lab: could not delete namespace {ns}: {e:#}"),
            }
        }
        if std::env::var_os("MESHVPN_LAB_KEEP").is_some_and(|v| !v.is_empty() && v != "0") {
            eprintln!("lab: keeping {}", self.dir.display());
        } else {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }

    // ---- internals ----

    fn procs(&self) -> MutexGuard<'_, Vec<Proc>> {
        self.procs.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn check_new_name(&self, name: &str) -> Result<()> {
        let ok = !name.is_empty()
            && name.len() <= 15
            && name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && name != "inet";
        if !ok {
            bail!("lab: bad host name {name:?} (1-15 chars of a-z, 0-9, '-')");
        }
        if self.hosts.iter().any(|h| h.name == name) {
            bail!("lab: host {name:?} already exists");
        }
        Ok(())
    }

    fn add_namespace(&mut self, ns: &str) -> Result<()> {
        run_checked(Command::new("ip").args(["netns", "add", ns]), SETUP_TIMEOUT)?;
        self.namespaces.push(ns.to_string());
        self.ip(&["-n", ns, "link", "set", "lo", "up"])?;
        Ok(())
    }

    fn enable_forwarding(&self, ns: &str) -> Result<()> {
        run_checked(
            Command::new("ip").args([
                "netns",
                "exec",
                ns,
                "sh",
                "-c",
                "echo 1 > /proc/sys/net/ipv4/ip_forward",
            ]),
            SETUP_TIMEOUT,
        )
        .with_context(|| format!("enabling forwarding in {ns}"))?;
        Ok(())
    }

    /// Sets IPv6 sysctls in `ns` by writing `/proc/sys` inside it: duplicate address detection
    /// off (`all`, `default` and each of `ifaces`), and with `forward` IPv6 forwarding on.
    fn ipv6_sysctls(&self, ns: &str, forward: bool, ifaces: &[&str]) -> Result<()> {
        let mut script = String::from("set -e; d=/proc/sys/net/ipv6/conf");
        for conf in ["all", "default"].iter().chain(ifaces) {
            script.push_str(&format!("; echo 0 > $d/{conf}/accept_dad"));
            if forward {
                script.push_str(&format!("; echo 1 > $d/{conf}/forwarding"));
            }
        }
        run_checked(
            Command::new("ip").args(["netns", "exec", ns, "sh", "-c", &script]),
            SETUP_TIMEOUT,
        )
        .with_context(|| format!("setting IPv6 sysctls in {ns}"))?;
        Ok(())
    }

    /// Gives public host namespace `ns` (interface `ifname`, internet link `link`) the address
    /// `fd6d:<link>::2/64`, the internet router `fd6d:<link>::1/64` on its end of the link, and
    /// `ns` a default IPv6 route via the router. Returns the host's address.
    fn attach_ipv6(&self, ns: &str, ifname: &str, link: u32) -> Result<Ipv6Addr> {
        let link16 = u16::try_from(link).context("lab: link number out of range")?;
        let router = Ipv6Addr::new(0xfd6d, link16, 0, 0, 0, 0, 0, 1);
        let host = Ipv6Addr::new(0xfd6d, link16, 0, 0, 0, 0, 0, 2);
        let inet_if = format!("h{link}");
        self.ipv6_sysctls(&self.inet, true, &[&inet_if])?;
        self.ipv6_sysctls(ns, false, &[ifname])?;
        for (ns, ifname, addr) in [(self.inet.as_str(), &*inet_if, router), (ns, ifname, host)] {
            self.ip(&[
                "-n",
                ns,
                "-6",
                "addr",
                "add",
                &format!("{addr}/64"),
                "dev",
                ifname,
                "nodad",
            ])
            .with_context(|| format!("adding {addr} in {ns}"))?;
        }
        self.ip(&[
            "-n",
            ns,
            "-6",
            "route",
            "add",
            "default",
            "via",
            &router.to_string(),
            "dev",
            ifname,
        ])?;
        Ok(host)
    }

    fn ip(&self, args: &[&str]) -> Result<()> {
        run_checked(Command::new("ip").args(args), SETUP_TIMEOUT)?;
        Ok(())
    }

    /// Connects namespace `ns` (interface `ifname`) to the internet on a fresh /30: the next
    /// one from the documentation ranges, or the /30 starting at `fixed` (e.g. a routable-looking
    /// address for a UPnP router). Returns (internet router address, address of `ns`).
    fn attach_to_internet(
        &mut self,
        ns: &str,
        ifname: &str,
        fixed: Option<Ipv4Addr>,
    ) -> Result<(Ipv4Addr, Ipv4Addr)> {
        let link = self.next_link;
        let base = match (fixed, link) {
            (Some(net), _) => u32::from(net) & !3,
            (None, 1..=63) => u32::from(Ipv4Addr::new(198, 51, 100, 0)) + 4 * link,
            (None, 64..=127) => u32::from(Ipv4Addr::new(203, 0, 113, 0)) + 4 * (link - 64),
            (None, _) => bail!("lab: out of public addresses"),
        };
        self.next_link += 1;
        let router = Ipv4Addr::from(base + 1);
        let host = Ipv4Addr::from(base + 2);
        let inet = self.inet.clone();
        self.connect(&inet, &format!("h{link}"), router, ns, ifname, host, 30)?;
        Ok((router, host))
    }

    /// Creates a veth pair between two namespaces (created inside `a_ns`, so the names never
    /// appear in the root namespace), addresses both ends with `/prefix` and brings them up.
    #[allow(clippy::too_many_arguments)]
    fn connect(
        &self,
        a_ns: &str,
        a_if: &str,
        a_addr: Ipv4Addr,
        b_ns: &str,
        b_if: &str,
        b_addr: Ipv4Addr,
        prefix: u8,
    ) -> Result<()> {
        self.ip(&[
            "-n", a_ns, "link", "add", a_if, "type", "veth", "peer", "name", b_if, "netns", b_ns,
        ])?;
        for (ns, ifname, addr) in [(a_ns, a_if, a_addr), (b_ns, b_if, b_addr)] {
            self.ip(&[
                "-n",
                ns,
                "addr",
                "add",
                &format!("{addr}/{prefix}"),
                "dev",
                ifname,
            ])?;
            self.ip(&["-n", ns, "link", "set", ifname, "up"])?;
        }
        Ok(())
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        self.teardown();
    }
}
