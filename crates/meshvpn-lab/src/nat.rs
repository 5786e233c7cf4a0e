//! NAT routers for the lab: the kinds of [`Nat`], their nftables rules, `miniupnpd` for
//! [`Nat::Upnp`], and helpers that change NAT state under running flows.

use std::fmt;
use std::fs;
use std::net::Ipv4Addr;
use std::process::{Command, Output};
use std::time::Duration;

use anyhow::{bail, Context, Result};

use super::cmd::run_checked;
use super::gateway::PortMapService;
use super::probe::{Filtering, Mapping};
use super::{Host, Lab, SETUP_TIMEOUT};

/// How long a full-cone router keeps an inbound mapping after the last outbound packet.
const FULL_CONE_TIMEOUT_S: u32 = 120;

/// How the router(s) in front of a [`Lab::add_natted_host`] host translate and filter.
///
/// Every router keeps its own address for the internet, forwards only LAN → WAN plus what
/// conntrack (or a mapping) lets back in, and drops unsolicited packets to itself except pings.
/// The expected behaviour (RFC 4787 terms) is [`Nat::expected_mapping`] /
/// [`Nat::expected_filtering`]; the lab's unit tests check it with [`Lab::probe_nat`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Nat {
    /// A typical home router: port-preserving masquerade (endpoint-independent mapping in
    /// practice) and stateful filtering (only replies to outgoing flows come in; unsolicited
    /// packets to the router's WAN address are dropped, pings excepted).
    HomeRouter,
    /// A symmetric NAT (`masquerade random`): every new flow gets a random public port
    /// (endpoint-dependent mapping) and the same stateful filtering.
    Symmetric,
    /// A full-cone NAT: `snat to <wan-ip>` keeping the port, and every UDP port the LAN host
    /// sent from in the last two minutes (an nftables set refreshed by outbound packets) is
    /// DNATed back to it from anywhere (endpoint-independent mapping and filtering).
    FullCone,
    /// A home router whose firewall drops every outbound UDP packet except to port 53; TCP
    /// passes (a locked-down corporate or hotel network).
    UdpBlocked,
    /// Carrier-grade NAT: the host is behind a [`Nat::HomeRouter`] whose WAN is on a carrier
    /// network `100.64.<n>.0/24`, behind a carrier router that masquerades (port-preserving,
    /// stateful) to the internet. Two NATs in series; the carrier router is
    /// [`Host::carrier_ns`].
    Cgnat,
    /// A [`Nat::HomeRouter`] running Debian's `miniupnpd` (nftables backend) with UPnP IGD,
    /// NAT-PMP and PCP on its LAN address. Its WAN is `11.0.<n>.2/30`, a routable-looking
    /// address (miniupnpd refuses to map ports on a private or reserved WAN address); the
    /// internet router holds `11.0.<n>.1`. Without a mapping it behaves like a home router.
    Upnp,
}

impl Nat {
    /// Every kind, in a fixed order.
    pub const ALL: [Nat; 6] = [
        Nat::HomeRouter,
        Nat::Symmetric,
        Nat::FullCone,
        Nat::UdpBlocked,
        Nat::Cgnat,
        Nat::Upnp,
    ];

    /// A short label: `home`, `symmetric`, `fullcone`, `udp-blocked`, `cgnat`, `upnp`.
    pub fn label(self) -> &'static str {
        match self {
            Nat::HomeRouter => "home",
            Nat::Symmetric => "symmetric",
            Nat::FullCone => "fullcone",
            Nat::UdpBlocked => "udp-blocked",
            Nat::Cgnat => "cgnat",
            Nat::Upnp => "upnp",
        }
    }

    /// The UDP mapping behaviour this kind should show to [`Lab::probe_nat`] (`None`: no UDP
    /// gets out at all).
    pub fn expected_mapping(self) -> Option<Mapping> {
        match self {
            Nat::HomeRouter | Nat::FullCone | Nat::Cgnat | Nat::Upnp => {
                Some(Mapping::EndpointIndependent)
            }
            Nat::Symmetric => Some(Mapping::EndpointDependent),
            Nat::UdpBlocked => None,
        }
    }

    /// The UDP filtering behaviour this kind should show to [`Lab::probe_nat`] (without a
    /// UPnP/PCP mapping; `None`: no UDP gets out at all).
    pub fn expected_filtering(self) -> Option<Filtering> {
        match self {
            Nat::HomeRouter | Nat::Symmetric | Nat::Cgnat | Nat::Upnp => {
                Some(Filtering::AddressAndPortDependent)
            }
            Nat::FullCone => Some(Filtering::EndpointIndependent),
            Nat::UdpBlocked => None,
        }
    }
}

impl fmt::Display for Nat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.label())
    }
}

/// How a router rewrites the source of LAN → WAN packets.
#[derive(Clone, Copy)]
enum Snat {
    /// `masquerade` (keeps the port when it can).
    Masquerade,
    /// `masquerade random` (a random port per flow).
    Random,
    /// `snat ip to <addr>` (keeps the port when it can).
    To(Ipv4Addr),
}

/// What one router namespace does; rendered to one nftables table `inet lab`.
struct RouterRules {
    snat: Snat,
    /// Drop outbound UDP except to port 53.
    block_udp: bool,
    /// Full cone: DNAT inbound UDP to recently used source ports back to this LAN host.
    full_cone_to: Option<Ipv4Addr>,
    /// Add the chains miniupnpd fills (and jumps to them).
    upnp_chains: bool,
}

/// The nftables table every lab router uses (miniupnpd is told to use it too).
pub(crate) const TABLE: &str = "lab";
/// The chains miniupnpd fills (names given in its config).
pub(crate) const UPNP_FORWARD: &str = "miniupnpd";
/// The chain miniupnpd puts its DNAT rules in (jumped to from prerouting).
pub(crate) const UPNP_PREROUTING: &str = "prerouting_miniupnpd";
/// The chain miniupnpd puts its source rewriting in (jumped to from postrouting).
pub(crate) const UPNP_POSTROUTING: &str = "postrouting_miniupnpd";

impl RouterRules {
    fn render(&self) -> String {
        let mut set = String::new();
        let mut pre = String::new();
        let mut post = String::new();
        let mut fwd = String::new();
        let mut extra_chains = String::new();
        if let Some(host) = self.full_cone_to {
            set = format!(
                "\tset fullcone {{ type inet_service; flags dynamic,timeout; \
                 timeout {FULL_CONE_TIMEOUT_S}s; }}\n"
            );
            pre.push_str(&format!(
                "\t\tiifname \"wan\" udp dport @fullcone dnat ip to {host}\n"
            ));
        }
        if self.upnp_chains {
            pre.push_str(&format!("\t\tjump {UPNP_PREROUTING}\n"));
            post.push_str(&format!("\t\tjump {UPNP_POSTROUTING}\n"));
            extra_chains = format!(
                "\tchain {UPNP_FORWARD} {{\n\t}}\n\tchain {UPNP_PREROUTING} {{\n\t}}\n\
                 \tchain {UPNP_POSTROUTING} {{\n\t}}\n"
            );
        }
        post.push_str(&match self.snat {
            Snat::Masquerade => "\t\toifname \"wan\" masquerade\n".to_string(),
            Snat::Random => "\t\toifname \"wan\" masquerade random\n".to_string(),
            Snat::To(addr) => format!("\t\toifname \"wan\" snat ip to {addr}\n"),
        });
        if self.block_udp {
            fwd.push_str("\t\tiifname \"lan\" oifname \"wan\" udp dport != 53 drop\n");
        }
        if self.full_cone_to.is_some() {
            fwd.push_str("\t\tiifname \"lan\" oifname \"wan\" update @fullcone { udp sport }\n");
        }
        fwd.push_str(
            "\t\tiifname \"lan\" oifname \"wan\" accept\n\
             \t\tiifname \"wan\" oifname \"lan\" ct state established,related accept\n",
        );
        if self.upnp_chains {
            fwd.push_str(&format!("\t\tjump {UPNP_FORWARD}\n"));
        }
        if self.full_cone_to.is_some() || self.upnp_chains {
            fwd.push_str("\t\tiifname \"wan\" oifname \"lan\" ct status dnat accept\n");
        }
        format!(
            "table inet {TABLE} {{\n\
             {set}\
             \tchain prerouting {{\n\
             \t\ttype nat hook prerouting priority dstnat; policy accept;\n\
             {pre}\
             \t}}\n\
             \tchain postrouting {{\n\
             \t\ttype nat hook postrouting priority srcnat; policy accept;\n\
             {post}\
             \t}}\n\
             \tchain forward {{\n\
             \t\ttype filter hook forward priority filter; policy drop;\n\
             {fwd}\
             \t}}\n\
             \tchain input {{\n\
             \t\ttype filter hook input priority filter; policy accept;\n\
             \t\tiifname \"wan\" ct state established,related accept\n\
             \t\tiifname \"wan\" icmp type echo-request accept\n\
             \t\tiifname \"wan\" drop\n\
             \t}}\n\
             {extra_chains}\
             }}\n"
        )
    }
}

impl Lab {
    /// Adds a host on a private LAN `192.168.<n>.0/24` (host `.2`, router `.1`) behind its own
    /// router namespace `<prefix>-r<name>` (and, for [`Nat::Cgnat`], a carrier router
    /// `<prefix>-c<name>`), which translates according to `nat`.
    ///
    /// For [`Nat::Upnp`] this also starts `miniupnpd` in the router (logged to
    /// `<lab dir>/miniupnpd-<name>.log`) and waits until it answers on its NAT-PMP port; see
    /// [`Lab::add_upnp_host`] for such a router with another port-mapping service or none.
    pub fn add_natted_host(&mut self, name: &str, nat: Nat) -> Result<Host> {
        self.add_site(name, nat, PortMapService::Miniupnpd { igd: true })
    }

    /// [`Lab::add_natted_host`], with `service` answering port-mapping requests when `nat` is
    /// [`Nat::Upnp`] (ignored otherwise).
    pub(crate) fn add_site(
        &mut self,
        name: &str,
        nat: Nat,
        service: PortMapService,
    ) -> Result<Host> {
        self.check_new_name(name)?;
        let site = self.next_site;
        if site > 254 {
            bail!("lab: out of LAN subnets");
        }
        let site8 = site as u8;
        self.next_site += 1;
        let router = format!("{}-r{name}", self.prefix);
        let ns = format!("{}-{name}", self.prefix);
        self.add_namespace(&router)?;
        self.add_namespace(&ns)?;
        self.enable_forwarding(&router)?;

        let mut carrier_ns = None;
        let (wan_gw, wan_ip, public_addr) = match nat {
            Nat::Cgnat => {
                let carrier = format!("{}-c{name}", self.prefix);
                self.add_namespace(&carrier)?;
                self.enable_forwarding(&carrier)?;
                let (inet_ip, carrier_wan) = self.attach_to_internet(&carrier, "wan", None)?;
                self.default_route(&carrier, inet_ip)?;
                let carrier_lan = Ipv4Addr::new(100, 64, site8, 1);
                let home_wan = Ipv4Addr::new(100, 64, site8, 2);
                self.connect(&carrier, "lan", carrier_lan, &router, "wan", home_wan, 24)?;
                let rules = RouterRules {
                    snat: Snat::Masquerade,
                    block_udp: false,
                    full_cone_to: None,
                    upnp_chains: false,
                };
                self.load_rules(&carrier, &format!("carrier-{name}"), &rules)?;
                carrier_ns = Some(carrier);
                (carrier_lan, home_wan, carrier_wan)
            }
            Nat::Upnp => {
                let fixed = Ipv4Addr::new(11, 0, site8, 0);
                let (inet_ip, wan_ip) = self.attach_to_internet(&router, "wan", Some(fixed))?;
                (inet_ip, wan_ip, wan_ip)
            }
            Nat::HomeRouter | Nat::Symmetric | Nat::FullCone | Nat::UdpBlocked => {
                let (inet_ip, wan_ip) = self.attach_to_internet(&router, "wan", None)?;
                (inet_ip, wan_ip, wan_ip)
            }
        };
        self.default_route(&router, wan_gw)?;
        let lan_router = Ipv4Addr::new(192, 168, site8, 1);
        let lan_host = Ipv4Addr::new(192, 168, site8, 2);
        self.connect(&router, "lan", lan_router, &ns, "eth0", lan_host, 24)?;
        self.default_route(&ns, lan_router)?;

        let rules = RouterRules {
            snat: match nat {
                Nat::Symmetric => Snat::Random,
                Nat::FullCone => Snat::To(wan_ip),
                Nat::HomeRouter | Nat::UdpBlocked | Nat::Cgnat | Nat::Upnp => Snat::Masquerade,
            },
            block_udp: nat == Nat::UdpBlocked,
            full_cone_to: (nat == Nat::FullCone).then_some(lan_host),
            upnp_chains: nat == Nat::Upnp,
        };
        self.load_rules(&router, name, &rules)?;

        let host = Host {
            name: name.to_string(),
            ns,
            addr: lan_host,
            public_addr,
            router_ns: Some(router),
            nat: Some(nat),
            carrier_ns,
            gateway: Some(lan_router),
            addr6: None,
        };
        match (nat, service) {
            (Nat::Upnp, PortMapService::Miniupnpd { igd }) => {
                self.start_miniupnpd(&host, site8, igd)?;
            }
            (Nat::Upnp, PortMapService::Silent)
            | (
                Nat::HomeRouter | Nat::Symmetric | Nat::FullCone | Nat::UdpBlocked | Nat::Cgnat,
                _,
            ) => {}
        }
        self.hosts.push(host.clone());
        Ok(host)
    }

    /// The router namespaces in front of `host`, nearest first (empty for a public host).
    pub fn routers_of(&self, host: &Host) -> Vec<String> {
        host.router_ns
            .iter()
            .chain(host.carrier_ns.iter())
            .cloned()
            .collect()
    }

    /// Runs a command in a namespace the lab created (e.g. a router's), failing on a non-zero
    /// exit (the error carries stderr).
    pub fn exec_in_ns(&self, ns: &str, args: &[&str], timeout: Duration) -> Result<Output> {
        if !self.namespaces.iter().any(|n| n == ns) {
            bail!("lab: {ns} is not a namespace of this lab");
        }
        run_checked(
            Command::new("ip").args(["netns", "exec", ns]).args(args),
            timeout,
        )
    }

    /// Empties the conntrack table of every router in front of `host` (`conntrack -F`, from
    /// Debian's `conntrack` package): every NAT mapping is forgotten; the next outbound packet
    /// of a flow makes a new one and inbound packets are dropped until then.
    pub fn flush_conntrack(&self, host: &Host) -> Result<()> {
        let routers = self.routers_of(host);
        if routers.is_empty() {
            bail!("lab: {} is not behind a NAT", host.name);
        }
        for r in routers {
            self.exec_in_ns(&r, &["conntrack", "-F"], SETUP_TIMEOUT)
                .context("flushing conntrack (is Debian's `conntrack` package installed?)")?;
        }
        Ok(())
    }

    /// Changes the public port of `host`'s UDP flows from LAN port `lan_port`: the nearest
    /// router now maps them to `new_port` (still endpoint-independent), and conntrack is
    /// flushed so running flows get the new mapping at once. This is what a NAT reboot or a
    /// mapping timeout does to a long-lived socket.
    pub fn remap_udp_port(&self, host: &Host, lan_port: u16, new_port: u16) -> Result<()> {
        let router = host
            .router_ns
            .as_deref()
            .with_context(|| format!("lab: {} is not behind a NAT", host.name))?;
        let rule = format!(
            "insert rule inet {TABLE} postrouting oifname \"wan\" udp sport {lan_port} \
             masquerade to :{new_port}"
        );
        self.exec_in_ns(router, &["nft", &rule], SETUP_TIMEOUT)
            .context("adding the remapping rule")?;
        self.flush_conntrack(host)
    }

    /// The nftables ruleset of a namespace (`nft list ruleset`), for diagnostics.
    pub fn ruleset(&self, ns: &str) -> Result<String> {
        let out = self.exec_in_ns(ns, &["nft", "list", "ruleset"], SETUP_TIMEOUT)?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    fn default_route(&self, ns: &str, via: Ipv4Addr) -> Result<()> {
        self.ip(&["-n", ns, "route", "add", "default", "via", &via.to_string()])
    }

    fn load_rules(&self, ns: &str, label: &str, rules: &RouterRules) -> Result<()> {
        let file = self.dir.join(format!("nat-{label}.nft"));
        fs::write(&file, rules.render()).with_context(|| format!("writing {}", file.display()))?;
        let file = file.to_string_lossy().into_owned();
        run_checked(
            Command::new("ip").args(["netns", "exec", ns, "nft", "-f", &file]),
            SETUP_TIMEOUT,
        )
        .context("loading NAT rules (is nftables installed?)")?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_render_per_kind() {
        let fc = RouterRules {
            snat: Snat::To(Ipv4Addr::new(198, 51, 100, 6)),
            block_udp: false,
            full_cone_to: Some(Ipv4Addr::new(192, 168, 1, 2)),
            upnp_chains: false,
        }
        .render();
        assert!(fc.contains("dnat ip to 192.168.1.2"), "{fc}");
        assert!(fc.contains("update @fullcone { udp sport }"), "{fc}");
        assert!(fc.contains("snat ip to 198.51.100.6"), "{fc}");
        let up = RouterRules {
            snat: Snat::Masquerade,
            block_udp: true,
            full_cone_to: None,
            upnp_chains: true,
        }
        .render();
        assert!(up.contains("udp dport != 53 drop"), "{up}");
        for chain in [UPNP_FORWARD, UPNP_PREROUTING, UPNP_POSTROUTING] {
            assert!(up.contains(&format!("chain {chain} {{")), "{up}");
            assert!(up.contains(&format!("jump {chain}")), "{up}");
        }
        assert_eq!(
            Nat::ALL.iter().map(|n| n.to_string()).collect::<Vec<_>>(),
            [
                "home",
                "symmetric",
                "fullcone",
                "udp-blocked",
                "cgnat",
                "upnp"
            ]
        );
    }
}
