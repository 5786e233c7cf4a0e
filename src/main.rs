//! The `meshvpn` binary: parses the command line, sets up logging and runs the chosen command
//! (see [`meshvpn::cli`]); a failure prints one line naming the problem and exits with the
//! code of [`meshvpn::cli::ExitCode`] (1 unless the failure has a code of its own).

#![allow(clippy::print_stderr)]

use std::io::IsTerminal as _;

use clap::Parser as _;
use meshvpn::cli::{Cli, Command, ExitCode};
use tracing_subscriber::EnvFilter;

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    // RUST_LOG wins, then --log-level, then the network config's log_level, then "info".
    let filter = match std::env::var("RUST_LOG") {
        Ok(v) if !v.is_empty() => EnvFilter::new(v),
        _ => EnvFilter::new(
            cli.log_level
                .clone()
                .or_else(|| config_log_level(&cli))
                .unwrap_or_else(|| "info".into()),
        ),
    };
    // Under systemd, journald adds its own timestamps.
    let under_systemd = std::env::var_os("INVOCATION_ID").is_some();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    if under_systemd {
        builder.without_time().init();
    } else {
        builder.init();
    }
    match meshvpn::cli::run(cli) {
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
    let Command::Up { name } = &cli.command else {
        return None;
    };
    meshvpn::config::Config::load(&cli.config_dir, name)
        .ok()?
        .log_level
}
