//! SIGHUP: the agent re-reads its network's config file and applies what it can change
//! without dropping a session.
//!
//! Today that is `log_level` (through the process's reloadable log filter, [`LogControl`]).
//! Every other field shapes the node, the sockets or the TUN device, which the agent builds
//! once: a change to one is logged by name as needing a restart and otherwise ignored, so the
//! running agent and its sessions are untouched. A config that does not load (syntax, a bad
//! value, unsafe permissions, deleted) is logged and ignored the same way.

use std::path::Path;

use crate::config::Config;

/// Swaps the process's log filter for the one a `log_level` text describes, or says why not.
pub type SetLogLevel = Box<dyn Fn(&str) -> Result<(), String> + Send>;

/// Who decides the agent's log level, and how to change it while the agent runs.
pub enum LogControl {
    /// The config's `log_level` decides (default [`DEFAULT_LOG_LEVEL`]), changed with this.
    Config(SetLogLevel),
    /// The level is pinned by the command line or the environment (named here, e.g.
    /// `RUST_LOG`): a changed `log_level` is not applied.
    Pinned(&'static str),
}

/// The level an agent logs at when its config sets none.
pub const DEFAULT_LOG_LEVEL: &str = "info";

/// Re-reads `running`'s config from `config_dir` and applies what changed and can be applied
/// live; `running` keeps tracking what is in force.
pub(super) fn handle_sighup(running: &mut Config, config_dir: &Path, log: &LogControl) {
    let path = Config::path(config_dir, &running.network);
    let new = match Config::load(config_dir, &running.network) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!("reload: {e}; keeping the running config");
            return;
        }
    };
    let restart = fields_needing_restart(running, &new);
    if !restart.is_empty() {
        tracing::warn!(
            config = %path.display(),
            fields = %restart.join(", "),
            "reload: these changed fields take effect only after a restart (systemctl restart meshvpn@{})",
            running.network
        );
    }
    let log_changed = new.log_level != running.log_level;
    if log_changed {
        let level = new.log_level.as_deref().unwrap_or(DEFAULT_LOG_LEVEL);
        match log {
            LogControl::Config(apply) => match apply(level) {
                Ok(()) => {
                    tracing::info!(log_level = %level, "reload: log level changed");
                    running.log_level = new.log_level;
                }
                Err(e) => {
                    tracing::error!(log_level = %level, "reload: log_level not applied: {e}")
                }
            },
            LogControl::Pinned(by) => tracing::warn!(
                log_level = %level,
                "reload: log_level changed in the config but {by} sets the level; not applied"
            ),
        }
    }
    if restart.is_empty() && !log_changed {
        tracing::info!(config = %path.display(), "reload: nothing changed");
    }
}

/// The fields of `new` that differ from `running` and need a restart, by their config names.
/// Secrets are compared, never logged.
fn fields_needing_restart(running: &Config, new: &Config) -> Vec<&'static str> {
    let checks = [
        ("network.name", running.network != new.network),
        ("network.secret", running.secret != new.secret),
        ("network.subnet", running.subnet != new.subnet),
        ("relay", running.relays != new.relays),
        ("node.name", running.name != new.name),
        (
            "node.private_key",
            running.private_key.public() != new.private_key.public(),
        ),
        ("node.virtual_ip", running.virtual_ip != new.virtual_ip),
        ("node.listen_port", running.listen_port != new.listen_port),
        ("node.mtu", running.mtu != new.mtu),
        (
            "node.stun_servers",
            running.stun_servers != new.stun_servers,
        ),
        (
            "node.port_mapping",
            running.port_mapping != new.port_mapping,
        ),
        ("node.tun_offload", running.tun_offload != new.tun_offload),
        (
            "node.per_cpu_data_path",
            running.per_cpu_data_path != new.per_cpu_data_path,
        ),
        ("node.metrics", running.metrics != new.metrics),
        (
            "node.relay_for_peers",
            running.relay_for_peers != new.relay_for_peers,
        ),
        ("node.dns", running.dns != new.dns),
    ];
    checks
        .into_iter()
        .filter_map(|(name, changed)| changed.then_some(name))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng as _;

    fn config() -> Config {
        let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(7);
        let token = crate::wire::token::Token {
            network: "n".into(),
            secret: crate::keys::NetworkSecret([1; 32]),
            subnet: "10.9.0.0/16".parse().expect("literal"),
            relays: vec!["AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=@127.0.0.1:9"
                .parse()
                .expect("literal")],
        };
        let key = crate::keys::NodeSecret::generate(&mut rng);
        Config::from_token(&token, "me".into(), key, None, 0).expect("a valid config")
    }

    #[test]
    fn only_fields_that_shape_the_running_agent_need_a_restart() {
        let running = config();
        let mut new = running.clone();
        new.log_level = Some("debug".into());
        assert!(fields_needing_restart(&running, &new).is_empty());
        new.mtu = 1280;
        new.secret = crate::keys::NetworkSecret([2; 32]);
        new.listen_port = 4000;
        assert_eq!(
            fields_needing_restart(&running, &new),
            ["network.secret", "node.listen_port", "node.mtu"]
        );
    }
}
