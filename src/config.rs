//! One TOML file per network: `<config-dir>/<network>.toml`, holding keys, so written 0600 and
//! atomically (write a temporary file beside it, fsync, rename, fsync the directory: a crash
//! leaves either the old file or the new one, never half of one).
//!
//! Parsing is strict: unknown fields and wrong types are refused with the file, line and field
//! named ([`ConfigError`]). A parsed [`Config`] is valid by construction (keys decode, the
//! virtual IP lies inside the subnet, the relay list is not empty).
//!
//! See `config/example.toml` for every field with its meaning.

use std::fs;
use std::io::Write as _;
use std::net::{Ipv4Addr, SocketAddr};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};

use crate::addressing;
use crate::keys::{NetworkSecret, NodeSecret, PeerKey};
use crate::wire::token::{self, RelayEndpoint, Token};

/// Default TUN MTU: 1500 (underlay) − 40 (IPv6 header) − 8 (UDP) − 32 (WireGuard data header
/// and tag) − 36 (relay framing) − 4 spare = 1380, so a full-size overlay packet never fragments
/// on a 1500-byte path, direct or relayed, over IPv4 or IPv6.
pub const DEFAULT_MTU: u16 = 1380;
/// Default UDP port of a relay.
pub const DEFAULT_RELAY_PORT: u16 = 3478;

/// Why a config file was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file does not exist.
    #[error("no configuration for network {network:?} (looked for {path}); join it first with `meshvpn join TOKEN`")]
    Missing { network: String, path: PathBuf },
    /// The file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    /// TOML syntax, an unknown field or a wrong type.
    #[error("{path}: line {line}: {reason}")]
    Parse {
        path: PathBuf,
        line: usize,
        reason: String,
    },
    /// The file holds secrets but others may read it, or others may replace it.
    #[error("{path} has mode {mode:04o}: {reason}")]
    Permissions {
        path: PathBuf,
        mode: u32,
        reason: &'static str,
    },
    /// Well-formed TOML whose values are invalid.
    #[error("{path}: field `{field}`: {reason}")]
    Invalid {
        path: PathBuf,
        field: &'static str,
        reason: String,
    },
}

/// On-disk form (see `config/example.toml`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    network: FileNetwork,
    node: FileNode,
    #[serde(rename = "relay")]
    relays: Vec<FileRelay>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileNetwork {
    name: String,
    secret: String,
    subnet: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileNode {
    name: String,
    private_key: String,
    virtual_ip: String,
    #[serde(default)]
    listen_port: u16,
    #[serde(default = "default_mtu")]
    mtu: u16,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    log_level: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    stun_servers: Vec<String>,
    #[serde(default = "default_true")]
    port_mapping: bool,
    #[serde(default = "default_true")]
    tun_offload: bool,
    #[serde(default = "default_true")]
    per_cpu_data_path: bool,
    #[serde(default = "default_true")]
    relay_for_peers: bool,
    #[serde(default = "default_true")]
    dns: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    metrics: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileRelay {
    address: String,
    public_key: String,
    /// TCP port of the relay's WebSocket-over-TLS endpoint, when the token named one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    tls_port: Option<u16>,
    /// Its WebSocket path, when not the default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    ws_path: Option<String>,
}

fn default_true() -> bool {
    true
}

fn default_mtu() -> u16 {
    DEFAULT_MTU
}

/// A member's configuration for one network, valid by construction.
#[derive(Clone)]
pub struct Config {
    /// Network name.
    pub network: String,
    /// Shared network secret.
    pub secret: NetworkSecret,
    /// Virtual subnet.
    pub subnet: Ipv4Net,
    /// Relays, in order of preference.
    pub relays: Vec<RelayEndpoint>,
    /// This member's node name.
    pub name: String,
    /// This member's static key.
    pub private_key: NodeSecret,
    /// This member's virtual IPv4 address.
    pub virtual_ip: Ipv4Addr,
    /// UDP port to listen on (0: any free port).
    pub listen_port: u16,
    /// TUN MTU.
    pub mtu: u16,
    /// Log level for this network's agent (overridden by `--log-level` and `RUST_LOG`).
    pub log_level: Option<String>,
    /// Extra STUN servers (`host:port`) for classifying the NAT, besides the relay.
    pub stun_servers: Vec<String>,
    /// Whether to ask the gateway for a port mapping (UPnP-IGD, NAT-PMP, PCP).
    pub port_mapping: bool,
    /// Whether to try TUN segmentation offload (`IFF_VNET_HDR`: TSO super-packets in,
    /// coalesced writes out); the agent falls back without it where the kernel refuses, and
    /// the environment variable `MESHVPN_TUN_OFFLOAD=0` turns it off as well.
    pub tun_offload: bool,
    /// Whether to run one data-path thread per CPU, each handed the packets sent and
    /// received on its CPU while traffic is sparse, the control loop taking bulk flows
    /// (lower latency on multi-core hosts; see the agent's `cpus` module);
    /// `MESHVPN_PER_CPU=1` or `=0` overrides it.
    pub per_cpu_data_path: bool,
    /// Whether this member carries other members' ciphertext between two members it reaches
    /// directly while no relay answers them (see the node's `helping` module).
    pub relay_for_peers: bool,
    /// Whether to answer DNS for `NAME.NETWORK.mesh.internal` on the virtual IP (and register
    /// that zone with systemd-resolved on the TUN link); see [`crate::dns`].
    pub dns: bool,
    /// Where to serve Prometheus metrics over HTTP (`ip:port`, e.g. `127.0.0.1:9101`); off
    /// when unset (`meshvpn up --metrics` overrides it).
    pub metrics: Option<SocketAddr>,
}

impl std::fmt::Debug for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Config")
            .field("network", &self.network)
            .field("subnet", &self.subnet)
            .field("name", &self.name)
            .field("virtual_ip", &self.virtual_ip)
            .finish_non_exhaustive()
    }
}

impl Config {
    /// A new member config from a token; the virtual IP is `ip` or derived from the new key.
    pub fn from_token(
        token: &Token,
        name: String,
        private_key: NodeSecret,
        ip: Option<Ipv4Addr>,
        listen_port: u16,
    ) -> Result<Self, String> {
        check_private_subnet(&token.subnet)?;
        let virtual_ip = match ip {
            Some(ip) if addressing::is_usable(&token.subnet, ip) => ip,
            Some(ip) => {
                return Err(format!(
                    "--ip {ip} is not a usable address in the network's subnet {}",
                    token.subnet
                ))
            }
            None => addressing::derive_virtual_ip(&token.subnet, &private_key.public(), 0)
                .ok_or_else(|| format!("subnet {} is too small", token.subnet))?,
        };
        Ok(Self {
            network: token.network.clone(),
            secret: token.secret.clone(),
            subnet: token.subnet,
            relays: token.relays.clone(),
            name,
            private_key,
            virtual_ip,
            listen_port,
            mtu: DEFAULT_MTU,
            log_level: None,
            stun_servers: Vec::new(),
            port_mapping: true,
            tun_offload: true,
            per_cpu_data_path: true,
            relay_for_peers: true,
            dns: true,
            metrics: None,
        })
    }

    /// The path of network `network`'s file in `dir`.
    pub fn path(dir: &Path, network: &str) -> PathBuf {
        dir.join(format!("{network}.toml"))
    }

    /// Loads network `network` from `dir`.
    ///
    /// Refuses a file readable by group or others (it holds the member's private key and the
    /// network secret) and a directory writable by group or others (they could replace it).
    pub fn load(dir: &Path, network: &str) -> Result<Self, ConfigError> {
        let path = Self::path(dir, network);
        let text = match read_private(&path) {
            Ok(t) => t,
            Err(ConfigError::Io { source, .. })
                if source.kind() == std::io::ErrorKind::NotFound =>
            {
                return Err(ConfigError::Missing {
                    network: network.to_string(),
                    path,
                })
            }
            Err(e) => return Err(e),
        };
        Self::parse(&text, &path)
    }

    /// Parses config text; `path` is used in error messages only.
    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let file: FileConfig = toml::from_str(text).map_err(|e| {
            let start = e.span().map(|s| s.start.min(text.len())).unwrap_or(0);
            let line = text[..start].matches('\n').count() + 1;
            let mut reason = e.message().trim().to_string();
            // Name the field the error sits on when the span points into a `key = value` line.
            let line_text = text.lines().nth(line - 1).unwrap_or("").trim();
            if let Some((key, _)) = line_text.split_once('=') {
                let key = key.trim();
                if !reason.contains(key) {
                    reason = format!("field `{key}`: {reason}");
                }
            }
            ConfigError::Parse {
                path: path.to_path_buf(),
                line,
                reason,
            }
        })?;
        let invalid = |field, reason: String| ConfigError::Invalid {
            path: path.to_path_buf(),
            field,
            reason,
        };
        token::validate_network_name(&file.network.name).map_err(|r| invalid("network.name", r))?;
        let secret = NetworkSecret::from_base64(&file.network.secret)
            .ok_or_else(|| invalid("network.secret", "not a base64 32-byte secret".into()))?;
        let subnet: Ipv4Net = file.network.subnet.parse().map_err(|_| {
            invalid(
                "network.subnet",
                format!("{:?} is not an IPv4 CIDR", file.network.subnet),
            )
        })?;
        let subnet = subnet.trunc();
        let private_key = NodeSecret::from_base64(&file.node.private_key)
            .ok_or_else(|| invalid("node.private_key", "not a base64 32-byte key".into()))?;
        let virtual_ip: Ipv4Addr = file.node.virtual_ip.parse().map_err(|_| {
            invalid(
                "node.virtual_ip",
                format!("{:?} is not an IPv4 address", file.node.virtual_ip),
            )
        })?;
        if !addressing::is_usable(&subnet, virtual_ip) {
            return Err(invalid(
                "node.virtual_ip",
                format!("{virtual_ip} is not a usable address in {subnet}"),
            ));
        }
        if file.node.name.is_empty() || file.node.name.len() > 64 {
            return Err(invalid("node.name", "must be 1 to 64 characters".into()));
        }
        if !(576..=9000).contains(&file.node.mtu) {
            return Err(invalid(
                "node.mtu",
                format!("{} is outside 576..=9000", file.node.mtu),
            ));
        }
        if file.relays.is_empty() {
            return Err(invalid(
                "relay",
                "at least one [[relay]] is required".into(),
            ));
        }
        for server in &file.node.stun_servers {
            token::split_host_port(server).map_err(|e| invalid("node.stun_servers", e))?;
        }
        let metrics = match &file.node.metrics {
            Some(text) => Some(text.parse::<SocketAddr>().map_err(|_| {
                invalid(
                    "node.metrics",
                    format!("{text:?} is not an ip:port address (e.g. \"127.0.0.1:9101\")"),
                )
            })?),
            None => None,
        };
        let mut relays = Vec::new();
        for r in &file.relays {
            let key = PeerKey::from_base64(&r.public_key).ok_or_else(|| {
                invalid(
                    "relay.public_key",
                    format!("{:?} is not a base64 public key", r.public_key),
                )
            })?;
            let (host, port) =
                token::split_host_port(&r.address).map_err(|e| invalid("relay.address", e))?;
            let tls = match r.tls_port {
                Some(port) => {
                    let path = r
                        .ws_path
                        .clone()
                        .unwrap_or_else(|| token::DEFAULT_WS_PATH.to_string());
                    token::TlsEndpoint::validate_path(&path)
                        .map_err(|e| invalid("relay.ws_path", e))?;
                    Some(token::TlsEndpoint { port, path })
                }
                None => None,
            };
            relays.push(RelayEndpoint {
                key,
                host,
                port,
                tls,
            });
        }
        Ok(Self {
            network: file.network.name,
            secret,
            subnet,
            relays,
            name: file.node.name,
            private_key,
            virtual_ip,
            listen_port: file.node.listen_port,
            mtu: file.node.mtu,
            log_level: file.node.log_level,
            stun_servers: file.node.stun_servers,
            port_mapping: file.node.port_mapping,
            tun_offload: file.node.tun_offload,
            per_cpu_data_path: file.node.per_cpu_data_path,
            relay_for_peers: file.node.relay_for_peers,
            dns: file.node.dns,
            metrics,
        })
    }

    /// The TOML text of this config.
    pub fn to_toml(&self) -> String {
        let file = FileConfig {
            network: FileNetwork {
                name: self.network.clone(),
                secret: self.secret.to_base64(),
                subnet: self.subnet.to_string(),
            },
            node: FileNode {
                name: self.name.clone(),
                private_key: self.private_key.to_base64(),
                virtual_ip: self.virtual_ip.to_string(),
                listen_port: self.listen_port,
                mtu: self.mtu,
                log_level: self.log_level.clone(),
                stun_servers: self.stun_servers.clone(),
                port_mapping: self.port_mapping,
                tun_offload: self.tun_offload,
                per_cpu_data_path: self.per_cpu_data_path,
                relay_for_peers: self.relay_for_peers,
                dns: self.dns,
                metrics: self.metrics.map(|a| a.to_string()),
            },
            relays: self
                .relays
                .iter()
                .map(|r| FileRelay {
                    address: r.host_port(),
                    public_key: r.key.to_base64(),
                    tls_port: r.tls.as_ref().map(|t| t.port),
                    ws_path: r
                        .tls
                        .as_ref()
                        .map(|t| t.path.clone())
                        .filter(|p| p != token::DEFAULT_WS_PATH),
                })
                .collect(),
        };
        let body =
            toml::to_string(&file).expect("a config of strings and integers always serialises");
        format!("# meshvpn network {:?}. Holds this member's private key and the network secret: keep it 0600.\n\n{body}", self.network)
    }

    /// Writes the config to `dir` atomically with mode 0600 (creating `dir` 0700 if needed).
    /// Refuses an existing `dir` writable by group or others.
    pub fn save(&self, dir: &Path) -> Result<PathBuf, ConfigError> {
        let path = Self::path(dir, &self.network);
        if dir.exists() {
            check_dir(dir)?;
        }
        write_atomic(&path, self.to_toml().as_bytes()).map_err(|source| ConfigError::Io {
            path: path.clone(),
            source,
        })?;
        Ok(path)
    }

    /// The network's current group token (what `meshvpn invite` prints).
    pub fn token(&self) -> crate::wire::token::Token {
        crate::wire::token::Token {
            network: self.network.clone(),
            secret: self.secret.clone(),
            subnet: self.subnet,
            relays: self.relays.clone(),
        }
    }

    /// The TUN interface name: `mvpn-<network>`, shortened with a hash to fit 15 bytes.
    pub fn interface_name(&self) -> String {
        interface_name(&self.network)
    }
}

/// `mvpn-<network>` if it fits the kernel's 15-byte limit, else `mvpn-<first 6>-<hash>`.
pub fn interface_name(network: &str) -> String {
    let full = format!("mvpn-{network}");
    if full.len() <= 15 {
        return full;
    }
    let hash = network.bytes().fold(0x811c_9dc5u32, |h, b| {
        (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
    });
    format!("mvpn-{}-{:03x}", &network[..6], hash & 0xfff)
}

/// Writes `bytes` to `path` atomically with mode 0600.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    write_atomic_inner(path, bytes, None)
}

/// [`write_atomic`], optionally stopping dead (as a crash would: no cleanup) after writing
/// `crash_after` bytes of the temporary file. Tests use the crash to show the old file survives.
fn write_atomic_inner(
    path: &Path,
    bytes: &[u8],
    crash_after: Option<usize>,
) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    if !dir.as_os_str().is_empty() && !dir.exists() {
        fs::create_dir_all(dir)?;
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700))?;
    }
    let file_name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{file_name}.tmp{}", std::process::id()));
    let result = (|| {
        let mut f = match create_private(&tmp) {
            // A temporary file left by a crash of a process with our id: remove it (a symlink
            // is removed, not followed) and try once more.
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                fs::remove_file(&tmp)?;
                create_private(&tmp)?
            }
            other => other?,
        };
        if let Some(n) = crash_after {
            f.write_all(&bytes[..n.min(bytes.len())])?;
            return Err(std::io::Error::other("simulated crash"));
        }
        f.write_all(bytes)?;
        f.sync_all()?;
        drop(f);
        fs::rename(&tmp, path)?;
        fs::File::open(dir)?.sync_all()
    })();
    if result.is_err() && crash_after.is_none() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Creates `path` 0600 for writing; fails if anything (even a dangling symlink) is there.
fn create_private(path: &Path) -> std::io::Result<fs::File> {
    fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .custom_flags(libc::O_NOFOLLOW)
        .mode(0o600)
        .open(path)
}

/// Reads a file that holds secrets, refusing it if group or others may read it or may replace
/// it (a group- or world-writable directory).
fn read_private(path: &Path) -> Result<String, ConfigError> {
    let io = |source| ConfigError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut f = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .map_err(io)?;
    let mode = f.metadata().map_err(io)?.permissions().mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(ConfigError::Permissions {
            path: path.to_path_buf(),
            mode,
            reason: "it holds a private key and the network secret, so group and others must have no access (chmod 600 it)",
        });
    }
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        check_dir(dir)?;
    }
    let mut text = String::new();
    std::io::Read::read_to_string(&mut f, &mut text).map_err(io)?;
    Ok(text)
}

/// Refuses a config directory that group or others may write to (they could swap the file).
fn check_dir(dir: &Path) -> Result<(), ConfigError> {
    let meta = fs::metadata(dir).map_err(|source| ConfigError::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    let mode = meta.permissions().mode() & 0o7777;
    if mode & 0o022 != 0 {
        return Err(ConfigError::Permissions {
            path: dir.to_path_buf(),
            mode,
            reason: "this directory holds secrets, so group and others must not write to it (chmod go-w it)",
        });
    }
    Ok(())
}

/// Private IPv4 space a virtual subnet must lie in: RFC 1918 and the shared address space of
/// RFC 6598 (100.64.0.0/10). Anything wider would route public addresses into the overlay.
pub const PRIVATE_RANGES: [&str; 4] = [
    "10.0.0.0/8",
    "172.16.0.0/12",
    "192.168.0.0/16",
    "100.64.0.0/10",
];

/// Refuses a virtual subnet outside [`PRIVATE_RANGES`].
pub fn check_private_subnet(subnet: &Ipv4Net) -> Result<(), String> {
    let inside = PRIVATE_RANGES.iter().any(|r| {
        r.parse::<Ipv4Net>()
            .is_ok_and(|range| range.contains(subnet))
    });
    if inside {
        Ok(())
    } else {
        Err(format!(
            "subnet {subnet} is outside private address space: use one inside {}",
            PRIVATE_RANGES.join(", ")
        ))
    }
}

/// Networks configured in `dir` (file stems of `*.toml`), sorted.
pub fn list_networks(dir: &Path) -> Vec<String> {
    let mut out: Vec<String> = fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let stem = name.strip_suffix(".toml")?;
            token::validate_network_name(stem).ok()?;
            Some(stem.to_string())
        })
        .collect();
    out.sort();
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    fn sample() -> Config {
        let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(5);
        let token = Token {
            network: "lab".into(),
            secret: NetworkSecret::generate(&mut rng),
            subnet: "10.99.0.0/16".parse().expect("lit"),
            relays: vec![
                RelayEndpoint {
                    key: PeerKey([2; 32]),
                    host: "198.51.100.1".into(),
                    port: 3478,
                    tls: None,
                },
                RelayEndpoint {
                    key: PeerKey([3; 32]),
                    host: "203.0.113.1".into(),
                    port: 3478,
                    tls: Some(token::TlsEndpoint {
                        port: 443,
                        path: "/vpn".into(),
                    }),
                },
                RelayEndpoint {
                    key: PeerKey([4; 32]),
                    host: "relay.example.org".into(),
                    port: 3478,
                    tls: Some(token::TlsEndpoint::new(8443)),
                },
            ],
        };
        Config::from_token(
            &token,
            "alice".into(),
            NodeSecret::generate(&mut rng),
            None,
            0,
        )
        .expect("valid")
    }

    #[test]
    fn round_trip_through_disk_is_0600() {
        let dir = std::env::temp_dir().join(format!("meshvpn-config-test-{}", std::process::id()));
        let c = sample();
        let path = c.save(&dir).expect("save");
        let mode = fs::metadata(&path).expect("meta").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let back = Config::load(&dir, "lab").expect("load");
        assert_eq!(back.to_toml(), c.to_toml());
        assert_eq!(back.relays, c.relays);
        assert_eq!(back.private_key.public(), c.private_key.public());
        assert_eq!(list_networks(&dir), vec!["lab".to_string()]);
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn rejections_name_file_line_and_field() {
        let good = sample().to_toml();
        let p = Path::new("/etc/meshvpn/lab.toml");
        let unknown = good.replace("[node]\n", "[node]\ncolour = \"blue\"\n");
        let e = Config::parse(&unknown, p)
            .expect_err("must fail")
            .to_string();
        assert!(
            e.contains("/etc/meshvpn/lab.toml") && e.contains("colour") && e.contains("line"),
            "{e}"
        );
        let wrong_type = good.replace("mtu = 1380", "mtu = \"big\"");
        let e = Config::parse(&wrong_type, p)
            .expect_err("must fail")
            .to_string();
        assert!(e.contains("mtu") && e.contains("line"), "{e}");
        let bad_ip = good.replace(&sample().virtual_ip.to_string(), "192.168.1.1");
        let e = Config::parse(&bad_ip, p)
            .expect_err("must fail")
            .to_string();
        assert!(e.contains("node.virtual_ip"), "{e}");
        let e = Config::load(Path::new("/nonexistent-meshvpn"), "x")
            .expect_err("missing")
            .to_string();
        assert!(e.contains("no configuration for network"), "{e}");
    }

    #[test]
    fn a_crash_mid_write_leaves_the_old_file_intact() {
        let dir = std::env::temp_dir().join(format!("meshvpn-crash-test-{}", std::process::id()));
        let old = sample();
        let path = old.save(&dir).expect("save");
        let mut new = sample();
        new.name = "renamed".into();
        let text = new.to_toml();
        for cut in [0, 1, text.len() / 2, text.len() - 1] {
            assert!(write_atomic_inner(&path, text.as_bytes(), Some(cut)).is_err());
            let back = Config::load(&dir, "lab").expect("the old file still parses");
            assert_eq!(back.name, "alice", "crash after {cut} bytes");
        }
        // The leftover temporary file is not mistaken for a network.
        assert_eq!(list_networks(&dir), vec!["lab".to_string()]);
        new.save(&dir).expect("a later save works");
        assert_eq!(Config::load(&dir, "lab").expect("load").name, "renamed");
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn every_invalid_value_is_named() {
        let good = sample().to_toml();
        let p = Path::new("x.toml");
        let cases: [(&str, &str, &str); 8] = [
            ("name = \"lab\"", "name = \"Bad Name\"", "network.name"),
            (
                "subnet = \"10.99.0.0/16\"",
                "subnet = \"10.99.0.0/40\"",
                "network.subnet",
            ),
            ("name = \"alice\"", "name = \"\"", "node.name"),
            ("mtu = 1380", "mtu = 100", "node.mtu"),
            (
                "address = \"198.51.100.1:3478\"",
                "address = \"no-port\"",
                "relay.address",
            ),
            ("secret = \"", "secret = \"x", "network.secret"),
            ("private_key = \"", "private_key = \"x", "node.private_key"),
            ("public_key = \"", "public_key = \"x", "relay.public_key"),
        ];
        for (from, to, field) in cases {
            assert!(good.contains(from), "fixture lacks {from}");
            let bad = good.replacen(from, to, 1);
            let e = Config::parse(&bad, p).expect_err(field).to_string();
            assert!(e.contains(field) && e.contains("x.toml"), "{field}: {e}");
        }
        let no_relay: String = good
            .split("[[relay]]")
            .next()
            .unwrap_or_default()
            .to_string();
        let e = Config::parse(&no_relay, p)
            .expect_err("no relay")
            .to_string();
        assert!(e.contains("relay"), "{e}");
        let e = Config::parse("not toml at all [", p)
            .expect_err("syntax")
            .to_string();
        assert!(e.contains("line 1"), "{e}");
    }

    /// A fresh directory (mode 0700) for one test.
    fn scratch(label: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("meshvpn-{label}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).expect("create scratch dir");
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o700)).expect("chmod scratch");
        dir
    }

    #[test]
    fn a_config_others_may_read_is_refused_naming_file_and_mode() {
        let dir = scratch("mode-test");
        let path = sample().save(&dir).expect("save");
        for mode in [0o644, 0o640, 0o604, 0o660] {
            fs::set_permissions(&path, fs::Permissions::from_mode(mode)).expect("chmod");
            let e = Config::load(&dir, "lab").expect_err("readable by others");
            let text = e.to_string();
            assert!(matches!(e, ConfigError::Permissions { .. }), "{text}");
            assert!(
                text.contains(&path.display().to_string()) && text.contains(&format!("{mode:04o}")),
                "{text}"
            );
        }
        fs::set_permissions(&path, fs::Permissions::from_mode(0o400)).expect("chmod");
        assert!(Config::load(&dir, "lab").is_ok(), "0400 is private");
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_directory_others_may_write_is_refused() {
        let dir = scratch("dir-mode-test");
        sample().save(&dir).expect("save");
        for mode in [0o775, 0o757, 0o1777] {
            fs::set_permissions(&dir, fs::Permissions::from_mode(mode)).expect("chmod");
            let e = Config::load(&dir, "lab").expect_err("writable directory");
            assert!(e.to_string().contains(&dir.display().to_string()), "{e}");
            assert!(sample().save(&dir).is_err(), "save into {mode:o}");
        }
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).expect("chmod");
        assert!(Config::load(&dir, "lab").is_ok());
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn the_temporary_file_is_created_exclusively_and_never_followed() {
        let dir = scratch("nofollow-test");
        let victim = dir.join("victim");
        fs::write(&victim, "untouched").expect("write victim");
        let path = dir.join("lab.toml");
        let tmp = dir.join(format!(".lab.toml.tmp{}", std::process::id()));
        std::os::unix::fs::symlink(&victim, &tmp).expect("symlink");
        assert!(create_private(&tmp).is_err(), "a symlink is never opened");
        assert!(
            create_private(&victim).is_err(),
            "an existing file is never reused"
        );
        write_atomic(&path, b"new").expect("write past the stale link");
        assert_eq!(fs::read_to_string(&victim).expect("victim"), "untouched");
        assert_eq!(fs::read_to_string(&path).expect("written"), "new");
        assert!(
            fs::symlink_metadata(&tmp).is_err(),
            "no temporary file left"
        );
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn subnets_outside_private_space_are_refused() {
        for ok in [
            "10.0.0.0/8",
            "10.99.0.0/16",
            "172.16.0.0/12",
            "172.31.255.0/24",
            "192.168.7.0/24",
            "100.64.0.0/10",
            "100.127.0.0/16",
        ] {
            let net: Ipv4Net = ok.parse().expect("lit");
            assert_eq!(check_private_subnet(&net), Ok(()), "{ok}");
        }
        for bad in [
            "0.0.0.0/1",
            "0.0.0.0/0",
            "8.8.8.0/24",
            "10.0.0.0/7",
            "172.32.0.0/16",
            "192.169.0.0/16",
            "100.128.0.0/16",
            "198.51.100.0/24",
        ] {
            let net: Ipv4Net = bad.parse().expect("lit");
            let e = check_private_subnet(&net).expect_err(bad);
            assert!(e.contains(bad) && e.contains("private"), "{e}");
        }
        let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(6);
        let token = Token {
            network: "wide".into(),
            secret: NetworkSecret::generate(&mut rng),
            subnet: "0.0.0.0/1".parse().expect("lit"),
            relays: sample().relays,
        };
        let key = NodeSecret::generate(&mut rng);
        let e = Config::from_token(&token, "a".into(), key, None, 0).expect_err("public subnet");
        assert!(e.contains("0.0.0.0/1"), "{e}");
    }

    #[test]
    fn example_config_is_valid() {
        let text = include_str!("../config/example.toml");
        let c = Config::parse(text, Path::new("config/example.toml")).expect("example parses");
        assert_eq!(c.network, "example");
        assert_eq!(c.mtu, DEFAULT_MTU);
        assert!(c.tun_offload, "offload is on unless turned off");
        assert!(
            c.per_cpu_data_path,
            "per-CPU threads are on unless turned off"
        );
        assert!(c.dns, "member names are on unless turned off");
        assert_eq!(c.metrics, None, "metrics are off unless asked for");
    }

    #[test]
    fn the_metrics_address_round_trips_and_a_bad_one_names_the_field() {
        let text = include_str!("../config/example.toml");
        let path = Path::new("config/example.toml");
        let mut c = Config::parse(text, path).expect("example parses");
        c.metrics = Some("127.0.0.1:9101".parse().expect("literal"));
        let back = Config::parse(&c.to_toml(), path).expect("its own TOML parses");
        assert_eq!(back.metrics, c.metrics);
        let bad = c.to_toml().replace("127.0.0.1:9101", "localhost");
        let e = Config::parse(&bad, path).expect_err("not an ip:port");
        assert!(e.to_string().contains("node.metrics"), "{e}");
    }

    #[test]
    fn interface_names_fit() {
        assert_eq!(interface_name("demo"), "mvpn-demo");
        assert_eq!(interface_name("abcdefghij"), "mvpn-abcdefghij");
        let long = interface_name("a-very-long-network-name");
        assert!(
            long.len() <= 15 && long.starts_with("mvpn-a-very"),
            "{long}"
        );
    }
}
