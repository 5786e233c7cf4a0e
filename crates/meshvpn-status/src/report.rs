//! The versioned JSON documents of `meshvpn status`, `peers`, `list` and `netcheck` with
//! `--json`: each is one object whose `schema` field is [`SCHEMA`], so a script can check it
//! reads the shape it was written for.
//!
//! `status --json` always answers a [`StatusReport`], whether one network was named or all
//! running ones are listed: `{"schema": 1, "networks": [...], "not_running": [...]}`. A new
//! field with a default keeps the schema number; a removed or renamed field, or a changed
//! meaning, takes the next one.

use serde::{Deserialize, Serialize};

use crate::{NatStatus, PeerPath, PeerStatus, RelayStatus, Status};

/// The version of every `--json` document's shape.
pub const SCHEMA: u32 = 1;

/// One agent's answer to `status` on its control socket: the member's snapshot and whether
/// the agent is ready (what `meshvpn wait` waits for).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct NetworkStatus {
    /// The member's snapshot (its fields sit at the top level of the JSON object).
    #[serde(flatten)]
    pub status: Status,
    /// Registered with the relay and holding the relay's member list, so the peers listed are
    /// the network's. Absent (false) from older agents.
    #[serde(default)]
    pub ready: bool,
}

/// `meshvpn status --json`: every network asked about.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct StatusReport {
    /// [`SCHEMA`].
    pub schema: u32,
    /// The running networks, sorted by name.
    pub networks: Vec<NetworkStatus>,
    /// Configured networks whose agent is not running (listed only when no network was named).
    #[serde(default)]
    pub not_running: Vec<String>,
}

/// `meshvpn peers --json`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PeersReport {
    /// [`SCHEMA`].
    pub schema: u32,
    /// The network.
    pub network: String,
    /// Its peers, as in `status`.
    pub peers: Vec<PeerStatus>,
}

/// `meshvpn list --json`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ListReport {
    /// [`SCHEMA`].
    pub schema: u32,
    /// Every configured network, sorted by name.
    pub networks: Vec<ListedNetwork>,
}

/// One configured network in [`ListReport`].
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ListedNetwork {
    /// Network name.
    pub network: String,
    /// This member's virtual IP, if the config is readable.
    pub virtual_ip: Option<String>,
    /// The network's subnet, if the config is readable.
    pub subnet: Option<String>,
    /// Whether its agent answers on the control socket.
    pub running: bool,
    /// Whether the running agent is ready (see [`NetworkStatus::ready`]).
    pub ready: bool,
    /// Number of peers, when running.
    pub peers: Option<usize>,
}

/// `meshvpn netcheck --json`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct NetcheckReport {
    /// [`SCHEMA`].
    pub schema: u32,
    /// The network.
    pub network: String,
    /// This member's NAT verdict.
    pub nat: NatStatus,
    /// The primary relay.
    pub relay: RelayStatus,
    /// Every relay of the token: state, transport (`udp`, `tcp`, `tls`) and RTT.
    #[serde(default)]
    pub relays: Vec<RelayStatus>,
    /// Each peer's path and, when relayed, why.
    pub peers: Vec<NetcheckPeer>,
}

/// One peer in [`NetcheckReport`].
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct NetcheckPeer {
    /// The peer's node name.
    pub name: String,
    /// Its path.
    pub path: PeerPath,
    /// Where its packets go.
    pub endpoint: Option<String>,
    /// Why it is relayed (absent when direct).
    pub relay_reason: Option<String>,
}

impl NetcheckReport {
    /// The netcheck view of `status`.
    pub fn of(status: &Status) -> NetcheckReport {
        NetcheckReport {
            schema: SCHEMA,
            network: status.network.clone(),
            nat: status.nat.clone(),
            relay: status.relay.clone(),
            relays: status.relays.clone(),
            peers: status
                .peers
                .iter()
                .map(|p| NetcheckPeer {
                    name: p.name.clone(),
                    path: p.path,
                    endpoint: p.endpoint.clone(),
                    relay_reason: p.relay_reason.clone(),
                })
                .collect(),
        }
    }
}

impl NetworkStatus {
    /// The human table of `meshvpn status` (see [`Status::to_table`]), its relay state saying
    /// whether the agent is ready.
    pub fn to_table(&self) -> String {
        self.status.table(Some(self.ready))
    }
}
