//! Driving `meshvpn` inside the lab: [`Node`] (one relay or member instance), whose
//! [`Node::status`] parses `meshvpn status --json` (a [`StatusReport`]) into the product's own
//! [`Status`].

use std::ffi::{OsStr, OsString};
use std::fs;
use std::net::SocketAddrV4;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Output};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use meshvpn_status::{NetworkStatus, Status, StatusReport, SCHEMA};

use super::{wait_until, Host, Lab, Signal, EXEC_TIMEOUT};

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

    /// A relay's `meshvpn relay-status --json`, parsed.
    pub fn relay_status(&self, lab: &Lab) -> Result<serde_json::Value> {
        let out = self.exec(lab, &["relay-status", "--json"])?;
        serde_json::from_slice(&out.stdout).context("parsing relay-status --json")
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

    /// Kills the relay (or agent) with SIGKILL, as a crash or power loss would: no goodbye to
    /// anyone. Its config directory (and so the relay's key) stays.
    pub fn kill(&mut self, lab: &Lab) -> Result<Option<ExitStatus>> {
        self.stop(lab, Signal::Kill)
    }

    /// Starts the relay again on `port` with the same config directory (so the same key),
    /// killing the old process first if it still runs. Returns its address.
    pub fn restart_relay(&mut self, lab: &Lab, port: u16) -> Result<SocketAddrV4> {
        if self.is_running(lab) {
            self.kill(lab)?;
        }
        self.pid = None;
        self.start_relay(lab, port)
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

    /// Starts `meshvpn join --token-file <file> --name <name> [extra...]` in the background.
    /// The token goes through a 0600 file beside the node's config, never the command line
    /// (where every process on the host could read it).
    pub fn join(&mut self, lab: &Lab, token: &str, extra: &[&str]) -> Result<u32> {
        let name = self.name.clone();
        let file = self.write_token(token)?;
        let file = file.to_string_lossy().into_owned();
        let mut args = vec!["join", "--token-file", &file, "--name", &name];
        args.extend_from_slice(extra);
        self.spawn(lab, &args)
    }

    /// Writes `token` to `<node dir>/token` with mode 0600 and returns the path.
    pub fn write_token(&self, token: &str) -> Result<PathBuf> {
        use std::io::Write as _;
        use std::os::unix::fs::OpenOptionsExt as _;
        let dir = self
            .config_dir
            .parent()
            .context("a node's config dir has a parent")?;
        let path = dir.join("token");
        let _ = fs::remove_file(&path);
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .with_context(|| format!("creating {}", path.display()))?;
        writeln!(f, "{token}").with_context(|| format!("writing {}", path.display()))?;
        Ok(path)
    }

    /// Starts `meshvpn up <network>` in the background.
    pub fn up(&mut self, lab: &Lab, network: &str) -> Result<u32> {
        self.spawn(lab, &["up", network])
    }

    /// Stops the long-running process with `signal` (bounded, SIGKILL after [`STOP_GRACE`](super::STOP_GRACE)).
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

    /// `meshvpn status <network> --json`, parsed with the product's own schema: the member's
    /// snapshot.
    pub fn status(&self, lab: &Lab, network: &str) -> Result<Status> {
        Ok(self.network_status(lab, network)?.status)
    }

    /// `meshvpn status <network> --json`: the one network of the report (snapshot and
    /// readiness).
    pub fn network_status(&self, lab: &Lab, network: &str) -> Result<NetworkStatus> {
        let report = self.status_report(lab, &[network])?;
        let mut networks = report.networks.into_iter();
        match (networks.next(), networks.next()) {
            (Some(one), None) if one.status.network == network => Ok(one),
            (first, second) => bail!(
                "{}: `meshvpn status {network} --json` should list {network} alone, listed {:?} and {:?}",
                self.name,
                first.map(|n| n.status.network),
                second.map(|n| n.status.network)
            ),
        }
    }

    /// `meshvpn status [args] --json`, checked for the schema version this lab reads.
    pub fn status_report(&self, lab: &Lab, args: &[&str]) -> Result<StatusReport> {
        let mut full = vec!["status"];
        full.extend_from_slice(args);
        full.push("--json");
        let out = self.exec(lab, &full)?;
        let report: StatusReport = serde_json::from_slice(&out.stdout)
            .with_context(|| format!("{}: parsing `meshvpn status --json`", self.name))?;
        if report.schema != SCHEMA {
            bail!(
                "{}: `meshvpn status --json` has schema {}, this lab reads {SCHEMA}",
                self.name,
                report.schema
            );
        }
        Ok(report)
    }

    /// `meshvpn status <network>` (the human table).
    pub fn status_table(&self, lab: &Lab, network: &str) -> Result<String> {
        let out = self.exec(lab, &["status", network])?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

/// The counter at JSON `pointer` (e.g. `/tcp/counters/refused_per_source`) of a
/// [`Node::relay_status`] answer.
pub fn relay_counter(status: &serde_json::Value, pointer: &str) -> Result<u64> {
    status
        .pointer(pointer)
        .and_then(serde_json::Value::as_u64)
        .with_context(|| format!("relay-status has no {pointer}"))
}

/// CPU time (user + system) `pid` has used so far, in clock ticks (from `/proc/PID/stat`).
pub fn cpu_ticks(pid: u32) -> Result<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("reading /proc/{pid}/stat"))?;
    // Fields after the command name (which may hold spaces) start after the last ')'.
    let rest = stat.rsplit_once(')').context("odd /proc stat")?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let field = |i: usize| -> Result<u64> {
        fields
            .get(i)
            .and_then(|f| f.parse().ok())
            .context("odd /proc stat field")
    };
    // utime and stime are fields 14 and 15 of the line: 11 and 12 counted from the state.
    Ok(field(11)? + field(12)?)
}

/// CPU share of one core used by `pid` since `before` ticks ([`cpu_ticks`]), over `wall`.
pub fn cpu_share(pid: u32, before: u64, wall: Duration) -> Result<f64> {
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let used = cpu_ticks(pid)?.saturating_sub(before) as f64 / hz;
    Ok(used / wall.as_secs_f64().max(0.001))
}
