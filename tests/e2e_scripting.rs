//! End-to-end tests of meshvpn for scripts, against real agents in a namespace lab (needs root;
//! skips otherwise): exit codes, the versioned JSON of one network and of several, `wait`,
//! SIGHUP reload, and the metrics endpoint.
//!
//! Each test builds its own lab with unique names and tears it down on drop, even when it
//! fails. Only lab addresses are ever contacted.

#![allow(clippy::print_stdout)] // an end-to-end test reports its progress
#![allow(clippy::disallowed_methods)] // times the real binary with the real clock

use std::time::Duration;

use anyhow::{ensure, Context as _, Result};
use meshvpn_lab::{self as lab, status, wait_until, Lab, Node};

const EXE: &str = env!("CARGO_BIN_EXE_meshvpn");
const RELAY_PORT: u16 = 3478;
const CONVERGE: Duration = Duration::from_secs(30);

fn skip() -> bool {
    if lab::is_root() {
        return false;
    }
    println!("skipping: needs root");
    true
}

/// Runs `meshvpn <args>` on `node` and returns (exit code, stdout), printing both with stderr.
fn run(node: &Node, lab: &Lab, args: &[&str]) -> Result<(Option<i32>, String)> {
    let out = node.run(lab, args, Duration::from_secs(30))?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    println!(
        "{}: meshvpn {} -> exit {:?}; stderr: {}",
        node.name,
        args.join(" "),
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok((out.status.code(), stdout))
}

/// `meshvpn <args>` on `node`, which must exit 0 and print one JSON document with schema 1.
fn json(node: &Node, lab: &Lab, args: &[&str]) -> Result<serde_json::Value> {
    let (code, stdout) = run(node, lab, args)?;
    ensure!(
        code == Some(0),
        "meshvpn {args:?} exited {code:?}: {stdout}"
    );
    let value: serde_json::Value =
        serde_json::from_str(&stdout).with_context(|| format!("meshvpn {args:?}: {stdout}"))?;
    ensure!(
        value["schema"] == status::SCHEMA,
        "meshvpn {args:?} has no schema {}: {stdout}",
        status::SCHEMA
    );
    Ok(value)
}

/// Waits until `node` lists exactly `want` in `network`.
fn wait_peers(node: &Node, lab: &Lab, network: &str, want: &[&str]) -> Result<Duration> {
    let mut want: Vec<String> = want.iter().map(|s| s.to_string()).collect();
    want.sort();
    wait_until(
        CONVERGE,
        Duration::from_millis(100),
        &format!("{} to list {want:?} in {network}", node.name),
        || Ok(node.status(lab, network)?.peer_names() == want),
    )
}

#[test]
fn json_of_one_and_several_networks_and_exit_codes_of_real_agents() -> Result<()> {
    if skip() {
        return Ok(());
    }
    let mut lab = Lab::new("script")?;
    let relay_host = lab.add_public_host("relay")?;
    let a = lab.add_public_host("a")?;
    let b = lab.add_public_host("b")?;
    let mut relay = Node::new(&lab, EXE.as_ref(), &relay_host, "relay")?;
    let relay_addr = relay.start_relay(&lab, RELAY_PORT)?.to_string();
    let one = relay.create_token(&lab, "one", &relay_addr, Some("10.111.0.0/16"))?;
    let two = relay.create_token(&lab, "two", &relay_addr, Some("10.112.0.0/16"))?;

    // alice runs both networks from one config directory; bob is in network one only.
    let mut alice = Node::new(&lab, EXE.as_ref(), &a, "alice")?;
    alice.join(&lab, &one, &[])?;
    let mut bob = Node::new(&lab, EXE.as_ref(), &b, "bob")?;
    bob.join(&lab, &one, &[])?;
    let t = wait_peers(&alice, &lab, "one", &["bob"])?;
    println!("alice lists bob after {t:.1?}");
    // The second agent shares alice's directories (and so her token file, read by now).
    let mut alice_two = alice.clone();
    alice_two.name = "alice-two".into();
    alice_two.log = lab.dir().join("alice-two.log");
    alice_two.pid = None;
    alice_two.join(&lab, &two, &[])?;
    wait_until(
        CONVERGE,
        Duration::from_millis(100),
        "alice's agent of network two to answer",
        || Ok(alice.status(&lab, "two").is_ok()),
    )?;
    wait_until(
        CONVERGE,
        Duration::from_millis(100),
        "alice <-> bob direct",
        || Ok(alice.status(&lab, "one")?.peer("bob").map(|p| p.path) == Some(lab::PeerPath::Direct)),
    )?;

    // One network named: the same envelope as many, holding just it.
    let single = json(&alice, &lab, &["status", "one", "--json"])?;
    let networks = single["networks"].as_array().context("networks")?;
    ensure!(networks.len() == 1 && networks[0]["network"] == "one");
    ensure!(networks[0]["peers"][0]["name"] == "bob", "{single}");
    // No name: every running network, sorted.
    let all = json(&alice, &lab, &["status", "--json"])?;
    let names: Vec<&str> = all["networks"]
        .as_array()
        .context("networks")?
        .iter()
        .filter_map(|n| n["network"].as_str())
        .collect();
    ensure!(names == ["one", "two"], "status --json lists {names:?}");
    let report: status::StatusReport = serde_json::from_value(all)?;
    ensure!(report.not_running.is_empty());

    let peers = json(&alice, &lab, &["peers", "one", "--json"])?;
    ensure!(peers["peers"][0]["name"] == "bob", "{peers}");
    let list = json(&alice, &lab, &["list", "--json"])?;
    let listed: status::ListReport = serde_json::from_value(list)?;
    ensure!(
        listed.networks.iter().all(|n| n.running) && listed.networks.len() == 2,
        "{listed:?}"
    );
    ensure!(listed.networks[0].peers == Some(1), "{listed:?}");
    let netcheck = json(&alice, &lab, &["netcheck", "one", "--json"])?;
    ensure!(netcheck["peers"][0]["name"] == "bob", "{netcheck}");
    ensure!(netcheck["nat"]["mapping"].is_string(), "{netcheck}");

    // The human status: a summary line, then a row for this member.
    let table = alice.status_table(&lab, "one")?;
    println!("{table}");
    let mut lines = table.lines();
    ensure!(lines.next() == Some("one: 1 peer: 1 direct"), "{table}");
    ensure!(
        lines
            .nth(1)
            .is_some_and(|l| l.starts_with("alice (this member)")),
        "{table}"
    );

    // 0: bob answers; 5: nobody called mallory; 2: two networks and none named.
    let ping = json(
        &alice,
        &lab,
        &["ping", "bob", "-n", "one", "-c", "2", "--json"],
    )?;
    ensure!(
        ping["received"] == 2 && ping["replies"][0]["ok"] == true,
        "{ping}"
    );
    let (code, _) = run(&alice, &lab, &["ping", "mallory", "-n", "one", "-c", "1"])?;
    ensure!(code == Some(5), "an unknown peer exits 5");
    let (code, _) = run(&alice, &lab, &["ping", "bob", "-c", "1"])?;
    ensure!(code == Some(2), "no network named among two exits 2");

    // 5: bob is killed (no goodbye): still listed, but nothing answers.
    bob.kill(&lab)?;
    let (code, stdout) = run(
        &alice,
        &lab,
        &["ping", "bob", "-n", "one", "-c", "2", "--json"],
    )?;
    ensure!(code == Some(5), "a dead peer exits 5");
    let ping: serde_json::Value = serde_json::from_str(&stdout)?;
    ensure!(ping["received"] == 0 && ping["sent"] == 2, "{ping}");

    // 3: network two's agent goes down; `status` lists what still runs and names the rest.
    alice.exec(&lab, &["down", "two"])?;
    wait_until(
        Duration::from_secs(10),
        Duration::from_millis(100),
        "network two's agent to stop",
        || Ok(!alice_two.is_running(&lab)),
    )?;
    let (code, _) = run(&alice, &lab, &["status", "two"])?;
    ensure!(code == Some(3), "a stopped agent exits 3");
    let all: status::StatusReport =
        serde_json::from_value(json(&alice, &lab, &["status", "--json"])?)?;
    ensure!(
        all.networks.len() == 1 && all.not_running == ["two"],
        "{all:?}"
    );
    alice.exec(&lab, &["down", "one"])?;
    wait_until(
        Duration::from_secs(10),
        Duration::from_millis(100),
        "network one's agent to stop",
        || Ok(!alice.is_running(&lab)),
    )?;
    let (code, _) = run(&alice, &lab, &["status"])?;
    ensure!(code == Some(3), "no agent running at all exits 3");

    drop(bob);
    drop(alice);
    drop(alice_two);
    drop(relay);
    lab.teardown();
    Ok(())
}

/// Runs `meshvpn wait <args>` on `node`; returns (exit code, stdout, how long it took).
fn timed_wait(node: &Node, lab: &Lab, args: &[&str]) -> Result<(Option<i32>, String, Duration)> {
    let mut full = vec!["wait"];
    full.extend_from_slice(args);
    let start = std::time::Instant::now();
    let (code, stdout) = run(node, lab, &full)?;
    let took = start.elapsed();
    println!(
        "{}: meshvpn {full:?} took {took:.1?}: {}",
        node.name,
        stdout.trim()
    );
    Ok((code, stdout, took))
}

#[test]
fn wait_returns_once_registered_and_synced_and_fails_after_its_timeout() -> Result<()> {
    if skip() {
        return Ok(());
    }
    let mut lab = Lab::new("wait")?;
    let relay_host = lab.add_public_host("relay")?;
    let dead_relay_host = lab.add_public_host("relay2")?;
    let hosts = [
        lab.add_public_host("a")?,
        lab.add_public_host("b")?,
        lab.add_public_host("c")?,
    ];
    let mut relay = Node::new(&lab, EXE.as_ref(), &relay_host, "relay")?;
    let relay_addr = relay.start_relay(&lab, RELAY_PORT)?.to_string();
    let one = relay.create_token(&lab, "one", &relay_addr, Some("10.121.0.0/16"))?;
    let two = relay.create_token(&lab, "two", &relay_addr, Some("10.122.0.0/16"))?;
    let mut dead_relay = Node::new(&lab, EXE.as_ref(), &dead_relay_host, "relay2")?;
    let dead_addr = dead_relay.start_relay(&lab, RELAY_PORT)?.to_string();
    let lonely = dead_relay.create_token(&lab, "lonely", &dead_addr, Some("10.123.0.0/16"))?;
    dead_relay.kill(&lab)?;

    // bob is in network one first; `wait` on alice, started right after her agent, returns
    // only once she holds the member list, so bob is listed the moment it returns.
    let mut bob = Node::new(&lab, EXE.as_ref(), &hosts[1], "bob")?;
    bob.join(&lab, &one, &[])?;
    let (code, _, took) = timed_wait(&bob, &lab, &["one", "--timeout", "30"])?;
    ensure!(code == Some(0), "bob's wait exits 0");
    let mut alice = Node::new(&lab, EXE.as_ref(), &hosts[0], "alice")?;
    alice.join(&lab, &one, &[])?;
    let (code, stdout, took_alice) = timed_wait(&alice, &lab, &["one", "--timeout", "30"])?;
    ensure!(code == Some(0), "alice's wait exits 0");
    ensure!(
        stdout.contains("ready after"),
        "wait says how long: {stdout}"
    );
    let status = alice.network_status(&lab, "one")?;
    ensure!(status.ready && status.status.relay.registered, "{status:?}");
    ensure!(
        status.status.peer_names() == ["bob"],
        "ready means synced: alice lists {:?}",
        status.status.peer_names()
    );
    ensure!(
        took < Duration::from_secs(15) && took_alice < Duration::from_secs(15),
        "wait took {took:?} / {took_alice:?}"
    );

    // Alone in network two: no sync comes, ready once registered for the settle time.
    let mut alice_two = alice.clone();
    alice_two.name = "alice-two".into();
    alice_two.log = lab.dir().join("alice-two.log");
    alice_two.pid = None;
    alice_two.join(&lab, &two, &[])?;
    let (code, stdout, took) = timed_wait(&alice, &lab, &["two", "--timeout", "30"])?;
    ensure!(
        code == Some(0) && stdout.contains("no peers yet"),
        "{stdout}"
    );
    ensure!(
        took < Duration::from_secs(15),
        "a lone member's wait took {took:?}"
    );

    // The relay of network lonely does not run: wait gives up after its timeout, exit 1.
    let mut carol = Node::new(&lab, EXE.as_ref(), &hosts[2], "carol")?;
    carol.join(&lab, &lonely, &[])?;
    let (code, _, took) = timed_wait(&carol, &lab, &["lonely", "--timeout", "3"])?;
    ensure!(code == Some(1), "an unregistered agent's wait exits 1");
    ensure!(
        took >= Duration::from_secs(3) && took < Duration::from_secs(10),
        "wait --timeout 3 took {took:?}"
    );
    let out = carol.run(
        &lab,
        &["wait", "lonely", "--timeout", "1"],
        Duration::from_secs(20),
    )?;
    let err = String::from_utf8_lossy(&out.stderr);
    ensure!(err.contains("not registered with relay"), "{err}");

    // No agent at all: exit 3 after the timeout.
    carol.exec(&lab, &["down", "lonely"])?;
    wait_until(
        Duration::from_secs(10),
        Duration::from_millis(100),
        "carol's agent to stop",
        || Ok(!carol.is_running(&lab)),
    )?;
    let (code, _, took) = timed_wait(&carol, &lab, &["lonely", "--timeout", "1.5"])?;
    ensure!(code == Some(3), "wait without an agent exits 3");
    ensure!(took >= Duration::from_millis(1500), "took {took:?}");

    drop((alice, alice_two, bob, carol, relay, dead_relay));
    lab.teardown();
    Ok(())
}

/// How many lines of `node`'s agent log contain `needle`.
fn log_count(node: &Node, needle: &str) -> Result<usize> {
    let text = std::fs::read_to_string(&node.log)
        .with_context(|| format!("reading {}", node.log.display()))?;
    Ok(text.lines().filter(|l| l.contains(needle)).count())
}

/// Sends SIGHUP to `node`'s agent and waits until its log has `count` lines with `needle`.
fn hup_until(node: &Node, lab: &Lab, needle: &str, count: usize) -> Result<Duration> {
    lab.signal(node.pid.context("the agent runs")?, lab::Signal::Hup)?;
    let t = wait_until(
        Duration::from_secs(10),
        Duration::from_millis(50),
        &format!("{}'s log to show {needle:?} {count} time(s)", node.name),
        || Ok(log_count(node, needle)? >= count),
    )?;
    println!("SIGHUP -> {needle:?} after {t:.1?}");
    ensure!(node.is_running(lab), "{} stopped after a reload", node.name);
    Ok(t)
}

#[test]
fn sighup_applies_log_level_keeps_pings_flowing_and_ignores_a_broken_config() -> Result<()> {
    if skip() {
        return Ok(());
    }
    let mut lab = Lab::new("reload")?;
    let relay_host = lab.add_public_host("relay")?;
    let a = lab.add_public_host("a")?;
    let b = lab.add_public_host("b")?;
    let mut relay = Node::new(&lab, EXE.as_ref(), &relay_host, "relay")?;
    let relay_addr = relay.start_relay(&lab, RELAY_PORT)?.to_string();
    let token = relay.create_token(&lab, "one", &relay_addr, Some("10.131.0.0/16"))?;
    let mut bob = Node::new(&lab, EXE.as_ref(), &b, "bob")?;
    bob.join(&lab, &token, &[])?;
    // alice's agent runs without --log-level or RUST_LOG, so her config's log_level decides.
    let mut alice = Node::new(&lab, EXE.as_ref(), &a, "alice")?;
    let token_file = alice.write_token(&token)?;
    let mut args: Vec<std::ffi::OsString> = vec!["-u".into(), "RUST_LOG".into(), EXE.into()];
    args.extend(
        [
            "--config-dir".as_ref(),
            alice.config_dir.as_os_str(),
            "--run-dir".as_ref(),
            alice.run_dir.as_os_str(),
            "join".as_ref(),
            "--token-file".as_ref(),
            token_file.as_os_str(),
            "--name".as_ref(),
            "alice".as_ref(),
        ]
        .map(std::ffi::OsStr::to_os_string),
    );
    alice.pid = Some(lab.spawn(&a, "env", &args, &alice.log)?);
    wait_peers(&alice, &lab, "one", &["bob"])?;
    let bob_ip = bob.status(&lab, "one")?.virtual_ipv4()?;
    wait_until(
        CONVERGE,
        Duration::from_millis(100),
        "alice reaches bob",
        || Ok(lab.ping(&a, bob_ip, 1, Duration::from_secs(1))),
    )?;

    let pings = lab.start_ping_run(&a, bob_ip, 100, Duration::from_millis(100))?;
    let original = meshvpn::config::Config::load(&alice.config_dir, "one")?;
    let config = |level: Option<&str>, mtu: u16| -> Result<()> {
        let mut cfg = original.clone();
        cfg.log_level = level.map(str::to_string);
        cfg.mtu = mtu;
        cfg.save(&alice.config_dir)?;
        Ok(())
    };
    let changed = "reload: log level changed";
    // To warn, with an MTU change: the restart warning shows, and the level change (logged at
    // info once applied) does not, because the new level is in force.
    config(Some("warn"), 1300)?;
    hup_until(&alice, &lab, "node.mtu", 1)?;
    // A broken config is logged and ignored; the agent keeps running on the old one.
    let path = meshvpn::config::Config::path(&alice.config_dir, "one");
    std::fs::write(&path, "[node\nthis is not toml")?;
    hup_until(&alice, &lab, "keeping the running config", 1)?;
    ensure!(
        log_count(&alice, changed)? == 0,
        "the info line after switching to warn was logged: the level did not change"
    );
    // Back to info: the change shows again.
    config(Some("info"), 1300)?;
    hup_until(&alice, &lab, changed, 1)?;
    ensure!(
        alice.status(&lab, "one")?.peer_names() == ["bob"],
        "alice still lists bob after the reloads"
    );

    let text = std::fs::read_to_string(&alice.log)?;
    for line in text.lines().filter(|l| l.contains("reload")) {
        println!("alice: {line}");
    }
    let log = pings.finish(&lab)?;
    let silence = log.longest_silence_after(log.started.context("started")?);
    println!(
        "pings across the reloads: {} of {} answered, longest silence {silence:?}",
        log.received(),
        log.sent
    );
    ensure!(
        log.sent >= 90 && log.loss() < 0.05,
        "pings lost across the reloads: {} of {}",
        log.received(),
        log.sent
    );
    ensure!(
        silence.is_some_and(|s| s < Duration::from_secs(1)),
        "a reload interrupted the pings for {silence:?}"
    );
    drop((alice, bob, relay));
    lab.teardown();
    Ok(())
}

/// `GET <path>` on 127.0.0.1:`port` inside `host`'s namespace: the whole HTTP answer.
fn http_get(lab: &Lab, host: &lab::Host, port: u16, path: &str) -> Result<String> {
    use std::io::{Read as _, Write as _};
    let path = path.to_string();
    lab.in_namespace(&host.ns, move || -> Result<String> {
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
        let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        write!(s, "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")?;
        let mut answer = String::new();
        s.read_to_string(&mut answer)?;
        Ok(answer)
    })?
}

/// Whether `line` is a comment or `name{labels} value` / `name value`.
fn is_sample_or_comment(line: &str) -> bool {
    if line.starts_with('#') {
        return true;
    }
    let Some((series, value)) = line.rsplit_once(' ') else {
        return false;
    };
    let name_end = series.find('{').unwrap_or(series.len());
    let name = &series[..name_end];
    let labels_ok =
        name_end == series.len() || (series.ends_with('}') && series[name_end..].contains('='));
    !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
        && labels_ok
        && value.parse::<f64>().is_ok()
}

/// The value of the sample `series` (exact name and labels) in a metrics body.
fn sample(body: &str, series: &str) -> Option<f64> {
    body.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

#[test]
fn metrics_scrape_parses_and_shows_the_per_peer_path() -> Result<()> {
    if skip() {
        return Ok(());
    }
    let mut lab = Lab::new("metrics")?;
    let relay_host = lab.add_public_host("relay")?;
    let a = lab.add_public_host("a")?;
    let b = lab.add_public_host("b")?;
    let mut relay = Node::new(&lab, EXE.as_ref(), &relay_host, "relay")?;
    let relay_pid = relay.spawn(
        &lab,
        &[
            "relay",
            "--listen",
            &format!("0.0.0.0:{RELAY_PORT}"),
            "--metrics",
            "127.0.0.1:9103",
        ],
    )?;
    wait_until(
        Duration::from_secs(10),
        Duration::from_millis(50),
        "the relay to listen",
        || {
            ensure!(
                lab.is_running(relay_pid),
                "the relay exited; see {}",
                relay.log.display()
            );
            lab.udp_listening(&relay_host, RELAY_PORT)
        },
    )?;
    let relay_addr = format!("{}:{RELAY_PORT}", relay_host.public_addr);
    let token = relay.create_token(&lab, "one", &relay_addr, Some("10.141.0.0/16"))?;
    let mut nodes = Vec::new();
    for (host, name) in [(&a, "alice"), (&b, "bob")] {
        let node = Node::new(&lab, EXE.as_ref(), host, name)?;
        let file = node.write_token(&token)?;
        let file = file.to_string_lossy().into_owned();
        node.exec(
            &lab,
            &["join", "--token-file", &file, "--name", name, "--no-start"],
        )?;
        nodes.push(node);
    }
    let [mut alice, mut bob]: [Node; 2] = nodes.try_into().map_err(|_| anyhow::anyhow!("two"))?;
    // alice's from the command line, bob's from his config file.
    alice.spawn(&lab, &["up", "one", "--metrics", "127.0.0.1:9101"])?;
    let mut cfg = meshvpn::config::Config::load(&bob.config_dir, "one")?;
    cfg.metrics = Some("127.0.0.1:9102".parse()?);
    cfg.save(&bob.config_dir)?;
    bob.up(&lab, "one")?;
    wait_peers(&alice, &lab, "one", &["bob"])?;
    let bob_ip = bob.status(&lab, "one")?.virtual_ipv4()?;
    wait_until(
        CONVERGE,
        Duration::from_millis(200),
        "alice <-> bob direct, with traffic",
        || {
            Ok(lab.ping(&a, bob_ip, 1, Duration::from_secs(1))
                && alice.status(&lab, "one")?.peer("bob").map(|p| p.path)
                    == Some(lab::PeerPath::Direct))
        },
    )?;

    let answer = http_get(&lab, &a, 9101, "/metrics")?;
    let (head, body) = answer.split_once("\r\n\r\n").context("an HTTP answer")?;
    println!("{head}\n{body}");
    ensure!(head.starts_with("HTTP/1.1 200 OK"), "{head}");
    ensure!(
        head.contains("Content-Type: text/plain; version=0.0.4"),
        "{head}"
    );
    for line in body.lines() {
        ensure!(is_sample_or_comment(line), "not a metrics line: {line:?}");
    }
    let bob_path = |path: &str| {
        sample(
            body,
            &format!(r#"meshvpn_peer_path{{network="one",peer="bob",path="{path}"}}"#),
        )
    };
    ensure!(bob_path("direct") == Some(1.0), "bob's path is direct");
    ensure!(bob_path("relay") == Some(0.0), "and not relay");
    let rx = sample(
        body,
        r#"meshvpn_peer_rx_bytes_total{network="one",peer="bob"}"#,
    );
    ensure!(
        rx.is_some_and(|b| b > 0.0),
        "bytes from bob counted: {rx:?}"
    );
    let handshakes = sample(
        body,
        r#"meshvpn_peer_handshakes_total{network="one",peer="bob"}"#,
    );
    ensure!(handshakes.is_some_and(|h| h >= 1.0), "{handshakes:?}");
    ensure!(sample(body, r#"meshvpn_ready{network="one"}"#) == Some(1.0));
    ensure!(
        body.contains(r#"meshvpn_dropped_total{network="one",reason="malformed"}"#),
        "drops by reason"
    );
    let other = http_get(&lab, &a, 9101, "/")?;
    ensure!(other.starts_with("HTTP/1.1 404"), "{other}");
    let from_config = http_get(&lab, &b, 9102, "/metrics")?;
    ensure!(
        from_config.contains(r#"peer="alice",path="direct"} 1"#),
        "bob's metrics (from his config) show alice: {from_config}"
    );
    // The relay's metrics: both members in one network, forwarding and limit counters.
    let relay_answer = http_get(&lab, &relay_host, 9103, "/metrics")?;
    let (_, relay_body) = relay_answer
        .split_once("\r\n\r\n")
        .context("an HTTP answer from the relay")?;
    for line in relay_body.lines() {
        ensure!(is_sample_or_comment(line), "not a metrics line: {line:?}");
    }
    ensure!(
        sample(relay_body, "meshvpn_relay_members") == Some(2.0)
            && sample(relay_body, "meshvpn_relay_networks") == Some(1.0),
        "the relay's members and networks: {relay_body}"
    );
    let counters = relay_body
        .lines()
        .filter(|l| l.starts_with("meshvpn_relay_server_") && l.contains("_total "))
        .count();
    ensure!(counters >= 10, "the relay's server counters: {relay_body}");
    println!(
        "relay metrics: {} lines, {counters} server counters",
        relay_body.lines().count()
    );
    drop((alice, bob, relay));
    lab.teardown();
    Ok(())
}
