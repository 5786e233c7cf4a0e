//! What the node tells the operator: the `meshvpn status` snapshot and, for a relayed peer,
//! why it is relayed. Read-only views over the sub-machines; nothing here changes state.

use std::time::Instant;

use super::peer::{Path, Peer};
use super::relay_session::RelaySession;
use super::{Node, StreamKind};
use crate::status::{NatStatus, PeerPath, PeerStatus, RelayStatus, Status, StunAnswer};
use crate::wire::NatKind;

impl Node {
    /// A snapshot for `meshvpn status`.
    pub fn status(&self, now: Instant) -> Status {
        let peers = self
            .peers
            .values()
            .map(|p| {
                let via = &self.relays[self.out.peer_relay(&p.key)];
                let relayed = match via.stream_in_use() {
                    Some(StreamKind::Tls) => PeerPath::RelayTls,
                    Some(StreamKind::Tcp) => PeerPath::RelayTcp,
                    None => PeerPath::Relay,
                };
                let (path, endpoint) = match p.paths.path() {
                    Path::Direct { addr, .. } => (PeerPath::Direct, addr),
                    Path::Relayed => (relayed, via.target().addr),
                };
                let (rx_bytes, tx_bytes) = p.link.byte_counts();
                PeerStatus {
                    name: p.announcement.name.clone(),
                    public_key: p.key.to_base64(),
                    virtual_ip: p.virtual_ip().to_string(),
                    virtual_ipv6: self.members.overlay_ipv6_of(&p.key).map(|a| a.to_string()),
                    dns_name: None,
                    path,
                    endpoint: Some(endpoint.to_string()),
                    rtt_ms: p
                        .paths
                        .rtt()
                        .map(|d| (d.as_secs_f64() * 10_000.0).round() / 10.0),
                    last_handshake_age_s: p.link.handshake_age().map(|d| d.as_secs()),
                    rx_bytes,
                    tx_bytes,
                    ip_conflict: self.members.is_conflicted(&p.key),
                    relay_reason: p.paths.is_relayed().then(|| self.relay_reason(now, p)),
                    path_mtu: Some(p.paths.pmtu.mtu()),
                }
            })
            .collect();
        Status {
            network: self.cfg.network_name.clone(),
            name: self.cfg.name.clone(),
            virtual_ip: self.cfg.virtual_ip.to_string(),
            virtual_ipv6: Some(self.overlay_ipv6().to_string()),
            dns_name: None,
            public_key: self.public.to_base64(),
            relay: self.relay_status(&self.relays[self.primary]),
            relays: self.relays.iter().map(|r| self.relay_status(r)).collect(),
            endpoints: self.local_endpoints.iter().map(ToString::to_string).collect(),
            ip_conflict: self.members.conflict().map(|(ip, owner)| {
                format!("virtual IP {ip} is also claimed by member {}, which keeps it; this member gets no traffic (choose another address with --ip)", owner.short())
            }),
            nat: NatStatus {
                mapping: self.nat.into(),
                summary: self.nat_summary(),
                reflexive: self
                    .netcheck
                    .reflexive()
                    .or(self.relays[self.primary].observed())
                    .map(|a| a.to_string()),
                port_mapping: self.port_mapping.as_ref().map(|(l, a)| format!("{l} {a}")),
                udp_blocked: self.relays[self.primary].on_stream(),
                stun: self
                    .netcheck
                    .answers()
                    .into_iter()
                    .map(|(server, mapped)| StunAnswer {
                        server: server.to_string(),
                        mapped: mapped.to_string(),
                    })
                    .collect(),
            },
            peers,
            dropped: self.drops,
        }
    }

    /// Why `p` is relayed, in words for `status` and `netcheck`.
    fn relay_reason(&self, now: Instant, p: &Peer) -> String {
        let next = p
            .paths
            .next_probe()
            .saturating_duration_since(now)
            .as_secs();
        match self.relays[self.out.peer_relay(&p.key)].stream_in_use() {
            Some(StreamKind::Tcp) => return "UDP blocked here (relay over TCP)".into(),
            Some(StreamKind::Tls) => return "UDP blocked here (relay over TLS)".into(),
            None => {}
        }
        if p.announcement.nat == NatKind::UdpBlocked {
            return "UDP blocked at the peer (it uses the relay over a stream)".into();
        }
        let hard = |k: NatKind| k == NatKind::EndpointDependent;
        if hard(self.nat) && hard(p.announcement.nat) && self.port_mapping.is_none() {
            return format!(
                "both sides symmetric, no port mapping; next direct attempt in {next} s"
            );
        }
        if p.paths.birthday.is_running() {
            return "birthday probe in progress (one side symmetric)".into();
        }
        format!("no direct answer yet; next direct attempt in {next} s")
    }

    /// One relay's line in `status`.
    fn relay_status(&self, r: &RelaySession) -> RelayStatus {
        let target = r.target();
        RelayStatus {
            address: target.addr.to_string(),
            public_key: target.key.to_base64(),
            registered: r.is_registered(),
            observed: r.observed().map(|a| a.to_string()),
            answering: r.answering(),
            primary: r.id() == self.primary,
            transport: match r.stream_in_use() {
                Some(StreamKind::Tcp) => "tcp",
                Some(StreamKind::Tls) => "tls",
                None => "udp",
            }
            .into(),
            rtt_ms: r.rtt().map(|d| (d.as_secs_f64() * 10_000.0).round() / 10.0),
            keepalive_s: (r.stream_in_use().is_none() && r.is_registered())
                .then(|| r.proven_keepalive().as_secs()),
        }
    }

    /// What `status` says about this member's NAT.
    fn nat_summary(&self) -> String {
        let mut text = self.nat.describe().to_string();
        if let Some((label, addr)) = &self.port_mapping {
            text.push_str(&format!(", {label} mapped {addr}"));
        }
        text
    }
}
