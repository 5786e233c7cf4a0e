//! The relay's control socket: `<run-dir>/relay.ctl`, a Unix stream socket (mode 0600) over
//! which `meshvpn relay-status` reads a [`RelayStatus`].
//!
//! Protocol, as for the member agent's socket ([`crate::control`]): the client sends one
//! request line, the relay answers with one line of JSON and closes. The only request is
//! `status`. The name does not end in `.sock`, so it never meets an agent's
//! `<network>.sock` when a relay and agents share a run directory.
//!
//! The listener runs in its own task and hands each request to the relay's loop (which owns
//! every counter) over a channel, so answering never races the loop.

use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context as _};
use tokio::io::{AsyncBufReadExt, AsyncReadExt as _, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, oneshot};

use super::status::RelayStatus;

/// File name of the control socket in the run directory.
pub const SOCKET_NAME: &str = "relay.ctl";
/// How long either side waits for the other: a status is built in microseconds, so a client
/// that sends nothing for this long is gone or hostile.
const TIMEOUT: Duration = Duration::from_secs(5);
/// Pause after a failed accept (e.g. out of descriptors), so the task never spins.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);
/// Longest request line read (the only request is `status`).
const MAX_REQUEST: u64 = 64;

/// A status request for the relay's loop: answer on the sender.
pub type StatusRequest = oneshot::Sender<RelayStatus>;

/// The control socket path in `run_dir`.
pub fn socket_path(run_dir: &Path) -> PathBuf {
    run_dir.join(SOCKET_NAME)
}

/// Binds the control socket in `run_dir` (created 0755 if missing), replacing a stale one; fails
/// if another relay answers on it.
pub async fn bind(run_dir: &Path) -> anyhow::Result<UnixListener> {
    if !run_dir.exists() {
        std::fs::create_dir_all(run_dir)
            .with_context(|| format!("creating run directory {}", run_dir.display()))?;
        std::fs::set_permissions(run_dir, std::fs::Permissions::from_mode(0o755))
            .with_context(|| format!("setting permissions of {}", run_dir.display()))?;
    }
    let path = socket_path(run_dir);
    if path.exists() {
        if UnixStream::connect(&path).await.is_ok() {
            bail!(
                "another relay is running with this run directory (control socket {} answers); pass a different --run-dir",
                path.display()
            );
        }
        std::fs::remove_file(&path)
            .with_context(|| format!("removing stale control socket {}", path.display()))?;
    }
    let listener = UnixListener::bind(&path)
        .with_context(|| format!("binding control socket {}", path.display()))?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("setting permissions of {}", path.display()))?;
    Ok(listener)
}

/// Serves the control socket until the relay's loop is gone.
pub async fn serve(listener: UnixListener, requests: mpsc::Sender<StatusRequest>) {
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                tracing::debug!(%e, "control socket accept failed");
                tokio::time::sleep(ACCEPT_BACKOFF).await;
                continue;
            }
        };
        if requests.is_closed() {
            return;
        }
        let requests = requests.clone();
        tokio::spawn(async move {
            if let Err(e) = answer(stream, requests).await {
                tracing::debug!(%e, "control socket client");
            }
        });
    }
}

async fn answer(stream: UnixStream, requests: mpsc::Sender<StatusRequest>) -> anyhow::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut line = String::new();
    tokio::time::timeout(
        TIMEOUT,
        BufReader::new(read.take(MAX_REQUEST)).read_line(&mut line),
    )
    .await
    .context("no request in time")??;
    if line.trim() != "status" {
        write
            .write_all(b"{\"error\":\"unknown request\"}\n")
            .await?;
        return Ok(());
    }
    let (tx, rx) = oneshot::channel();
    requests.send(tx).await.context("relay loop gone")?;
    let status = tokio::time::timeout(TIMEOUT, rx)
        .await
        .context("relay loop did not answer")??;
    let mut json = serde_json::to_vec(&status)?;
    json.push(b'\n');
    tokio::time::timeout(TIMEOUT, write.write_all(&json))
        .await
        .context("client does not read")??;
    Ok(())
}

/// Asks the relay whose run directory is `run_dir` for its status.
pub async fn query_status(run_dir: &Path) -> anyhow::Result<RelayStatus> {
    let path = socket_path(run_dir);
    let answer = tokio::time::timeout(TIMEOUT, async {
        let mut stream = UnixStream::connect(&path).await?;
        stream.write_all(b"status\n").await?;
        let mut line = String::new();
        BufReader::new(stream).read_line(&mut line).await?;
        Ok::<_, std::io::Error>(line)
    })
    .await;
    match answer {
        Err(_) => bail!(
            "the relay did not answer on {} within {TIMEOUT:?}",
            path.display()
        ),
        Ok(Err(e))
            if matches!(
                e.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
            ) =>
        {
            bail!(
                "no relay is running with this run directory (no control socket at {}); pass the relay's --run-dir",
                path.display()
            )
        }
        Ok(Err(e)) => Err(e).with_context(|| format!("talking to the relay on {}", path.display())),
        Ok(Ok(line)) => serde_json::from_str(&line)
            .with_context(|| format!("the relay on {} sent an unreadable answer", path.display())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fresh directory under the system temp dir, removed on drop.
    struct TempDir(PathBuf);

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    #[tokio::test]
    async fn status_is_served_on_a_private_socket() {
        let dir = TempDir(
            std::env::temp_dir().join(format!("meshvpn-relay-control-{}", std::process::id())),
        );
        let run_dir = dir.0.join("run");
        let listener = bind(&run_dir).await.expect("bind");
        let mode = std::fs::metadata(socket_path(&run_dir))
            .expect("socket exists")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let (tx, mut rx) = mpsc::channel::<StatusRequest>(1);
        let server = tokio::spawn(serve(listener, tx));
        let relay_loop = tokio::spawn(async move {
            while let Some(reply) = rx.recv().await {
                let _ = reply.send(crate::relay::status::sample());
            }
        });
        let status = query_status(&run_dir).await.expect("status");
        assert_eq!(status, crate::relay::status::sample());
        let err = bind(&run_dir)
            .await
            .expect_err("a second relay must not start");
        assert!(err.to_string().contains("another relay"), "{err:#}");
        server.abort();
        relay_loop.abort();
        let _ = server.await;
        let err = query_status(&dir.0.join("elsewhere"))
            .await
            .expect_err("no relay there");
        assert!(err.to_string().contains("no relay is running"), "{err:#}");
    }
}
