//! End-to-end NAT classification against a foreign STUN server: the real `meshvpn` binary,
//! a relay and Debian's coturn (`turnserver --stun-only`) on public lab hosts, and members
//! behind a home router and behind a symmetric NAT (needs root and coturn; skips otherwise).
//!
//! Each member has coturn in `stun_servers`. Its `netcheck --json` must list coturn's answer,
//! and the verdict coturn's answer implies (the same mapped address as the relay's port:
//! endpoint-independent; another one: symmetric) must equal the verdict the agent reached,
//! which the relay's two ports already decide. So coturn's answers parse, and a foreign server
//! agrees with the relay on the NAT.

#![allow(clippy::print_stdout, clippy::unwrap_used)]
#![allow(clippy::disallowed_methods)] // an end-to-end test: real time and real processes

use std::time::Duration;

use anyhow::{ensure, Context as _, Result};
use meshvpn_lab::{self as lab, Mesh, Nat, NatMapping, Signal};

const EXE: &str = env!("CARGO_BIN_EXE_meshvpn");
const RELAY_PORT: u16 = 3478;
const NETWORK: &str = "e2estun";

#[test]
fn a_foreign_stun_server_gives_the_same_nat_verdict_as_the_relay() -> Result<()> {
    if !lab::is_root() {
        println!("skipping: needs root");
        return Ok(());
    }
    if lab::which("turnserver").is_none() {
        println!("skipping: coturn (turnserver) is not installed");
        return Ok(());
    }
    let tag = "netcheck-coturn";
    let mut mesh = Mesh::new(
        tag,
        EXE.as_ref(),
        &[
            ("home", Some(Nat::HomeRouter)),
            ("sym", Some(Nat::Symmetric)),
        ],
        RELAY_PORT,
    )?;
    let stun_host = mesh.lab.add_public_host("stun")?;
    let stun_addr = format!("{}:3478", stun_host.addr);
    let log = mesh.lab.dir().join("turnserver.log");
    let ip = stun_host.addr.to_string();
    mesh.lab.spawn(
        &stun_host,
        "turnserver",
        &[
            "-n",
            "--stun-only",
            "--no-cli",
            "--no-tls",
            "--no-dtls",
            "-z",
            "-L",
            ip.as_str(),
            "-p",
            "3478",
            "--log-file",
            "stdout",
            "--simple-log",
        ],
        &log,
    )?;
    lab::wait_until(
        Duration::from_secs(10),
        Duration::from_millis(100),
        "coturn to listen",
        || mesh.lab.udp_listening(&stun_host, 3478),
    )?;
    mesh.create_network(NETWORK, Some("10.95.0.0/16"))?;
    let expected = [
        ("home", NatMapping::EndpointIndependent),
        ("sym", NatMapping::EndpointDependent),
    ];
    for (name, _) in expected {
        // Join (which writes the config), then run again with coturn in `stun_servers`.
        mesh.join(name)?;
        let node = mesh
            .members
            .iter_mut()
            .find(|m| m.name == name)
            .context("member")?;
        let path = node.config_dir.join(format!("{NETWORK}.toml"));
        lab::wait_until(
            Duration::from_secs(10),
            Duration::from_millis(100),
            "the config to be written",
            || Ok(path.exists()),
        )?;
        node.stop(&mesh.lab, Signal::Term)?;
        let text = std::fs::read_to_string(&path)?;
        let text = text.replacen(
            "[node]\n",
            &format!("[node]\nstun_servers = [\"{stun_addr}\"]\n"),
            1,
        );
        std::fs::write(&path, text)?;
        node.up(&mesh.lab, NETWORK)?;
    }
    for (name, want) in expected {
        let node = mesh.member(name)?;
        let mut report = serde_json::Value::Null;
        lab::wait_until(
            Duration::from_secs(30),
            Duration::from_millis(300),
            &format!("{name}'s netcheck to list coturn and the relay and reach a verdict"),
            || {
                let out = node.exec(&mesh.lab, &["netcheck", NETWORK, "--json"])?;
                report = serde_json::from_slice(&out.stdout)?;
                let servers: Vec<&str> = report["nat"]["stun"]
                    .as_array()
                    .map(|a| a.iter().filter_map(|s| s["server"].as_str()).collect())
                    .unwrap_or_default();
                Ok(servers.contains(&stun_addr.as_str())
                    && servers.contains(&mesh.relay_addr.to_string().as_str())
                    && report["nat"]["mapping"] != serde_json::json!(NatMapping::Unknown))
            },
        )?;
        let mapped = |server: &str| -> Option<String> {
            report["nat"]["stun"].as_array()?.iter().find_map(|s| {
                (s["server"].as_str() == Some(server))
                    .then(|| s["mapped"].as_str().map(str::to_string))
                    .flatten()
            })
        };
        let via_coturn = mapped(&stun_addr).context("coturn's answer")?;
        let via_relay = mapped(&mesh.relay_addr.to_string()).context("the relay's answer")?;
        let coturn_verdict = if via_coturn == via_relay {
            NatMapping::EndpointIndependent
        } else {
            NatMapping::EndpointDependent
        };
        let agent_verdict: NatMapping = serde_json::from_value(report["nat"]["mapping"].clone())?;
        println!(
            "[{tag}] {name}: relay sees {via_relay}, coturn sees {via_coturn}: coturn says {}, the agent says {}",
            coturn_verdict.as_str(),
            agent_verdict.as_str()
        );
        ensure!(
            agent_verdict == want && coturn_verdict == want,
            "[{tag}] {name}: expected {}, the agent says {}, coturn's answer implies {}",
            want.as_str(),
            agent_verdict.as_str(),
            coturn_verdict.as_str()
        );
    }
    mesh.shutdown()
}
