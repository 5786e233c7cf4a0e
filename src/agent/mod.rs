//! The member agent: the thin tokio driver around [`crate::node::Node`].
//!
//! It owns the I/O — the TUN device, the one UDP socket (and a birthday probe's extra
//! sockets), the TCP stream to the relay when the node asks for one, the control socket,
//! signals and the timer — and runs one loop: wait for the first of (TUN packet, datagram,
//! stream frame, control request, deadline, signal), feed it to the node with
//! `Instant::now()`, drain every output through the shared [`crate::node::driver::Step`],
//! re-arm the timer at the node's deadline. All protocol decisions are the node's, including
//! when to use the stream.
//!
//! On a multi-core host the data path also runs on one pinned thread per CPU ([`workers`]),
//! each with its own TUN queue and UDP socket on the same port, driving the same node under
//! one lock; the kernel hands each thread the packets of its CPU, and bulk flows to this loop
//! ([`cpus`]). The TUN device and the UDP port are still one each to the rest of the system.

#![allow(clippy::disallowed_methods, clippy::disallowed_types)] // the driver: owns the clock, tasks and sockets

mod cpus;
mod dns;
mod floors;
mod ifaddrs;
pub(crate) mod portmap;
mod progress;
mod relay_stream;
mod relay_streams;
pub mod reload;
mod remembered;
mod sockets;
pub(crate) mod stream;
mod tun;
mod udp;
mod workers;

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context as _};
use rand::RngCore;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UdpSocket, UnixListener};
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::{mpsc, oneshot};

use crate::config::Config;
use crate::control::{self, Request};
use crate::node::driver::{Output, Step};
use crate::node::{self, Event, Node, NodeConfig, RelayTarget, StreamKind};
use crate::sockaddr;
use crate::wire::token::RelayEndpoint;
use portmap::{PortMapper, PortMapping};
use progress::Progress;
use relay_stream::StreamEvent;
use relay_streams::RelayStreams;
use sockets::ExtraSockets;
use tun::TunIo;
use udp::UdpIo;
use workers::Workers;

/// How often the host's addresses are re-read (a change is re-announced to peers).
const ENDPOINT_REFRESH: Duration = Duration::from_secs(10);
/// The loop's longest sleep when nothing at all is scheduled (the node always has a deadline
/// while it runs, so this only bounds a theoretical idle wait).
const IDLE_WAKE: Duration = Duration::from_secs(60);
/// Longest wait between attempts to resolve the relay's host name.
const RESOLVE_RETRY_MAX: Duration = Duration::from_secs(30);
/// Packets read from one source (the UDP socket, the TUN device) per wakeup before the node's
/// output is sent: enough to amortise the system calls over a burst (a TSO super-packet is
/// about 46 packets), few enough that the other direction and the timers are not starved.
const READ_BUDGET: usize = 128;
/// Most relays an agent registers with (the first ones of the token): each costs a
/// registration every few seconds and a share of the relay's member table, and a handful
/// already survives any one relay failing.
const MAX_RELAYS: usize = 4;

/// Whether this process may create TUN devices (root, or CAP_NET_ADMIN in its effective set).
pub fn has_net_admin() -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("CapEff:"))
                .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        })
        .is_some_and(|caps| caps & (1 << 12) != 0)
}

/// Fails with a clear message unless the agent can create its TUN device.
pub fn check_privileges() -> anyhow::Result<()> {
    if !has_net_admin() {
        bail!("starting the agent needs root or CAP_NET_ADMIN to create its TUN device (try sudo, or run it as the meshvpn@NETWORK systemd service)");
    }
    if !Path::new("/dev/net/tun").exists() {
        bail!("/dev/net/tun does not exist: load the tun kernel module (modprobe tun) or give the container the device");
    }
    Ok(())
}

/// Runs the agent for `cfg` until SIGINT or SIGTERM; `state_dir` keeps what must survive a
/// restart (the announcement floors) and is the config directory re-read on SIGHUP, whose
/// `log_level` goes through `log` (see [`reload`]). With `metrics`, serves Prometheus metrics
/// there (see [`crate::metrics`]).
pub async fn run(
    cfg: Config,
    run_dir: &Path,
    state_dir: &Path,
    log: reload::LogControl,
    metrics: Option<SocketAddr>,
) -> anyhow::Result<()> {
    if cfg.relays.is_empty() {
        bail!("the config names no relay");
    }
    if cfg.relays.len() > MAX_RELAYS {
        tracing::warn!(
            relays = cfg.relays.len(),
            used = MAX_RELAYS,
            "the config names more relays than an agent registers with; using the first ones"
        );
    }
    let relays: Vec<RelayEndpoint> = cfg.relays.iter().take(MAX_RELAYS).cloned().collect();
    let relay = relays[0].clone();
    let ifname = cfg.interface_name();

    let cpus = if cpus::wanted(
        cfg.per_cpu_data_path,
        std::env::var(cpus::PER_CPU_ENV).ok().as_deref(),
    ) {
        cpus::data_path_cpus().unwrap_or(0)
    } else {
        0
    };
    let group = match cpus::bind_group(cfg.listen_port, cpus) {
        Err(e) if cpus > 0 && e.kind() != std::io::ErrorKind::AddrInUse => {
            tracing::warn!(%e, "could not bind a UDP socket per CPU; one socket, one data-path thread");
            cpus::bind_group(cfg.listen_port, 0)
        }
        bound => bound,
    }
    .map_err(|e| {
        if e.kind() == std::io::ErrorKind::AddrInUse {
            anyhow::anyhow!("UDP port {} is already in use (another agent or program holds it); set a different node.listen_port", cfg.listen_port)
        } else {
            anyhow::anyhow!("binding UDP port {}: {e}", cfg.listen_port)
        }
    })?;
    let dual_stack = group.dual_stack;
    let socket = UdpSocket::from_std(group.main).context("setting up the UDP socket")?;
    let mut udp = UdpIo::new(socket, dual_stack).context("setting up the UDP socket")?;
    let port = udp
        .local_addr()
        .context("reading the bound UDP port")?
        .port();

    let want_offload = tun::offload_wanted(
        cfg.tun_offload,
        std::env::var(tun::OFFLOAD_ENV).ok().as_deref(),
    );
    let overlay_ipv6 =
        crate::addressing::overlay_ipv6(&cfg.secret.derive().network_id, &cfg.private_key.public());
    let (mut tun, queues, cpu_steered) = TunIo::open(
        &ifname,
        cfg.virtual_ip,
        cfg.subnet.prefix_len(),
        overlay_ipv6,
        cfg.mtu,
        want_offload,
        group.per_cpu.len(),
    )
    .map_err(|e| {
        if e.kind() == std::io::ErrorKind::PermissionDenied {
            anyhow::anyhow!(
                "creating TUN device {ifname}: permission denied (needs root or CAP_NET_ADMIN)"
            )
        } else {
            anyhow::anyhow!("creating TUN device {ifname}: {e}")
        }
    })?;

    let control_path = control::socket_path(run_dir, &cfg.network);
    let listener = bind_control(run_dir, &control_path).await?;
    let _cleanup = RemoveOnDrop(control_path.clone());
    let metrics_listener = match metrics {
        Some(addr) => Some(crate::metrics::bind(addr).await?),
        None => None,
    };
    let mut names = dns::Names::start(&cfg, &ifname).await;

    // Ready once the TUN, the socket and the control socket exist: resolving the relay may
    // wait for DNS, and the agent keeps retrying that on its own.
    let _ = sd_notify::notify(&[
        sd_notify::NotifyState::Ready,
        sd_notify::NotifyState::Status(&format!("{} on {ifname}, UDP port {port}", cfg.virtual_ip)),
    ]);
    let relay_addrs = resolve_relays(&relays).await;
    let stun_servers = resolve_stun_servers(&cfg.stun_servers).await;
    let floors_path = floors::path(state_dir, &cfg.network);
    let mut node = start_node(&cfg, &relay_addrs, &stun_servers, &floors_path);
    let peers_path = remembered::path(state_dir, &cfg.network);
    let restored = remembered::load(&peers_path);
    if !restored.is_empty() {
        tracing::info!(members = restored.len(), file = %peers_path.display(), "probing the members remembered from the last run until a relay lists them");
        node.restore_members(Instant::now(), restored);
    }
    let mut saved_peers = String::new();
    let mut saved_floors = node.announcement_floors();
    node.set_local_endpoints(Instant::now(), local_endpoints(port, &ifname, dual_stack));
    tracing::info!(
        network = %cfg.network, name = %cfg.name, virtual_ip = %cfg.virtual_ip, interface = %ifname, udp_port = port,
        relays = ?relay_addrs, public_key = %node.public_key(), "agent started"
    );

    // Queues and sockets come in pairs, and without the CPU steering the threads would only
    // take turns with the control loop: otherwise the per-CPU queues and sockets close here
    // (the kernel then hands everything to the control loop's).
    let (queues, worker_sockets) = if cpu_steered && queues.len() == group.per_cpu.len() {
        (queues, group.per_cpu)
    } else {
        (Vec::new(), Vec::new())
    };
    let steering = steering_for(&queues, &worker_sockets);
    let shared = workers::Shared::new(node, steering);
    let workers = Workers::start(&shared, queues, worker_sockets, dual_stack);
    tracing::info!(
        threads = workers.len(),
        "data path: {}",
        if workers.len() > 0 {
            "one thread per CPU, pinned, beside the control loop"
        } else {
            "the control loop alone"
        }
    );

    let (control_tx, mut control_rx) = mpsc::channel::<(Request, oneshot::Sender<String>)>(16);
    if let Some(listener) = metrics_listener {
        tokio::spawn(crate::metrics::serve(listener, control_tx.clone()));
    }
    tokio::spawn(serve_control(listener, control_tx));

    let mut sigterm = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut sigint = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let mut sighup = signal(SignalKind::hangup()).context("installing the SIGHUP handler")?;
    let mut endpoint_timer = tokio::time::interval(ENDPOINT_REFRESH);
    let mut stream = RelayStreams::new(&relays);
    let mut step = Step::new();
    let (mut extra, mut extra_rx) = ExtraSockets::new();
    let mut pings = PendingPings::default();
    let mut rotation = RotationWaiter::default();
    let mut cfg = cfg;
    let mut progress = Progress::new(Instant::now(), &relay.host_port());
    let (mapper, mut mapping) = if cfg.port_mapping {
        let (m, rx) = PortMapper::spawn(port);
        (Some(m), Some(rx))
    } else {
        (None, None)
    };

    loop {
        let mut node = shared.node.lock().await;
        let mut io = Executor {
            udp: &mut udp,
            tun: &mut tun,
            stream: &mut stream,
            extra: &mut extra,
            pings: &mut pings,
            progress: &mut progress,
            rotation: &mut rotation,
            names: &mut names,
        };
        io.drain(&mut node, &mut step).await;
        names.refresh_if_changed(&node);
        if let Some(secret) = rotation.new_secret.take() {
            // The network has a new secret: keep it, then run a fresh node on it. Sessions
            // restart (new network id, control key and WireGuard preshared key); the TUN,
            // the sockets and the control socket stay.
            cfg.secret = secret;
            match cfg.save(state_dir) {
                Ok(path) => {
                    tracing::info!(config = %path.display(), "network secret rotated; saved the new secret and rejoining under it")
                }
                Err(e) => {
                    tracing::error!(%e, "network secret rotated but the config could not be saved; the agent uses the new secret until it stops")
                }
            }
            rotation.answer_token(&cfg);
            save_floors(&node, &floors_path, &mut saved_floors);
            let addrs: Vec<SocketAddr> = (0..node.relay_count())
                .filter_map(|r| node.relay_addr(r))
                .collect();
            *node = start_node(&cfg, &addrs, &stun_servers, &floors_path);
            node.set_local_endpoints(Instant::now(), local_endpoints(port, &ifname, dual_stack));
            stream.close_all();
            extra.retain(&node.active_sockets());
            continue;
        }
        pings.expire(Instant::now());
        progress.tick(Instant::now());
        shared.maybe_spread(Instant::now());
        // The node's deadline, or the agent's own (a ping's timeout, a progress hint).
        let deadline = [
            node.poll_timeout().map(|(at, _)| at),
            pings.poll_timeout(),
            progress.poll_timeout(),
            shared.spread_at(),
        ]
        .into_iter()
        .flatten()
        .min()
        .unwrap_or_else(|| Instant::now() + IDLE_WAKE);
        shared.arm(deadline);
        drop(node);
        let deadline = tokio::time::Instant::from_std(deadline);
        tokio::select! {
            r = udp.readable() => match r {
                Ok(()) => {
                    let mut node = shared.node.lock().await;
                    let now = Instant::now();
                    let n = udp.receive(READ_BUDGET, |from, bytes| node.handle_udp(now, from, bytes));
                    shared.note_batch(n, now);
                }
                Err(e) => tracing::debug!(%e, "UDP socket failed"),
            },
            Some((n, from, bytes)) = extra_rx.recv() => shared.node.lock().await.handle_udp_on(Instant::now(), n, sockaddr::unmap(from), &bytes),
            (r, ev) = stream.recv() => { let mut node = shared.node.lock().await; match ev {
                StreamEvent::Datagram(d) => node.handle_relay_stream(Instant::now(), r, &d),
                StreamEvent::Connected(result) => match stream.get(r).and_then(|s| s.handle_connected(result)) {
                    Some(kind) => node.handle_relay_stream_up(Instant::now(), r, kind),
                    None => node.handle_relay_stream_down(Instant::now(), r),
                },
                StreamEvent::Closed => {
                    if let Some(s) = stream.get(r) {
                        s.handle_closed();
                    }
                    node.handle_relay_stream_down(Instant::now(), r);
                }
            }},
            r = tun.readable() => match r {
                Ok(()) => {
                    let mut node = shared.node.lock().await;
                    let now = Instant::now();
                    let n = tun.receive(READ_BUDGET, |packet| node.handle_tun_packet(now, packet));
                    shared.note_batch(n, now);
                }
                Err(e) => tracing::debug!(%e, "TUN device failed"),
            },
            _ = tokio::time::sleep_until(deadline) => shared.node.lock().await.handle_timeout(Instant::now()),
            () = shared.wake.notified() => {}
            Some((req, reply)) = control_rx.recv() => { let mut node = shared.node.lock().await; match req {
                Request::Status => {
                    let now = Instant::now();
                    let mut status = node.status(now);
                    names.annotate(&mut status);
                    let ready = node.is_synced();
                    let answer = crate::status::NetworkStatus { status, ready };
                    let _ = reply.send(serde_json::to_string(&answer).unwrap_or_default());
                }
                Request::Ping(peer) => pings.start(&mut node, Instant::now(), &peer, reply),
                Request::Rotate { exclude } => rotation.start(&mut node, Instant::now(), exclude.as_deref(), reply),
                Request::Down => {
                    let _ = reply.send("{\"ok\":true}".into());
                    tracing::info!("asked to go down over the control socket");
                    break;
                }
            }},
            Ok(()) = changed(&mut mapping) => {
                let mut node = shared.node.lock().await;
                let current = mapping.as_ref().and_then(|m| *m.borrow());
                node.set_port_mapping(Instant::now(), current.map(|m| (m.protocol.to_string(), m.external)));
            }
            _ = endpoint_timer.tick() => {
                let mut node = shared.node.lock().await;
                node.set_local_endpoints(Instant::now(), local_endpoints(port, &ifname, dual_stack));
                extra.retain(&node.active_sockets());
                save_floors(&node, &floors_path, &mut saved_floors);
                save_peers(&node, &peers_path, &mut saved_peers);
                names.refresh(&node);
            }
            _ = sigterm.recv() => break,
            _ = sigint.recv() => break,
            _ = sighup.recv() => reload::handle_sighup(&mut cfg, state_dir, &log),
        }
    }

    tracing::info!("shutting down: telling the relay we leave");
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
    workers.stop();
    let mut node = shared.node.lock().await;
    node.leave(Instant::now());
    save_floors(&node, &floors_path, &mut saved_floors);
    save_peers(&node, &peers_path, &mut saved_peers);
    let mut io = Executor {
        udp: &mut udp,
        tun: &mut tun,
        stream: &mut stream,
        extra: &mut extra,
        pings: &mut pings,
        progress: &mut progress,
        rotation: &mut rotation,
        names: &mut names,
    };
    io.drain(&mut node, &mut step).await;
    names.stop().await;
    if let Some(m) = mapper {
        m.shutdown().await;
    }
    // Give the TCP writer a moment to flush the goodbye.
    if stream.any_up() {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    drop(tun);
    Ok(())
}

/// The steering of the per-CPU data path over `queues` (whose CPU program is attached) and
/// `sockets`; none without them.
fn steering_for(
    queues: &[tun::TunQueue],
    sockets: &[std::net::UdpSocket],
) -> Option<cpus::Steering> {
    let first = queues.first()?;
    cpus::Steering::new(Some(first), sockets)
        .map_err(|e| tracing::warn!(%e, "cannot hold the TUN queue and sockets for steering; bulk flows stay spread"))
        .ok()
}

/// Executes the node's outputs: the agent's half of the shared [`Step`].
struct Executor<'a> {
    udp: &'a mut UdpIo,
    tun: &'a mut TunIo,
    stream: &'a mut RelayStreams,
    extra: &'a mut ExtraSockets,
    pings: &'a mut PendingPings,
    progress: &'a mut Progress,
    rotation: &'a mut RotationWaiter,
    names: &'a mut dns::Names,
}

impl Executor<'_> {
    /// Sends every queued datagram and TUN packet, opens or closes the relay stream as the node
    /// asks, and logs every event. Datagrams for the main socket are batched (segmented where
    /// the kernel can) and sent when the batch is full and once the node has nothing more.
    async fn drain(&mut self, node: &mut Node, step: &mut Step) {
        let mut stream_lost = None;
        while let Some(output) = step.poll(node) {
            match output {
                Output::Udp {
                    socket: 0,
                    dst,
                    bytes,
                } => {
                    self.udp.queue(dst, bytes);
                    if self.udp.queued() >= udp::SEND_BATCH {
                        self.udp.flush().await;
                        self.report_too_big(node);
                    }
                }
                Output::Udp { socket, dst, bytes } => self.extra.send(socket, dst, bytes).await,
                Output::Stream { relay, bytes } => {
                    if !self.stream.get(relay).is_some_and(|s| s.send(bytes)) {
                        stream_lost = Some(relay);
                    }
                }
                Output::Tun(packet) => {
                    self.tun.queue(packet);
                    if self.tun.queued() >= tun::WRITE_BATCH {
                        self.tun.flush().await;
                    }
                }
                Output::OpenStream { relay, kind } => {
                    if let Some(s) = self.stream.get(relay) {
                        s.open(kind);
                    }
                }
                Output::CloseStream { relay } => {
                    if let Some(s) = self.stream.get(relay) {
                        s.close();
                    }
                }
                Output::Event(ev) => self.event(node, ev),
            }
            if let Some(relay) = stream_lost.take() {
                node.handle_relay_stream_down(Instant::now(), relay);
            }
        }
        self.udp.flush().await;
        self.report_too_big(node);
        self.tun.flush().await;
    }

    /// Tells the node about datagrams the host refused as too large (`EMSGSIZE`), so their
    /// peer's path MTU shrinks at once; what that queues goes out with the next drain.
    fn report_too_big(&mut self, node: &mut Node) {
        for (dst, datagram) in self.udp.take_too_big() {
            node.handle_send_too_big(Instant::now(), dst, &datagram);
        }
    }

    fn event(&mut self, node: &Node, ev: Event) {
        self.progress.on_event(&ev);
        self.names.note_event(&ev);
        match &ev {
            Event::PingResult {
                request,
                rtt,
                direct,
                name,
            } => {
                let via = node
                    .find_peer(name)
                    .map_or(node.primary_relay(), |k| node.relay_for_peer(&k));
                let relayed = match node.relay_stream_kind(via) {
                    Some(StreamKind::Tls) => "relay-tls",
                    Some(StreamKind::Tcp) => "relay-tcp",
                    None => "relay",
                };
                self.pings.answer(*request, *rtt, *direct, relayed);
            }
            Event::SecretRotated { secret, request } => {
                self.rotation.new_secret = Some(secret.clone());
                self.rotation.finished = *request;
            }
            Event::RotationFailed { request, reason } => {
                tracing::warn!(%reason, "rotation failed");
                self.rotation.fail(*request, reason);
            }
            Event::LeftOutOfRotation => log_event(&ev),
            Event::RelayRegistered { .. }
            | Event::RelayLost { .. }
            | Event::PrimaryRelay { .. }
            | Event::RelayKeyMismatch { .. }
            | Event::RelayError { .. }
            | Event::PeerJoined { .. }
            | Event::PeerLeft { .. }
            | Event::PathChanged { .. }
            | Event::VirtualIpConflict { .. } => log_event(&ev),
        }
    }
}

fn log_event(ev: &Event) {
    match ev {
        Event::RelayRegistered { relay, observed } => {
            tracing::info!(relay, %observed, "registered with the relay")
        }
        Event::RelayLost { relay } => tracing::warn!(
            relay,
            "a relay stopped answering; retrying with backoff (direct paths keep working, relayed ones move to another relay)"
        ),
        Event::PrimaryRelay { relay, from } => {
            tracing::warn!(relay, from, "following another relay for the member list")
        }
        Event::RelayKeyMismatch {
            addr,
            expected,
            got,
        } => tracing::error!(
            %addr, expected = %expected, got = %got,
            "the relay at this address cannot prove the key named in the token; not trusting it"
        ),
        Event::RelayError { relay, message } => {
            tracing::error!(relay, %message, "the relay refused our request")
        }
        Event::PeerJoined {
            key,
            name,
            virtual_ip,
        } => tracing::info!(peer = %name, %virtual_ip, key = %key.short(), "peer joined"),
        Event::PeerLeft { key, name } => {
            tracing::info!(peer = %name, key = %key.short(), "peer left")
        }
        Event::PathChanged { name, path, .. } => match path {
            node::peer::Path::Direct { addr, rtt, .. } => {
                tracing::info!(peer = %name, %addr, rtt_ms = rtt.as_secs_f64() * 1000.0, "direct path")
            }
            node::peer::Path::Relayed => tracing::info!(peer = %name, "path via relay"),
        },
        Event::PingResult { .. }
        | Event::SecretRotated { .. }
        | Event::RotationFailed { .. } => {}
        Event::LeftOutOfRotation => tracing::error!(
            "this network's secret was rotated without this member (kicked, or an old token): it reaches nobody; ask a member for a current token (`meshvpn invite`)"
        ),
        Event::VirtualIpConflict {
            ip,
            owner,
            loser,
            we_lost,
        } => {
            if *we_lost {
                tracing::error!(%ip, owner = %owner.short(), "another member holds our virtual IP; we get no traffic until it leaves (pick another address with --ip)")
            } else {
                tracing::warn!(%ip, owner = %owner.short(), loser = %loser.short(), "two members claim one virtual IP; the owner keeps it")
            }
        }
    }
}

/// Waits for the port mapping to change; pending forever without a port mapper.
async fn changed(
    rx: &mut Option<tokio::sync::watch::Receiver<Option<PortMapping>>>,
) -> Result<(), ()> {
    match rx {
        Some(rx) => rx.changed().await.map_err(|_| ()),
        None => std::future::pending().await,
    }
}

/// Builds the node for `cfg` (its announcement floors restored from `floors_path`).
fn start_node(
    cfg: &Config,
    relay_addrs: &[SocketAddr],
    stun_servers: &[SocketAddr],
    floors_path: &Path,
) -> Node {
    let relays = cfg
        .relays
        .iter()
        .zip(relay_addrs)
        .map(|(relay, addr)| RelayTarget {
            key: relay.key,
            addr: *addr,
            tls: relay.tls.is_some(),
        })
        .collect();
    let unix_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    let mut node = Node::new(
        NodeConfig {
            secret: cfg.private_key.clone(),
            network_secret: cfg.secret.clone(),
            network_name: cfg.network.clone(),
            name: cfg.name.clone(),
            virtual_ip: cfg.virtual_ip,
            subnet: cfg.subnet,
            relays,
            stun_servers: stun_servers.to_vec(),
            seed: rand::rngs::OsRng.next_u64(),
            relay_for_peers: cfg.relay_for_peers,
        },
        Instant::now(),
        unix_ms,
    );
    node.restore_announcement_floors(floors::load(floors_path));
    node.set_tun_mtu(Instant::now(), cfg.mtu);
    node
}

/// A control-socket rotation request waiting for its upload, and a new secret to switch to.
#[derive(Default)]
struct RotationWaiter {
    next: u64,
    waiting: Option<(u64, oneshot::Sender<String>)>,
    /// Set by [`Event::SecretRotated`]: the loop saves it and restarts the node on it.
    new_secret: Option<crate::keys::NetworkSecret>,
    /// The request id of a rotation of ours that finished, if that is what `new_secret` is.
    finished: Option<u64>,
}

impl RotationWaiter {
    /// Starts a rotation for every member this node knows of (current peers and every key it
    /// has seen announced), without `exclude` (a name, virtual IP or public key) if given.
    fn start(
        &mut self,
        node: &mut Node,
        now: Instant,
        exclude: Option<&str>,
        reply: oneshot::Sender<String>,
    ) {
        let mut recipients: Vec<crate::keys::PeerKey> = node.peer_keys().copied().collect();
        recipients.extend(node.announcement_floors().into_iter().map(|(k, _)| k));
        recipients.sort();
        recipients.dedup();
        if let Some(member) = exclude {
            let key = node.find_peer(member).or_else(|| {
                crate::keys::PeerKey::from_base64(member).filter(|k| recipients.contains(k))
            });
            let Some(key) = key else {
                let _ = reply.send(control::error_reply(&format!(
                    "no member named, addressed or keyed {member:?} (see `meshvpn peers`)"
                )));
                return;
            };
            if key == node.public_key() {
                let _ = reply.send(control::error_reply(
                    "this member cannot kick itself (run `meshvpn kick` on another member)",
                ));
                return;
            }
            recipients.retain(|k| *k != key);
            tracing::info!(member = %member, key = %key.short(), "kicking a member: rotating the secret without it");
        }
        if self.waiting.is_some() {
            let _ = reply.send(control::error_reply("a rotation is already running"));
            return;
        }
        self.next += 1;
        let secret = crate::keys::NetworkSecret::generate(&mut rand::rngs::OsRng);
        match node.start_rotation(now, secret, &recipients, self.next) {
            Ok(()) => {
                tracing::info!(recipients = recipients.len(), "rotating the network secret");
                self.waiting = Some((self.next, reply));
            }
            Err(e) => {
                let _ = reply.send(control::error_reply(&e.to_string()));
            }
        }
    }

    /// The reply channel of the waiting request if it is `request`'s.
    fn take_waiting(&mut self, request: u64) -> Option<oneshot::Sender<String>> {
        match self.waiting.take() {
            Some((id, reply)) if id == request => Some(reply),
            other => {
                self.waiting = other;
                None
            }
        }
    }

    fn fail(&mut self, request: u64, reason: &str) {
        if let Some(reply) = self.take_waiting(request) {
            let _ = reply.send(control::error_reply(reason));
        }
    }

    /// Answers the waiting request, if the rotation that finished is its own, with the token
    /// of `cfg` (which holds the new secret).
    fn answer_token(&mut self, cfg: &Config) {
        let Some(finished) = self.finished.take() else {
            return;
        };
        if let Some(reply) = self.take_waiting(finished) {
            let answer = control::RotateReply {
                ok: true,
                token: Some(cfg.token().encode()),
                error: None,
            };
            let _ = reply.send(serde_json::to_string(&answer).unwrap_or_default());
        }
    }
}

/// Control-socket ping requests waiting for their pong.
#[derive(Default)]
struct PendingPings {
    next: u64,
    waiting: std::collections::BTreeMap<u64, (String, oneshot::Sender<String>, Instant)>,
}

impl PendingPings {
    fn start(&mut self, node: &mut Node, now: Instant, peer: &str, reply: oneshot::Sender<String>) {
        let Some(key) = node.find_peer(peer) else {
            let _ = reply.send(ping_reply(
                peer,
                None,
                None,
                "",
                Some(format!("no member named or addressed {peer:?}")),
            ));
            return;
        };
        self.next += 1;
        node.ping_peer(now, &key, self.next);
        self.waiting.insert(
            self.next,
            (peer.to_string(), reply, now + control::PING_TIMEOUT),
        );
    }

    fn answer(&mut self, request: u64, rtt: Duration, direct: Option<SocketAddr>, relayed: &str) {
        if let Some((peer, reply, _)) = self.waiting.remove(&request) {
            let path = if direct.is_some() { "direct" } else { relayed };
            let _ = reply.send(ping_reply(&peer, Some(rtt), direct, path, None));
        }
    }

    /// When the oldest waiting ping times out.
    fn poll_timeout(&self) -> Option<Instant> {
        self.waiting
            .values()
            .map(|(_, _, deadline)| *deadline)
            .min()
    }

    fn expire(&mut self, now: Instant) {
        let late: Vec<u64> = self
            .waiting
            .iter()
            .filter(|(_, (_, _, d))| *d <= now)
            .map(|(id, _)| *id)
            .collect();
        for id in late {
            if let Some((peer, reply, _)) = self.waiting.remove(&id) {
                let _ = reply.send(ping_reply(
                    &peer,
                    None,
                    None,
                    "",
                    Some(format!("no answer within {:?}", control::PING_TIMEOUT)),
                ));
            }
        }
    }
}

fn ping_reply(
    peer: &str,
    rtt: Option<Duration>,
    direct: Option<SocketAddr>,
    path: &str,
    error: Option<String>,
) -> String {
    let reply = control::PingReply {
        peer: peer.to_string(),
        ok: rtt.is_some(),
        path: rtt.map(|_| path.to_string()),
        endpoint: direct.map(|a| a.to_string()),
        rtt_ms: rtt.map(|d| (d.as_secs_f64() * 10_000.0).round() / 10.0),
        error,
    };
    serde_json::to_string(&reply).unwrap_or_default()
}

fn local_endpoints(port: u16, ifname: &str, dual_stack: bool) -> Vec<SocketAddr> {
    ifaddrs::host_addresses(ifname)
        .into_iter()
        .filter(|ip| node::is_announceable(ip) && (dual_stack || ip.is_ipv4()))
        .map(|ip| SocketAddr::new(ip, port))
        .collect()
}

/// Resolves the configured extra STUN servers; ones that do not resolve are skipped (logged).
async fn resolve_stun_servers(servers: &[String]) -> Vec<SocketAddr> {
    let mut out = Vec::new();
    for s in servers {
        match tokio::net::lookup_host(s.as_str()).await {
            Ok(mut addrs) => match addrs.find(SocketAddr::is_ipv4) {
                Some(a) => out.push(a),
                None => tracing::warn!(server = %s, "STUN server has no IPv4 address; skipping it"),
            },
            Err(e) => tracing::warn!(server = %s, %e, "cannot resolve STUN server; skipping it"),
        }
    }
    out
}

/// Resolves the relay's address, retrying with backoff until it resolves.
/// Resolves every relay, concurrently (each as [`resolve_relay`] does).
async fn resolve_relays(relays: &[RelayEndpoint]) -> Vec<SocketAddr> {
    futures_util::future::join_all(relays.iter().map(resolve_relay)).await
}

async fn resolve_relay(relay: &RelayEndpoint) -> SocketAddr {
    let mut wait = Duration::from_secs(1);
    loop {
        match tokio::net::lookup_host(relay.host_port()).await {
            Ok(mut addrs) => {
                let all: Vec<SocketAddr> = addrs.by_ref().collect();
                if let Some(a) = all.iter().find(|a| a.is_ipv4()).or(all.first()) {
                    return *a;
                }
                tracing::warn!(relay = %relay.host_port(), "relay host name has no addresses; retrying");
            }
            Err(e) => {
                tracing::warn!(relay = %relay.host_port(), %e, "cannot resolve the relay; retrying")
            }
        }
        tokio::time::sleep(wait).await;
        wait = (wait * 2).min(RESOLVE_RETRY_MAX);
    }
}

async fn bind_control(run_dir: &Path, path: &Path) -> anyhow::Result<UnixListener> {
    if !run_dir.exists() {
        std::fs::create_dir_all(run_dir)
            .with_context(|| format!("creating run directory {}", run_dir.display()))?;
        std::fs::set_permissions(run_dir, std::fs::Permissions::from_mode(0o755))
            .with_context(|| format!("setting permissions of {}", run_dir.display()))?;
    }
    if path.exists() {
        if tokio::net::UnixStream::connect(path).await.is_ok() {
            bail!(
                "an agent for this network is already running (control socket {} answers)",
                path.display()
            );
        }
        std::fs::remove_file(path)
            .with_context(|| format!("removing stale control socket {}", path.display()))?;
    }
    let listener = UnixListener::bind(path)
        .with_context(|| format!("binding control socket {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("setting permissions of {}", path.display()))?;
    Ok(listener)
}

async fn serve_control(
    listener: UnixListener,
    tx: mpsc::Sender<(Request, oneshot::Sender<String>)>,
) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let tx = tx.clone();
        tokio::spawn(async move {
            let (read, mut write) = stream.into_split();
            let mut line = String::new();
            let mut reader = BufReader::new(read);
            if tokio::time::timeout(Duration::from_secs(5), reader.read_line(&mut line))
                .await
                .is_err()
            {
                return;
            }
            let Some(req) = Request::parse(&line) else {
                let _ = write.write_all(b"{\"error\":\"unknown request\"}\n").await;
                return;
            };
            let (reply_tx, reply_rx) = oneshot::channel();
            if tx.send((req, reply_tx)).await.is_err() {
                return;
            }
            if let Ok(answer) = reply_rx.await {
                let _ = write.write_all(answer.as_bytes()).await;
                let _ = write.write_all(b"\n").await;
            }
        });
    }
}

struct RemoveOnDrop(std::path::PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Saves the members `node` knows to `path` when they changed since `saved` (the text last
/// written), so a restart while every relay is down still finds them.
fn save_peers(node: &Node, path: &Path, saved: &mut String) {
    let entries = node.member_entries();
    if entries.is_empty() && saved.is_empty() {
        return;
    }
    let text = remembered::render(&entries);
    if text == *saved {
        return;
    }
    match remembered::save(path, &entries) {
        Ok(()) => *saved = text,
        Err(e) => tracing::warn!(path = %path.display(), %e, "cannot save the remembered members"),
    }
}

/// Persists the node's announcement floors if they changed since `saved`.
fn save_floors(node: &Node, path: &Path, saved: &mut Vec<(crate::keys::PeerKey, u64)>) {
    let floors = node.announcement_floors();
    if floors == *saved {
        return;
    }
    match floors::save(path, &floors) {
        Ok(()) => *saved = floors,
        Err(e) => tracing::warn!(path = %path.display(), %e, "cannot save the announcement floors"),
    }
}
