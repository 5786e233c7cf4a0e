//! The agent's half of member names: serves the network's zone ([`crate::dns::Zone`]) on the
//! member's virtual IP, port 53, and keeps the zone's member table current.
//!
//! [`Names::start`] runs once the TUN device is up (the virtual IP must exist to bind it): it
//! binds UDP and TCP on `VIRTUAL_IP:53`, serves them in a task, and registers the zone with
//! systemd-resolved on the TUN link when resolved runs (per-link DNS server and routing-only
//! domain; the host's global resolver and `/etc/resolv.conf` are never touched). Any failure
//! there is logged and the agent runs on without DNS: names are a convenience, the tunnel is
//! the product. [`Names::stop`] reverts the resolved settings and ends the server.
//!
//! The driver tells it about every node event ([`Names::note_event`]) and calls
//! [`Names::refresh_if_changed`] after draining the node, and [`Names::refresh`] on its
//! endpoint timer as well: the events say at once when a member joined or left, the timer
//! catches what no event reports (a member that renamed itself, our own presence counter
//! changing). A refresh builds the table from [`Node::member_names`], lets
//! [`resolve_names`] pick one holder per label (the same rule on every member), and hands the
//! holders to the zone only when the table changed.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};

use crate::config::Config;
use crate::dns::server::{register_with_resolved, DnsServer, ResolvedLink, SharedZone};
use crate::dns::{resolve_names, NameClaim, NameConflict, Zone};
use crate::keys::PeerKey;
use crate::node::names::MemberName;
use crate::node::{Event, Node};

/// The DNS port: resolvers (systemd-resolved's per-link servers, `dig @IP`) only ask on 53.
const DNS_PORT: u16 = 53;

/// One row of the zone: the label, its holder and the holder's addresses.
type ZoneRow = (String, PeerKey, Ipv4Addr, Ipv6Addr);

/// The member-name service of one agent: off (disabled, or it could not start) or serving.
pub(super) struct Names(Option<Serving>);

struct Serving {
    zone: SharedZone,
    /// The zone's apex, `NETWORK.mesh.internal`, for log lines.
    domain: String,
    server: tokio::task::JoinHandle<()>,
    resolved: Option<ResolvedLink>,
    /// The rows last handed to the zone.
    published: Vec<ZoneRow>,
    /// The conflicts last logged.
    conflicts: Vec<NameConflict<PeerKey>>,
    /// Whether an event since the last refresh may have changed the member table.
    dirty: bool,
}

impl Names {
    /// Starts serving the zone of `cfg`'s network on its virtual IP (see the module doc); off
    /// when `cfg.dns` is false or anything needed fails (logged).
    pub(super) async fn start(cfg: &Config, ifname: &str) -> Names {
        if !cfg.dns {
            tracing::info!("DNS for member names is off (node.dns = false)");
            return Names(None);
        }
        let zone = match Zone::new(&cfg.network) {
            Ok(zone) => zone,
            Err(e) => {
                tracing::warn!(network = %cfg.network, %e, "the network name is not a DNS label: running without member names");
                return Names(None);
            }
        };
        let domain = zone.domain();
        let addr = SocketAddr::new(cfg.virtual_ip.into(), DNS_PORT);
        let server = match DnsServer::bind(addr).await {
            Ok(server) => server,
            Err(e) => {
                tracing::error!(%addr, error = %format!("{e:#}"), "cannot serve DNS for member names (another DNS server holds port 53 on all addresses?); the agent runs without it, so names under {domain} do not resolve here (set node.dns = false to silence this)");
                return Names(None);
            }
        };
        let zone: SharedZone = std::sync::Arc::new(std::sync::Mutex::new(zone));
        let server = tokio::spawn(server.serve(zone.clone()));
        tracing::info!(%addr, %domain, "answering DNS for member names");
        let resolved = match register_with_resolved(ifname, &domain, addr.ip()).await {
            Ok(link) => link,
            Err(e) => {
                tracing::warn!(interface = ifname, error = %format!("{e:#}"), "could not register {domain} with systemd-resolved; names still resolve when asked at {addr}");
                None
            }
        };
        Names(Some(Serving {
            zone,
            domain,
            server,
            resolved,
            published: Vec::new(),
            conflicts: Vec::new(),
            dirty: true,
        }))
    }

    /// Notes a node event; membership events make the next [`Names::refresh_if_changed`] run.
    pub(super) fn note_event(&mut self, ev: &Event) {
        if let Some(s) = &mut self.0 {
            s.dirty |= changes_members(ev);
        }
    }

    /// Refreshes the zone if an event since the last refresh may have changed it.
    pub(super) fn refresh_if_changed(&mut self, node: &Node) {
        if self.0.as_ref().is_some_and(|s| s.dirty) {
            self.refresh(node);
        }
    }

    /// Rebuilds the member table from `node` and hands it to the zone if it changed.
    pub(super) fn refresh(&mut self, node: &Node) {
        let Some(s) = &mut self.0 else {
            return;
        };
        s.dirty = false;
        let (rows, conflicts) = zone_rows(&node.member_names());
        if conflicts != s.conflicts {
            log_conflicts(&conflicts, &s.conflicts, node.public_key());
            s.conflicts = conflicts;
        }
        if rows == s.published {
            return;
        }
        s.zone
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .set_members(
                rows.iter()
                    .map(|(l, _, v4, v6)| (l.as_str(), *v4, Some(*v6))),
            );
        let own = own_label(&rows, node.public_key());
        tracing::info!(names = rows.len(), this_member = %own.map_or_else(|| "-".to_owned(), |l| format!("{l}.{}", s.domain)), "DNS member names updated");
        s.published = rows;
    }

    /// Reverts the systemd-resolved settings and ends the server.
    /// Fills in the DNS names of this member and its peers in `status`, as the zone
    /// publishes them now (nothing when names are off).
    pub(super) fn annotate(&self, status: &mut crate::status::Status) {
        let Some(s) = &self.0 else {
            return;
        };
        let name_of = |key: &str| {
            s.published
                .iter()
                .find(|(_, holder, _, _)| holder.to_base64() == key)
                .map(|(label, _, _, _)| format!("{label}.{}", s.domain))
        };
        status.dns_name = name_of(&status.public_key);
        for p in &mut status.peers {
            p.dns_name = name_of(&p.public_key);
        }
    }

    pub(super) async fn stop(self) {
        let Some(s) = self.0 else {
            return;
        };
        s.server.abort();
        if let Some(link) = s.resolved {
            if let Err(e) = link.revert().await {
                tracing::warn!(error = %format!("{e:#}"), "could not revert the link's DNS settings in systemd-resolved");
            }
        }
    }
}

/// Whether `ev` may change who is in the zone or with which claim: a member joined or left,
/// an address conflict was found, or our own presence at the (primary) relay began anew.
fn changes_members(ev: &Event) -> bool {
    match ev {
        Event::PeerJoined { .. }
        | Event::PeerLeft { .. }
        | Event::VirtualIpConflict { .. }
        | Event::RelayRegistered { .. }
        | Event::PrimaryRelay { .. }
        | Event::SecretRotated { .. } => true,
        Event::RelayLost { .. }
        | Event::RelayKeyMismatch { .. }
        | Event::RelayError { .. }
        | Event::PathChanged { .. }
        | Event::PingResult { .. }
        | Event::RotationFailed { .. }
        | Event::LeftOutOfRotation => false,
    }
}

/// The zone's rows (one per label, its holder's addresses) and the claims that got no label,
/// by the network-wide rule of [`resolve_names`].
fn zone_rows(members: &[MemberName]) -> (Vec<ZoneRow>, Vec<NameConflict<PeerKey>>) {
    let table = resolve_names(members.iter().map(|m| NameClaim {
        key: m.key,
        name: m.name.clone(),
        since: m.since,
    }));
    let rows = table
        .holders
        .into_iter()
        .filter_map(|(label, key)| {
            let m = members.iter().find(|m| m.key == key)?;
            Some((label, key, m.virtual_ip, m.overlay_ipv6))
        })
        .collect();
    (rows, table.conflicts)
}

/// The label `key` holds, if any.
fn own_label(rows: &[ZoneRow], key: PeerKey) -> Option<&str> {
    rows.iter()
        .find(|(_, holder, _, _)| *holder == key)
        .map(|(l, _, _, _)| l.as_str())
}

/// Logs the conflicts in `now` that were not in `before`: ours at warn (this member has no
/// name until it picks another), others' at info.
fn log_conflicts(now: &[NameConflict<PeerKey>], before: &[NameConflict<PeerKey>], own: PeerKey) {
    for c in now.iter().filter(|c| !before.contains(c)) {
        match c {
            NameConflict::Taken { key, label, holder } if *key == own => tracing::warn!(
                %label, holder = %holder.short(),
                "another member held this name first: this member has no DNS name (choose another with `meshvpn join --name`)"
            ),
            NameConflict::Taken { key, label, holder } => tracing::info!(
                %label, member = %key.short(), holder = %holder.short(),
                "two members chose one name; the first holder keeps it"
            ),
            NameConflict::Invalid { key, error } if *key == own => {
                tracing::warn!(%error, "this member's name is not a DNS label: it has no DNS name")
            }
            NameConflict::Invalid { key, error } => {
                tracing::info!(member = %key.short(), %error, "a member's name is not a DNS label: it has no DNS name")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(key: u8, name: &str, last: u8, since: u64) -> MemberName {
        MemberName {
            key: PeerKey([key; 32]),
            name: name.into(),
            virtual_ip: Ipv4Addr::new(10, 77, 0, last),
            overlay_ipv6: Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, u16::from(last)),
            since,
        }
    }

    #[test]
    fn each_label_goes_to_its_first_holder_with_both_addresses() {
        let members = [
            m(1, "alice", 1, 5),
            m(2, "Alice", 2, 3),
            m(3, "bob", 3, 9),
            m(4, "no.dots", 4, 1),
        ];
        let (rows, conflicts) = zone_rows(&members);
        assert_eq!(
            rows,
            vec![
                (
                    "alice".to_owned(),
                    PeerKey([2; 32]),
                    Ipv4Addr::new(10, 77, 0, 2),
                    Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 2)
                ),
                (
                    "bob".to_owned(),
                    PeerKey([3; 32]),
                    Ipv4Addr::new(10, 77, 0, 3),
                    Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 3)
                ),
            ]
        );
        assert_eq!(conflicts.len(), 2, "{conflicts:?}");
        assert!(conflicts.iter().any(|c| matches!(c,
            NameConflict::Taken { key, holder, .. } if *key == PeerKey([1; 32]) && *holder == PeerKey([2; 32]))));
        assert_eq!(own_label(&rows, PeerKey([3; 32])), Some("bob"));
        assert_eq!(own_label(&rows, PeerKey([1; 32])), None, "lost its name");
    }

    #[test]
    fn the_table_does_not_depend_on_the_listing_order() {
        let a = [m(7, "x", 1, 4), m(3, "x", 2, 4), m(5, "y", 3, 0)];
        let mut b = a.clone();
        b.reverse();
        assert_eq!(zone_rows(&a), zone_rows(&b));
        assert_eq!(
            zone_rows(&a).0[0].1,
            PeerKey([3; 32]),
            "the smaller key breaks the tie"
        );
    }

    #[test]
    fn membership_events_mark_the_zone_stale() {
        let key = PeerKey([1; 32]);
        assert!(changes_members(&Event::PeerLeft {
            key,
            name: "bob".into()
        }));
        assert!(!changes_members(&Event::RelayLost { relay: 0 }));
    }
}
