//! RFC 4787 NAT models for the simulator: mapping behaviour, filtering behaviour, port
//! allocation, mapping timeout and hairpinning — and the oracle that says whether two members
//! behind given NATs can have a direct path at all.

use std::collections::BTreeSet;
use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use rand::Rng;
use rand_chacha::ChaCha20Rng;

/// Whether the external address depends on the destination.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mapping {
    EndpointIndependent,
    EndpointDependent,
}

/// Which inbound packets a mapping lets through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Filtering {
    EndpointIndependent,
    AddressDependent,
    AddressAndPortDependent,
}

/// How external ports are chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PortAlloc {
    /// Keep the internal port when it is free (Linux masquerade).
    Preserve,
    /// A random port per mapping (`masquerade fully-random`).
    Random,
}

/// A NAT's behaviour.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NatSpec {
    pub name: &'static str,
    pub mapping: Mapping,
    pub filtering: Filtering,
    pub ports: PortAlloc,
    pub timeout: Duration,
    pub hairpin: bool,
}

impl NatSpec {
    pub const FULL_CONE: NatSpec = NatSpec::new(
        "full-cone",
        Mapping::EndpointIndependent,
        Filtering::EndpointIndependent,
        PortAlloc::Preserve,
    );
    pub const RESTRICTED_CONE: NatSpec = NatSpec::new(
        "restricted-cone",
        Mapping::EndpointIndependent,
        Filtering::AddressDependent,
        PortAlloc::Preserve,
    );
    /// A typical home router: Linux masquerade (EIM by port preservation) + conntrack filtering.
    pub const HOME_ROUTER: NatSpec = NatSpec::new(
        "home-router",
        Mapping::EndpointIndependent,
        Filtering::AddressAndPortDependent,
        PortAlloc::Preserve,
    );
    /// Endpoint-dependent mapping that happens to keep ports (predictable).
    pub const SYMMETRIC_PRESERVING: NatSpec = NatSpec::new(
        "symmetric-port-preserving",
        Mapping::EndpointDependent,
        Filtering::AddressAndPortDependent,
        PortAlloc::Preserve,
    );
    /// `masquerade fully-random`: a new random port per destination.
    pub const SYMMETRIC: NatSpec = NatSpec::new(
        "symmetric",
        Mapping::EndpointDependent,
        Filtering::AddressAndPortDependent,
        PortAlloc::Random,
    );
    /// Symmetric mapping but only address-dependent filtering.
    pub const SYMMETRIC_ADDRESS_FILTER: NatSpec = NatSpec::new(
        "symmetric-address-filter",
        Mapping::EndpointDependent,
        Filtering::AddressDependent,
        PortAlloc::Random,
    );

    const fn new(
        name: &'static str,
        mapping: Mapping,
        filtering: Filtering,
        ports: PortAlloc,
    ) -> Self {
        Self {
            name,
            mapping,
            filtering,
            ports,
            timeout: Duration::from_secs(30),
            hairpin: false,
        }
    }

    /// Whether the port a peer will see is the one the relay saw.
    fn predictable(&self) -> bool {
        self.mapping == Mapping::EndpointIndependent || self.ports == PortAlloc::Preserve
    }
}

/// How two members behind `a` and `b` (None: a public address) can reach each other.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Ordinary punching: each side probes the other's relay-observed address together.
    Punch,
    /// Only a birthday probe finds a path (one side symmetric, the other port-restricted).
    Birthday,
    /// No direct path: both sides have unpredictable mappings.
    Relay,
}

/// The oracle: what kind of path members behind `a` and `b` can have.
pub fn outcome(a: Option<&NatSpec>, b: Option<&NatSpec>) -> Outcome {
    let (Some(a), Some(b)) = (a, b) else {
        return Outcome::Punch;
    };
    let easy_filter = |s: &NatSpec| s.filtering != Filtering::AddressAndPortDependent;
    match (a.predictable(), b.predictable()) {
        (true, true) => Outcome::Punch,
        // The predictable side must accept a packet from an unknown port of the other side's
        // address: after probing that address, EIF or ADF filtering lets it in; with APDF only
        // guessing the port (a birthday probe) does.
        (true, false) if easy_filter(a) => Outcome::Punch,
        (false, true) if easy_filter(b) => Outcome::Punch,
        (true, false) | (false, true) => Outcome::Birthday,
        (false, false) => Outcome::Relay,
    }
}

/// Whether a direct path is possible at all (with a birthday probe where needed).
pub fn direct_possible(a: Option<&NatSpec>, b: Option<&NatSpec>) -> bool {
    outcome(a, b) != Outcome::Relay
}

struct Binding {
    internal: SocketAddr,
    external_port: u16,
    /// For endpoint-dependent mappings, the destination this binding is for.
    dest: Option<SocketAddr>,
    /// Destinations the inside has sent to (filtering state).
    sent_to: BTreeSet<SocketAddr>,
    last: Instant,
}

/// One NAT box with its public address and binding table.
pub struct Nat {
    pub spec: NatSpec,
    pub public_ip: Ipv4Addr,
    bindings: Vec<Binding>,
}

impl Nat {
    pub fn new(spec: NatSpec, public_ip: Ipv4Addr) -> Self {
        Self {
            spec,
            public_ip,
            bindings: Vec::new(),
        }
    }

    /// Drops every binding (a router reboot or conntrack flush).
    pub fn flush(&mut self) {
        self.bindings.clear();
    }

    fn expire(&mut self, now: Instant) {
        let timeout = self.spec.timeout;
        self.bindings
            .retain(|b| now.saturating_duration_since(b.last) < timeout);
    }

    /// Translates an outbound datagram's source; returns the public source address.
    pub fn outbound(
        &mut self,
        now: Instant,
        src: SocketAddr,
        dst: SocketAddr,
        rng: &mut ChaCha20Rng,
    ) -> SocketAddr {
        self.expire(now);
        let eim = self.spec.mapping == Mapping::EndpointIndependent;
        let found = self
            .bindings
            .iter()
            .position(|b| b.internal == src && (eim || b.dest == Some(dst)));
        let i = match found {
            Some(i) => i,
            None => {
                let dest = if eim { None } else { Some(dst) };
                let taken = |port: u16, bindings: &[Binding]| {
                    bindings.iter().any(|b| {
                        b.external_port == port && (eim || b.dest.is_none() || b.dest == dest)
                    })
                };
                let mut port = src.port();
                if self.spec.ports == PortAlloc::Random || taken(port, &self.bindings) {
                    loop {
                        port = rng.gen_range(1024..=65_535);
                        if !taken(port, &self.bindings) {
                            break;
                        }
                    }
                }
                self.bindings.push(Binding {
                    internal: src,
                    external_port: port,
                    dest,
                    sent_to: BTreeSet::new(),
                    last: now,
                });
                self.bindings.len() - 1
            }
        };
        let b = &mut self.bindings[i];
        b.sent_to.insert(dst);
        b.last = now;
        SocketAddr::new(self.public_ip.into(), b.external_port)
    }

    /// Filters and translates an inbound datagram to `port`; returns the inside address.
    pub fn inbound(&mut self, now: Instant, from: SocketAddr, port: u16) -> Option<SocketAddr> {
        self.expire(now);
        let filtering = self.spec.filtering;
        let b = self
            .bindings
            .iter_mut()
            .filter(|b| b.external_port == port)
            .find(|b| match filtering {
                Filtering::EndpointIndependent => true,
                Filtering::AddressDependent => b.sent_to.iter().any(|d| d.ip() == from.ip()),
                Filtering::AddressAndPortDependent => b.sent_to.contains(&from),
            })?;
        b.last = now;
        Some(b.internal)
    }
}
