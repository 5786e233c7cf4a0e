//! Exit statuses of the `meshvpn` command, and the typed failures that carry them to `main`.
//!
//! Scripts branch on these numbers, so each keeps its meaning once released:
//!
//! | code | meaning |
//! |---|---|
//! | 0 | success |
//! | 1 | any other error |
//! | 2 | usage: clap's own errors, and a command line that does not say enough (no network named while several are configured) |
//! | 3 | the agent of the network is not running (no control socket, or nothing accepts on it) |
//! | 4 | permission denied (the control socket, the config directory or the TUN device needs root) |
//! | 5 | the peer did not answer `meshvpn ping`, or no member has that name or address |
//!
//! A command fails with an `anyhow::Error`; [`ExitCode::of`] walks its chain of causes for
//! the first typed cause it knows ([`Failure`], [`ControlError`], [`ConfigError`], an I/O
//! permission error) and picks the code from it, so context added on the way up never
//! changes the code.

use std::path::PathBuf;

use crate::config::ConfigError;
use crate::control::ControlError;

/// The exit status of a `meshvpn` command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitCode {
    /// 0: the command did what it was asked.
    Success,
    /// 1: any error without a code of its own.
    Error,
    /// 2: the command line is wrong or incomplete.
    Usage,
    /// 3: the network's agent is not running.
    NotRunning,
    /// 4: this user may not do that (root needed).
    PermissionDenied,
    /// 5: the peer did not answer, or is not a member.
    PeerUnreachable,
}

impl ExitCode {
    /// Every code, in numeric order.
    pub const ALL: [ExitCode; 6] = [
        ExitCode::Success,
        ExitCode::Error,
        ExitCode::Usage,
        ExitCode::NotRunning,
        ExitCode::PermissionDenied,
        ExitCode::PeerUnreachable,
    ];

    /// The number the process exits with.
    pub fn code(self) -> u8 {
        match self {
            ExitCode::Success => 0,
            ExitCode::Error => 1,
            ExitCode::Usage => 2,
            ExitCode::NotRunning => 3,
            ExitCode::PermissionDenied => 4,
            ExitCode::PeerUnreachable => 5,
        }
    }

    /// What the code means, one line (for the man page and `--help`).
    pub fn meaning(self) -> &'static str {
        match self {
            ExitCode::Success => "success",
            ExitCode::Error => "an error without a code of its own (the message on stderr says which)",
            ExitCode::Usage => "usage: an unknown option or a missing argument, or no network named while several are configured",
            ExitCode::NotRunning => "the agent of the network is not running (no control socket, or nothing accepts on it)",
            ExitCode::PermissionDenied => "permission denied: the control socket, the config directory or the TUN device needs root",
            ExitCode::PeerUnreachable => "the peer did not answer `meshvpn ping`, or no member has that name or virtual IP",
        }
    }

    /// The code for a failed command: from the first cause in `err`'s chain that has one.
    pub fn of(err: &anyhow::Error) -> ExitCode {
        err.chain()
            .find_map(|cause| {
                if let Some(f) = cause.downcast_ref::<Failure>() {
                    return Some(f.exit_code());
                }
                if let Some(c) = cause.downcast_ref::<ControlError>() {
                    return match c {
                        ControlError::NotRunning { .. } => Some(ExitCode::NotRunning),
                        ControlError::PermissionDenied { .. } => Some(ExitCode::PermissionDenied),
                        ControlError::TimedOut { .. }
                        | ControlError::NoAnswer { .. }
                        | ControlError::Io { .. } => None,
                    };
                }
                if let Some(ConfigError::Permissions { .. }) = cause.downcast_ref::<ConfigError>() {
                    // A config others may read is the owner's mistake, not this user's rights.
                    return Some(ExitCode::Error);
                }
                cause
                    .downcast_ref::<std::io::Error>()
                    .filter(|e| e.kind() == std::io::ErrorKind::PermissionDenied)
                    .map(|_| ExitCode::PermissionDenied)
            })
            .unwrap_or(ExitCode::Error)
    }
}

/// A failure with its own exit code, raised by the commands themselves.
#[derive(Debug, thiserror::Error)]
pub enum Failure {
    /// The command line does not say enough (exit 2).
    #[error("{0}")]
    Usage(String),
    /// No agent runs for the network(s) asked about (exit 3).
    #[error("{0}")]
    NotRunning(String),
    /// This user may not do it (exit 4).
    #[error("{what}: permission denied; {need}")]
    PermissionDenied {
        /// What was refused ("reading /etc/meshvpn").
        what: String,
        /// What is needed, in words.
        need: String,
    },
    /// The peer did not answer, or is no member (exit 5).
    #[error("{0}")]
    PeerUnreachable(String),
}

impl Failure {
    /// Its exit code.
    pub fn exit_code(&self) -> ExitCode {
        match self {
            Failure::Usage(_) => ExitCode::Usage,
            Failure::NotRunning(_) => ExitCode::NotRunning,
            Failure::PermissionDenied { .. } => ExitCode::PermissionDenied,
            Failure::PeerUnreachable(_) => ExitCode::PeerUnreachable,
        }
    }
}

/// Fails with [`Failure::PermissionDenied`] when `dir` exists but this user may not list it
/// (the config directory is root's, mode 0700): the network list would otherwise look empty.
pub(super) fn check_readable_dir(dir: &std::path::Path) -> Result<(), Failure> {
    match std::fs::read_dir(dir) {
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
            Err(Failure::PermissionDenied {
                what: format!("reading {}", PathBuf::from(dir).display()),
                need: "run as root (e.g. with sudo): the config directory holds keys and is root's"
                    .into(),
            })
        }
        Ok(_) | Err(_) => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use anyhow::Context as _;

    #[test]
    fn codes_are_distinct_and_in_order() {
        let codes: Vec<u8> = ExitCode::ALL.iter().map(|c| c.code()).collect();
        assert_eq!(codes, [0, 1, 2, 3, 4, 5]);
    }

    #[test]
    fn the_first_typed_cause_decides_whatever_context_wraps_it() {
        let not_running = anyhow::Error::new(ControlError::NotRunning {
            network: "n".into(),
            path: "/run/meshvpn/n.sock".into(),
        })
        .context("asking for the status");
        assert_eq!(ExitCode::of(&not_running), ExitCode::NotRunning);

        let denied: anyhow::Result<()> =
            Err(std::io::Error::from(std::io::ErrorKind::PermissionDenied))
                .context("reading /etc/meshvpn/n.toml");
        let denied = denied.expect_err("an error");
        assert_eq!(ExitCode::of(&denied), ExitCode::PermissionDenied);

        let unreachable = anyhow::Error::new(Failure::PeerUnreachable("bob".into()));
        assert_eq!(ExitCode::of(&unreachable), ExitCode::PeerUnreachable);
        assert_eq!(
            ExitCode::of(&anyhow::anyhow!("something else")),
            ExitCode::Error
        );
        let timed_out = anyhow::Error::new(ControlError::TimedOut {
            network: "n".into(),
            path: "/x".into(),
            timeout: std::time::Duration::from_secs(5),
        });
        assert_eq!(ExitCode::of(&timed_out), ExitCode::Error);
    }
}
