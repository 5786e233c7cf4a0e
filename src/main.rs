//! The `meshvpn` binary: parses the command line, sets up logging and runs the chosen command
//! (see [`meshvpn::cli`]); a failure prints one line naming the problem and exits with the
//! code of [`meshvpn::cli::ExitCode`] (1 unless the failure has a code of its own).

#![allow(clippy::print_stderr)]

use std::io::IsTerminal as _;

use clap::Parser as _;
use meshvpn::agent::reload::{LogControl, DEFAULT_LOG_LEVEL};
use meshvpn::cli::{Cli, Command, ExitCode};
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;
use tracing_subscriber::{fmt, reload, EnvFilter};

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    // RUST_LOG wins, then --log-level, then the network config's log_level, then "info". Only
    // the config's can change while the agent runs (SIGHUP), through the reloadable filter.
    let rust_log = std::env::var("RUST_LOG").ok().filter(|v| !v.is_empty());
    let (filter, pinned_by) = match (rust_log, cli.log_level.clone()) {
        (Some(v), _) => (EnvFilter::new(v), Some("RUST_LOG")),
        (None, Some(level)) => (EnvFilter::new(level), Some("--log-level")),
        (None, None) => (
            EnvFilter::new(config_log_level(&cli).unwrap_or_else(|| DEFAULT_LOG_LEVEL.into())),
            None,
        ),
    };
    let (filter, handle) = reload::Layer::new(filter);
    // Under systemd, journald adds its own timestamps.
    let under_systemd = std::env::var_os("INVOCATION_ID").is_some();
    let ansi = std::io::stderr().is_terminal();
    let registry = tracing_subscriber::registry().with(filter);
    if under_systemd {
        registry
            .with(
                fmt::layer()
                    .with_writer(std::io::stderr)
                    .with_ansi(ansi)
                    .without_time(),
            )
            .init();
    } else {
        registry
            .with(fmt::layer().with_writer(std::io::stderr).with_ansi(ansi))
            .init();
    }
    let log = match pinned_by {
        Some(by) => LogControl::Pinned(by),
        None => LogControl::Config(Box::new(move |level: &str| {
            let filter = EnvFilter::try_new(level).map_err(|e| e.to_string())?;
            handle.reload(filter).map_err(|e| e.to_string())
        })),
    };
    match meshvpn::cli::run(cli, log) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            let msg = format!("{e:#}").replace('\n', " ");
            eprintln!("error: {msg}");
            std::process::ExitCode::from(ExitCode::of(&e).code())
        }
    }
}

/// The `log_level` of the network an `up` command is about, if its config sets one.
fn config_log_level(cli: &Cli) -> Option<String> {
    let Command::Up { name, .. } = &cli.command else {
        return None;
    };
    meshvpn::config::Config::load(&cli.config_dir, name)
        .ok()?
        .log_level
}
