//! The control socket: a Unix stream socket per network (`<run-dir>/<network>.sock`, mode 0600)
//! over which `meshvpn status`, `ping`, `peers`, `netcheck` and `down` talk to the running agent.
//!
//! Protocol: the client sends one request line, the agent answers with one line of JSON and
//! closes the connection. Requests: `status`; `ping <peer>` (peer = node name or virtual IP),
//! answered with a [`PingReply`]; `down`, answered with `{"ok":true}` before the agent leaves;
//! `rotate` and `rotate without <member>` (name, virtual IP or public key), answered with a
//! [`RotateReply`] once the relay holds the rotation (within [`ROTATE_TIMEOUT`]).

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context as _;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

use crate::status::NetworkStatus;

/// How long a client waits for the agent's answer (a ping may take up to [`PING_TIMEOUT`]).
const CLIENT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a client waits for a rotation: the node gives up after
/// [`crate::node::ROTATE_GIVE_UP`] and answers, so a little more than that.
pub const ROTATE_TIMEOUT: Duration = Duration::from_secs(20);
/// How long the agent waits for a pong before answering a ping request with a timeout.
pub const PING_TIMEOUT: Duration = Duration::from_secs(3);

/// The control socket path of `network` in `run_dir`.
pub fn socket_path(run_dir: &Path, network: &str) -> PathBuf {
    run_dir.join(format!("{network}.sock"))
}

/// A request on the control socket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// A status snapshot.
    Status,
    /// Ping a peer (by node name or virtual IP) once on its current path.
    Ping(String),
    /// Leave the network and stop the agent.
    Down,
    /// Rotate the network secret, handing the new one to every member but `exclude`.
    Rotate { exclude: Option<String> },
}

impl Request {
    /// Parses a request line.
    pub fn parse(line: &str) -> Option<Self> {
        let line = line.trim();
        match line.split_once(' ') {
            Some(("ping", peer)) if !peer.trim().is_empty() => {
                Some(Request::Ping(peer.trim().to_string()))
            }
            Some(("rotate", rest)) => match rest.trim().split_once(' ') {
                Some(("without", member)) if !member.trim().is_empty() => Some(Request::Rotate {
                    exclude: Some(member.trim().to_string()),
                }),
                _ => None,
            },
            Some(_) => None,
            None => match line {
                "status" => Some(Request::Status),
                "down" => Some(Request::Down),
                "rotate" => Some(Request::Rotate { exclude: None }),
                _ => None,
            },
        }
    }

    /// The request line.
    pub fn to_line(&self) -> String {
        match self {
            Request::Status => "status\n".into(),
            Request::Ping(peer) => format!("ping {peer}\n"),
            Request::Down => "down\n".into(),
            Request::Rotate { exclude: None } => "rotate\n".into(),
            Request::Rotate {
                exclude: Some(member),
            } => format!("rotate without {member}\n"),
        }
    }
}

/// The answer to a ping request.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PingReply {
    /// The peer's node name.
    pub peer: String,
    /// Whether a pong came back within [`PING_TIMEOUT`].
    pub ok: bool,
    /// `"direct"`, `"relay"`, `"relay-tcp"` or `"relay-tls"`.
    pub path: Option<String>,
    /// Where the pong came from when direct.
    pub endpoint: Option<String>,
    /// Round-trip time in milliseconds.
    pub rtt_ms: Option<f64>,
    /// Why the ping failed, if it did.
    pub error: Option<String>,
}

/// The answer to a rotate request.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RotateReply {
    /// Whether the rotation finished (the relay holds it and this agent switched).
    pub ok: bool,
    /// The network's new group token.
    pub token: Option<String>,
    /// Why it failed, if it did.
    pub error: Option<String>,
}

/// A failed [`RotateReply`] as one line of JSON.
pub fn error_reply(message: &str) -> String {
    let reply = RotateReply {
        ok: false,
        token: None,
        error: Some(message.to_string()),
    };
    serde_json::to_string(&reply).unwrap_or_default()
}

/// How a one-line exchange on a control socket failed.
#[derive(Debug)]
pub enum ExchangeError {
    /// Nothing listens on the socket (no such file, or connection refused).
    NotRunning,
    /// No answer within the timeout.
    TimedOut,
    /// Another I/O error.
    Io(std::io::Error),
}

/// Connects to the Unix socket at `path`, writes `request` (one line, with its newline) and
/// reads one line back, all within `timeout`.
pub async fn exchange_line(
    path: &Path,
    request: &[u8],
    timeout: Duration,
) -> Result<String, ExchangeError> {
    let answer = tokio::time::timeout(timeout, async {
        let mut stream = UnixStream::connect(path).await?;
        stream.write_all(request).await?;
        let mut line = String::new();
        BufReader::new(stream).read_line(&mut line).await?;
        Ok::<_, std::io::Error>(line)
    })
    .await;
    match answer {
        Err(_) => Err(ExchangeError::TimedOut),
        Ok(Err(e))
            if matches!(
                e.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
            ) =>
        {
            Err(ExchangeError::NotRunning)
        }
        Ok(Err(e)) => Err(ExchangeError::Io(e)),
        Ok(Ok(line)) => Ok(line),
    }
}

/// Why the agent of a network could not be asked: what `meshvpn` turns into its exit status
/// (see `meshvpn(1)`, EXIT STATUS).
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// No agent listens: no socket file, or nothing accepts on it.
    #[error("the agent of network {network:?} is not running (no control socket at {}); start it with `meshvpn up {network}`", path.display())]
    NotRunning {
        /// The network asked about.
        network: String,
        /// Its control socket path.
        path: PathBuf,
    },
    /// The socket (or the directory holding it) may not be opened by this user.
    #[error("cannot open the control socket {}: permission denied; {need}", path.display())]
    PermissionDenied {
        /// The control socket path.
        path: PathBuf,
        /// What the user needs, in words (root, or the socket's group).
        need: String,
    },
    /// The agent accepted but did not answer in time.
    #[error("the agent of network {network:?} did not answer on {} within {timeout:?}", path.display())]
    TimedOut {
        /// The network asked about.
        network: String,
        /// Its control socket path.
        path: PathBuf,
        /// How long the client waited.
        timeout: Duration,
    },
    /// The agent closed the connection without a line.
    #[error("the agent on {} closed the connection without an answer", path.display())]
    NoAnswer {
        /// The control socket path.
        path: PathBuf,
    },
    /// Another I/O error.
    #[error("talking to the agent on {}", path.display())]
    Io {
        /// The control socket path.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
}

/// Sends `request` to the agent of `network` and returns its one-line answer.
pub async fn ask(run_dir: &Path, network: &str, request: &Request) -> Result<String, ControlError> {
    let path = socket_path(run_dir, network);
    let timeout = match request {
        Request::Rotate { .. } => ROTATE_TIMEOUT,
        Request::Status | Request::Ping(_) | Request::Down => CLIENT_TIMEOUT,
    };
    match exchange_line(&path, request.to_line().as_bytes(), timeout).await {
        Err(ExchangeError::TimedOut) => Err(ControlError::TimedOut {
            network: network.to_string(),
            path,
            timeout,
        }),
        Err(ExchangeError::NotRunning) => Err(ControlError::NotRunning {
            network: network.to_string(),
            path,
        }),
        Err(ExchangeError::Io(e)) if e.kind() == std::io::ErrorKind::PermissionDenied => {
            let need = socket_access_need(&path);
            Err(ControlError::PermissionDenied { path, need })
        }
        Err(ExchangeError::Io(source)) => Err(ControlError::Io { path, source }),
        Ok(line) if line.trim().is_empty() => Err(ControlError::NoAnswer { path }),
        Ok(line) => Ok(line),
    }
}

/// What a user refused access to the control socket at `path` needs, in words.
///
/// The agent creates its socket owner-only (mode 0600, root's): the control protocol does not
/// tell read-only requests (`status`) from ones that change the network (`down`, `rotate`,
/// `kick`), so no group gets it. A socket an administrator opened to a group (by `chgrp` and
/// `chmod g+rw`) is named with that group.
fn socket_access_need(path: &Path) -> String {
    use std::os::unix::fs::MetadataExt as _;
    match std::fs::metadata(path) {
        Ok(m) if m.mode() & 0o060 == 0o060 && m.gid() != 0 => format!(
            "run as root (e.g. with sudo) or as a member of group {}, which owns it",
            group_name(m.gid()).unwrap_or_else(|| m.gid().to_string())
        ),
        Ok(_) | Err(_) => {
            "run as root (e.g. with sudo): only root may talk to the agent".to_string()
        }
    }
}

/// The name of group `gid` from /etc/group, if listed.
fn group_name(gid: u32) -> Option<String> {
    let groups = std::fs::read_to_string("/etc/group").ok()?;
    groups.lines().find_map(|line| {
        let mut fields = line.split(':');
        let name = fields.next()?;
        let id = fields.nth(1)?.parse::<u32>().ok()?;
        (id == gid).then(|| name.to_string())
    })
}

/// Asks the agent of `network` for its status.
pub async fn query_status(run_dir: &Path, network: &str) -> anyhow::Result<NetworkStatus> {
    let line = ask(run_dir, network, &Request::Status).await?;
    serde_json::from_str(&line)
        .with_context(|| format!("the agent of network {network:?} sent an unreadable answer"))
}

/// Whether an agent answers on `network`'s control socket.
pub async fn is_running(run_dir: &Path, network: &str) -> bool {
    query_status(run_dir, network).await.is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip() {
        for r in [
            Request::Status,
            Request::Down,
            Request::Ping("bob".into()),
            Request::Ping("10.1.2.3".into()),
            Request::Rotate { exclude: None },
            Request::Rotate {
                exclude: Some("bob".into()),
            },
        ] {
            assert_eq!(Request::parse(&r.to_line()), Some(r));
        }
        assert_eq!(Request::parse("ping"), None);
        assert_eq!(Request::parse("ping "), None);
        assert_eq!(Request::parse("reboot now"), None);
        assert_eq!(Request::parse("rotate bob"), None);
        assert_eq!(Request::parse("rotate without "), None);
        assert_eq!(Request::parse(""), None);
    }
}
