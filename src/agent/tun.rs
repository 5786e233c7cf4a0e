//! The TUN device, batched, with segmentation offload where the kernel offers it.
//!
//! # Offload
//! Opened with `IFF_VNET_HDR` and TSO/checksum offload (tun-rs `offload(true)`), the kernel
//! hands the agent TCP super-packets of up to 64 KB (one read instead of ~46) with a virtio
//! header; tun-rs splits each into MTU-sized IP packets with complete headers and checksums
//! before the node sees them, so the node (routing, sealing) is the same either way. On the
//! way out the packets of one batch go through a `GROTable`: consecutive segments of one TCP
//! (or UDP) flow are coalesced into one super-packet and written with one system call, the
//! kernel finishing the checksums. Coalescing happens only here, after the node opened every
//! packet and checked its inner source against the peer's address (cryptokey routing), so no
//! packet that failed the check can ride inside a coalesced one.
//!
//! The device is probed at start: if the kernel or device refuses offload, it is built again
//! without (logged once) and everything works one packet per system call. A config switch
//! (`node.tun_offload = false`) and the environment variable `MESHVPN_TUN_OFFLOAD=0` turn it
//! off. If the kernel later refuses a coalesced write, coalescing stops (logged once) and
//! packets are written one at a time with an empty virtio header.

use std::io;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::Path;

use tun_rs::{
    AsyncDevice, DeviceBuilder, GROTable, SyncDevice, IDEAL_BATCH_SIZE, VIRTIO_NET_HDR_LEN,
};

use super::cpus;

/// The environment variable that turns TUN offload off (`0`, `false`, `off` or `no`).
pub(crate) const OFFLOAD_ENV: &str = "MESHVPN_TUN_OFFLOAD";
/// Packets queued for the TUN before they are written even though the node has more:
/// tun-rs's own batch size, enough to coalesce a full 64 KB super-packet per flow.
pub(crate) const WRITE_BATCH: usize = IDEAL_BATCH_SIZE;
/// The largest read with offload: the virtio header and a 64 KB IP packet.
const RAW_LEN: usize = VIRTIO_NET_HDR_LEN + 65_535;

/// The TUN device with its read and write buffers.
pub(crate) struct TunIo {
    device: AsyncDevice,
    offload: bool,
    /// Whether batched writes are coalesced (offload on, and the kernel took them so far).
    coalesce: bool,
    /// One raw read (virtio header and super-packet) with offload.
    raw: Vec<u8>,
    /// The packets of one read, and their sizes.
    packets: Vec<Vec<u8>>,
    sizes: Vec<usize>,
    /// Packets queued for writing, each after [`VIRTIO_NET_HDR_LEN`] bytes of headroom; the
    /// first `queued` are live, the rest are spare buffers (at most [`WRITE_BATCH`], see
    /// [`write_buffer`]).
    out: Vec<Vec<u8>>,
    queued: usize,
    gro: GROTable,
}

/// Whether to try offload: the config allows it and the environment does not forbid it.
pub(crate) fn offload_wanted(config: bool, env: Option<&str>) -> bool {
    let forbidden = env.is_some_and(|v| {
        matches!(
            v.trim().to_ascii_lowercase().as_str(),
            "0" | "false" | "off" | "no"
        )
    });
    config && !forbidden
}

/// Builds the device with `build(true)` (offload) when `want` is set; if that fails, logs why
/// once and builds it with `build(false)`. Returns the device and whether offload is on; the
/// error is that of the build without offload.
pub(crate) fn build_with_fallback<D>(
    want: bool,
    mut build: impl FnMut(bool) -> io::Result<D>,
) -> io::Result<(D, bool)> {
    if want {
        match build(true) {
            Ok(d) => return Ok((d, true)),
            Err(e) => tracing::warn!(
                %e,
                "TUN offload refused by the kernel or device; running without it (one system call per packet)"
            ),
        }
    }
    build(false).map(|d| (d, false))
}

/// The prefix length of the IPv6 overlay: the network's ULA /64.
const OVERLAY_IPV6_PREFIX: u8 = 64;

/// Adds the member's IPv6 overlay address `ipv6`/64 to the device `ifname` (the kernel then
/// routes the whole overlay prefix into it). Duplicate address detection is turned off for
/// the device first: the address is a function of the member's key, unique by construction,
/// and no neighbour on a TUN device could answer a probe anyway, so DAD would only keep the
/// address unusable ("tentative") for a second. If the kernel has IPv6 disabled (no
/// `/proc/sys/net/ipv6`, or `disable_ipv6` set for the device) or refuses the address, this
/// logs it and the member runs IPv4-only.
fn add_overlay_ipv6(device: &SyncDevice, ifname: &str, ipv6: Ipv6Addr) {
    if !Path::new("/proc/sys/net/ipv6").exists() {
        tracing::warn!(%ipv6, "IPv6 is disabled in this kernel; the overlay runs IPv4-only");
        return;
    }
    let conf = Path::new("/proc/sys/net/ipv6/conf").join(ifname);
    if std::fs::read_to_string(conf.join("disable_ipv6")).is_ok_and(|v| v.trim() == "1") {
        tracing::warn!(%ipv6, interface = ifname, "IPv6 is disabled on the TUN device (net.ipv6.conf.*.disable_ipv6); the overlay runs IPv4-only");
        return;
    }
    if let Err(e) = std::fs::write(conf.join("accept_dad"), "0") {
        tracing::debug!(%e, interface = ifname, "could not turn off duplicate address detection");
    }
    match device.add_address_v6(ipv6, OVERLAY_IPV6_PREFIX) {
        Ok(()) => tracing::info!(%ipv6, "IPv6 overlay address assigned"),
        Err(e) => {
            tracing::warn!(%e, %ipv6, interface = ifname, "assigning the IPv6 overlay address failed; the overlay runs IPv4-only")
        }
    }
}

/// A queue of the TUN device for a data-path thread, to be made a [`TunIo`] inside that
/// thread's runtime ([`TunIo::from_queue`]).
pub(crate) struct TunQueue {
    device: SyncDevice,
    offload: bool,
    mtu: u16,
}

impl std::os::fd::AsRawFd for TunQueue {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.device.as_raw_fd()
    }
}

impl TunIo {
    /// Creates TUN device `name` with `ip/prefix` and `mtu`, with offload if `want_offload`
    /// and the kernel agrees, and adds the member's IPv6 overlay address `ipv6`/64 (see
    /// [`add_overlay_ipv6`]; without IPv6 in the kernel the device stays IPv4-only).
    ///
    /// With `cpus > 0` the device is multi-queue: queues `0..cpus` are returned for the
    /// per-CPU data-path threads (queue `i` for CPU `i`, steered there by
    /// [`cpus::attach_cpu_steering`]) and the last queue is the control loop's, which the
    /// steering never picks. Where the kernel refuses more queues no queue is returned and the
    /// control loop's is the only one. The flag says whether the CPU steering is on; without
    /// it the caller closes the per-CPU queues (the kernel then queues everything in the
    /// control loop's).
    pub(crate) fn open(
        name: &str,
        ip: Ipv4Addr,
        prefix: u8,
        ipv6: Ipv6Addr,
        mtu: u16,
        want_offload: bool,
        cpus: usize,
    ) -> io::Result<(Self, Vec<TunQueue>, bool)> {
        let build = |multi_queue: bool| {
            build_with_fallback(want_offload, |offload| {
                DeviceBuilder::new()
                    .name(name)
                    .ipv4(ip, prefix, None)
                    .mtu(mtu)
                    .offload(offload)
                    .multi_queue(multi_queue)
                    .build_sync()
            })
        };
        let (first, offload) = match build(cpus > 0) {
            Ok(built) => built,
            Err(e) if cpus > 0 => {
                tracing::warn!(%e, "multi-queue TUN refused; one queue, one data-path thread");
                return Self::open(name, ip, prefix, ipv6, mtu, want_offload, 0);
            }
            Err(e) => return Err(e),
        };
        let ifname = first.name().unwrap_or_else(|_| name.to_string());
        add_overlay_ipv6(&first, &ifname, ipv6);
        // tun-rs reports what it really set up (no IFF_VNET_HDR on this kernel: none).
        let offload = offload && first.tcp_gso();
        let udp_segmentation = offload && first.udp_gso();
        let (main, queues) = match attach_queues(&first, cpus) {
            Ok(mut clones) if cpus > 0 => {
                let main = clones
                    .pop()
                    .expect("attach_queues returns cpus (at least one) queues");
                let mut queues = vec![first];
                queues.extend(clones);
                (main, queues)
            }
            Ok(_) => (first, Vec::new()),
            Err(e) => {
                tracing::warn!(%e, "could not add TUN queues; one queue, one data-path thread");
                (first, Vec::new())
            }
        };
        let cpu_steered = match queues.first() {
            None => false,
            Some(first) => match cpus::attach_cpu_steering(first, queues.len()) {
                Ok(()) => true,
                Err(e) => {
                    tracing::info!(%e, "TUN packets cannot be steered to the sending CPU's thread (needs CAP_BPF); one data-path thread");
                    false
                }
            },
        };
        let steering = match (queues.is_empty(), cpu_steered) {
            (true, _) => "none",
            (false, true) => "cpu",
            (false, false) => "refused",
        };
        tracing::info!(
            offload,
            udp_segmentation,
            queues = queues.len() + 1,
            steering,
            "TUN device ready"
        );
        let queues = queues
            .into_iter()
            .map(|device| TunQueue {
                device,
                offload,
                mtu,
            })
            .collect();
        Ok((
            Self::new(AsyncDevice::new(main)?, offload, mtu),
            queues,
            cpu_steered,
        ))
    }

    /// The data-path thread's side of a queue from [`open`](Self::open); call it inside the
    /// runtime that will drive it.
    pub(crate) fn from_queue(queue: TunQueue) -> io::Result<Self> {
        Ok(Self::new(
            AsyncDevice::new(queue.device)?,
            queue.offload,
            queue.mtu,
        ))
    }

    fn new(device: AsyncDevice, offload: bool, mtu: u16) -> Self {
        // A packet from the TUN is at most its MTU (offload splits super-packets to it).
        let slot = usize::from(mtu).max(1500) + 64;
        let reads = if offload { IDEAL_BATCH_SIZE } else { 1 };
        Self {
            device,
            offload,
            coalesce: offload,
            raw: if offload {
                vec![0u8; RAW_LEN]
            } else {
                Vec::new()
            },
            packets: vec![vec![0u8; slot]; reads],
            sizes: vec![0; reads],
            out: Vec::new(),
            queued: 0,
            gro: GROTable::new(),
        }
    }

    /// Waits until a packet may be read.
    pub(crate) async fn readable(&self) -> io::Result<()> {
        self.device.readable().await
    }

    /// Reads packets until the device would block or at least `budget` packets were handed
    /// to `f`; returns how many were. A super-packet counts as the packets it splits into.
    pub(crate) fn receive(&mut self, budget: usize, mut f: impl FnMut(&[u8])) -> usize {
        let mut count = 0;
        while count < budget {
            match self.device.try_recv_multiple(
                &mut self.raw,
                &mut self.packets,
                &mut self.sizes,
                0,
            ) {
                Ok(n) => {
                    for (packet, &size) in self.packets.iter().zip(&self.sizes).take(n) {
                        f(&packet[..size]);
                    }
                    count += n.max(1);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => {
                    // One bad read (a super-packet tun-rs cannot split) costs only itself.
                    tracing::debug!(%e, "TUN read failed");
                    count += 1;
                }
            }
        }
        count
    }

    /// Queues one IP packet for the TUN; [`flush`](Self::flush) writes the queue.
    pub(crate) fn queue(&mut self, packet: &[u8]) {
        if self.queued == self.out.len() {
            self.out.push(write_buffer(self.coalesce));
        }
        fill_with_headroom(&mut self.out[self.queued], packet);
        self.queued += 1;
    }

    /// How many packets are queued.
    pub(crate) fn queued(&self) -> usize {
        self.queued
    }

    /// Writes every queued packet: coalesced with offload, one by one without.
    pub(crate) async fn flush(&mut self) {
        let queued = std::mem::take(&mut self.queued);
        if queued == 0 {
            return;
        }
        let batch = &mut self.out[..queued];
        if self.coalesce {
            match self
                .device
                .send_multiple(&mut self.gro, batch, VIRTIO_NET_HDR_LEN)
                .await
            {
                Ok(_) => {}
                Err(e) if refuses_coalescing(&e) => {
                    tracing::warn!(%e, "the kernel refused a coalesced TUN write; writing packets one by one from now on");
                    self.coalesce = false;
                }
                Err(e) => tracing::debug!(%e, "TUN write failed"),
            }
        } else {
            // With offload each write still carries a virtio header: an empty one (no
            // segmentation, checksums complete). Without offload, the bare packet.
            let skip = if self.offload { 0 } else { VIRTIO_NET_HDR_LEN };
            for buf in batch.iter_mut() {
                buf[..VIRTIO_NET_HDR_LEN].fill(0);
                if let Err(e) = self.device.send(&buf[skip..]).await {
                    tracing::debug!(%e, "TUN write failed");
                }
            }
        }
    }
}

/// Attaches `cpus` more queues to the multi-queue device of `first` (queues 1 to `cpus`).
fn attach_queues(first: &SyncDevice, cpus: usize) -> io::Result<Vec<SyncDevice>> {
    (0..cpus).map(|_| first.try_clone()).collect()
}

/// A buffer for one queued packet. tun-rs coalesces a flow into its first packet's buffer
/// only if that buffer already has room for the whole super-packet (it never reallocates), so
/// with coalescing every buffer is allocated once at that size; the memory is touched only as
/// far as packets fill it.
fn write_buffer(coalesce: bool) -> Vec<u8> {
    Vec::with_capacity(if coalesce {
        2 * VIRTIO_NET_HDR_LEN + 65_535
    } else {
        VIRTIO_NET_HDR_LEN + 1500
    })
}

/// Makes `buf` [`VIRTIO_NET_HDR_LEN`] zero bytes (room for the virtio header) then `packet`.
fn fill_with_headroom(buf: &mut Vec<u8>, packet: &[u8]) {
    buf.clear();
    buf.resize(VIRTIO_NET_HDR_LEN, 0);
    buf.extend_from_slice(packet);
}

/// Whether a failed coalesced write means the kernel does not take this virtio header.
fn refuses_coalescing(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EINVAL) | Some(libc::EIO))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tun_rs::{gso_split, VirtioNetHdr, VIRTIO_NET_HDR_GSO_TCPV4};

    /// The Internet checksum of `data` seeded with `sum`.
    fn checksum(mut sum: u32, data: &[u8]) -> u16 {
        for pair in data.chunks(2) {
            let word = u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)]);
            sum += u32::from(word);
        }
        while sum > 0xffff {
            sum = (sum & 0xffff) + (sum >> 16);
        }
        !(sum as u16)
    }

    /// Segment `i` of one TCP/IPv4 flow 10.0.0.1:40000 -> 10.0.0.2:5201: `len` payload bytes,
    /// consecutive IP ids and sequence numbers, PSH on the last, both checksums complete.
    fn segment(i: u32, len: usize, last: bool) -> Vec<u8> {
        let total = 20 + 20 + len;
        let mut p = vec![0u8; total];
        p[0] = 0x45;
        p[2..4].copy_from_slice(&(total as u16).to_be_bytes());
        p[4..6].copy_from_slice(&(0x1000 + i as u16).to_be_bytes());
        p[6] = 0x40; // don't fragment
        p[8] = 64;
        p[9] = 6;
        p[12..16].copy_from_slice(&[10, 0, 0, 1]);
        p[16..20].copy_from_slice(&[10, 0, 0, 2]);
        let ip_sum = checksum(0, &p[..20]);
        p[10..12].copy_from_slice(&ip_sum.to_be_bytes());
        let tcp = &mut p[20..];
        tcp[0..2].copy_from_slice(&40000u16.to_be_bytes());
        tcp[2..4].copy_from_slice(&5201u16.to_be_bytes());
        tcp[4..8].copy_from_slice(&(7_000_000 + i * len as u32).to_be_bytes());
        tcp[8..12].copy_from_slice(&99u32.to_be_bytes());
        tcp[12] = 5 << 4;
        tcp[13] = if last { 0x18 } else { 0x10 }; // ACK (+PSH)
        tcp[14..16].copy_from_slice(&512u16.to_be_bytes());
        for (j, b) in tcp[20..].iter_mut().enumerate() {
            *b = (i as usize * 31 + j) as u8;
        }
        let mut pseudo = 0u32;
        for w in [0x0a00u32, 0x0001, 0x0a00, 0x0002, 6, (20 + len) as u32] {
            pseudo += w;
        }
        let tcp_sum = checksum(pseudo, &p[20..]);
        p[36..38].copy_from_slice(&tcp_sum.to_be_bytes());
        p
    }

    #[test]
    fn coalesced_tcp_segments_split_back_into_the_same_packets() {
        const MSS: usize = 1340;
        let originals: Vec<Vec<u8>> = (0..6).map(|i| segment(i, MSS, i == 5)).collect();
        let mut bufs: Vec<Vec<u8>> = (0..originals.len()).map(|_| write_buffer(true)).collect();
        for (buf, p) in bufs.iter_mut().zip(&originals) {
            fill_with_headroom(buf, p);
        }
        let mut gro = GROTable::new();
        gro.apply_gro(&mut bufs, VIRTIO_NET_HDR_LEN, false)
            .expect("a valid batch");
        // The whole flow went into the first buffer: one write, a TSO header.
        let coalesced = &mut bufs[0];
        assert_eq!(coalesced.len(), VIRTIO_NET_HDR_LEN + 40 + 6 * MSS);
        let hdr = VirtioNetHdr::decode(&coalesced[..VIRTIO_NET_HDR_LEN]).expect("a header");
        assert_eq!(hdr.gso_type, VIRTIO_NET_HDR_GSO_TCPV4);
        assert_eq!(usize::from(hdr.gso_size), MSS);
        // What the kernel does with it (segmentation, checksums) gives back the originals.
        let mut out = vec![vec![0u8; 2048]; 8];
        let mut sizes = vec![0usize; 8];
        let n = gso_split(
            &mut coalesced[VIRTIO_NET_HDR_LEN..],
            hdr,
            &mut out,
            &mut sizes,
            0,
            false,
        )
        .expect("splits");
        assert_eq!(n, originals.len());
        for (i, original) in originals.iter().enumerate() {
            assert_eq!(&out[i][..sizes[i]], &original[..], "segment {i}");
        }
    }

    #[test]
    fn packets_that_cannot_coalesce_keep_an_empty_header() {
        // A gap in the sequence numbers: two flows' worth of writes, nothing merged wrongly.
        let a = segment(0, 500, false);
        let b = segment(2, 500, true);
        let mut bufs = vec![write_buffer(true), write_buffer(true)];
        fill_with_headroom(&mut bufs[0], &a);
        fill_with_headroom(&mut bufs[1], &b);
        GROTable::new()
            .apply_gro(&mut bufs, VIRTIO_NET_HDR_LEN, false)
            .expect("a valid batch");
        assert_eq!(&bufs[0][VIRTIO_NET_HDR_LEN..], &a[..]);
        assert_eq!(&bufs[1][VIRTIO_NET_HDR_LEN..], &b[..]);
    }

    #[test]
    fn offload_is_wanted_unless_the_config_or_the_environment_says_no() {
        assert!(offload_wanted(true, None));
        assert!(offload_wanted(true, Some("1")));
        assert!(offload_wanted(true, Some("")));
        for no in ["0", "false", "OFF", " no "] {
            assert!(!offload_wanted(true, Some(no)), "{no:?}");
        }
        assert!(!offload_wanted(false, None));
        assert!(!offload_wanted(false, Some("1")));
    }

    #[test]
    fn a_refused_offload_falls_back_to_a_plain_device() {
        let mut tried = Vec::new();
        let (device, offload) = build_with_fallback(true, |offload| {
            tried.push(offload);
            if offload {
                Err(io::Error::from_raw_os_error(libc::EINVAL))
            } else {
                Ok("plain")
            }
        })
        .expect("the plain build works");
        assert_eq!((device, offload), ("plain", false));
        assert_eq!(tried, vec![true, false]);

        // Offload accepted: one build.
        let mut builds = 0;
        let (_, offload) = build_with_fallback(true, |offload| {
            builds += 1;
            Ok(offload)
        })
        .expect("builds");
        assert!(offload);
        assert_eq!(builds, 1);

        // Not wanted: never tried.
        let (_, offload) = build_with_fallback(false, |offload| {
            assert!(!offload, "offload was not wanted");
            Ok(())
        })
        .expect("builds");
        assert!(!offload);

        // Both refused: the plain build's error is the one reported.
        let e = build_with_fallback(true, |offload| -> io::Result<()> {
            Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                if offload { "offload" } else { "plain" },
            ))
        })
        .expect_err("both fail");
        assert_eq!(e.to_string(), "plain");
    }
}
