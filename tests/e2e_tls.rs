//! The relay over WebSocket-over-TLS on TCP 443, end to end: the real `meshvpn` binary in lab
//! namespaces (needs root; skips otherwise).
//!
//! A relay on a public host runs with `--tls-listen 0.0.0.0:443`. `meshvpn create` (on the
//! relay's host, as an operator would) records the TLS endpoint in the token. A host behind a
//! home router whose own firewall lets only TCP 443 out cannot reach the relay over UDP or its
//! TCP port (checked, so the firewall is known to work), yet gets the relay's key over
//! WebSocket-over-TLS with `meshvpn relay-probe`, and the relay's `relay-status` counts the
//! answered key requests and the stream connection. Then the client's firewall is narrowed to
//! a corporate one that lets only its HTTP proxy out (Debian's tinyproxy, with basic
//! authentication, on a third host): TLS straight to the relay now fails, and succeeds through
//! the proxy named in `HTTPS_PROXY`, whose log shows the CONNECT.
//!
//! Behind a reverse proxy: Debian's nginx terminates TLS on 443 of the relay's host and passes
//! `/vpn/relay` to the relay's plain `--ws-listen` on loopback; the relay runs with
//! `--advertise-tls 443`, so `create` records nginx's 443 and that path in the token. The same
//! 443-only client gets the key through it, and the relay counts the connection.
//!
//! A member on such a 443-only site (DNS allowed too) joins with the token alone: its agent
//! finds UDP and the relay's TCP port blocked, falls back to WebSocket-over-TLS on its own,
//! pings a public member through the relay, and its `status` shows that peer on `relay-tls`.
//! The same through a CONNECT proxy, and through nginx (whose access log shows the upgrade).
//!
//! Every wait is bounded; traffic only goes to addresses inside the lab's namespaces; the lab
//! (and every process it started) is torn down on drop, also on failure.

#![allow(clippy::print_stdout, clippy::unwrap_used)]
#![allow(clippy::disallowed_methods, clippy::disallowed_types)] // an end-to-end test: real time, real processes

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{ensure, Context as _, Result};
use meshvpn::wire::token::{TlsEndpoint, Token};
use meshvpn_lab::{self as lab, wait_until, Host, Lab, Nat, Node, PeerPath, Signal};

const EXE: &str = env!("CARGO_BIN_EXE_meshvpn");
const RELAY_PORT: u16 = 3478;
const TLS_PORT: u16 = 443;
/// How long the relay may take to start listening.
const START_BOUND: Duration = Duration::from_secs(10);
/// One probe: connect (5 s at most in the connector), ask, answer (5 s at most).
const PROBE_BOUND: Duration = Duration::from_secs(15);
/// The CONNECT proxy's port on its host.
const PROXY_PORT: u16 = 8888;
/// The path nginx passes to the relay's plain WebSocket listener.
const NGINX_PATH: &str = "/vpn/relay";
/// Joining through TLS: UDP is given up after 4 s, the TCP attempt times out after 5 s, then
/// TLS connects and registers within a second; members list each other soon after. Three
/// times that leaves room for a loaded machine.
const TLS_JOIN_BOUND: Duration = Duration::from_secs(45);
/// One ping through the tunnel waits this long for its reply.
const PING_WAIT: Duration = Duration::from_millis(500);

#[test]
fn host_that_only_reaches_tcp_443_gets_the_relay_over_tls() -> Result<()> {
    if !lab::is_root() {
        println!("skipping: needs root");
        return Ok(());
    }
    let mut lab = Lab::new("tls")?;
    let relay_host = lab.add_public_host("relay")?;
    let client_host = lab.add_natted_host("client", Nat::HomeRouter)?;
    let exe = Path::new(EXE);
    let mut relay = Node::new(&lab, exe, &relay_host, "relay")?;
    let client = Node::new(&lab, exe, &client_host, "client")?;

    start_tls_relay(&lab, &mut relay)?;

    // The operator's `create` asks the relay and records its TLS endpoint.
    let relay_addr = format!("{}:{RELAY_PORT}", relay_host.public_addr);
    let line = relay.create_token(&lab, "tls", &relay_addr, None)?;
    let token = Token::decode(&line).context("decoding the token")?;
    let endpoint = token
        .relays
        .first()
        .context("a relay in the token")?
        .clone();
    assert_eq!(endpoint.tls, Some(TlsEndpoint::new(TLS_PORT)));
    let named = format!("{}@{relay_addr}", endpoint.key);

    only_tcp_443_out(&lab, &client_host)?;

    // Over the relay's TCP port: blocked (this is what makes the TLS result mean something).
    let tcp = client.run(&lab, &["relay-probe", &named], PROBE_BOUND)?;
    assert!(
        !tcp.status.success(),
        "the firewall should block TCP {RELAY_PORT}: {}",
        String::from_utf8_lossy(&tcp.stdout)
    );

    // Over WebSocket-over-TLS on 443: the relay answers with the key in the token.
    let before = relay.relay_status(&lab)?;
    let tls = client.run(
        &lab,
        &["relay-probe", &named, "--tls-port", &TLS_PORT.to_string()],
        PROBE_BOUND,
    )?;
    let said = String::from_utf8_lossy(&tls.stdout);
    println!("{}", said.trim());
    assert!(
        tls.status.success(),
        "relay-probe over TLS failed: {}",
        String::from_utf8_lossy(&tls.stderr)
    );
    assert!(said.contains("over Tls"), "{said}");
    let after = relay.relay_status(&lab)?;
    let answered = |s: &serde_json::Value| lab::relay_counter(s, "/server/key_requests_answered");
    assert!(
        answered(&after)? > answered(&before)?,
        "relay-status counts the key request answered over TLS"
    );
    let accepted = |s: &serde_json::Value| lab::relay_counter(s, "/tcp/counters/accepted");
    assert!(
        accepted(&after)? > accepted(&before)?,
        "the TLS connection went through the relay's connection table"
    );

    // A corporate network: only the proxy is reachable, and it wants a password.
    let proxy_host = lab.add_public_host("proxy")?;
    let proxy_log = lab.dir().join("tinyproxy.log");
    start_tinyproxy(&lab, &proxy_host, &proxy_log)?;
    lab.exec(
        &client_host,
        &["nft", "flush", "chain", "inet", "egress", "out"],
    )?;
    for rule in [
        "add rule inet egress out oifname lo accept".to_string(),
        "add rule inet egress out ct state established,related accept".to_string(),
        format!(
            "add rule inet egress out ip daddr {} tcp dport {PROXY_PORT} accept",
            proxy_host.addr
        ),
    ] {
        let mut args = vec!["nft"];
        args.extend(rule.split(' '));
        lab.exec(&client_host, &args)?;
    }
    let tls_args = ["relay-probe", &named, "--tls-port", &TLS_PORT.to_string()];
    let direct = client.run(&lab, &tls_args, PROBE_BOUND)?;
    assert!(
        !direct.status.success(),
        "the corporate firewall should block TLS straight to the relay"
    );
    let with_proxy = |url: &str| -> Result<std::process::Output> {
        let mut args: Vec<OsString> = vec![
            "env".into(),
            format!("HTTPS_PROXY={url}").into(),
            EXE.into(),
        ];
        args.extend(client.args(&tls_args));
        lab.run(&client_host, &args, PROBE_BOUND)
    };
    let proxy_url = format!("http://member:s3cret@{}:{PROXY_PORT}", proxy_host.addr);
    let proxied = with_proxy(&proxy_url)?;
    let said = String::from_utf8_lossy(&proxied.stdout);
    println!("{}", said.trim());
    assert!(
        proxied.status.success(),
        "relay-probe through the proxy failed: {}",
        String::from_utf8_lossy(&proxied.stderr)
    );
    assert!(said.contains("over Tls via proxy"), "{said}");
    let log = std::fs::read_to_string(&proxy_log).unwrap_or_default();
    assert!(
        log.contains(&format!("{}:{TLS_PORT}", relay_host.public_addr)),
        "tinyproxy logged the CONNECT to the relay:\n{log}"
    );
    let refused = with_proxy(&format!(
        "http://member:wrong@{}:{PROXY_PORT}",
        proxy_host.addr
    ))?;
    assert!(
        !refused.status.success(),
        "the proxy refuses a wrong password"
    );
    lab.teardown();
    Ok(())
}

#[test]
fn host_that_only_reaches_tcp_443_gets_the_relay_behind_nginx() -> Result<()> {
    if !lab::is_root() {
        println!("skipping: needs root");
        return Ok(());
    }
    let mut lab = Lab::new("tls-nginx")?;
    let relay_host = lab.add_public_host("relay")?;
    let client_host = lab.add_natted_host("client", Nat::HomeRouter)?;
    let exe = Path::new(EXE);
    let mut relay = Node::new(&lab, exe, &relay_host, "relay")?;
    let client = Node::new(&lab, exe, &client_host, "client")?;
    start_relay_behind_nginx(&lab, &mut relay)?;
    let relay_addr = format!("{}:{RELAY_PORT}", relay_host.public_addr);
    let line = relay.create_token(&lab, "tls", &relay_addr, None)?;
    let token = Token::decode(&line).context("decoding the token")?;
    let endpoint = token.relays.first().context("a relay")?;
    assert_eq!(
        endpoint.tls,
        Some(nginx_endpoint()),
        "the token names nginx's 443"
    );
    let named = format!("{}@{relay_addr}", endpoint.key);
    only_tcp_443_out(&lab, &client_host)?;

    let before = relay.relay_status(&lab)?;
    let args = [
        "relay-probe",
        &named,
        "--tls-port",
        &TLS_PORT.to_string(),
        "--ws-path",
        NGINX_PATH,
    ];
    let out = client.run(&lab, &args, PROBE_BOUND)?;
    let said = String::from_utf8_lossy(&out.stdout);
    println!("{}", said.trim());
    assert!(
        out.status.success(),
        "relay-probe through nginx failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let after = relay.relay_status(&lab)?;
    assert!(
        lab::relay_counter(&after, "/tcp/counters/accepted")?
            > lab::relay_counter(&before, "/tcp/counters/accepted")?,
        "the proxied connection went through the relay's connection table"
    );
    let wrong_path = client.run(&lab, &args[..4], PROBE_BOUND)?;
    assert!(
        !wrong_path.status.success(),
        "nginx passes only {NGINX_PATH} to the relay"
    );
    lab.teardown();
    Ok(())
}

#[test]
fn member_on_a_443_only_site_joins_through_the_tls_relay_and_pings_a_public_member() -> Result<()> {
    join_through_tls("tls-join", Site::Only443)
}

#[test]
fn member_behind_a_connect_proxy_joins_through_the_tls_relay_and_pings_a_public_member(
) -> Result<()> {
    join_through_tls("tls-join-proxy", Site::ConnectProxy)
}

#[test]
fn member_on_a_443_only_site_joins_through_nginx_and_pings_a_public_member() -> Result<()> {
    join_through_tls("tls-join-nginx", Site::Only443ToNginx)
}

/// How bob's site reaches the relay's WebSocket-over-TLS endpoint.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Site {
    /// Only TCP 443 and DNS out; the relay serves TLS on 443 itself.
    Only443,
    /// Only a CONNECT proxy (tinyproxy) out, named to bob's agent in `HTTPS_PROXY`.
    ConnectProxy,
    /// Only TCP 443 and DNS out; nginx terminates TLS on 443 of the relay's host and passes
    /// [`NGINX_PATH`] to the relay's plain WebSocket listener.
    Only443ToNginx,
}

/// The TLS endpoint a token names for the relay behind nginx.
fn nginx_endpoint() -> TlsEndpoint {
    TlsEndpoint {
        port: TLS_PORT,
        path: NGINX_PATH.to_string(),
    }
}

/// A public member (alice) and a member (bob) on a home network whose firewall lets only what
/// `site` says out: bob joins with the token alone, pings alice's virtual IP and shows her on
/// `relay-tls`.
fn join_through_tls(tag: &str, site: Site) -> Result<()> {
    if !lab::is_root() {
        println!("skipping: needs root");
        return Ok(());
    }
    let mut lab = Lab::new(tag)?;
    let relay_host = lab.add_public_host("relay")?;
    let alice_host = lab.add_public_host("alice")?;
    let bob_host = lab.add_natted_host("bob", Nat::HomeRouter)?;
    let exe = Path::new(EXE);
    let mut relay = Node::new(&lab, exe, &relay_host, "relay")?;
    let mut alice = Node::new(&lab, exe, &alice_host, "alice")?;
    let bob = Node::new(&lab, exe, &bob_host, "bob")?;
    let (nginx_log, expected) = if site == Site::Only443ToNginx {
        let log = start_relay_behind_nginx(&lab, &mut relay)?;
        (Some(log), nginx_endpoint())
    } else {
        start_tls_relay(&lab, &mut relay)?;
        (None, TlsEndpoint::new(TLS_PORT))
    };
    let relay_addr = format!("{}:{RELAY_PORT}", relay_host.public_addr);
    let token = relay.create_token(&lab, "tlsjoin", &relay_addr, None)?;
    let recorded = Token::decode(&token).context("decoding the token")?;
    assert_eq!(
        recorded.relays.first().and_then(|r| r.tls.clone()),
        Some(expected),
        "`create` records the relay's TLS endpoint"
    );

    let mut env = Vec::new();
    let proxy_log = lab.dir().join("tinyproxy.log");
    let via_proxy = site == Site::ConnectProxy;
    if via_proxy {
        let proxy_host = lab.add_public_host("proxy")?;
        start_tinyproxy(&lab, &proxy_host, &proxy_log)?;
        only_proxy_out(&lab, &bob_host, &proxy_host)?;
        env.push(format!(
            "HTTPS_PROXY=http://member:s3cret@{}:{PROXY_PORT}",
            proxy_host.addr
        ));
    } else {
        only_tcp_443_out(&lab, &bob_host)?;
    }
    // The site's firewall guards the uplink; what bob sends into his own tunnel is his.
    lab.exec(
        &bob_host,
        &[
            "nft",
            "insert",
            "rule",
            "inet",
            "egress",
            "out",
            "oifname",
            "mvpn-tlsjoin",
            "accept",
        ],
    )?;
    alice.join(&lab, &token, &[])?;
    let joined = std::time::Instant::now();
    let mut args: Vec<OsString> = env.into_iter().map(OsString::from).collect();
    args.push(EXE.into());
    args.extend(bob.args(&["join", token.as_str(), "--name", "bob"]));
    let bob_pid = lab.spawn(&bob_host, "env", &args, &bob.log)?;

    // Bob lists alice, and alice's virtual IP answers a ping through the relay's TLS stream.
    let mut alice_ip = None;
    wait_until(
        TLS_JOIN_BOUND,
        Duration::from_millis(200),
        "bob to list alice",
        || {
            ensure!(
                lab.is_running(bob_pid),
                "bob exited; see {}",
                bob.log.display()
            );
            ensure!(
                alice.is_running(&lab),
                "alice exited; see {}",
                alice.log.display()
            );
            let status = bob.status(&lab, "tlsjoin")?;
            alice_ip = status
                .peer("alice")
                .and_then(|p| p.virtual_ip.parse::<std::net::Ipv4Addr>().ok());
            Ok(alice_ip.is_some())
        },
    )?;
    let alice_ip = alice_ip.context("alice's virtual IP")?;
    let wait_s = format!("{:.2}", PING_WAIT.as_secs_f64());
    let ip = alice_ip.to_string();
    let ping = ["ping", "-n", "-c", "1", "-W", wait_s.as_str(), ip.as_str()];
    wait_until(
        TLS_JOIN_BOUND,
        Duration::from_millis(100),
        "a ping from bob to alice through the TLS relay",
        || {
            Ok(lab
                .run(&bob_host, &ping, PING_WAIT + Duration::from_secs(5))?
                .status
                .success())
        },
    )?;
    println!(
        "[{tag}] bob pings alice {:.1?} after joining",
        joined.elapsed()
    );

    let status = bob.status(&lab, "tlsjoin")?;
    let path = status.peer("alice").map(|p| p.path);
    println!("[{tag}] bob shows alice on {path:?}");
    assert_eq!(
        path,
        Some(PeerPath::RelayTls),
        "bob reaches the relay over TLS only"
    );
    assert!(status.relay.registered, "bob is registered with the relay");
    let table = bob.status_table(&lab, "tlsjoin")?;
    assert!(table.contains("relay-tls"), "{table}");
    let alice_view = alice.status(&lab, "tlsjoin")?;
    let bob_path = alice_view.peer("bob").map(|p| p.path);
    println!("[{tag}] alice shows bob on {bob_path:?}");
    assert_eq!(
        bob_path,
        Some(PeerPath::Relay),
        "alice still uses the relay over UDP"
    );
    let relay_view = relay.relay_status(&lab)?;
    assert!(
        lab::relay_counter(&relay_view, "/tcp/counters/accepted")? > 0,
        "bob's stream went through the relay's connection table"
    );
    if via_proxy {
        let log = std::fs::read_to_string(&proxy_log).unwrap_or_default();
        assert!(
            log.contains(&format!("{}:{TLS_PORT}", relay_host.public_addr)),
            "tinyproxy logged the CONNECT to the relay:\n{log}"
        );
    }
    if let Some(access_log) = nginx_log {
        // nginx logs a request when it ends; for a WebSocket that is when the stream closes.
        lab.stop(bob_pid, Signal::Term)?;
        let upgrade = format!("\"GET {NGINX_PATH} HTTP/1.1\" 101 ");
        let mut logged = String::new();
        wait_until(
            START_BOUND,
            Duration::from_millis(100),
            "nginx to log bob's WebSocket upgrade",
            || {
                logged = std::fs::read_to_string(&access_log).unwrap_or_default();
                Ok(logged.contains(&upgrade))
            },
        )
        .with_context(|| format!("nginx's access log:\n{logged}"))?;
        let line = logged.lines().find(|l| l.contains(&upgrade)).unwrap_or("");
        println!("[{tag}] nginx: {line}");
    }
    lab.teardown();
    Ok(())
}

/// Starts tinyproxy on `host` (CONNECT to port 443 only, basic authentication
/// `member:s3cret`), logging to `log`, and waits until it listens.
fn start_tinyproxy(lab: &Lab, host: &Host, log: &Path) -> Result<()> {
    let conf = lab.dir().join("tinyproxy.conf");
    std::fs::write(
        &conf,
        format!(
            "User nobody\nGroup nogroup\nPort {PROXY_PORT}\nListen 0.0.0.0\nTimeout 60\n\
             MaxClients 10\nConnectPort 443\nBasicAuth member s3cret\nLogLevel Connect\n"
        ),
    )?;
    let conf_arg = conf.to_string_lossy().into_owned();
    let pid = lab.spawn(host, "tinyproxy", &["-d", "-c", &conf_arg], log)?;
    wait_for_tcp(lab, host, PROXY_PORT, pid, "tinyproxy")
}

/// The host's own firewall: only the proxy (and DNS, and replies) out.
fn only_proxy_out(lab: &Lab, host: &Host, proxy: &Host) -> Result<()> {
    for rule in [
        "add table inet egress".to_string(),
        "add chain inet egress out { type filter hook output priority 0; policy drop; }"
            .to_string(),
        "add rule inet egress out oifname lo accept".to_string(),
        "add rule inet egress out ct state established,related accept".to_string(),
        "add rule inet egress out udp dport 53 accept".to_string(),
        format!(
            "add rule inet egress out ip daddr {} tcp dport {PROXY_PORT} accept",
            proxy.addr
        ),
    ] {
        let mut args = vec!["nft"];
        args.extend(rule.split(' '));
        lab.exec(host, &args)?;
    }
    Ok(())
}

/// Starts the relay on `relay`'s host with its UDP port and plain WebSocket on loopback port
/// 8080 at [`NGINX_PATH`], advertising TLS port 443 in its key responses, and Debian's nginx in
/// front of it: TLS on 443 (a self-signed certificate), [`NGINX_PATH`] passed to the relay with
/// the WebSocket upgrade. Waits until both listen; returns nginx's access log.
fn start_relay_behind_nginx(lab: &Lab, relay: &mut Node) -> Result<PathBuf> {
    let pid = relay.spawn(
        lab,
        &[
            "relay",
            "--listen",
            &format!("0.0.0.0:{RELAY_PORT}"),
            "--ws-listen",
            "127.0.0.1:8080",
            "--ws-path",
            NGINX_PATH,
            "--advertise-tls",
            &TLS_PORT.to_string(),
        ],
    )?;
    wait_for_tcp(
        lab,
        &relay.host,
        8080,
        pid,
        "the relay's WebSocket listener",
    )?;

    let dir = lab.dir().to_path_buf();
    let d = dir.to_string_lossy().into_owned();
    lab.exec(
        &relay.host,
        &[
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=relay",
            "-keyout",
            &format!("{d}/proxy.key"),
            "-out",
            &format!("{d}/proxy.crt"),
        ],
    )?;
    let conf = dir.join("nginx.conf");
    std::fs::write(
        &conf,
        format!(
            "daemon off;\nworker_processes 1;\npid {d}/nginx.pid;\nerror_log stderr info;\n\
             events {{ worker_connections 64; }}\n\
             http {{\n  access_log {d}/nginx-access.log;\n\
               client_body_temp_path {d}/nginx-body;\n  proxy_temp_path {d}/nginx-proxy;\n\
               server {{\n    listen {TLS_PORT} ssl;\n\
                 ssl_certificate {d}/proxy.crt;\n    ssl_certificate_key {d}/proxy.key;\n\
                 location {NGINX_PATH} {{\n      proxy_pass http://127.0.0.1:8080;\n\
                   proxy_http_version 1.1;\n      proxy_set_header Upgrade $http_upgrade;\n\
                   proxy_set_header Connection \"upgrade\";\n      proxy_read_timeout 1h;\n\
                 }}\n  }}\n}}\n"
        ),
    )?;
    let conf_arg = conf.to_string_lossy().into_owned();
    let nginx = lab.spawn(
        &relay.host,
        "nginx",
        &["-c", &conf_arg, "-e", "stderr"],
        &dir.join("nginx.log"),
    )?;
    wait_for_tcp(lab, &relay.host, TLS_PORT, nginx, "nginx")?;
    Ok(dir.join("nginx-access.log"))
}

/// Starts the relay on `relay`'s host with its UDP port and WebSocket-over-TLS on 443, and
/// waits until the TLS listener is up.
fn start_tls_relay(lab: &Lab, relay: &mut Node) -> Result<()> {
    let pid = relay.spawn(
        lab,
        &[
            "relay",
            "--listen",
            &format!("0.0.0.0:{RELAY_PORT}"),
            "--tls-listen",
            &format!("0.0.0.0:{TLS_PORT}"),
        ],
    )?;
    wait_for_tcp(lab, &relay.host, TLS_PORT, pid, "the relay's TLS listener")
}

/// Waits until `pid` listens on TCP `port` in `host`.
fn wait_for_tcp(lab: &Lab, host: &Host, port: u16, pid: u32, what: &str) -> Result<()> {
    wait_until(START_BOUND, Duration::from_millis(50), what, || {
        ensure!(lab.is_running(pid), "{what} exited early");
        let sport = format!(":{port}");
        let out = lab.run(host, &["ss", "-Hltn", "sport", "=", &sport], START_BOUND)?;
        Ok(!out.stdout.is_empty())
    })?;
    Ok(())
}

/// The host's own firewall: only TCP 443 and DNS (and replies) out.
fn only_tcp_443_out(lab: &Lab, host: &Host) -> Result<()> {
    for rule in [
        "add table inet egress",
        "add chain inet egress out { type filter hook output priority 0; policy drop; }",
        "add rule inet egress out oifname lo accept",
        "add rule inet egress out ct state established,related accept",
        "add rule inet egress out tcp dport 443 accept",
        "add rule inet egress out udp dport 53 accept",
        "add rule inet egress out tcp dport 53 accept",
    ] {
        let mut args = vec!["nft"];
        args.extend(rule.split(' '));
        lab.exec(host, &args)?;
    }
    Ok(())
}
