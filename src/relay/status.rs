//! What `meshvpn relay-status` shows: a snapshot of a running relay, with every limit's counter.
//!
//! The relay builds a [`RelayStatus`] on request (see [`super::control`]) and sends it as one
//! line of JSON; the command prints it as is (`--json`) or as `name  value` lines, one per
//! field, flattened with dots (`tcp.counters.refused_per_source  12`). Flattening the JSON
//! rather than naming fields here means a counter added anywhere in the struct shows up in both
//! forms without touching the printer.

use serde::{Deserialize, Serialize};

use super::limits::{TcpCounters, TcpLimits};
use super::server::Counters as ServerCounters;

/// A snapshot of a running relay.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RelayStatus {
    /// The relay's public key (base64).
    pub public_key: String,
    /// The UDP/TCP address it listens on.
    pub listen: String,
    /// Seconds since it started.
    pub uptime_s: u64,
    /// Registered members, all networks together.
    pub members: usize,
    /// Networks with at least one member.
    pub networks: usize,
    /// The open-file limit it runs under.
    pub descriptors: Descriptors,
    /// The TCP listener: connections, limits and what the limits did.
    pub tcp: TcpStatus,
    /// The second STUN port and the main UDP socket as the driver sees them.
    pub udp: UdpCounters,
    /// The relay server's own counters (requests, forwarding, refusals).
    pub server: ServerCounters,
}

/// The process's open-file limit (`RLIMIT_NOFILE`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Descriptors {
    /// Soft limit the relay was started with.
    pub soft_at_start: u64,
    /// Hard limit.
    pub hard: u64,
    /// Soft limit in force (raised to the hard limit at start when allowed).
    pub soft: u64,
}

/// The TCP listener's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct TcpStatus {
    /// Open connections.
    pub connections: usize,
    /// Open connections that registered.
    pub registered: usize,
    /// Distinct sources with an open connection.
    pub sources: usize,
    /// The limits in force.
    pub limits: TcpLimits,
    /// What the limits did.
    pub counters: TcpCounters,
}

/// Counters of the driver's UDP sockets.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct UdpCounters {
    /// Datagrams received on the main port.
    pub received: u64,
    /// Sends on the main port that failed.
    pub send_errors: u64,
    /// STUN Binding requests answered on the second port.
    pub alt_stun_answered: u64,
    /// Datagrams on the second port that were not STUN Binding requests.
    pub alt_dropped: u64,
}

impl RelayStatus {
    /// Every field as `(path, value)`, nested fields joined with dots, in the JSON's order.
    pub(crate) fn fields(&self) -> Vec<(String, String)> {
        let value = serde_json::to_value(self).unwrap_or(serde_json::Value::Null);
        let mut fields = Vec::new();
        flatten("", &value, &mut fields);
        fields
    }

    /// `name  value` lines, one per field, nested fields joined with dots.
    pub fn to_text(&self) -> String {
        let lines = self.fields();
        let width = lines.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
        lines
            .iter()
            .map(|(k, v)| format!("{k:width$}  {v}\n"))
            .collect()
    }
}

fn flatten(prefix: &str, value: &serde_json::Value, out: &mut Vec<(String, String)>) {
    match value {
        serde_json::Value::Object(map) => {
            for (k, v) in map {
                let key = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                flatten(&key, v, out);
            }
        }
        serde_json::Value::String(s) => out.push((prefix.to_string(), s.clone())),
        serde_json::Value::Null
        | serde_json::Value::Bool(_)
        | serde_json::Value::Number(_)
        | serde_json::Value::Array(_) => out.push((prefix.to_string(), value.to_string())),
    }
}

/// A status as a test relay would report it.
#[cfg(test)]
pub(crate) fn sample() -> RelayStatus {
    RelayStatus {
        public_key: "key".into(),
        listen: "0.0.0.0:3478".into(),
        uptime_s: 5,
        members: 2,
        networks: 1,
        descriptors: Descriptors {
            soft_at_start: 1024,
            hard: 1024,
            soft: 1024,
        },
        tcp: TcpStatus {
            connections: 3,
            registered: 1,
            sources: 2,
            limits: TcpLimits::for_descriptors(1024),
            counters: TcpCounters {
                refused_per_source: 2985,
                ..TcpCounters::default()
            },
        },
        udp: UdpCounters::default(),
        server: ServerCounters::default(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_round_trips_and_prints_every_counter() {
        let status = sample();
        let json = serde_json::to_string(&status).expect("serialise");
        let back: RelayStatus = serde_json::from_str(&json).expect("parse");
        assert_eq!(back, status);
        let text = status.to_text();
        assert!(text.contains("tcp.counters.refused_per_source"), "{text}");
        assert!(text.contains("  2985\n"), "{text}");
        assert!(text.contains("tcp.limits.register_deadline"), "{text}");
        assert!(text.contains("server.dropped"), "{text}");
        assert!(text.contains("public_key"), "{text}");
    }
}
