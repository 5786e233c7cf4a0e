//! The members an agent remembers across a restart (see the node's `helping` module): the
//! file is `<config dir>/<network>.peers`, mode 0600, written atomically; one line per member:
//! its base64 public key, the address it was last reached at (its direct path, else where the
//! relay saw it) and its sealed announcement in base64. The announcements open only with the
//! network's control key, so the file holds nothing a member of another network could use,
//! and nothing in it can introduce a member the network did not announce. Lines that do not
//! parse are skipped: a damaged file costs the memory, never the start.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;

use crate::config::write_atomic;
use crate::keys::PeerKey;
use crate::wire::{MemberEntry, MAX_ANNOUNCEMENT};

/// Most members read back: the node keeps no more than a relay's member cap anyway.
const MAX_LINES: usize = 4096;

/// Where network `network` keeps its remembered members in `dir`.
pub(crate) fn path(dir: &Path, network: &str) -> PathBuf {
    dir.join(format!("{network}.peers"))
}

/// The members remembered at `path`; none if the file is missing or unreadable.
pub(crate) fn load(path: &Path) -> Vec<MemberEntry> {
    match std::fs::read_to_string(path) {
        Ok(text) => parse(&text),
        Err(e) => {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!(path = %path.display(), %e, "cannot read the remembered members; starting without them");
            }
            Vec::new()
        }
    }
}

/// Writes `entries` to `path` (0600, atomically).
pub(crate) fn save(path: &Path, entries: &[MemberEntry]) -> std::io::Result<()> {
    write_atomic(path, render(entries).as_bytes())
}

/// The file's text for `entries`.
pub(crate) fn render(entries: &[MemberEntry]) -> String {
    let mut sorted: Vec<&MemberEntry> = entries.iter().collect();
    sorted.sort_by_key(|e| e.key);
    sorted
        .iter()
        .map(|e| {
            format!(
                "{} {} {}\n",
                e.key.to_base64(),
                e.observed,
                B64.encode(&e.announcement)
            )
        })
        .collect()
}

/// The file's entries, skipping lines that do not parse.
fn parse(text: &str) -> Vec<MemberEntry> {
    text.lines()
        .take(MAX_LINES)
        .filter_map(|line| {
            let mut fields = line.split(' ');
            let key = PeerKey::from_base64(fields.next()?)?;
            let observed: SocketAddr = fields.next()?.parse().ok()?;
            let announcement = B64.decode(fields.next()?.trim()).ok()?;
            if fields.next().is_some() || announcement.len() > MAX_ANNOUNCEMENT {
                return None;
            }
            Some(MemberEntry {
                key,
                observed,
                announcement,
                since: 0,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(n: u8) -> MemberEntry {
        MemberEntry {
            key: PeerKey([n; 32]),
            observed: format!("198.51.100.{n}:41641").parse().expect("literal"),
            announcement: vec![n; 40 + usize::from(n)],
            since: 0,
        }
    }

    #[test]
    fn entries_round_trip_and_damaged_lines_are_skipped() {
        let entries = vec![entry(2), entry(1)];
        let text = render(&entries);
        let mut back = parse(&text);
        back.sort_by_key(|e| e.key);
        assert_eq!(back, vec![entry(1), entry(2)]);
        let damaged = format!(
            "{text}garbage\nAAAA 1.2.3.4:5 AAAA\n{} not-an-address AAAA\n{} 1.2.3.4:5 !!!\n{} 1.2.3.4:5 AAAA extra\n",
            entry(3).key.to_base64(),
            entry(3).key.to_base64(),
            entry(3).key.to_base64()
        );
        assert_eq!(parse(&damaged).len(), 2, "only the two good lines");
        let huge = format!(
            "{} 1.2.3.4:5 {}\n",
            entry(4).key.to_base64(),
            B64.encode(vec![0u8; MAX_ANNOUNCEMENT + 1])
        );
        assert!(
            parse(&huge).is_empty(),
            "an oversized announcement is refused"
        );
    }

    #[test]
    fn a_missing_file_is_no_members() {
        let dir = std::env::temp_dir().join(format!("meshvpn-remembered-{}", std::process::id()));
        assert!(load(&dir.join("none.peers")).is_empty());
    }
}
