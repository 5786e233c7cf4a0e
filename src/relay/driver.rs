//! The relay's tokio driver: the UDP sockets, the TCP listener and the control socket feeding
//! [`RelayServer`], with the TCP limits of [`ConnTable`] applied.
//!
//! One loop waits for the first of: a datagram on the main UDP port, a STUN request on the
//! second port, an accepted stream, an event from a connection task, a status request, a
//! deadline (member expiry or a connection's registration/idle deadline) or a signal. Each input
//! is fed to the server with `Instant::now()` and its outputs are drained at once: datagrams for
//! TCP links go to their connection's queue, datagrams for UDP links into the main socket's send
//! batch. At the end of every wake-up the batch is flushed.
//!
//! The main port is a `udp_batch::UdpIo`: when it is readable the loop reads, with `recvmmsg`
//! and GRO, every datagram waiting until the socket would block or about [`UDP_BATCH`] were read
//! (it never waits for more to arrive), feeding each to the server as it comes. The flush sends
//! consecutive outputs to one destination of one size (the last may be shorter) as one
//! segmented send (UDP GSO), which is what relaying a bulk stream between two members produces;
//! a device that refuses segmentation gets the batch again datagram by datagram.
//!
//! Outputs also tell the loop which TCP connections speak for a registered member: a sealed
//! reply or a forwarded packet caused by a frame marks that frame valid (see
//! [`super::limits`]). Every limit that trips is counted and logged through a [`LogLimiter`].

#![allow(clippy::disallowed_methods, clippy::disallowed_types)] // the driver: owns the clock, tasks, sockets and the key's randomness

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use rand::RngCore;
use tokio::net::{TcpListener, UdpSocket};
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::control::{self, StatusRequest};
use super::limits::{self, CloseReason, ConnTable, Limit, LogLimiter, TcpLimits};
use super::listener::{self, Accepted, ConnEvent};
use super::rotation_store;
use super::server::{Link, RelayServer, Transmit, UnixClock};
use super::status::{Descriptors, RelayStatus, TcpStatus, UdpCounters};
use super::ws::{self, Framing};
use crate::config::write_atomic;
use crate::keys::NodeSecret;
use crate::sockaddr;
use crate::udp_batch::{Outbox, UdpIo};
use crate::wire::stun;
use crate::wire::token::TlsEndpoint;

/// File in the config directory that holds the relay's private key.
pub const KEY_FILE: &str = "relay.key";

/// Loads the relay key from `<config_dir>/relay.key`, creating it (0600) on first start.
pub fn load_or_create_key(config_dir: &Path) -> anyhow::Result<NodeSecret> {
    let path = config_dir.join(KEY_FILE);
    match std::fs::read_to_string(&path) {
        Ok(text) => NodeSecret::from_base64(&text)
            .with_context(|| format!("{}: not a base64 32-byte private key", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let key = NodeSecret::generate(&mut rand::rngs::OsRng);
            write_atomic(&path, format!("{}\n", key.to_base64()).as_bytes())
                .with_context(|| format!("writing relay key {}", path.display()))?;
            Ok(key)
        }
        Err(e) => Err(e).with_context(|| format!("reading relay key {}", path.display())),
    }
}

/// Datagrams taken from the main UDP socket per wake-up before the loop looks at its other
/// inputs: amortises the wake-up under load without letting UDP starve TCP or timers. It is
/// checked between `recvmmsg` calls, so a wake-up may read up to one call more (32 slots, each
/// a GRO run from one sender); the outputs of those reads are what one flush sends.
const UDP_BATCH: usize = 64;
/// Events from connection tasks waiting for the loop; a full queue makes the tasks wait, which
/// pushes back on their streams.
const CONN_EVENT_QUEUE: usize = 1024;
/// Accepted streams waiting for the loop.
const ACCEPT_QUEUE: usize = 64;
/// Wake-up when nothing is scheduled (the loop only needs it to re-arm).
const IDLE_WAKE: Duration = Duration::from_secs(3600);

/// How the relay is run: addresses, directories and limit overrides.
#[derive(Debug, Clone)]
pub struct RelayOptions {
    /// UDP and TCP address (the second STUN port is the next one).
    pub listen: SocketAddr,
    /// WebSocket listeners (TLS and plain), if any.
    pub ws: super::ws::WsOptions,
    /// Where the relay's key lives.
    pub config_dir: PathBuf,
    /// Where its control socket goes.
    pub run_dir: PathBuf,
    /// Cap on TCP connections (never above what the descriptor limit allows).
    pub tcp_max_connections: Option<usize>,
    /// Cap on TCP connections from one source (default: `max(8, slots / 64)`).
    pub tcp_per_source: Option<usize>,
    /// Member, network and budget caps of the server.
    pub server: super::server::ServerConfig,
    /// Where to serve Prometheus metrics (`GET /metrics`), if anywhere.
    pub metrics: Option<SocketAddr>,
}

/// One open TCP connection as the loop holds it.
struct Connection {
    remote: SocketAddr,
    outbound: mpsc::UnboundedSender<Vec<u8>>,
    task: JoinHandle<()>,
}

/// Everything the loop owns besides the sockets.
struct Relay {
    server: RelayServer,
    table: ConnTable,
    conns: BTreeMap<u64, Connection>,
    log: LogLimiter,
    udp: UdpCounters,
}

/// Runs the relay until SIGINT or SIGTERM.
pub async fn run(opts: &RelayOptions) -> anyhow::Result<()> {
    let listen = opts.listen;
    let key = load_or_create_key(&opts.config_dir)?;
    let descriptors = listener::raise_descriptor_limit();
    let limits = TcpLimits::for_descriptors(descriptors.soft)
        .with_overrides(opts.tcp_max_connections, opts.tcp_per_source);
    let socket = UdpSocket::bind(listen).await.map_err(|e| {
        if e.kind() == std::io::ErrorKind::AddrInUse {
            anyhow::anyhow!("UDP {listen} is already in use (is another relay running?)")
        } else {
            anyhow::anyhow!("binding UDP {listen}: {e}")
        }
    })?;
    // `--listen [::]:3478` gives a dual-stack socket: IPv4 members arrive IPv4-mapped. The
    // socket asks for 4 MiB buffers each way: a burst (a flood, or many members at once) of
    // about 3,000 full-size datagrams waits while the loop is busy.
    let mut udp_io = UdpIo::new(socket, listen.is_ipv6())
        .with_context(|| format!("setting up UDP {listen} for batched reads and writes"))?;
    tracing::info!(
        bytes = udp_io.recv_buffer_size().unwrap_or(0),
        "UDP receive buffer"
    );
    let start_us = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0);
    // A second port that answers STUN only: two destinations let members tell an
    // endpoint-independent mapping from a symmetric one.
    let alt_addr = SocketAddr::new(listen.ip(), listen.port().wrapping_add(1));
    let alt = UdpSocket::bind(alt_addr)
        .await
        .map_err(|e| anyhow::anyhow!("binding the second STUN port UDP {alt_addr}: {e}"))?;
    // TCP on the same port, for members whose UDP is blocked.
    let tcp = TcpListener::bind(listen).await.map_err(|e| {
        if e.kind() == std::io::ErrorKind::AddrInUse {
            anyhow::anyhow!("TCP {listen} is already in use (is another relay running?)")
        } else {
            anyhow::anyhow!("binding TCP {listen}: {e}")
        }
    })?;
    let path: std::sync::Arc<str> = opts.ws.path.as_str().into();
    let mut stream_listeners = vec![(tcp, Framing::Tcp)];
    let mut tls_endpoint = None;
    if let Some(addr) = opts.ws.tls_listen {
        let acceptor = ws::tls_acceptor(opts.ws.cert.as_ref(), &opts.config_dir)?;
        let l = bind_tcp(addr, "--tls-listen").await?;
        stream_listeners.push((
            l,
            Framing::WebSocket {
                tls: Some(acceptor),
                path: path.clone(),
            },
        ));
        tls_endpoint = Some(TlsEndpoint {
            port: addr.port(),
            path: opts.ws.path.clone(),
        });
        tracing::info!(%addr, path = %opts.ws.path, "serving WebSocket over TLS");
    }
    if let Some(port) = opts.ws.advertise_tls {
        tls_endpoint = Some(TlsEndpoint {
            port,
            path: opts.ws.path.clone(),
        });
    }
    if let Some(addr) = opts.ws.ws_listen {
        let l = bind_tcp(addr, "--ws-listen").await?;
        stream_listeners.push((l, Framing::WebSocket { tls: None, path }));
        tracing::info!(%addr, path = %opts.ws.path, "serving plain WebSocket");
    }
    // Without its control socket the relay still relays; only `relay-status` is lost.
    let control_path = control::socket_path(&opts.run_dir);
    let control_listener = match control::bind(&opts.run_dir).await {
        Ok(l) => Some(l),
        Err(e) => {
            tracing::warn!(
                "no control socket, so `meshvpn relay-status` cannot reach this relay: {e:#} (pass a writable --run-dir)"
            );
            None
        }
    };
    let rotations_path = rotation_store::path(&opts.config_dir);
    let mut relay = Relay {
        server: RelayServer::new(
            key,
            rand::rngs::OsRng.next_u64(),
            UnixClock {
                at: Instant::now(),
                unix_ms: start_us / 1000,
            },
        )
        .with_sequence_start(start_us)
        .with_config(opts.server.clone())
        .with_tls_endpoint(tls_endpoint)
        .with_cookie_secret({
            let mut secret = [0u8; 32];
            rand::rngs::OsRng.fill_bytes(&mut secret);
            secret
        })
        .with_stored_rotations(rotation_store::load(&rotations_path), Instant::now()),
        table: ConnTable::new(limits),
        conns: BTreeMap::new(),
        log: LogLimiter::default(),
        udp: UdpCounters::default(),
    };
    #[allow(clippy::print_stdout)]
    {
        let mut also = String::new();
        if let Some(addr) = opts.ws.tls_listen {
            also.push_str(&format!("; WebSocket over TLS on {addr}{}", opts.ws.path));
        }
        if let Some(addr) = opts.ws.ws_listen {
            also.push_str(&format!("; plain WebSocket on {addr}{}", opts.ws.path));
        }
        println!(
            "meshvpn relay listening on {listen} (UDP and TCP; STUN also on UDP port {}{also}), public key {}",
            alt_addr.port(),
            relay.server.public_key()
        );
    }
    tracing::info!(
        %listen,
        public_key = %relay.server.public_key(),
        tcp_max_connections = limits.max_connections,
        tcp_per_source = limits.per_source,
        control = %control_path.display(),
        "relay started"
    );
    let started = Instant::now();
    let mut sigterm = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut sigint = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let (accept_tx, mut accepted) = mpsc::channel::<Accepted>(ACCEPT_QUEUE);
    let accept_tasks: Vec<JoinHandle<()>> = stream_listeners
        .into_iter()
        .map(|(l, framing)| tokio::spawn(listener::accept_loop(l, framing, accept_tx.clone())))
        .collect();
    drop(accept_tx);
    let (status_tx, mut status_requests) = mpsc::channel::<StatusRequest>(8);
    let metrics_task = match opts.metrics {
        Some(addr) => {
            let listener = crate::metrics::bind(addr).await?;
            tracing::info!(%addr, "serving metrics on GET /metrics");
            Some(tokio::spawn(super::metrics::serve(
                listener,
                status_tx.clone(),
            )))
        }
        None => None,
    };
    let control_task = control_listener.map(|l| tokio::spawn(control::serve(l, status_tx)));
    let (event_tx, mut events) = mpsc::channel::<ConnEvent>(CONN_EVENT_QUEUE);
    let mut alt_buf = vec![0u8; 1_500];
    let mut saved_rotations = relay.server.rotations_version();
    loop {
        if relay.server.rotations_version() != saved_rotations {
            saved_rotations = relay.server.rotations_version();
            let records = relay.server.stored_rotations(Instant::now());
            match rotation_store::save(&rotations_path, &records) {
                Ok(()) => {
                    tracing::debug!(records = records.len(), path = %rotations_path.display(), "saved the rotation records")
                }
                Err(e) => {
                    tracing::warn!(%e, path = %rotations_path.display(), "cannot save the rotation records; a restart would forget them")
                }
            }
        }
        let now = Instant::now();
        let deadline = [relay.server.poll_timeout(), relay.table.poll_timeout()]
            .into_iter()
            .flatten()
            .min()
            .unwrap_or(now + IDLE_WAKE);
        tokio::select! {
            r = udp_io.readable() => {
                match r {
                    Ok(()) => {
                        udp_io.receive_and_queue(UDP_BATCH, |from, bytes, out| {
                            relay.handle_udp(from, bytes, out);
                        });
                    }
                    Err(e) => tracing::debug!(%e, "UDP socket not readable"),
                }
            }
            r = alt.recv_from(&mut alt_buf) => {
                if let Ok((n, from)) = r {
                    if let Some(answer) = stun::answer(&alt_buf[..n], sockaddr::unmap(from)) {
                        relay.udp.alt_stun_answered += 1;
                        let _ = alt.send_to(&answer, from).await;
                    } else {
                        relay.udp.alt_dropped += 1;
                    }
                }
            }
            _ = tokio::time::sleep_until(tokio::time::Instant::from_std(deadline)) => {
                relay.handle_timeout(&mut udp_io.outbox());
            }
            Some(a) = accepted.recv() => relay.handle_accepted(a, &event_tx),
            Some(ev) = events.recv() => relay.handle_conn_event(&mut udp_io.outbox(), ev),
            Some(reply) = status_requests.recv() => {
                let _ = reply.send(relay.status(opts, descriptors, started));
            }
            _ = sigterm.recv() => break,
            _ = sigint.recv() => break,
        }
        if udp_io.queued() > 0 {
            relay.udp.send_errors += udp_io.flush().await as u64;
        }
    }
    for task in &accept_tasks {
        task.abort();
    }
    for conn in relay.conns.values() {
        conn.task.abort();
    }
    if let Some(task) = metrics_task {
        task.abort();
    }
    if let Some(task) = control_task {
        task.abort();
        if let Err(e) = std::fs::remove_file(&control_path) {
            tracing::debug!(%e, path = %control_path.display(), "removing the control socket");
        }
    }
    let s = relay.server.counters();
    tracing::info!(
        members = relay.server.member_count(),
        forwarded = s.forwarded,
        dropped = s.dropped,
        "relay stopped"
    );
    Ok(())
}

/// Binds a TCP listener, naming the option it came from in the error.
async fn bind_tcp(addr: SocketAddr, option: &str) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr).await.map_err(|e| {
        if e.kind() == std::io::ErrorKind::AddrInUse {
            anyhow::anyhow!("{option}: TCP {addr} is already in use")
        } else {
            anyhow::anyhow!("{option}: binding TCP {addr}: {e}")
        }
    })
}

impl Relay {
    /// One datagram from the main port (`from` already unmapped); its outputs go to `out`.
    fn handle_udp(&mut self, from: SocketAddr, bytes: &[u8], out: &mut Outbox<'_>) {
        self.udp.received += 1;
        self.server
            .handle_datagram(Instant::now(), Link::Udp(from), bytes);
        self.drain(out);
    }

    fn handle_timeout(&mut self, out: &mut Outbox<'_>) {
        let now = Instant::now();
        self.server.handle_timeout(now);
        for (id, reason) in self.table.handle_timeout(now) {
            self.close(now, id, reason);
        }
        self.drain(out);
    }

    fn handle_accepted(&mut self, accepted: Accepted, events: &mpsc::Sender<ConnEvent>) {
        let now = Instant::now();
        match accepted {
            Accepted::Stream(stream, remote, framing) => {
                let remote = sockaddr::unmap(remote);
                match self.table.handle_accept(now, remote) {
                    Ok(id) => {
                        let (outbound, queue) = mpsc::unbounded_channel();
                        let max_frame = self.table.limits().max_frame;
                        let events = events.clone();
                        let task = match framing {
                            Framing::Tcp => tokio::spawn(listener::serve_connection(
                                stream, id, max_frame, queue, events,
                            )),
                            Framing::WebSocket { tls, path } => tokio::spawn(ws::serve_websocket(
                                stream, tls, path, id, max_frame, queue, events,
                            )),
                        };
                        self.conns.insert(
                            id,
                            Connection {
                                remote,
                                outbound,
                                task,
                            },
                        );
                    }
                    Err(refusal) => {
                        // Dropping the stream closes it: the slot is never taken.
                        drop(stream);
                        self.trip(now, refusal.into(), Some(remote));
                    }
                }
            }
            Accepted::Error { descriptors, error } => {
                self.table.handle_accept_error(descriptors);
                if descriptors {
                    if let Some(skipped) = self.log.handle_trip(now, Limit::Descriptors) {
                        tracing::warn!(
                            %error,
                            open = self.conns.len(),
                            not_logged = skipped,
                            "{}",
                            Limit::Descriptors.describe()
                        );
                    }
                } else {
                    tracing::debug!(%error, "TCP accept failed");
                }
            }
        }
    }

    fn handle_conn_event(&mut self, out: &mut Outbox<'_>, event: ConnEvent) {
        let now = Instant::now();
        match event {
            ConnEvent::Frames { id, frames } => {
                for frame in frames {
                    let Some(remote) = self.conns.get(&id).map(|c| c.remote) else {
                        return;
                    };
                    let link = Link::Tcp { id, remote };
                    self.server.handle_datagram(now, link, &frame);
                    if self.drain(out) {
                        self.table.handle_valid(now, id);
                    }
                }
            }
            ConnEvent::Sent { id, bytes } => self.table.handle_sent(id, bytes),
            ConnEvent::FrameTooLong { id, announced } => {
                tracing::debug!(id, announced, "TCP frame over the cap");
                self.table.handle_frame_too_long(id);
                self.forget(id);
                self.trip(now, Limit::FrameTooLong, None);
            }
            ConnEvent::Closed { id } => {
                self.table.handle_closed(id);
                self.forget(id);
            }
        }
        self.drain(out);
    }

    /// Takes every pending output: UDP datagrams into `out` (sent when the loop flushes it at
    /// the end of this wake-up), TCP datagrams onto their connection's queue. `true` if one of
    /// them shows the input came from a member (a sealed reply, only sent after
    /// authentication, or a forwarded packet, only forwarded from the link its sender
    /// registered from).
    fn drain(&mut self, out: &mut Outbox<'_>) -> bool {
        let mut member_traffic = false;
        while let Some(Transmit { link, payload }) = self.server.poll_transmit() {
            member_traffic |= limits::proves_member(&payload);
            match link {
                Link::Udp(dst) => out.queue(dst, &payload),
                Link::Tcp { id, .. } => {
                    let Some(conn) = self.conns.get(&id) else {
                        continue;
                    };
                    // A full queue drops the datagram, as congestion on UDP would.
                    if self.table.handle_enqueue(id, payload.len()) {
                        let _ = conn.outbound.send(payload);
                    } else {
                        self.trip(Instant::now(), Limit::QueueFull, Some(link.addr()));
                    }
                }
            }
        }
        member_traffic
    }

    /// Closes connection `id` for `reason` (the table already removed it).
    fn close(&mut self, now: Instant, id: u64, reason: CloseReason) {
        let remote = self.conns.get(&id).map(|c| c.remote);
        if let Some(conn) = self.conns.get(&id) {
            conn.task.abort();
        }
        self.forget(id);
        self.trip(now, reason.into(), remote);
    }

    /// Drops the loop's side of connection `id` and the member attached through it.
    fn forget(&mut self, id: u64) {
        if let Some(conn) = self.conns.remove(&id) {
            self.server.handle_link_closed(Link::Tcp {
                id,
                remote: conn.remote,
            });
        }
    }

    fn trip(&mut self, now: Instant, limit: Limit, remote: Option<SocketAddr>) {
        if let Some(skipped) = self.log.handle_trip(now, limit) {
            let c = self.table.counters();
            tracing::warn!(
                remote = remote.map(|r| r.to_string()).unwrap_or_default(),
                open = self.table.len(),
                sources = self.table.sources(),
                not_logged = skipped,
                refused_per_source = c.refused_per_source,
                refused_table_full = c.refused_table_full,
                "{}",
                limit.describe()
            );
        }
    }

    fn status(
        &self,
        opts: &RelayOptions,
        descriptors: Descriptors,
        started: Instant,
    ) -> RelayStatus {
        RelayStatus {
            public_key: self.server.public_key().to_string(),
            listen: opts.listen.to_string(),
            uptime_s: started.elapsed().as_secs(),
            members: self.server.member_count(),
            networks: self.server.network_count(),
            descriptors,
            tcp: TcpStatus {
                connections: self.table.len(),
                registered: self.table.registered(),
                sources: self.table.sources(),
                limits: self.table.limits(),
                counters: self.table.counters(),
            },
            udp: self.udp,
            server: self.server.counters(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{self, Frame};

    /// A relay running in this process on loopback, stopped when dropped.
    struct Running {
        addr: SocketAddr,
        task: JoinHandle<anyhow::Result<()>>,
        dir: PathBuf,
    }

    impl Drop for Running {
        fn drop(&mut self) {
            self.task.abort();
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    /// Starts a relay on free loopback ports (retrying if one was taken between probing and
    /// binding) and waits until it answers a key request from `client`.
    async fn start(client: &UdpSocket, request: &[u8]) -> Running {
        let dir = std::env::temp_dir().join(format!("meshvpn-driver-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("temp dir");
        let mut answer = [0u8; 2048];
        for _ in 0..20 {
            let port = std::net::UdpSocket::bind("127.0.0.1:0")
                .and_then(|s| s.local_addr())
                .expect("probe UDP port")
                .port();
            let addr: SocketAddr = ([127, 0, 0, 1], port).into();
            let opts = RelayOptions {
                listen: addr,
                ws: Default::default(),
                config_dir: dir.clone(),
                run_dir: dir.clone(),
                tcp_max_connections: None,
                tcp_per_source: None,
                server: Default::default(),
                metrics: None,
            };
            let task = tokio::spawn(async move { run(&opts).await });
            for _ in 0..50 {
                if task.is_finished() {
                    break;
                }
                client.send_to(request, addr).await.expect("send");
                let wait = Duration::from_millis(100);
                if let Ok(Ok(_)) = tokio::time::timeout(wait, client.recv(&mut answer)).await {
                    return Running { addr, task, dir };
                }
            }
            task.abort();
        }
        panic!("no relay could start on loopback");
    }

    /// A burst of equal requests from one member is answered by equal datagrams to one
    /// destination: the relay's flush sends them as segmented runs where it can, and the
    /// member must still get every answer as a datagram of its own.
    #[tokio::test]
    async fn a_burst_of_requests_gets_every_answer_as_its_own_datagram() {
        const BURST: usize = 48;
        let client = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
        // Padded to the answer's length: the relay answers an unproven address with no more
        // bytes than it sent.
        let mut request = Frame::KeyRequest.to_vec();
        request.resize(wire::RELAY_OVERHEAD, 0);
        let relay = start(&client, &request).await;
        // Answers still in flight from the start-up probes.
        let mut buf = [0u8; 2048];
        while client.try_recv(&mut buf).is_ok() {}
        for _ in 0..BURST {
            client.send_to(&request, relay.addr).await.expect("send");
        }
        let started = Instant::now();
        let mut answers = 0;
        while answers < BURST {
            let n = tokio::time::timeout(Duration::from_secs(5), client.recv(&mut buf))
                .await
                .expect("every answer within 5 s")
                .expect("receive");
            let Ok(Frame::KeyResponse { .. }) = Frame::parse(&buf[..n]) else {
                panic!("not a key response: {:?}", &buf[..n]);
            };
            answers += 1;
        }
        println!("{BURST} answers in {:?}", started.elapsed());
        assert!(
            tokio::time::timeout(Duration::from_millis(200), client.recv(&mut buf))
                .await
                .is_err(),
            "no more datagrams than answers"
        );
    }
}
