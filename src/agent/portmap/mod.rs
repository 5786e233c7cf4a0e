//! Port mapping on the local gateway (UPnP-IGD, then PCP, then NAT-PMP) for the agent's one UDP
//! port, so that a member behind a cooperative home router can announce one more candidate,
//! `external_ip:external_port`, that even a peer behind a symmetric NAT can reach.
//!
//! ## Algorithm
//!
//! One background task ([`PortMapper::spawn`]) owns at most one mapping and publishes it on a
//! `watch` channel (`None` = no mapping, or not yet). Each round it:
//!
//! 1. Reads the default IPv4 route from `/proc/thread-self/net/route` (the calling thread's
//!    network namespace; `/proc/net/route` as a fallback): the gateway of the lowest-metric
//!    `0.0.0.0/0` route that is up and has a gateway. The local address facing that gateway comes
//!    from `connect()`ing a UDP socket to it and reading `local_addr` (connect sends nothing).
//!    No default route: publish `None` and look again after [`NO_ROUTE_RECHECK`].
//! 2. With no mapping, tries in order:
//!    - UPnP-IGD: an SSDP `M-SEARCH` sent straight to the gateway (unicast, answered only by the
//!      gateway itself), then to the SSDP multicast group; an IGD found that is not the default
//!      gateway is ignored (its mapping would not be on our path). Then `GetExternalIPAddress`
//!      and `AddPortMapping` for the same external port as the internal one, falling back to any
//!      port the gateway picks, and to a permanent lease where the gateway accepts no other.
//!    - PCP (RFC 6887) to `gateway:5351`, falling back to NAT-PMP (RFC 6886) when PCP gets an
//!      error answer or none (not when the port is closed: ICMP "port unreachable" means neither
//!      is served); NAT-PMP's external address comes from its `ExternalAddress` request.
//!
//!    A success publishes `Some(PortMapping)` and logs once at info (`UPnP mapped a.b.c.d:p`).
//!    When every protocol fails, the reason is logged at debug and the round is repeated after
//!    [`GATEWAY_RETRY`], doubling up to [`GATEWAY_RETRY_MAX`] for the same gateway (a changed
//!    route is noticed within [`ROUTE_CHECK`] and asked at once): most routers simply have none
//!    of these enabled, which is not news.
//! 3. With a mapping, renews it when half its lifetime has passed (clamped to
//!    [`MIN_RENEW`]..=[`MAX_RENEW`]), re-reading the external address, and re-checks the route
//!    every [`ROUTE_CHECK`]; a changed gateway or local address drops the old mapping (best
//!    effort, bounded by [`REMOVE_BUDGET`]) and maps again at once.
//!    A failed renewal is logged at warn once, publishes `None`, tries a fresh mapping at once,
//!    then retries after [`RETRY_MIN`], doubling up to [`RETRY_MAX`].
//!
//! [`PortMapper::shutdown`] publishes `None`, deletes the mapping from the gateway (UPnP
//! `DeletePortMapping`, PCP / NAT-PMP request with lifetime 0) within [`REMOVE_BUDGET`] and ends
//! the task.
//! Dropping the [`PortMapper`] without calling it does the same in the background. A stop that
//! arrives while a mapping is being made cancels that attempt; should the gateway have made the
//! mapping already, it is left to expire with its lease.
//!
//! Every request to the gateway is bounded by a timeout, and every answer goes through the
//! checked parsers of `igd-next` / `crab_nat` plus our own checks (an IPv4 external address that is
//! not unspecified, loopback, multicast or broadcast; a non-zero lifetime and port): nothing the
//! network says can panic this task. An external address that is private (double NAT) is still
//! published: the candidate then only helps peers that share the outer network, and costs the
//! others one failed probe.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::num::NonZeroU16;
use std::time::Duration;

use anyhow::{anyhow, bail, Context as _};
use crab_nat::{natpmp, pcp, GatewayAddress, InternetProtocol, PortMappingType, TimeoutConfig};
use igd_next::aio::tokio::Tokio;
use igd_next::aio::Gateway;
use igd_next::{
    AddAnyPortError, AddPortError, GatewayIpVersion, PortMappingProtocol, SearchOptions,
};
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;
use tokio::time::{sleep_until, timeout, Instant};

/// Lease asked for, in seconds: the two hours RFC 6886 recommends, also a common UPnP default.
/// Long enough that renewals are rare, short enough that a crashed agent's mapping goes away.
const REQUESTED_LIFETIME_SECS: u32 = 7200;
/// Shortest wait between renewals, whatever lifetime the gateway grants: a gateway granting a
/// few seconds must not make us send a request every second.
const MIN_RENEW: Duration = Duration::from_secs(30);
/// Longest wait between renewals (also for a permanent UPnP lease): a gateway that rebooted and
/// forgot the mapping is noticed, and the mapping restored, within this time.
const MAX_RENEW: Duration = Duration::from_secs(3600);
/// How often the default route is re-read while a mapping exists: a laptop moving to another
/// network gets a mapping on the new gateway within this time.
const ROUTE_CHECK: Duration = Duration::from_secs(60);
/// How often to look for a default route while there is none (offline host, network not up yet).
const NO_ROUTE_RECHECK: Duration = Duration::from_secs(60);
/// First retry interval after a gateway offered no mapping (no IGD, no PCP/NAT-PMP, or
/// refused): the answer rarely changes, so ask rarely, yet pick up a router whose UPnP was just
/// enabled. It doubles, up to [`GATEWAY_RETRY_MAX`], while the same gateway keeps offering
/// none; a new gateway (the route changed, looked at every [`ROUTE_CHECK`]) is asked at once.
const GATEWAY_RETRY: Duration = Duration::from_secs(300);
/// Longest retry interval for a gateway that offered no mapping: an idle member behind a
/// router without UPnP, PCP or NAT-PMP (or with a public address) asks about once an hour.
const GATEWAY_RETRY_MAX: Duration = Duration::from_secs(3600);
/// First retry delay after a mapping we had could not be renewed: it probably is a transient
/// hiccup (gateway rebooting), so try again soon...
const RETRY_MIN: Duration = Duration::from_secs(5);
/// ...doubling up to this, the same pace as [`GATEWAY_RETRY`], if the gateway stays away.
const RETRY_MAX: Duration = Duration::from_secs(300);
/// Wait for an SSDP answer to the unicast M-SEARCH sent to the gateway: it is one LAN hop away,
/// and a gateway without UPnP never answers, so this is paid by every host without an IGD.
const UPNP_UNICAST_SEARCH: Duration = Duration::from_secs(1);
/// Wait for an answer to the multicast M-SEARCH (routers that answer only the multicast group);
/// UPnP devices answer within a second or two (the M-SEARCH's MX is short).
const UPNP_MULTICAST_SEARCH: Duration = Duration::from_secs(2);
/// Bound on one UPnP SOAP request (the library's own is 10 s): a LAN HTTP exchange that takes
/// longer means a broken gateway, and must not hold up the PCP attempt.
const UPNP_REQUEST_TIMEOUT: Duration = Duration::from_secs(2);
/// PCP and NAT-PMP request timing: 250 ms first wait (RFC 6886's value), doubled per retry, two
/// retries: 1.75 s in all, plenty for a gateway on the LAN, short when nothing listens.
const PMP_TIMEOUTS: TimeoutConfig = TimeoutConfig {
    initial_timeout: Duration::from_millis(250),
    max_retries: 2,
    max_retry_timeout: Some(Duration::from_secs(1)),
};
/// Bound on one whole PCP or NAT-PMP exchange, in case the library's own timing misbehaves.
const PMP_EXCHANGE_TIMEOUT: Duration = Duration::from_secs(3);
/// Time allowed for deleting a mapping from the gateway (at shutdown or after a network change):
/// the agent's exit must not wait on a gateway that went away; the lease then simply expires.
const REMOVE_BUDGET: Duration = Duration::from_secs(2);
/// Description shown in the router's UPnP mapping table.
const DESCRIPTION: &str = "meshvpn";

/// Which protocol made a mapping.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) enum MapProtocol {
    /// UPnP Internet Gateway Device (`WANIPConnection` / `WANPPPConnection`).
    Upnp,
    /// NAT Port Mapping Protocol (RFC 6886).
    NatPmp,
    /// Port Control Protocol (RFC 6887).
    Pcp,
}

impl fmt::Display for MapProtocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            MapProtocol::Upnp => "UPnP",
            MapProtocol::NatPmp => "NAT-PMP",
            MapProtocol::Pcp => "PCP",
        })
    }
}

/// A mapping held on the gateway: datagrams to `external` reach our UDP port.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct PortMapping {
    /// The protocol that made it.
    pub(crate) protocol: MapProtocol,
    /// The gateway's public address and port for it: the candidate to announce.
    pub(crate) external: SocketAddr,
    /// The lease the gateway granted (zero: a permanent UPnP lease); renewed at half of it.
    pub(crate) lifetime: Duration,
}

/// Handle on the background task that keeps the agent's UDP port mapped on the gateway.
#[derive(Debug)]
pub(crate) struct PortMapper {
    /// The mapping task.
    task: JoinHandle<()>,
    /// Tells the task to delete its mapping and stop (dropping it does the same).
    stop: oneshot::Sender<()>,
}

impl PortMapper {
    /// Starts the background task mapping UDP `internal_port`; `None` from the watch = no mapping (yet).
    ///
    /// Must be called within a tokio runtime. Port 0 is never mapped.
    pub(crate) fn spawn(internal_port: u16) -> (PortMapper, watch::Receiver<Option<PortMapping>>) {
        let (tx, rx) = watch::channel(None);
        let (stop, stop_rx) = oneshot::channel();
        let task = tokio::spawn(run(internal_port, tx, stop_rx));
        (PortMapper { task, stop }, rx)
    }

    /// Removes the mapping from the gateway (bounded: at most ~2 s) and stops the task.
    pub(crate) async fn shutdown(self) {
        let PortMapper { mut task, stop } = self;
        // An error only means the task has already ended.
        stop.send(()).ok();
        // The task bounds its own clean-up by REMOVE_BUDGET; the margin covers scheduling.
        if timeout(REMOVE_BUDGET + Duration::from_millis(500), &mut task)
            .await
            .is_err()
        {
            tracing::debug!("port mapper did not stop in time; aborting it");
            task.abort();
        }
    }
}

/// The task: rounds of [`Mapper::step`] until told to stop, then the mapping's removal.
async fn run(
    internal_port: u16,
    tx: watch::Sender<Option<PortMapping>>,
    mut stop: oneshot::Receiver<()>,
) {
    let Some(port) = NonZeroU16::new(internal_port) else {
        tracing::debug!("port mapping disabled: the UDP port is not known (0)");
        // Either outcome (a stop request or a dropped handle) means stop.
        stop.await.ok();
        return;
    };
    let mut mapper = Mapper {
        port,
        tx,
        active: None,
        backoff: None,
        refused: None,
    };
    let mut next = Instant::now();
    loop {
        tokio::select! {
            biased;
            _ = &mut stop => break,
            () = sleep_until(next) => {}
        }
        tokio::select! {
            biased;
            _ = &mut stop => break,
            wake = mapper.step() => next = wake,
        }
    }
    // Withdraw the candidate first: the deletion below may take up to REMOVE_BUDGET.
    mapper.publish(None);
    if let Some(active) = mapper.active.take() {
        remove(active, "shutting down").await;
    }
}

/// The default route's gateway and our address towards it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Route {
    /// The default gateway (where the mapping protocols are spoken).
    gateway: Ipv4Addr,
    /// Our address on the gateway's link (the mapping's internal address).
    local: Ipv4Addr,
}

/// What deleting or renewing a mapping needs.
enum Lease {
    /// A UPnP mapping of `external_port` on `gateway`, with the lease it was made with.
    Upnp {
        /// The IGD's control endpoint.
        gateway: Gateway<Tokio>,
        /// The mapped external port.
        external_port: u16,
        /// The lease asked for (0 = permanent).
        lease_secs: u32,
    },
    /// A PCP or NAT-PMP mapping.
    Pmp(crab_nat::PortMapping),
}

/// The mapping currently held.
struct Active {
    /// The route it was made on.
    route: Route,
    /// What renewing and deleting it needs.
    lease: Lease,
    /// What was published for it.
    mapping: PortMapping,
    /// When to renew it.
    renew_at: Instant,
}

/// The task's state between rounds.
struct Mapper {
    /// The UDP port to map.
    port: NonZeroU16,
    /// Where the current mapping is published.
    tx: watch::Sender<Option<PortMapping>>,
    /// The mapping held, if any.
    active: Option<Active>,
    /// After losing a mapping: the next retry delay (doubling); `None`: retry at GATEWAY_RETRY.
    backoff: Option<Duration>,
    /// The gateway that offered no mapping last, when to ask it again, and the delay that
    /// was.
    refused: Option<(Route, Instant, Duration)>,
}

impl Mapper {
    /// Publishes `value` if it differs from what receivers last saw.
    fn publish(&self, value: Option<PortMapping>) {
        self.tx.send_if_modified(|cur| {
            if *cur == value {
                false
            } else {
                *cur = value;
                true
            }
        });
    }

    /// One round: check the route, keep or renew or make the mapping. Returns when to run again.
    async fn step(&mut self) -> Instant {
        let now = Instant::now();
        let route = match default_route() {
            Ok(route) => route,
            Err(e) => {
                if let Some(active) = self.active.take() {
                    tracing::warn!(
                        "{} mapping {} dropped: {e:#}",
                        active.mapping.protocol,
                        active.mapping.external
                    );
                    self.publish(None);
                    remove(active, "the default route went away").await;
                }
                tracing::debug!("no port mapping: {e:#}; looking again in {NO_ROUTE_RECHECK:?}");
                return Instant::now() + NO_ROUTE_RECHECK;
            }
        };

        if let Some(active) = &self.active {
            if active.route == route && now < active.renew_at {
                return active.renew_at.min(now + ROUTE_CHECK);
            }
        }
        if let Some(old) = self.active.take_if(|a| a.route != route) {
            tracing::info!(
                "network changed (gateway {} -> {}, local {} -> {}): mapping the port again",
                old.route.gateway,
                route.gateway,
                old.route.local,
                route.local
            );
            self.publish(None);
            remove(old, "the network changed").await;
        }
        // The mapping stays in `self.active` while being renewed: if the task is told to stop
        // meanwhile, the shutdown path still finds (and deletes) it.
        if let Some(active) = &mut self.active {
            match renew(active, self.port).await {
                Ok(mapping) => {
                    if mapping.external == active.mapping.external {
                        tracing::debug!(
                            "{} mapping {} renewed",
                            mapping.protocol,
                            mapping.external
                        );
                    } else {
                        tracing::info!("{} mapping now {}", mapping.protocol, mapping.external);
                    }
                    active.mapping = mapping;
                    active.renew_at = Instant::now() + renew_delay(mapping.lifetime);
                    let wake = active.renew_at.min(Instant::now() + ROUTE_CHECK);
                    self.publish(Some(mapping));
                    self.backoff = None;
                    return wake;
                }
                Err(e) => {
                    tracing::warn!(
                        "{} mapping {} could not be renewed ({e:#}); mapping again",
                        active.mapping.protocol,
                        active.mapping.external
                    );
                    // Not deleted: the gateway did not answer, or has already forgotten it.
                    self.active = None;
                    self.publish(None);
                    self.backoff = Some(RETRY_MIN);
                }
            }
        }

        if let Some((refused, retry_at, _)) = self.refused {
            if self.active.is_none() && self.backoff.is_none() && refused == route && now < retry_at
            {
                // Not yet time to ask this gateway again; the route is looked at meanwhile.
                return retry_at.min(now + ROUTE_CHECK);
            }
        }
        match map(route, self.port).await {
            Ok(active) => {
                self.refused = None;
                let m = active.mapping;
                tracing::info!(
                    "{} mapped {} (to {}:{}, lease {}s)",
                    m.protocol,
                    m.external,
                    route.local,
                    self.port,
                    m.lifetime.as_secs()
                );
                self.publish(Some(m));
                self.backoff = None;
                let wake = active.renew_at.min(Instant::now() + ROUTE_CHECK);
                self.active = Some(active);
                wake
            }
            Err(e) => {
                let delay = match self.backoff {
                    Some(delay) => {
                        self.backoff = Some(next_backoff(delay));
                        delay
                    }
                    None => {
                        let delay = gateway_retry(self.refused, route);
                        self.refused = Some((route, Instant::now() + delay, delay));
                        delay
                    }
                };
                tracing::debug!(
                    "no port mapping on gateway {}: {e:#}; trying again in {delay:?}",
                    route.gateway
                );
                Instant::now() + delay.min(ROUTE_CHECK)
            }
        }
    }
}

/// How long to wait before asking `route`'s gateway again after it offered no mapping, given
/// the gateway that refused before (and the delay then): [`GATEWAY_RETRY`] for a new one,
/// else doubled, at most [`GATEWAY_RETRY_MAX`].
fn gateway_retry(refused: Option<(Route, Instant, Duration)>, route: Route) -> Duration {
    match refused {
        Some((r, _, delay)) if r == route => delay.saturating_mul(2).min(GATEWAY_RETRY_MAX),
        Some(_) | None => GATEWAY_RETRY,
    }
}

/// The retry delay after `delay`: doubled, at most [`RETRY_MAX`].
fn next_backoff(delay: Duration) -> Duration {
    delay.saturating_mul(2).min(RETRY_MAX)
}

/// When to renew a mapping granted for `lifetime`: at half of it, within
/// [`MIN_RENEW`]..=[`MAX_RENEW`]; a permanent lease (zero) is re-asserted after [`MAX_RENEW`].
fn renew_delay(lifetime: Duration) -> Duration {
    if lifetime.is_zero() {
        MAX_RENEW
    } else {
        (lifetime / 2).clamp(MIN_RENEW, MAX_RENEW)
    }
}

/// Whether `ip` can be a gateway's external address at all.
fn usable_external(ip: IpAddr) -> anyhow::Result<Ipv4Addr> {
    match ip {
        IpAddr::V4(v4)
            if !(v4.is_unspecified()
                || v4.is_loopback()
                || v4.is_multicast()
                || v4.is_broadcast()) =>
        {
            Ok(v4)
        }
        IpAddr::V4(_) | IpAddr::V6(_) => {
            bail!("gateway reported an unusable external address {ip}")
        }
    }
}

/// The route to map on: the default gateway and our address towards it.
fn default_route() -> anyhow::Result<Route> {
    let table = std::fs::read_to_string("/proc/thread-self/net/route")
        .or_else(|_| std::fs::read_to_string("/proc/net/route"))
        .context("reading the IPv4 routing table")?;
    let (iface, gateway) = parse_default_route(&table)
        .ok_or_else(|| anyhow!("no default IPv4 route via a gateway"))?;
    let local = local_address_towards(gateway)
        .with_context(|| format!("finding our address towards gateway {gateway} on {iface}"))?;
    Ok(Route { gateway, local })
}

/// Our IPv4 address used to reach `gateway` (connecting a UDP socket sends nothing).
fn local_address_towards(gateway: Ipv4Addr) -> anyhow::Result<Ipv4Addr> {
    let socket = std::net::UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))?;
    socket.connect((gateway, crab_nat::GATEWAY_PORT))?;
    match socket.local_addr()?.ip() {
        IpAddr::V4(ip) if !ip.is_unspecified() => Ok(ip),
        other @ (IpAddr::V4(_) | IpAddr::V6(_)) => bail!("unexpected local address {other}"),
    }
}

/// From the text of `/proc/net/route`, the interface and gateway of the default route: the
/// lowest-metric `0.0.0.0/0` entry that is up (`RTF_UP`) and goes via a gateway (`RTF_GATEWAY`).
fn parse_default_route(table: &str) -> Option<(String, Ipv4Addr)> {
    const RTF_UP: u32 = 0x1;
    const RTF_GATEWAY: u32 = 0x2;
    // Addresses are the kernel's in-memory (network-order) u32 printed as hex in host order.
    let addr = |hex: &str| {
        u32::from_str_radix(hex, 16)
            .ok()
            .map(|v| Ipv4Addr::from(v.to_ne_bytes()))
    };
    let mut best: Option<(u32, String, Ipv4Addr)> = None;
    // The first line is the header (Iface Destination Gateway Flags RefCnt Use Metric Mask ...).
    for line in table.lines().skip(1) {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let [iface, dest, gateway, flags, _refcnt, _use, metric, mask, ..] = fields.as_slice()
        else {
            continue;
        };
        let (Some(dest), Some(gateway), Some(mask)) = (addr(dest), addr(gateway), addr(mask))
        else {
            continue;
        };
        let (Ok(flags), Ok(metric)) = (u32::from_str_radix(flags, 16), metric.parse::<u32>())
        else {
            continue;
        };
        if !dest.is_unspecified()
            || !mask.is_unspecified()
            || flags & (RTF_UP | RTF_GATEWAY) != RTF_UP | RTF_GATEWAY
            || gateway.is_unspecified()
        {
            continue;
        }
        if best.as_ref().is_none_or(|(m, _, _)| metric < *m) {
            best = Some((metric, (*iface).to_owned(), gateway));
        }
    }
    best.map(|(_, iface, gateway)| (iface, gateway))
}

/// Makes a mapping on `route`'s gateway: UPnP first, then PCP / NAT-PMP.
async fn map(route: Route, port: NonZeroU16) -> anyhow::Result<Active> {
    let upnp_err = match upnp_map(route, port).await {
        Ok(active) => return Ok(active),
        Err(e) => e,
    };
    match pmp_map(route, port).await {
        Ok(active) => Ok(active),
        Err(pmp_err) => Err(anyhow!("UPnP: {upnp_err:#}; PCP/NAT-PMP: {pmp_err:#}")),
    }
}

/// Renews `active` on its gateway; returns the mapping as it now stands.
async fn renew(active: &mut Active, port: NonZeroU16) -> anyhow::Result<PortMapping> {
    match &mut active.lease {
        Lease::Upnp {
            gateway,
            external_port,
            lease_secs,
        } => {
            let ip = upnp_external_ip(gateway).await?;
            let local = SocketAddr::new(active.route.local.into(), port.get());
            upnp_call(gateway.add_port(
                PortMappingProtocol::UDP,
                *external_port,
                local,
                *lease_secs,
                DESCRIPTION,
            ))
            .await?
            .context("renewing the UPnP port mapping")?;
            Ok(PortMapping {
                protocol: MapProtocol::Upnp,
                external: SocketAddr::new(ip.into(), *external_port),
                lifetime: Duration::from_secs(u64::from(*lease_secs)),
            })
        }
        Lease::Pmp(mapping) => {
            let options = crab_nat::PortMappingOptions {
                external_port: Some(mapping.external_port()),
                lifetime_seconds: Some(REQUESTED_LIFETIME_SECS),
                timeout_config: Some(PMP_TIMEOUTS),
            };
            let renewed = match mapping.mapping_type() {
                PortMappingType::Pcp {
                    client,
                    nonce,
                    external_ip,
                } => {
                    let base = pcp::BaseMapRequest::new(
                        mapping.gateway(),
                        client,
                        InternetProtocol::Udp,
                        port,
                    );
                    pmp_call(pcp::port_mapping(
                        base,
                        Some(nonce),
                        Some(external_ip),
                        options,
                    ))
                    .await?
                    .context("renewing the PCP mapping")?
                }
                PortMappingType::NatPmp => pmp_call(natpmp::port_mapping(
                    mapping.gateway(),
                    InternetProtocol::Udp,
                    port,
                    options,
                ))
                .await?
                .context("renewing the NAT-PMP mapping")?,
            };
            let (published, kept) = pmp_result(renewed).await?;
            *mapping = kept;
            Ok(published)
        }
    }
}

/// Deletes `active` from its gateway, within [`REMOVE_BUDGET`]; failures are only logged.
async fn remove(active: Active, why: &str) {
    let m = active.mapping;
    let result = timeout(REMOVE_BUDGET, async {
        match active.lease {
            Lease::Upnp {
                gateway,
                external_port,
                ..
            } => gateway
                .remove_port(PortMappingProtocol::UDP, external_port)
                .await
                .map_err(|e| anyhow!(e)),
            Lease::Pmp(mapping) => mapping.try_drop().await.map_err(|(e, _)| anyhow!(e)),
        }
    })
    .await;
    match result {
        Ok(Ok(())) => tracing::debug!("{} mapping {} removed ({why})", m.protocol, m.external),
        Ok(Err(e)) => tracing::debug!(
            "{} mapping {} not removed ({why}): {e:#}",
            m.protocol,
            m.external
        ),
        Err(_) => tracing::debug!(
            "{} mapping {} not removed ({why}): no answer within {REMOVE_BUDGET:?}",
            m.protocol,
            m.external
        ),
    }
}

/// Bounds one UPnP request by [`UPNP_REQUEST_TIMEOUT`].
async fn upnp_call<T>(request: impl std::future::Future<Output = T>) -> anyhow::Result<T> {
    timeout(UPNP_REQUEST_TIMEOUT, request)
        .await
        .map_err(|_| anyhow!("the IGD did not answer within {UPNP_REQUEST_TIMEOUT:?}"))
}

/// Bounds one PCP / NAT-PMP exchange by [`PMP_EXCHANGE_TIMEOUT`].
async fn pmp_call<T>(request: impl std::future::Future<Output = T>) -> anyhow::Result<T> {
    timeout(PMP_EXCHANGE_TIMEOUT, request)
        .await
        .map_err(|_| anyhow!("the gateway did not answer within {PMP_EXCHANGE_TIMEOUT:?}"))
}

/// The IGD's external IPv4 address.
async fn upnp_external_ip(gateway: &Gateway<Tokio>) -> anyhow::Result<Ipv4Addr> {
    let ip = upnp_call(gateway.get_external_ip())
        .await?
        .context("asking the IGD for its external address")?;
    usable_external(ip)
}

/// Finds the IGD on `route`'s gateway: unicast M-SEARCH to it, then the multicast one.
async fn upnp_search(route: Route) -> anyhow::Result<Gateway<Tokio>> {
    let options = |to: SocketAddr, wait: Duration| {
        let mut o = SearchOptions::default();
        o.bind_addr = SocketAddr::new(route.local.into(), 0);
        o.broadcast_address = to;
        o.timeout = Some(wait);
        o.single_search_timeout = Some(wait);
        o.gateway_ip_version = GatewayIpVersion::V4;
        o
    };
    let unicast = SocketAddr::new(route.gateway.into(), 1900);
    let multicast = SocketAddr::new(Ipv4Addr::new(239, 255, 255, 250).into(), 1900);
    let mut last = anyhow!("no IGD answered");
    for (to, wait) in [
        (unicast, UPNP_UNICAST_SEARCH),
        (multicast, UPNP_MULTICAST_SEARCH),
    ] {
        // The library bounds the search by `wait`; the outer bound is a safety net.
        match timeout(
            wait + Duration::from_millis(500),
            igd_next::aio::tokio::search_gateway(options(to, wait)),
        )
        .await
        {
            Ok(Ok(gateway)) if gateway.addr.ip() == IpAddr::V4(route.gateway) => {
                return Ok(gateway)
            }
            Ok(Ok(gateway)) => {
                last = anyhow!(
                    "ignored IGD at {}: not the default gateway {}",
                    gateway.addr,
                    route.gateway
                );
            }
            Ok(Err(e)) => last = anyhow!("no IGD found ({e})"),
            Err(_) => last = anyhow!("no IGD answered within {wait:?}"),
        }
    }
    Err(last)
}

/// Maps `port` with UPnP-IGD on `route`'s gateway.
async fn upnp_map(route: Route, port: NonZeroU16) -> anyhow::Result<Active> {
    let gateway = upnp_search(route).await?;
    let ip = upnp_external_ip(&gateway).await?;
    let local = SocketAddr::new(route.local.into(), port.get());
    let (external_port, lease_secs) = upnp_add(&gateway, port.get(), local).await?;
    let mapping = PortMapping {
        protocol: MapProtocol::Upnp,
        external: SocketAddr::new(ip.into(), external_port),
        lifetime: Duration::from_secs(u64::from(lease_secs)),
    };
    Ok(Active {
        route,
        lease: Lease::Upnp {
            gateway,
            external_port,
            lease_secs,
        },
        mapping,
        renew_at: Instant::now() + renew_delay(mapping.lifetime),
    })
}

/// Adds the UPnP mapping: external port `wanted` if free, else one the gateway picks; a
/// [`REQUESTED_LIFETIME_SECS`] lease, or a permanent one where the gateway takes no other.
/// Returns the external port and the lease.
async fn upnp_add(
    gateway: &Gateway<Tokio>,
    wanted: u16,
    local: SocketAddr,
) -> anyhow::Result<(u16, u32)> {
    let udp = PortMappingProtocol::UDP;
    let add = |lease| upnp_call(gateway.add_port(udp, wanted, local, lease, DESCRIPTION));
    let taken = match add(REQUESTED_LIFETIME_SECS).await? {
        Ok(()) => return Ok((wanted, REQUESTED_LIFETIME_SECS)),
        Err(AddPortError::OnlyPermanentLeasesSupported) => {
            add(0).await?.context("adding a permanent UPnP mapping")?;
            return Ok((wanted, 0));
        }
        Err(AddPortError::PortInUse | AddPortError::SamePortValuesRequired) => {
            format!("external port {wanted} is taken")
        }
        Err(e) => return Err(anyhow!(e).context("adding the UPnP mapping")),
    };
    let any = |lease| upnp_call(gateway.add_any_port(udp, local, lease, DESCRIPTION));
    match any(REQUESTED_LIFETIME_SECS).await? {
        Ok(p) if p != 0 => Ok((p, REQUESTED_LIFETIME_SECS)),
        Ok(_) => bail!("{taken}, and the IGD mapped port 0"),
        Err(AddAnyPortError::OnlyPermanentLeasesSupported) => {
            match any(0)
                .await?
                .with_context(|| format!("{taken}; adding a permanent mapping on any port"))?
            {
                0 => bail!("{taken}, and the IGD mapped port 0"),
                p => Ok((p, 0)),
            }
        }
        Err(e) => Err(anyhow!(e).context(format!("{taken}; adding a mapping on any port"))),
    }
}

/// Maps `port` with PCP on `route`'s gateway, or NAT-PMP where PCP is not served or refused.
async fn pmp_map(route: Route, port: NonZeroU16) -> anyhow::Result<Active> {
    let gateway = GatewayAddress::IpV4(route.gateway);
    let options = crab_nat::PortMappingOptions {
        external_port: Some(port),
        lifetime_seconds: Some(REQUESTED_LIFETIME_SECS),
        timeout_config: Some(PMP_TIMEOUTS),
    };
    let base = pcp::BaseMapRequest::new(gateway, route.local.into(), InternetProtocol::Udp, port);
    let pcp_err = match pmp_call(pcp::port_mapping(base, None, None, options)).await {
        Ok(Ok(mapping)) => match pmp_result(mapping).await {
            Ok(published) => return Ok(pmp_active(route, published)),
            Err(e) => e,
        },
        // A socket error (no route, ...) would fail NAT-PMP too.
        Ok(Err(pcp::Failure::Socket(e))) => return Err(anyhow!(e).context("PCP socket")),
        Ok(Err(e)) => anyhow!(e),
        Err(e) => e,
    };
    // PCP not served (version refused or no answer) or refused: NAT-PMP may still be there.
    let mapping = match pmp_call(natpmp::port_mapping(
        gateway,
        InternetProtocol::Udp,
        port,
        options,
    ))
    .await
    {
        Ok(Ok(mapping)) => mapping,
        Ok(Err(e)) => return Err(anyhow!("PCP: {pcp_err:#}; NAT-PMP: {e}")),
        Err(e) => return Err(anyhow!("PCP: {pcp_err:#}; NAT-PMP: {e:#}")),
    };
    match pmp_result(mapping).await {
        Ok(published) => Ok(pmp_active(route, published)),
        Err(e) => Err(e.context(format!("PCP: {pcp_err:#}; NAT-PMP"))),
    }
}

/// The [`Active`] for a PCP / NAT-PMP mapping checked by [`pmp_result`].
fn pmp_active(route: Route, (mapping, lease): (PortMapping, crab_nat::PortMapping)) -> Active {
    Active {
        route,
        lease: Lease::Pmp(lease),
        mapping,
        renew_at: Instant::now() + renew_delay(mapping.lifetime),
    }
}

/// Checks a PCP / NAT-PMP answer and completes it with the external address (asked for with
/// NAT-PMP, given in the answer with PCP). A mapping that fails the checks is deleted again.
async fn pmp_result(
    mapping: crab_nat::PortMapping,
) -> anyhow::Result<(PortMapping, crab_nat::PortMapping)> {
    let checked = async {
        if mapping.lifetime() == 0 {
            bail!("the gateway granted a zero lifetime");
        }
        let (protocol, ip) = match mapping.mapping_type() {
            PortMappingType::Pcp { external_ip, .. } => {
                (MapProtocol::Pcp, usable_external(external_ip)?)
            }
            PortMappingType::NatPmp => {
                let ip = pmp_call(natpmp::external_address(
                    mapping.gateway(),
                    Some(PMP_TIMEOUTS),
                ))
                .await?
                .context("asking the NAT-PMP gateway for its external address")?;
                (MapProtocol::NatPmp, usable_external(ip.into())?)
            }
        };
        Ok(PortMapping {
            protocol,
            external: SocketAddr::new(ip.into(), mapping.external_port().get()),
            lifetime: Duration::from_secs(u64::from(mapping.lifetime())),
        })
    }
    .await;
    match checked {
        Ok(published) => Ok((published, mapping)),
        Err(e) => {
            // Zero lifetime: nothing to delete (and a zero-lifetime request is a deletion).
            if mapping.lifetime() != 0 {
                timeout(REMOVE_BUDGET, mapping.try_drop()).await.ok();
            }
            Err(e)
        }
    }
}

#[cfg(test)]
mod tests;
