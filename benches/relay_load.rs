//! Relay load benchmark: a real `meshvpn relay` process on loopback, 10,000 members in 1,000
//! networks, and relayed traffic between some of them while all stay registered.
//!
//! `cargo bench --bench relay_load` (no root needed). It starts the built binary on a free
//! loopback port, registers every member the way a member does (signed request, cookie round
//! trip, acknowledgement), spread over 1,000 loopback source addresses (127.1.x.y: the relay
//! budgets expensive work per source address), keeps them refreshed, then has
//! `MESHVPN_BENCH_PAIRS` (default 500) pairs send relay frames of 1,000 bytes, together
//! `MESHVPN_BENCH_RATE` frames a second (default 20,000), for `MESHVPN_BENCH_FORWARD_S`
//! (default 5) seconds. It prints registrations per second, the
//! relay's RSS (from /proc/PID/status) and CPU (from /proc/PID/stat) per phase, the
//! forwarding rate and loss, and the relay's CPU time per delivered frame (the figure batching
//! moves; it depends less on what else the machine runs than the rate does). It asserts
//! nothing. A few pairs at a high rate (`MESHVPN_BENCH_PAIRS=2 MESHVPN_BENCH_RATE=100000`)
//! model bulk transfers, where consecutive frames go to one member. `MESHVPN_BENCH_MEMBERS` and
//! `MESHVPN_BENCH_PER_NETWORK` (default 10,000 and 10) change the population.
//!
//! Registration speed is bounded by the relay's budget of expensive operations (an X25519 and a
//! signature check per new member; 5,000 a second with a burst of 5,000 by default), on purpose.

#![allow(clippy::print_stdout, clippy::unwrap_used)]
#![allow(clippy::disallowed_methods)] // a load generator: real time, real tasks
#![cfg_attr(test, allow(dead_code))]

use std::net::{Ipv4Addr, SocketAddr};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use meshvpn::keys::{NetworkKeys, NetworkSecret, NodeSecret, PeerKey};
use meshvpn::wire::admission::AdmissionClient;
use meshvpn::wire::{self, Frame, RelayReply, RelayRequest};
use rand::{RngCore, SeedableRng};
use tokio::net::UdpSocket;
use tokio::sync::Semaphore;

const EXE: &str = env!("CARGO_BIN_EXE_meshvpn");
/// Registrations in flight at once (keeps the relay's socket buffer from overflowing).
const IN_FLIGHT: usize = 256;
/// A member repeats an unanswered registration after this long.
const RETRY: Duration = Duration::from_millis(1500);
/// Members re-register this often, as real members do.
const REFRESH: Duration = Duration::from_secs(10);
/// Payload of a relayed frame (a full-size WireGuard packet is about this).
const PAYLOAD: usize = 1000;
/// The whole registration phase gives up after this long.
const REGISTER_BOUND: Duration = Duration::from_secs(120);

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Resident memory (kB) and CPU time (utime + stime, seconds) of a process.
fn usage(pid: u32) -> (u64, f64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let rss_kb = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0);
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let after = stat.rsplit_once(')').map(|(_, rest)| rest).unwrap_or("");
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    (rss_kb, (ticks(11) + ticks(12)) as f64 / hz)
}

fn raise_fd_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid pointer to a local struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

/// Starts the relay on a free loopback port; returns it, its address and its public key.
fn start_relay(dir: &std::path::Path) -> (Child, SocketAddr, PeerKey) {
    for _ in 0..20 {
        let probe = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let port = probe.local_addr().unwrap().port();
        drop(probe);
        if port == u16::MAX || std::net::UdpSocket::bind(("127.0.0.1", port + 1)).is_err() {
            continue;
        }
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let mut child = Command::new(EXE)
            .args(["--config-dir", dir.to_str().unwrap(), "--log-level", "warn"])
            .args(["relay", "--listen", &addr.to_string()])
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("starting the relay binary");
        let mut line = String::new();
        let stdout = child.stdout.take().unwrap();
        let mut reader = std::io::BufReader::new(stdout);
        let _ = std::io::BufRead::read_line(&mut reader, &mut line);
        if let Some(key) = line
            .rsplit_once("public key ")
            .and_then(|(_, k)| PeerKey::from_base64(k.trim()))
        {
            return (child, addr, key);
        }
        let _ = child.kill();
        let _ = child.wait();
    }
    panic!("could not start the relay on a free loopback port");
}

struct Shared {
    relay: SocketAddr,
    relay_key: PeerKey,
    registered: AtomicU64,
    attempts: AtomicU64,
    cookies: AtomicU64,
    received: AtomicU64,
    acks: AtomicU64,
}

struct Member {
    secret: NodeSecret,
    keys: NetworkKeys,
    socket: Arc<UdpSocket>,
}

impl Member {
    fn public(&self) -> PeerKey {
        self.secret.public()
    }
}

/// One member's life: register (cookie round trip), then refresh and count relayed frames.
async fn run_member(m: Arc<Member>, shared: Arc<Shared>, permits: Arc<Semaphore>, seed: u64) {
    let mut permit = Some(permits.acquire_owned().await.unwrap());
    let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(seed);
    let me = m.public();
    let session = m.secret.relay_session_key(&me, &shared.relay_key);
    let mut admission = AdmissionClient::new(m.keys.signing.clone(), shared.relay_key);
    let mut announcement = vec![0u8; 160];
    rng.fill_bytes(&mut announcement);
    let mut last_ts = 0u64;
    let mut buf = vec![0u8; 2048];
    let mut registered = false;
    let mut pending: Option<u64> = None;
    let mut next_send = tokio::time::Instant::now();
    loop {
        if tokio::time::Instant::now() >= next_send {
            last_ts = unix_ms().max(last_ts + 1);
            let req = RelayRequest::Register {
                network: m.keys.network_id,
                ts_ms: last_ts,
                announcement: announcement.clone(),
            };
            let mut nonce = [0u8; 24];
            rng.fill_bytes(&mut nonce);
            let d = admission.seal(&session, me, &req, nonce);
            let _ = m.socket.send_to(&d, shared.relay).await;
            shared.attempts.fetch_add(1, Ordering::Relaxed);
            pending = Some(last_ts);
            next_send = tokio::time::Instant::now() + if registered { REFRESH } else { RETRY };
        }
        let n = match tokio::time::timeout_at(next_send, m.socket.recv(&mut buf)).await {
            Ok(Ok(n)) => n,
            Ok(Err(_)) | Err(_) => continue,
        };
        match Frame::parse(&buf[..n]) {
            Ok(Frame::CookieReply { echo, cookie }) => {
                shared.cookies.fetch_add(1, Ordering::Relaxed);
                let mut nonce = [0u8; 24];
                rng.fill_bytes(&mut nonce);
                if let Some(d) = admission.handle_cookie_reply(echo, cookie, &session, me, nonce) {
                    let _ = m.socket.send_to(&d, shared.relay).await;
                }
            }
            Ok(Frame::FromRelay { relay, sealed }) => {
                match wire::open_from_relay(&session, &relay, sealed) {
                    Ok(RelayReply::RegisterAck { echo_ts_ms, .. })
                        if pending == Some(echo_ts_ms) =>
                    {
                        pending = None;
                        shared.acks.fetch_add(1, Ordering::Relaxed);
                        if !registered {
                            registered = true;
                            shared.registered.fetch_add(1, Ordering::Relaxed);
                            drop(permit.take());
                            next_send = tokio::time::Instant::now() + REFRESH;
                        }
                    }
                    Ok(_) | Err(_) => {}
                }
            }
            Ok(Frame::RelayRecv { .. }) => {
                shared.received.fetch_add(1, Ordering::Relaxed);
            }
            _ => {}
        }
    }
}

/// The load to generate (from the environment, see the module doc).
struct Load {
    members_total: usize,
    per_network: usize,
    pairs: usize,
    forward_s: u64,
    rate: usize,
}

fn main() {
    let load = Load {
        members_total: env_usize("MESHVPN_BENCH_MEMBERS", 10_000).max(2),
        per_network: env_usize("MESHVPN_BENCH_PER_NETWORK", 10).max(2),
        pairs: env_usize("MESHVPN_BENCH_PAIRS", 500).max(1),
        forward_s: env_usize("MESHVPN_BENCH_FORWARD_S", 5) as u64,
        rate: env_usize("MESHVPN_BENCH_RATE", 20_000),
    };
    raise_fd_limit();
    let dir = std::env::temp_dir().join(format!("meshvpn-relay-load-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (mut child, relay, relay_key) = start_relay(&dir);
    let pid = child.id();
    let result = std::panic::catch_unwind(|| {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(bench(pid, relay, relay_key, &load));
    });
    // SAFETY: kill on the PID of the child this process started.
    unsafe {
        libc::kill(pid as libc::pid_t, libc::SIGTERM);
    }
    let _ = child.wait();
    let _ = std::fs::remove_dir_all(&dir);
    if let Err(e) = result {
        std::panic::resume_unwind(e);
    }
}

async fn bench(pid: u32, relay: SocketAddr, relay_key: PeerKey, load: &Load) {
    let Load {
        members_total,
        per_network,
        pairs,
        forward_s,
        rate,
    } = *load;
    let networks = members_total.div_ceil(per_network);
    println!(
        "relay load: {members_total} members in {networks} networks against the relay at {relay} (pid {pid})"
    );
    let (rss0, cpu0) = usage(pid);
    println!("  relay idle: RSS {:.1} MB", rss0 as f64 / 1024.0);
    let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(7);
    let net_keys: Vec<NetworkKeys> = (0..networks)
        .map(|_| NetworkSecret::generate(&mut rng).derive())
        .collect();
    let shared = Arc::new(Shared {
        relay,
        relay_key,
        registered: AtomicU64::new(0),
        attempts: AtomicU64::new(0),
        cookies: AtomicU64::new(0),
        received: AtomicU64::new(0),
        acks: AtomicU64::new(0),
    });
    let mut members = Vec::with_capacity(members_total);
    for i in 0..members_total {
        // 1,000 source addresses, 127.1.0.1 ..: members of one network on different ones.
        let source = i % 1000;
        let ip = Ipv4Addr::new(127, 1, (source / 250) as u8, (source % 250) as u8 + 1);
        let std_socket = std::net::UdpSocket::bind((ip, 0)).expect("binding a loopback socket");
        std_socket.set_nonblocking(true).unwrap();
        members.push(Arc::new(Member {
            secret: NodeSecret::generate(&mut rng),
            keys: net_keys[i / per_network].clone(),
            socket: Arc::new(UdpSocket::from_std(std_socket).unwrap()),
        }));
    }
    let permits = Arc::new(Semaphore::new(IN_FLIGHT));
    let started = Instant::now();
    for (i, m) in members.iter().enumerate() {
        tokio::spawn(run_member(
            m.clone(),
            shared.clone(),
            permits.clone(),
            i as u64,
        ));
    }
    let mut last_print = Instant::now();
    while (shared.registered.load(Ordering::Relaxed) as usize) < members_total
        && started.elapsed() < REGISTER_BOUND
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
        if last_print.elapsed() >= Duration::from_secs(2) {
            last_print = Instant::now();
            println!(
                "  ... {} registered after {:.1} s",
                shared.registered.load(Ordering::Relaxed),
                started.elapsed().as_secs_f64()
            );
        }
    }
    let reg_time = started.elapsed();
    let registered = shared.registered.load(Ordering::Relaxed);
    let (rss1, cpu1) = usage(pid);
    println!(
        "  registered {registered}/{members_total} in {:.2} s: {:.0} registrations/s ({} requests sent, {} cookie replies)",
        reg_time.as_secs_f64(),
        registered as f64 / reg_time.as_secs_f64(),
        shared.attempts.load(Ordering::Relaxed),
        shared.cookies.load(Ordering::Relaxed),
    );
    println!(
        "  relay after registration: RSS {:.1} MB, CPU {:.2} s ({:.0} % of one core during registration)",
        rss1 as f64 / 1024.0,
        cpu1,
        100.0 * (cpu1 - cpu0) / reg_time.as_secs_f64()
    );

    // Forwarding: member 2k sends to member 2k+1 of the same network.
    let pairs: Vec<(Arc<Member>, PeerKey)> = (0..pairs.min(members_total / 2))
        .map(|p| {
            let a = members[(p * per_network) % members_total].clone();
            let b = members[(p * per_network + 1) % members_total].public();
            (a, b)
        })
        .collect();
    let received0 = shared.received.load(Ordering::Relaxed);
    let acks0 = shared.acks.load(Ordering::Relaxed);
    let (_, cpu_f0) = usage(pid);
    let fwd_start = Instant::now();
    let mut sent = 0u64;
    let payload = vec![0x5au8; PAYLOAD];
    let frames: Vec<Vec<u8>> = pairs
        .iter()
        .map(|(_, to)| {
            Frame::RelaySend {
                to: *to,
                payload: &payload,
            }
            .to_vec()
        })
        .collect();
    // Paced in 1 ms ticks: bursts larger than the relay's socket buffer would measure the
    // buffer, not the relay.
    let mut next = 0usize;
    let mut tick = tokio::time::interval(Duration::from_millis(1));
    while fwd_start.elapsed() < Duration::from_secs(forward_s) {
        tick.tick().await;
        let due = (rate as f64 * fwd_start.elapsed().as_secs_f64()) as u64;
        while sent < due {
            let (a, _) = &pairs[next % pairs.len()];
            let _ = a.socket.try_send_to(&frames[next % pairs.len()], relay);
            next += 1;
            sent += 1;
        }
    }
    let fwd_time = fwd_start.elapsed();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let got = shared.received.load(Ordering::Relaxed) - received0;
    let (rss2, cpu2) = usage(pid);
    println!(
        "  forwarding ({} pairs, {PAYLOAD}-byte frames offered at {rate}/s for {:.1} s): sent {sent}, delivered {got} ({:.1} % loss): {:.0} frames/s, {:.0} Mbit/s",
        pairs.len(),
        fwd_time.as_secs_f64(),
        100.0 * (sent.saturating_sub(got)) as f64 / sent.max(1) as f64,
        got as f64 / fwd_time.as_secs_f64(),
        got as f64 * PAYLOAD as f64 * 8.0 / fwd_time.as_secs_f64() / 1e6,
    );
    println!(
        "  relay during forwarding: RSS {:.1} MB, CPU {:.0} % of one core, {:.2} µs per delivered frame; {} refreshes acknowledged meanwhile (members re-register every {} s)",
        rss2 as f64 / 1024.0,
        100.0 * (cpu2 - cpu_f0) / (fwd_time.as_secs_f64() + 0.3),
        1e6 * (cpu2 - cpu_f0) / got.max(1) as f64,
        shared.acks.load(Ordering::Relaxed) - acks0,
        REFRESH.as_secs()
    );
}
