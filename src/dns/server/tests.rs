//! Loopback tests of the DNS server (UDP and TCP) and of the resolved registration, the latter
//! with stand-in `resolvectl`/`systemctl` scripts that record their arguments.

use super::*;
use hickory_proto::op::{Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::rdata::{A, AAAA};
use hickory_proto::rr::{Name, RData, RecordType};
use std::net::{Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

/// Bound on every wait for an answer: loopback answers in microseconds.
const WAIT: Duration = Duration::from_secs(5);

const B_V4: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 2);
const B_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 2);

fn shared_zone() -> SharedZone {
    let mut zone = Zone::new("friends").expect("valid network name");
    zone.set_members([("b", B_V4, Some(B_V6))]);
    Arc::new(Mutex::new(zone))
}

fn query(id: u16, name: &str, qtype: RecordType) -> Vec<u8> {
    let mut m = Message::new(id, MessageType::Query, OpCode::Query);
    m.add_query(Query::query(
        Name::from_str(name).expect("test name"),
        qtype,
    ));
    m.to_vec().expect("encode test query")
}

async fn ask_udp(
    client: &UdpSocket,
    server: SocketAddr,
    id: u16,
    name: &str,
    qtype: RecordType,
) -> Message {
    client
        .send_to(&query(id, name, qtype), server)
        .await
        .expect("send query");
    let mut buf = [0u8; 1500];
    let (len, from) = tokio::time::timeout(WAIT, client.recv_from(&mut buf))
        .await
        .expect("an answer within the wait")
        .expect("receive answer");
    assert_eq!(from, server);
    let m = Message::from_vec(&buf[..len]).expect("decodable answer");
    assert_eq!(m.metadata.id, id);
    m
}

#[tokio::test]
async fn answers_over_udp_and_tcp_on_loopback() {
    let server = DnsServer::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)))
        .await
        .expect("bind loopback");
    let addr = server.local_addr().expect("local address");
    let zone = shared_zone();
    let serving = server.serve(zone.clone());
    let client = async {
        let udp = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0))
            .await
            .expect("client socket");
        let m = ask_udp(&udp, addr, 1, "b.friends.mesh.internal.", RecordType::A).await;
        assert!(matches!(m.answers.as_slice(), [r] if r.data == RData::A(A(B_V4))));
        let m = ask_udp(&udp, addr, 2, "B.friends.mesh.internal.", RecordType::AAAA).await;
        assert!(matches!(m.answers.as_slice(), [r] if r.data == RData::AAAA(AAAA(B_V6))));
        let m = ask_udp(
            &udp,
            addr,
            3,
            "nobody.friends.mesh.internal.",
            RecordType::A,
        )
        .await;
        assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);

        // A member leaves: the next answer no longer knows it.
        zone.lock()
            .expect("zone lock")
            .set_members([("c", B_V4, None::<Ipv6Addr>)]);
        let m = ask_udp(&udp, addr, 4, "b.friends.mesh.internal.", RecordType::A).await;
        assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);

        // Garbage gets no answer but does not stop the server.
        udp.send_to(&[0xff; 5], addr).await.expect("send garbage");
        let m = ask_udp(&udp, addr, 5, "c.friends.mesh.internal.", RecordType::A).await;
        assert_eq!(m.answers.len(), 1);

        // TCP: two length-prefixed queries on one connection.
        let mut tcp = TcpStream::connect(addr).await.expect("connect TCP");
        for (id, name, code) in [
            (6u16, "c.friends.mesh.internal.", ResponseCode::NoError),
            (7, "zz.friends.mesh.internal.", ResponseCode::NXDomain),
        ] {
            let q = query(id, name, RecordType::A);
            let mut framed = u16::try_from(q.len())
                .expect("short query")
                .to_be_bytes()
                .to_vec();
            framed.extend_from_slice(&q);
            tcp.write_all(&framed).await.expect("write TCP query");
            let len = tokio::time::timeout(WAIT, tcp.read_u16())
                .await
                .expect("a TCP answer within the wait")
                .expect("read length");
            let mut buf = vec![0u8; usize::from(len)];
            tokio::time::timeout(WAIT, tcp.read_exact(&mut buf))
                .await
                .expect("TCP answer body within the wait")
                .expect("read body");
            let m = Message::from_vec(&buf).expect("decodable TCP answer");
            assert_eq!(m.metadata.id, id);
            assert_eq!(m.metadata.response_code, code, "{name}");
        }
        zone.lock().expect("zone lock").counters()
    };
    let counters = tokio::select! {
        () = serving => panic!("the server stopped on its own"),
        counters = client => counters,
    };
    assert_eq!(counters.nxdomain, 3);
    assert_eq!(counters.dropped, 1);
}

/// Serialises the tests that write and run stand-in scripts: a script being written by one
/// test while another forks would be held open in the child and fail to run ("text file busy").
static SCRIPT_LOCK: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A scratch directory with stand-in `resolvectl` and `systemctl` that append their arguments
/// to `calls.log`; removed on drop.
struct FakeTools {
    dir: PathBuf,
}

impl FakeTools {
    /// `systemctl` exits with `systemctl_status`; `resolvectl` fails when its first argument is
    /// `fail_on`.
    fn new(tag: &str, systemctl_status: i32, fail_on: &str) -> FakeTools {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("meshvpn-dns-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("create scratch dir");
        let log = dir.join("calls.log");
        let scripts = [
            (
                "systemctl",
                format!("#!/bin/sh\necho \"systemctl $*\" >> '{}'\nexit {systemctl_status}\n", log.display()),
            ),
            (
                "resolvectl",
                format!(
                    "#!/bin/sh\necho \"resolvectl $*\" >> '{}'\n[ \"$1\" = '{fail_on}' ] && exit 1\nexit 0\n",
                    log.display()
                ),
            ),
        ];
        for (name, body) in scripts {
            let path = dir.join(name);
            std::fs::write(&path, body).expect("write stand-in script");
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))
                .expect("make stand-in executable");
        }
        FakeTools { dir }
    }

    fn tools(&self) -> ResolvedTools {
        ResolvedTools::with_programs(self.dir.join("resolvectl"), self.dir.join("systemctl"))
    }

    fn calls(&self) -> Vec<String> {
        std::fs::read_to_string(self.dir.join("calls.log"))
            .unwrap_or_default()
            .lines()
            .map(str::to_owned)
            .collect()
    }
}

impl Drop for FakeTools {
    fn drop(&mut self) {
        std::fs::remove_dir_all(&self.dir).ok();
    }
}

const IP: IpAddr = IpAddr::V4(Ipv4Addr::new(10, 77, 0, 1));

#[tokio::test]
async fn registers_per_link_and_reverts() {
    let _serial = SCRIPT_LOCK.lock().await;
    let fake = FakeTools::new("register", 0, "none");
    let link = fake
        .tools()
        .register("mvpn-friends", "friends.mesh.internal", IP)
        .await
        .expect("registration")
        .expect("resolved reported running");
    link.revert().await.expect("revert");
    assert_eq!(
        fake.calls(),
        [
            "systemctl is-active --quiet systemd-resolved",
            "resolvectl --version",
            "resolvectl dns mvpn-friends 10.77.0.1",
            "resolvectl domain mvpn-friends ~friends.mesh.internal",
            "resolvectl default-route mvpn-friends false",
            "resolvectl revert mvpn-friends",
        ]
    );
}

#[tokio::test]
async fn dropping_the_handle_reverts() {
    let _serial = SCRIPT_LOCK.lock().await;
    let fake = FakeTools::new("drop", 0, "none");
    let link = fake
        .tools()
        .register("mvpn-x", "x.mesh.internal", IP)
        .await
        .expect("registration");
    drop(link);
    assert_eq!(
        fake.calls().last().map(String::as_str),
        Some("resolvectl revert mvpn-x")
    );
}

#[tokio::test]
async fn nothing_is_changed_when_resolved_is_not_running() {
    let _serial = SCRIPT_LOCK.lock().await;
    let fake = FakeTools::new("inactive", 3, "none");
    let link = fake
        .tools()
        .register("mvpn-x", "x.mesh.internal", IP)
        .await
        .expect("no error");
    assert!(link.is_none());
    assert_eq!(
        fake.calls(),
        ["systemctl is-active --quiet systemd-resolved"]
    );

    let missing = ResolvedTools::with_programs(fake.dir.join("no-such"), fake.dir.join("no-such"));
    assert!(missing
        .register("mvpn-x", "x.mesh.internal", IP)
        .await
        .expect("no error")
        .is_none());
}

#[tokio::test]
async fn a_failed_step_reverts_and_reports() {
    let _serial = SCRIPT_LOCK.lock().await;
    let fake = FakeTools::new("fail", 0, "domain");
    let err = fake
        .tools()
        .register("mvpn-x", "x.mesh.internal", IP)
        .await
        .expect_err("the domain step fails");
    assert!(err.to_string().contains("resolvectl domain"), "{err:#}");
    assert_eq!(
        fake.calls().last().map(String::as_str),
        Some("resolvectl revert mvpn-x")
    );
}

#[tokio::test]
async fn bad_arguments_are_refused_before_running_anything() {
    let _serial = SCRIPT_LOCK.lock().await;
    let fake = FakeTools::new("args", 0, "none");
    for (ifname, domain) in [
        ("-x", "x.mesh.internal"),
        ("", "x.mesh.internal"),
        ("a-very-long-interface", "x.mesh.internal"),
        ("mvpn-x", "~."),
        ("mvpn-x", "x y"),
    ] {
        assert!(
            fake.tools().register(ifname, domain, IP).await.is_err(),
            "{ifname:?} {domain:?}"
        );
    }
    assert!(fake.calls().is_empty());
}
