//! What `meshvpn status` shows: a serialisable snapshot of one agent, and its table rendering.

use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

/// A snapshot of one member's view of its network.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Status {
    /// Network name.
    pub network: String,
    /// This member's node name.
    pub name: String,
    /// This member's virtual IPv4 address.
    pub virtual_ip: String,
    /// This member's public key (base64).
    pub public_key: String,
    /// The relay this member registered with.
    pub relay: RelayStatus,
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
}

/// This member's NAT verdict.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct NatStatus {
    /// Mapping behaviour: "endpoint-independent mapping", "symmetric (endpoint-dependent
    /// mapping)", "no NAT (public address)", "UDP blocked (relay over TCP)" or "unknown".
    pub mapping: String,
    /// One line: the mapping behaviour and the port mapping, if any.
    pub summary: String,
    /// This member's address as STUN (or the relay) sees it.
    pub reflexive: Option<String>,
    /// A gateway port mapping ("UPnP 203.0.113.2:41641"), if one is held.
    pub port_mapping: Option<String>,
    /// Whether UDP to the relay is blocked and the relay is reached over TCP.
    pub udp_blocked: bool,
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
    /// `"direct"`, `"relay"` or `"relay-tcp"`.
    pub path: String,
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
    /// Decrypted packets whose inner source was not the sending peer's virtual IP.
    pub spoofed_source: u64,
    /// Packets from the TUN for an address no member owns.
    pub no_route: u64,
}

impl Status {
    /// Renders the status as a human-readable table.
    pub fn to_table(&self) -> String {
        let mut out = String::new();
        let relay_state = if self.relay.registered {
            "registered"
        } else {
            "not registered (retrying)"
        };
        let _ = writeln!(
            out,
            "network {}  member {}  {}",
            self.network, self.name, self.virtual_ip
        );
        let _ = writeln!(out, "public key {}", self.public_key);
        let _ = writeln!(
            out,
            "relay {} {}{}",
            self.relay.address,
            relay_state,
            self.relay
                .observed
                .as_ref()
                .map(|o| format!(", sees us as {o}"))
                .unwrap_or_default()
        );
        let _ = writeln!(out, "nat {}", self.nat.summary);
        if let Some(c) = &self.ip_conflict {
            let _ = writeln!(out, "WARNING: {c}");
        }
        if self.peers.is_empty() {
            let _ = writeln!(out, "no peers yet");
            return out;
        }
        let rows: Vec<[String; 8]> = self
            .peers
            .iter()
            .map(|p| {
                [
                    p.name.clone(),
                    p.virtual_ip.clone(),
                    if p.ip_conflict {
                        format!("{} (ip conflict)", p.path)
                    } else {
                        p.path.clone()
                    },
                    p.endpoint.clone().unwrap_or_else(|| "-".into()),
                    p.rtt_ms
                        .map(|r| format!("{r:.1} ms"))
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
            "HANDSHAKE",
            "RX",
            "TX",
        ];
        let mut widths = header.map(str::len);
        for row in &rows {
            for (w, cell) in widths.iter_mut().zip(row) {
                *w = (*w).max(cell.len());
            }
        }
        let line = |cells: Vec<&str>| {
            let mut l = String::new();
            for (i, c) in cells.iter().enumerate() {
                let _ = write!(l, "{:<w$}  ", c, w = widths[i]);
            }
            l.trim_end().to_string()
        };
        let _ = writeln!(out, "{}", line(header.to_vec()));
        for row in &rows {
            let _ = writeln!(out, "{}", line(row.iter().map(String::as_str).collect()));
        }
        out
    }
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
