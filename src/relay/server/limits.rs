//! The relay's limits: its configuration, its counters, the token buckets that budget expensive
//! work, and the rate-limited log line written when a limit trips.
//!
//! Expensive work is an X25519 (the session key of a key the relay has not seen) or an Ed25519
//! signature check. Every such operation must be allowed by two token buckets: one for the
//! source (an IPv4 address, or an IPv6 /64, since one host gets a whole /64), and one for the
//! whole relay. The per-source table is bounded; when it is full a new source is refused rather
//! than the table cleared, so sources that are spoofed in bulk cannot reset anyone's budget
//! (and they rarely get this far: on UDP a source must echo a cookie first). Buckets that have
//! refilled completely carry no information and are forgotten by [`SourceBudget::forget_idle`].

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// The relay's configurable limits.
#[derive(Debug, Clone, PartialEq)]
pub struct ServerConfig {
    /// Most members across all networks (bounds memory: about 2 KB each at most).
    pub max_members: usize,
    /// Most members one network may have (so one network cannot take the whole relay).
    pub max_members_per_network: usize,
    /// Most networks.
    pub max_networks: usize,
    /// Expensive operations (X25519, signature checks) per second across all sources.
    pub expensive_ops_per_second: f64,
    /// Burst of expensive operations across all sources.
    pub expensive_ops_burst: f64,
    /// Expensive operations per second one source (IPv4 address, IPv6 /64) may cause.
    pub source_ops_per_second: f64,
    /// Burst of expensive operations one source may cause.
    pub source_ops_burst: f64,
    /// Most sources whose budget is tracked at once.
    pub max_sources: usize,
}

/// A member re-registers every 10 s, which costs one signature check; 10,000 members make
/// 1,000 checks a second. 5,000 a second leaves room for joins and restarts while keeping a
/// flood's crypto to well under one core (an X25519 or an Ed25519 check is ~50 µs).
const DEFAULT_EXPENSIVE_OPS_PER_SECOND: f64 = 5_000.0;
/// A whole relay's worth of members can re-register after a relay restart within seconds.
const DEFAULT_EXPENSIVE_OPS_BURST: f64 = 5_000.0;
/// One source (a home NAT with a few dozen members) refreshes far below 20 operations a second.
const DEFAULT_SOURCE_OPS_PER_SECOND: f64 = 20.0;
/// Enough for 20 members behind one address to join at once (an X25519 and a check each).
const DEFAULT_SOURCE_OPS_BURST: f64 = 40.0;
/// Default member cap: 50,000 members of at most ~2 KB each stay within ~100 MB.
const DEFAULT_MAX_MEMBERS: usize = 50_000;
/// Default per-network cap: far above any group that shares one secret.
const DEFAULT_MAX_MEMBERS_PER_NETWORK: usize = 1024;
/// Default network cap.
const DEFAULT_MAX_NETWORKS: usize = 65_536;
/// Default bound of the per-source table (about 100 bytes per source).
const DEFAULT_MAX_SOURCES: usize = 65_536;

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            max_members: DEFAULT_MAX_MEMBERS,
            max_members_per_network: DEFAULT_MAX_MEMBERS_PER_NETWORK,
            max_networks: DEFAULT_MAX_NETWORKS,
            expensive_ops_per_second: DEFAULT_EXPENSIVE_OPS_PER_SECOND,
            expensive_ops_burst: DEFAULT_EXPENSIVE_OPS_BURST,
            source_ops_per_second: DEFAULT_SOURCE_OPS_PER_SECOND,
            source_ops_burst: DEFAULT_SOURCE_OPS_BURST,
            max_sources: DEFAULT_MAX_SOURCES,
        }
    }
}

/// What the relay did and refused, for operators (`Server::counters`) and tests. Every limit
/// has its own counter.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counters {
    /// STUN Binding requests answered.
    pub stun_answered: u64,
    /// STUN Binding requests not answered because the answer would be larger (unpadded).
    pub stun_too_small: u64,
    /// Key requests answered.
    pub key_requests_answered: u64,
    /// Cookie replies sent to addresses that had not proven they receive.
    pub cookie_replies: u64,
    /// Registrations accepted (new and repeated, each carrying the announcement).
    pub registrations: u64,
    /// Refreshes accepted (a registered member still there, without its announcement).
    #[serde(default)]
    pub refreshes: u64,
    /// Refreshes answered after the delay their member asked for (NAT keepalive probes).
    #[serde(default)]
    pub delayed_answers: u64,
    /// Refreshes answered at once although a delay was asked for, because the relay already
    /// held its maximum of delayed answers.
    #[serde(default)]
    pub delayed_answers_full: u64,
    /// Refreshes from a member not held at that address, answered with "register again".
    #[serde(default)]
    pub unregistered_refreshes: u64,
    /// Full membership syncs sent.
    pub syncs: u64,
    /// Members that left.
    pub leaves: u64,
    /// Members dropped because they stopped refreshing.
    pub expired: u64,
    /// Relay data frames forwarded.
    pub forwarded: u64,
    /// Bytes of relay data forwarded.
    pub forwarded_bytes: u64,
    /// Expensive operations done (X25519 and signature checks).
    pub expensive_ops: u64,
    /// Datagrams dropped, for any reason (the sum of the reasons below and garbage).
    pub dropped: u64,
    /// Garbage: not a frame or request this relay speaks.
    pub malformed: u64,
    /// Requests that did not open under the sender's session key.
    pub unauthenticated: u64,
    /// Requests whose network signature did not verify (the sender lacks the network secret).
    pub bad_signature: u64,
    /// Requests whose timestamp is too far from the relay's clock.
    pub clock_skew: u64,
    /// Requests whose timestamp is not newer than the sender's last one.
    pub replayed: u64,
    /// Relay frames, syncs and leaves from senders that are not registered (there).
    pub unknown_sender: u64,
    /// Expensive operations refused by a source's budget.
    pub source_budget_exceeded: u64,
    /// Expensive operations refused because the per-source table was full.
    pub source_table_full: u64,
    /// Expensive operations refused by the relay-wide budget.
    pub global_budget_exceeded: u64,
    /// Sync requests refused by the member's sync rate.
    pub sync_rate_exceeded: u64,
    /// Registrations refused by the relay-wide member cap.
    pub member_cap_reached: u64,
    /// Registrations refused by the per-network member cap.
    pub network_member_cap_reached: u64,
    /// Registrations refused by the network cap.
    pub network_cap_reached: u64,
    /// Rotation requests accepted (parts of uploads).
    #[serde(default)]
    pub rotation_requests: u64,
    /// Rotations completed (network ids retired).
    #[serde(default)]
    pub rotations: u64,
    /// Registrations under a retired network id, answered with the registrant's handover and
    /// refused.
    #[serde(default)]
    pub retired_registrations: u64,
    /// Rotation requests refused: another member's rotation of the id, too many entries, or
    /// the cap on records.
    #[serde(default)]
    pub rotation_cap_reached: u64,
}

/// A limit that can trip (each has a counter in [`Counters`] and a rate-limited log line).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(super) enum Limit {
    SourceBudget,
    SourceTable,
    GlobalBudget,
    SyncRate,
    MemberCap,
    NetworkMemberCap,
    NetworkCap,
    RotationCap,
}

impl Limit {
    fn describe(self) -> &'static str {
        match self {
            Limit::SourceBudget => "a source exceeded its budget of expensive operations",
            Limit::SourceTable => "the per-source budget table is full; refusing new sources",
            Limit::GlobalBudget => "the relay-wide budget of expensive operations is spent",
            Limit::SyncRate => "a member asked for syncs faster than its sync rate",
            Limit::MemberCap => "the relay holds its maximum number of members",
            Limit::NetworkMemberCap => "a network holds its maximum number of members",
            Limit::NetworkCap => "the relay holds its maximum number of networks",
            Limit::RotationCap => "a rotation request was refused (owner, entries or record cap)",
        }
    }

    fn counter(self, c: &mut Counters) -> &mut u64 {
        match self {
            Limit::SourceBudget => &mut c.source_budget_exceeded,
            Limit::SourceTable => &mut c.source_table_full,
            Limit::GlobalBudget => &mut c.global_budget_exceeded,
            Limit::SyncRate => &mut c.sync_rate_exceeded,
            Limit::MemberCap => &mut c.member_cap_reached,
            Limit::NetworkMemberCap => &mut c.network_member_cap_reached,
            Limit::NetworkCap => &mut c.network_cap_reached,
            Limit::RotationCap => &mut c.rotation_cap_reached,
        }
    }
}

/// A tripped limit is logged at most this often (with the number of trips since), so a flood
/// cannot turn into a flood of log lines.
pub(super) const TRIP_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// Counts trips and writes the rate-limited warning.
#[derive(Default)]
pub(super) struct TripLog {
    last: BTreeMap<Limit, (Instant, u64)>,
}

impl TripLog {
    /// Records a trip of `limit` in `counters` (and in `dropped`), logging if due.
    pub(super) fn trip(&mut self, now: Instant, limit: Limit, counters: &mut Counters) {
        *limit.counter(counters) += 1;
        counters.dropped += 1;
        let due = self
            .last
            .get(&limit)
            .is_none_or(|(last, _)| now.saturating_duration_since(*last) >= TRIP_LOG_INTERVAL);
        let entry = self.last.entry(limit).or_insert((now, 0));
        if due {
            tracing::warn!(
                total = *limit.counter(counters),
                since_last_log = entry.1 + 1,
                "relay limit: {}",
                limit.describe()
            );
            *entry = (now, 0);
        } else {
            entry.1 += 1;
        }
    }
}

/// A token bucket (tokens refill at a rate up to a burst).
#[derive(Debug, Clone, Copy)]
pub(super) struct TokenBucket {
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    /// A full bucket.
    pub(super) fn full(now: Instant, burst: f64) -> Self {
        Self {
            tokens: burst,
            last: now,
        }
    }

    /// Takes one token if there is one.
    pub(super) fn take(&mut self, now: Instant, rate: f64, burst: f64) -> bool {
        self.refill(now, rate, burst);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// Gives back a token taken for work that was then not done.
    pub(super) fn give_back(&mut self, burst: f64) {
        self.tokens = (self.tokens + 1.0).min(burst);
    }

    fn refill(&mut self, now: Instant, rate: f64, burst: f64) {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + elapsed * rate).min(burst);
        if now > self.last {
            self.last = now;
        }
    }

    fn is_full_at(&self, now: Instant, rate: f64, burst: f64) -> bool {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens + elapsed * rate >= burst
    }
}

/// The key a source's budget is kept under: an IPv4 address, or the /64 of an IPv6 address.
fn source_of(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6((u128::from(v6) & !((1u128 << 64) - 1)).into()),
        },
    }
}

/// Why [`Budgets::allow`] refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Refusal {
    Source,
    SourceTable,
    Global,
}

/// The per-source and the relay-wide budget of expensive operations.
pub(super) struct Budgets {
    sources: BTreeMap<IpAddr, TokenBucket>,
    global: Option<TokenBucket>,
}

impl Budgets {
    pub(super) fn new() -> Self {
        Self {
            sources: BTreeMap::new(),
            global: None,
        }
    }

    /// Takes one expensive operation from `ip`'s budget and the global one, or says which
    /// refused (taking nothing).
    pub(super) fn allow(
        &mut self,
        now: Instant,
        ip: IpAddr,
        config: &ServerConfig,
    ) -> Result<(), Refusal> {
        let key = source_of(ip);
        if !self.sources.contains_key(&key) && self.sources.len() >= config.max_sources {
            return Err(Refusal::SourceTable);
        }
        let source = self
            .sources
            .entry(key)
            .or_insert_with(|| TokenBucket::full(now, config.source_ops_burst));
        if !source.take(now, config.source_ops_per_second, config.source_ops_burst) {
            return Err(Refusal::Source);
        }
        let global = self
            .global
            .get_or_insert_with(|| TokenBucket::full(now, config.expensive_ops_burst));
        if !global.take(
            now,
            config.expensive_ops_per_second,
            config.expensive_ops_burst,
        ) {
            source.give_back(config.source_ops_burst);
            return Err(Refusal::Global);
        }
        Ok(())
    }

    /// Forgets sources whose bucket is full again (remembering them would change nothing).
    pub(super) fn forget_idle(&mut self, now: Instant, config: &ServerConfig) {
        self.sources.retain(|_, b| {
            !b.is_full_at(now, config.source_ops_per_second, config.source_ops_burst)
        });
    }

    /// Number of sources tracked.
    pub(super) fn sources(&self) -> usize {
        self.sources.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budgets_refuse_without_resetting() {
        let now = Instant::now();
        let config = ServerConfig {
            max_sources: 3,
            source_ops_burst: 2.0,
            source_ops_per_second: 1.0,
            expensive_ops_burst: 5.0,
            expensive_ops_per_second: 1.0,
            ..ServerConfig::default()
        };
        let mut b = Budgets::new();
        let ip = |n: u8| IpAddr::from([192, 0, 2, n]);
        assert_eq!(b.allow(now, ip(1), &config), Ok(()));
        assert_eq!(b.allow(now, ip(1), &config), Ok(()));
        assert_eq!(b.allow(now, ip(1), &config), Err(Refusal::Source));
        assert_eq!(b.allow(now, ip(2), &config), Ok(()));
        assert_eq!(b.allow(now, ip(3), &config), Ok(()));
        // The table is full: a new source is refused, and ip(1) is still out of budget.
        assert_eq!(b.allow(now, ip(4), &config), Err(Refusal::SourceTable));
        assert_eq!(b.allow(now, ip(1), &config), Err(Refusal::Source));
        assert_eq!(b.allow(now, ip(2), &config), Ok(()));
        // Global budget (5) is now spent.
        assert_eq!(b.allow(now, ip(3), &config), Err(Refusal::Global));
        // Later everything has refilled and idle sources are forgotten.
        let later = now + Duration::from_secs(10);
        b.forget_idle(later, &config);
        assert_eq!(b.sources(), 0);
        assert_eq!(b.allow(later, ip(4), &config), Ok(()));
    }

    #[test]
    fn ipv6_sources_are_per_64() {
        let a: IpAddr = "2001:db8:1:2:aaaa::1".parse().expect("lit");
        let b: IpAddr = "2001:db8:1:2:bbbb::9".parse().expect("lit");
        let c: IpAddr = "2001:db8:1:3::1".parse().expect("lit");
        assert_eq!(source_of(a), source_of(b));
        assert_ne!(source_of(a), source_of(c));
        let mapped: IpAddr = "::ffff:192.0.2.1".parse().expect("lit");
        assert_eq!(source_of(mapped), IpAddr::from([192, 0, 2, 1]));
    }
}
