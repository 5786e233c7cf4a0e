//! End-to-end: the real `meshvpn` binary in network namespaces (needs root; skips otherwise).
//! A bulk TCP transfer through the tunnel between two public members arrives intact, with
//! TUN offload on (TSO super-packets in, coalesced writes out, UDP segmentation) and again
//! with it forced off (`MESHVPN_TUN_OFFLOAD=0`): the receiver's SHA-256 of the stream must
//! equal the sender's; and a third time with one data-path thread (`MESHVPN_PER_CPU=0`)
//! instead of the default per-CPU threads (a multi-queue TUN steered by CPU, a UDP socket and
//! a pinned thread per CPU, all driving one node), which the default run must show funnelling
//! the transfer to the control loop and spreading again after. Throughput of every run is
//! printed, never asserted.
//!
//! Each run builds its own [`Mesh`], torn down on drop even when the run fails. Only lab
//! addresses are ever contacted.

#![allow(clippy::disallowed_methods, clippy::print_stdout)] // an end-to-end test: real time, real processes, progress on stdout

use std::io::{Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context as _, Result};
use meshvpn_lab::{self as lab, Mesh, PeerPath};
use sha2::{Digest, Sha256};

const EXE: &str = env!("CARGO_BIN_EXE_meshvpn");
const RELAY_PORT: u16 = 3478;
const NETWORK: &str = "e2e";
/// How long members may take to see each other, and then to go direct.
const CONVERGE: Duration = Duration::from_secs(30);
/// Bytes moved per run: enough for TSO and GRO to matter (thousands of super-packets), a few
/// seconds even for a debug build.
const TRANSFER: usize = 64 << 20;
/// The receiver's port on its virtual address.
const PORT: u16 = 5201;
/// Longest a read or write may stall before the run fails (a lost tunnel must not hang CI).
const STALL: Duration = Duration::from_secs(30);

/// One run's figures.
struct Run {
    mode: &'static str,
    mbit_s: f64,
}

#[test]
fn a_bulk_tcp_transfer_arrives_intact_with_tun_offload_on_and_off() -> Result<()> {
    if !lab::is_root() {
        println!("skipping: needs root");
        return Ok(());
    }
    let t0 = Instant::now();
    let scratch = std::env::temp_dir().join(format!("meshvpn-e2e-bulk-{}", std::process::id()));
    std::fs::create_dir_all(&scratch)?;
    let off = wrapper(&scratch, "off", "MESHVPN_TUN_OFFLOAD=0")?;
    let one = wrapper(&scratch, "one", "MESHVPN_PER_CPU=0")?;
    let runs = [
        transfer("e2e-bulk-on", EXE.as_ref(), Mode::Offload),
        transfer("e2e-bulk-off", &off, Mode::NoOffload),
        transfer("e2e-bulk-one", &one, Mode::OneThread),
    ];
    let _ = std::fs::remove_dir_all(&scratch);
    let runs = runs.into_iter().collect::<Result<Vec<Run>>>()?;
    for r in &runs {
        println!(
            "  {}: {} MiB in one TCP stream at {:.0} Mbit/s",
            r.mode,
            TRANSFER >> 20,
            r.mbit_s
        );
    }
    println!(
        "a_bulk_tcp_transfer_arrives_intact_with_tun_offload_on_and_off: {:.1?}",
        t0.elapsed()
    );
    Ok(())
}

/// How the agents of one run move packets.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// The defaults: TUN offload on, a data-path thread per CPU.
    Offload,
    /// `MESHVPN_TUN_OFFLOAD=0` (a thread per CPU).
    NoOffload,
    /// `MESHVPN_PER_CPU=0` (offload on): the data path in the control loop.
    OneThread,
}

impl Mode {
    fn label(self) -> &'static str {
        match self {
            Mode::Offload => "offload on ",
            Mode::NoOffload => "offload off",
            Mode::OneThread => "one thread ",
        }
    }
}

/// A script `dir/name/meshvpn` that runs the meshvpn binary with the environment assignment
/// `env`.
fn wrapper(dir: &Path, name: &str, env: &str) -> Result<PathBuf> {
    let dir = dir.join(name);
    std::fs::create_dir_all(&dir)?;
    let path = dir.join("meshvpn");
    std::fs::write(&path, format!("#!/bin/sh\nexec env {env} '{EXE}' \"$@\"\n"))
        .with_context(|| format!("writing {}", path.display()))?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))?;
    Ok(path)
}

/// Two public members on `exe`; alice streams [`TRANSFER`] bytes to bob over the tunnel and
/// both sides hash them. `mode` is what the agents must report in their logs.
fn transfer(tag: &str, exe: &Path, mode: Mode) -> Result<Run> {
    let mut mesh = Mesh::new(tag, exe, &[("alice", None), ("bob", None)], RELAY_PORT)?;
    mesh.create_network(NETWORK, Some("10.81.0.0/16"))?;
    mesh.join("alice")?;
    mesh.join("bob")?;
    let statuses = mesh.converge(&["alice", "bob"], CONVERGE)?;
    let bob_ip = statuses[1].virtual_ipv4()?;
    mesh.ping_until("alice", bob_ip, Duration::from_secs(20))?;
    lab::wait_until(
        CONVERGE,
        Duration::from_millis(200),
        "alice and bob to go direct",
        || {
            Ok(mesh.path("alice", "bob")? == Some(PeerPath::Direct)
                && mesh.path("bob", "alice")? == Some(PeerPath::Direct))
        },
    )?;
    for name in ["alice", "bob"] {
        let log = std::fs::read_to_string(&mesh.member(name)?.log)?;
        let line = log
            .lines()
            .find(|l| l.contains("TUN device ready"))
            .with_context(|| format!("{name}'s log does not say how its TUN device was set up"))?;
        if mode == Mode::NoOffload {
            ensure!(
                line.contains("offload=false"),
                "{name} was told MESHVPN_TUN_OFFLOAD=0 but reports: {line}"
            );
        } else if !line.contains("offload=true") {
            // The kernel may refuse offload (the agent then falls back): say so, still test.
            println!("  note: {name} runs without TUN offload here: {line}");
        }
        let threads = log
            .lines()
            .find(|l| l.contains("data path:"))
            .with_context(|| format!("{name}'s log does not say how its data path runs"))?;
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        if mode == Mode::OneThread {
            ensure!(
                threads.contains("the control loop alone"),
                "{name} was told MESHVPN_PER_CPU=0 but reports: {threads}"
            );
        } else if cpus >= 2 {
            ensure!(
                threads.contains("one thread per CPU") && line.contains("steering=\"cpu\""),
                "{name} runs a thread per CPU by default on {cpus} CPUs, but reports: {threads} / {line}"
            );
        }
    }

    let addr = SocketAddr::from((bob_ip, PORT));
    let listener = mesh
        .lab
        .in_namespace(&mesh.host("bob")?.ns, || TcpListener::bind(addr))?
        .with_context(|| format!("listening on {addr} in bob"))?;
    let sender = mesh
        .lab
        .in_namespace(&mesh.host("alice")?.ns, || {
            TcpStream::connect_timeout(&addr, STALL)
        })?
        .with_context(|| format!("connecting from alice to {addr}"))?;
    let start = Instant::now();
    let (sent, received) = std::thread::scope(|s| {
        let rx = s.spawn(|| receive(&listener));
        let sent = send(sender);
        let received = rx
            .join()
            .map_err(|_| anyhow::anyhow!("the receiver panicked"));
        (sent, received)
    });
    let took = start.elapsed();
    let sent = sent?;
    let (bytes, received) = received??;
    ensure!(
        bytes == TRANSFER,
        "bob received {bytes} of {TRANSFER} bytes"
    );
    ensure!(
        sent == received,
        "the stream was corrupted: sent sha256 {}, received {}",
        hex(&sent),
        hex(&received)
    );
    let mbit_s = TRANSFER as f64 * 8.0 / took.as_secs_f64() / 1e6;
    println!(
        "  {tag}: {} MiB intact (sha256 {}) in {took:.2?}",
        TRANSFER >> 20,
        &hex(&sent)[..16]
    );
    if mode == Mode::Offload && per_cpu_logged() {
        // The transfer funnelled both agents to their control loops; once it is over they
        // spread again, and the tunnel still answers.
        for name in ["alice", "bob"] {
            let log_path = mesh.member(name)?.log.clone();
            lab::wait_until(
                Duration::from_secs(10),
                Duration::from_millis(100),
                &format!("{name} to funnel for the transfer and spread after it"),
                || {
                    let log = std::fs::read_to_string(&log_path)?;
                    Ok(
                        log.contains("bulk traffic: the control loop takes every packet")
                            && log.contains("quiet again: packets go to the thread of their CPU"),
                    )
                },
            )?;
        }
        mesh.ping_until("alice", bob_ip, Duration::from_secs(10))?;
    }
    mesh.shutdown()?;
    Ok(Run {
        mode: mode.label(),
        mbit_s,
    })
}

/// Whether the agents log the per-CPU data path's steering switches (at debug, the lab's
/// default level) on a machine where it runs (two CPUs or more).
fn per_cpu_logged() -> bool {
    let level = std::env::var("MESHVPN_LAB_LOG_LEVEL").unwrap_or_else(|_| "debug".into());
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    cpus >= 2 && matches!(level.as_str(), "debug" | "trace")
}

/// Writes [`TRANSFER`] pseudo-random bytes and closes; returns their hash.
fn send(mut stream: TcpStream) -> Result<[u8; 32]> {
    stream.set_write_timeout(Some(STALL))?;
    let mut hash = Sha256::new();
    let mut chunk = vec![0u8; 256 << 10];
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut left = TRANSFER;
    while left > 0 {
        let n = left.min(chunk.len());
        for word in chunk[..n].chunks_mut(8) {
            // xorshift64: incompressible, reproducible, cheap.
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            word.copy_from_slice(&state.to_le_bytes()[..word.len()]);
        }
        stream
            .write_all(&chunk[..n])
            .with_context(|| format!("sending, {} bytes in", TRANSFER - left))?;
        hash.update(&chunk[..n]);
        left -= n;
    }
    stream.shutdown(Shutdown::Write)?;
    Ok(hash.finalize().into())
}

/// Accepts one connection and reads it to the end; returns its length and hash.
fn receive(listener: &TcpListener) -> Result<(usize, [u8; 32])> {
    let (mut stream, from) = listener.accept().context("accepting")?;
    ensure!(
        from.ip() != std::net::IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        "accepted from {from}"
    );
    stream.set_read_timeout(Some(STALL))?;
    let mut hash = Sha256::new();
    let mut buf = vec![0u8; 256 << 10];
    let mut total = 0;
    loop {
        let n = stream
            .read(&mut buf)
            .with_context(|| format!("receiving, {total} bytes in"))?;
        if n == 0 {
            break;
        }
        hash.update(&buf[..n]);
        total += n;
    }
    Ok((total, hash.finalize().into()))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
