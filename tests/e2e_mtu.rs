//! End-to-end: the real `meshvpn` binary in network namespaces (needs root; skips otherwise).
//! No MTU black holes: bob sits behind a home router whose WAN link carries only 1400 or 1280
//! bytes, and whose path filters ICMP "fragmentation needed" (the router's own are dropped by
//! nftables, and oversized frames towards it vanish on the veth). Against a 1500-byte baseline:
//! - the members' path MTU discovery converges to what the link carries (shown in `status`);
//! - `ping -M do` with a size that does not fit gets an error back ("Frag needed" from the
//!   peer's virtual IP, then "message too long" from the kernel's route cache) instead of
//!   silence, and the kernel caches the MTU for the peer's address;
//! - a bulk TCP transfer through the tunnel completes (throughput printed per MTU).
//!
//! Each case builds its own [`Mesh`] and tears it down on drop, even when it fails. Only lab
//! addresses are ever contacted.

#![allow(clippy::disallowed_methods, clippy::print_stdout)] // an end-to-end test: real time, real processes, progress on stdout

use std::time::{Duration, Instant};

use anyhow::{ensure, Context as _, Result};
use meshvpn_lab::{self as lab, Mesh, Nat};
use meshvpn_status::PeerPath;

const EXE: &str = env!("CARGO_BIN_EXE_meshvpn");
const RELAY_PORT: u16 = 3478;
const NETWORK: &str = "e2e";
/// How long members may take to see each other.
const CONVERGE: Duration = Duration::from_secs(30);
/// How long path MTU discovery may take (a search needs a few seconds; generous).
const DISCOVER: Duration = Duration::from_secs(60);
/// Bytes of the bulk transfer.
const BULK: u64 = 16 << 20;
/// How long the bulk transfer may take (a stall fails it long before).
const BULK_LIMIT: Duration = Duration::from_secs(120);
/// The TUN MTU (the default).
const TUN_MTU: u16 = 1380;

/// The bulk receiver (on bob, port 5201): counts bytes until EOF and answers the count.
const RECEIVER: &str = r#"
import socket
l = socket.socket()
l.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
l.bind(("0.0.0.0", 5201))
l.listen(1)
c, _ = l.accept()
n = 0
while True:
    d = c.recv(65536)
    if not d:
        break
    n += len(d)
c.sendall(str(n).encode())
c.close()
"#;

/// The bulk sender (on alice): `python3 -c SENDER <bob's IP> <bytes>` prints bytes sent, the
/// receiver's count and the seconds from connect to the answer.
const SENDER: &str = r#"
import socket, sys, time
deadline = time.time() + 10
while True:
    try:
        s = socket.create_connection((sys.argv[1], 5201), timeout=30)
        break
    except OSError:
        if time.time() > deadline:
            raise
        time.sleep(0.2)
n = int(sys.argv[2])
buf = b"x" * 65536
t = time.time()
sent = 0
while sent < n:
    s.sendall(buf)
    sent += len(buf)
s.shutdown(socket.SHUT_WR)
got = s.recv(100).decode()
print(sent, got, time.time() - t)
"#;

/// The path MTU a path of `kind` leaves on an underlay of `underlay` bytes (IPv4), capped at
/// the TUN MTU: outer IPv4 + UDP + WireGuard = 60 bytes, plus 36 for the relay frame.
fn expected(underlay: u16, path: PeerPath) -> u16 {
    let overhead = match path {
        PeerPath::Direct => 60,
        PeerPath::Relay | PeerPath::RelayTcp | PeerPath::RelayTls => 96,
    };
    (underlay - overhead).min(TUN_MTU)
}

/// Narrows bob's router's WAN link to `mtu` and makes it a black hole for what does not fit.
fn narrow(mesh: &Mesh, mtu: u16) -> Result<()> {
    let host = mesh.host("bob")?;
    let router = host.router_ns.clone().context("bob sits behind a router")?;
    let lab = &mesh.lab;
    let t = Duration::from_secs(10);
    lab.exec_in_ns(
        &router,
        &["ip", "link", "set", "dev", "wan", "mtu", &mtu.to_string()],
        t,
    )?;
    let rules = "table inet mtu_black_hole {
        chain drop_out { type filter hook output priority 0; icmp type destination-unreachable icmp code frag-needed drop; }
        chain drop_forward { type filter hook forward priority 0; icmp type destination-unreachable icmp code frag-needed drop; }
    }";
    let file = lab.dir().join("mtu-black-hole.nft");
    std::fs::write(&file, rules).context("writing the nftables rules")?;
    let file = file.to_string_lossy().to_string();
    lab.exec_in_ns(&router, &["nft", "-f", &file], t)?;
    lab.exec_in_ns(lab.internet_ns(), &["nft", "-f", &file], t)?;
    Ok(())
}

/// Waits until alice and bob each show the other's path MTU as the underlay allows on their
/// current path; returns alice's view (path, MTU).
fn discover(mesh: &Mesh, underlay: u16) -> Result<(PeerPath, u16)> {
    let mut seen = (PeerPath::Relay, 0, 0);
    let took = lab::wait_until(
        DISCOVER,
        Duration::from_millis(250),
        &format!("path MTU discovery to reach the {underlay}-byte underlay's size"),
        || {
            let a = mesh.status("alice")?;
            let b = mesh.status("bob")?;
            let (Some(ab), Some(ba)) = (a.peer("bob"), b.peer("alice")) else {
                return Ok(false);
            };
            seen = (ab.path, ab.path_mtu.unwrap_or(0), ba.path_mtu.unwrap_or(0));
            Ok(ab.path == ba.path
                && ab.path_mtu == Some(expected(underlay, ab.path))
                && ba.path_mtu == Some(expected(underlay, ba.path)))
        },
    )
    .with_context(|| format!("last seen: {seen:?}"))?;
    println!(
        "  underlay {underlay}: path {} MTU {} (alice) / {} (bob) after {took:.1?}",
        seen.0, seen.1, seen.2
    );
    Ok((seen.0, seen.1))
}

/// `ping -M do` from alice to bob with a packet of `size` bytes: whether it was answered, and
/// what ping printed.
fn ping_df(mesh: &Mesh, to: &str, size: u16) -> Result<(bool, String)> {
    let payload = (size - 28).to_string();
    let args = [
        "ping", "-n", "-M", "do", "-s", &payload, "-c", "3", "-i", "0.3", "-W", "2", to,
    ];
    let out = mesh
        .lab
        .run(mesh.host("alice")?, &args, Duration::from_secs(15))?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok((out.status.success(), text))
}

/// Sends [`BULK`] bytes from alice to bob over TCP through the tunnel; returns Mbit/s.
fn bulk(mesh: &Mesh, to: &str) -> Result<f64> {
    let bob = mesh.host("bob")?;
    let log = mesh.lab.dir().join("bulk-receiver.log");
    let receiver = mesh.lab.spawn(bob, "python3", &["-c", RECEIVER], &log)?;
    let t0 = Instant::now();
    let out = mesh.lab.run(
        mesh.host("alice")?,
        &["python3", "-c", SENDER, to, &BULK.to_string()],
        BULK_LIMIT,
    )?;
    let took = t0.elapsed();
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    ensure!(
        out.status.success(),
        "the bulk transfer failed after {took:.1?}: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let fields: Vec<&str> = stdout.split_whitespace().collect();
    ensure!(fields.len() == 3, "unexpected sender output {stdout:?}");
    ensure!(
        fields[0] == fields[1],
        "sent {} bytes, bob received {}",
        fields[0],
        fields[1]
    );
    let secs: f64 = fields[2].parse().context("the sender's time")?;
    let _ = mesh.lab.wait_exit(receiver, Duration::from_secs(5));
    Ok(BULK as f64 * 8.0 / secs / 1e6)
}

/// One case: bob's WAN link at `underlay` bytes (1500: untouched); returns (path, MTU, Mbit/s).
fn case(underlay: u16) -> Result<(PeerPath, u16, f64)> {
    let t0 = Instant::now();
    let hosts = [("alice", None), ("bob", Some(Nat::HomeRouter))];
    let mut mesh = Mesh::new(
        &format!("e2e-mtu{underlay}"),
        EXE.as_ref(),
        &hosts,
        RELAY_PORT,
    )?;
    if underlay < 1500 {
        narrow(&mesh, underlay)?;
    }
    mesh.create_network(NETWORK, Some("10.81.0.0/16"))?;
    mesh.join("alice")?;
    mesh.join("bob")?;
    let statuses = mesh.converge(&["alice", "bob"], CONVERGE)?;
    let bob_ip = statuses[1].virtual_ipv4()?;
    println!("underlay {underlay}: converged after {:.1?}", t0.elapsed());
    mesh.ping_until("alice", bob_ip, Duration::from_secs(20))?;
    let (path, mtu) = discover(&mesh, underlay)?;
    let to = bob_ip.to_string();

    // What fits is answered.
    let (ok, text) = ping_df(&mesh, &to, mtu)?;
    ensure!(ok, "a {mtu}-byte ping -M do went unanswered: {text}");
    if mtu < TUN_MTU {
        // What does not fit (but fits the TUN) gets an error back, not silence.
        let too_big = (mtu + 40).min(TUN_MTU);
        let (ok, text) = ping_df(&mesh, &to, too_big)?;
        let lower = text.to_lowercase();
        println!(
            "  ping -M do of {too_big} bytes: {}",
            text.lines()
                .filter(|l| l.to_lowercase().contains("frag") || l.contains("too long"))
                .take(2)
                .collect::<Vec<_>>()
                .join(" | ")
        );
        ensure!(
            !ok,
            "a {too_big}-byte ping -M do was answered on a {mtu} path"
        );
        ensure!(
            lower.contains("frag needed") || lower.contains("message too long"),
            "no error for a {too_big}-byte ping -M do: {text}"
        );
        // The kernel took the MTU into its route cache for bob's address.
        let route = mesh
            .lab
            .exec(mesh.host("alice")?, &["ip", "route", "get", &to])?;
        let route = String::from_utf8_lossy(&route.stdout).to_string();
        println!(
            "  {}",
            route.split_whitespace().collect::<Vec<_>>().join(" ")
        );
        ensure!(
            route.contains(&format!("mtu {mtu}")),
            "alice's route cache has no MTU for {to}: {route}"
        );
        let dropped = mesh.status("alice")?.dropped.too_big;
        ensure!(dropped > 0, "alice counted no oversized packet");
    }
    let mbps = bulk(&mesh, &to)?;
    println!("  bulk TCP {} MiB: {mbps:.0} Mbit/s", BULK >> 20);
    mesh.shutdown()?;
    Ok((path, mtu, mbps))
}

#[test]
fn small_underlays_converge_answer_with_frag_needed_and_carry_bulk_tcp() -> Result<()> {
    if !lab::is_root() {
        println!("skipping: needs root");
        return Ok(());
    }
    let mut results = Vec::new();
    for underlay in [1500, 1400, 1280] {
        results.push((underlay, case(underlay)?));
    }
    println!("underlay  path     path MTU  bulk TCP");
    for (underlay, (path, mtu, mbps)) in &results {
        println!(
            "{underlay:>8}  {:<8} {mtu:>8}  {mbps:>6.0} Mbit/s",
            path.to_string()
        );
    }
    Ok(())
}
