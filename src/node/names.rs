//! The members as DNS names them: what the agent's zone (`crate::dns`) is built from.
//!
//! [`Node::member_names`] lists this member and every peer with its chosen name, its virtual
//! IPv4 address, its IPv6 overlay address and the `since` by which
//! [`crate::dns::resolve_names`] decides who holds a name that several members chose.
//!
//! # Which `since`
//! Every member must feed the same number for the same claimant, or two members could name
//! different owners. The number every member has for every other is the relay's change counter
//! at which that member's current presence began: the relay hands it out with each member entry
//! (`MemberEntry::since`) and tells each member its own in the registration acknowledgement (the
//! primary relay's session keeps it). So "first holder keeps the name" means the member whose
//! current presence at the followed relay began first. A member that restarts starts a new
//! presence and ranks behind one that stayed; a member that does not know its own counter yet
//! (not registered) ranks last, as it does for address claims. Members only disagree while they
//! follow different relays (each relay counts on its own), the same window in which they may
//! disagree about anything else the relay tells them.
//!
//! A member that lost its virtual IP to another (an address conflict) is left out: its name
//! would resolve to an address that routes to someone else.

use std::net::{Ipv4Addr, Ipv6Addr};

use super::Node;
use crate::addressing;
use crate::keys::PeerKey;

/// One member as the DNS zone needs it (see the module doc).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberName {
    /// The member's public key (the tie-breaker between equal `since`s).
    pub key: PeerKey,
    /// The name the member chose (its announcement's, or our configured one), not yet a label.
    pub name: String,
    /// The member's virtual IPv4 address.
    pub virtual_ip: Ipv4Addr,
    /// The member's IPv6 overlay address ([`addressing::overlay_ipv6`] of the network and key).
    pub overlay_ipv6: Ipv6Addr,
    /// The relay's change counter at which the member's current presence began;
    /// `u64::MAX` while unknown (see the module doc).
    pub since: u64,
}

impl Node {
    /// This member and every peer with an uncontested virtual IP, sorted by key (see the
    /// module doc).
    pub fn member_names(&self) -> Vec<MemberName> {
        let network = &self.keys.network_id;
        let mut out = Vec::with_capacity(self.peers.len() + 1);
        if self.members.conflict().is_none() {
            out.push(MemberName {
                key: self.public,
                name: self.cfg.name.clone(),
                virtual_ip: self.cfg.virtual_ip,
                overlay_ipv6: addressing::overlay_ipv6(network, &self.public),
                since: self
                    .relays
                    .get(self.primary)
                    .and_then(|r| r.presence_since())
                    .unwrap_or(u64::MAX),
            });
        }
        out.extend(
            self.peers
                .values()
                .filter(|p| !self.members.is_conflicted(&p.key))
                .map(|p| MemberName {
                    key: p.key,
                    name: p.announcement.name.clone(),
                    virtual_ip: p.virtual_ip(),
                    overlay_ipv6: addressing::overlay_ipv6(network, &p.key),
                    since: p.entry.since,
                }),
        );
        out.sort_by_key(|m| m.key);
        out
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use rand::SeedableRng;
    use rand_chacha::ChaCha20Rng;

    use super::*;
    use crate::keys::{NetworkSecret, NodeSecret};
    use crate::node::{NodeConfig, RelayTarget};
    use crate::wire::MemberEntry;

    fn member(name: &str, ip: Ipv4Addr, network: &NetworkSecret, seed: u64) -> Node {
        let mut rng = ChaCha20Rng::seed_from_u64(seed);
        let cfg = NodeConfig {
            secret: NodeSecret::generate(&mut rng),
            network_secret: network.clone(),
            network_name: "test".into(),
            name: name.into(),
            virtual_ip: ip,
            subnet: "10.77.0.0/16".parse().expect("literal"),
            relays: vec![RelayTarget {
                key: NodeSecret::generate(&mut rng).public(),
                addr: "203.0.113.1:3478".parse().expect("literal"),
                tls: false,
            }],
            stun_servers: Vec::new(),
            seed,
            relay_for_peers: true,
        };
        Node::new(cfg, Instant::now(), 1_700_000_000_000)
    }

    #[test]
    fn lists_this_member_and_its_peers_with_their_overlay_addresses() {
        let network = NetworkSecret::generate(&mut ChaCha20Rng::seed_from_u64(1));
        let id = network.derive().network_id;
        let mut alice = member("Alice", Ipv4Addr::new(10, 77, 0, 1), &network, 2);
        let bob = member("bob", Ipv4Addr::new(10, 77, 0, 2), &network, 3);

        let alone = alice.member_names();
        assert_eq!(alone.len(), 1);
        assert_eq!(alone[0].name, "Alice");
        assert_eq!(
            alone[0].overlay_ipv6,
            addressing::overlay_ipv6(&id, &alice.public_key())
        );
        assert_eq!(alone[0].since, u64::MAX, "unregistered: own start unknown");

        let entry = MemberEntry {
            key: bob.public_key(),
            observed: "203.0.113.9:5000".parse().expect("literal"),
            announcement: bob.announcement.clone(),
            since: 7,
        };
        alice.restore_members(Instant::now(), vec![entry]);
        let names = alice.member_names();
        assert_eq!(names.len(), 2, "{names:?}");
        let b = names
            .iter()
            .find(|m| m.key == bob.public_key())
            .expect("bob is listed");
        assert_eq!(b.name, "bob");
        assert_eq!(b.virtual_ip, Ipv4Addr::new(10, 77, 0, 2));
        assert_eq!(b.since, 7);
        assert_eq!(
            b.overlay_ipv6,
            addressing::overlay_ipv6(&id, &bob.public_key())
        );
        assert!(names.windows(2).all(|w| w[0].key < w[1].key), "sorted");
    }
}
