//! The command line: argument definitions (clap) and what each command does.

#![allow(clippy::print_stdout, clippy::print_stderr)]
#![allow(clippy::disallowed_methods, clippy::disallowed_types)] // the CLI: wall-clock timestamps, new keys from OS randomness, the demo's timings

mod admin;
pub mod demo;
pub mod exit;
pub mod generate;
pub mod overlap;
mod revoke;

use std::io::Read as _;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context as _};
use clap::{CommandFactory as _, Parser, Subcommand};
use ipnet::Ipv4Net;
use rand::Rng;

use crate::config::{self, Config};
use crate::keys::{NetworkSecret, NodeSecret};
use crate::wire::token::{self, RelayEndpoint, Token};
use crate::wire::{self, Frame};
use crate::{agent, control, relay};
pub use exit::{ExitCode, Failure};

/// meshvpn: private virtual subnets over the internet, peer to peer, through any NAT.
#[derive(Debug, Parser)]
#[command(name = "meshvpn", version, about, propagate_version = true)]
pub struct Cli {
    /// Directory holding one NETWORK.toml per network (and the relay's key).
    #[arg(
        long,
        global = true,
        env = "MESHVPN_CONFIG_DIR",
        default_value = "/etc/meshvpn"
    )]
    pub config_dir: PathBuf,
    /// Directory for control sockets.
    #[arg(
        long,
        global = true,
        env = "MESHVPN_RUN_DIR",
        default_value = "/run/meshvpn"
    )]
    pub run_dir: PathBuf,
    /// Log level (error, warn, info, debug, trace); RUST_LOG, if set, takes precedence.
    #[arg(long, global = true)]
    pub log_level: Option<String>,
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the rendezvous + STUN + relay server in the foreground.
    Relay {
        /// UDP address to listen on.
        #[arg(long, default_value = "0.0.0.0:3478")]
        listen: SocketAddr,
        /// Most TCP connections at once (default and ceiling: what the open-file limit allows).
        #[arg(long, value_name = "N")]
        tcp_max_connections: Option<usize>,
        /// Most TCP connections from one IPv4 address or IPv6 /64 (default: 1/64 of the
        /// connection slots, at least 8).
        #[arg(long, value_name = "N")]
        tcp_per_source: Option<usize>,
        /// Most members registered at once, over all networks.
        #[arg(long, value_name = "N", default_value_t = relay::server::ServerConfig::default().max_members)]
        max_members: usize,
        /// Most members registered at once in one network.
        #[arg(long, value_name = "N", default_value_t = relay::server::ServerConfig::default().max_members_per_network)]
        max_members_per_network: usize,
        /// Most networks with members at once.
        #[arg(long, value_name = "N", default_value_t = relay::server::ServerConfig::default().max_networks)]
        max_networks: usize,
        /// Also serve members over WebSocket-over-TLS on this TCP address (e.g. 0.0.0.0:443),
        /// for networks that let only HTTPS out.
        #[arg(long, value_name = "ADDR")]
        tls_listen: Option<SocketAddr>,
        /// PEM certificate chain for --tls-listen (default: a self-signed certificate kept
        /// beside the relay key; members authenticate the relay by its key either way).
        #[arg(long, value_name = "PEM", requires = "tls_key")]
        tls_cert: Option<PathBuf>,
        /// PEM private key of --tls-cert.
        #[arg(long, value_name = "PEM", requires = "tls_cert")]
        tls_key: Option<PathBuf>,
        /// Also serve members over plain WebSocket on this TCP address, for a reverse proxy
        /// that terminates TLS in front of the relay.
        #[arg(long, value_name = "ADDR")]
        ws_listen: Option<SocketAddr>,
        /// HTTP path of the WebSocket on --tls-listen and --ws-listen.
        #[arg(long, value_name = "PATH", default_value = token::DEFAULT_WS_PATH)]
        ws_path: String,
        /// Tell members (through `create`) to reach the WebSocket over TLS on this TCP port of
        /// the relay's host at --ws-path: a reverse proxy's port in front of --ws-listen.
        #[arg(long, value_name = "PORT", value_parser = clap::value_parser!(u16).range(1..))]
        advertise_tls: Option<u16>,
        /// Serve Prometheus metrics on this address (GET /metrics), e.g. 127.0.0.1:9102:
        /// members, networks, forwarded traffic and every limit counter.
        #[arg(long, value_name = "ADDR")]
        metrics: Option<SocketAddr>,
    },
    /// Ask a relay for its key over a stream as a member would reach it (TCP, or
    /// WebSocket-over-TLS through HTTPS_PROXY if set) and print it: a check that a host reaches
    /// the relay's stream transports.
    #[command(hide = true)]
    RelayProbe {
        /// Relay as HOST:PORT or KEY@HOST:PORT (then the answer must match KEY).
        relay: String,
        /// Use WebSocket-over-TLS on this TCP port instead of TCP framing on the relay's port.
        #[arg(long, value_name = "PORT")]
        tls_port: Option<u16>,
        /// HTTP path of the relay's WebSocket.
        #[arg(long, value_name = "PATH", default_value = token::DEFAULT_WS_PATH)]
        ws_path: String,
    },
    /// Show a running relay's members, connections and limit counters (via its control socket
    /// in --run-dir).
    RelayStatus {
        /// Print JSON instead of one `name  value` line per counter.
        #[arg(long)]
        json: bool,
    },
    /// Create a network and print its group token (one line on stdout).
    Create {
        /// Network name: 1 to 32 of a-z, 0-9 and '-'.
        name: String,
        /// Relay as HOST:PORT (its key is fetched from it) or KEY@HOST:PORT. Repeat for several.
        #[arg(long, required = true)]
        relay: Vec<String>,
        /// Virtual subnet (default: a random 10.x.0.0/16).
        #[arg(long)]
        subnet: Option<Ipv4Net>,
    },
    /// Join a network with a group token: write its config and run the agent in the foreground.
    Join {
        /// The group token from `meshvpn create`, or `-` to read it from standard input (keeps
        /// it out of the process list and the shell history).
        #[arg(required_unless_present = "token_file", conflicts_with = "token_file")]
        token: Option<String>,
        /// Read the group token from this file instead.
        #[arg(long, value_name = "PATH")]
        token_file: Option<PathBuf>,
        /// This member's name (default: the host name).
        #[arg(long)]
        name: Option<String>,
        /// This member's virtual IP (default: derived from its key).
        #[arg(long)]
        ip: Option<Ipv4Addr>,
        /// UDP port to listen on (default: any free port).
        #[arg(long, default_value_t = 0)]
        listen_port: u16,
        /// Only write the config; do not start the agent.
        #[arg(long, conflicts_with = "enable")]
        no_start: bool,
        /// Enable and start the systemd service meshvpn@NETWORK instead of running here.
        #[arg(long)]
        enable: bool,
    },
    /// Run the agent for an existing network config in the foreground.
    Up {
        /// Network name.
        name: String,
        /// Serve Prometheus metrics on this address (GET /metrics), e.g. 127.0.0.1:9101;
        /// overrides the config's `metrics`.
        #[arg(long, value_name = "ADDR")]
        metrics: Option<SocketAddr>,
    },
    /// Show this member's peers, their paths and round-trip times.
    Status {
        /// Network name (default: every running network).
        name: Option<String>,
        /// Print JSON (`{"schema": 1, "networks": [...]}`, one network or many) instead of
        /// tables.
        #[arg(long)]
        json: bool,
    },
    /// Ping a peer (by name or virtual IP) and say whether the answer came direct or via relay.
    Ping {
        /// Peer node name or virtual IP.
        peer: String,
        /// Network (default: the only configured one).
        #[arg(short, long)]
        network: Option<String>,
        /// Number of pings.
        #[arg(short, long, default_value_t = 4)]
        count: u32,
        /// Print one JSON document with every answer instead of a line per pong.
        #[arg(long)]
        json: bool,
    },
    /// List the peers of a network: name, virtual IP, path and RTT.
    Peers {
        /// Network (default: the only configured one).
        name: Option<String>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Show this machine's NAT verdict and why each relayed peer is relayed.
    Netcheck {
        /// Network (default: the only configured one).
        name: Option<String>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Wait until a network's agent is registered with its relay and holds the member list
    /// (for scripts: start the agent, `meshvpn wait`, then use the network).
    Wait {
        /// Network (default: the only configured one).
        name: Option<String>,
        /// Give up after this many seconds: exit 3 if the agent never answered, 1 if it did
        /// but is not ready.
        #[arg(long, value_name = "SECONDS", default_value_t = 30.0, value_parser = parse_seconds)]
        timeout: f64,
    },
    /// List the configured networks and whether each agent is up.
    List {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Stop the agent of a network (it tells the relay it leaves).
    Down {
        /// Network name.
        name: String,
    },
    /// Leave a network: stop its agent, tell the relay, and delete its config.
    Leave {
        /// Network name.
        name: String,
        /// Do not ask for confirmation.
        #[arg(long)]
        yes: bool,
    },
    /// Print the network's current group token (to invite a new member).
    Invite {
        /// Network name.
        name: String,
    },
    /// Replace the network secret: every member moves to the new one, the old token admits
    /// nobody. Prints the new token. Needs the network's agent running.
    Rotate {
        /// Network name.
        name: String,
    },
    /// Rotate the secret without one member (by name, virtual IP or public key): it reaches
    /// nobody afterwards. Prints the new token. Needs the network's agent running.
    Kick {
        /// Network name.
        name: String,
        /// The member to remove.
        member: String,
    },
    /// Build a demo mesh on this machine in network namespaces (root), show it, tear it down.
    Demo,
    /// Write man pages and shell completions into a directory (for packaging).
    #[command(hide = true)]
    Generate {
        /// Output directory (created if missing).
        #[arg(long)]
        out: PathBuf,
    },
}

/// Runs the parsed command line; an agent it starts changes its log level through `log` on
/// SIGHUP.
pub fn run(cli: Cli, log: agent::reload::LogControl) -> anyhow::Result<()> {
    match cli.command {
        Command::Relay {
            listen,
            tcp_max_connections,
            tcp_per_source,
            max_members,
            max_members_per_network,
            max_networks,
            tls_listen,
            tls_cert,
            tls_key,
            ws_listen,
            ws_path,
            advertise_tls,
            metrics,
        } => runtime()?.block_on(relay::driver::run(&relay::driver::RelayOptions {
            listen,
            ws: relay::ws::WsOptions {
                tls_listen,
                cert: tls_cert.zip(tls_key),
                ws_listen,
                path: {
                    token::TlsEndpoint::validate_path(&ws_path)
                        .map_err(|e| anyhow::anyhow!("--ws-path: {e}"))?;
                    ws_path
                },
                advertise_tls,
            },
            config_dir: cli.config_dir,
            run_dir: cli.run_dir,
            tcp_max_connections,
            tcp_per_source,
            server: relay::server::ServerConfig {
                max_members,
                max_members_per_network,
                max_networks,
                ..relay::server::ServerConfig::default()
            },
            metrics,
        })),
        Command::RelayProbe {
            relay,
            tls_port,
            ws_path,
        } => runtime()?.block_on(relay_probe(&relay, tls_port, ws_path)),
        Command::RelayStatus { json } => {
            let status = runtime()?.block_on(relay::control::query_status(&cli.run_dir))?;
            if json {
                println!("{}", serde_json::to_string_pretty(&status)?);
            } else {
                print!("{}", status.to_text());
            }
            Ok(())
        }
        Command::Create {
            name,
            relay,
            subnet,
        } => create(&name, &relay, subnet),
        Command::Join {
            token,
            token_file,
            name,
            ip,
            listen_port,
            no_start,
            enable,
        } => {
            let token = read_token(token.as_deref(), token_file.as_deref())?;
            if !no_start && !enable {
                check_agent_privileges()?;
            }
            let path = Config::path(&cli.config_dir, &token.network);
            if path.exists() {
                bail!(
                    "this machine already has a config for network {:?} ({}); start it with `meshvpn up {}`",
                    token.network,
                    path.display(),
                    token.network
                );
            }
            let name = name.unwrap_or_else(hostname);
            let key = NodeSecret::generate(&mut rand::rngs::OsRng);
            let cfg = Config::from_token(&token, name, key, ip, listen_port)
                .map_err(anyhow::Error::msg)?;
            overlap::check(&cfg, &cli.config_dir)?;
            let path = cfg.save(&cli.config_dir)?;
            eprintln!(
                "joined network {} as {} with virtual IP {} (config: {})",
                cfg.network,
                cfg.name,
                cfg.virtual_ip,
                path.display()
            );
            if no_start {
                return Ok(());
            }
            if enable {
                return admin::enable_service(&cfg.network);
            }
            runtime()?.block_on(agent::run(cfg, &cli.run_dir, &cli.config_dir, log, None))
        }
        Command::Up { name, metrics } => {
            check_agent_privileges()?;
            let cfg = Config::load(&cli.config_dir, &name)?;
            overlap::check(&cfg, &cli.config_dir)?;
            let metrics = metrics.or(cfg.metrics);
            runtime()?.block_on(agent::run(cfg, &cli.run_dir, &cli.config_dir, log, metrics))
        }
        Command::Status { name, json } => status(&cli.config_dir, &cli.run_dir, name, json),
        Command::Ping {
            peer,
            network,
            count,
            json,
        } => admin::ping(&cli.config_dir, &cli.run_dir, network, &peer, count, json),
        Command::Peers { name, json } => admin::peers(&cli.config_dir, &cli.run_dir, name, json),
        Command::Netcheck { name, json } => {
            admin::netcheck(&cli.config_dir, &cli.run_dir, name, json)
        }
        Command::Wait { name, timeout } => admin::wait(
            &cli.config_dir,
            &cli.run_dir,
            name,
            Duration::from_secs_f64(timeout),
        ),
        Command::List { json } => admin::list(&cli.config_dir, &cli.run_dir, json),
        Command::Down { name } => admin::down(&cli.run_dir, &name),
        Command::Leave { name, yes } => admin::leave(&cli.config_dir, &cli.run_dir, &name, yes),
        Command::Invite { name } => revoke::invite(&cli.config_dir, &name),
        Command::Rotate { name } => revoke::rotate(&cli.run_dir, &name, None),
        Command::Kick { name, member } => revoke::rotate(&cli.run_dir, &name, Some(&member)),
        Command::Generate { out } => generate::write_all(Cli::command(), &out),
        Command::Demo => {
            let exe = std::env::current_exe().context("finding the meshvpn binary")?;
            demo::run(&exe)
        }
    }
}

/// A positive number of seconds, at most a day.
fn parse_seconds(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(s) if s > 0.0 && s <= 86_400.0 => Ok(s),
        Ok(_) => Err("must be more than 0 and at most 86400 seconds".into()),
        Err(e) => Err(e.to_string()),
    }
}

/// Fails unless this process may run the agent: [`Failure::PermissionDenied`] without root or
/// CAP_NET_ADMIN, an error without `/dev/net/tun`.
fn check_agent_privileges() -> anyhow::Result<()> {
    if !agent::has_net_admin() {
        return Err(Failure::PermissionDenied {
            what: "starting the agent".into(),
            need: "it needs root or CAP_NET_ADMIN to create its TUN device (try sudo, or run it as the meshvpn@NETWORK systemd service)".into(),
        }
        .into());
    }
    agent::check_privileges()
}

pub(crate) fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
}

fn create(name: &str, relays: &[String], subnet: Option<Ipv4Net>) -> anyhow::Result<()> {
    token::validate_network_name(name).map_err(anyhow::Error::msg)?;
    let subnet = match subnet {
        Some(s) if s.prefix_len() > 30 => {
            bail!("subnet {s} is too small: use a prefix of /30 or wider")
        }
        Some(s) => {
            config::check_private_subnet(&s).map_err(anyhow::Error::msg)?;
            s.trunc()
        }
        None => {
            let second: u8 = rand::rngs::OsRng.gen_range(100..=250);
            Ipv4Net::new(Ipv4Addr::new(10, second, 0, 0), 16).expect("/16 is a valid prefix")
        }
    };
    let mut endpoints = Vec::new();
    for r in relays {
        let endpoint = if r.contains('@') {
            r.parse::<RelayEndpoint>()
                .map_err(|e| anyhow::anyhow!("--relay {e}"))?
        } else {
            let (host, port) =
                token::split_host_port(r).map_err(|e| anyhow::anyhow!("--relay {e}"))?;
            let (key, tls) = runtime()?.block_on(fetch_relay_key(r))?;
            RelayEndpoint {
                key,
                host,
                port,
                tls,
            }
        };
        endpoints.push(endpoint);
    }
    let token = Token {
        network: name.to_string(),
        secret: NetworkSecret::generate(&mut rand::rngs::OsRng),
        subnet,
        relays: endpoints,
    };
    println!("{}", token.encode());
    Ok(())
}

/// Longest token text read from standard input or a file (a token naming eight relays with
/// long host names stays under 2 KiB; more is not a token).
const MAX_TOKEN_TEXT: u64 = 16 * 1024;

/// The group token of `join`: the argument itself, standard input for `-`, or a file.
fn read_token(arg: Option<&str>, file: Option<&Path>) -> anyhow::Result<Token> {
    let text = match (arg, file) {
        (Some("-"), _) => {
            let mut text = String::new();
            std::io::stdin()
                .take(MAX_TOKEN_TEXT)
                .read_to_string(&mut text)
                .context("reading the group token from standard input")?;
            text
        }
        (Some(t), _) => t.to_string(),
        (None, Some(path)) => {
            let mut text = String::new();
            std::fs::File::open(path)
                .and_then(|f| f.take(MAX_TOKEN_TEXT).read_to_string(&mut text))
                .with_context(|| format!("reading the group token from {}", path.display()))?;
            text
        }
        (None, None) => bail!(
            "no group token: pass it as an argument, `-` to read it from standard input, or --token-file PATH"
        ),
    };
    Ok(Token::decode(&text)?)
}

/// `meshvpn relay-probe`: the relay's key, asked over a TCP or TLS stream.
async fn relay_probe(relay: &str, tls_port: Option<u16>, ws_path: String) -> anyhow::Result<()> {
    use crate::agent::stream::{connect_stream, ProxyConfig, StreamKind};
    let (expected, host_port) = match relay.split_once('@') {
        Some(_) => {
            let r: RelayEndpoint = relay.parse().map_err(|e| anyhow::anyhow!("{e}"))?;
            (Some(r.key), r.host_port())
        }
        None => (None, relay.to_string()),
    };
    let (host, port) = token::split_host_port(&host_port).map_err(|e| anyhow::anyhow!("{e}"))?;
    token::TlsEndpoint::validate_path(&ws_path).map_err(|e| anyhow::anyhow!("--ws-path: {e}"))?;
    let endpoint = RelayEndpoint {
        key: expected.unwrap_or(crate::keys::PeerKey([0; 32])),
        host,
        port,
        tls: tls_port.map(|port| token::TlsEndpoint {
            port,
            path: ws_path,
        }),
    };
    let (kind, proxy) = match tls_port {
        Some(_) => (StreamKind::Tls, ProxyConfig::from_env()),
        None => (StreamKind::Tcp, None),
    };
    let mut stream = connect_stream(&endpoint, kind, proxy.clone())
        .await
        .with_context(|| format!("connecting to relay {host_port} ({kind:?})"))?;
    let mut request = Frame::KeyRequest.to_vec();
    request.resize(token::KEY_REQUEST_WITH_TLS_LEN, 0);
    stream
        .send(&request)
        .await
        .context("sending the key request")?;
    let reply = tokio::time::timeout(Duration::from_secs(5), stream.recv())
        .await
        .context("no answer from the relay within 5 s")?
        .context("reading the answer")?
        .context("the relay closed the stream")?;
    let Ok(Frame::KeyResponse { relay: key }) = Frame::parse(&reply) else {
        bail!("the relay's answer is not a key response");
    };
    if expected.is_some_and(|e| e != key) {
        bail!("relay {host_port} answered with key {key}, not the expected one");
    }
    let via = if proxy.is_some() { " via proxy" } else { "" };
    println!("relay {host_port} key {key} over {:?}{via}", stream.kind());
    Ok(())
}

/// Asks a relay for its public key and its WebSocket-over-TLS endpoint, if it serves one
/// (three tries, one second each).
async fn fetch_relay_key(
    host_port: &str,
) -> anyhow::Result<(crate::keys::PeerKey, Option<token::TlsEndpoint>)> {
    let addr = tokio::net::lookup_host(host_port)
        .await
        .with_context(|| format!("resolving relay {host_port}"))?
        .next()
        .with_context(|| format!("relay {host_port} has no address"))?;
    let bind: SocketAddr = if addr.is_ipv4() {
        "0.0.0.0:0"
    } else {
        "[::]:0"
    }
    .parse()
    .expect("literal");
    let socket = tokio::net::UdpSocket::bind(bind)
        .await
        .context("binding a UDP socket")?;
    let mut request = Frame::KeyRequest.to_vec();
    request.resize(token::KEY_REQUEST_WITH_TLS_LEN, 0);
    let answer = |reply: &[u8]| match Frame::parse(reply) {
        Ok(Frame::KeyResponse { relay }) => Some((
            relay,
            reply
                .get(wire::RELAY_OVERHEAD..)
                .and_then(token::TlsEndpoint::decode),
        )),
        _ => None,
    };
    let mut buf = [0u8; 1500];
    for _ in 0..3 {
        if socket.send_to(&request, addr).await.is_err() {
            // A firewall refusing UDP outright: go straight to TCP.
            break;
        }
        let deadline = tokio::time::Instant::now() + Duration::from_secs(1);
        while let Ok(r) = tokio::time::timeout_at(deadline, socket.recv_from(&mut buf)).await {
            let Ok((n, from)) = r else { break };
            if from == addr {
                if let Some(found) = answer(&buf[..n]) {
                    return Ok(found);
                }
            }
        }
    }
    // UDP may be blocked here: ask over TCP on the same port.
    let tcp = async {
        let mut stream = tokio::net::TcpStream::connect(addr).await?;
        crate::relay::tcp::write_frame(&mut stream, &request).await?;
        crate::relay::tcp::read_frame(&mut stream).await
    };
    if let Ok(Ok(Some(reply))) = tokio::time::timeout(Duration::from_secs(3), tcp).await {
        if let Some(found) = answer(&reply) {
            return Ok(found);
        }
    }
    bail!("relay {host_port} did not answer over UDP or TCP (is `meshvpn relay` running there and its port reachable?)")
}

/// `meshvpn status [NAME]`: the named network, or every running one.
fn status(
    config_dir: &std::path::Path,
    run_dir: &std::path::Path,
    name: Option<String>,
    json: bool,
) -> anyhow::Result<()> {
    let rt = runtime()?;
    let mut report = crate::status::StatusReport {
        schema: crate::status::SCHEMA,
        networks: Vec::new(),
        not_running: Vec::new(),
    };
    match name {
        Some(n) => report
            .networks
            .push(rt.block_on(control::query_status(run_dir, &n))?),
        None => {
            exit::check_readable_dir(config_dir)?;
            let found = config::list_networks(config_dir);
            if found.is_empty() {
                bail!(
                    "no networks configured in {} (join one with `meshvpn join TOKEN`)",
                    config_dir.display()
                );
            }
            for n in found {
                match rt.block_on(control::query_status(run_dir, &n)) {
                    Ok(s) => report.networks.push(s),
                    Err(e) if ExitCode::of(&e) == ExitCode::NotRunning => {
                        report.not_running.push(n)
                    }
                    Err(e) => return Err(e),
                }
            }
            if report.networks.is_empty() {
                return Err(Failure::NotRunning(format!(
                    "the agents of the configured networks ({}) are not running; start one with `meshvpn up NETWORK`",
                    report.not_running.join(", ")
                ))
                .into());
            }
        }
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    for (i, s) in report.networks.iter().enumerate() {
        if i > 0 {
            println!();
        }
        print!("{}", s.to_table());
    }
    if !report.not_running.is_empty() {
        println!("\nnot running: {}", report.not_running.join(", "));
    }
    Ok(())
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "member".into())
}
