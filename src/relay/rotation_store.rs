//! The relay's rotation records on disk, so that a restarted (or upgraded) relay still hands
//! members that were offline during a rotation their new secret (see `server::rotation`).
//!
//! The file is `<config dir>/relay.rotations`, mode 0600, written atomically whenever the
//! complete records change. One line per record: `r1`, the retired network id, the member
//! that uploaded it (both base64), the Unix time in milliseconds when it lapses, then each
//! sealed entry in base64, separated by spaces. The entries are sealed to their recipients;
//! the file holds nothing the relay could read. A line that does not parse is skipped with a
//! warning (a damaged file costs only the records on it, never the start).

use std::path::{Path, PathBuf};

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;

use super::server::StoredRotation;
use crate::config::write_atomic;
use crate::keys::{NetworkId, PeerKey};
use crate::wire::RotationEntry;

/// The file's name in the relay's config directory.
pub const FILE: &str = "relay.rotations";
/// Most lines read: the relay keeps at most its network cap of records anyway.
const MAX_LINES: usize = 100_000;

/// Where the records live in `config_dir`.
pub fn path(config_dir: &Path) -> PathBuf {
    config_dir.join(FILE)
}

/// The records stored at `path`; none if the file is missing.
pub fn load(path: &Path) -> Vec<StoredRotation> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) => {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!(path = %path.display(), %e, "cannot read the rotation records; starting without them");
            }
            return Vec::new();
        }
    };
    let mut out = Vec::new();
    for (i, line) in text.lines().take(MAX_LINES).enumerate() {
        match parse_line(line) {
            Some(r) => out.push(r),
            None => {
                tracing::warn!(path = %path.display(), line = i + 1, "skipping a damaged rotation record")
            }
        }
    }
    out
}

/// Writes `records` to `path` (0600, atomically).
pub fn save(path: &Path, records: &[StoredRotation]) -> std::io::Result<()> {
    write_atomic(path, render(records).as_bytes())
}

fn render(records: &[StoredRotation]) -> String {
    let mut text = String::new();
    for r in records {
        text.push_str("r1 ");
        text.push_str(&B64.encode(r.network.0));
        text.push(' ');
        text.push_str(&r.by.to_base64());
        text.push(' ');
        text.push_str(&r.expires_unix_ms.to_string());
        for e in &r.entries {
            text.push(' ');
            text.push_str(&B64.encode(e.to_bytes()));
        }
        text.push('\n');
    }
    text
}

fn parse_line(line: &str) -> Option<StoredRotation> {
    let mut words = line.split_ascii_whitespace();
    if words.next()? != "r1" {
        return None;
    }
    let network = NetworkId(B64.decode(words.next()?).ok()?.try_into().ok()?);
    let by = PeerKey::from_base64(words.next()?)?;
    let expires_unix_ms = words.next()?.parse().ok()?;
    let entries = words
        .map(|w| RotationEntry::from_bytes(&B64.decode(w).ok()?).ok())
        .collect::<Option<Vec<_>>>()?;
    Some(StoredRotation {
        network,
        by,
        expires_unix_ms,
        entries,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::rotation::SEALED_LEN;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn records_round_trip_through_a_0600_file_and_damaged_lines_are_skipped() {
        let dir = std::env::temp_dir().join(format!("meshvpn-rotations-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let file = path(&dir);
        let entry = RotationEntry {
            recipient: PeerKey([1; 32]),
            ephemeral: PeerKey([2; 32]),
            sealed: [3; SEALED_LEN],
        };
        let records = vec![
            StoredRotation {
                network: NetworkId([4; 32]),
                by: PeerKey([5; 32]),
                expires_unix_ms: 1_700_000_000_000,
                entries: vec![entry.clone(), entry],
            },
            StoredRotation {
                network: NetworkId([6; 32]),
                by: PeerKey([7; 32]),
                expires_unix_ms: 1_800_000_000_000,
                entries: Vec::new(),
            },
        ];
        save(&file, &records).expect("saves");
        let mode = std::fs::metadata(&file)
            .expect("exists")
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(load(&file), records);
        let damaged = format!("{}r1 nope\nr2 x y z\n\n", render(&records[..1]));
        std::fs::write(&file, damaged).expect("writes");
        assert_eq!(load(&file), records[..1].to_vec());
        assert!(load(&dir.join("missing")).is_empty());
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }
}
