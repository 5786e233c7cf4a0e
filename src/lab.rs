//! A network-namespace lab: a tiny "internet" on one Linux machine, for `meshvpn demo` and the
//! end-to-end tests.
//!
//! A [`Lab`] owns a router namespace (the *internet*, with IPv4 forwarding on) and any number of
//! host namespaces attached to it by veth pairs:
//!
//! * [`Lab::add_public_host`]: a host with a public-looking address from the documentation ranges
//!   (198.51.100.0/24, then 203.0.113.0/24; one /30 per link) and a default route via the
//!   internet router;
//! * [`Lab::add_natted_host`]: a host on a private LAN (192.168.*n*.0/24) behind a router
//!   namespace that masquerades with nftables onto its own public address ([`Nat`] picks the
//!   behaviour).
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
//! The second half of the module drives the `meshvpn` binary inside the lab: a [`Node`] is one
//! `meshvpn` instance (relay or member) with its own config and run directories, and
//! [`Status`] is the parsed form of `meshvpn status --json`.

use std::collections::HashSet;
use std::ffi::{OsStr, OsString};
use std::fs::{self, OpenOptions};
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddrV4};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};

/// Prefix of every namespace a lab creates (`mvl<pid>-<n>-<name>`).
const NS_PREFIX: &str = "mvl";
/// Timeout for one setup command (`ip`, `nft`, ...).
const SETUP_TIMEOUT: Duration = Duration::from_secs(10);
/// Default timeout for [`Lab::exec`].
pub const EXEC_TIMEOUT: Duration = Duration::from_secs(20);
/// How long [`Lab::stop`] waits after SIGTERM/SIGINT before it sends SIGKILL.
pub const STOP_GRACE: Duration = Duration::from_secs(5);
/// How long teardown waits for all processes after SIGTERM before it sends SIGKILL.
const TEARDOWN_GRACE: Duration = Duration::from_secs(3);
/// Lines of each process log printed when a lab is dropped during a panic.
const LOG_TAIL_LINES: usize = 40;

static LAB_COUNTER: AtomicU32 = AtomicU32::new(0);
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_signal: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// Installs SIGINT and SIGTERM handlers that only set the flag read by [`interrupted`].
///
/// After this, Ctrl-C no longer kills the process: every lab wait loop and command notices the
/// flag and fails with "interrupted", and the lab is torn down on the way out (by `Drop`).
pub fn install_signal_handler() {
    // SAFETY: `on_signal` is async-signal-safe (a single atomic store), and `sigaction` is
    // called with a fully initialised struct.
    unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
        libc::sigemptyset(&mut action.sa_mask);
        action.sa_flags = 0;
        libc::sigaction(libc::SIGINT, &action, std::ptr::null_mut());
        libc::sigaction(libc::SIGTERM, &action, std::ptr::null_mut());
    }
}

/// Whether SIGINT/SIGTERM arrived since [`install_signal_handler`].
pub fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}

/// Whether this process runs as root (effective UID 0), which the lab needs.
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// Polls `f` every `poll` until it returns `Ok(true)`, for at most `deadline`.
///
/// Returns the time it took. On timeout the error names `what` and, if `f` failed on its last
/// call, that error too (errors from `f` count as "not yet"). Fails early when [`interrupted`].
pub fn wait_until(
    deadline: Duration,
    poll: Duration,
    what: &str,
    mut f: impl FnMut() -> Result<bool>,
) -> Result<Duration> {
    let start = Instant::now();
    let mut last_err: Option<anyhow::Error>;
    loop {
        if interrupted() {
            bail!("interrupted while waiting for {what}");
        }
        match f() {
            Ok(true) => return Ok(start.elapsed()),
            Ok(false) => last_err = None,
            Err(e) => last_err = Some(e),
        }
        let elapsed = start.elapsed();
        if elapsed >= deadline {
            return Err(match last_err {
                Some(e) => {
                    anyhow!("timed out after {deadline:?} waiting for {what} (last error: {e:#})")
                }
                None => anyhow!("timed out after {deadline:?} waiting for {what}"),
            });
        }
        thread::sleep(poll.min(deadline - elapsed));
    }
}

/// A signal for [`Lab::stop`] and [`Lab::signal`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Signal {
    /// SIGTERM: polite stop.
    Term,
    /// SIGINT: like Ctrl-C.
    Int,
    /// SIGKILL: no goodbye.
    Kill,
}

impl Signal {
    fn number(self) -> libc::c_int {
        match self {
            Signal::Term => libc::SIGTERM,
            Signal::Int => libc::SIGINT,
            Signal::Kill => libc::SIGKILL,
        }
    }
}

/// How the router in front of a [`Lab::add_natted_host`] host translates addresses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Nat {
    /// A typical home router: port-preserving masquerade (endpoint-independent mapping in
    /// practice) and stateful filtering (only replies to outgoing flows come in; unsolicited
    /// packets to the router's WAN address are dropped, pings excepted).
    HomeRouter,
    /// A symmetric NAT: every new flow gets a random public port (endpoint-dependent mapping)
    /// and the same stateful filtering.
    Symmetric,
}

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
}

struct Proc {
    pid: u32,
    label: String,
    log: PathBuf,
    child: Child,
    status: Option<ExitStatus>,
}

impl Proc {
    fn poll(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            if let Ok(Some(st)) = self.child.try_wait() {
                self.status = Some(st);
            }
        }
        self.status
    }
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

    /// Adds a host with a public address directly on the internet.
    ///
    /// `name`: 1–15 chars of `a-z`, `0-9`, `-`, unique within the lab. The host's interface is
    /// `eth0`, its default route goes via the internet router.
    pub fn add_public_host(&mut self, name: &str) -> Result<Host> {
        self.check_new_name(name)?;
        let ns = format!("{}-{name}", self.prefix);
        self.add_namespace(&ns)?;
        let (router_ip, host_ip) = self.attach_to_internet(&ns, "eth0")?;
        self.ip(&[
            "-n",
            &ns,
            "route",
            "add",
            "default",
            "via",
            &router_ip.to_string(),
        ])?;
        let host = Host {
            name: name.to_string(),
            ns,
            addr: host_ip,
            public_addr: host_ip,
            router_ns: None,
            nat: None,
        };
        self.hosts.push(host.clone());
        Ok(host)
    }

    /// Adds a host on a private LAN `192.168.<n>.0/24` (host `.2`, router `.1`) behind its own
    /// router namespace `<prefix>-r<name>`, which has a public address on the internet and
    /// masquerades the LAN according to `nat`.
    pub fn add_natted_host(&mut self, name: &str, nat: Nat) -> Result<Host> {
        self.check_new_name(name)?;
        let site = self.next_site;
        if site > 254 {
            bail!("lab: out of LAN subnets");
        }
        self.next_site += 1;
        let router = format!("{}-r{name}", self.prefix);
        let ns = format!("{}-{name}", self.prefix);
        self.add_namespace(&router)?;
        self.add_namespace(&ns)?;
        self.enable_forwarding(&router)?;
        let (inet_ip, wan_ip) = self.attach_to_internet(&router, "wan")?;
        self.ip(&[
            "-n",
            &router,
            "route",
            "add",
            "default",
            "via",
            &inet_ip.to_string(),
        ])?;
        let lan_router = Ipv4Addr::new(192, 168, site as u8, 1);
        let lan_host = Ipv4Addr::new(192, 168, site as u8, 2);
        self.connect(&router, "lan", lan_router, &ns, "eth0", lan_host, 24)?;
        self.ip(&[
            "-n",
            &ns,
            "route",
            "add",
            "default",
            "via",
            &lan_router.to_string(),
        ])?;

        let masquerade = match nat {
            Nat::HomeRouter => "masquerade",
            Nat::Symmetric => "masquerade random",
        };
        let rules = format!(
            "table ip nat {{\n\
             \tchain postrouting {{\n\
             \t\ttype nat hook postrouting priority srcnat; policy accept;\n\
             \t\toifname \"wan\" {masquerade}\n\
             \t}}\n\
             }}\n\
             table ip filter {{\n\
             \tchain forward {{\n\
             \t\ttype filter hook forward priority filter; policy drop;\n\
             \t\tiifname \"lan\" oifname \"wan\" accept\n\
             \t\tiifname \"wan\" oifname \"lan\" ct state established,related accept\n\
             \t}}\n\
             \tchain input {{\n\
             \t\ttype filter hook input priority filter; policy accept;\n\
             \t\tiifname \"wan\" ct state established,related accept\n\
             \t\tiifname \"wan\" icmp type echo-request accept\n\
             \t\tiifname \"wan\" drop\n\
             \t}}\n\
             }}\n"
        );
        let file = self.dir.join(format!("nat-{name}.nft"));
        fs::write(&file, rules).with_context(|| format!("writing {}", file.display()))?;
        let file = file.to_string_lossy().into_owned();
        run_checked(
            Command::new("ip").args(["netns", "exec", &router, "nft", "-f", &file]),
            SETUP_TIMEOUT,
        )
        .context("loading NAT rules (is nftables installed?)")?;

        let host = Host {
            name: name.to_string(),
            ns,
            addr: lan_host,
            public_addr: wan_ip,
            router_ns: Some(router),
            nat: Some(nat),
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
        let program = program.as_ref();
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
        writeln!(out, "=== lab: starting in {}: {label}", host.ns)?;
        let err = out.try_clone()?;
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &host.ns])
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
            .with_context(|| format!("starting {label} in {}", host.ns))?;
        let pid = child.id();
        self.procs().push(Proc {
            pid,
            label: format!("{} [{}]", label, host.name),
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
        let secs = timeout.as_secs_f64().ceil().max(1.0) as u64;
        let args = [
            "ping".to_string(),
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
        let out = self.exec(host, &["cat", "/proc/net/udp", "/proc/net/udp6"])?;
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

    fn ip(&self, args: &[&str]) -> Result<()> {
        run_checked(Command::new("ip").args(args), SETUP_TIMEOUT)?;
        Ok(())
    }

    /// Connects namespace `ns` (interface `ifname`) to the internet on a fresh /30.
    /// Returns (internet router address, address of `ns`).
    fn attach_to_internet(&mut self, ns: &str, ifname: &str) -> Result<(Ipv4Addr, Ipv4Addr)> {
        let link = self.next_link;
        let base = match link {
            1..=63 => u32::from(Ipv4Addr::new(198, 51, 100, 0)) + 4 * link,
            64..=127 => u32::from(Ipv4Addr::new(203, 0, 113, 0)) + 4 * (link - 64),
            _ => bail!("lab: out of public addresses"),
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

fn send_signal(pid: u32, signal: Signal) -> Result<()> {
    let pid = libc::pid_t::try_from(pid).context("pid out of range")?;
    // SAFETY: kill has no memory-safety preconditions; the pid is a child we have not reaped.
    let rc = unsafe { libc::kill(pid, signal.number()) };
    if rc != 0 {
        let err = std::io::Error::last_os_error();
        if err.raw_os_error() != Some(libc::ESRCH) {
            return Err(err).with_context(|| format!("kill({pid}, {signal:?})"));
        }
    }
    Ok(())
}

fn dump_log_tail(p: &Proc) {
    let text = fs::read_to_string(&p.log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    let from = lines.len().saturating_sub(LOG_TAIL_LINES);
    eprintln!(
        "----- lab: last {} lines of {} (pid {}, {}) -----",
        lines.len() - from,
        p.label,
        p.pid,
        match p.status {
            Some(st) => st.to_string(),
            None => "running".into(),
        }
    );
    for l in &lines[from..] {
        eprintln!("{l}");
    }
}

/// Deletes `mvl<pid>-...` namespaces whose creating process is gone (left by a killed run).
fn remove_stale_namespaces() {
    let Ok(out) = output_timeout(Command::new("ip").args(["netns", "list"]), SETUP_TIMEOUT) else {
        return;
    };
    let text = String::from_utf8_lossy(&out.stdout);
    let mut seen = HashSet::new();
    for ns in text.lines().filter_map(|l| l.split_whitespace().next()) {
        let Some(rest) = ns.strip_prefix(NS_PREFIX) else {
            continue;
        };
        let Some((pid, _)) = rest.split_once('-') else {
            continue;
        };
        if pid.is_empty() || !pid.bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        if Path::new("/proc").join(pid).exists() || !seen.insert(ns.to_string()) {
            continue;
        }
        eprintln!("lab: deleting stale namespace {ns}");
        let _ = output_bounded(
            Command::new("ip").args(["netns", "del", ns]),
            SETUP_TIMEOUT,
            false,
        );
    }
}

fn netns_command<S: AsRef<OsStr>>(ns: &str, args: &[S]) -> Result<Command> {
    if args.is_empty() {
        bail!("lab: empty command");
    }
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", ns]).args(args);
    Ok(cmd)
}

fn describe(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|s| s.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}

/// Runs `cmd` to completion with a timeout (killing it on timeout or interrupt).
fn output_timeout(cmd: &mut Command, timeout: Duration) -> Result<Output> {
    output_bounded(cmd, timeout, true)
}

/// Runs `cmd` with a timeout; `interruptible` also stops it when [`interrupted`] (teardown
/// commands must run even then).
fn output_bounded(cmd: &mut Command, timeout: Duration, interruptible: bool) -> Result<Output> {
    let desc = describe(cmd);
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .with_context(|| format!("cannot run `{desc}`"))?;
    let reader = |pipe: Option<Box<dyn Read + Send>>| {
        thread::spawn(move || {
            let mut buf = Vec::new();
            if let Some(mut pipe) = pipe {
                let _ = pipe.read_to_end(&mut buf);
            }
            buf
        })
    };
    let out = reader(
        child
            .stdout
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    let err = reader(
        child
            .stderr
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    let start = Instant::now();
    let mut pause = Duration::from_millis(1);
    let status = loop {
        if let Some(st) = child
            .try_wait()
            .with_context(|| format!("waiting for `{desc}`"))?
        {
            break st;
        }
        let stop = if interruptible && interrupted() {
            Some("interrupted")
        } else if start.elapsed() >= timeout {
            Some("timed out")
        } else {
            None
        };
        if let Some(why) = stop {
            let _ = child.kill();
            let _ = child.wait();
            bail!("`{desc}` {why} after {:.1?}", start.elapsed());
        }
        thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(50));
    };
    let stdout = out.join().unwrap_or_default();
    let stderr = err.join().unwrap_or_default();
    Ok(Output {
        status,
        stdout,
        stderr,
    })
}

/// Like [`output_timeout`], failing on a non-zero exit with the stderr in the error.
fn run_checked(cmd: &mut Command, timeout: Duration) -> Result<Output> {
    let out = output_timeout(cmd, timeout)?;
    if !out.status.success() {
        bail!(
            "`{}` failed ({}): {}",
            describe(cmd),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(out)
}

// ---------------------------------------------------------------------------------------------
// Driving meshvpn inside the lab
// ---------------------------------------------------------------------------------------------

/// One `meshvpn` instance (a relay or a member) living on a lab [`Host`], with its own config
/// and run directories under the lab's scratch directory.
///
/// Every command is run as `<exe> --config-dir <config_dir> --run-dir <run_dir> [--log-level
/// <level>] <args>` inside the host's namespace. The log level comes from the environment
/// variable `MESHVPN_LAB_LOG_LEVEL` (default `debug`; empty to pass none).
#[derive(Clone, Debug)]
pub struct Node {
    /// A label for messages and the log file name (e.g. `alice`, `relay`).
    pub name: String,
    /// Where it runs.
    pub host: Host,
    /// The meshvpn binary.
    pub exe: PathBuf,
    /// Its `--config-dir`.
    pub config_dir: PathBuf,
    /// Its `--run-dir`.
    pub run_dir: PathBuf,
    /// The log of its long-running process (relay or agent); appended to on every start.
    pub log: PathBuf,
    /// PID of its long-running process, if started.
    pub pid: Option<u32>,
}

impl Node {
    /// Prepares a node called `name` on `host`; creates `<lab dir>/<name>/{config,run}`.
    pub fn new(lab: &Lab, exe: &Path, host: &Host, name: &str) -> Result<Node> {
        let base = lab.dir().join(name);
        let config_dir = base.join("config");
        let run_dir = base.join("run");
        for d in [&config_dir, &run_dir] {
            fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
        }
        Ok(Node {
            name: name.to_string(),
            host: host.clone(),
            exe: exe.to_path_buf(),
            config_dir,
            run_dir,
            log: base.join(format!("{name}.log")),
            pid: None,
        })
    }

    /// The full argument list (after the program) for `meshvpn <args>` with this node's dirs.
    pub fn args<S: AsRef<OsStr>>(&self, args: &[S]) -> Vec<OsString> {
        let mut v: Vec<OsString> = vec![
            "--config-dir".into(),
            self.config_dir.clone().into(),
            "--run-dir".into(),
            self.run_dir.clone().into(),
        ];
        let level = std::env::var("MESHVPN_LAB_LOG_LEVEL").unwrap_or_else(|_| "debug".into());
        if !level.is_empty() {
            v.push("--log-level".into());
            v.push(level.into());
        }
        v.extend(args.iter().map(|a| a.as_ref().to_os_string()));
        v
    }

    /// Runs a short `meshvpn <args>` command in the node's namespace; output whatever the exit
    /// status (fails only on timeout / interrupt / spawn failure).
    pub fn run<S: AsRef<OsStr>>(&self, lab: &Lab, args: &[S], timeout: Duration) -> Result<Output> {
        let mut full: Vec<OsString> = vec![self.exe.clone().into()];
        full.extend(self.args(args));
        lab.run(&self.host, &full, timeout)
    }

    /// Like [`run`](Self::run) with [`EXEC_TIMEOUT`], failing on a non-zero exit (error
    /// carries stderr).
    pub fn exec<S: AsRef<OsStr>>(&self, lab: &Lab, args: &[S]) -> Result<Output> {
        let mut full: Vec<OsString> = vec![self.exe.clone().into()];
        full.extend(self.args(args));
        lab.exec(&self.host, &full)
    }

    /// Starts a long-running `meshvpn <args>` (relay, join, up) in the background.
    pub fn spawn<S: AsRef<OsStr>>(&mut self, lab: &Lab, args: &[S]) -> Result<u32> {
        if let Some(pid) = self.pid {
            if lab.is_running(pid) {
                bail!("{}: already running as pid {pid}", self.name);
            }
        }
        let pid = lab.spawn(&self.host, &self.exe, &self.args(args), &self.log)?;
        self.pid = Some(pid);
        Ok(pid)
    }

    /// Starts `meshvpn relay --listen 0.0.0.0:<port>` and waits (up to 10 s) until the UDP
    /// port is bound. Returns the relay's address on the internet.
    pub fn start_relay(&mut self, lab: &Lab, port: u16) -> Result<SocketAddrV4> {
        let pid = self.spawn(lab, &["relay", "--listen", &format!("0.0.0.0:{port}")])?;
        wait_until(
            Duration::from_secs(10),
            Duration::from_millis(50),
            "the relay to listen",
            || {
                if !lab.is_running(pid) {
                    bail!(
                        "relay exited early ({:?}); see {}",
                        lab.exit_status(pid),
                        self.log.display()
                    );
                }
                lab.udp_listening(&self.host, port)
            },
        )?;
        Ok(SocketAddrV4::new(self.host.public_addr, port))
    }

    /// `meshvpn create <network> --relay <relay> [--subnet <subnet>]`, retried for up to 10 s
    /// while it fails (the relay may still be starting). Returns the token line.
    pub fn create_token(
        &self,
        lab: &Lab,
        network: &str,
        relay: &str,
        subnet: Option<&str>,
    ) -> Result<String> {
        let mut args = vec!["create", network, "--relay", relay];
        if let Some(s) = subnet {
            args.extend(["--subnet", s]);
        }
        let mut token = String::new();
        wait_until(
            Duration::from_secs(10),
            Duration::from_millis(300),
            "`meshvpn create`",
            || {
                let out = self.run(lab, &args, EXEC_TIMEOUT)?;
                if !out.status.success() {
                    bail!("{}", String::from_utf8_lossy(&out.stderr).trim());
                }
                let text = String::from_utf8_lossy(&out.stdout);
                let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
                match lines.as_slice() {
                    [one] if one.trim().starts_with("mvpn") => {
                        token = one.trim().to_string();
                        Ok(true)
                    }
                    other => bail!("`meshvpn create` printed {other:?}, expected one token line"),
                }
            },
        )?;
        Ok(token)
    }

    /// Starts `meshvpn join <token> --name <name> [extra...]` in the background.
    pub fn join(&mut self, lab: &Lab, token: &str, extra: &[&str]) -> Result<u32> {
        let name = self.name.clone();
        let mut args = vec!["join", token, "--name", &name];
        args.extend_from_slice(extra);
        self.spawn(lab, &args)
    }

    /// Starts `meshvpn up <network>` in the background.
    pub fn up(&mut self, lab: &Lab, network: &str) -> Result<u32> {
        self.spawn(lab, &["up", network])
    }

    /// Stops the long-running process with `signal` (bounded, SIGKILL after [`STOP_GRACE`]).
    pub fn stop(&mut self, lab: &Lab, signal: Signal) -> Result<Option<ExitStatus>> {
        match self.pid.take() {
            Some(pid) => lab.stop(pid, signal).map(Some),
            None => Ok(None),
        }
    }

    /// Whether the long-running process is alive.
    pub fn is_running(&self, lab: &Lab) -> bool {
        self.pid.is_some_and(|pid| lab.is_running(pid))
    }

    /// `meshvpn status <network> --json`, parsed.
    pub fn status(&self, lab: &Lab, network: &str) -> Result<Status> {
        let out = self.exec(lab, &["status", network, "--json"])?;
        Status::parse(&String::from_utf8_lossy(&out.stdout))
            .with_context(|| format!("{}: parsing `meshvpn status --json`", self.name))
    }

    /// `meshvpn status <network>` (the human table).
    pub fn status_table(&self, lab: &Lab, network: &str) -> Result<String> {
        let out = self.exec(lab, &["status", network])?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

/// The parsed output of `meshvpn status --json` (lenient: unknown fields are ignored and kept
/// in `raw`).
#[derive(Clone, Debug)]
pub struct Status {
    /// Network name.
    pub network: String,
    /// This member's virtual IP.
    pub virtual_ip: Ipv4Addr,
    /// This member's public key (base64).
    pub public_key: String,
    /// The other members it knows.
    pub peers: Vec<PeerStatus>,
    /// The whole JSON object.
    pub raw: serde_json::Value,
}

/// One peer in [`Status`].
#[derive(Clone, Debug)]
pub struct PeerStatus {
    /// The peer's node name (empty if it has none).
    pub name: String,
    /// Its public key (base64).
    pub public_key: String,
    /// Its virtual IP.
    pub virtual_ip: Ipv4Addr,
    /// `direct` or `relay`.
    pub path: String,
    /// Its current UDP endpoint (`ip:port`), if known.
    pub endpoint: Option<String>,
    /// Last measured round-trip time.
    pub rtt_ms: Option<f64>,
    /// Seconds since the last WireGuard handshake.
    pub last_handshake_age_s: Option<f64>,
    /// Bytes received from it.
    pub rx_bytes: u64,
    /// Bytes sent to it.
    pub tx_bytes: u64,
}

fn parse_ip(v: &serde_json::Value, what: &str) -> Result<Ipv4Addr> {
    let s = v
        .as_str()
        .ok_or_else(|| anyhow!("{what}: missing or not a string"))?;
    let s = s.split('/').next().unwrap_or(s);
    s.parse()
        .with_context(|| format!("{what}: bad IPv4 address {s:?}"))
}

fn str_field(v: &serde_json::Value, key: &str) -> String {
    v.get(key)
        .and_then(|x| x.as_str())
        .unwrap_or_default()
        .to_string()
}

impl Status {
    /// Parses the JSON printed by `meshvpn status --json`.
    pub fn parse(text: &str) -> Result<Status> {
        let raw: serde_json::Value = serde_json::from_str(text.trim()).context("not JSON")?;
        let peers = raw
            .get("peers")
            .and_then(|p| p.as_array())
            .ok_or_else(|| anyhow!("no \"peers\" array"))?
            .iter()
            .map(|p| {
                Ok(PeerStatus {
                    name: str_field(p, "name"),
                    public_key: str_field(p, "public_key"),
                    virtual_ip: parse_ip(&p["virtual_ip"], "peer virtual_ip")?,
                    path: str_field(p, "path"),
                    endpoint: p
                        .get("endpoint")
                        .and_then(|x| x.as_str())
                        .map(str::to_string),
                    rtt_ms: p.get("rtt_ms").and_then(serde_json::Value::as_f64),
                    last_handshake_age_s: p
                        .get("last_handshake_age_s")
                        .and_then(serde_json::Value::as_f64),
                    rx_bytes: p
                        .get("rx_bytes")
                        .and_then(serde_json::Value::as_u64)
                        .unwrap_or(0),
                    tx_bytes: p
                        .get("tx_bytes")
                        .and_then(serde_json::Value::as_u64)
                        .unwrap_or(0),
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Status {
            network: str_field(&raw, "network"),
            virtual_ip: parse_ip(&raw["virtual_ip"], "virtual_ip")?,
            public_key: str_field(&raw, "public_key"),
            peers,
            raw,
        })
    }

    /// The peer called `name`, if listed.
    pub fn peer(&self, name: &str) -> Option<&PeerStatus> {
        self.peers.iter().find(|p| p.name == name)
    }

    /// The peer with virtual IP `ip`, if listed.
    pub fn peer_by_ip(&self, ip: Ipv4Addr) -> Option<&PeerStatus> {
        self.peers.iter().find(|p| p.virtual_ip == ip)
    }

    /// The peers' names, sorted.
    pub fn peer_names(&self) -> Vec<String> {
        let mut v: Vec<String> = self.peers.iter().map(|p| p.name.clone()).collect();
        v.sort();
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_status_json() -> Result<()> {
        let s = Status::parse(
            r#"{"network":"demo","virtual_ip":"10.1.2.3","public_key":"k","peers":[
                {"name":"bob","public_key":"b","virtual_ip":"10.1.2.4","path":"direct",
                 "endpoint":"198.51.100.6:4000","rtt_ms":0.5,"last_handshake_age_s":3,
                 "rx_bytes":10,"tx_bytes":20},
                {"name":"carol","public_key":"c","virtual_ip":"10.1.2.5/16","path":"relay",
                 "endpoint":null,"rtt_ms":null,"last_handshake_age_s":null,"rx_bytes":0,"tx_bytes":0}]}"#,
        )?;
        assert_eq!(s.virtual_ip, Ipv4Addr::new(10, 1, 2, 3));
        assert_eq!(s.peer_names(), ["bob", "carol"]);
        let carol = s.peer("carol").ok_or_else(|| anyhow!("no carol"))?;
        assert_eq!(carol.virtual_ip, Ipv4Addr::new(10, 1, 2, 5));
        assert_eq!(carol.endpoint, None);
        assert_eq!(
            s.peer_by_ip(Ipv4Addr::new(10, 1, 2, 4)).map(|p| p.rtt_ms),
            Some(Some(0.5))
        );
        Ok(())
    }

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
}
