//! The node's timer table: one named deadline per kind of work, the next wake-up is the earliest.
//!
//! # Algorithm
//! Every sub-machine of the node (the relay session, the NAT check, the peer links, path
//! selection) knows its own next deadline. The node copies each into one slot of a
//! [`TimerTable`] after every input that may have moved it, and [`TimerTable::next`] returns
//! the earliest armed slot with its [`Timer`], whose [`Timer::reason`] says *why* the node wants
//! to wake (quinn-proto's `TimerTable`, firezone's `poll_timeout` reasons).
//!
//! # Driving contract
//! The table is plain data: it reads no clock. The node calls [`TimerTable::set`] or
//! [`TimerTable::stop`] when a machine's deadline changes, [`TimerTable::arm_earliest`] on the
//! data path (a deadline may only move earlier there, which is cheap and never loses a wake-up:
//! a slot that fires early is simply recomputed), and [`TimerTable::expired`] in
//! `handle_timeout` to learn which machines are due.

use std::time::Instant;

/// The kinds of deadline a node has. The order is the tie-break when two are equally due.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Timer {
    /// The node's once-a-second housekeeping while any peer exists: boringtun's periodic
    /// `update_timers` for every peer link (keepalives, rekeys, session expiry), the reset of
    /// the handshake guard's count of handshake messages, and a look at the byte counters of
    /// every peer whose path selection has not run for a second. One wake-up does all three,
    /// so an idle node wakes once a second rather than once per kind of chore.
    Tick,
    /// A peer link's own handshake retry or give-up deadline.
    Handshake,
    /// The relay session: registration, acknowledgement timeout, sync retry, relay loss, and
    /// the UDP-or-stream decision.
    Relay,
    /// The next STUN round of the NAT check.
    Stun,
    /// Path selection: probe rounds, keepalive pings, direct-path timeouts, birthday probing,
    /// and stale members' grace periods.
    Paths,
    /// Expiry of packets held for a virtual IP of the subnet that no member has yet.
    Unrouted,
}

impl Timer {
    /// Every timer, in tie-break order.
    pub const ALL: [Timer; 6] = [
        Timer::Tick,
        Timer::Handshake,
        Timer::Relay,
        Timer::Stun,
        Timer::Paths,
        Timer::Unrouted,
    ];

    /// Why the node wants to wake for this timer, for logs and `poll_timeout`.
    pub fn reason(self) -> &'static str {
        match self {
            Timer::Tick => "housekeeping tick",
            Timer::Handshake => "handshake retry",
            Timer::Relay => "relay session",
            Timer::Stun => "stun round",
            Timer::Paths => "path selection",
            Timer::Unrouted => "held packet expiry",
        }
    }

    fn slot(self) -> usize {
        self as usize
    }
}

/// One optional deadline per [`Timer`].
#[derive(Debug, Clone, Default)]
pub struct TimerTable {
    deadlines: [Option<Instant>; Timer::ALL.len()],
}

impl TimerTable {
    /// Arms `timer` for `at` (replacing any earlier setting), or stops it if `at` is `None`.
    pub fn set(&mut self, timer: Timer, at: Option<Instant>) {
        self.deadlines[timer.slot()] = at;
    }

    /// Moves `timer` to `at` if that is earlier than its current deadline (or it is stopped).
    pub fn arm_earliest(&mut self, timer: Timer, at: Instant) {
        let slot = &mut self.deadlines[timer.slot()];
        if slot.is_none_or(|t| at < t) {
            *slot = Some(at);
        }
    }

    /// Stops `timer`.
    pub fn stop(&mut self, timer: Timer) {
        self.deadlines[timer.slot()] = None;
    }

    /// When `timer` fires, if armed.
    pub fn get(&self, timer: Timer) -> Option<Instant> {
        self.deadlines[timer.slot()]
    }

    /// The earliest armed deadline and its timer; ties go to the timer listed first.
    pub fn next(&self) -> Option<(Instant, Timer)> {
        Timer::ALL
            .iter()
            .filter_map(|t| self.get(*t).map(|at| (at, *t)))
            .min()
    }

    /// The timers due at `now`, in tie-break order.
    pub fn expired(&self, now: Instant) -> impl Iterator<Item = Timer> + '_ {
        Timer::ALL
            .into_iter()
            .filter(move |t| self.get(*t).is_some_and(|at| at <= now))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn next_is_the_earliest_and_ties_go_to_the_first_listed() {
        let now = Instant::now();
        let mut table = TimerTable::default();
        assert_eq!(table.next(), None, "nothing armed");
        table.set(Timer::Paths, Some(now + Duration::from_secs(3)));
        table.set(Timer::Relay, Some(now + Duration::from_secs(1)));
        table.set(Timer::Stun, Some(now + Duration::from_secs(1)));
        assert_eq!(
            table.next(),
            Some((now + Duration::from_secs(1), Timer::Relay))
        );
        table.stop(Timer::Relay);
        assert_eq!(
            table.next(),
            Some((now + Duration::from_secs(1), Timer::Stun))
        );
        table.set(Timer::Stun, None);
        assert_eq!(
            table.next(),
            Some((now + Duration::from_secs(3), Timer::Paths))
        );
    }

    #[test]
    fn arm_earliest_only_moves_a_deadline_forward_in_time() {
        let now = Instant::now();
        let mut table = TimerTable::default();
        table.arm_earliest(Timer::Handshake, now + Duration::from_secs(2));
        assert_eq!(
            table.get(Timer::Handshake),
            Some(now + Duration::from_secs(2))
        );
        table.arm_earliest(Timer::Handshake, now + Duration::from_secs(5));
        assert_eq!(
            table.get(Timer::Handshake),
            Some(now + Duration::from_secs(2))
        );
        table.arm_earliest(Timer::Handshake, now + Duration::from_secs(1));
        assert_eq!(
            table.get(Timer::Handshake),
            Some(now + Duration::from_secs(1))
        );
    }

    #[test]
    fn expired_lists_due_timers_in_order() {
        let now = Instant::now();
        let mut table = TimerTable::default();
        table.set(Timer::Paths, Some(now));
        table.set(Timer::Tick, Some(now - Duration::from_millis(5)));
        table.set(Timer::Stun, Some(now + Duration::from_millis(1)));
        let due: Vec<Timer> = table.expired(now).collect();
        assert_eq!(due, vec![Timer::Tick, Timer::Paths]);
        assert_eq!(Timer::Paths.reason(), "path selection");
    }
}
