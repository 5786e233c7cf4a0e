//! A UDP socket batched both ways, many datagrams per system call (quinn-udp): the agent's
//! main socket and the relay's main port both run on it.
//!
//! # Receive
//! [`UdpIo::receive`] reads with `recvmmsg` ([`quinn_udp::BATCH_SIZE`] slots per call) and, where
//! the kernel offers UDP GRO, each slot may hold a run of datagrams from one sender coalesced
//! by the kernel, `stride` bytes apart (the last may be shorter). Every datagram is handed on
//! on its own, exactly as it came off the wire, so the caller sees the same inputs as with one
//! `recvfrom` per datagram. It reads until the socket would block or a budget is spent, so a
//! wakeup never waits for more traffic (latency) and a flood cannot starve the other inputs.
//!
//! # Send
//! Datagrams are queued in order into one contiguous buffer ([`SendBatch`]). A flush cuts the
//! queue into runs — consecutive datagrams to the same destination of the same size, where the
//! last of a run may be shorter — and sends each run with one `sendmsg` carrying a UDP GSO
//! `segment_size`: the kernel splits it back into exactly the datagrams queued, so segment
//! sizes are the caller's own (they already fit the path, relay framing included). Runs are
//! capped at the socket's probed [`UdpSocketState::max_gso_segments`] and at
//! [`MAX_SEGMENTED_BYTES`]. Some drivers accept the socket option but fail the send with `EIO`
//! or `EINVAL`; then segmentation is switched off for good (logged once) and the run that
//! failed is sent again one datagram at a time, so nothing queued is lost. A send that fails
//! for any other reason drops its run; [`UdpIo::flush`] returns how many datagrams that cost.
//!
//! Addresses are the caller's: IPv4 peers are mapped to IPv4-mapped IPv6 on the way out and
//! unmapped on the way in when the socket is dual-stack ([`crate::sockaddr`]).

use std::io::{self, IoSliceMut};
use std::net::SocketAddr;

use quinn_udp::{RecvMeta, Transmit, UdpSocketState, BATCH_SIZE};
use tokio::io::Interest;
use tokio::net::UdpSocket;

use crate::sockaddr;

/// Largest payload one segmented send may carry: an IPv4 packet's 65,535 bytes less its
/// 20-byte header and the 8-byte UDP header (the kernel refuses a larger GSO buffer).
pub(crate) const MAX_SEGMENTED_BYTES: usize = 65_507;
/// Datagrams queued before a send batch is flushed even though the node has more: a full
/// TSO super-packet from the TUN (64 KB in MTU-sized packets, about 46) fits, and the batch
/// buffer stays under 200 KB.
pub(crate) const SEND_BATCH: usize = 128;
/// Socket buffer size asked for each way: a few milliseconds of a multi-gigabit stream, so a
/// burst that arrives while the agent is busy sealing the other direction is queued rather
/// than dropped (wireguard-go asks for 7 MB; the default is about 200 KB).
const SOCKET_BUFFER: libc::c_int = 4 << 20;
/// One receive slot: large enough for the longest GRO run the kernel builds (64 KB) and for
/// any single datagram.
const SLOT_LEN: usize = 65_536;

/// The main UDP socket with its quinn-udp state, receive slots and send batch.
pub(crate) struct UdpIo {
    socket: UdpSocket,
    state: UdpSocketState,
    dual_stack: bool,
    slots: Vec<u8>,
    meta: [RecvMeta; BATCH_SIZE],
    send: SendBatch,
}

impl UdpIo {
    /// Wraps the bound `socket` (`dual_stack`: an `[::]` socket that also carries IPv4) and
    /// probes what the kernel offers: GSO segments per send, GRO on receive.
    pub(crate) fn new(socket: UdpSocket, dual_stack: bool) -> io::Result<Self> {
        let state = UdpSocketState::new((&socket).into())?;
        // quinn-udp sets "probe" path-MTU discovery (never fragment locally, for QUIC's own
        // MTU probing); WireGuard datagrams keep the kernel default, which fragments a datagram
        // larger than the path rather than dropping it (a jumbo TUN MTU keeps working).
        restore_pmtu_default(&socket, dual_stack);
        grow_buffers(&socket);
        tracing::info!(
            gso_segments = state.max_gso_segments(),
            gro_segments = state.gro_segments(),
            "UDP socket: segmentation offload probed"
        );
        let send = SendBatch::new(state.max_gso_segments());
        Ok(Self {
            socket,
            state,
            dual_stack,
            slots: vec![0u8; SLOT_LEN * BATCH_SIZE],
            meta: [RecvMeta::default(); BATCH_SIZE],
            send,
        })
    }

    /// The socket's local address.
    pub(crate) fn local_addr(&self) -> io::Result<SocketAddr> {
        self.socket.local_addr()
    }

    /// The receive buffer the kernel granted, in bytes (for the log).
    pub(crate) fn recv_buffer_size(&self) -> io::Result<usize> {
        socket2::SockRef::from(&self.socket).recv_buffer_size()
    }

    /// Waits until a datagram may be read.
    pub(crate) async fn readable(&self) -> io::Result<()> {
        self.socket.readable().await
    }

    /// Reads every datagram waiting, until the socket would block or at least `budget`
    /// datagrams were handed to `f` (sender, bytes); returns how many were.
    pub(crate) fn receive(&mut self, budget: usize, mut f: impl FnMut(SocketAddr, &[u8])) -> usize {
        self.receive_and_queue(budget, |from, datagram, _| f(from, datagram))
    }

    /// [`receive`](Self::receive), where `f` may also queue datagrams in answer to each one it
    /// is handed (sent at the next [`flush`](Self::flush)): the relay answers and forwards every
    /// datagram as it reads it.
    pub(crate) fn receive_and_queue(
        &mut self,
        budget: usize,
        mut f: impl FnMut(SocketAddr, &[u8], &mut Outbox<'_>),
    ) -> usize {
        let mut count = 0;
        while count < budget {
            let mut chunks = self.slots.chunks_mut(SLOT_LEN);
            let mut iovs: [IoSliceMut<'_>; BATCH_SIZE] = std::array::from_fn(|_| {
                IoSliceMut::new(
                    chunks
                        .next()
                        .expect("the receive buffer holds BATCH_SIZE slots"),
                )
            });
            let (socket, state, meta) = (&self.socket, &self.state, &mut self.meta);
            let mut outbox = Outbox {
                send: &mut self.send,
                dual_stack: self.dual_stack,
            };
            let n = match socket.try_io(Interest::READABLE, || {
                state.recv(socket.into(), &mut iovs, meta)
            }) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => {
                    tracing::debug!(%e, "UDP receive failed");
                    break;
                }
            };
            for (m, iov) in meta.iter().zip(iovs.iter()).take(n) {
                let from = sockaddr::unmap(m.addr);
                for datagram in segments(&iov[..m.len.min(iov.len())], m.stride) {
                    f(from, datagram, &mut outbox);
                    count += 1;
                }
            }
        }
        count
    }

    /// Queues `bytes` for `dst`; [`flush`](Self::flush) sends them.
    pub(crate) fn queue(&mut self, dst: SocketAddr, bytes: &[u8]) {
        self.outbox().queue(dst, bytes);
    }

    /// The send queue on its own, for code that queues through one type whether or not it is
    /// inside [`receive_and_queue`](Self::receive_and_queue).
    pub(crate) fn outbox(&mut self) -> Outbox<'_> {
        Outbox {
            send: &mut self.send,
            dual_stack: self.dual_stack,
        }
    }

    /// How many datagrams are queued.
    pub(crate) fn queued(&self) -> usize {
        self.send.len()
    }

    /// The datagrams the host refused as too large since the last call (see
    /// [`SendBatch::take_too_big`]).
    pub(crate) fn take_too_big(&mut self) -> Vec<(SocketAddr, Vec<u8>)> {
        self.send.take_too_big()
    }

    /// Sends everything queued, waiting while the socket's send buffer is full; returns how
    /// many datagrams a send error dropped.
    pub(crate) async fn flush(&mut self) -> usize {
        loop {
            let (socket, state, send) = (&self.socket, &self.state, &mut self.send);
            let result = send
                .flush(|t| socket.try_io(Interest::WRITABLE, || state.try_send(socket.into(), t)));
            if result.is_ok() {
                return send.take_dropped();
            }
            if let Err(e) = socket.writable().await {
                tracing::debug!(%e, "UDP socket never became writable; dropping the batch");
                let lost = send.len();
                send.clear();
                return send.take_dropped() + lost;
            }
        }
    }
}

/// The send queue of a [`UdpIo`], borrowed: queued datagrams go out at its next
/// [`flush`](UdpIo::flush).
pub(crate) struct Outbox<'a> {
    send: &'a mut SendBatch,
    dual_stack: bool,
}

impl Outbox<'_> {
    /// Queues `bytes` for `dst`.
    pub(crate) fn queue(&mut self, dst: SocketAddr, bytes: &[u8]) {
        self.send
            .push(sockaddr::for_socket(dst, self.dual_stack), bytes);
    }
}

/// The datagrams of one receive slot: `bytes` cut every `stride` bytes (a GRO run; the last
/// may be shorter); all of it when `stride` is 0 or covers it.
pub(crate) fn segments(bytes: &[u8], stride: usize) -> std::slice::Chunks<'_, u8> {
    bytes.chunks(if stride == 0 {
        bytes.len().max(1)
    } else {
        stride
    })
}

/// Datagrams waiting to be sent, in order, in one contiguous buffer (see the module doc).
#[derive(Debug)]
pub(crate) struct SendBatch {
    bytes: Vec<u8>,
    /// Each queued datagram's destination and length, in order.
    datagrams: Vec<(SocketAddr, usize)>,
    /// The first datagram not yet sent, and where its bytes start.
    next: usize,
    offset: usize,
    /// Most datagrams per send; 1 once segmentation is off.
    max_segments: usize,
    /// Datagrams dropped by send errors since [`take_dropped`](Self::take_dropped).
    dropped: usize,
    /// Datagrams the host refused as too large (`EMSGSIZE`), for the node to shrink the
    /// path MTU of their peer ([`take_too_big`](Self::take_too_big)); at most
    /// [`MAX_TOO_BIG`] between two takes.
    too_big: Vec<(SocketAddr, Vec<u8>)>,
}

/// Most refused datagrams kept for the node between two flushes: one per peer path is all the
/// node needs, and the copy is made only on this rare error.
const MAX_TOO_BIG: usize = 8;

/// One send: `count` datagrams to `dst`, `len` bytes from `start`, `segment` bytes each
/// (the last may be shorter).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Run {
    pub(crate) dst: SocketAddr,
    pub(crate) start: usize,
    pub(crate) len: usize,
    pub(crate) count: usize,
    pub(crate) segment: usize,
}

impl SendBatch {
    /// An empty batch that puts at most `max_segments` datagrams into one send (1: none).
    pub(crate) fn new(max_segments: usize) -> Self {
        Self {
            bytes: Vec::with_capacity(SEND_BATCH * 1500),
            datagrams: Vec::with_capacity(SEND_BATCH),
            next: 0,
            offset: 0,
            max_segments: max_segments.max(1),
            dropped: 0,
            too_big: Vec::new(),
        }
    }

    /// Queues one datagram.
    pub(crate) fn push(&mut self, dst: SocketAddr, datagram: &[u8]) {
        self.bytes.extend_from_slice(datagram);
        self.datagrams.push((dst, datagram.len()));
    }

    /// Datagrams queued and not yet sent.
    pub(crate) fn len(&self) -> usize {
        self.datagrams.len() - self.next
    }

    /// Whether sends are segmented (false once the kernel refused segmentation).
    #[cfg(test)]
    pub(crate) fn segmented(&self) -> bool {
        self.max_segments > 1
    }

    /// How many datagrams send errors dropped since the last call.
    pub(crate) fn take_dropped(&mut self) -> usize {
        std::mem::take(&mut self.dropped)
    }

    /// The datagrams refused as too large since the last call, with their destinations.
    pub(crate) fn take_too_big(&mut self) -> Vec<(SocketAddr, Vec<u8>)> {
        std::mem::take(&mut self.too_big)
    }

    /// Forgets everything queued.
    pub(crate) fn clear(&mut self) {
        self.bytes.clear();
        self.datagrams.clear();
        self.next = 0;
        self.offset = 0;
    }

    /// The next send: the longest run from the first unsent datagram.
    pub(crate) fn next_run(&self) -> Option<Run> {
        let &(dst, segment) = self.datagrams.get(self.next)?;
        let mut run = Run {
            dst,
            start: self.offset,
            len: segment,
            count: 1,
            segment,
        };
        if segment == 0 {
            return Some(run);
        }
        for &(d, len) in &self.datagrams[self.next + 1..] {
            if d != dst
                || len > segment
                || len == 0
                || run.count == self.max_segments
                || run.len + len > MAX_SEGMENTED_BYTES
            {
                break;
            }
            run.count += 1;
            run.len += len;
            if len < segment {
                break;
            }
        }
        Some(run)
    }

    /// Sends every queued datagram through `send`, run by run. Returns the `WouldBlock` error
    /// of `send` (the rest stays queued for the next call); any other error drops that run
    /// (logged at debug), except `EIO`/`EINVAL` on a segmented send, which turns segmentation
    /// off and sends the run again unsegmented.
    pub(crate) fn flush(
        &mut self,
        mut send: impl FnMut(&Transmit<'_>) -> io::Result<()>,
    ) -> io::Result<()> {
        while let Some(run) = self.next_run() {
            let transmit = Transmit {
                destination: run.dst,
                ecn: None,
                contents: &self.bytes[run.start..run.start + run.len],
                segment_size: (run.count > 1).then_some(run.segment),
                src_ip: None,
            };
            match send(&transmit) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Err(e),
                Err(e) if run.count > 1 && refuses_segmentation(&e) => {
                    tracing::warn!(%e, "the kernel refused UDP segmentation offload; sending datagrams one by one from now on");
                    self.max_segments = 1;
                    continue;
                }
                Err(e) => {
                    self.dropped += run.count;
                    if e.raw_os_error() == Some(libc::EMSGSIZE) && self.too_big.len() < MAX_TOO_BIG
                    {
                        let first = run.segment.min(run.len);
                        self.too_big
                            .push((run.dst, self.bytes[run.start..run.start + first].to_vec()));
                    }
                    tracing::debug!(%e, dst = %run.dst, datagrams = run.count, "UDP send failed")
                }
            }
            self.next += run.count;
            self.offset += run.len;
        }
        self.clear();
        Ok(())
    }
}

/// Whether a failed segmented send means the device cannot segment (Linux reports it so).
fn refuses_segmentation(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EIO) | Some(libc::EINVAL))
}

/// Sets path-MTU discovery back to the kernel default ("want": fragment locally when a
/// datagram exceeds the path MTU) for IPv4 and, on a dual-stack socket, IPv6.
fn restore_pmtu_default(socket: &UdpSocket, dual_stack: bool) {
    let mut ok = set_int_option(
        socket,
        libc::IPPROTO_IP,
        libc::IP_MTU_DISCOVER,
        libc::IP_PMTUDISC_WANT,
    );
    if dual_stack {
        ok &= set_int_option(
            socket,
            libc::IPPROTO_IPV6,
            libc::IPV6_MTU_DISCOVER,
            libc::IPV6_PMTUDISC_WANT,
        );
    }
    if !ok {
        tracing::debug!(e = %io::Error::last_os_error(), "cannot restore path-MTU discovery");
    }
}

/// Asks for [`SOCKET_BUFFER`] bytes each way: beyond the system's limit where allowed (the
/// agent has CAP_NET_ADMIN), else up to it.
fn grow_buffers(socket: &UdpSocket) {
    for (force, plain) in [
        (libc::SO_RCVBUFFORCE, libc::SO_RCVBUF),
        (libc::SO_SNDBUFFORCE, libc::SO_SNDBUF),
    ] {
        if !set_int_option(socket, libc::SOL_SOCKET, force, SOCKET_BUFFER)
            && !set_int_option(socket, libc::SOL_SOCKET, plain, SOCKET_BUFFER)
        {
            tracing::debug!(e = %io::Error::last_os_error(), "cannot grow the UDP socket buffers");
        }
    }
}

/// Sets one integer socket option; whether it worked.
fn set_int_option(
    socket: &UdpSocket,
    level: libc::c_int,
    name: libc::c_int,
    value: libc::c_int,
) -> bool {
    use std::os::fd::AsRawFd;
    // SAFETY: a valid socket descriptor, an int option and its size.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            level,
            name,
            std::ptr::from_ref(&value).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    rc == 0
}
#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> SocketAddr {
        s.parse().expect("literal")
    }

    /// A batch of `(destination, length)` datagrams whose bytes tell them apart.
    fn batch(max_segments: usize, datagrams: &[(&str, usize)]) -> SendBatch {
        let mut b = SendBatch::new(max_segments);
        for (i, (dst, len)) in datagrams.iter().enumerate() {
            b.push(addr(dst), &vec![i as u8; *len]);
        }
        b
    }

    /// What the wire sees: each send cut into its datagrams, with its segment size.
    type Sent = Vec<(SocketAddr, Option<usize>, Vec<Vec<u8>>)>;

    fn record(sent: &mut Sent, t: &Transmit<'_>) {
        let datagrams = match t.segment_size {
            Some(s) => t.contents.chunks(s).map(<[u8]>::to_vec).collect(),
            None => vec![t.contents.to_vec()],
        };
        sent.push((t.destination, t.segment_size, datagrams));
    }

    #[test]
    fn runs_group_same_destination_and_size_and_end_at_a_shorter_datagram() {
        const A: &str = "198.51.100.1:51820";
        const B: &str = "[2001:db8::2]:51820";
        let mut b = batch(
            64,
            &[
                (A, 1400),
                (A, 1400),
                (A, 1400),
                (A, 600), // shorter: ends the run, inside it
                (A, 1400),
                (B, 1400), // another destination
                (B, 1500), // larger: a new run
                (A, 100),
            ],
        );
        let mut sent = Sent::new();
        b.flush(|t| {
            record(&mut sent, t);
            Ok(())
        })
        .expect("nothing blocks");
        let shape: Vec<(SocketAddr, Option<usize>, Vec<usize>)> = sent
            .iter()
            .map(|(d, s, g)| (*d, *s, g.iter().map(Vec::len).collect()))
            .collect();
        assert_eq!(
            shape,
            vec![
                (addr(A), Some(1400), vec![1400, 1400, 1400, 600]),
                (addr(A), None, vec![1400]),
                (addr(B), None, vec![1400]),
                (addr(B), None, vec![1500]),
                (addr(A), None, vec![100]),
            ]
        );
        // Every datagram arrives once, in order, unchanged.
        let tags: Vec<u8> = sent
            .iter()
            .flat_map(|(_, _, g)| g.iter().map(|d| d[0]))
            .collect();
        assert_eq!(tags, (0..8).collect::<Vec<u8>>());
        assert_eq!(b.len(), 0);
    }

    #[test]
    fn runs_respect_the_segment_cap_and_the_byte_cap() {
        const A: &str = "198.51.100.1:51820";
        let b = batch(4, &[(A, 100); 10]);
        assert_eq!(b.next_run().map(|r| r.count), Some(4));
        // 1,452-byte datagrams: 45 fit in 65,507 bytes.
        let b = batch(64, &[(A, 1452); 60]);
        let run = b.next_run().expect("queued");
        assert_eq!((run.count, run.len), (45, 45 * 1452));
        assert!(run.len <= MAX_SEGMENTED_BYTES);
        // Without segmentation every datagram is its own send.
        let b = batch(1, &[(A, 100); 3]);
        assert_eq!(b.next_run().map(|r| r.count), Some(1));
        assert!(!b.segmented());
    }

    #[test]
    fn a_datagram_refused_as_too_large_is_kept_for_the_node_once() {
        const A: &str = "198.51.100.1:51820";
        const B: &str = "198.51.100.2:51820";
        let mut b = batch(64, &[(A, 1400), (A, 1400), (B, 100)]);
        let mut sent = Sent::new();
        b.flush(|t| {
            if t.destination == addr(A) {
                return Err(io::Error::from_raw_os_error(libc::EMSGSIZE));
            }
            record(&mut sent, t);
            Ok(())
        })
        .expect("nothing blocks");
        assert_eq!(sent.len(), 1, "the other destination still went out");
        assert_eq!(b.take_dropped(), 2);
        let too_big = b.take_too_big();
        assert_eq!(too_big.len(), 1, "one copy per refused run");
        assert_eq!(too_big[0].0, addr(A));
        assert_eq!(too_big[0].1.len(), 1400, "the first datagram of the run");
        assert_eq!(too_big[0].1[0], 0);
        assert!(b.take_too_big().is_empty(), "taken once");
        // Other errors are only dropped.
        b.push(addr(A), &[1; 10]);
        b.flush(|_| Err(io::Error::from_raw_os_error(libc::ENETUNREACH)))
            .expect("nothing blocks");
        assert!(b.take_too_big().is_empty());
    }

    #[test]
    fn a_refused_segmented_send_is_resent_one_by_one_and_segmentation_stays_off() {
        const A: &str = "198.51.100.1:51820";
        let mut b = batch(64, &[(A, 1000), (A, 1000), (A, 1000), (A, 10)]);
        let mut sent = Sent::new();
        let mut refused = 0;
        b.flush(|t| {
            if t.segment_size.is_some() {
                refused += 1;
                return Err(io::Error::from_raw_os_error(libc::EIO));
            }
            record(&mut sent, t);
            Ok(())
        })
        .expect("nothing blocks");
        assert_eq!(refused, 1, "one refusal turns segmentation off");
        assert!(!b.segmented());
        let tags: Vec<u8> = sent
            .iter()
            .map(|(_, s, g)| {
                assert_eq!(*s, None);
                g[0][0]
            })
            .collect();
        assert_eq!(
            tags,
            vec![0, 1, 2, 3],
            "the refused run went out unsegmented, in order"
        );
        assert_eq!(b.take_dropped(), 0, "nothing was lost");
        // Later batches are not segmented either.
        b.push(addr(A), &[7; 1000]);
        b.push(addr(A), &[8; 1000]);
        assert_eq!(b.next_run().map(|r| r.count), Some(1));
    }

    #[test]
    fn would_block_keeps_the_rest_queued_and_other_errors_drop_only_their_run() {
        const A: &str = "198.51.100.1:51820";
        const B: &str = "198.51.100.2:51820";
        let mut b = batch(64, &[(A, 100), (A, 100), (B, 100), (A, 50)]);
        let mut sent = Sent::new();
        let mut calls = 0;
        let first = b.flush(|t| {
            calls += 1;
            if calls == 2 {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            record(&mut sent, t);
            Ok(())
        });
        assert_eq!(first.map_err(|e| e.kind()), Err(io::ErrorKind::WouldBlock));
        assert_eq!(b.len(), 2, "B's datagram and the last wait");
        b.flush(|t| {
            if t.destination == addr(B) {
                return Err(io::Error::from_raw_os_error(libc::ENETUNREACH));
            }
            record(&mut sent, t);
            Ok(())
        })
        .expect("nothing blocks");
        assert!(b.segmented(), "other errors leave segmentation on");
        assert_eq!(b.take_dropped(), 1, "B's datagram was dropped and counted");
        assert_eq!(b.take_dropped(), 0, "counted once");
        let tags: Vec<u8> = sent
            .iter()
            .flat_map(|(_, _, g)| g.iter().map(|d| d[0]))
            .collect();
        assert_eq!(tags, vec![0, 1, 3]);
    }

    #[test]
    fn a_capped_run_goes_on_in_the_next_send() {
        const A: &str = "198.51.100.1:51820";
        let mut b = batch(4, &[(A, 100); 10]);
        let mut sent = Sent::new();
        b.flush(|t| {
            record(&mut sent, t);
            Ok(())
        })
        .expect("nothing blocks");
        let counts: Vec<usize> = sent.iter().map(|(_, _, g)| g.len()).collect();
        assert_eq!(counts, vec![4, 4, 2]);
        let tags: Vec<u8> = sent
            .iter()
            .flat_map(|(_, _, g)| g.iter().map(|d| d[0]))
            .collect();
        assert_eq!(tags, (0..10).collect::<Vec<u8>>());
    }

    #[test]
    fn a_larger_datagram_after_a_full_one_starts_a_new_run_and_a_same_size_one_after_a_shorter_too()
    {
        const A: &str = "198.51.100.1:51820";
        let b = batch(64, &[(A, 500), (A, 500), (A, 501), (A, 100), (A, 100)]);
        assert_eq!(b.next_run().map(|r| (r.count, r.segment)), Some((2, 500)));
        let b = batch(64, &[(A, 500), (A, 200), (A, 200)]);
        assert_eq!(
            b.next_run().map(|r| (r.count, r.len)),
            Some((2, 700)),
            "the shorter one is the last of its run"
        );
    }

    /// Datagrams flushed through a real loopback socket (segmented where the kernel can) arrive
    /// one by one, in order, unchanged.
    #[tokio::test]
    async fn a_flush_over_loopback_delivers_every_datagram_as_queued() {
        let receiver = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind the receiver");
        receiver
            .set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .expect("timeout");
        let to = receiver.local_addr().expect("receiver address");
        let socket = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
        let mut io = UdpIo::new(socket, false).expect("socket state");
        let mut expected = Vec::new();
        for i in 0..20u8 {
            let len = if i == 9 { 300 } else { 1200 };
            let datagram = vec![i; len];
            io.queue(to, &datagram);
            expected.push(datagram);
        }
        assert_eq!(io.queued(), 20);
        assert_eq!(io.flush().await, 0, "nothing dropped");
        assert_eq!(io.queued(), 0);
        let mut buf = [0u8; 2048];
        for want in &expected {
            let n = receiver.recv(&mut buf).expect("a datagram within 5 s");
            assert_eq!(&buf[..n], &want[..]);
        }
    }

    #[test]
    fn a_gro_slot_splits_at_the_stride() {
        let slot: Vec<u8> = (0..10).collect();
        let parts: Vec<&[u8]> = segments(&slot, 4).collect();
        assert_eq!(parts, vec![&[0, 1, 2, 3][..], &[4, 5, 6, 7], &[8, 9]]);
        assert_eq!(segments(&slot, 0).count(), 1);
        assert_eq!(segments(&slot, 10).count(), 1);
        assert_eq!(segments(&[], 4).count(), 0);
    }
}
