//! The control socket: a Unix stream socket per network (`<run-dir>/<network>.sock`, mode 0600)
//! over which `meshvpn status` asks the running agent for a snapshot.
//!
//! Protocol: the client sends one request line (`status`), the agent answers with one line of
//! JSON and closes the connection.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context as _};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

use crate::status::Status;

/// How long a client waits for the agent's answer.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(5);

/// The control socket path of `network` in `run_dir`.
pub fn socket_path(run_dir: &Path, network: &str) -> PathBuf {
    run_dir.join(format!("{network}.sock"))
}

/// A request on the control socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Request {
    /// A status snapshot.
    Status,
}

impl Request {
    /// Parses a request line.
    pub fn parse(line: &str) -> Option<Self> {
        match line.trim() {
            "status" => Some(Request::Status),
            _ => None,
        }
    }
}

/// Asks the agent of `network` for its status.
pub async fn query_status(run_dir: &Path, network: &str) -> anyhow::Result<Status> {
    let path = socket_path(run_dir, network);
    let answer = tokio::time::timeout(CLIENT_TIMEOUT, async {
        let mut stream = UnixStream::connect(&path).await?;
        stream.write_all(b"status\n").await?;
        let mut line = String::new();
        BufReader::new(stream).read_line(&mut line).await?;
        Ok::<_, std::io::Error>(line)
    })
    .await;
    let line = match answer {
        Err(_) => bail!(
            "the agent of network {network:?} did not answer on {} within {CLIENT_TIMEOUT:?}",
            path.display()
        ),
        Ok(Err(e))
            if matches!(
                e.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
            ) =>
        {
            bail!("the agent of network {network:?} is not running (no control socket at {}); start it with `meshvpn up {network}`", path.display())
        }
        Ok(Err(e)) => {
            return Err(e).with_context(|| format!("talking to the agent on {}", path.display()))
        }
        Ok(Ok(line)) => line,
    };
    serde_json::from_str(&line)
        .with_context(|| format!("the agent on {} sent an unreadable answer", path.display()))
}
