//! NAT path benchmark: how fast two members behind various NATs first ping each other and
//! reach a direct path, with the real `meshvpn` binary in the namespace lab.
//!
//! `cargo bench --bench nat_paths` (root; without root it says so and exits 0). For every NAT
//! pair it does `MESHVPN_BENCH_RUNS` (default 5) fresh runs — a new lab, relay, network and
//! agents each time — and measures from `meshvpn join` to the first answered ping and to
//! `path == "direct"` on both sides (or "never" within the bound: `MESHVPN_BENCH_DIRECT_BOUND_S`,
//! default 20 s, for pairs that should go direct; 10 s for pairs that should not). Then it prints
//! a table of medians. Positional arguments (e.g. `cargo bench --bench nat_paths -- home sym`)
//! keep only the pairs whose label contains one of them.

#![allow(clippy::print_stdout, clippy::unwrap_used)]
#![allow(clippy::disallowed_methods)]
// a benchmark: real time and real processes
// Until Cargo.toml declares this bench with `harness = false`, cargo builds it with the test
// harness, where `main` is unused.
#![cfg_attr(test, allow(dead_code))]

use std::process::ExitCode;
use std::time::{Duration, Instant};

use meshvpn_lab::{self as lab, Mesh, Nat, PairReport};

const EXE: &str = env!("CARGO_BIN_EXE_meshvpn");
const RELAY_PORT: u16 = 3478;
/// From the join: both members list each other and ping both ways.
const PING_BOUND: Duration = Duration::from_secs(30);
/// From the join: how long a pair that should stay relayed is watched.
const RELAY_WATCH: Duration = Duration::from_secs(10);

/// One benchmarked pair: label, the two placements, whether it should go direct.
struct Case {
    label: &'static str,
    a: Option<Nat>,
    b: Option<Nat>,
    direct_expected: bool,
}

const CASES: [Case; 8] = [
    Case {
        label: "public<->public",
        a: None,
        b: None,
        direct_expected: true,
    },
    Case {
        label: "home<->home",
        a: Some(Nat::HomeRouter),
        b: Some(Nat::HomeRouter),
        direct_expected: true,
    },
    Case {
        label: "fullcone<->home",
        a: Some(Nat::FullCone),
        b: Some(Nat::HomeRouter),
        direct_expected: true,
    },
    Case {
        label: "home<->symmetric",
        a: Some(Nat::HomeRouter),
        b: Some(Nat::Symmetric),
        direct_expected: true,
    },
    Case {
        label: "symmetric<->symmetric",
        a: Some(Nat::Symmetric),
        b: Some(Nat::Symmetric),
        direct_expected: false,
    },
    Case {
        label: "cgnat<->home",
        a: Some(Nat::Cgnat),
        b: Some(Nat::HomeRouter),
        direct_expected: true,
    },
    Case {
        label: "udp-blocked<->home",
        a: Some(Nat::UdpBlocked),
        b: Some(Nat::HomeRouter),
        direct_expected: false,
    },
    Case {
        label: "upnp<->symmetric",
        a: Some(Nat::Upnp),
        b: Some(Nat::Symmetric),
        direct_expected: true,
    },
];

/// One run's numbers (`None`: never, within the bound).
struct Sample {
    first_ping: Option<Duration>,
    direct: Option<Duration>,
    paths: String,
}

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(default)
}

fn one_run(case: &Case, run: u64, direct_bound: Duration) -> anyhow::Result<Sample> {
    let tag = format!("bench-{run}-{}", case.label.replace("<->", "-"));
    let mut mesh = Mesh::new(
        &tag,
        EXE.as_ref(),
        &[("alice", case.a), ("bob", case.b)],
        RELAY_PORT,
    )?;
    mesh.create_network("bench", Some("10.93.0.0/16"))?;
    let bound = if case.direct_expected {
        direct_bound
    } else {
        RELAY_WATCH
    };
    let r: PairReport = mesh.measure_pair("alice", "bob", PING_BOUND, bound)?;
    let first_ping = match (r.first_ping, r.first_ping_back) {
        (Some(a), Some(b)) => Some(a.max(b)),
        _ => None,
    };
    let direct = match (r.direct_a, r.direct_b) {
        (Some(a), Some(b)) if r.is_direct() => Some(a.max(b)),
        _ => None,
    };
    Ok(Sample {
        first_ping,
        direct,
        paths: format!("{}/{}", r.path_labels().0, r.path_labels().1),
    })
}

/// The median of the samples, "never" counting as longer than any time.
fn median(mut v: Vec<Option<Duration>>) -> Option<Duration> {
    if v.is_empty() {
        return None;
    }
    v.sort_by_key(|d| d.unwrap_or(Duration::MAX));
    v[v.len() / 2]
}

fn fmt(d: Option<Duration>) -> String {
    d.map_or_else(
        || "never".to_string(),
        |d| format!("{:.2}s", d.as_secs_f64()),
    )
}

fn main() -> ExitCode {
    if !lab::is_root() {
        println!("nat_paths: needs root (it builds network namespaces); skipping");
        return ExitCode::SUCCESS;
    }
    lab::install_signal_handler();
    let runs = env_u64("MESHVPN_BENCH_RUNS", 5).max(1);
    let direct_bound = Duration::from_secs(env_u64("MESHVPN_BENCH_DIRECT_BOUND_S", 20).max(1));
    let filters: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let started = Instant::now();
    println!(
        "nat_paths: {runs} fresh run(s) per pair; direct bound {direct_bound:?} ({RELAY_WATCH:?} \
         for pairs expected to stay relayed); times from `meshvpn join`"
    );
    let mut rows = Vec::new();
    let mut failed = false;
    for case in CASES
        .iter()
        .filter(|c| filters.is_empty() || filters.iter().any(|f| c.label.contains(f.as_str())))
    {
        let mut samples = Vec::new();
        for run in 0..runs {
            if lab::interrupted() {
                println!("interrupted");
                return ExitCode::FAILURE;
            }
            match one_run(case, run, direct_bound) {
                Ok(s) => {
                    println!(
                        "  {:<22} run {}: first ping {:>7}, direct {:>7}, paths {}",
                        case.label,
                        run + 1,
                        fmt(s.first_ping),
                        fmt(s.direct),
                        s.paths
                    );
                    samples.push(s);
                }
                Err(e) => {
                    failed = true;
                    println!("  {:<22} run {}: failed: {e:#}", case.label, run + 1);
                }
            }
        }
        rows.push((case.label, samples));
    }

    println!();
    println!(
        "{:<22} {:>5} {:>12} {:>10} {:>9}  final paths (a/b)",
        "pair", "runs", "first ping", "direct", "direct n"
    );
    for (label, samples) in &rows {
        let first = median(samples.iter().map(|s| s.first_ping).collect());
        let direct = median(samples.iter().map(|s| s.direct).collect());
        let n_direct = samples.iter().filter(|s| s.direct.is_some()).count();
        let mut paths: Vec<&str> = samples.iter().map(|s| s.paths.as_str()).collect();
        paths.sort_unstable();
        paths.dedup();
        println!(
            "{:<22} {:>5} {:>12} {:>10} {:>9}  {}",
            label,
            samples.len(),
            fmt(first),
            fmt(direct),
            format!("{n_direct}/{}", samples.len()),
            paths.join(", ")
        );
    }
    println!(
        "(medians; \"never\" = not within the bound; total {:.1?})",
        started.elapsed()
    );
    if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}
