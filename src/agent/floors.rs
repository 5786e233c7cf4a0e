//! The announcement floors a member keeps across restarts: the highest announcement
//! timestamp it has seen per member, so a relay replaying a departed member's older
//! announcement to a freshly started agent is refused (see the node's membership module).
//!
//! The file is `<config dir>/<network>.seen`, mode 0600, written atomically; one line per
//! member: the base64 public key, a space, the timestamp in milliseconds. Lines that do not
//! parse are skipped (a damaged file costs only the protection it held, never the start).

use std::path::{Path, PathBuf};

use crate::config::write_atomic;
use crate::keys::PeerKey;

/// Most lines read from the file: the node keeps no more floors than this anyway, and a
/// file grown by other means must not cost unbounded memory at start.
const MAX_LINES: usize = 16_384;

/// Where network `network` keeps its floors in `dir`.
pub(crate) fn path(dir: &Path, network: &str) -> PathBuf {
    dir.join(format!("{network}.seen"))
}

/// The floors stored at `path`; none if the file is missing or unreadable.
pub(crate) fn load(path: &Path) -> Vec<(PeerKey, u64)> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) => {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!(path = %path.display(), %e, "cannot read the announcement floors; starting without them");
            }
            return Vec::new();
        }
    };
    parse(&text)
}

/// Writes `floors` to `path` (0600, atomically).
pub(crate) fn save(path: &Path, floors: &[(PeerKey, u64)]) -> std::io::Result<()> {
    write_atomic(path, render(floors).as_bytes())
}

/// The file's lines, skipping any that do not parse.
fn parse(text: &str) -> Vec<(PeerKey, u64)> {
    text.lines()
        .take(MAX_LINES)
        .filter_map(|line| {
            let (key, ts) = line.split_once(' ')?;
            Some((PeerKey::from_base64(key)?, ts.trim().parse().ok()?))
        })
        .collect()
}

/// The file's text for `floors`.
fn render(floors: &[(PeerKey, u64)]) -> String {
    floors
        .iter()
        .map(|(k, ts)| format!("{} {ts}\n", k.to_base64()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn floors_round_trip_through_a_0600_file_and_garbage_is_skipped() {
        let dir = std::env::temp_dir().join(format!("meshvpn-floors-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let file = path(&dir, "lab");
        let floors = vec![(PeerKey([1; 32]), 5), (PeerKey([2; 32]), 1_700_000_000_000)];
        save(&file, &floors).expect("saves");
        let mode = std::fs::metadata(&file)
            .expect("exists")
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(load(&file), floors);
        let damaged = format!(
            "{}not a line\nxx 5\n{} nan\n",
            render(&floors[..1]),
            PeerKey([3; 32]).to_base64()
        );
        assert_eq!(parse(&damaged), floors[..1].to_vec());
        assert!(load(&dir.join("missing.seen")).is_empty());
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }
}
