//! Refusing a virtual subnet that would collide with the host's own routes or with another
//! meshvpn network on this machine: overlapping routes would silently send traffic the wrong way.

use std::net::Ipv4Addr;
use std::path::Path;

use ipnet::Ipv4Net;

use crate::config::{self, Config};

/// A route from the kernel's IPv4 table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    /// Interface name.
    pub iface: String,
    /// Destination network.
    pub net: Ipv4Net,
}

/// Parses `/proc/net/route` text (hex little-endian addresses); unparsable lines are skipped.
pub fn parse_routes(text: &str) -> Vec<Route> {
    text.lines()
        .skip(1)
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() < 8 {
                return None;
            }
            let dest = u32::from_str_radix(f[1], 16).ok()?;
            let mask = u32::from_str_radix(f[7], 16).ok()?;
            // The kernel prints the address as a host-order integer of network-order bytes.
            let dest = Ipv4Addr::from(dest.to_ne_bytes());
            let mask = Ipv4Addr::from(mask.to_ne_bytes());
            let net = Ipv4Net::with_netmask(dest, mask).ok()?;
            Some(Route {
                iface: f[0].to_string(),
                net,
            })
        })
        .collect()
}

/// Fails with a clear message if `cfg`'s subnet overlaps a non-default route of another
/// interface, or the subnet of another network configured in `config_dir`.
pub fn check(cfg: &Config, config_dir: &Path) -> anyhow::Result<()> {
    let own_if = cfg.interface_name();
    let routes = std::fs::read_to_string("/proc/net/route")
        .map(|t| parse_routes(&t))
        .unwrap_or_default();
    for r in routes {
        if r.iface == own_if || r.net.prefix_len() == 0 {
            continue;
        }
        if overlaps(&r.net, &cfg.subnet) {
            anyhow::bail!(
                "the virtual subnet {} of network {:?} overlaps the local route {} on {}; create the network with another --subnet",
                cfg.subnet,
                cfg.network,
                r.net,
                r.iface
            );
        }
    }
    for other in config::list_networks(config_dir) {
        if other == cfg.network {
            continue;
        }
        if let Ok(o) = Config::load(config_dir, &other) {
            if overlaps(&o.subnet, &cfg.subnet) {
                anyhow::bail!(
                    "the virtual subnet {} of network {:?} overlaps {} of network {:?} on this machine; one of them needs another --subnet",
                    cfg.subnet,
                    cfg.network,
                    o.subnet,
                    other
                );
            }
        }
    }
    Ok(())
}

/// Whether two networks share any address.
pub fn overlaps(a: &Ipv4Net, b: &Ipv4Net) -> bool {
    a.contains(&b.network()) || b.contains(&a.network())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_proc_net_route() {
        let text =
            "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n\
                    eth0\t00000000\t0101A8C0\t0003\t0\t0\t0\t00000000\t0\t0\t0\n\
                    eth0\t0001A8C0\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n\
                    garbage line\n";
        let routes = parse_routes(text);
        assert_eq!(routes.len(), 2);
        assert_eq!(
            routes[1].net,
            "192.168.1.0/24".parse::<Ipv4Net>().expect("lit")
        );
        assert_eq!(routes[0].net.prefix_len(), 0);
    }

    #[test]
    fn overlap_rules() {
        let n = |s: &str| s.parse::<Ipv4Net>().expect("lit");
        assert!(overlaps(&n("10.0.0.0/8"), &n("10.147.0.0/16")));
        assert!(overlaps(&n("10.147.0.0/16"), &n("10.0.0.0/8")));
        assert!(!overlaps(&n("10.147.0.0/16"), &n("10.148.0.0/16")));
    }
}
