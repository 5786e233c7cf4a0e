//! What `meshvpn status` shows: a serialisable snapshot of one agent, and its table rendering.
//!
//! This is the schema of `meshvpn status --json`. It lives in its own crate, depending on serde
//! only, so that the agent that writes it and the namespace lab that reads it share one
//! definition without the lab depending on the whole product (`meshvpn` re-exports it as
//! `meshvpn::status`). Fields with a fixed set of values ([`PeerPath`], [`NatMapping`]) are
//! enums serialised to the exact strings the JSON has always carried.

use std::fmt::{self, Write as _};
use std::net::{AddrParseError, Ipv4Addr, Ipv6Addr, SocketAddr};

use serde::{Deserialize, Serialize};

mod report;
pub use report::{
    ListReport, ListedNetwork, NetcheckPeer, NetcheckReport, NetworkStatus, PeersReport,
    StatusReport, SCHEMA,
};

/// A snapshot of one member's view of its network.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Status {
    /// Network name.
    pub network: String,
    /// This member's node name.
    pub name: String,
    /// This member's virtual IPv4 address.
    pub virtual_ip: String,
    /// This member's IPv6 overlay address (a unique local address in the network's /64,
    /// derived from the network id and the member's key); absent from older agents.
    #[serde(default)]
    pub virtual_ipv6: Option<String>,
    /// This member's DNS name (`NAME.NETWORK.mesh.internal`) when the agent serves names and
    /// this member holds its label.
    #[serde(default)]
    pub dns_name: Option<String>,
    /// This member's public key (base64).
    pub public_key: String,
    /// The primary relay: the one whose member table this member follows.
    pub relay: RelayStatus,
    /// Every relay in the token, in its order, with its state.
    #[serde(default)]
    pub relays: Vec<RelayStatus>,
    /// Addresses this member announces (host addresses with its UDP port).
    pub endpoints: Vec<String>,
    /// This member's NAT as it classified it.
    pub nat: NatStatus,
    /// Set when another member holds this member's virtual IP (this member gets no traffic).
    pub ip_conflict: Option<String>,
    /// Every other member.
    pub peers: Vec<PeerStatus>,
    /// Datagrams and packets dropped, by reason.
    pub dropped: DropCounters,
}

/// The relay as this member sees it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RelayStatus {
    /// `ip:port` of the relay.
    pub address: String,
    /// The relay's public key (base64), as given by the token.
    pub public_key: String,
    /// Whether the relay acknowledged a registration recently.
    pub registered: bool,
    /// This member's address as the relay sees it (server-reflexive), if known.
    pub observed: Option<String>,
    /// Whether the relay answers now (registered, and the latest registration answered).
    #[serde(default)]
    pub answering: bool,
    /// Whether this is the primary relay.
    #[serde(default)]
    pub primary: bool,
    /// How this member reaches the relay: `udp`, `tcp` or `tls`.
    #[serde(default)]
    pub transport: String,
    /// Round-trip time of the latest acknowledged registration, in milliseconds.
    #[serde(default)]
    pub rtt_ms: Option<f64>,
    /// How long this member's NAT is known to keep its mapping to the relay with nothing
    /// sent (learned from delayed answers), in seconds: while quiet, the member refreshes
    /// its registration this often.
    #[serde(default)]
    pub keepalive_s: Option<u64>,
}

/// This member's NAT verdict.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct NatStatus {
    /// Mapping behaviour, as the member classified it.
    pub mapping: NatMapping,
    /// One line: the mapping behaviour and the port mapping, if any.
    pub summary: String,
    /// This member's address as STUN (or the relay) sees it.
    pub reflexive: Option<String>,
    /// A gateway port mapping ("UPnP 203.0.113.2:41641"), if one is held.
    pub port_mapping: Option<String>,
    /// Whether UDP to the relay is blocked and the relay is reached over TCP.
    pub udp_blocked: bool,
    /// What each STUN server (the relays' two ports, then `stun_servers`) answered lately.
    #[serde(default)]
    pub stun: Vec<StunAnswer>,
}

/// One STUN server's answer: where it saw this member.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct StunAnswer {
    /// The server, `ip:port`.
    pub server: String,
    /// This member's address as that server saw it.
    pub mapped: String,
}

/// One peer as this member sees it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PeerStatus {
    /// The peer's node name.
    pub name: String,
    /// The peer's public key (base64).
    pub public_key: String,
    /// The peer's virtual IPv4 address.
    pub virtual_ip: String,
    /// The peer's IPv6 overlay address; absent from older agents.
    #[serde(default)]
    pub virtual_ipv6: Option<String>,
    /// The peer's DNS name, when the agent serves names and the peer holds its label.
    #[serde(default)]
    pub dns_name: Option<String>,
    /// The path packets to this peer take.
    pub path: PeerPath,
    /// The underlay `ip:port` packets to this peer go to (the relay's when relayed).
    pub endpoint: Option<String>,
    /// Round-trip time on the current path, in milliseconds.
    pub rtt_ms: Option<f64>,
    /// Seconds since the last completed WireGuard handshake.
    pub last_handshake_age_s: Option<u64>,
    /// Bytes of decrypted packets received from this peer.
    pub rx_bytes: u64,
    /// Bytes of packets sent to this peer (before encryption).
    pub tx_bytes: u64,
    /// Set when this peer claims an address another member owns (it gets no route).
    pub ip_conflict: bool,
    /// Why the path is relayed (absent when direct).
    pub relay_reason: Option<String>,
    /// The largest inner packet the current path carries, in bytes (path MTU discovery; the
    /// base for the path until a probe confirms more). Absent from older agents.
    #[serde(default)]
    pub path_mtu: Option<u16>,
}

/// The path packets to a peer take, serialised as `"direct"`, `"relay"`, `"relay-tcp"` or
/// `"relay-tls"`.
///
/// A new relay transport is one more variant with its own name here.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum PeerPath {
    /// Straight to the peer's confirmed UDP address.
    #[serde(rename = "direct")]
    Direct,
    /// Through the relay, over UDP.
    #[serde(rename = "relay")]
    Relay,
    /// Through the relay, over its TCP stream (UDP to the relay is blocked).
    #[serde(rename = "relay-tcp")]
    RelayTcp,
    /// Through the relay, over its WebSocket-over-TLS stream (only TLS, usually TCP 443, gets
    /// out).
    #[serde(rename = "relay-tls")]
    RelayTls,
}

impl PeerPath {
    /// Every path, in a fixed order.
    pub const ALL: [PeerPath; 4] = [
        PeerPath::Direct,
        PeerPath::Relay,
        PeerPath::RelayTcp,
        PeerPath::RelayTls,
    ];

    /// The name the JSON and the tables use.
    pub fn as_str(self) -> &'static str {
        match self {
            PeerPath::Direct => "direct",
            PeerPath::Relay => "relay",
            PeerPath::RelayTcp => "relay-tcp",
            PeerPath::RelayTls => "relay-tls",
        }
    }

    /// Whether packets go straight to the peer.
    pub fn is_direct(self) -> bool {
        self == PeerPath::Direct
    }
}

impl fmt::Display for PeerPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.as_str())
    }
}

/// How this member's NAT maps its UDP port, serialised as the phrase `status` has always shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum NatMapping {
    /// Not classified yet (or STUN got no answer).
    #[serde(rename = "unknown")]
    Unknown,
    /// The member's address is public.
    #[serde(rename = "no NAT (public address)")]
    Public,
    /// Every destination sees the same public address and port.
    #[serde(rename = "endpoint-independent mapping")]
    EndpointIndependent,
    /// Every destination sees another port ("symmetric" NAT).
    #[serde(rename = "symmetric (endpoint-dependent mapping)")]
    EndpointDependent,
    /// UDP to the relay gets no answer; the member is attached over TCP.
    #[serde(rename = "UDP blocked (relay over TCP)")]
    UdpBlocked,
}

impl NatMapping {
    /// Every verdict, in a fixed order.
    pub const ALL: [NatMapping; 5] = [
        NatMapping::Unknown,
        NatMapping::Public,
        NatMapping::EndpointIndependent,
        NatMapping::EndpointDependent,
        NatMapping::UdpBlocked,
    ];

    /// The phrase the JSON and `netcheck` use.
    pub fn as_str(self) -> &'static str {
        match self {
            NatMapping::Unknown => "unknown",
            NatMapping::Public => "no NAT (public address)",
            NatMapping::EndpointIndependent => "endpoint-independent mapping",
            NatMapping::EndpointDependent => "symmetric (endpoint-dependent mapping)",
            NatMapping::UdpBlocked => "UDP blocked (relay over TCP)",
        }
    }
}

impl fmt::Display for NatMapping {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.as_str())
    }
}

/// Drop counters by reason.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct DropCounters {
    /// Datagrams that were none of WireGuard, STUN or meshvpn frames, or failed to parse.
    pub malformed: u64,
    /// Control messages that failed authentication.
    pub unauthenticated: u64,
    /// WireGuard packets that did not decrypt or were not for a known peer.
    pub wireguard: u64,
    /// Decrypted packets whose inner source is not routed to the sending peer.
    pub spoofed_source: u64,
    /// Packets from the TUN for an address no member owns (outside the subnet at once; for a
    /// subnet address, once no member with it has joined within a few seconds or the hold
    /// for such packets overflowed).
    pub no_route: u64,
    /// Handshake initiations dropped because the node's budget of key agreements a second
    /// was spent (a flood from many addresses).
    #[serde(default)]
    pub handshake_flood: u64,
    /// Handshake messages answered with a cookie reply instead of a key agreement (the node
    /// was under load and the sender had not proven its address).
    #[serde(default)]
    pub handshake_cookie: u64,
    /// Handshake initiations dropped as exact replays of one seen recently (before any
    /// cryptography).
    #[serde(default)]
    pub handshake_replay: u64,
    /// Decrypted packets whose inner destination was not this member's virtual IP.
    #[serde(default)]
    pub wrong_destination: u64,
    /// Member announcements older than one already seen (replays), refused.
    #[serde(default)]
    pub stale_announcement: u64,
    /// Member pushes refused because the member table is full.
    #[serde(default)]
    pub members_full: u64,
    /// Packets held for a peer while its handshake was in progress and then dropped: the
    /// hold was full (the oldest go first) or the handshake did not complete in time.
    #[serde(default)]
    pub handshake_pending: u64,
    /// Birthday-probe requests refused because the relay's view of the requesting member's
    /// address differed from the address the member vouched for (a relay pointing the spray
    /// at someone else).
    #[serde(default)]
    pub spray_refused: u64,
    /// Packets from the TUN larger than their peer's path MTU that could not be fragmented:
    /// those with DF set were answered with ICMP "fragmentation needed" (rate-limited).
    #[serde(default)]
    pub too_big: u64,
}

/// The address part of `10.1.2.3` or `10.1.2.3/16`.
fn parse_ipv4(text: &str) -> Result<Ipv4Addr, AddrParseError> {
    text.split('/').next().unwrap_or(text).parse()
}

impl PeerStatus {
    /// The peer's virtual IPv4 address, parsed.
    pub fn virtual_ipv4(&self) -> Result<Ipv4Addr, AddrParseError> {
        parse_ipv4(&self.virtual_ip)
    }

    /// The peer's IPv6 overlay address, if the agent reported one that parses.
    pub fn overlay_ipv6(&self) -> Option<Ipv6Addr> {
        self.virtual_ipv6.as_deref()?.parse().ok()
    }

    /// The endpoint as a socket address (`ip:port` or `[ipv6]:port`), if known and parseable.
    pub fn endpoint_addr(&self) -> Option<SocketAddr> {
        self.endpoint.as_deref()?.parse().ok()
    }

    /// Whether the endpoint is an IPv6 socket address (not an IPv4-mapped one).
    pub fn endpoint_is_ipv6(&self) -> bool {
        match self.endpoint_addr() {
            Some(SocketAddr::V6(a)) => a.ip().to_ipv4_mapped().is_none(),
            Some(SocketAddr::V4(_)) | None => false,
        }
    }
}

impl Status {
    /// This member's virtual IPv4 address, parsed.
    pub fn virtual_ipv4(&self) -> Result<Ipv4Addr, AddrParseError> {
        parse_ipv4(&self.virtual_ip)
    }

    /// This member's IPv6 overlay address, if the agent reported one that parses.
    pub fn overlay_ipv6(&self) -> Option<Ipv6Addr> {
        self.virtual_ipv6.as_deref()?.parse().ok()
    }

    /// The peer called `name`, if listed.
    pub fn peer(&self, name: &str) -> Option<&PeerStatus> {
        self.peers.iter().find(|p| p.name == name)
    }

    /// The peer with virtual IP `ip`, if listed.
    pub fn peer_by_ip(&self, ip: Ipv4Addr) -> Option<&PeerStatus> {
        self.peers.iter().find(|p| p.virtual_ipv4() == Ok(ip))
    }

    /// The peers' names, sorted.
    pub fn peer_names(&self) -> Vec<String> {
        let mut v: Vec<String> = self.peers.iter().map(|p| p.name.clone()).collect();
        v.sort();
        v
    }

    /// One line: how many peers and on which paths (`3 peers: 2 direct, 1 relay-tcp`).
    pub fn summary(&self) -> String {
        let n = self.peers.len();
        if n == 0 {
            return "no peers yet".into();
        }
        let by_path: Vec<String> = PeerPath::ALL
            .iter()
            .filter_map(|path| {
                let count = self.peers.iter().filter(|p| p.path == *path).count();
                (count > 0).then(|| format!("{count} {path}"))
            })
            .collect();
        let noun = if n == 1 { "peer" } else { "peers" };
        format!("{n} {noun}: {}", by_path.join(", "))
    }

    /// Renders the status as a human-readable table: the summary line, a row for this member
    /// (name, virtual IP, NAT, relay state), then one row per peer.
    pub fn to_table(&self) -> String {
        self.table(None)
    }

    /// [`Status::to_table`]; `ready`, when the agent said, is added to the relay state.
    fn table(&self, ready: Option<bool>) -> String {
        let mut out = String::new();
        let mut relay_state = if self.relay.registered {
            format!("{} registered", self.relay.address)
        } else {
            format!("{} not registered (retrying)", self.relay.address)
        };
        match ready {
            Some(true) => relay_state.push_str(", synced"),
            Some(false) if self.relay.registered => relay_state.push_str(", syncing members"),
            Some(false) | None => {}
        }
        if let Some(o) = &self.relay.observed {
            let _ = write!(relay_state, ", sees us as {o}");
        }
        let _ = writeln!(out, "{}: {}", self.network, self.summary());
        let me = [
            format!("{} (this member)", self.name),
            self.virtual_ip.clone(),
            self.nat.summary.clone(),
            relay_state,
        ];
        let _ = write!(
            out,
            "{}",
            grid(&["MEMBER", "VIRTUAL IP", "NAT", "RELAY"], &[me])
        );
        let _ = writeln!(out, "public key {}", self.public_key);
        if let Some(v6) = &self.virtual_ipv6 {
            let _ = writeln!(out, "IPv6 overlay {v6}/64");
        }
        if let Some(name) = &self.dns_name {
            let _ = writeln!(out, "DNS name {name}");
        }
        if self.relays.len() > 1 {
            let rows: Vec<[String; 4]> = self
                .relays
                .iter()
                .map(|r| {
                    let state = match (r.answering, r.registered, r.primary) {
                        (true, _, true) => "answering, primary",
                        (true, _, false) => "answering",
                        (false, true, _) => "not answering (retrying)",
                        (false, false, _) => "not registered (retrying)",
                    };
                    [
                        r.address.clone(),
                        state.to_string(),
                        if r.transport.is_empty() {
                            "-".into()
                        } else {
                            r.transport.clone()
                        },
                        r.rtt_ms
                            .map(|ms| format!("{ms:.1} ms"))
                            .unwrap_or_else(|| "-".into()),
                    ]
                })
                .collect();
            out.push_str(&grid(&["RELAY", "STATE", "VIA", "RTT"], &rows));
        }
        if let Some(c) = &self.ip_conflict {
            let _ = writeln!(out, "WARNING: {c}");
        }
        if self.peers.is_empty() {
            return out;
        }
        let rows: Vec<[String; 9]> = self
            .peers
            .iter()
            .map(|p| {
                [
                    p.name.clone(),
                    p.virtual_ip.clone(),
                    if p.ip_conflict {
                        format!("{} (ip conflict)", p.path)
                    } else {
                        p.path.to_string()
                    },
                    p.endpoint.clone().unwrap_or_else(|| "-".into()),
                    p.rtt_ms
                        .map(|r| format!("{r:.1} ms"))
                        .unwrap_or_else(|| "-".into()),
                    p.path_mtu
                        .map(|m| m.to_string())
                        .unwrap_or_else(|| "-".into()),
                    p.last_handshake_age_s
                        .map(|s| format!("{s} s ago"))
                        .unwrap_or_else(|| "never".into()),
                    human_bytes(p.rx_bytes),
                    human_bytes(p.tx_bytes),
                ]
            })
            .collect();
        let header = [
            "PEER",
            "VIRTUAL IP",
            "PATH",
            "ENDPOINT",
            "RTT",
            "MTU",
            "HANDSHAKE",
            "RX",
            "TX",
        ];
        out.push_str(&grid(&header, &rows));
        out
    }
}

/// Left-aligned columns, two spaces apart, each as wide as its widest cell.
fn grid<const N: usize>(header: &[&str; N], rows: &[[String; N]]) -> String {
    let mut widths = header.map(str::len);
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.len());
        }
    }
    let line = |cells: Vec<&str>| {
        let mut l = String::new();
        for (c, w) in cells.iter().zip(widths) {
            let _ = write!(l, "{c:<w$}  ");
        }
        l.trim_end().to_string()
    };
    let mut out = String::new();
    let _ = writeln!(out, "{}", line(header.to_vec()));
    for row in rows {
        let _ = writeln!(out, "{}", line(row.iter().map(String::as_str).collect()));
    }
    out
}

fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 4] = ["B", "KiB", "MiB", "GiB"];
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peer_path_round_trips_through_todays_json_values() {
        let names: Vec<String> = PeerPath::ALL
            .iter()
            .map(|p| serde_json::to_string(p).expect("a unit variant serialises"))
            .collect();
        assert_eq!(
            names,
            [
                r#""direct""#,
                r#""relay""#,
                r#""relay-tcp""#,
                r#""relay-tls""#
            ]
        );
        for path in PeerPath::ALL {
            let json = serde_json::to_string(&path).expect("a unit variant serialises");
            assert_eq!(json, format!("\"{}\"", path.as_str()));
            assert_eq!(format!("{path}"), path.as_str());
            let back: PeerPath = serde_json::from_str(&json).expect("its own name parses");
            assert_eq!(back, path);
        }
        assert!(serde_json::from_str::<PeerPath>(r#""relayed""#).is_err());
        assert_eq!(format!("{:<9}|", PeerPath::Relay), "relay    |");
    }

    #[test]
    fn nat_mapping_round_trips_through_todays_json_values() {
        let names: Vec<String> = NatMapping::ALL
            .iter()
            .map(|m| serde_json::to_string(m).expect("a unit variant serialises"))
            .collect();
        assert_eq!(
            names,
            [
                r#""unknown""#,
                r#""no NAT (public address)""#,
                r#""endpoint-independent mapping""#,
                r#""symmetric (endpoint-dependent mapping)""#,
                r#""UDP blocked (relay over TCP)""#,
            ]
        );
        for mapping in NatMapping::ALL {
            let json = serde_json::to_string(&mapping).expect("a unit variant serialises");
            assert_eq!(json, format!("\"{}\"", mapping.as_str()));
            let back: NatMapping = serde_json::from_str(&json).expect("its own phrase parses");
            assert_eq!(back, mapping);
        }
        assert!(serde_json::from_str::<NatMapping>(r#""symmetric""#).is_err());
    }

    fn sample() -> Status {
        Status {
            network: "demo".into(),
            name: "alice".into(),
            virtual_ip: "10.1.2.3".into(),
            virtual_ipv6: None,
            dns_name: None,
            public_key: "a".into(),
            relay: RelayStatus {
                address: "198.51.100.1:3478".into(),
                public_key: "r".into(),
                registered: true,
                observed: Some("203.0.113.5:4000".into()),
                answering: true,
                primary: true,
                transport: "udp".into(),
                rtt_ms: Some(12.5),
                keepalive_s: Some(120),
            },
            relays: Vec::new(),
            endpoints: vec!["192.168.1.2:41641".into()],
            nat: NatStatus {
                mapping: NatMapping::EndpointDependent,
                summary: "symmetric (endpoint-dependent mapping)".into(),
                reflexive: Some("203.0.113.5:4000".into()),
                port_mapping: None,
                udp_blocked: false,
                stun: Vec::new(),
            },
            ip_conflict: None,
            peers: vec![
                PeerStatus {
                    name: "carol".into(),
                    public_key: "c".into(),
                    virtual_ip: "10.1.2.5/16".into(),
                    virtual_ipv6: None,
                    dns_name: None,
                    path: PeerPath::RelayTcp,
                    endpoint: None,
                    rtt_ms: None,
                    last_handshake_age_s: None,
                    rx_bytes: 0,
                    tx_bytes: 0,
                    ip_conflict: false,
                    relay_reason: Some("UDP to the relay is blocked".into()),
                    path_mtu: None,
                },
                PeerStatus {
                    name: "bob".into(),
                    public_key: "b".into(),
                    virtual_ip: "10.1.2.4".into(),
                    virtual_ipv6: None,
                    dns_name: None,
                    path: PeerPath::Direct,
                    endpoint: Some("198.51.100.6:4000".into()),
                    rtt_ms: Some(0.5),
                    last_handshake_age_s: Some(3),
                    rx_bytes: 10,
                    tx_bytes: 2048,
                    ip_conflict: false,
                    relay_reason: None,
                    path_mtu: Some(1340),
                },
            ],
            dropped: DropCounters::default(),
        }
    }

    #[test]
    fn status_json_keeps_its_field_values_and_round_trips() {
        let s = sample();
        let json = serde_json::to_value(&s).expect("a status serialises");
        assert_eq!(json["peers"][0]["path"], "relay-tcp");
        assert_eq!(json["peers"][1]["path"], "direct");
        assert_eq!(
            json["nat"]["mapping"],
            "symmetric (endpoint-dependent mapping)"
        );
        let back: Status = serde_json::from_value(json).expect("its own JSON parses");
        assert_eq!(back, s);
    }

    #[test]
    fn drop_counters_from_before_the_handshake_counters_still_parse() {
        let old =
            r#"{"malformed":1,"unauthenticated":2,"wireguard":3,"spoofed_source":4,"no_route":5}"#;
        let d: DropCounters = serde_json::from_str(old).expect("older JSON parses");
        assert_eq!((d.wireguard, d.no_route), (3, 5));
        assert_eq!(
            (d.handshake_flood, d.handshake_cookie, d.handshake_replay),
            (0, 0, 0)
        );
        assert_eq!(d.handshake_pending, 0);
        assert_eq!(d.too_big, 0);
    }

    #[test]
    fn peers_from_before_path_mtu_discovery_still_parse() {
        let mut json = serde_json::to_value(sample()).expect("a status serialises");
        assert_eq!(json["peers"][1]["path_mtu"], 1340);
        for peer in json["peers"].as_array_mut().expect("a list") {
            peer.as_object_mut().expect("an object").remove("path_mtu");
        }
        let back: Status = serde_json::from_value(json).expect("older JSON parses");
        assert!(back.peers.iter().all(|p| p.path_mtu.is_none()));
        assert!(sample().to_table().contains("1340"));
    }

    #[test]
    fn lookups_and_addresses() {
        let s = sample();
        assert_eq!(s.virtual_ipv4(), Ok(Ipv4Addr::new(10, 1, 2, 3)));
        assert_eq!(s.peer_names(), ["bob", "carol"]);
        let carol = s.peer("carol").expect("carol is listed");
        assert_eq!(carol.virtual_ipv4(), Ok(Ipv4Addr::new(10, 1, 2, 5)));
        assert!(!carol.endpoint_is_ipv6());
        assert_eq!(
            s.peer_by_ip(Ipv4Addr::new(10, 1, 2, 4)).map(|p| p.rtt_ms),
            Some(Some(0.5))
        );
        assert!(s.peer("mallory").is_none());
        let mut bob = s.peer("bob").expect("bob is listed").clone();
        assert_eq!(bob.endpoint_addr(), "198.51.100.6:4000".parse().ok());
        assert!(!bob.endpoint_is_ipv6());
        bob.endpoint = Some("[fd6d:3::2]:41641".into());
        assert!(bob.endpoint_is_ipv6());
        bob.endpoint = Some("[::ffff:198.51.100.6]:41641".into());
        assert!(!bob.endpoint_is_ipv6(), "an IPv4-mapped address is IPv4");
        let table = s.to_table();
        assert!(table.contains("relay-tcp"), "{table}");
        assert!(table.contains("2.0 KiB"), "{table}");
    }

    #[test]
    fn the_table_starts_with_a_summary_and_a_row_for_this_member() {
        let mut s = sample();
        let table = s.to_table();
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines[0], "demo: 2 peers: 1 direct, 1 relay-tcp", "{table}");
        assert!(lines[1].starts_with("MEMBER"), "{table}");
        assert!(
            lines[2].starts_with("alice (this member)")
                && lines[2].contains("10.1.2.3")
                && lines[2].contains("symmetric")
                && lines[2].contains("198.51.100.1:3478 registered"),
            "{table}"
        );
        let ready = NetworkStatus {
            status: s.clone(),
            ready: true,
        };
        assert!(ready.to_table().contains("registered, synced"));
        assert!(
            !table.contains("RELAY  "),
            "one relay: no relay table\n{table}"
        );
        let mut second = s.relay.clone();
        second.address = "198.51.100.2:3478".into();
        second.primary = false;
        second.answering = false;
        second.registered = false;
        second.rtt_ms = None;
        s.relays = vec![s.relay.clone(), second];
        let table = s.to_table();
        let row = |addr: &str| table.lines().find(|l| l.starts_with(addr)).unwrap_or("");
        let (first, second) = (row("198.51.100.1:3478"), row("198.51.100.2:3478"));
        assert!(
            first.contains("answering, primary")
                && first.contains("udp")
                && first.ends_with("12.5 ms"),
            "{table}"
        );
        assert!(second.contains("not registered (retrying)"), "{table}");
        s.peers.truncate(1);
        assert!(s.to_table().starts_with("demo: 1 peer: 1 relay-tcp\n"));
        s.peers.clear();
        assert!(s.to_table().starts_with("demo: no peers yet\n"));
    }

    #[test]
    fn reports_carry_the_schema_and_one_network_reads_like_many() {
        let one = NetworkStatus {
            status: sample(),
            ready: true,
        };
        let report = StatusReport {
            schema: SCHEMA,
            networks: vec![one.clone()],
            not_running: vec!["other".into()],
        };
        let json = serde_json::to_value(&report).expect("a report serialises");
        assert_eq!(json["schema"], 1);
        // The network's fields sit at the top of its object, beside `ready`.
        assert_eq!(json["networks"][0]["network"], "demo");
        assert_eq!(json["networks"][0]["ready"], true);
        assert_eq!(json["networks"][0]["peers"][1]["path"], "direct");
        let back: StatusReport = serde_json::from_value(json).expect("its own JSON parses");
        assert_eq!(back, report);
        // An agent that does not send `ready` reads as not ready.
        let bare = serde_json::to_value(sample()).expect("a status serialises");
        let old: NetworkStatus = serde_json::from_value(bare).expect("a bare status parses");
        assert!(!old.ready);
        assert_eq!(old.status, sample());
        let netcheck = serde_json::to_value(NetcheckReport::of(&sample())).expect("serialises");
        assert_eq!(netcheck["schema"], 1);
        assert_eq!(
            netcheck["peers"][0]["relay_reason"],
            "UDP to the relay is blocked"
        );
    }

    #[test]
    fn the_ipv6_overlay_address_is_optional_and_shown_for_this_member() {
        let mut s = sample();
        assert!(!s.to_table().contains("IPv6 overlay"));
        let json = serde_json::to_string(&s).expect("serializes");
        let old = json.replace(r#""virtual_ipv6":null,"#, "");
        assert!(!old.contains("virtual_ipv6"), "{old}");
        assert_eq!(
            serde_json::from_str::<Status>(&old).expect("older JSON parses"),
            s
        );
        s.virtual_ipv6 = Some("fd12:3456:789a::1".into());
        s.peers[0].virtual_ipv6 = Some("fd12:3456:789a::2".into());
        assert!(s.to_table().contains("IPv6 overlay fd12:3456:789a::1/64"));
        assert!(!s.to_table().contains("DNS name"));
        s.dns_name = Some("alice.demo.mesh.internal".into());
        assert!(s.to_table().contains("DNS name alice.demo.mesh.internal"));
        assert_eq!(
            s.overlay_ipv6(),
            Some("fd12:3456:789a::1".parse().expect("literal"))
        );
        assert_eq!(
            s.peers[0].overlay_ipv6(),
            Some("fd12:3456:789a::2".parse().expect("literal"))
        );
    }
}
