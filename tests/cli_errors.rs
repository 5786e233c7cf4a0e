//! Error messages of the real `meshvpn` binary: one `error: ...` line on stderr and a non-zero
//! exit. No network namespaces and no network traffic (the token names its relay by key, so
//! `create` never contacts it).

#![allow(clippy::print_stdout)] // shows what each command printed, or why a test skipped
#![allow(clippy::disallowed_methods)] // times a child process with the real clock

use std::io::Write as _;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context as _, Result};

const EXE: &str = env!("CARGO_BIN_EXE_meshvpn");
/// A valid relay public key (base64 of the bytes 0..32); the relay is never contacted.
const RELAY_KEY: &str = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";

/// A scratch directory removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> Result<TempDir> {
        static N: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "mvtest-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        ));
        if dir.exists() {
            std::fs::remove_dir_all(&dir)?;
        }
        for sub in ["config", "run"] {
            std::fs::create_dir_all(dir.join(sub))?;
        }
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755))?;
        Ok(TempDir(dir))
    }

    fn config(&self) -> PathBuf {
        self.0.join("config")
    }

    fn run(&self) -> PathBuf {
        self.0.join("run")
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// `meshvpn --config-dir .. --run-dir .. <args>` with a clean environment for meshvpn's vars.
fn meshvpn(exe: &Path, dir: &TempDir, args: &[&str]) -> Result<Output> {
    Command::new(exe)
        .arg("--config-dir")
        .arg(dir.config())
        .arg("--run-dir")
        .arg(dir.run())
        .args(args)
        .env_remove("MESHVPN_CONFIG_DIR")
        .env_remove("MESHVPN_RUN_DIR")
        .env_remove("RUST_LOG")
        .output()
        .with_context(|| format!("running {} {args:?}", exe.display()))
}

/// Asserts a failure with exactly one stderr line that starts with `error: ` and contains
/// `needle`.
fn assert_one_line_error(out: &Output, needle: &str) -> Result<()> {
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("exit {:?}, stderr: {}", out.status.code(), stderr.trim());
    ensure!(
        !out.status.success(),
        "expected failure, got {}",
        out.status
    );
    let lines: Vec<&str> = stderr.trim().lines().collect();
    ensure!(
        lines.len() == 1,
        "expected one stderr line, got {}: {stderr:?}",
        lines.len()
    );
    ensure!(
        lines[0].starts_with("error: "),
        "stderr does not start with \"error: \": {stderr:?}"
    );
    ensure!(
        lines[0].contains(needle),
        "stderr does not contain {needle:?}: {stderr:?}"
    );
    Ok(())
}

fn make_token(dir: &TempDir) -> Result<String> {
    let relay = format!("{RELAY_KEY}@127.0.0.1:9");
    let out = meshvpn(EXE.as_ref(), dir, &["create", "x", "--relay", &relay])?;
    ensure!(
        out.status.success(),
        "create failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = stdout.trim().lines().collect();
    ensure!(
        lines.len() == 1 && lines[0].starts_with("mvpn2"),
        "create should print one token line, printed {stdout:?}"
    );
    Ok(lines[0].to_string())
}

#[test]
fn mistyped_token_is_a_checksum_mismatch() -> Result<()> {
    let dir = TempDir::new()?;
    let token = make_token(&dir)?;
    // Change one character in the middle to another base64 (URL-safe alphabet) character.
    let mut chars: Vec<char> = token.chars().collect();
    let mid = chars.len() / 2;
    chars[mid] = if chars[mid] == 'A' { 'B' } else { 'A' };
    let typo: String = chars.into_iter().collect();
    println!("token: {token}\ntypo:  {typo}");
    let out = meshvpn(
        EXE.as_ref(),
        &dir,
        &["join", &typo, "--no-start", "--name", "t"],
    )?;
    assert_one_line_error(&out, "token checksum mismatch")?;
    ensure!(
        std::fs::read_dir(dir.config())?.next().is_none(),
        "a refused token must not write a config"
    );

    // The untouched token is accepted (so the failure above is the typo's doing).
    let out = meshvpn(
        EXE.as_ref(),
        &dir,
        &["join", &token, "--no-start", "--name", "t"],
    )?;
    ensure!(
        out.status.success(),
        "join --no-start with the real token failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    ensure!(dir.config().join("x.toml").exists(), "no x.toml written");
    Ok(())
}

#[test]
fn up_without_config_names_the_problem() -> Result<()> {
    if !is_root() {
        // As non-root the privilege check comes first (covered by the next test).
        println!("skipping: needs root (a non-root `up` fails on privileges first)");
        return Ok(());
    }
    let dir = TempDir::new()?;
    let out = meshvpn(EXE.as_ref(), &dir, &["up", "missingnet"])?;
    assert_one_line_error(&out, "no configuration for network")
}

/// Whether `path` and every directory above it are world-executable (and the file readable).
fn world_executable(path: &Path) -> bool {
    let mode = |p: &Path| {
        std::fs::metadata(p)
            .map(|m| m.permissions().mode())
            .unwrap_or(0)
    };
    mode(path) & 0o005 == 0o005 && path.ancestors().skip(1).all(|a| mode(a) & 0o001 != 0)
}

#[test]
fn up_as_non_root_asks_for_root() -> Result<()> {
    if !is_root() {
        println!("skipping: needs root (to switch to an unprivileged user)");
        return Ok(());
    }
    if Command::new("setpriv").arg("--version").output().is_err() {
        println!("skipping: setpriv (util-linux) not installed");
        return Ok(());
    }
    let dir = TempDir::new()?;
    let exe = if world_executable(Path::new(EXE)) {
        PathBuf::from(EXE)
    } else {
        let copy = dir.0.join("meshvpn");
        std::fs::copy(EXE, &copy)?;
        std::fs::set_permissions(&copy, std::fs::Permissions::from_mode(0o755))?;
        copy
    };
    let out = Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--inh-caps=-all",
        ])
        .arg(&exe)
        .arg("--config-dir")
        .arg(dir.config())
        .arg("--run-dir")
        .arg(dir.run())
        .args(["up", "foo"])
        .env_remove("RUST_LOG")
        .output()
        .context("running setpriv")?;
    assert_one_line_error(&out, "root")
}

#[test]
fn subnets_outside_private_space_are_refused() -> Result<()> {
    let dir = TempDir::new()?;
    let relay = format!("{RELAY_KEY}@127.0.0.1:9");
    for subnet in ["0.0.0.0/1", "8.8.0.0/16", "172.32.0.0/16"] {
        let out = meshvpn(
            EXE.as_ref(),
            &dir,
            &["create", "x", "--relay", &relay, "--subnet", subnet],
        )?;
        assert_one_line_error(
            &out,
            &format!("subnet {subnet} is outside private address space"),
        )?;
    }
    let out = meshvpn(
        EXE.as_ref(),
        &dir,
        &[
            "create",
            "x",
            "--relay",
            &relay,
            "--subnet",
            "100.64.0.0/16",
        ],
    )?;
    ensure!(out.status.success(), "a 100.64/10 subnet must be accepted");

    // A token made elsewhere (an older build, or by hand) with a public subnet.
    let wide = meshvpn::wire::token::Token {
        network: "wide".into(),
        secret: meshvpn::keys::NetworkSecret([7; 32]),
        subnet: "0.0.0.0/1".parse()?,
        relays: vec![relay.parse().map_err(anyhow::Error::msg)?],
    };
    let out = meshvpn(
        EXE.as_ref(),
        &dir,
        &["join", &wide.encode(), "--no-start", "--name", "t"],
    )?;
    assert_one_line_error(&out, "subnet 0.0.0.0/1 is outside private address space")?;
    ensure!(
        !dir.config().join("wide.toml").exists(),
        "a refused subnet must not write a config"
    );
    Ok(())
}

/// Waits for `child` to exit within `limit`; kills it (and fails) otherwise.
fn wait_bounded(child: &mut std::process::Child, limit: Duration) -> Result<ExitStatus> {
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait()? {
            println!("exited with {status} after {:?}", start.elapsed());
            return Ok(status);
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            anyhow::bail!("still running after {limit:?}; killed it");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_token_from_stdin_never_appears_in_the_process_arguments() -> Result<()> {
    let dir = TempDir::new()?;
    let token = make_token(&dir)?;
    let mut child = Command::new(EXE)
        .arg("--config-dir")
        .arg(dir.config())
        .arg("--run-dir")
        .arg(dir.run())
        .args(["join", "-", "--no-start", "--name", "t"])
        .env_remove("RUST_LOG")
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting meshvpn join -")?;
    // Until exec completes, /proc shows the test's own arguments: wait for meshvpn's.
    let cmdline_path = format!("/proc/{}/cmdline", child.id());
    let start = Instant::now();
    let cmdline = loop {
        let raw = std::fs::read(&cmdline_path).unwrap_or_default();
        let text = String::from_utf8_lossy(&raw).replace('\0', " ");
        if text.contains(" join - ") {
            break text;
        }
        if start.elapsed() > Duration::from_secs(10) {
            let _ = child.kill();
            let _ = child.wait();
            anyhow::bail!("meshvpn's arguments never showed in {cmdline_path}: {text:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    println!("{cmdline_path}: {cmdline}");
    let leaked = cmdline.contains(&token) || cmdline.contains("mvpn1");
    let mut stdin = child.stdin.take().context("stdin is piped")?;
    writeln!(stdin, "{token}")?;
    drop(stdin);
    let status = wait_bounded(&mut child, Duration::from_secs(20))?;
    ensure!(!leaked, "the token is in {cmdline_path}: {cmdline:?}");
    let mut stderr = String::new();
    if let Some(mut e) = child.stderr.take() {
        std::io::Read::read_to_string(&mut e, &mut stderr)?;
    }
    ensure!(status.success(), "join - failed: {stderr}");
    ensure!(
        dir.config().join("x.toml").exists(),
        "join - did not write x.toml (the token from stdin was not used)"
    );

    // --token-file reads it from a file.
    let dir = TempDir::new()?;
    let token = make_token(&dir)?;
    let file = dir.0.join("token.txt");
    std::fs::write(&file, format!("{token}\n"))?;
    let file = file.to_string_lossy().into_owned();
    let out = meshvpn(
        EXE.as_ref(),
        &dir,
        &["join", "--token-file", &file, "--no-start", "--name", "t"],
    )?;
    ensure!(
        out.status.success(),
        "join --token-file failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    ensure!(dir.config().join("x.toml").exists(), "no x.toml written");
    let out = meshvpn(
        EXE.as_ref(),
        &dir,
        &["join", "--token-file", "/nonexistent/token", "--no-start"],
    )?;
    assert_one_line_error(&out, "/nonexistent/token")
}

#[test]
fn a_config_others_may_read_is_refused() -> Result<()> {
    if !is_root() {
        println!("skipping: needs root (a non-root `up` fails on privileges first)");
        return Ok(());
    }
    let dir = TempDir::new()?;
    let token = make_token(&dir)?;
    let out = meshvpn(
        EXE.as_ref(),
        &dir,
        &["join", &token, "--no-start", "--name", "t"],
    )?;
    ensure!(
        out.status.success(),
        "join --no-start failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let path = dir.config().join("x.toml");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644))?;
    // Were the check missing, `up` would start an agent: bound it and kill it.
    let mut child = Command::new(EXE)
        .arg("--config-dir")
        .arg(dir.config())
        .arg("--run-dir")
        .arg(dir.run())
        .args(["up", "x"])
        .env_remove("RUST_LOG")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting meshvpn up")?;
    let status = wait_bounded(&mut child, Duration::from_secs(20))?;
    let mut stderr = String::new();
    if let Some(mut e) = child.stderr.take() {
        std::io::Read::read_to_string(&mut e, &mut stderr)?;
    }
    let out = Output {
        status,
        stdout: Vec::new(),
        stderr: stderr.into_bytes(),
    };
    assert_one_line_error(&out, &format!("{} has mode 0644", path.display()))
}

/// The exit code of `out` (printed with its stderr).
fn exit_code(out: &Output) -> Option<i32> {
    println!(
        "exit {:?}, stderr: {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    out.status.code()
}

/// Writes the config of network `network` into `dir` with `join --no-start`.
fn join_no_start(dir: &TempDir, network: &str) -> Result<()> {
    let relay = format!("{RELAY_KEY}@127.0.0.1:9");
    let out = meshvpn(EXE.as_ref(), dir, &["create", network, "--relay", &relay])?;
    ensure!(out.status.success(), "create {network} failed");
    let token = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let out = meshvpn(
        EXE.as_ref(),
        dir,
        &["join", &token, "--no-start", "--name", "me"],
    )?;
    ensure!(
        out.status.success(),
        "join {network} --no-start failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// A stand-in for an agent on the control socket `path`: answers each request line with
/// `answer(line)` until `connections` were served or 20 s passed. Returns the number served.
fn fake_agent(
    path: &Path,
    connections: usize,
    answer: fn(&str) -> String,
) -> Result<std::thread::JoinHandle<usize>> {
    use std::io::{BufRead as _, BufReader};
    let listener = std::os::unix::net::UnixListener::bind(path)
        .with_context(|| format!("binding {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    listener.set_nonblocking(true)?;
    Ok(std::thread::spawn(move || {
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut served = 0;
        while served < connections && Instant::now() < deadline {
            let Ok((stream, _)) = listener.accept() else {
                std::thread::sleep(Duration::from_millis(10));
                continue;
            };
            served += 1;
            let _ = stream.set_nonblocking(false);
            let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
            let mut line = String::new();
            let mut reader = BufReader::new(&stream);
            if reader.read_line(&mut line).is_ok() {
                let mut w = &stream;
                let _ = writeln!(w, "{}", answer(line.trim()));
            }
        }
        served
    }))
}

fn ping_unknown_member(_: &str) -> String {
    r#"{"peer":"bob","ok":false,"path":null,"endpoint":null,"rtt_ms":null,"error":"no member named or addressed \"bob\""}"#.into()
}

fn ping_no_answer(_: &str) -> String {
    r#"{"peer":"bob","ok":false,"path":null,"endpoint":null,"rtt_ms":null,"error":"no answer within 3s"}"#.into()
}

fn ping_answered(_: &str) -> String {
    r#"{"peer":"bob","ok":true,"path":"relay","endpoint":null,"rtt_ms":1.5,"error":null}"#.into()
}

#[test]
fn exit_codes_tell_usage_not_running_and_unreachable_peers_apart() -> Result<()> {
    let dir = TempDir::new()?;
    // 2: clap's usage errors.
    let out = meshvpn(EXE.as_ref(), &dir, &["status", "--bogus"])?;
    ensure!(exit_code(&out) == Some(2), "an unknown option exits 2");
    join_no_start(&dir, "x")?;

    // 3: no agent (no socket; then a stale socket file nobody accepts on).
    for args in [
        &["status", "x"][..],
        &["status"],
        &["ping", "bob"],
        &["peers"],
        &["netcheck", "x"],
        &["down", "x"],
    ] {
        let out = meshvpn(EXE.as_ref(), &dir, args)?;
        ensure!(
            exit_code(&out) == Some(3),
            "{args:?} without an agent exits 3"
        );
        assert_one_line_error(&out, "not running")?;
    }
    let socket = dir.run().join("x.sock");
    drop(std::os::unix::net::UnixListener::bind(&socket)?);
    let out = meshvpn(EXE.as_ref(), &dir, &["status", "x"])?;
    ensure!(exit_code(&out) == Some(3), "a stale socket exits 3");
    std::fs::remove_file(&socket)?;

    // 5: the agent knows no such member, or the member does not answer; 0 once it does.
    let agent = fake_agent(&socket, 1, ping_unknown_member)?;
    let out = meshvpn(EXE.as_ref(), &dir, &["ping", "bob", "-c", "1"])?;
    ensure!(exit_code(&out) == Some(5), "an unknown member exits 5");
    assert_one_line_error(&out, "no member named")?;
    ensure!(
        agent.join().ok() == Some(1),
        "the fake agent was asked once"
    );
    std::fs::remove_file(&socket)?;
    let agent = fake_agent(&socket, 2, ping_no_answer)?;
    let out = meshvpn(EXE.as_ref(), &dir, &["ping", "bob", "-c", "2"])?;
    ensure!(exit_code(&out) == Some(5), "a silent peer exits 5");
    assert_one_line_error(&out, "did not answer any of 2 pings")?;
    ensure!(
        agent.join().ok() == Some(2),
        "the fake agent was asked twice"
    );
    std::fs::remove_file(&socket)?;
    let agent = fake_agent(&socket, 1, ping_answered)?;
    let out = meshvpn(EXE.as_ref(), &dir, &["ping", "bob", "-c", "1"])?;
    ensure!(exit_code(&out) == Some(0), "an answered ping exits 0");
    ensure!(String::from_utf8_lossy(&out.stdout).contains("pong from bob via relay"));
    ensure!(agent.join().ok() == Some(1));
    std::fs::remove_file(&socket)?;

    // 2 again: with two networks a command that needs one must be told which.
    join_no_start(&dir, "y")?;
    let out = meshvpn(EXE.as_ref(), &dir, &["ping", "bob"])?;
    ensure!(exit_code(&out) == Some(2), "an ambiguous network exits 2");
    assert_one_line_error(&out, "several networks are configured (x, y)")
}

/// `meshvpn` run as user nobody (uid 65534) with no groups and no capabilities.
fn meshvpn_as_nobody(exe: &Path, dir: &TempDir, args: &[&str]) -> Result<Output> {
    Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--inh-caps=-all",
        ])
        .arg(exe)
        .arg("--config-dir")
        .arg(dir.config())
        .arg("--run-dir")
        .arg(dir.run())
        .args(args)
        .env_remove("RUST_LOG")
        .env_remove("MESHVPN_CONFIG_DIR")
        .env_remove("MESHVPN_RUN_DIR")
        .output()
        .context("running setpriv")
}

#[test]
fn a_user_without_rights_gets_exit_4_and_is_told_what_is_needed() -> Result<()> {
    if !is_root() {
        println!("skipping: needs root (to switch to an unprivileged user)");
        return Ok(());
    }
    if Command::new("setpriv").arg("--version").output().is_err() {
        println!("skipping: setpriv (util-linux) not installed");
        return Ok(());
    }
    let dir = TempDir::new()?;
    let exe = if world_executable(Path::new(EXE)) {
        PathBuf::from(EXE)
    } else {
        let copy = dir.0.join("meshvpn");
        std::fs::copy(EXE, &copy)?;
        std::fs::set_permissions(&copy, std::fs::Permissions::from_mode(0o755))?;
        copy
    };
    join_no_start(&dir, "x")?;
    // The agent's socket is root's, mode 0600, in a directory anyone may enter.
    let socket = dir.run().join("x.sock");
    let agent = fake_agent(&socket, 1, ping_answered)?;
    for args in [&["status", "x"][..], &["list"]] {
        let out = meshvpn_as_nobody(&exe, &dir, args)?;
        ensure!(
            exit_code(&out) == Some(4),
            "{args:?}: a refused control socket exits 4"
        );
        assert_one_line_error(&out, "permission denied; run as root")?;
    }
    // The same socket answers root (so the refusal above was the permission's doing).
    let out = meshvpn(&exe, &dir, &["ping", "bob", "-c", "1"])?;
    ensure!(exit_code(&out) == Some(0), "root is answered");
    ensure!(agent.join().ok() == Some(1));

    // The config directory (keys) is root's, mode 0700.
    std::fs::set_permissions(dir.config(), std::fs::Permissions::from_mode(0o700))?;
    for args in [&["status"][..], &["list"], &["peers"], &["ping", "bob"]] {
        let out = meshvpn_as_nobody(&exe, &dir, args)?;
        ensure!(
            exit_code(&out) == Some(4),
            "{args:?} on a closed config dir exits 4"
        );
        assert_one_line_error(&out, "permission denied; run as root")?;
    }
    // Starting an agent needs root or CAP_NET_ADMIN.
    let out = meshvpn_as_nobody(&exe, &dir, &["up", "x"])?;
    ensure!(exit_code(&out) == Some(4), "up as nobody exits 4");
    assert_one_line_error(&out, "CAP_NET_ADMIN")
}
