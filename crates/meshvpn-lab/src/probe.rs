//! Looking at the lab's network from the inside: sockets opened in a namespace, a NAT
//! behaviour probe (RFC 4787 mapping and filtering), a NAT-PMP client for the UPnP router, and
//! long timestamped ping runs.

use std::fs;
use std::io::ErrorKind;
use std::net::{
    Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream, ToSocketAddrs, UdpSocket,
};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, ensure, Context, Result};

use super::gateway::NATPMP_PORT;
use super::{interrupted, Host, Lab, Signal};

/// How long the probe waits for one datagram that may or may not come.
const PROBE_WAIT: Duration = Duration::from_millis(500);
/// How long a NAT-PMP request waits for its answer (two tries).
const NATPMP_WAIT: Duration = Duration::from_millis(1500);

static PING_RUNS: AtomicU32 = AtomicU32::new(0);

/// RFC 4787 mapping behaviour: does a LAN socket keep its public address and port whatever
/// the destination?
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mapping {
    /// Same public `ip:port` for every destination (what hole punching needs).
    EndpointIndependent,
    /// A new public port per destination (a "symmetric" NAT).
    EndpointDependent,
}

/// RFC 4787 filtering behaviour: who may send to a mapping?
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Filtering {
    /// Anyone, once the mapping exists ("full cone").
    EndpointIndependent,
    /// Any port of an address the LAN host has sent to.
    AddressDependent,
    /// Only the exact `ip:port` the LAN host has sent to.
    AddressAndPortDependent,
}

/// What [`Lab::probe_nat`] observed for one host.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NatBehavior {
    /// Whether UDP to an ordinary port on the internet gets through (and answers come back).
    pub udp: bool,
    /// Whether UDP to port 53 gets through.
    pub udp_dns: bool,
    /// Whether a TCP connection to the internet can be opened.
    pub tcp: bool,
    /// Mapping behaviour (`None` when no UDP gets out).
    pub mapping: Option<Mapping>,
    /// Filtering behaviour (`None` when no UDP gets out).
    pub filtering: Option<Filtering>,
    /// Whether the public port equals the LAN socket's port (`None` when no UDP gets out).
    pub port_preserved: Option<bool>,
    /// The public `ip:port`s the servers saw for one LAN socket (A port 1, A port 2, B).
    pub observed: Vec<SocketAddrV4>,
}

impl std::fmt::Display for NatBehavior {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "udp={} udp53={} tcp={} mapping={:?} filtering={:?} port_preserved={:?} observed={:?}",
            self.udp,
            self.udp_dns,
            self.tcp,
            self.mapping,
            self.filtering,
            self.port_preserved,
            self.observed
        )
    }
}

/// Runs `f` on a fresh thread that has entered network namespace `ns` (`/run/netns/<ns>`,
/// made by `ip netns add`). Sockets created there stay in that namespace wherever they are used
/// later, so a test can talk "from inside" any lab host without a helper program.
pub(crate) fn in_netns<T: Send>(ns: &str, f: impl FnOnce() -> Result<T> + Send) -> Result<T> {
    let path = Path::new("/run/netns").join(ns);
    let file = fs::File::open(&path).with_context(|| format!("opening {}", path.display()))?;
    thread::scope(|s| {
        s.spawn(|| {
            // SAFETY: setns only changes this (fresh, short-lived) thread's network namespace;
            // the fd is valid for the duration of the call.
            let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
            if rc != 0 {
                return Err(std::io::Error::last_os_error())
                    .with_context(|| format!("entering network namespace {ns}"));
            }
            f()
        })
        .join()
        .map_err(|_| anyhow!("thread in namespace {ns} panicked"))?
    })
}

/// A UDP server socket on a public host, with the address clients send to.
struct Server {
    sock: UdpSocket,
    addr: SocketAddrV4,
}

fn v4(addr: SocketAddr) -> Result<SocketAddrV4> {
    match addr {
        SocketAddr::V4(a) => Ok(a),
        SocketAddr::V6(a) => bail!("unexpected IPv6 address {a}"),
    }
}

/// Waits up to `wait` for a datagram whose payload is `tag` (others are skipped); returns its
/// source.
fn recv_tagged(sock: &UdpSocket, tag: &[u8], wait: Duration) -> Result<Option<SocketAddrV4>> {
    let deadline = Instant::now() + wait;
    let mut buf = [0u8; 1500];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() || interrupted() {
            return Ok(None);
        }
        sock.set_read_timeout(Some(left))?;
        match sock.recv_from(&mut buf) {
            Ok((n, from)) if &buf[..n] == tag => return Ok(Some(v4(from)?)),
            Ok(_) => {}
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                return Ok(None)
            }
            Err(e) => return Err(e).context("receiving a probe datagram"),
        }
    }
}

/// Sends `tag` from `from` to `to` (three times at most) until `at` receives it; returns the
/// source `at` saw.
fn deliver(
    from: &UdpSocket,
    to: SocketAddrV4,
    at: &UdpSocket,
    tag: &[u8],
) -> Result<Option<SocketAddrV4>> {
    for _ in 0..3 {
        from.send_to(tag, to)
            .with_context(|| format!("sending a probe to {to}"))?;
        if let Some(src) = recv_tagged(at, tag, PROBE_WAIT)? {
            return Ok(Some(src));
        }
    }
    Ok(None)
}

impl Lab {
    /// Runs `f` on a fresh thread inside network namespace `ns` of this lab (a host's
    /// [`Host::ns`] or a router's) and returns what it returns: code under test (a tokio
    /// runtime, a port mapper, a stand-in gateway) sees that namespace's interfaces, routes and
    /// gateway. A panic in `f` (a failed assertion) is raised again here with its own message;
    /// the error is only for a namespace that is not the lab's or cannot be entered.
    pub fn in_namespace<T: Send>(&self, ns: &str, f: impl FnOnce() -> T + Send) -> Result<T> {
        ensure!(
            self.namespaces.iter().any(|n| n == ns),
            "lab: {ns} is not a namespace of this lab"
        );
        let path = Path::new("/run/netns").join(ns);
        let file = fs::File::open(&path).with_context(|| format!("opening {}", path.display()))?;
        let joined = thread::scope(|s| {
            s.spawn(|| {
                // SAFETY: setns only changes this (fresh, scoped) thread's network namespace;
                // the fd is valid for the duration of the call.
                let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
                if rc != 0 {
                    return Err(std::io::Error::last_os_error())
                        .with_context(|| format!("entering network namespace {ns}"));
                }
                Ok(f())
            })
            .join()
        });
        match joined {
            Ok(result) => result,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    }

    /// A UDP socket bound to `0.0.0.0:port` inside `host` (`port` 0: any free port).
    pub fn udp_socket(&self, host: &Host, port: u16) -> Result<UdpSocket> {
        in_netns(&host.ns, || {
            UdpSocket::bind((Ipv4Addr::UNSPECIFIED, port))
                .with_context(|| format!("binding UDP port {port} in {}", host.name))
        })
    }

    /// A dual-stack UDP socket bound to `[::]:port` inside `host` (`port` 0: any free port):
    /// IPv6, and IPv4 as IPv4-mapped addresses. For IPv6 after [`Lab::enable_ipv6`].
    pub fn udp_socket6(&self, host: &Host, port: u16) -> Result<UdpSocket> {
        in_netns(&host.ns, || {
            UdpSocket::bind((Ipv6Addr::UNSPECIFIED, port))
                .with_context(|| format!("binding UDP port [::]:{port} in {}", host.name))
        })
    }

    /// A TCP listener on `0.0.0.0:port` inside `host` (`port` 0: any free port).
    pub fn tcp_listener(&self, host: &Host, port: u16) -> Result<TcpListener> {
        in_netns(&host.ns, || {
            TcpListener::bind((Ipv4Addr::UNSPECIFIED, port))
                .with_context(|| format!("listening on TCP port {port} in {}", host.name))
        })
    }

    /// A TCP connection from inside `host` to `to`, waiting at most `timeout`.
    pub fn tcp_connect(
        &self,
        host: &Host,
        to: impl ToSocketAddrs,
        timeout: Duration,
    ) -> Result<TcpStream> {
        let to = to
            .to_socket_addrs()?
            .next()
            .context("no address to connect to")?;
        in_netns(&host.ns, || {
            TcpStream::connect_timeout(&to, timeout)
                .with_context(|| format!("TCP connect from {} to {to}", host.name))
        })
    }

    /// Measures what the NAT in front of `client` does, with UDP sockets inside the namespaces
    /// and two public hosts `a` and `b` (distinct addresses, no NAT) as servers.
    ///
    /// Mapping: one LAN socket sends to A:p1, A:p2 and B:p3; the same public `ip:port` at all
    /// three is endpoint-independent. Filtering: a fresh LAN socket sends to A:p1 only, then
    /// B:p3 and A:p2 send to the public address A saw; which of them arrive gives the filtering
    /// (A:p1's own answer must arrive, else the probe fails). Also checks UDP to port 53 and a
    /// TCP connection. About 1–3 s; all traffic stays between the given hosts.
    pub fn probe_nat(&self, client: &Host, a: &Host, b: &Host) -> Result<NatBehavior> {
        ensure!(
            a.nat.is_none() && b.nat.is_none() && a.addr != b.addr,
            "probe_nat needs two distinct public hosts as servers"
        );
        let server = |h: &Host| -> Result<Server> {
            let sock = self.udp_socket(h, 0)?;
            let port = sock.local_addr()?.port();
            Ok(Server {
                sock,
                addr: SocketAddrV4::new(h.addr, port),
            })
        };
        let (a1, a2, b1) = (server(a)?, server(a)?, server(b)?);

        let tcp = {
            let listener = self.tcp_listener(a, 0)?;
            let to = SocketAddrV4::new(a.addr, listener.local_addr()?.port());
            self.tcp_connect(client, to, Duration::from_secs(2)).is_ok()
        };
        let udp_dns = {
            let dns = self.udp_socket(a, 53)?;
            let c = self.udp_socket(client, 0)?;
            deliver(&c, SocketAddrV4::new(a.addr, 53), &dns, b"dns")?.is_some()
        };

        let c = self.udp_socket(client, 0)?;
        let local_port = c.local_addr()?.port();
        let Some(at_a1) = deliver(&c, a1.addr, &a1.sock, b"map-a1")? else {
            return Ok(NatBehavior {
                udp: false,
                udp_dns,
                tcp,
                mapping: None,
                filtering: None,
                port_preserved: None,
                observed: Vec::new(),
            });
        };
        a1.sock.send_to(b"ans-a1", at_a1)?;
        ensure!(
            recv_tagged(&c, b"ans-a1", PROBE_WAIT)?.is_some(),
            "{}: UDP gets out (seen as {at_a1}) but the answer does not come back",
            client.name
        );
        let at_a2 = deliver(&c, a2.addr, &a2.sock, b"map-a2")?
            .with_context(|| format!("{}: a second UDP flow did not get out", client.name))?;
        let at_b1 = deliver(&c, b1.addr, &b1.sock, b"map-b1")?
            .with_context(|| format!("{}: a third UDP flow did not get out", client.name))?;
        let mapping = if at_a1 == at_a2 && at_a1 == at_b1 {
            Mapping::EndpointIndependent
        } else {
            Mapping::EndpointDependent
        };

        let f = self.udp_socket(client, 0)?;
        let seen = deliver(&f, a1.addr, &a1.sock, b"flt-a1")?
            .with_context(|| format!("{}: the filtering probe did not get out", client.name))?;
        b1.sock.send_to(b"flt-b1", seen)?;
        let filtering = if recv_tagged(&f, b"flt-b1", PROBE_WAIT)?.is_some() {
            Filtering::EndpointIndependent
        } else {
            a2.sock.send_to(b"flt-a2", seen)?;
            if recv_tagged(&f, b"flt-a2", PROBE_WAIT)?.is_some() {
                Filtering::AddressDependent
            } else {
                Filtering::AddressAndPortDependent
            }
        };
        a1.sock.send_to(b"flt-ctl", seen)?;
        ensure!(
            recv_tagged(&f, b"flt-ctl", PROBE_WAIT)?.is_some(),
            "{}: the answer to the filtering probe did not come back",
            client.name
        );
        Ok(NatBehavior {
            udp: true,
            udp_dns,
            tcp,
            mapping: Some(mapping),
            filtering: Some(filtering),
            port_preserved: Some(at_a1.port() == local_port),
            observed: vec![at_a1, at_a2, at_b1],
        })
    }

    /// Asks `host`'s gateway for a NAT-PMP (RFC 6886) UDP mapping of `sock`'s port (a socket
    /// made with [`udp_socket`](Self::udp_socket) in `host`), suggesting the same external
    /// port. Returns the public `ip:port` the gateway mapped. Only a [`Nat::Upnp`](super::Nat)
    /// router answers.
    pub fn natpmp_map(
        &self,
        host: &Host,
        sock: &UdpSocket,
        lifetime_s: u32,
    ) -> Result<SocketAddrV4> {
        let gw = host
            .gateway
            .with_context(|| format!("{} has no gateway", host.name))?;
        let gw = SocketAddrV4::new(gw, NATPMP_PORT);
        let ask = |req: &[u8], want_op: u8, len: usize| -> Result<Vec<u8>> {
            let mut buf = [0u8; 64];
            for _ in 0..2 {
                sock.send_to(req, gw)
                    .with_context(|| format!("sending NAT-PMP to {gw}"))?;
                let deadline = Instant::now() + NATPMP_WAIT;
                loop {
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() || interrupted() {
                        break;
                    }
                    sock.set_read_timeout(Some(left))?;
                    match sock.recv_from(&mut buf) {
                        Ok((n, from)) if from == SocketAddr::V4(gw) && n >= len => {
                            if buf[0] == 0 && buf[1] == want_op {
                                let rc = u16::from_be_bytes([buf[2], buf[3]]);
                                ensure!(rc == 0, "NAT-PMP result code {rc} from {gw}");
                                return Ok(buf[..n].to_vec());
                            }
                        }
                        Ok(_) => {}
                        Err(e)
                            if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) =>
                        {
                            break
                        }
                        Err(e) => return Err(e).context("receiving NAT-PMP"),
                    }
                }
            }
            bail!("no NAT-PMP answer from {gw}")
        };
        let addr = ask(&[0, 0], 128, 12)?;
        let ip = Ipv4Addr::new(addr[8], addr[9], addr[10], addr[11]);
        let port = sock.local_addr()?.port();
        let mut req = vec![0u8, 1, 0, 0];
        req.extend_from_slice(&port.to_be_bytes());
        req.extend_from_slice(&port.to_be_bytes());
        req.extend_from_slice(&lifetime_s.to_be_bytes());
        let map = ask(&req, 129, 16)?;
        let internal = u16::from_be_bytes([map[8], map[9]]);
        let external = u16::from_be_bytes([map[10], map[11]]);
        ensure!(
            internal == port,
            "NAT-PMP mapped internal port {internal}, asked for {port}"
        );
        Ok(SocketAddrV4::new(ip, external))
    }

    /// Starts `ping -D -O -n -i <interval> -c <count> -W 1 <to>` in `from` in the background;
    /// [`PingRun::finish`] waits for it and parses its timestamped replies.
    pub fn start_ping_run(
        &self,
        from: &Host,
        to: Ipv4Addr,
        count: u32,
        interval: Duration,
    ) -> Result<PingRun> {
        let n = PING_RUNS.fetch_add(1, Ordering::SeqCst);
        let log = self.dir().join(format!("ping-{}-{n}.log", from.name));
        let interval_s = format!("{:.3}", interval.as_secs_f64().max(0.002));
        let count_s = count.max(1).to_string();
        let started = SystemTime::now();
        let pid = self.spawn(
            from,
            "ping",
            &[
                "-D",
                "-O",
                "-n",
                "-i",
                &interval_s,
                "-c",
                &count_s,
                "-W",
                "1",
                &to.to_string(),
            ],
            &log,
        )?;
        Ok(PingRun {
            pid,
            log,
            started,
            limit: interval * count.max(1) + Duration::from_secs(10),
        })
    }
}

/// A running `ping` from [`Lab::start_ping_run`].
#[derive(Debug)]
pub struct PingRun {
    pid: u32,
    log: PathBuf,
    /// When it was started.
    pub started: SystemTime,
    limit: Duration,
}

impl PingRun {
    /// Waits for the run to end (bounded by count × interval + 10 s, then stopped), and parses
    /// its output.
    pub fn finish(self, lab: &Lab) -> Result<PingLog> {
        let left = self
            .limit
            .saturating_sub(self.started.elapsed().unwrap_or_default());
        if lab.wait_exit(self.pid, left).is_none() {
            lab.stop(self.pid, Signal::Int)?;
        }
        let text = fs::read_to_string(&self.log)
            .with_context(|| format!("reading {}", self.log.display()))?;
        Ok(PingLog::parse(&text, self.started))
    }
}

/// The replies of a ping run: `(icmp_seq, time the reply arrived)`, in order.
#[derive(Clone, Debug, Default)]
pub struct PingLog {
    /// When the run started.
    pub started: Option<SystemTime>,
    /// Highest sequence number sent or reported missing.
    pub sent: u32,
    /// Replies in arrival order.
    pub replies: Vec<(u32, SystemTime)>,
}

impl PingLog {
    /// Parses `ping -D -O` output (lines `[<unix time>] 64 bytes from …: icmp_seq=N …` and
    /// `[<unix time>] no answer yet for icmp_seq=N`).
    pub fn parse(text: &str, started: SystemTime) -> PingLog {
        let mut log = PingLog {
            started: Some(started),
            ..PingLog::default()
        };
        for line in text.lines() {
            let Some(rest) = line.strip_prefix('[') else {
                continue;
            };
            let Some((ts, rest)) = rest.split_once(']') else {
                continue;
            };
            let Ok(ts) = ts.trim().parse::<f64>() else {
                continue;
            };
            let Some(seq) = rest
                .split_whitespace()
                .find_map(|w| w.strip_prefix("icmp_seq="))
                .and_then(|s| s.parse::<u32>().ok())
            else {
                continue;
            };
            log.sent = log.sent.max(seq);
            if rest.contains("bytes from") {
                log.replies
                    .push((seq, UNIX_EPOCH + Duration::from_secs_f64(ts.max(0.0))));
            }
        }
        log
    }

    /// Number of replies.
    pub fn received(&self) -> usize {
        self.replies.len()
    }

    /// Fraction of requests without a reply (0 when nothing was sent).
    pub fn loss(&self) -> f64 {
        if self.sent == 0 {
            return 0.0;
        }
        1.0 - self.received() as f64 / f64::from(self.sent)
    }

    /// The longest time without a reply from `from` on: between consecutive replies, counting
    /// only time after `from`. `None` if no reply came after `from`.
    pub fn longest_silence_after(&self, from: SystemTime) -> Option<Duration> {
        let mut prev = from;
        let mut longest = None;
        for &(_, t) in &self.replies {
            if t <= from {
                continue;
            }
            let gap = t.duration_since(prev).unwrap_or_default();
            longest = Some(longest.map_or(gap, |l: Duration| l.max(gap)));
            prev = t;
        }
        longest
    }

    /// Time from `from` to the first reply after it.
    pub fn first_reply_after(&self, from: SystemTime) -> Option<Duration> {
        self.replies
            .iter()
            .find(|(_, t)| *t > from)
            .and_then(|(_, t)| t.duration_since(from).ok())
    }

    /// How long after `from` replies were flowing again: the end of the last silence longer
    /// than `min_gap` after `from`, or the first reply after `from` if there was no such
    /// silence. `None` if no reply came after `from`.
    pub fn recovered_after(&self, from: SystemTime, min_gap: Duration) -> Option<Duration> {
        let mut prev = from;
        let mut end = None;
        for &(_, t) in &self.replies {
            if t <= from {
                continue;
            }
            let gap = t.duration_since(prev).unwrap_or_default();
            if end.is_none() || gap > min_gap {
                end = Some(t);
            }
            prev = t;
        }
        end.and_then(|t| t.duration_since(from).ok())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_ping_log() {
        let text = "=== lab: starting in ns: ping\n\
            PING 10.0.0.2 (10.0.0.2) 56(84) bytes of data.\n\
            [100.000000] 64 bytes from 10.0.0.2: icmp_seq=1 ttl=64 time=0.1 ms\n\
            [100.200000] 64 bytes from 10.0.0.2: icmp_seq=2 ttl=64 time=0.1 ms\n\
            [101.400000] no answer yet for icmp_seq=3\n\
            [101.600000] no answer yet for icmp_seq=4\n\
            [102.000000] 64 bytes from 10.0.0.2: icmp_seq=5 ttl=64 time=0.1 ms\n\
            [102.200000] 64 bytes from 10.0.0.2: icmp_seq=6 ttl=64 time=0.1 ms\n";
        let start = UNIX_EPOCH + Duration::from_secs(99);
        let log = PingLog::parse(text, start);
        assert_eq!(log.sent, 6);
        assert_eq!(log.received(), 4);
        assert!((log.loss() - 1.0 / 3.0).abs() < 1e-9);
        let t = UNIX_EPOCH + Duration::from_millis(100_300);
        let silence = log.longest_silence_after(t).unwrap_or_default();
        assert!((silence.as_secs_f64() - 1.7).abs() < 1e-6, "{silence:?}");
        let rec = log.recovered_after(t, Duration::from_secs(1));
        let rec = rec.unwrap_or_default();
        assert!((rec.as_secs_f64() - 1.7).abs() < 1e-6, "{rec:?}");
        let quiet = UNIX_EPOCH + Duration::from_millis(102_100);
        let rec = log.recovered_after(quiet, Duration::from_secs(1));
        assert_eq!(rec, Some(Duration::from_millis(100)));
        let first = log.first_reply_after(t).unwrap_or_default();
        assert!((first.as_secs_f64() - 1.7).abs() < 1e-6, "{first:?}");
        assert_eq!(
            log.longest_silence_after(UNIX_EPOCH + Duration::from_secs(200)),
            None
        );
    }
}
