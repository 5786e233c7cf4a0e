//! Build-time documentation generated from the command-line definition: man pages and shell
//! completions.
//!
//! Everything here is derived from the `clap::Command` the caller passes in (the CLI passes
//! [`super::Cli`]'s, through [`clap::CommandFactory`]), so the man pages and completions cannot
//! drift from the real arguments, and this module needs nothing from the CLI that calls it. The
//! Debian package build (`packaging/build-deb.sh`) runs the hidden `meshvpn generate --out DIR`
//! subcommand, which calls [`write_all`], and then packs the files it wrote.

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use clap_complete::Shell;

/// The name the binary is installed under; completions are registered for this command.
const BIN_NAME: &str = "meshvpn";

/// The shells completions are written for, and the file name each one gets.
const SHELLS: [(Shell, &str); 3] = [
    (Shell::Bash, "meshvpn.bash"),
    (Shell::Zsh, "_meshvpn"),
    (Shell::Fish, "meshvpn.fish"),
];

/// Writes the man pages and shell completions for `cmd` (the `meshvpn` command line) into
/// `out`, creating it if needed.
///
/// Files written:
/// - `meshvpn.1`, the main page, and one page per visible subcommand (`meshvpn-join.1`,
///   `meshvpn-relay.1`, …); hidden subcommands get none.
/// - `meshvpn.bash` (bash-completion), `_meshvpn` (zsh) and `meshvpn.fish` (fish).
///
/// Every man page gets an EXIT STATUS section listing [`super::ExitCode`], which clap does
/// not know about.
///
/// Existing files of the same names are overwritten.
pub fn write_all(cmd: clap::Command, out: &Path) -> anyhow::Result<()> {
    let codes: Vec<(u8, &str)> = super::ExitCode::ALL
        .iter()
        .map(|c| (c.code(), c.meaning()))
        .collect();
    write_all_with(cmd, &codes, out)
}

/// [`write_all`] with the EXIT STATUS section listing `exit_statuses` (code, meaning).
pub fn write_all_with(
    cmd: clap::Command,
    exit_statuses: &[(u8, &str)],
    out: &Path,
) -> anyhow::Result<()> {
    std::fs::create_dir_all(out)
        .with_context(|| format!("creating output directory {}", out.display()))?;

    clap_mangen::generate_to(cmd.clone(), out)
        .with_context(|| format!("writing man pages into {}", out.display()))?;
    let section = exit_status_section(exit_statuses);
    for entry in std::fs::read_dir(out).with_context(|| format!("listing {}", out.display()))? {
        let path = entry
            .with_context(|| format!("listing {}", out.display()))?
            .path();
        if path.extension().is_some_and(|e| e == "1") {
            let page = std::fs::read_to_string(&path)
                .with_context(|| format!("reading {}", path.display()))?;
            std::fs::write(&path, with_section(&page, &section))
                .with_context(|| format!("writing {}", path.display()))?;
        }
    }

    for (shell, file_name) in SHELLS {
        let mut visible = without_hidden_subcommands(cmd.clone());
        let written: PathBuf = clap_complete::generate_to(shell, &mut visible, BIN_NAME, out)
            .with_context(|| format!("writing {shell} completions into {}", out.display()))?;
        let wanted = out.join(file_name);
        if written != wanted {
            std::fs::rename(&written, &wanted).with_context(|| {
                format!("renaming {} to {}", written.display(), wanted.display())
            })?;
        }
    }
    Ok(())
}

/// The roff text of an EXIT STATUS section: one tagged paragraph per code.
fn exit_status_section(exit_statuses: &[(u8, &str)]) -> String {
    let mut section = String::from(".SH \"EXIT STATUS\"\n");
    for (code, meaning) in exit_statuses {
        // A line starting with a dot or quote would be read as a roff request.
        let text = meaning.replace('\\', "\\\\").replace('-', "\\-");
        section.push_str(&format!(".TP\n\\fB{code}\\fR\n\\&{text}\n"));
    }
    section
}

/// `page` with `section` inserted before its VERSION section (where man pages keep EXIT
/// STATUS, after the options), or at its end without one.
fn with_section(page: &str, section: &str) -> String {
    match page.find("\n.SH VERSION") {
        Some(at) => format!("{}\n{section}{}", &page[..at], &page[at + 1..]),
        None => format!("{page}{section}"),
    }
}

/// `cmd` minus its hidden subcommands (such as `generate` itself), for the completion
/// generators, which list every subcommand (the man page generator already skips hidden ones).
///
/// clap cannot remove a subcommand, so the command is rebuilt around the same arguments and
/// the visible subcommands; returned unchanged when nothing is hidden.
fn without_hidden_subcommands(cmd: clap::Command) -> clap::Command {
    if !cmd.get_subcommands().any(clap::Command::is_hide_set) {
        return cmd;
    }
    let mut visible = clap::Command::new(BIN_NAME)
        .args(cmd.get_arguments().cloned())
        .subcommands(cmd.get_subcommands().filter(|s| !s.is_hide_set()).cloned())
        .subcommand_required(cmd.is_subcommand_required_set())
        .arg_required_else_help(cmd.is_arg_required_else_help_set());
    if let Some(about) = cmd.get_about() {
        visible = visible.about(about.clone());
    }
    if let Some(about) = cmd.get_long_about() {
        visible = visible.long_about(about.clone());
    }
    if cmd.get_version().is_some() {
        visible = visible
            .version(env!("CARGO_PKG_VERSION"))
            .propagate_version(cmd.is_propagate_version_set());
    }
    visible
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use clap::CommandFactory as _;

    use super::*;
    use crate::cli::Cli;

    #[test]
    fn writes_man_pages_and_completions() {
        let dir = std::env::temp_dir().join(format!(
            "meshvpn-generate-test-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        // A nested path: write_all creates every missing level.
        let out = dir.join("assets");
        write_all(Cli::command(), &out).unwrap();

        for name in [
            "meshvpn.1",
            "meshvpn-join.1",
            "meshvpn-relay.1",
            "meshvpn-up.1",
            "meshvpn.bash",
            "_meshvpn",
            "meshvpn.fish",
        ] {
            let path = out.join(name);
            let len = std::fs::metadata(&path)
                .unwrap_or_else(|e| panic!("{} missing: {e}", path.display()))
                .len();
            assert!(len > 0, "{} is empty", path.display());
        }

        let man = std::fs::read_to_string(out.join("meshvpn.1")).unwrap();
        assert!(
            man.starts_with(".ie") || man.contains(".TH"),
            "not roff:\n{man}"
        );
        assert!(
            man.contains("join"),
            "man page does not mention join:\n{man}"
        );
        assert!(
            man.contains("relay"),
            "man page does not mention relay:\n{man}"
        );
        let status = man
            .find(".SH \"EXIT STATUS\"")
            .expect("an EXIT STATUS section");
        assert!(
            man[status..].contains("\\fB3\\fR\n\\&the agent of the network is not running"),
            "exit 3 not documented:\n{man}"
        );
        if let Some(version) = man.find(".SH VERSION") {
            assert!(status < version, "EXIT STATUS comes before VERSION");
        }
        let join = std::fs::read_to_string(out.join("meshvpn-join.1")).unwrap();
        assert!(
            join.contains("EXIT STATUS"),
            "subcommand pages list the codes too"
        );
        assert!(
            join.contains("token"),
            "meshvpn-join.1 lacks its argument:\n{join}"
        );

        let bash = std::fs::read_to_string(out.join("meshvpn.bash")).unwrap();
        assert!(bash.contains("complete -F") && bash.contains("meshvpn"));
        let zsh = std::fs::read_to_string(out.join("_meshvpn")).unwrap();
        assert!(
            zsh.starts_with("#compdef meshvpn"),
            "zsh file lacks #compdef"
        );
        let fish = std::fs::read_to_string(out.join("meshvpn.fish")).unwrap();
        assert!(fish.contains("complete -c meshvpn"));

        // No hidden subcommand in any completion (the real `generate` is hidden once wired).
        for text in [&bash, &zsh, &fish] {
            assert!(!text.contains("generate"), "hidden subcommand completed");
        }

        // Running it again over existing files succeeds (the packaging script may rerun).
        write_all(Cli::command(), &out).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// Completions for a command with a hidden subcommand: the hidden one is gone, and the
    /// rest (subcommands, their arguments, global options, --version) is exactly what clap
    /// generates for the same command without it.
    #[test]
    fn completions_leave_out_hidden_subcommands() {
        // The reference: the real command line with every subcommand visible (once `generate`
        // is wired in, it is hidden; unhide it so the reference has nothing to drop).
        let mut reference = Cli::command();
        let hidden: Vec<String> = reference
            .get_subcommands()
            .filter(|s| s.is_hide_set())
            .map(|s| s.get_name().to_owned())
            .collect();
        for name in &hidden {
            reference = reference.mut_subcommand(name, |s| s.hide(false));
        }
        let with_secret = reference.clone().subcommand(
            clap::Command::new("xyzzy-tool")
                .hide(true)
                .arg(clap::Arg::new("xyzzy-arg").long("xyzzy-arg")),
        );
        let render = |shell: Shell, mut cmd: clap::Command| {
            let mut buf = Vec::new();
            clap_complete::generate(shell, &mut cmd, BIN_NAME, &mut buf);
            String::from_utf8(buf).unwrap()
        };
        assert!(
            render(Shell::Bash, with_secret.clone()).contains("xyzzy-tool"),
            "premise: clap_complete lists hidden subcommands"
        );

        let visible = without_hidden_subcommands(with_secret);
        let names = |c: &clap::Command| -> Vec<String> {
            c.get_subcommands()
                .map(|s| s.get_name().to_owned())
                .collect()
        };
        assert_eq!(names(&visible), names(&reference));
        for (shell, _) in SHELLS {
            let text = render(shell, visible.clone());
            assert!(
                !text.contains("xyzzy"),
                "{shell}: hidden subcommand completed"
            );
            assert!(
                text == render(shell, reference.clone()),
                "{shell} completions differ after dropping the hidden subcommand"
            );
            for word in [
                "join",
                "relay",
                "config-dir",
                "run-dir",
                "listen-port",
                "version",
            ] {
                assert!(text.contains(word), "{shell} completion lost {word}");
            }
        }
    }
}
