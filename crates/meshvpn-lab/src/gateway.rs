//! Port-mapping gateways: a [`Nat::Upnp`] router site with `miniupnpd` (UPnP IGD, NAT-PMP and
//! PCP), or with no mapping service at all for tests that bring their own responder, and the
//! helpers those tests need (a forwarded port, the daemon's availability).
//!
//! Such a router's WAN is `11.0.<n>.2/30`, a routable-looking address: miniupnpd refuses to map
//! ports behind a private or reserved one. Its nftables table (`inet lab`) carries the chains
//! miniupnpd fills (`miniupnpd`, `prerouting_miniupnpd`, `postrouting_miniupnpd`; Debian's
//! `nft_init.sh` would not make them), jumped to from the forward, prerouting and postrouting
//! hooks, so the daemon's rules, or the ones [`Lab::forward_udp_port`] adds, take effect.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};

use super::nat::{TABLE, UPNP_FORWARD, UPNP_POSTROUTING, UPNP_PREROUTING};
use super::{wait_until, Host, Lab, Nat, SETUP_TIMEOUT};

/// UDP port miniupnpd answers NAT-PMP and PCP on (on the router's LAN address; RFC 6886/6887).
pub(crate) const NATPMP_PORT: u16 = 5351;
/// How long to wait for miniupnpd to listen: it binds within milliseconds, but a loaded
/// machine running several namespace tests at once can delay its start by seconds.
const MINIUPNPD_START: Duration = Duration::from_secs(10);
/// Where Debian (and a local build) install daemons, searched besides `PATH`.
const SBIN_DIRS: [&str; 3] = ["/usr/sbin", "/usr/local/sbin", "/sbin"];

/// What answers port-mapping requests on a [`Lab::add_upnp_host`] router.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PortMapService {
    /// Debian's `miniupnpd` with NAT-PMP and PCP, and UPnP IGD (SSDP + HTTP) when `igd` is set.
    Miniupnpd {
        /// Whether UPnP IGD is served as well.
        igd: bool,
    },
    /// Nothing listens for port-mapping requests; the router still has miniupnpd's chains.
    Silent,
}

impl PortMapService {
    /// Whether this service can run here: `miniupnpd` is installed (always true for
    /// [`PortMapService::Silent`]).
    pub fn available(self) -> bool {
        match self {
            PortMapService::Miniupnpd { .. } => find_program("miniupnpd").is_some(),
            PortMapService::Silent => true,
        }
    }
}

/// `name` in `PATH` or one of [`SBIN_DIRS`], if there.
fn find_program(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(SBIN_DIRS.iter().map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
}

impl Lab {
    /// Adds a host behind a [`Nat::Upnp`] router whose port mappings come from `service`
    /// (see [`Lab::add_natted_host`] for the addressing; `miniupnpd` logs to
    /// `<lab dir>/miniupnpd-<name>.log`, and the lab stops it with everything else).
    pub fn add_upnp_host(&mut self, name: &str, service: PortMapService) -> Result<Host> {
        self.add_site(name, Nat::Upnp, service)
    }

    /// Forwards inbound UDP to `host`'s router's WAN port `external` to `host`'s LAN port
    /// `internal`, as a gateway's port mapping would (a DNAT rule in `prerouting_miniupnpd`).
    /// Only for hosts behind a [`Nat::Upnp`] router.
    pub fn forward_udp_port(&self, host: &Host, external: u16, internal: u16) -> Result<()> {
        let router = match (host.nat, host.router_ns.as_deref()) {
            (Some(Nat::Upnp), Some(router)) => router,
            _ => bail!("lab: {} is not behind a UPnP router", host.name),
        };
        let rule = format!(
            "add rule inet {TABLE} {UPNP_PREROUTING} iifname \"wan\" udp dport {external} \
             dnat ip to {}:{internal}",
            host.addr
        );
        self.exec_in_ns(router, &["nft", &rule], SETUP_TIMEOUT)
            .with_context(|| format!("forwarding UDP port {external} to {}", host.name))?;
        Ok(())
    }

    /// The log of the `miniupnpd` in front of `host` (started by [`Lab::add_upnp_host`]).
    pub fn miniupnpd_log(&self, host: &Host) -> PathBuf {
        self.dir.join(format!("miniupnpd-{}.log", host.name))
    }

    /// Starts miniupnpd in `host`'s router with NAT-PMP/PCP (and UPnP IGD if `igd`) on the LAN
    /// side, filling the chains the router's rules made, and waits until it listens.
    pub(crate) fn start_miniupnpd(&self, host: &Host, site: u8, igd: bool) -> Result<()> {
        let router = host
            .router_ns
            .as_deref()
            .context("lab: miniupnpd needs a router")?;
        // A stable UUID per lab site (the daemon insists on one).
        let uuid = format!(
            "6d657368-7670-4e6c-6162-{:08x}{:04x}",
            std::process::id(),
            u16::from(site)
        );
        let conf = format!(
            "ext_ifname=wan\n\
             listening_ip=lan\n\
             ipv6_disable=yes\n\
             enable_natpmp=yes\n\
             enable_upnp={}\n\
             http_port=0\n\
             secure_mode=yes\n\
             system_uptime=yes\n\
             notify_interval=60\n\
             clean_ruleset_interval=600\n\
             min_lifetime=60\n\
             max_lifetime=86400\n\
             upnp_table_name={TABLE}\n\
             upnp_nat_table_name={TABLE}\n\
             upnp_forward_chain={UPNP_FORWARD}\n\
             upnp_nat_chain={UPNP_PREROUTING}\n\
             upnp_nat_postrouting_chain={UPNP_POSTROUTING}\n\
             uuid={uuid}\n\
             allow 1024-65535 192.168.{site}.0/24 1024-65535\n\
             deny 0-65535 0.0.0.0/0 0-65535\n",
            if igd { "yes" } else { "no" }
        );
        let conf_path = self.dir.join(format!("miniupnpd-{}.conf", host.name));
        fs::write(&conf_path, conf).with_context(|| format!("writing {}", conf_path.display()))?;
        let pid_path = self.dir.join(format!("miniupnpd-{}.pid", host.name));
        let log = self.miniupnpd_log(host);
        let conf_arg = conf_path.to_string_lossy().into_owned();
        let pid_arg = pid_path.to_string_lossy().into_owned();
        let program = find_program("miniupnpd").unwrap_or_else(|| PathBuf::from("miniupnpd"));
        let pid = self
            .spawn_in_ns(
                router,
                &format!("r{}", host.name),
                program.as_os_str(),
                &["-f", &conf_arg, "-d", "-P", &pid_arg],
                &log,
            )
            .context(
                "starting miniupnpd (is Debian's miniupnpd + miniupnpd-nftables installed?)",
            )?;
        wait_until(
            MINIUPNPD_START,
            Duration::from_millis(50),
            "miniupnpd to listen for NAT-PMP (and UPnP IGD if enabled)",
            || {
                if !self.is_running(pid) {
                    bail!(
                        "miniupnpd exited ({:?}); see {}",
                        self.exit_status(pid),
                        log.display()
                    );
                }
                Ok(self.udp_listening_ns(router, NATPMP_PORT)? && (!igd || http_listening(&log)))
            },
        )?;
        Ok(())
    }
}

/// Whether miniupnpd's log says its UPnP HTTP server is up (it picks a random port).
fn http_listening(log: &Path) -> bool {
    fs::read_to_string(log).is_ok_and(|text| text.contains("HTTP listening on port"))
}
