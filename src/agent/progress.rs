//! Progress lines for a person watching `meshvpn join` or `meshvpn up` in a terminal: what
//! the agent is waiting for, until the network is up. Silent when stderr is not a terminal or
//! under systemd (where the log says the same things).

#![allow(clippy::print_stderr)]

use std::io::IsTerminal as _;
use std::time::{Duration, Instant};

use crate::node::Event;

/// After this long without a registration, say that the relay is not answering yet.
const SLOW_RELAY: Duration = Duration::from_secs(5);

/// Progress reporting state.
pub(crate) struct Progress {
    enabled: bool,
    started: Instant,
    registered: bool,
    first_peer: bool,
    told_slow: bool,
}

impl Progress {
    pub(crate) fn new(now: Instant, relay: &str) -> Self {
        let enabled =
            std::io::stderr().is_terminal() && std::env::var_os("INVOCATION_ID").is_none();
        if enabled {
            eprintln!("meshvpn: connecting to the relay at {relay} ...");
        }
        Self {
            enabled,
            started: now,
            registered: false,
            first_peer: false,
            told_slow: false,
        }
    }

    pub(crate) fn on_event(&mut self, ev: &Event) {
        if !self.enabled {
            return;
        }
        match ev {
            Event::RelayRegistered { .. } if !self.registered => {
                self.registered = true;
                if !self.first_peer {
                    eprintln!("meshvpn: registered with the relay; waiting for the first peer ...");
                }
            }
            Event::PeerJoined {
                name, virtual_ip, ..
            } if !self.first_peer => {
                self.first_peer = true;
                eprintln!("meshvpn: {name} ({virtual_ip}) is here; the network is up (`meshvpn status` shows every peer)");
            }
            Event::RelayKeyMismatch { .. } => {
                eprintln!("meshvpn: the relay cannot prove the key in the token; not trusting it (see the log)")
            }
            Event::LeftOutOfRotation => {
                eprintln!("meshvpn: this network's secret was rotated without this member; ask a member for a current token (`meshvpn invite`)")
            }
            Event::RelayRegistered { .. }
            | Event::PeerJoined { .. }
            | Event::RelayLost { .. }
            | Event::PrimaryRelay { .. }
            | Event::RelayError { .. }
            | Event::PeerLeft { .. }
            | Event::PathChanged { .. }
            | Event::PingResult { .. }
            | Event::VirtualIpConflict { .. }
            | Event::SecretRotated { .. }
            | Event::RotationFailed { .. } => {}
        }
    }

    /// When [`Progress::tick`] next has something to say, if ever.
    pub(crate) fn poll_timeout(&self) -> Option<Instant> {
        (self.enabled && !self.registered && !self.told_slow).then(|| self.started + SLOW_RELAY)
    }

    pub(crate) fn tick(&mut self, now: Instant) {
        if self.enabled
            && !self.registered
            && !self.told_slow
            && now.saturating_duration_since(self.started) >= SLOW_RELAY
        {
            self.told_slow = true;
            eprintln!("meshvpn: the relay is not answering yet; still trying (over TCP if UDP is blocked) ...");
        }
    }
}
