//! Revocation commands: `invite` prints the current token, `rotate` replaces the network
//! secret (every member moves to the new one), and `kick` rotates without one member, which
//! then reaches nobody. See `wire::rotation` for how the new secret travels.

use std::path::Path;

use anyhow::{bail, Context as _};

use super::runtime;
use crate::config::Config;
use crate::control::{self, Request, RotateReply};

/// `meshvpn invite NETWORK`: prints the network's current group token.
pub(super) fn invite(config_dir: &Path, name: &str) -> anyhow::Result<()> {
    let cfg = Config::load(config_dir, name)?;
    println!("{}", cfg.token().encode());
    Ok(())
}

/// `meshvpn rotate NETWORK` (`exclude` None) and `meshvpn kick NETWORK MEMBER`: asks the
/// running agent to rotate the secret and prints the new token.
pub(super) fn rotate(run_dir: &Path, name: &str, exclude: Option<&str>) -> anyhow::Result<()> {
    let request = Request::Rotate {
        exclude: exclude.map(str::to_string),
    };
    let line = runtime()?
        .block_on(control::ask(run_dir, name, &request))
        .context("rotating needs this network's agent running (`meshvpn up NETWORK`)")?;
    let reply: RotateReply = serde_json::from_str(&line)
        .with_context(|| format!("the agent of network {name:?} sent an unreadable answer"))?;
    match (reply.ok, reply.token) {
        (true, Some(token)) => {
            match exclude {
                Some(member) => eprintln!("meshvpn: {member} is out of network {name}: the secret was rotated without it. Members online now switch at once; members offline get the new secret from the relay when they come back (within 7 days). New members need the token below."),
                None => eprintln!("meshvpn: network {name} has a new secret. Members online now switch at once; members offline get it from the relay when they come back (within 7 days). The old token admits nobody; new members need the token below."),
            }
            println!("{token}");
            Ok(())
        }
        _ => bail!(
            "rotating network {name:?} failed: {}",
            reply.error.as_deref().unwrap_or("no reason given")
        ),
    }
}
