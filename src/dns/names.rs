//! Member names: turning a chosen name into a DNS label, and deciding who holds each label.
//!
//! A member picks a free-form name (`"Alice"`, `"build box"`); DNS needs a *label*: letters,
//! digits and hyphens (the LDH rule of RFC 952/1123), 1 to 63 octets, no hyphen at either end.
//! [`label`] maps a chosen name to its label by trimming whitespace, lowercasing ASCII and
//! turning inner spaces and underscores into hyphens; anything else outside LDH is an error the
//! user sees ([`NameError`]), never silently rewritten, so two members cannot end up with the
//! same label by accident of an unexplained mapping.
//!
//! ## Uniqueness: one rule, applied by every member
//!
//! Every member resolves the same member list to the same owner of each label, with no
//! coordination, because [`resolve_names`] is a pure function of the claims and ignores their
//! order: for each label, the claim with the earliest `since` (the time, in the claimant's
//! announcement, from which it has held that name) wins, and equal `since` values are broken by
//! the smaller key. "First holder keeps the name" means a newcomer cannot take a name that is
//! already in use by choosing it; the key breaks ties so the answer never depends on arrival
//! order at a particular member. Losers get no DNS name and are listed in
//! [`NameTable::conflicts`] so `status` can say why.

use std::collections::BTreeMap;

use thiserror::Error;

/// Longest DNS label, in octets (RFC 1035 §2.3.4).
pub const MAX_LABEL_LEN: usize = 63;

/// Why a chosen name has no DNS label.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum NameError {
    /// Nothing left after trimming whitespace.
    #[error("name is empty: choose 1 to 63 letters, digits or '-'")]
    Empty,
    /// More than [`MAX_LABEL_LEN`] octets once mapped.
    #[error("name {name:?} is {len} characters long: DNS allows at most 63")]
    TooLong {
        /// The name as given.
        name: String,
        /// Its length once mapped to a label.
        len: usize,
    },
    /// A character outside letters, digits, '-', and the spaces/underscores mapped to '-'.
    #[error("name {name:?} contains {found:?}: use only letters a-z, digits 0-9 and '-'")]
    BadCharacter {
        /// The name as given.
        name: String,
        /// The first offending character.
        found: char,
    },
    /// The label would start or end with a hyphen, which DNS forbids.
    #[error("name {name:?} starts or ends with '-' (or a space/underscore): DNS forbids that")]
    EdgeHyphen {
        /// The name as given.
        name: String,
    },
}

/// Maps a member's chosen name to its DNS label (lowercase LDH, 1–63 octets) or says why not.
pub fn label(chosen: &str) -> Result<String, NameError> {
    let trimmed = chosen.trim();
    if trimmed.is_empty() {
        return Err(NameError::Empty);
    }
    let mut out = String::with_capacity(trimmed.len());
    for c in trimmed.chars() {
        let mapped = match c {
            'a'..='z' | '0'..='9' | '-' => c,
            'A'..='Z' => c.to_ascii_lowercase(),
            ' ' | '_' => '-',
            other => {
                return Err(NameError::BadCharacter {
                    name: chosen.to_owned(),
                    found: other,
                })
            }
        };
        out.push(mapped);
    }
    if out.len() > MAX_LABEL_LEN {
        return Err(NameError::TooLong {
            name: chosen.to_owned(),
            len: out.len(),
        });
    }
    if out.starts_with('-') || out.ends_with('-') {
        return Err(NameError::EdgeHyphen {
            name: chosen.to_owned(),
        });
    }
    Ok(out)
}

/// One member's claim on a name, as its announcement states it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NameClaim<K> {
    /// The member's identity (its public key in the agent); the tie-breaker.
    pub key: K,
    /// The name as the member chose it (mapped through [`label`]).
    pub name: String,
    /// When the member started holding this name (seconds, from its announcement); earlier wins.
    pub since: u64,
}

/// A claim that lost its label, or had none.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NameConflict<K> {
    /// The label is held by another member that claimed it earlier (or at the same time with a
    /// smaller key).
    Taken {
        /// The member that asked for the label.
        key: K,
        /// The label it asked for.
        label: String,
        /// The member that holds it.
        holder: K,
    },
    /// The chosen name is not a valid label.
    Invalid {
        /// The member that asked.
        key: K,
        /// Why its name was refused.
        error: NameError,
    },
}

/// The outcome of [`resolve_names`]: who holds which label, and who got none.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NameTable<K> {
    /// Each label and the key that holds it, in label order.
    pub holders: BTreeMap<String, K>,
    /// Every claim that did not get its label, sorted by key then label.
    pub conflicts: Vec<NameConflict<K>>,
}

/// Resolves claims to label holders by the network-wide rule (see the module doc).
///
/// The result does not depend on the order of `claims`. A key that appears in several claims
/// is treated as several claimants; callers pass one claim per member.
pub fn resolve_names<K, I>(claims: I) -> NameTable<K>
where
    K: Ord + Clone,
    I: IntoIterator<Item = NameClaim<K>>,
{
    let mut by_label: BTreeMap<String, Vec<(u64, K)>> = BTreeMap::new();
    let mut conflicts = Vec::new();
    for claim in claims {
        match label(&claim.name) {
            Ok(l) => by_label
                .entry(l)
                .or_default()
                .push((claim.since, claim.key)),
            Err(error) => conflicts.push(NameConflict::Invalid {
                key: claim.key,
                error,
            }),
        }
    }
    let mut holders = BTreeMap::new();
    for (l, mut claimants) in by_label {
        claimants.sort();
        let mut iter = claimants.into_iter();
        let Some((_, holder)) = iter.next() else {
            continue;
        };
        for (_, key) in iter {
            conflicts.push(NameConflict::Taken {
                key,
                label: l.clone(),
                holder: holder.clone(),
            });
        }
        holders.insert(l, holder);
    }
    conflicts.sort_by(|a, b| conflict_order(a).cmp(&conflict_order(b)));
    NameTable { holders, conflicts }
}

/// Sort key of a conflict: by key, then label (invalid names sort first for a key).
fn conflict_order<K>(c: &NameConflict<K>) -> (&K, &str) {
    match c {
        NameConflict::Taken { key, label, .. } => (key, label.as_str()),
        NameConflict::Invalid { key, .. } => (key, ""),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn labels_are_lowercase_ldh() {
        assert_eq!(label("Alice").as_deref(), Ok("alice"));
        assert_eq!(label("  build box ").as_deref(), Ok("build-box"));
        assert_eq!(label("node_7").as_deref(), Ok("node-7"));
        assert_eq!(label("a").as_deref(), Ok("a"));
        assert_eq!(label("x-1-y").as_deref(), Ok("x-1-y"));
        assert_eq!(label(&"a".repeat(63)).map(|l| l.len()), Ok(63));
    }

    #[test]
    fn bad_names_are_refused_with_a_reason() {
        assert_eq!(label(""), Err(NameError::Empty));
        assert_eq!(label("   "), Err(NameError::Empty));
        assert!(matches!(
            label(&"a".repeat(64)),
            Err(NameError::TooLong { len: 64, .. })
        ));
        assert!(matches!(label("-x"), Err(NameError::EdgeHyphen { .. })));
        assert!(matches!(label("x_"), Err(NameError::EdgeHyphen { .. })));
        assert!(matches!(
            label("a.b"),
            Err(NameError::BadCharacter { found: '.', .. })
        ));
        assert!(matches!(
            label("zoë"),
            Err(NameError::BadCharacter { found: 'ë', .. })
        ));
        assert!(matches!(
            label("a\u{0}b"),
            Err(NameError::BadCharacter { .. })
        ));
        let msg = label("a.b")
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(msg.contains("a-z"), "{msg}");
    }

    fn claim(key: u8, name: &str, since: u64) -> NameClaim<u8> {
        NameClaim {
            key,
            name: name.to_owned(),
            since,
        }
    }

    #[test]
    fn first_holder_keeps_the_name() {
        let t = resolve_names([claim(1, "alice", 200), claim(9, "Alice", 100)]);
        assert_eq!(t.holders.get("alice"), Some(&9));
        assert_eq!(
            t.conflicts,
            vec![NameConflict::Taken {
                key: 1,
                label: "alice".into(),
                holder: 9
            }]
        );
    }

    #[test]
    fn equal_since_is_broken_by_the_smaller_key() {
        let t = resolve_names([claim(7, "bob", 5), claim(3, "BOB", 5), claim(5, "bob", 5)]);
        assert_eq!(t.holders.get("bob"), Some(&3));
        assert_eq!(t.conflicts.len(), 2);
    }

    #[test]
    fn invalid_names_are_listed_not_held() {
        let t = resolve_names([claim(1, "ok", 0), claim(2, "no.dots", 0)]);
        assert_eq!(t.holders.len(), 1);
        assert!(matches!(
            t.conflicts.as_slice(),
            [NameConflict::Invalid { key: 2, .. }]
        ));
    }

    proptest! {
        #[test]
        fn resolution_ignores_claim_order(
            raw in proptest::collection::vec((0u8..16, 0usize..4, 0u64..3), 0..24),
            seed in any::<u64>(),
        ) {
            let names = ["a", "B", "c", "bad.name"];
            let claims: Vec<_> = raw.iter().map(|&(k, n, s)| claim(k, names[n], s)).collect();
            let mut shuffled = claims.clone();
            // A deterministic permutation from the seed.
            let len = shuffled.len();
            let mut x = seed;
            for i in (1..len).rev() {
                x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                let j = (x >> 33) as usize % (i + 1);
                shuffled.swap(i, j);
            }
            let a = resolve_names(claims.clone());
            let b = resolve_names(shuffled);
            prop_assert_eq!(&a, &b);
            // Every claim is either a holder or a conflict, and labels are held once.
            let held = a.holders.len();
            prop_assert_eq!(held + a.conflicts.len(), claims.len());
        }

        #[test]
        fn label_never_panics_and_is_dns_safe(s in ".{0,80}") {
            if let Ok(l) = label(&s) {
                prop_assert!(!l.is_empty() && l.len() <= MAX_LABEL_LEN);
                prop_assert!(l.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-'));
                prop_assert!(!l.starts_with('-') && !l.ends_with('-'));
            }
        }
    }
}
