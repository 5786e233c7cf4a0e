//! The relay session: this member's standing with one relay, and how it reaches that relay.
//!
//! # Job
//! One instance per relay (several relays are several instances). It owns the relay's
//! address and key, the session key that seals requests to it, registration with backoff,
//! acknowledgement timeouts, loss of the relay, sync retries and the collection of sync
//! snapshots, and the choice of transport: UDP on the main socket, or the driver's byte stream
//! (TCP, or TLS when TCP does not get through) to the relay when UDP is blocked.
//!
//! # Registration
//! A registration goes out every [`REGISTER_INTERVAL`]; one not acknowledged within
//! [`ACK_TIMEOUT`] makes the relay *unanswered* and retries with backoff from
//! [`REGISTER_RETRY_MIN`] to [`REGISTER_RETRY_MAX`]; with no acknowledgement for
//! [`RELAY_LOST_AFTER`] the registration counts as lost. Relayed traffic sent, or a direct path
//! missing a pong, while nothing has come from the relay for [`SILENCE_CHECK_AFTER`] brings the
//! next registration forward, so a relay (or UDP path) that went silent mid-session is noticed
//! within seconds rather than at the next refresh.
//!
//! The first registration, and any after a change of announcement, address or transport or a
//! lost answer, carries the announcement (`Registration::Full`); the others are small
//! refreshes (`Registration::Refresh`) the relay takes only from the address it holds us at
//! (else it answers "register again", see `RelaySession::handle_unregistered`).
//!
//! # Quiet: a learned NAT keepalive
//! While the node is quiet (no peer active, see `RelaySession::set_quiet`) and on UDP, each
//! refresh asks the relay to answer only after a delay and nothing else goes to the relay
//! meanwhile; the next refresh follows the answer at once. An answer that arrives proves our
//! NAT kept the mapping that long with nothing sent, and the delay grows by half, from
//! [`RELAY_KEEPALIVE_START`] (or [`RELAY_KEEPALIVE_MAX`] without a NAT); an answer that does
//! not arrive is followed by a full registration, and if the relay answers that, the NAT
//! forgot the mapping: the next delay is halfway between the longest that worked and the
//! shortest that failed, until they are close (`KEEPALIVE_RESOLUTION`), and the search starts
//! again after `SEARCH_AGAIN_AFTER` answers in a row. The longest proven delay also
//! holds idle direct paths' keepalives (`RelaySession::proven_keepalive`). So an idle member
//! sends the relay one small datagram per NAT timeout, and a relay that restarted hears from
//! it within [`RELAY_KEEPALIVE_MAX`]. The end of quiet (or relayed traffic) gives up a pending
//! delayed answer and refreshes at once; silence before a delayed answer is due counts neither
//! towards losing the relay nor towards the fallback to a stream.
//!
//! # UDP or stream
//! ```text
//!            quiet for UDP_FALLBACK_AFTER           driver: stream up
//!   Udp ─────────────────────────────────▶ Connecting ───────────────────▶ Stream
//!    ▲  (nothing heard from the relay)         │ driver: stream down         │
//!    │◀────────────────────────────────────────┘ (retry with backoff)        │ STUN answer
//!    │                                                                       ▼ over UDP
//!    └──────── registration acknowledged over UDP (or stream down) ───── Leaving
//! ```
//! `Leaving` sends over UDP but keeps the stream open until the relay acknowledges a
//! registration over UDP (make before break); an unanswered one returns to `Stream`.
//! The relay is *quiet* while it does not acknowledge registrations; the session moves to the
//! stream once it has been quiet, heard nothing from the relay and had no STUN answer over UDP
//! for [`UDP_FALLBACK_AFTER`] (so a relay that was heard long ago is left as soon as a
//! registration goes unanswered).
//!
//! # TCP or TLS
//! A stream is plain TCP on the relay's main port first. A TCP attempt that fails, or a TCP
//! stream that closes before the relay acknowledged a registration over it, makes the next
//! attempt TLS (WebSocket over TLS, usually TCP 443) if the relay has a TLS endpoint, at once;
//! a TLS attempt failing the same way makes the next one TCP again, after the backoff. A kind
//! over which the relay acknowledged a registration is the first one tried next time.
//! While on the stream the node keeps sending STUN over UDP; a STUN answer from the relay's
//! address proves UDP works both ways and the session goes back to UDP (direct paths need UDP
//! anyway). Only STUN answers count, since relayed traffic may still trickle in through an old
//! NAT mapping.
//!
//! # Driving contract
//! The node calls `RelaySession::handle_timeout` at `RelaySession::poll_timeout` and acts on
//! the returned `Due` (it builds the requests, which need the node's announcement), records
//! what it sent with `RelaySession::note_register_sent` / `RelaySession::note_sync_sent`,
//! feeds acknowledgements (`RelaySession::handle_ack`), UDP STUN answers
//! (`RelaySession::handle_udp_stun`) and the driver's stream reports
//! (`RelaySession::handle_stream_up` / `RelaySession::handle_stream_down`), and asks
//! `RelaySession::transport` how relay-bound datagrams travel.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use super::outbox::Transport;
use super::RelayTarget;
use crate::keys::{NetworkSigningKey, PeerKey};
use crate::wire::admission::{AdmissionClient, Cookie, ECHO_LEN};
use crate::wire::{MemberEntry, RelayRequest, SyncTag};

/// Re-registration interval; a third of the relay's member TTL (30 s), so two lost refreshes
/// never drop a live member.
pub const REGISTER_INTERVAL: Duration = Duration::from_secs(10);
/// The first answer delay of a quiet session's refresh behind a NAT: under the 30 s that the
/// most forgetful NATs keep an idle UDP mapping.
pub const RELAY_KEEPALIVE_START: Duration = Duration::from_secs(25);
/// The longest answer delay a quiet session asks for: the 2 minutes RFC 4787 asks NATs to
/// keep an idle UDP mapping, and the longest a restarted relay goes without hearing from a
/// quiet member.
pub const RELAY_KEEPALIVE_MAX: Duration = Duration::from_secs(120);
/// Delayed answers that must arrive in a row at the settled delay before longer delays are
/// tried again (a lost answer counts as a failed delay, as an expired mapping does; this
/// undoes it within hours, not never).
const SEARCH_AGAIN_AFTER: u32 = 100;
/// The keepalive search stops once the shortest delay that failed is within this fraction
/// of the longest that worked (which it then keeps): against the 120 s of Linux conntrack
/// it settles near 111 s, against a 60 s NAT at 56 s, with a margin below the timeout.
const KEEPALIVE_RESOLUTION: f64 = 0.15;
/// First retry delay while the relay does not answer; doubles up to [`REGISTER_RETRY_MAX`].
pub const REGISTER_RETRY_MIN: Duration = Duration::from_secs(1);
/// Longest retry delay while the relay does not answer.
pub const REGISTER_RETRY_MAX: Duration = Duration::from_secs(8);
/// Without an acknowledgement for this long the relay counts as unreachable (two refreshes
/// and a half lost).
pub const RELAY_LOST_AFTER: Duration = Duration::from_secs(25);
/// A registration not acknowledged within this time counts as unanswered (relay RTTs are far
/// below it).
pub const ACK_TIMEOUT: Duration = Duration::from_secs(2);
/// A sync request with no complete answer is repeated after this long.
pub const SYNC_RETRY: Duration = Duration::from_secs(3);
/// Relayed traffic sent while nothing has come from the relay for this long brings the next
/// registration forward: a busy relayed path hears from the relay many times a second, so a
/// second of silence is already suspicious, and the check costs one small request.
pub const SILENCE_CHECK_AFTER: Duration = Duration::from_secs(1);
/// Quiet UDP for this long means UDP to the relay is blocked: three registration attempts (at
/// 0, 1 and 3 s) have gone unanswered by then.
pub const UDP_FALLBACK_AFTER: Duration = Duration::from_secs(4);
/// Registrations unanswered for this long make a relay *failed*: relayed pairs and the
/// member table move to another relay. One lost registration or acknowledgement (the retry
/// follows at once, see [`ACK_TIMEOUT`]) is not enough; two in a row are, so a dead relay is
/// left about 5 s after it died (with relayed traffic flowing, the silence check sends the
/// first probe within [`SILENCE_CHECK_AFTER`]).
pub const FAILOVER_AFTER: Duration = Duration::from_secs(3);
/// A relay earlier in the token than the primary must answer this long before the member
/// table moves back to it, so a flapping relay does not move everyone back and forth.
pub const FAILBACK_AFTER: Duration = Duration::from_secs(20);
/// First delay between stream connection attempts; doubles up to [`STREAM_RETRY_MAX`].
pub const STREAM_RETRY_MIN: Duration = Duration::from_secs(1);
/// Longest delay between stream connection attempts.
pub const STREAM_RETRY_MAX: Duration = Duration::from_secs(30);

/// Which kind of stream to the relay the driver opens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamKind {
    /// Length-framed TCP on the relay's main port.
    Tcp,
    /// WebSocket over TLS on the relay's TLS endpoint.
    Tls,
}

/// How the session reaches its relay now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Carrier {
    /// UDP on the main socket.
    Udp,
    /// The driver was asked for a stream and has not reported yet.
    Connecting,
    /// The stream is up; relay-bound datagrams use it.
    Stream,
    /// UDP answered again: relay-bound datagrams use UDP, and the stream stays open until the
    /// relay acknowledges a registration over UDP (make before break: the relay forgets a
    /// member whose stream closes before it re-registered elsewhere).
    Leaving,
}

/// Which registration to send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Registration {
    /// With the announcement: first, after a change, after silence or a new transport.
    Full,
    /// Without it, from a member the relay holds at this address, answered after
    /// `answer_after` (zero: at once).
    Refresh { answer_after: Duration },
}

/// What a timer run asks the node to do.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Due {
    /// Send this registration now.
    pub(crate) register: Option<Registration>,
    /// Repeat the sync request now.
    pub(crate) sync: bool,
    /// The registration was just lost (report it).
    pub(crate) lost: bool,
    /// The transport changed (follow it, re-announce).
    pub(crate) transport_changed: bool,
}

/// The answer to an acknowledgement.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Ack {
    /// Not the registration we wait for (stale or replayed).
    Ignored,
    /// Accepted; `news` is set when it is the first or the observed address changed.
    Accepted { news: bool },
}

/// Most announcement bytes one sync round may bring: [`super::membership::MAX_MEMBERS`]
/// announcements of about 1 KiB (a name and a dozen endpoints take a few hundred bytes).
const MAX_SYNC_BYTES: usize = super::membership::MAX_MEMBERS * 1024;

struct SyncCollector {
    generation: u32,
    total: u16,
    entries: BTreeMap<u16, MemberEntry>,
    /// Announcement bytes collected so far in this round.
    bytes: usize,
}

/// One relay's session (see the module doc).
pub(crate) struct RelaySession {
    id: usize,
    target: RelayTarget,
    session_key: [u8; 32],
    next_register: Instant,
    backoff: Duration,
    pending_ts: Option<u64>,
    register_sent: Option<Instant>,
    unanswered: bool,
    last_ack: Option<Instant>,
    registered: bool,
    observed: Option<SocketAddr>,
    sync_sent: Option<Instant>,
    sync: Option<SyncCollector>,
    key_mismatch_reported: bool,
    last_heard: Instant,
    carrier: Carrier,
    /// Since when the session has been on UDP this time (start, or back from the stream).
    udp_since: Instant,
    next_stream_attempt: Instant,
    stream_backoff: Duration,
    /// The kind of stream asked for (or up) now, or to ask for next.
    stream_kind: StreamKind,
    /// The kind each round of attempts starts with: the last one the relay answered over.
    preferred_kind: StreamKind,
    /// Whether the relay acknowledged a registration over the current stream.
    acked_on_stream: bool,
    /// Signs requests with the network key and carries the relay's return-path cookie.
    admission: AdmissionClient,
    /// The relay's change counter at which our current presence began (from the latest ack).
    presence_since: Option<u64>,
    /// Round-trip time of the latest acknowledged registration.
    rtt: Option<Duration>,
    /// Since when registrations go unanswered (cleared by an acknowledgement).
    unanswered_since: Option<Instant>,
    /// Since when the relay has answered every registration.
    answering_since: Option<Instant>,
    /// Whether the node is quiet (no peer active, see `RelaySession::set_quiet`).
    quiet: bool,
    /// The registration in flight: whether it carried the announcement, and the answer
    /// delay it asked for.
    in_flight: Option<(bool, Duration)>,
    /// The next registration must carry the announcement.
    full_wanted: bool,
    /// Counts the times a full registration was wanted: one acknowledged satisfies the want
    /// only if it went out after the latest (an older one carried an older announcement).
    full_wants: u64,
    /// `full_wants` when the full registration in flight went out.
    full_sent_at_want: u64,
    /// The learned NAT keepalive towards this relay (see the module doc).
    keepalive: Keepalive,
    /// The next registration checks the relay is there: answered at once even while quiet.
    checking: bool,
    /// Silence from the relay until then is expected: a delayed answer is due then. Neither
    /// the loss of the relay nor the fallback to a stream counts silence before it.
    excused_until: Instant,
}

/// The learned answer delay of a quiet session: how long the NAT keeps our mapping towards
/// the relay with nothing sent on it. Delays grow by half until one fails; from then on the
/// next try is halfway between the longest that worked and the shortest that failed, until
/// the two are within [`KEEPALIVE_RESOLUTION`] of each other.
#[derive(Debug, Clone, Copy)]
struct Keepalive {
    /// The delay the next quiet refresh asks for.
    delay: Duration,
    /// The longest delay known to work (since the last failure: the one to fall back to).
    good: Duration,
    /// The shortest delay known to fail, until [`SEARCH_AGAIN_AFTER`] answers in a row at
    /// the settled delay forget it.
    failed: Option<Duration>,
    /// A delayed answer went missing: if the relay answers the registration that follows,
    /// the NAT forgot the mapping, and the delay is too long.
    missed: bool,
    /// Delayed answers in a row at the settled delay.
    settled_answers: u32,
}

impl Keepalive {
    fn new() -> Self {
        Self {
            delay: RELAY_KEEPALIVE_START,
            good: RELAY_KEEPALIVE_START,
            failed: None,
            missed: false,
            settled_answers: 0,
        }
    }

    /// A delayed answer for `delay` arrived: that delay works; try a longer one next.
    fn answered(&mut self, delay: Duration) {
        if delay < self.delay {
            return;
        }
        self.good = delay;
        self.delay = match self.failed {
            None => (delay * 3 / 2).min(RELAY_KEEPALIVE_MAX),
            Some(failed) if failed.saturating_sub(delay) > delay.mul_f64(KEEPALIVE_RESOLUTION) => {
                (delay + failed) / 2
            }
            Some(_) => {
                // Settled. A lost answer looks like an expired mapping: after many answers
                // in a row, forget the failure and search upwards again.
                self.settled_answers += 1;
                if self.settled_answers >= SEARCH_AGAIN_AFTER {
                    self.settled_answers = 0;
                    self.failed = None;
                }
                delay
            }
        };
    }

    /// The relay answered the registration after a missed delayed answer: the mapping did not
    /// last that long. The longest delay that worked is tried again; if that one was what
    /// failed (the NAT changed), a third shorter.
    fn expired(&mut self) {
        let failed = self.delay;
        self.failed = Some(self.failed.map_or(failed, |f| f.min(failed)));
        if self.good >= failed {
            self.good = (failed * 2 / 3).max(RELAY_KEEPALIVE_START);
        }
        self.delay = self.good;
        self.settled_answers = 0;
    }
}

impl RelaySession {
    /// A session with relay number `id` at `target`, sealing with `session_key` and signing
    /// with the network's `signing` key, starting now.
    pub(crate) fn new(
        id: usize,
        target: RelayTarget,
        session_key: [u8; 32],
        signing: NetworkSigningKey,
        now: Instant,
    ) -> Self {
        Self {
            admission: AdmissionClient::new(signing, target.key),
            presence_since: None,
            rtt: None,
            unanswered_since: None,
            answering_since: None,
            id,
            target,
            session_key,
            next_register: now,
            backoff: REGISTER_RETRY_MIN,
            pending_ts: None,
            register_sent: None,
            unanswered: false,
            last_ack: None,
            registered: false,
            observed: None,
            sync_sent: None,
            sync: None,
            key_mismatch_reported: false,
            last_heard: now,
            carrier: Carrier::Udp,
            udp_since: now,
            next_stream_attempt: now,
            stream_backoff: STREAM_RETRY_MIN,
            stream_kind: StreamKind::Tcp,
            preferred_kind: StreamKind::Tcp,
            acked_on_stream: false,
            quiet: false,
            in_flight: None,
            full_wanted: true,
            full_wants: 0,
            full_sent_at_want: 0,
            keepalive: Keepalive::new(),
            checking: false,
            excused_until: now,
        }
    }

    /// Tells the session whether the node is quiet. A quiet session on UDP refreshes with an
    /// answer delay (its learned NAT keepalive) and sends nothing else; the end of quiet
    /// gives up a delayed answer still awaited and refreshes at once, so a relay that died
    /// meanwhile is noticed within [`ACK_TIMEOUT`] of traffic resuming.
    pub(crate) fn set_quiet(&mut self, now: Instant, quiet: bool) {
        if std::mem::replace(&mut self.quiet, quiet) == quiet || quiet {
            return;
        }
        if self.in_flight.is_some_and(|(_, d)| !d.is_zero()) {
            self.give_up_delayed_answer(now);
            self.next_register = now;
        }
    }

    /// The next registration must carry the announcement (it changed, or the relay may not
    /// hold it).
    fn want_full(&mut self) {
        self.full_wanted = true;
        self.full_wants += 1;
    }

    /// Stops waiting for the delayed answer in flight (it will be ignored if it comes): the
    /// relay's silence from now on counts again.
    fn give_up_delayed_answer(&mut self, now: Instant) {
        self.pending_ts = None;
        self.in_flight = None;
        self.excused_until = self.excused_until.min(now);
    }

    /// Starts the keepalive delay at its maximum when we are not behind a NAT (the refresh
    /// then only checks the relay is there).
    pub(crate) fn set_no_nat(&mut self, no_nat: bool) {
        if no_nat && self.keepalive.failed.is_none() {
            self.keepalive.delay = RELAY_KEEPALIVE_MAX;
            self.keepalive.good = RELAY_KEEPALIVE_MAX;
        }
    }

    /// The answer delay a quiet refresh asks for now.
    #[cfg(test)]
    pub(crate) fn keepalive(&self) -> Duration {
        self.keepalive.delay
    }

    /// The longest time with nothing sent that our NAT is known to keep the mapping to this
    /// relay (the longest delayed answer that arrived; the first delay until one did).
    pub(crate) fn proven_keepalive(&self) -> Duration {
        self.keepalive.good
    }

    /// How long the registration in flight may take to be answered.
    fn answer_wait(&self) -> Duration {
        self.in_flight.map_or(Duration::ZERO, |(_, d)| d) + ACK_TIMEOUT
    }

    /// Seals and signs `req` for this relay with the current return-path cookie.
    pub(crate) fn seal(&mut self, sender: PeerKey, req: &RelayRequest, nonce: [u8; 24]) -> Vec<u8> {
        self.admission.seal(&self.session_key, sender, req, nonce)
    }

    /// A cookie reply from the relay's address: the request it answers, sealed again with the
    /// new cookie, to send at once (`None` if it answers nothing recent or was re-sent already).
    pub(crate) fn handle_cookie_reply(
        &mut self,
        echo: [u8; ECHO_LEN],
        cookie: Cookie,
        sender: PeerKey,
        nonce: [u8; 24],
    ) -> Option<Vec<u8>> {
        self.admission
            .handle_cookie_reply(echo, cookie, &self.session_key, sender, nonce)
    }

    /// The relay's key and current address.
    pub(crate) fn target(&self) -> RelayTarget {
        self.target
    }

    /// The key that seals requests to and opens replies from this relay.
    pub(crate) fn session_key(&self) -> &[u8; 32] {
        &self.session_key
    }

    /// Our address as the relay sees it (from its last acknowledgement).
    pub(crate) fn observed(&self) -> Option<SocketAddr> {
        self.observed
    }

    /// The relay's number (its place in the token).
    pub(crate) fn id(&self) -> usize {
        self.id
    }

    /// Round-trip time of the latest acknowledged registration.
    pub(crate) fn rtt(&self) -> Option<Duration> {
        self.rtt
    }

    /// The relay's change counter at which our current presence there began.
    pub(crate) fn presence_since(&self) -> Option<u64> {
        self.presence_since
    }

    /// Whether the relay has acknowledged a registration recently.
    pub(crate) fn is_registered(&self) -> bool {
        self.registered
    }

    /// Whether the relay answers now (registered, latest registration not unanswered).
    pub(crate) fn answering(&self) -> bool {
        self.registered && !self.unanswered
    }

    /// Whether the relay counts as failed at `now`: not registered, or registrations have
    /// gone unanswered for [`FAILOVER_AFTER`].
    pub(crate) fn failed(&self, now: Instant) -> bool {
        !self.registered
            || self
                .unanswered_since
                .is_some_and(|t| now.saturating_duration_since(t) >= FAILOVER_AFTER)
    }

    /// When the relay counts as failed if nothing changes (while registrations go unanswered).
    pub(crate) fn failing_at(&self) -> Option<Instant> {
        self.unanswered_since
            .filter(|_| self.registered)
            .map(|t| t + FAILOVER_AFTER)
    }

    /// Since when the relay has answered every registration (`None` while it does not).
    pub(crate) fn answering_since(&self) -> Option<Instant> {
        self.answering_since.filter(|_| self.answering())
    }

    /// Whether relay-bound datagrams use the stream.
    pub(crate) fn on_stream(&self) -> bool {
        self.carrier == Carrier::Stream
    }

    /// Whether the driver should hold a stream to this relay open (or open one).
    pub(crate) fn wants_stream(&self) -> bool {
        self.carrier != Carrier::Udp
    }

    /// The kind of stream the driver should hold (meaningful while [`Self::wants_stream`]).
    pub(crate) fn stream_kind(&self) -> StreamKind {
        self.stream_kind
    }

    /// The kind of stream relay-bound datagrams use now, if they use one.
    pub(crate) fn stream_in_use(&self) -> Option<StreamKind> {
        self.on_stream().then_some(self.stream_kind)
    }

    /// How relay-bound datagrams travel now.
    pub(crate) fn transport(&self) -> Transport {
        match self.carrier {
            Carrier::Stream => Transport::Stream { relay: self.id },
            Carrier::Udp | Carrier::Connecting | Carrier::Leaving => Transport::Udp {
                socket: 0,
                dst: self.target.addr,
            },
        }
    }

    /// Moves the relay to a new address; `true` if it changed (register there at once).
    pub(crate) fn set_addr(&mut self, now: Instant, addr: SocketAddr) -> bool {
        if self.target.addr == addr {
            return false;
        }
        self.target.addr = addr;
        self.next_register = now;
        self.want_full();
        true
    }

    /// Registers at once with the announcement (it changed).
    pub(crate) fn register_now(&mut self, now: Instant) {
        self.next_register = now;
        self.want_full();
    }

    /// Reports a key mismatch only once: `true` the first time.
    pub(crate) fn first_key_mismatch(&mut self) -> bool {
        !std::mem::replace(&mut self.key_mismatch_reported, true)
    }

    /// The session's next deadline.
    pub(crate) fn poll_timeout(&self) -> Instant {
        let mut at = self.next_register;
        if let (true, Some(ack)) = (self.registered, self.last_ack) {
            at = at.min(ack.max(self.excused_until) + RELAY_LOST_AFTER);
        }
        if let (false, Some(_), Some(sent)) = (self.unanswered, self.pending_ts, self.register_sent)
        {
            at = at.min(sent + self.answer_wait());
        }
        if let Some(sent) = self.sync_sent {
            at = at.min(sent + SYNC_RETRY);
        }
        if let Some(fallback) = self.fallback_at() {
            at = at.min(fallback);
        }
        at
    }

    /// Runs what is due at `now`.
    pub(crate) fn handle_timeout(&mut self, now: Instant) -> Due {
        let mut due = Due::default();
        if self.registered
            && self.last_ack.is_none_or(|t| {
                now.saturating_duration_since(t.max(self.excused_until)) >= RELAY_LOST_AFTER
            })
        {
            self.registered = false;
            self.backoff = REGISTER_RETRY_MIN;
            self.answering_since = None;
            // The relay itself is gone: a delayed answer it missed says nothing of our NAT.
            self.keepalive.missed = false;
            due.lost = true;
        }
        // A registration the relay did not answer: retry soon with backoff instead of after a
        // full interval, so a restarted relay learns about us within seconds.
        if !self.unanswered
            && self.pending_ts.is_some()
            && self
                .register_sent
                .is_some_and(|t| now.saturating_duration_since(t) >= self.answer_wait())
        {
            if self.in_flight.is_some_and(|(_, d)| !d.is_zero()) {
                // A delayed answer missed: the NAT forgot the mapping, or the relay is gone.
                // The full registration that follows tells which.
                self.keepalive.missed = true;
            }
            self.in_flight = None;
            self.want_full();
            self.unanswered = true;
            self.unanswered_since.get_or_insert(now);
            self.answering_since = None;
            self.next_register = now;
            if self.carrier == Carrier::Leaving {
                // UDP answered STUN but not the registration: stay on the stream.
                self.carrier = Carrier::Stream;
                due.transport_changed = true;
            }
        }
        if now >= self.next_register {
            let refresh = self.answering() && !self.full_wanted && self.carrier != Carrier::Leaving;
            let answer_after = if self.quiet && self.carrier == Carrier::Udp && !self.checking {
                self.keepalive.delay
            } else {
                Duration::ZERO
            };
            self.checking = false;
            due.register = Some(if refresh {
                Registration::Refresh { answer_after }
            } else {
                Registration::Full
            });
            self.next_register = if self.answering() {
                // A delayed answer sets the next one; this is the fallback.
                now + REGISTER_INTERVAL
                    + if refresh {
                        answer_after
                    } else {
                        Duration::ZERO
                    }
            } else {
                let wait = self.backoff;
                self.backoff = (self.backoff * 2).min(REGISTER_RETRY_MAX);
                now + wait
            };
        }
        if let Some(sent) = self.sync_sent {
            if now.saturating_duration_since(sent) >= SYNC_RETRY {
                self.sync_sent = None;
                due.sync = true;
            }
        }
        if self.fallback_at().is_some_and(|at| at <= now) {
            tracing::info!(relay = %self.target.addr, kind = ?self.stream_kind, "no UDP answer from the relay; trying the stream");
            self.carrier = Carrier::Connecting;
            self.next_stream_attempt = now + self.stream_backoff;
            self.stream_backoff = (self.stream_backoff * 2).min(STREAM_RETRY_MAX);
        }
        due
    }

    /// A registration `kind` with timestamp `ts` went out at `now`.
    pub(crate) fn note_register_sent(&mut self, now: Instant, ts: u64, kind: Registration) {
        self.pending_ts = Some(ts);
        self.register_sent = Some(now);
        if kind == Registration::Full {
            self.full_sent_at_want = self.full_wants;
        }
        self.in_flight = Some(match kind {
            Registration::Full => (true, Duration::ZERO),
            Registration::Refresh { answer_after } => (false, answer_after),
        });
        match kind {
            Registration::Refresh { answer_after } if !answer_after.is_zero() => {
                self.excused_until = self.excused_until.max(now + answer_after);
            }
            Registration::Refresh { .. } | Registration::Full => {}
        }
    }

    /// The relay does not hold us (it answered the refresh with timestamp `echo_ts` so):
    /// register with the announcement at once. `false` if it answers nothing in flight.
    pub(crate) fn handle_unregistered(&mut self, now: Instant, echo_ts: u64) -> bool {
        if self.pending_ts != Some(echo_ts) || self.in_flight.is_some_and(|(full, _)| full) {
            return false;
        }
        self.note_heard(now);
        self.pending_ts = None;
        self.in_flight = None;
        self.want_full();
        self.next_register = now;
        true
    }

    /// Whether a sync request may go out (none is in flight); if so it is recorded as sent.
    pub(crate) fn note_sync_sent(&mut self, now: Instant) -> bool {
        if self.sync_sent.is_some() {
            return false;
        }
        self.sync_sent = Some(now);
        true
    }

    /// A sync finished (applied); stop retrying it.
    pub(crate) fn sync_done(&mut self) {
        self.sync_sent = None;
    }

    /// Anything authenticated came from the relay (over either transport).
    pub(crate) fn note_heard(&mut self, now: Instant) {
        self.last_heard = self.last_heard.max(now);
    }

    /// Something suggests the network changed (relayed traffic goes out, or a direct path
    /// missed a pong): if the relay has been silent a while, register now to find out whether
    /// it still answers. Returns whether the deadline moved.
    pub(crate) fn check_if_silent(&mut self, now: Instant) -> bool {
        let silent = now.saturating_duration_since(self.last_heard) >= SILENCE_CHECK_AFTER;
        let waiting = self.in_flight.is_some_and(|(_, d)| !d.is_zero());
        if waiting {
            // Relayed traffic: the delayed answer is no longer worth waiting for.
            self.give_up_delayed_answer(now);
        }
        if silent && self.pending_ts.is_none() && self.next_register > now {
            self.next_register = now;
            self.checking = true;
            return true;
        }
        false
    }

    /// An acknowledgement of the registration with timestamp `echo_ts`, seeing us at `observed`.
    pub(crate) fn handle_ack(&mut self, now: Instant, echo_ts: u64, observed: SocketAddr) -> Ack {
        if self.pending_ts != Some(echo_ts) {
            return Ack::Ignored;
        }
        self.pending_ts = None;
        self.unanswered = false;
        self.unanswered_since = None;
        self.answering_since.get_or_insert(now);
        let waited = self
            .register_sent
            .map_or(Duration::ZERO, |sent| now.saturating_duration_since(sent));
        let (full, delay) = self.in_flight.take().unwrap_or((true, Duration::ZERO));
        // The round trip is what the answer took beyond the delay asked for.
        self.rtt = Some(waited.saturating_sub(delay));
        self.last_ack = Some(now);
        self.note_heard(now);
        self.backoff = REGISTER_RETRY_MIN;
        let was = self.registered;
        self.registered = true;
        self.next_register = now + REGISTER_INTERVAL;
        if full {
            if self.full_sent_at_want == self.full_wants {
                self.full_wanted = false;
            } else {
                // Acknowledges an announcement older than the one wanted now: send that one.
                self.next_register = now;
            }
            if std::mem::take(&mut self.keepalive.missed) {
                self.keepalive.expired();
            }
        } else if !delay.is_zero() {
            if waited >= delay {
                // Nothing went to the relay for `delay` and its answer still came in.
                self.keepalive.answered(delay);
                if self.quiet {
                    self.next_register = now;
                }
            } else {
                // Answered early (the relay held too many delayed answers): nothing learned.
                self.next_register = self.register_sent.map_or(now, |s| s + delay);
            }
        }
        if self.carrier == Carrier::Stream {
            self.acked_on_stream = true;
            self.preferred_kind = self.stream_kind;
        }
        if self.carrier == Carrier::Leaving {
            // Registered over UDP: the stream can go.
            self.carrier = Carrier::Udp;
            self.udp_since = now;
        }
        let news = !was || self.observed != Some(observed);
        self.observed = Some(observed);
        Ack::Accepted { news }
    }

    /// Records the presence counter of an accepted acknowledgement; `true` when our presence
    /// began anew since the previous one (we expired there, or the relay restarted): the other
    /// members saw us removed, so our announcement must be sealed afresh to be taken again.
    pub(crate) fn note_presence(&mut self, since: u64) -> bool {
        let renewed = self.presence_since.is_some_and(|old| old != since);
        self.presence_since = Some(since);
        renewed
    }

    /// One entry of a sync snapshot; returns the whole snapshot once every entry arrived.
    /// A round announcing more than [`super::membership::MAX_MEMBERS`] entries, an index
    /// outside its total, or more than [`MAX_SYNC_BYTES`] of announcements is dropped whole:
    /// the relay decides these numbers, so nothing here trusts them with memory.
    pub(crate) fn collect(&mut self, tag: SyncTag, entry: MemberEntry) -> Option<Vec<MemberEntry>> {
        if usize::from(tag.total) > super::membership::MAX_MEMBERS || tag.index >= tag.total {
            self.sync = None;
            return None;
        }
        let collector = self.sync.get_or_insert_with(|| SyncCollector {
            generation: tag.generation,
            total: tag.total,
            entries: BTreeMap::new(),
            bytes: 0,
        });
        if collector.generation != tag.generation || collector.total != tag.total {
            *collector = SyncCollector {
                generation: tag.generation,
                total: tag.total,
                entries: BTreeMap::new(),
                bytes: 0,
            };
        }
        collector.bytes += entry.announcement.len();
        if collector.bytes > MAX_SYNC_BYTES {
            self.sync = None;
            return None;
        }
        collector.entries.insert(tag.index, entry);
        if collector.entries.len() < usize::from(collector.total) {
            return None;
        }
        self.sync.take().map(|c| c.entries.into_values().collect())
    }

    /// A STUN answer arrived over UDP from `from`; returns whether the transport changed (it
    /// proves UDP to the relay works, so a stream is given up).
    pub(crate) fn handle_udp_stun(&mut self, now: Instant, from: SocketAddr) -> bool {
        if from.ip() != self.target.addr.ip() {
            return false;
        }
        self.note_heard(now);
        match self.carrier {
            Carrier::Udp | Carrier::Leaving => false,
            Carrier::Connecting => {
                self.carrier = Carrier::Udp;
                self.udp_since = now;
                false
            }
            Carrier::Stream => {
                tracing::info!(relay = %self.target.addr, "UDP to the relay works again; leaving the stream");
                self.carrier = Carrier::Leaving;
                self.want_full();
                self.stream_backoff = STREAM_RETRY_MIN;
                self.udp_since = now;
                self.next_register = now;
                true
            }
        }
    }

    /// The driver's stream to the relay is up; returns whether the transport changed.
    /// A stream of another kind than the one asked for is ignored (the driver closes it when
    /// it sees the kind wanted now).
    pub(crate) fn handle_stream_up(&mut self, now: Instant, kind: StreamKind) -> bool {
        if self.carrier != Carrier::Connecting || kind != self.stream_kind {
            return false;
        }
        tracing::info!(relay = %self.target.addr, ?kind, "attached to the relay over the stream");
        self.carrier = Carrier::Stream;
        self.want_full();
        self.acked_on_stream = false;
        self.stream_backoff = STREAM_RETRY_MIN;
        self.next_register = now;
        true
    }

    /// The driver's stream failed to connect or closed; returns whether the transport changed.
    pub(crate) fn handle_stream_down(&mut self, now: Instant) -> bool {
        match self.carrier {
            Carrier::Udp => false,
            Carrier::Connecting => {
                tracing::warn!(relay = %self.target.addr, kind = ?self.stream_kind, "cannot reach the relay over this stream either; retrying");
                self.carrier = Carrier::Udp;
                self.stream_failed(now);
                false
            }
            Carrier::Leaving => {
                self.carrier = Carrier::Udp;
                false
            }
            Carrier::Stream => {
                tracing::warn!(relay = %self.target.addr, kind = ?self.stream_kind, "stream to the relay closed");
                self.carrier = Carrier::Udp;
                self.want_full();
                self.udp_since = now;
                self.next_register = now;
                if !self.acked_on_stream {
                    self.stream_failed(now);
                }
                true
            }
        }
    }

    /// The current kind of stream did not get a registration through: try the other kind next,
    /// at once when that completes a round started with the preferred kind and the relay has a
    /// TLS endpoint, else after the backoff already running.
    fn stream_failed(&mut self, now: Instant) {
        let other = match self.stream_kind {
            StreamKind::Tcp if self.target.tls => StreamKind::Tls,
            StreamKind::Tcp | StreamKind::Tls => StreamKind::Tcp,
        };
        if self.stream_kind == self.preferred_kind && other != self.stream_kind {
            self.next_stream_attempt = now;
        }
        self.stream_kind = other;
    }

    /// When the session gives up on UDP, if it is on UDP and the relay is quiet.
    fn fallback_at(&self) -> Option<Instant> {
        if self.carrier != Carrier::Udp || self.answering() {
            return None;
        }
        let quiet_since = self.last_heard.max(self.udp_since).max(self.excused_until);
        Some((quiet_since + UDP_FALLBACK_AFTER).max(self.next_stream_attempt))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::NodeSecret;
    use rand::SeedableRng;

    fn session(now: Instant) -> RelaySession {
        session_with_tls(now, true)
    }

    fn session_with_tls(now: Instant, tls: bool) -> RelaySession {
        let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(1);
        let target = RelayTarget {
            key: NodeSecret::generate(&mut rng).public(),
            addr: "203.0.113.1:3478".parse().expect("literal"),
            tls,
        };
        let signing = crate::keys::NetworkSecret::generate(&mut rng)
            .derive()
            .signing;
        RelaySession::new(0, target, [0; 32], signing, now)
    }

    /// Runs the session's timers up to `until` the way the node does, sending (but never
    /// answering) every registration; returns when it first asked for the stream.
    fn run_unanswered(s: &mut RelaySession, mut now: Instant, until: Instant) -> Option<Instant> {
        let mut ts = 0;
        for _ in 0..1_000 {
            let at = s.poll_timeout();
            if at > until {
                return None;
            }
            now = now.max(at);
            let due = s.handle_timeout(now);
            if due.register.is_some() {
                ts += 1;
                s.note_register_sent(now, ts, Registration::Full);
            }
            if s.wants_stream() {
                return Some(now);
            }
        }
        None
    }

    #[test]
    fn moves_to_the_stream_when_udp_stays_unanswered_and_back_on_a_udp_stun_answer() {
        let t0 = Instant::now();
        let mut s = session(t0);
        assert_eq!(
            s.transport(),
            Transport::Udp {
                socket: 0,
                dst: s.target().addr
            }
        );
        let asked = run_unanswered(&mut s, t0, t0 + Duration::from_secs(30)).expect("asks");
        assert_eq!(
            asked - t0,
            UDP_FALLBACK_AFTER,
            "after {UDP_FALLBACK_AFTER:?} of quiet"
        );
        // Until the driver reports the stream up, traffic stays on UDP.
        assert!(!s.on_stream());
        assert!(s.handle_stream_up(asked + Duration::from_millis(30), StreamKind::Tcp));
        assert!(s.on_stream());
        assert_eq!(s.transport(), Transport::Stream { relay: 0 });
        assert_eq!(
            s.poll_timeout(),
            asked + Duration::from_millis(30),
            "register at once"
        );
        // A STUN answer from elsewhere proves nothing; one from the relay's address does.
        let later = asked + Duration::from_secs(5);
        assert!(!s.handle_udp_stun(later, "198.51.100.1:3478".parse().expect("literal")));
        assert!(s.on_stream());
        let alt = SocketAddr::new(s.target().addr.ip(), 3479);
        assert!(s.handle_udp_stun(later, alt));
        assert!(!s.on_stream());
        assert_eq!(
            s.transport(),
            Transport::Udp {
                socket: 0,
                dst: s.target().addr
            }
        );
        // Make before break: the stream stays until a registration over UDP is acknowledged.
        assert!(s.wants_stream());
        assert_eq!(s.poll_timeout(), later, "register over UDP at once");
        assert!(s.handle_timeout(later).register.is_some());
        s.note_register_sent(later, 7, Registration::Full);
        s.handle_ack(later, 7, "198.51.100.9:4000".parse().expect("literal"));
        assert!(!s.wants_stream());
    }

    #[test]
    fn an_answering_relay_keeps_udp_and_a_failed_stream_is_retried_with_backoff() {
        let t0 = Instant::now();
        let mut s = session_with_tls(t0, false);
        let due = s.handle_timeout(t0);
        assert!(due.register.is_some());
        s.note_register_sent(t0, 1, Registration::Full);
        let observed = "198.51.100.9:4000".parse().expect("literal");
        let ack = s.handle_ack(t0 + Duration::from_millis(40), 1, observed);
        assert_eq!(ack, Ack::Accepted { news: true });
        assert!(s.answering());
        assert_eq!(s.handle_ack(t0, 1, observed), Ack::Ignored, "no replay");
        // Answering: no fallback, next registration after the interval.
        assert_eq!(
            s.poll_timeout(),
            t0 + Duration::from_millis(40) + REGISTER_INTERVAL
        );

        // UDP gets blocked: the next registration goes unanswered.
        let t1 = s.poll_timeout();
        let asked = run_unanswered(&mut s, t1, t1 + Duration::from_secs(30)).expect("asks");
        // The relay was last heard long before: the fallback follows the unanswered request.
        assert_eq!(asked - t1, ACK_TIMEOUT);
        // The stream cannot connect either: back to UDP, retried after the backoff.
        assert!(!s.handle_stream_down(asked));
        assert!(!s.wants_stream());
        assert_eq!(s.fallback_at(), Some(asked + STREAM_RETRY_MIN));
    }

    #[test]
    fn relayed_traffic_into_silence_brings_the_registration_forward() {
        let t0 = Instant::now();
        let mut s = session(t0);
        s.handle_timeout(t0);
        s.note_register_sent(t0, 1, Registration::Full);
        s.handle_ack(t0, 1, "198.51.100.9:4000".parse().expect("literal"));
        s.note_heard(t0);
        assert!(
            !s.check_if_silent(t0 + Duration::from_millis(500)),
            "heard recently"
        );
        let t1 = t0 + SILENCE_CHECK_AFTER;
        assert!(s.check_if_silent(t1));
        assert_eq!(s.poll_timeout(), t1);
        assert!(s.handle_timeout(t1).register.is_some());
        s.note_register_sent(t1, 2, Registration::Full);
        assert!(!s.check_if_silent(t1), "one check in flight at a time");
    }

    #[test]
    fn sync_rounds_with_huge_totals_or_bad_indices_are_dropped() {
        let now = Instant::now();
        let mut s = session(now);
        let entry = |b: u8| MemberEntry {
            key: PeerKey([b; 32]),
            observed: "198.51.100.1:1".parse().expect("literal"),
            announcement: vec![b; 16],
            since: 1,
        };
        let tag = |index, total| SyncTag {
            generation: 7,
            index,
            total,
            seq: 9,
        };
        assert!(s.collect(tag(0, u16::MAX), entry(1)).is_none());
        assert!(
            s.sync.is_none(),
            "a total beyond the member cap is not collected"
        );
        assert!(s.collect(tag(5, 2), entry(1)).is_none());
        assert!(s.sync.is_none(), "an index outside the total");
        assert!(s.collect(tag(0, 2), entry(1)).is_none());
        let done = s.collect(tag(1, 2), entry(2)).expect("complete");
        assert_eq!(done.len(), 2);
        let mut big = entry(3);
        big.announcement = vec![0; u16::MAX as usize];
        for i in 0..1_000u16 {
            s.collect(tag(i % 4000, 4000), big.clone());
        }
        let held = s.sync.as_ref().map_or(0, |c| c.bytes);
        assert!(held <= MAX_SYNC_BYTES, "{held} bytes held");
    }

    /// Registers once at `now` and has the relay acknowledge it.
    fn acked(s: &mut RelaySession, now: Instant, ts: u64) {
        assert!(s.handle_timeout(now).register.is_some());
        s.note_register_sent(now, ts, Registration::Full);
        let observed = "198.51.100.9:4000".parse().expect("literal");
        assert!(matches!(
            s.handle_ack(now, ts, observed),
            Ack::Accepted { .. }
        ));
    }

    #[test]
    fn udp_then_tcp_then_tls_and_back_to_udp_then_tls_first() {
        let t0 = Instant::now();
        let mut s = session(t0);
        let asked = run_unanswered(&mut s, t0, t0 + Duration::from_secs(30)).expect("asks");
        assert_eq!(s.stream_kind(), StreamKind::Tcp, "TCP first");
        // TCP does not connect (only 443 gets out): TLS is asked for at once.
        let t1 = asked + Duration::from_secs(5);
        assert!(!s.handle_stream_down(t1));
        assert!(!s.wants_stream());
        assert_eq!(s.stream_kind(), StreamKind::Tls);
        assert_eq!(s.poll_timeout().max(t1), t1, "no backoff within a round");
        s.handle_timeout(t1);
        assert!(s.wants_stream());
        assert_eq!(s.stream_kind(), StreamKind::Tls);
        // A late TCP stream is not the one asked for.
        assert!(!s.handle_stream_up(t1, StreamKind::Tcp));
        assert!(!s.on_stream());
        let t2 = t1 + Duration::from_millis(200);
        assert!(s.handle_stream_up(t2, StreamKind::Tls));
        assert_eq!(s.stream_in_use(), Some(StreamKind::Tls));
        assert_eq!(s.transport(), Transport::Stream { relay: 0 });
        acked(&mut s, t2, 100);

        // UDP answers again: back to UDP once a registration over UDP is acknowledged.
        let t3 = t2 + Duration::from_secs(20);
        assert!(s.handle_udp_stun(t3, s.target().addr));
        assert_eq!(s.stream_in_use(), None);
        acked(&mut s, t3, 101);
        assert!(!s.wants_stream());
        assert!(!s.handle_stream_down(t3), "the driver closed the stream");

        // UDP blocked again: the kind that worked last is tried first.
        let t4 = s.poll_timeout();
        run_unanswered(&mut s, t4, t4 + Duration::from_secs(60)).expect("asks again");
        assert_eq!(s.stream_kind(), StreamKind::Tls);
    }

    #[test]
    fn a_stream_closed_before_any_acknowledgement_counts_as_failed() {
        let t0 = Instant::now();
        let mut s = session(t0);
        let asked = run_unanswered(&mut s, t0, t0 + Duration::from_secs(30)).expect("asks");
        // TCP connects (a middlebox accepts it) but closes before the relay answered.
        assert!(s.handle_stream_up(asked, StreamKind::Tcp));
        let t1 = asked + Duration::from_secs(1);
        assert!(s.handle_stream_down(t1));
        assert_eq!(s.stream_kind(), StreamKind::Tls);
        let asked = run_unanswered(&mut s, t1, t1 + Duration::from_secs(30)).expect("asks");
        assert_eq!(s.stream_kind(), StreamKind::Tls);
        // TLS fails too: TCP again, after the backoff rather than at once.
        assert!(!s.handle_stream_down(asked));
        assert_eq!(s.stream_kind(), StreamKind::Tcp);
        let retry = s.fallback_at().expect("retries");
        assert!(retry > asked, "backs off between rounds");

        // A stream acknowledged over and later closed keeps its kind.
        let mut s = session(t0);
        let asked = run_unanswered(&mut s, t0, t0 + Duration::from_secs(30)).expect("asks");
        assert!(s.handle_stream_up(asked, StreamKind::Tcp));
        acked(&mut s, asked, 5);
        assert!(s.handle_stream_down(asked + Duration::from_secs(60)));
        assert_eq!(s.stream_kind(), StreamKind::Tcp);
    }

    #[test]
    fn a_relay_without_tls_is_retried_over_tcp_only() {
        let t0 = Instant::now();
        let mut s = session_with_tls(t0, false);
        let mut now = t0;
        for _ in 0..4 {
            let asked = run_unanswered(&mut s, now, now + Duration::from_secs(120)).expect("asks");
            assert_eq!(s.stream_kind(), StreamKind::Tcp);
            assert!(!s.handle_stream_down(asked));
            now = asked;
        }
    }

    /// Runs a quiet session for `until`, answering each registration the way `answer` says
    /// (`Some(true)`: answered at the delay asked for; `Some(false)`: a delayed answer is lost
    /// as an expired NAT mapping loses it, others are answered); returns what was sent.
    fn run_quiet(
        s: &mut RelaySession,
        from: Instant,
        until: Instant,
        ts: &mut u64,
        lose_delays_over: Duration,
    ) -> Vec<(Instant, Registration)> {
        let observed = "198.51.100.9:4000".parse().expect("literal");
        let mut sent = Vec::new();
        let mut pending: Option<(Instant, u64)> = None;
        let mut now = from;
        for _ in 0..10_000 {
            let mut at = s.poll_timeout();
            if let Some((answer_at, _)) = pending {
                at = at.min(answer_at);
            }
            if at > until {
                break;
            }
            now = now.max(at);
            if let Some((answer_at, echo)) = pending {
                if answer_at <= now {
                    pending = None;
                    s.handle_ack(now, echo, observed);
                    continue;
                }
            }
            s.set_quiet(now, true);
            if let Some(kind) = s.handle_timeout(now).register {
                *ts += 1;
                s.note_register_sent(now, *ts, kind);
                sent.push((now, kind));
                let rtt = Duration::from_millis(20);
                match kind {
                    Registration::Refresh { answer_after } if answer_after > lose_delays_over => {}
                    Registration::Refresh { answer_after } => {
                        pending = Some((now + answer_after + rtt, *ts))
                    }
                    Registration::Full => pending = Some((now + rtt, *ts)),
                }
            }
        }
        sent
    }

    #[test]
    fn a_quiet_session_learns_its_nat_keepalive_from_delayed_answers() {
        let t0 = Instant::now();
        let mut s = session(t0);
        acked(&mut s, t0, 1);
        let mut ts = 1;
        let hour = Duration::from_secs(3600);
        // A NAT that keeps mappings 60 s: delays grow 25, 37.5, 56, then 84 is lost; halfway
        // between 56 and 84 (70) and then 63 are lost too, and the delay settles at 56 s.
        let sent = run_quiet(&mut s, t0, t0 + hour, &mut ts, Duration::from_secs(60));
        let delays = |sent: &[(Instant, Registration)]| -> Vec<u64> {
            sent.iter()
                .filter_map(|(_, k)| match k {
                    Registration::Refresh { answer_after } => Some(answer_after.as_secs()),
                    Registration::Full => None,
                })
                .collect()
        };
        let fulls = |sent: &[(Instant, Registration)]| {
            sent.iter()
                .filter(|(_, k)| *k == Registration::Full)
                .count()
        };
        let d = delays(&sent);
        assert_eq!(&d[..9], &[25, 37, 56, 84, 56, 70, 56, 63, 56], "{d:?}");
        assert!(d[9..].iter().all(|d| *d == 56), "{d:?}");
        assert_eq!(
            fulls(&sent),
            3,
            "one registration per lost answer: {sent:?}"
        );
        assert!(s.answering(), "the relay never counted as lost");
        assert!(sent.len() < 80, "{} registrations in an hour", sent.len());
        assert_eq!(s.proven_keepalive().as_secs(), 56);

        // Linux conntrack's 120 s (a delay of exactly that loses the race): 120 is lost, 102
        // and then 111 work, and it stays there.
        let mut s = session(t0);
        acked(&mut s, t0, 1);
        let sent = run_quiet(&mut s, t0, t0 + hour, &mut ts, Duration::from_secs(118));
        let d = delays(&sent);
        assert_eq!(&d[..8], &[25, 37, 56, 84, 120, 84, 102, 111], "{d:?}");
        assert!(d[8..].iter().all(|d| *d == 111), "{d:?}");
        assert_eq!(fulls(&sent), 1, "{sent:?}");
        assert!(sent.len() < 40, "{} registrations in an hour", sent.len());

        // Not behind a NAT: the longest delay from the start.
        let mut s = session(t0);
        s.set_no_nat(true);
        acked(&mut s, t0, 1);
        let sent = run_quiet(&mut s, t0, t0 + hour, &mut ts, Duration::MAX);
        assert!(sent.len() <= 32, "{} registrations in an hour", sent.len());
        assert_eq!(s.keepalive(), RELAY_KEEPALIVE_MAX);
    }

    #[test]
    fn the_end_of_quiet_or_an_unregistered_answer_registers_at_once() {
        let t0 = Instant::now();
        let mut s = session(t0);
        acked(&mut s, t0, 1);
        let mut ts = 1;
        s.set_quiet(t0, true);
        let t1 = s.poll_timeout();
        let Some(Registration::Refresh { answer_after }) = s.handle_timeout(t1).register else {
            panic!("a delayed refresh while quiet");
        };
        assert_eq!(answer_after, RELAY_KEEPALIVE_START);
        ts += 1;
        s.note_register_sent(t1, ts, Registration::Refresh { answer_after });
        // Not yet lost or unanswered while the delay runs.
        let t2 = t1 + Duration::from_secs(20);
        assert!(s.poll_timeout() > t2);
        // Traffic resumes: a refresh answered at once goes out now.
        s.set_quiet(t2, false);
        assert_eq!(s.poll_timeout(), t2);
        assert_eq!(
            s.handle_timeout(t2).register,
            Some(Registration::Refresh {
                answer_after: Duration::ZERO
            })
        );
        ts += 1;
        s.note_register_sent(
            t2,
            ts,
            Registration::Refresh {
                answer_after: Duration::ZERO,
            },
        );
        // The relay restarted: it asks for a registration, which goes out at once, in full.
        assert!(
            !s.handle_unregistered(t2, ts - 1),
            "not the refresh in flight"
        );
        assert!(s.handle_unregistered(t2, ts));
        assert_eq!(s.handle_timeout(t2).register, Some(Registration::Full));
    }

    #[test]
    fn an_announcement_changed_while_a_registration_is_in_flight_is_sent_after_its_ack() {
        let t0 = Instant::now();
        let mut s = session(t0);
        assert_eq!(s.handle_timeout(t0).register, Some(Registration::Full));
        s.note_register_sent(t0, 1, Registration::Full);
        // The NAT verdict arrives and the announcement is sealed again before the ack of the
        // registration that carried the old one.
        s.register_now(t0);
        let observed = "198.51.100.9:4000".parse().expect("literal");
        let t1 = t0 + Duration::from_millis(1);
        assert!(matches!(
            s.handle_ack(t1, 1, observed),
            Ack::Accepted { .. }
        ));
        assert_eq!(
            s.poll_timeout(),
            t1,
            "the new announcement goes out at once"
        );
        assert_eq!(s.handle_timeout(t1).register, Some(Registration::Full));
        s.note_register_sent(t1, 2, Registration::Full);
        s.handle_ack(t1, 2, observed);
        // Now the relay holds the current one: refreshes from here on.
        let t2 = s.poll_timeout();
        assert_eq!(
            s.handle_timeout(t2).register,
            Some(Registration::Refresh {
                answer_after: Duration::ZERO
            })
        );
    }
}
