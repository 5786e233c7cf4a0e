//! Running commands for the lab: bounded, interruptible, in a namespace; the interrupt flag,
//! bounded waits and signals; logs.

use std::collections::HashSet;
use std::ffi::OsStr;
use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};

use super::{LOG_TAIL_LINES, NS_PREFIX, SETUP_TIMEOUT};

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

/// A signal for [`Lab::stop`](super::Lab::stop) and [`Lab::signal`](super::Lab::signal).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Signal {
    /// SIGTERM: polite stop.
    Term,
    /// SIGINT: like Ctrl-C.
    Int,
    /// SIGKILL: no goodbye.
    Kill,
    /// SIGHUP: the agent re-reads its config.
    Hup,
}

impl Signal {
    fn number(self) -> libc::c_int {
        match self {
            Signal::Term => libc::SIGTERM,
            Signal::Int => libc::SIGINT,
            Signal::Kill => libc::SIGKILL,
            Signal::Hup => libc::SIGHUP,
        }
    }
}

/// A process started by [`Lab::spawn`](super::Lab::spawn).
pub(super) struct Proc {
    pub(super) pid: u32,
    pub(super) label: String,
    pub(super) log: PathBuf,
    pub(super) child: Child,
    pub(super) status: Option<ExitStatus>,
}

impl Proc {
    pub(super) fn poll(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            if let Ok(Some(st)) = self.child.try_wait() {
                self.status = Some(st);
            }
        }
        self.status
    }
}

pub(super) fn send_signal(pid: u32, signal: Signal) -> Result<()> {
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

pub(super) fn dump_log_tail(p: &Proc) {
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
pub(super) fn remove_stale_namespaces() {
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

pub(super) fn netns_command<S: AsRef<OsStr>>(ns: &str, args: &[S]) -> Result<Command> {
    if args.is_empty() {
        bail!("lab: empty command");
    }
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", ns]).args(args);
    Ok(cmd)
}

pub(super) fn describe(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|s| s.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}

/// Runs `cmd` to completion with a timeout (killing it on timeout or interrupt).
pub(super) fn output_timeout(cmd: &mut Command, timeout: Duration) -> Result<Output> {
    output_bounded(cmd, timeout, true)
}

/// Runs `cmd` with a timeout; `interruptible` also stops it when [`interrupted`] (teardown
/// commands must run even then).
pub(super) fn output_bounded(
    cmd: &mut Command,
    timeout: Duration,
    interruptible: bool,
) -> Result<Output> {
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
pub(super) fn run_checked(cmd: &mut Command, timeout: Duration) -> Result<Output> {
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
