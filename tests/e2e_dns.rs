//! End-to-end member names: the real `meshvpn` binary in network namespaces answers DNS for
//! `NAME.NETWORK.mesh.internal` on each member's virtual IP, queried with `dig` (Debian's
//! `dnsutils`) from the member's own host (needs root; skips otherwise).
//!
//! Three members join; `dig @ALICE_VIRTUAL_IP bob.NETWORK.mesh.internal` must give bob's
//! virtual IPv4 (A) and his IPv6 overlay address (AAAA), the latter computed here from bob's
//! public key and the token's network id, independently of the agent. An unknown member is
//! NXDOMAIN, a name outside the zone is REFUSED (no open resolver), and a member that leaves
//! with SIGTERM turns NXDOMAIN within the leave time (printed). The lab tears itself down on
//! drop, even when the test fails; only lab addresses are contacted.

#![allow(clippy::disallowed_methods, clippy::print_stdout)] // an end-to-end test: real time, real processes, progress on stdout

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context as _, Result};
use meshvpn::addressing::overlay_ipv6;
use meshvpn::keys::PeerKey;
use meshvpn::wire::token::Token;
use meshvpn_lab::{self as lab, Host, Lab, Mesh, Nat, Signal};

const EXE: &str = env!("CARGO_BIN_EXE_meshvpn");
const RELAY_PORT: u16 = 3478;
const NETWORK: &str = "names";
/// How long members may take to see each other.
const CONVERGE: Duration = Duration::from_secs(30);
/// How long a member's zone may lag behind its status once both list a peer: the zone is
/// refreshed right after the node reports the join, so this is only slack for a busy machine.
const ZONE_CATCH_UP: Duration = Duration::from_secs(5);
/// A member that leaves with SIGTERM must be gone from the others' DNS within this: the leave
/// time `tests/e2e_mesh.rs` holds the status to (a departed member on a direct path is kept
/// until that path falls silent, 6.5 s).
const LEAVE: Duration = Duration::from_secs(10);
/// Longest one `dig` may run: `+time=1 +tries=1` waits one second for an answer.
const DIG_TIMEOUT: Duration = Duration::from_secs(5);

fn skip() -> bool {
    if lab::is_root() {
        return false;
    }
    println!("skipping: needs root");
    true
}

/// What one `dig` saw: the response code and the answer section's (type, data) pairs.
#[derive(Debug)]
struct Dig {
    status: String,
    answers: Vec<(String, String)>,
}

impl Dig {
    /// The addresses of the answer records of type `rtype`.
    fn addresses(&self, rtype: &str) -> Result<Vec<IpAddr>> {
        self.answers
            .iter()
            .filter(|(t, _)| t == rtype)
            .map(|(_, data)| {
                data.parse()
                    .with_context(|| format!("{rtype} record data {data:?}"))
            })
            .collect()
    }
}

/// `dig +time=1 +tries=1 @server name rtype` from `host`; fails if no answer came.
fn dig(lab: &Lab, host: &Host, server: Ipv4Addr, name: &str, rtype: &str) -> Result<Dig> {
    let at = format!("@{server}");
    let args = [
        "dig",
        "+time=1",
        "+tries=1",
        "+noall",
        "+comments",
        "+answer",
        at.as_str(),
        name,
        rtype,
    ];
    let out = lab.run(host, &args, DIG_TIMEOUT)?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    ensure!(
        out.status.success(),
        "dig {name} {rtype} at {server} failed ({}): {text}{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    parse_dig(&text).with_context(|| format!("dig output for {name} {rtype}:\n{text}"))
}

/// Parses `dig +noall +comments +answer`: the `status:` of the header comment and every
/// answer line (`name ttl class type data`).
fn parse_dig(text: &str) -> Result<Dig> {
    let status = text
        .lines()
        .find_map(|l| l.split("status: ").nth(1))
        .and_then(|rest| rest.split(',').next())
        .context("no status in the header")?
        .to_string();
    let answers = text
        .lines()
        .filter(|l| !l.starts_with(';') && !l.trim().is_empty())
        .filter_map(|l| {
            let fields: Vec<&str> = l.split_whitespace().collect();
            match fields.as_slice() {
                [_, _, "IN", rtype, data] => Some((rtype.to_string(), data.to_string())),
                _ => None,
            }
        })
        .collect();
    Ok(Dig { status, answers })
}

/// The zone's name for member `name`.
fn fqdn(name: &str) -> String {
    format!("{name}.{NETWORK}.mesh.internal")
}

#[test]
fn members_resolve_by_name_and_vanish_when_they_leave() -> Result<()> {
    if skip() {
        return Ok(());
    }
    ensure!(
        lab::which("dig").is_some(),
        "dig not found: install Debian's dnsutils (see .ci/run)"
    );
    let t0 = Instant::now();
    let names = ["alice", "bob", "carol"];
    let members: Vec<(&str, Option<Nat>)> = names.iter().map(|n| (*n, None)).collect();
    let mut mesh = Mesh::new("e2e-dns", EXE.as_ref(), &members, RELAY_PORT)?;
    let token = mesh
        .create_network(NETWORK, Some("10.78.0.0/16"))?
        .to_string();
    let network_id = Token::decode(&token)
        .map_err(|e| anyhow::anyhow!("the lab's token does not parse: {e}"))?
        .secret
        .derive()
        .network_id;
    for name in names {
        mesh.join(name)?;
    }
    let t = Instant::now();
    let statuses = mesh.converge(&names, CONVERGE)?;
    println!("{names:?} see each other after {:.1?}", t.elapsed());
    let alice_ip = statuses[0].virtual_ipv4()?;
    let bob_ip = statuses[1].virtual_ipv4()?;
    let carol_ip = statuses[2].virtual_ipv4()?;
    let bob_key = PeerKey::from_base64(&statuses[1].public_key)
        .with_context(|| format!("bob's public key {:?}", statuses[1].public_key))?;
    let bob_v6 = overlay_ipv6(&network_id, &bob_key);
    println!("bob: {bob_ip}, overlay {bob_v6}; alice asks her own agent at {alice_ip}");

    let alice = mesh.host("alice")?.clone();
    let carol = mesh.host("carol")?.clone();
    let bob_name = fqdn("bob");

    // A: bob's virtual IPv4, from alice's agent.
    let took = lab::wait_until(
        ZONE_CATCH_UP,
        Duration::from_millis(200),
        &format!("alice's DNS to answer {bob_name} A"),
        || Ok(dig(&mesh.lab, &alice, alice_ip, &bob_name, "A")?.status == "NOERROR"),
    )?;
    let a = dig(&mesh.lab, &alice, alice_ip, &bob_name, "A")?;
    println!("{bob_name} A answered by alice's agent {took:.1?} after convergence: {a:?}");
    ensure!(
        a.addresses("A")? == vec![IpAddr::V4(bob_ip)],
        "{bob_name} A from alice: {a:?}, want {bob_ip}"
    );

    // AAAA: bob's IPv6 overlay address, as computed here from his key and the network id.
    let aaaa = dig(&mesh.lab, &alice, alice_ip, &bob_name, "AAAA")?;
    ensure!(
        aaaa.status == "NOERROR" && aaaa.addresses("AAAA")? == vec![IpAddr::V6(bob_v6)],
        "{bob_name} AAAA from alice: {aaaa:?}, want {bob_v6}"
    );

    // Every member applies the same rule: carol's agent gives the same answer, and alice's
    // own name resolves at her own agent too.
    let from_carol = dig(&mesh.lab, &carol, carol_ip, &bob_name, "A")?;
    ensure!(
        from_carol.addresses("A")? == vec![IpAddr::V4(bob_ip)],
        "{bob_name} A from carol: {from_carol:?}"
    );
    let own = dig(&mesh.lab, &alice, alice_ip, &fqdn("alice"), "A")?;
    ensure!(
        own.addresses("A")? == vec![IpAddr::V4(alice_ip)],
        "alice's own name: {own:?}"
    );
    // `status --json` names the same: alice's own name and bob's.
    let status = mesh.status("alice")?;
    ensure!(
        status.dns_name.as_deref() == Some(fqdn("alice").as_str())
            && status.peer("bob").and_then(|p| p.dns_name.as_deref()) == Some(bob_name.as_str()),
        "alice's status names: own {:?}, bob {:?}",
        status.dns_name,
        status.peer("bob").map(|p| &p.dns_name)
    );

    // An unknown member: NXDOMAIN. A name outside the zone: REFUSED (we answer only our zone,
    // and never recurse).
    let unknown = dig(&mesh.lab, &alice, alice_ip, &fqdn("nobody"), "A")?;
    ensure!(
        unknown.status == "NXDOMAIN" && unknown.answers.is_empty(),
        "unknown member: {unknown:?}"
    );
    let outside = dig(&mesh.lab, &alice, alice_ip, "example.com", "A")?;
    ensure!(
        outside.status == "REFUSED",
        "a name outside the zone: {outside:?}"
    );

    // bob leaves with SIGTERM: alice's agent must stop answering for him within the leave time.
    let t = Instant::now();
    let exit = mesh.members[1].stop(&mesh.lab, Signal::Term)?;
    println!("bob stopped with SIGTERM in {:.1?} ({exit:?})", t.elapsed());
    let gone = lab::wait_until(
        LEAVE,
        Duration::from_millis(200),
        &format!("{bob_name} to be NXDOMAIN at alice's agent"),
        || Ok(dig(&mesh.lab, &alice, alice_ip, &bob_name, "A")?.status == "NXDOMAIN"),
    )?;
    println!(
        "{bob_name} is NXDOMAIN at alice's agent {:.1?} after SIGTERM ({gone:.1?} of polling; bound {LEAVE:?})",
        t.elapsed()
    );
    let still = dig(&mesh.lab, &alice, alice_ip, &fqdn("carol"), "A")?;
    ensure!(
        still.addresses("A")? == vec![IpAddr::V4(carol_ip)],
        "carol after bob left: {still:?}"
    );
    println!(
        "members_resolve_by_name_and_vanish_when_they_leave: {:.1?}",
        t0.elapsed()
    );
    mesh.shutdown()
}

#[test]
fn dig_output_parses() -> Result<()> {
    let text = ";; Got answer:\n;; ->>HEADER<<- opcode: QUERY, status: NOERROR, id: 1\n\
                ;; flags: qr aa rd; QUERY: 1, ANSWER: 1\n\n\
                bob.names.mesh.internal. 10\tIN\tAAAA\tfd12:3456::1\n";
    let d = parse_dig(text)?;
    ensure!(d.status == "NOERROR", "{d:?}");
    let want: Vec<IpAddr> = vec![IpAddr::V6(Ipv6Addr::new(0xfd12, 0x3456, 0, 0, 0, 0, 0, 1))];
    ensure!(d.addresses("AAAA")? == want, "{d:?}");
    ensure!(parse_dig(";; no header\n").is_err());
    Ok(())
}
