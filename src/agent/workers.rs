//! The per-CPU data path: one thread per CPU, pinned there, moving packets between its own
//! TUN queue and its own UDP socket (see [`super::cpus`] for how the kernel hands each
//! thread the packets of its CPU, and why that matters for latency).
//!
//! # Sharing the node
//! Every thread drives the same [`Node`] (one WireGuard session per peer, one peer table),
//! behind one lock taken once per batch, never per packet: a thread wakes, locks, feeds
//! everything its socket or queue holds (up to [`READ_BUDGET`]), queues the node's datagrams
//! for the main socket and its packets for the TUN, unlocks, and sends. Everything else the
//! node asks for — events, streams to a relay, the extra sockets of a birthday probe, timers
//! — stays with the control loop in [`super::run`]: a thread leaves such output queued
//! (and every datagram behind it, so their order holds) and wakes the control loop whenever
//! the node's next deadline became earlier than the one the loop sleeps on (queued output
//! makes it "now") or the node changed which relay streams it wants.
//!
//! # Funnelling bulk flows
//! Every thread and the control loop report the size of each read ([`Shared::note_batch`]);
//! the first read of [`cpus::BUSY_BATCH`] packets or more funnels every new packet to the
//! control loop, and the control loop spreads them again once [`cpus::FUNNEL_HOLD`] passed
//! without one ([`Shared::maybe_spread`]; see [`cpus::Steering`] for why).
//!
//! A thread stops when [`Workers::stop`] is called, or when the control loop is gone.

#![allow(clippy::disallowed_methods)] // the driver: owns the clock

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Instant;

use tokio::sync::{Mutex, Notify};

use super::cpus::{self, Steering};
use super::tun::{TunIo, TunQueue};
use super::udp::UdpIo;
use super::READ_BUDGET;
use crate::node::driver::{Output, Step};
use crate::node::{Node, StreamKind};

/// What the control loop and the data-path threads share.
pub(crate) struct Shared {
    /// The member's node.
    pub(crate) node: Mutex<Node>,
    /// Wakes the control loop (see the module docs).
    pub(crate) wake: Notify,
    /// The deadline the control loop sleeps on, in nanoseconds after `epoch`.
    armed: AtomicU64,
    epoch: Instant,
    stop: AtomicBool,
    stopped: Notify,
    /// Where the kernel hands packets (none without per-CPU threads).
    funnel: Option<cpus::Funnel>,
}

impl Shared {
    /// Shares `node`; `steering` moves packets between the per-CPU threads and the control
    /// loop (none: there are no per-CPU threads).
    pub(crate) fn new(node: Node, steering: Option<Steering>) -> Arc<Self> {
        Arc::new(Self {
            node: Mutex::new(node),
            wake: Notify::new(),
            armed: AtomicU64::new(0),
            epoch: Instant::now(),
            stop: AtomicBool::new(false),
            stopped: Notify::new(),
            funnel: steering.map(cpus::Funnel::new),
        })
    }

    /// Notes that one read brought `packets` packets at `now` (see [`cpus::Funnel`]); a
    /// funnel wakes the control loop, so it plans when to spread again.
    pub(crate) fn note_batch(&self, packets: usize, now: Instant) {
        if self
            .funnel
            .as_ref()
            .is_some_and(|f| f.note_batch(packets, now))
        {
            tracing::debug!("bulk traffic: the control loop takes every packet");
            self.wake.notify_one();
        }
    }

    /// When the control loop should call [`maybe_spread`](Self::maybe_spread).
    pub(crate) fn spread_at(&self) -> Option<Instant> {
        self.funnel.as_ref().and_then(cpus::Funnel::spread_at)
    }

    /// Hands packets back to the per-CPU threads once the bulk traffic is over.
    pub(crate) fn maybe_spread(&self, now: Instant) {
        if self.funnel.as_ref().is_some_and(|f| f.maybe_spread(now)) {
            tracing::debug!("quiet again: packets go to the thread of their CPU");
        }
    }

    /// Records that the control loop sleeps until `deadline`.
    pub(crate) fn arm(&self, deadline: Instant) {
        self.armed.store(self.nanos(deadline), Ordering::Release);
    }

    fn nanos(&self, at: Instant) -> u64 {
        u64::try_from(at.saturating_duration_since(self.epoch).as_nanos()).unwrap_or(u64::MAX)
    }

    /// Wakes the control loop if `node` now needs it sooner than it planned, or wants other
    /// relay streams than `streams_before` (from [`stream_wants`]).
    fn wake_if_needed(&self, node: &Node, streams_before: u64) {
        let sooner = node
            .poll_timeout()
            .is_some_and(|(at, _)| self.nanos(at) < self.armed.load(Ordering::Acquire));
        if sooner || stream_wants(node) != streams_before {
            tracing::trace!(
                sooner,
                reason = node.poll_timeout().map_or("", |(_, why)| why),
                "a data-path thread wakes the control loop"
            );
            self.wake.notify_one();
        }
    }
}

/// Which stream each relay wants, two bits per relay (for spotting a change).
fn stream_wants(node: &Node) -> u64 {
    (0..node.relay_count().min(32)).fold(0, |acc, relay| {
        let bits = match node.wanted_stream(relay) {
            None => 0,
            Some(StreamKind::Tcp) => 1,
            Some(StreamKind::Tls) => 2,
        };
        acc | (bits << (2 * relay))
    })
}

/// The running data-path threads.
pub(crate) struct Workers {
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
}

impl Workers {
    /// Starts one thread per `(queue, socket)`, thread `i` pinned to CPU `i`.
    pub(crate) fn start(
        shared: &Arc<Shared>,
        queues: Vec<TunQueue>,
        sockets: Vec<std::net::UdpSocket>,
        dual_stack: bool,
    ) -> Self {
        let mut threads = Vec::new();
        for (cpu, (queue, socket)) in queues.into_iter().zip(sockets).enumerate() {
            let shared = shared.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("meshvpn-cpu{cpu}"))
                .spawn(move || thread_main(cpu, &shared, queue, socket, dual_stack));
            match spawned {
                Ok(t) => threads.push(t),
                Err(e) => tracing::error!(%e, cpu, "could not start a data-path thread"),
            }
        }
        Self {
            shared: shared.clone(),
            threads,
        }
    }

    /// How many threads run.
    pub(crate) fn len(&self) -> usize {
        self.threads.len()
    }

    /// Stops every thread and waits for it (each finishes the batch in hand).
    pub(crate) fn stop(self) {
        self.shared.stop.store(true, Ordering::Release);
        self.shared.stopped.notify_waiters();
        for t in self.threads {
            let _ = t.join();
        }
    }
}

fn thread_main(
    cpu: usize,
    shared: &Arc<Shared>,
    queue: TunQueue,
    socket: std::net::UdpSocket,
    dual_stack: bool,
) {
    if let Err(e) = super::cpus::pin_current_thread(cpu) {
        tracing::warn!(%e, cpu, "could not pin a data-path thread to its CPU");
    }
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            tracing::error!(%e, cpu, "could not start a data-path thread's runtime");
            return;
        }
    };
    runtime.block_on(async {
        let udp = tokio::net::UdpSocket::from_std(socket).and_then(|s| UdpIo::new(s, dual_stack));
        let tun = TunIo::from_queue(queue);
        match (udp, tun) {
            (Ok(udp), Ok(tun)) => run(shared, udp, tun).await,
            (Err(e), _) | (_, Err(e)) => {
                tracing::error!(%e, cpu, "could not set up a data-path thread's socket or TUN queue")
            }
        }
    });
}

async fn run(shared: &Shared, mut udp: UdpIo, mut tun: TunIo) {
    let mut step = Step::new();
    loop {
        let stopped = shared.stopped.notified();
        if shared.stop.load(Ordering::Acquire) {
            return;
        }
        tokio::select! {
            r = udp.readable() => match r {
                Ok(()) => {
                    let mut node = shared.node.lock().await;
                    let streams = stream_wants(&node);
                    let now = Instant::now();
                    let n = udp.receive(READ_BUDGET, |from, bytes| node.handle_udp(now, from, bytes));
                    drain(&mut node, &mut step, &mut udp, &mut tun).await;
                    shared.wake_if_needed(&node, streams);
                    shared.note_batch(n, now);
                }
                Err(e) => tracing::debug!(%e, "UDP socket failed"),
            },
            r = tun.readable() => match r {
                Ok(()) => {
                    let mut node = shared.node.lock().await;
                    let streams = stream_wants(&node);
                    let now = Instant::now();
                    let n = tun.receive(READ_BUDGET, |packet| node.handle_tun_packet(now, packet));
                    drain(&mut node, &mut step, &mut udp, &mut tun).await;
                    shared.wake_if_needed(&node, streams);
                    shared.note_batch(n, now);
                }
                Err(e) => tracing::debug!(%e, "TUN queue failed"),
            },
            () = stopped => return,
        }
        udp.flush().await;
        tun.flush().await;
        let too_big = udp.take_too_big();
        if !too_big.is_empty() {
            let mut node = shared.node.lock().await;
            let streams = stream_wants(&node);
            for (dst, datagram) in too_big {
                node.handle_send_too_big(Instant::now(), dst, &datagram);
            }
            drain(&mut node, &mut step, &mut udp, &mut tun).await;
            shared.wake_if_needed(&node, streams);
            drop(node);
            udp.flush().await;
            tun.flush().await;
        }
    }
}

/// Queues the node's data-path output (see [`Step::poll_data`]); sends only a full batch.
async fn drain(node: &mut Node, step: &mut Step, udp: &mut UdpIo, tun: &mut TunIo) {
    while let Some(output) = step.poll_data(node) {
        match output {
            Output::Udp { dst, bytes, .. } => {
                udp.queue(dst, bytes);
                if udp.queued() >= super::udp::SEND_BATCH {
                    udp.flush().await;
                }
            }
            Output::Tun(packet) => {
                tun.queue(packet);
                if tun.queued() >= super::tun::WRITE_BATCH {
                    tun.flush().await;
                }
            }
            Output::Stream { .. }
            | Output::Event(_)
            | Output::OpenStream { .. }
            | Output::CloseStream { .. } => {
                debug_assert!(false, "poll_data yields only datagrams and TUN packets");
            }
        }
    }
}
