//! Measuring the data plane inside the lab: `iperf3` throughput, `ping` statistics, byte
//! counters of a host's interface, and a process's CPU time and resident memory.
//!
//! Used by the data-plane benchmark (`benches/dataplane.rs`). Everything runs inside the lab's
//! namespaces with the lab's bounded commands: an `iperf3` client gets its test length plus a
//! margin, a ping run its count × interval plus a margin, and an `iperf3` server is a process
//! started with [`Lab::spawn`], so the lab stops it. Tools are found with [`which`]; these
//! helpers fail with a clear message when one is missing.

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};

use super::{cpu_ticks, wait_until, Host, Lab};

/// How long a client command may run past the time it was asked to measure (connection
/// setup, the end-of-test exchange, a slow namespace exec).
const CLIENT_MARGIN: Duration = Duration::from_secs(15);

/// One `iperf3` client run: TCP, `streams` parallel streams, for `duration`; `reverse` (`-R`)
/// makes the server send.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Iperf3Test {
    /// Parallel TCP streams (`-P`).
    pub streams: u32,
    /// Server → client instead of client → server (`-R`).
    pub reverse: bool,
    /// Test length (`-t`, whole seconds, at least 1).
    pub duration: Duration,
}

/// What the receiving side of an [`Iperf3Test`] counted.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Iperf3Result {
    /// Received throughput, bits per second (`end.sum_received.bits_per_second`).
    pub bits_per_second: f64,
    /// Bytes received (`end.sum_received.bytes`).
    pub bytes: u64,
    /// Seconds the receiver measured over (`end.sum_received.seconds`).
    pub seconds: f64,
}

impl Iperf3Result {
    /// Throughput in Mbit/s.
    pub fn mbit_per_second(&self) -> f64 {
        self.bits_per_second / 1e6
    }
}

/// The summary of a `ping -q` run.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PingStats {
    /// Echo requests sent.
    pub sent: u32,
    /// Echo replies received.
    pub received: u32,
    /// Average round-trip time of the replies (`None` when none came back).
    pub avg: Option<Duration>,
}

/// Bytes counted by one interface of a host (`/sys/class/net/<if>/statistics`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct InterfaceBytes {
    /// Bytes received.
    pub rx: u64,
    /// Bytes sent.
    pub tx: u64,
}

impl InterfaceBytes {
    /// Bytes in both directions since `earlier` (counters only grow while the link exists).
    pub fn since(&self, earlier: InterfaceBytes) -> u64 {
        self.rx.saturating_sub(earlier.rx) + self.tx.saturating_sub(earlier.tx)
    }
}

/// The full path of `program` if it is an executable file in a directory of `$PATH`.
pub fn which(program: &str) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(program))
        .find(|p| {
            p.metadata()
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
}

/// Clock ticks per second, the unit of `/proc`'s CPU times.
fn clock_ticks_per_second() -> f64 {
    // SAFETY: sysconf has no preconditions.
    unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64
}

/// CPU time (user + system) `pid` has used so far, in seconds (from `/proc/PID/stat`).
pub fn cpu_seconds(pid: u32) -> Result<f64> {
    Ok(cpu_ticks(pid)? as f64 / clock_ticks_per_second())
}

/// CPU time the whole machine has been busy so far (every CPU, anything but idle and I/O
/// wait), in seconds (from the `cpu` line of `/proc/stat`).
pub fn machine_busy_seconds() -> Result<f64> {
    let text = std::fs::read_to_string("/proc/stat").context("reading /proc/stat")?;
    let line = text
        .lines()
        .find(|l| l.starts_with("cpu "))
        .context("no cpu line in /proc/stat")?;
    let ticks: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|v| v.parse().context("a /proc/stat field"))
        .collect::<Result<_>>()?;
    ensure!(ticks.len() >= 5, "short cpu line in /proc/stat");
    let busy: u64 = ticks.iter().sum::<u64>() - ticks[3] - ticks[4];
    Ok(busy as f64 / clock_ticks_per_second())
}

/// Resident memory of `pid` in kB (`VmRSS` in `/proc/PID/status`).
pub fn rss_kb(pid: u32) -> Result<u64> {
    let path = format!("/proc/{pid}/status");
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    text.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .with_context(|| format!("no VmRSS in {path}"))
}

impl Lab {
    /// Starts `iperf3 -s -p <port>` on `host` (logged to `<lab dir>/iperf3-<host>.log`) and
    /// waits up to 10 s until it listens. Returns its PID; the lab stops it on teardown.
    pub fn start_iperf3_server(&self, host: &Host, port: u16) -> Result<u32> {
        let log = self.dir().join(format!("iperf3-{}.log", host.name));
        let pid = self.spawn(host, "iperf3", &["-s", "-p", &port.to_string()], &log)?;
        wait_until(
            Duration::from_secs(10),
            Duration::from_millis(20),
            &format!("iperf3 to listen on {}:{port}", host.name),
            || {
                if !self.is_running(pid) {
                    bail!("iperf3 -s exited ({:?})", self.exit_status(pid));
                }
                self.tcp_listening(host, port)
            },
        )?;
        Ok(pid)
    }

    /// Runs one `iperf3 -c <server> -p <port> -J` test from `host`; fails if iperf3 fails.
    pub fn iperf3(
        &self,
        host: &Host,
        server: Ipv4Addr,
        port: u16,
        test: Iperf3Test,
    ) -> Result<Iperf3Result> {
        let secs = test.duration.as_secs().max(1);
        let mut args = vec![
            "iperf3".to_string(),
            "-c".into(),
            server.to_string(),
            "-p".into(),
            port.to_string(),
            "-t".into(),
            secs.to_string(),
            "-P".into(),
            test.streams.max(1).to_string(),
            "-J".into(),
        ];
        if test.reverse {
            args.push("-R".into());
        }
        let out = self.run(host, &args, Duration::from_secs(secs) + CLIENT_MARGIN)?;
        let text = String::from_utf8_lossy(&out.stdout);
        let parsed = parse_iperf3_json(&text);
        if !out.status.success() || parsed.is_err() {
            bail!(
                "`{}` in {} failed ({}): {}",
                args.join(" "),
                host.name,
                out.status,
                iperf3_error(&text, &out.stderr)
            );
        }
        parsed
    }

    /// Sends `count` pings from `host` to `to`, `interval` apart (below 0.2 s needs root, as
    /// the lab does), each waiting up to 2 s; returns the summary whatever got lost.
    pub fn ping_stats(
        &self,
        host: &Host,
        to: Ipv4Addr,
        count: u32,
        interval: Duration,
    ) -> Result<PingStats> {
        let count = count.max(1);
        let args = [
            "ping".to_string(),
            "-4".into(),
            "-n".into(),
            "-q".into(),
            "-c".into(),
            count.to_string(),
            "-i".into(),
            format!("{:.3}", interval.as_secs_f64()),
            "-W".into(),
            "2".into(),
            to.to_string(),
        ];
        let limit = interval * count + CLIENT_MARGIN;
        let out = self.run(host, &args, limit)?;
        parse_ping_summary(&String::from_utf8_lossy(&out.stdout)).with_context(|| {
            format!(
                "ping {to} from {}: no summary ({})",
                host.name,
                String::from_utf8_lossy(&out.stderr).trim()
            )
        })
    }

    /// The byte counters of interface `ifname` in `host`'s namespace.
    pub fn interface_bytes(&self, host: &Host, ifname: &str) -> Result<InterfaceBytes> {
        let dir = format!("/sys/class/net/{ifname}/statistics");
        let out = self.exec(
            host,
            &[
                "cat",
                &format!("{dir}/rx_bytes"),
                &format!("{dir}/tx_bytes"),
            ],
        )?;
        let text = String::from_utf8_lossy(&out.stdout);
        let mut numbers = text.split_whitespace().map(str::parse::<u64>);
        match (numbers.next(), numbers.next()) {
            (Some(Ok(rx)), Some(Ok(tx))) => Ok(InterfaceBytes { rx, tx }),
            _ => bail!("odd counters for {ifname} in {}: {text:?}", host.name),
        }
    }

    /// Whether some socket in `host` listens on TCP `port` (`/proc/net/tcp` and `tcp6`, state
    /// `0A`).
    pub fn tcp_listening(&self, host: &Host, port: u16) -> Result<bool> {
        let out = self.exec(host, &["cat", "/proc/net/tcp", "/proc/net/tcp6"])?;
        let wanted = format!(":{port:04X}");
        Ok(String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| {
                let mut f = l.split_whitespace();
                Some((f.nth(1)?, f.nth(1)?))
            })
            .any(|(local, state)| local.ends_with(&wanted) && state == "0A"))
    }
}

/// The receiver's sum from `iperf3 -J` output.
fn parse_iperf3_json(text: &str) -> Result<Iperf3Result> {
    let v: serde_json::Value = serde_json::from_str(text).context("iperf3 -J: not JSON")?;
    let sum = v
        .pointer("/end/sum_received")
        .context("iperf3 -J: no end.sum_received")?;
    let number = |key: &str| {
        sum.get(key)
            .and_then(serde_json::Value::as_f64)
            .with_context(|| format!("iperf3 -J: no end.sum_received.{key}"))
    };
    Ok(Iperf3Result {
        bits_per_second: number("bits_per_second")?,
        bytes: number("bytes")? as u64,
        seconds: number("seconds")?,
    })
}

/// The best explanation of a failed iperf3 run: its JSON `error`, else stderr.
fn iperf3_error(stdout: &str, stderr: &[u8]) -> String {
    serde_json::from_str::<serde_json::Value>(stdout)
        .ok()
        .and_then(|v| v.get("error")?.as_str().map(str::to_string))
        .unwrap_or_else(|| String::from_utf8_lossy(stderr).trim().to_string())
}

/// Parses the last two lines of `ping -q`: "N packets transmitted, M received, ..." and
/// "rtt min/avg/max/mdev = a/b/c/d ms" (absent when nothing came back).
fn parse_ping_summary(text: &str) -> Option<PingStats> {
    let counts = text.lines().find(|l| l.contains("packets transmitted"))?;
    let mut words = counts.split_whitespace();
    let sent = words.next()?.parse().ok()?;
    let received = counts
        .split(", ")
        .nth(1)?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    let avg = text
        .lines()
        .find_map(|l| l.split_once("min/avg/max"))
        .and_then(|(_, rest)| {
            rest.split_once('=')?
                .1
                .trim()
                .split('/')
                .nth(1)?
                .parse()
                .ok()
        })
        .map(|ms: f64| Duration::from_secs_f64(ms / 1000.0));
    Some(PingStats {
        sent,
        received,
        avg,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ping_summary_with_and_without_replies() {
        let ok =
            "PING 10.0.0.2 (10.0.0.2) 56(84) bytes of data.\n\n--- 10.0.0.2 ping statistics ---\n\
                  20 packets transmitted, 19 received, 5% packet loss, time 970ms\n\
                  rtt min/avg/max/mdev = 0.031/0.052/0.090/0.011 ms\n";
        let s = parse_ping_summary(ok).expect("parses");
        assert_eq!((s.sent, s.received), (20, 19));
        assert_eq!(s.avg, Some(Duration::from_secs_f64(0.052 / 1000.0)));
        let lost = "--- 10.0.0.2 ping statistics ---\n\
                    3 packets transmitted, 0 received, 100% packet loss, time 2030ms\n";
        let s = parse_ping_summary(lost).expect("parses");
        assert_eq!((s.sent, s.received, s.avg), (3, 0, None));
        assert_eq!(
            parse_ping_summary("ping: connect: Network is unreachable"),
            None
        );
    }

    #[test]
    fn iperf3_receiver_sum() {
        let json = r#"{"end":{"sum_sent":{"bits_per_second":2e9},
            "sum_received":{"seconds":5.0,"bytes":1250000000,"bits_per_second":2e9}}}"#;
        let r = parse_iperf3_json(json).expect("parses");
        assert_eq!(r.bytes, 1_250_000_000);
        assert!((r.mbit_per_second() - 2000.0).abs() < 1e-9);
        assert!(parse_iperf3_json(r#"{"error":"unable to connect"}"#).is_err());
        assert_eq!(
            iperf3_error(r#"{"error":"unable to connect"}"#, b""),
            "unable to connect"
        );
    }
}
