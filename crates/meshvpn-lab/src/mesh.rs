//! [`Mesh`]: a lab with a relay on a public host and members placed behind [`Nat`]s, and the
//! measurements the demo, the NAT end-to-end tests and the benchmark share.

use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};

use meshvpn_status::{PeerPath, Status};

use super::{interrupted, wait_until, Host, Lab, Nat, Node, Signal};

/// How often status loops poll (one `meshvpn status` per member each time: a few ms).
const POLL: Duration = Duration::from_millis(100);
/// How long one ping of a first-ping loop waits for its reply.
const PING_WAIT: Duration = Duration::from_millis(500);

/// A [`Lab`] with a relay on the public host `relay` and one [`Node`] per member.
///
/// Dropping it stops everything (the lab is the last field).
pub struct Mesh {
    /// The relay node (host `relay`).
    pub relay: Node,
    /// The relay's UDP (and TCP) port.
    pub relay_port: u16,
    /// The relay's address on the lab internet.
    pub relay_addr: SocketAddrV4,
    /// The members, in the order given to [`Mesh::new`].
    pub members: Vec<Node>,
    /// The network name, once [`create_network`](Self::create_network) ran.
    pub network: String,
    /// The group token, once [`create_network`](Self::create_network) ran.
    pub token: String,
    /// The lab (last: dropped after the nodes).
    pub lab: Lab,
}

/// What [`Mesh::measure_pair`] saw for two members `a` and `b`; durations count from the
/// moment the first of them was told to join.
#[derive(Clone, Debug)]
pub struct PairReport {
    /// First member's name.
    pub a: String,
    /// Second member's name.
    pub b: String,
    /// Until both list each other.
    pub converged: Duration,
    /// Until the first ping a → b got a reply (`None`: not within the bound).
    pub first_ping: Option<Duration>,
    /// Until the first ping b → a got a reply.
    pub first_ping_back: Option<Duration>,
    /// Until `a` showed `b` on a direct path (`None`: not within the bound).
    pub direct_a: Option<Duration>,
    /// Until `b` showed `a` on a direct path.
    pub direct_b: Option<Duration>,
    /// `b`'s path as `a` shows it at the end (`None`: `a` does not list `b`).
    pub path_a: Option<PeerPath>,
    /// `a`'s path as `b` shows it at the end.
    pub path_b: Option<PeerPath>,
    /// `a`'s virtual IP.
    pub ip_a: Ipv4Addr,
    /// `b`'s virtual IP.
    pub ip_b: Ipv4Addr,
}

impl PairReport {
    /// Whether both sides ended on a direct path.
    pub fn is_direct(&self) -> bool {
        self.path_a.is_some_and(PeerPath::is_direct) && self.path_b.is_some_and(PeerPath::is_direct)
    }

    /// The final paths as `(a's view of b, b's view of a)` labels, `unlisted` when missing.
    pub fn path_labels(&self) -> (&'static str, &'static str) {
        let label = |p: Option<PeerPath>| p.map_or("unlisted", PeerPath::as_str);
        (label(self.path_a), label(self.path_b))
    }

    /// One line: names, time to first ping, time to direct, final paths.
    pub fn summary(&self) -> String {
        let fmt = |d: Option<Duration>| match d {
            Some(d) => format!("{:.2}s", d.as_secs_f64()),
            None => "never".to_string(),
        };
        format!(
            "{} <-> {}: converged {:.2}s, first ping {} / back {}, direct {} / {}, path {} / {}",
            self.a,
            self.b,
            self.converged.as_secs_f64(),
            fmt(self.first_ping),
            fmt(self.first_ping_back),
            fmt(self.direct_a),
            fmt(self.direct_b),
            self.path_labels().0,
            self.path_labels().1
        )
    }
}

impl Mesh {
    /// Builds a lab `tag` with the public host `relay` running `meshvpn relay` on
    /// `relay_port`, and one member host per `(name, nat)` (`None`: a public host). The members
    /// are not started.
    pub fn new(
        tag: &str,
        exe: &Path,
        members: &[(&str, Option<Nat>)],
        relay_port: u16,
    ) -> Result<Mesh> {
        let mut lab = Lab::new(tag)?;
        let relay_host = lab.add_public_host("relay")?;
        let mut nodes = Vec::new();
        for (name, nat) in members {
            let host = match nat {
                Some(nat) => lab.add_natted_host(name, *nat)?,
                None => lab.add_public_host(name)?,
            };
            nodes.push(Node::new(&lab, exe, &host, name)?);
        }
        let mut relay = Node::new(&lab, exe, &relay_host, "relay")?;
        let relay_addr = relay.start_relay(&lab, relay_port)?;
        Ok(Mesh {
            relay,
            relay_port,
            relay_addr,
            members: nodes,
            network: String::new(),
            token: String::new(),
            lab,
        })
    }

    /// Turns on IPv6 between the public hosts ([`Lab::enable_ipv6`]) and refreshes the hosts
    /// of the relay and the members (so their [`Host::addr6`] is set). Call it before the
    /// members join, so their agents see the IPv6 addresses from the start. The relay stays
    /// reachable over IPv4 at [`relay_addr`](Self::relay_addr).
    pub fn enable_ipv6(&mut self) -> Result<()> {
        self.lab.enable_ipv6()?;
        for node in std::iter::once(&mut self.relay).chain(self.members.iter_mut()) {
            if let Some(h) = self.lab.hosts().iter().find(|h| h.ns == node.host.ns) {
                node.host = h.clone();
            }
        }
        Ok(())
    }

    /// `meshvpn create <network> --relay <relay>`, run on the relay's host (the operator's
    /// machine: it needs UDP to the relay, which some members may not have).
    pub fn create_network(&mut self, network: &str, subnet: Option<&str>) -> Result<&str> {
        self.token =
            self.relay
                .create_token(&self.lab, network, &self.relay_addr.to_string(), subnet)?;
        self.network = network.to_string();
        Ok(&self.token)
    }

    /// The member called `name`.
    pub fn member(&self, name: &str) -> Result<&Node> {
        self.members
            .iter()
            .find(|m| m.name == name)
            .with_context(|| format!("no member {name}"))
    }

    /// The host of member `name`.
    pub fn host(&self, name: &str) -> Result<&Host> {
        Ok(&self.member(name)?.host)
    }

    /// Starts `meshvpn join <token> --name <name>` for member `name`.
    pub fn join(&mut self, name: &str) -> Result<u32> {
        ensure!(!self.token.is_empty(), "create_network first");
        let i = self
            .members
            .iter()
            .position(|m| m.name == name)
            .with_context(|| format!("no member {name}"))?;
        let (lab, token) = (&self.lab, &self.token);
        self.members[i].join(lab, token, &[])
    }

    /// `meshvpn status --json` of member `name`.
    pub fn status(&self, name: &str) -> Result<Status> {
        self.member(name)?.status(&self.lab, &self.network)
    }

    /// `b`'s path as `a` shows it (`None` if `a` does not list `b`).
    pub fn path(&self, a: &str, b: &str) -> Result<Option<PeerPath>> {
        Ok(self.status(a)?.peer(b).map(|p| p.path))
    }

    /// Waits until every member in `names` lists exactly the others; returns their statuses
    /// in `names` order. Fails early if one of them exits.
    pub fn converge(&self, names: &[&str], deadline: Duration) -> Result<Vec<Status>> {
        let mut last: Vec<Option<Status>> = vec![None; names.len()];
        wait_until(
            deadline,
            POLL,
            &format!("{names:?} to see each other"),
            || {
                for (i, name) in names.iter().enumerate() {
                    let m = self.member(name)?;
                    ensure!(
                        m.is_running(&self.lab),
                        "{name} is not running; see {}",
                        m.log.display()
                    );
                    last[i] = Some(m.status(&self.lab, &self.network)?);
                }
                Ok(last.iter().enumerate().all(|(i, s)| {
                    s.as_ref().is_some_and(|s| {
                        let mut want: Vec<String> = names
                            .iter()
                            .enumerate()
                            .filter(|(j, _)| *j != i)
                            .map(|(_, n)| n.to_string())
                            .collect();
                        want.sort();
                        s.peer_names() == want
                    })
                }))
            },
        )?;
        last.into_iter().map(|s| s.context("no status")).collect()
    }

    /// One ping from member `from` to `to` with a sub-second wait; its RTT if answered.
    pub fn ping_once(&self, from: &str, to: Ipv4Addr, wait: Duration) -> Result<Option<Duration>> {
        let host = self.host(from)?;
        let wait_s = format!("{:.2}", wait.as_secs_f64().max(0.05));
        let args = ["ping", "-n", "-c", "1", "-W", &wait_s, &to.to_string()];
        let out = self.lab.run(host, &args, wait + Duration::from_secs(5))?;
        if !out.status.success() {
            return Ok(None);
        }
        let text = String::from_utf8_lossy(&out.stdout);
        Ok(text
            .split_whitespace()
            .find_map(|w| w.strip_prefix("time="))
            .and_then(|ms| ms.parse::<f64>().ok())
            .map(|ms| Duration::from_secs_f64(ms / 1000.0)))
    }

    /// Pings `to` from `from` until a reply (each ping waits 0.5 s), for at most `deadline`;
    /// returns how long it took.
    pub fn ping_until(&self, from: &str, to: Ipv4Addr, deadline: Duration) -> Result<Duration> {
        wait_until(
            deadline,
            Duration::from_millis(50),
            &format!("a ping from {from} to {to}"),
            || Ok(self.ping_once(from, to, PING_WAIT)?.is_some()),
        )
    }

    /// Joins `a` and `b` (if not running yet), waits until they list each other, pings both
    /// ways until answered (within `ping_bound` from the join), then waits until both show a
    /// direct path or `direct_bound` (from the join) passes. Never fails on a missing ping or
    /// direct path (see the report's `None`s); fails if setup or status breaks.
    pub fn measure_pair(
        &mut self,
        a: &str,
        b: &str,
        ping_bound: Duration,
        direct_bound: Duration,
    ) -> Result<PairReport> {
        let t0 = Instant::now();
        for name in [a, b] {
            if !self.member(name)?.is_running(&self.lab) {
                self.join(name)?;
            }
        }
        let statuses = self.converge(&[a, b], ping_bound)?;
        let converged = t0.elapsed();
        let (ip_a, ip_b) = (statuses[0].virtual_ipv4()?, statuses[1].virtual_ipv4()?);
        let left = |bound: Duration| bound.saturating_sub(t0.elapsed());
        let first_ping = self
            .ping_until(a, ip_b, left(ping_bound))
            .ok()
            .map(|_| t0.elapsed());
        let first_ping_back = self
            .ping_until(b, ip_a, left(ping_bound).max(Duration::from_secs(2)))
            .ok()
            .map(|_| t0.elapsed());
        let (mut direct_a, mut direct_b) = (None, None);
        let (path_a, path_b) = loop {
            if interrupted() {
                bail!("interrupted");
            }
            let path_a = self.path(a, b)?;
            let path_b = self.path(b, a)?;
            if direct_a.is_none() && path_a == Some(PeerPath::Direct) {
                direct_a = Some(t0.elapsed());
            }
            if direct_b.is_none() && path_b == Some(PeerPath::Direct) {
                direct_b = Some(t0.elapsed());
            }
            if (direct_a.is_some() && direct_b.is_some()) || t0.elapsed() >= direct_bound {
                break (path_a, path_b);
            }
            std::thread::sleep(POLL);
        };
        Ok(PairReport {
            a: a.to_string(),
            b: b.to_string(),
            converged,
            first_ping,
            first_ping_back,
            direct_a,
            direct_b,
            path_a,
            path_b,
            ip_a,
            ip_b,
        })
    }

    /// Kills the relay with SIGKILL (no goodbye to the members).
    pub fn kill_relay(&mut self) -> Result<()> {
        self.relay.kill(&self.lab)?;
        Ok(())
    }

    /// Starts the relay again with the same config directory (same key) and port.
    pub fn restart_relay(&mut self) -> Result<SocketAddrV4> {
        self.relay.restart_relay(&self.lab, self.relay_port)
    }

    /// Stops every member (SIGTERM) and the relay, then tears the lab down.
    pub fn shutdown(mut self) -> Result<()> {
        for m in &mut self.members {
            m.stop(&self.lab, Signal::Term)?;
        }
        self.relay.stop(&self.lab, Signal::Term)?;
        self.lab.teardown();
        Ok(())
    }
}
