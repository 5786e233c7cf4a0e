//! A bounded queue of IP packets held until they can be sent.
//!
//! # Job
//! Two places hold packets from the TUN device briefly instead of dropping them (as Nebula's
//! handshake manager does): a peer link while its WireGuard handshake is in progress, and the
//! node for a virtual IP of the subnet that no member has yet. Both use a [`HoldQueue`].
//!
//! # Bounds
//! A queue is bounded three ways by its [`HoldLimits`]: a count of packets, a total of bytes
//! and an age; to one destination it holds at most `per_destination` packets. A new packet
//! that does not fit pushes out the oldest ones (of its own destination first, when that
//! destination is at its share), since the newest packets are the ones a sender's own
//! retransmission has not replaced yet. [`HoldQueue::push`], [`HoldQueue::expire`] and
//! [`HoldQueue::clear`] return how many packets they dropped, for the caller's drop counters.
//!
//! # Allocation
//! Packets are copied into buffers the queue recycles: a buffer handed out by
//! [`HoldQueue::pop`] comes back through [`HoldQueue::recycle`], and a dropped packet's
//! buffer is kept for the next one, so a queue allocates at most one buffer per slot however
//! many packets pass through it. Nothing here reads a clock: time comes in as `now`.

use std::collections::VecDeque;
use std::net::IpAddr;
use std::time::{Duration, Instant};

/// How much a [`HoldQueue`] holds, and for how long.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct HoldLimits {
    /// Most packets held at once.
    pub(crate) packets: usize,
    /// Most bytes held at once (the sum of the packets' lengths).
    pub(crate) bytes: usize,
    /// Most packets held for one destination.
    pub(crate) per_destination: usize,
    /// A packet held this long is dropped.
    pub(crate) max_age: Duration,
}

/// One held packet.
#[derive(Debug)]
pub(crate) struct Held {
    /// When it was held.
    pub(crate) at: Instant,
    /// Its destination virtual IP (IPv4, or the IPv6 overlay address).
    pub(crate) dst: IpAddr,
    /// The packet; give the buffer back with [`HoldQueue::recycle`].
    pub(crate) packet: Vec<u8>,
}

/// Packets waiting, oldest first, within [`HoldLimits`] (see the module doc).
#[derive(Debug)]
pub(crate) struct HoldQueue {
    limits: HoldLimits,
    held: VecDeque<Held>,
    /// Buffers of packets that left the queue, reused for the next ones.
    spare: Vec<Vec<u8>>,
    bytes: usize,
}

impl HoldQueue {
    /// An empty queue; it allocates nothing until a packet is held.
    pub(crate) fn new(limits: HoldLimits) -> Self {
        Self {
            limits,
            held: VecDeque::new(),
            spare: Vec::new(),
            bytes: 0,
        }
    }

    /// Whether nothing is held.
    pub(crate) fn is_empty(&self) -> bool {
        self.held.is_empty()
    }

    /// How many packets are held.
    pub(crate) fn len(&self) -> usize {
        self.held.len()
    }

    /// Holds a copy of `packet` for `dst`, dropping the oldest packets (of `dst` first, when
    /// `dst` has its share) until it fits; returns how many were dropped, counting `packet`
    /// itself when it alone is over the byte limit.
    pub(crate) fn push(&mut self, now: Instant, dst: impl Into<IpAddr>, packet: &[u8]) -> u64 {
        let dst = dst.into();
        let limits = self.limits;
        if packet.len() > limits.bytes || limits.packets == 0 || limits.per_destination == 0 {
            return 1;
        }
        let mut dropped = 0;
        if self.held.iter().filter(|h| h.dst == dst).count() >= limits.per_destination {
            if let Some(i) = self.held.iter().position(|h| h.dst == dst) {
                self.drop_at(i);
                dropped += 1;
            }
        }
        while self.held.len() >= limits.packets || self.bytes + packet.len() > limits.bytes {
            if !self.drop_at(0) {
                break;
            }
            dropped += 1;
        }
        let mut buf = self.spare.pop().unwrap_or_default();
        buf.clear();
        buf.extend_from_slice(packet);
        self.bytes += buf.len();
        self.held.push_back(Held {
            at: now,
            dst,
            packet: buf,
        });
        dropped
    }

    /// Drops every packet held for [`HoldLimits::max_age`] or longer at `now`; returns how many.
    pub(crate) fn expire(&mut self, now: Instant) -> u64 {
        let mut dropped = 0;
        while self
            .held
            .front()
            .is_some_and(|h| now.saturating_duration_since(h.at) >= self.limits.max_age)
        {
            self.drop_at(0);
            dropped += 1;
        }
        dropped
    }

    /// When the oldest held packet expires; `None` while nothing is held.
    pub(crate) fn next_expiry(&self) -> Option<Instant> {
        self.held.front().map(|h| h.at + self.limits.max_age)
    }

    /// Takes the oldest held packet out.
    pub(crate) fn pop(&mut self) -> Option<Held> {
        self.pop_where(|_| true)
    }

    /// Takes out the oldest held packet whose destination satisfies `wanted`.
    pub(crate) fn pop_where(&mut self, mut wanted: impl FnMut(IpAddr) -> bool) -> Option<Held> {
        let i = self.held.iter().position(|h| wanted(h.dst))?;
        let held = self.held.remove(i)?;
        self.bytes -= held.packet.len();
        Some(held)
    }

    /// Gives back the buffer of a packet taken out with [`HoldQueue::pop`].
    pub(crate) fn recycle(&mut self, buf: Vec<u8>) {
        if self.spare.len() < self.limits.packets {
            self.spare.push(buf);
        }
    }

    /// Drops every held packet; returns how many.
    pub(crate) fn clear(&mut self) -> u64 {
        let n = self.held.len() as u64;
        while self.drop_at(0) {}
        n
    }

    /// Frees the spare buffers (a peer link does once its session is up: it holds packets
    /// only during handshakes, so its buffers need not outlive one).
    pub(crate) fn release_spares(&mut self) {
        self.spare = Vec::new();
    }

    /// Drops the packet at `i`, keeping its buffer; `false` if there is none.
    fn drop_at(&mut self, i: usize) -> bool {
        let Some(held) = self.held.remove(i) else {
            return false;
        };
        self.bytes -= held.packet.len();
        self.recycle(held.packet);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    const LIMITS: HoldLimits = HoldLimits {
        packets: 4,
        bytes: 100,
        per_destination: 3,
        max_age: Duration::from_secs(2),
    };
    const A: IpAddr = IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1));
    const B: IpAddr = IpAddr::V4(Ipv4Addr::new(10, 0, 0, 2));

    fn drain(q: &mut HoldQueue) -> Vec<(IpAddr, u8)> {
        let mut out = Vec::new();
        while let Some(h) = q.pop() {
            out.push((h.dst, h.packet[0]));
            q.recycle(h.packet);
        }
        out
    }

    #[test]
    fn keeps_order_and_drops_the_oldest_past_the_count() {
        let now = Instant::now();
        let mut q = HoldQueue::new(LIMITS);
        let dropped: u64 = (0..6u8)
            .map(|i| q.push(now, if i % 2 == 0 { A } else { B }, &[i; 10]))
            .sum();
        assert_eq!(dropped, 2);
        assert_eq!(drain(&mut q), vec![(A, 2), (B, 3), (A, 4), (B, 5)]);
        assert!(q.is_empty());
    }

    #[test]
    fn bounds_bytes_and_each_destination() {
        let now = Instant::now();
        let mut q = HoldQueue::new(LIMITS);
        assert_eq!(q.push(now, A, &[1; 101]), 1, "over the byte limit alone");
        assert!(q.is_empty());
        assert_eq!(q.push(now, A, &[1; 60]), 0);
        assert_eq!(q.push(now, B, &[2; 30]), 0);
        assert_eq!(
            q.push(now, B, &[3; 30]),
            1,
            "90 + 30 > 100: the oldest goes"
        );
        assert_eq!(drain(&mut q), vec![(B, 2), (B, 3)]);
        for i in 0..3 {
            assert_eq!(q.push(now, A, &[i; 1]), 0);
        }
        assert_eq!(q.push(now, B, &[9; 1]), 0);
        assert_eq!(
            q.push(now, A, &[3; 1]),
            1,
            "A is at its share: A's oldest goes"
        );
        assert_eq!(drain(&mut q), vec![(A, 1), (A, 2), (B, 9), (A, 3)]);
    }

    #[test]
    fn expires_on_the_callers_clock_and_reuses_buffers() {
        let now = Instant::now();
        let mut q = HoldQueue::new(LIMITS);
        q.push(now, A, &[1; 10]);
        q.push(now + Duration::from_secs(1), A, &[2; 10]);
        assert_eq!(q.next_expiry(), Some(now + LIMITS.max_age));
        assert_eq!(q.expire(now + Duration::from_millis(1_999)), 0);
        assert_eq!(q.expire(now + LIMITS.max_age), 1);
        assert_eq!(q.len(), 1);
        let held = q.pop().expect("one left");
        let ptr = held.packet.as_ptr();
        q.recycle(held.packet);
        q.push(now, B, &[3; 10]);
        let again = q.pop().expect("just held");
        assert_eq!(again.packet.as_ptr(), ptr, "the recycled buffer is reused");
        q.push(now, B, &[4; 10]);
        assert_eq!(q.clear(), 1);
        assert_eq!(q.next_expiry(), None);
    }

    #[test]
    fn pop_where_takes_the_oldest_match() {
        let now = Instant::now();
        let mut q = HoldQueue::new(LIMITS);
        q.push(now, A, &[1]);
        q.push(now, B, &[2]);
        q.push(now, B, &[3]);
        let h = q.pop_where(|d| d == B).expect("a packet for B");
        assert_eq!(h.packet, vec![2]);
        assert!(q.pop_where(|d| d == Ipv4Addr::LOCALHOST).is_none());
        assert_eq!(q.len(), 2);
    }
}
