//! What `meshvpn status` shows: the schema lives in the `meshvpn-status` crate (shared with the
//! namespace lab that parses it) and is re-exported here; this module adds how the node's own
//! types map onto it.

pub use meshvpn_status::*;

use crate::wire::NatKind;

impl From<NatKind> for NatMapping {
    fn from(kind: NatKind) -> NatMapping {
        match kind {
            NatKind::Unknown => NatMapping::Unknown,
            NatKind::Public => NatMapping::Public,
            NatKind::EndpointIndependent => NatMapping::EndpointIndependent,
            NatKind::EndpointDependent => NatMapping::EndpointDependent,
            NatKind::UdpBlocked => NatMapping::UdpBlocked,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The JSON value of each verdict is the phrase the node has always described it with.
    #[test]
    fn nat_mapping_serialises_as_the_kinds_description() {
        for kind in [
            NatKind::Unknown,
            NatKind::Public,
            NatKind::EndpointIndependent,
            NatKind::EndpointDependent,
            NatKind::UdpBlocked,
        ] {
            let json = serde_json::to_string(&NatMapping::from(kind)).expect("a unit variant");
            assert_eq!(json, format!("\"{}\"", kind.describe()));
        }
    }
}
