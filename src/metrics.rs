//! Prometheus metrics of a running agent, served over HTTP (`meshvpn up --metrics ADDR` or the
//! config's `metrics = "127.0.0.1:9101"`; off by default).
//!
//! # What is exported
//! Every series is built from the snapshot the agent builds for `meshvpn status` (asked for
//! through the same channel as the control socket), so the two never disagree:
//! - per peer (labels `network`, `peer`): `meshvpn_peer_path` (one series per path name,
//!   1 for the current one), `meshvpn_peer_rtt_seconds`, `meshvpn_peer_rx_bytes_total`,
//!   `meshvpn_peer_tx_bytes_total`, `meshvpn_peer_handshakes_total`,
//!   `meshvpn_peer_path_changes_total`;
//! - `meshvpn_dropped_total{reason}`, `meshvpn_relay_registered`, `meshvpn_relay_udp_blocked`,
//!   `meshvpn_ready`, `meshvpn_peers`.
//!
//! The snapshot carries the last handshake's age and the current path, not how many there
//! were: [`History`] counts them by comparing snapshots taken every [`SAMPLE_INTERVAL`] and at
//! each scrape (a path that flips and flips back between two samples is not counted).
//!
//! # The responder
//! A minimal HTTP/1.1 responder: `GET /metrics` answers 200 with the text format
//! (`text/plain; version=0.0.4`), anything else 404; one request per connection, a request
//! head of at most [`MAX_REQUEST`] bytes read within [`REQUEST_TIMEOUT`], at most
//! [`MAX_CONNECTIONS`] at once (more are closed at once).

#![allow(clippy::disallowed_methods, clippy::disallowed_types)] // a driver: owns the clock and a socket

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot, Semaphore};

use crate::control::Request;
use crate::status::{NetworkStatus, PeerPath, Status};

/// How often the counts the snapshot lacks are sampled: often enough to see every WireGuard
/// handshake (they come every two minutes per peer, retries five seconds apart) and nearly
/// every path change, rarely enough to cost the agent nothing (one status snapshot a second).
pub const SAMPLE_INTERVAL: Duration = Duration::from_secs(1);
/// Longest request head accepted: a scraper's GET is a few hundred bytes.
pub const MAX_REQUEST: usize = 8 * 1024;
/// How long a client gets to send its request and read the answer.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Most connections served at once (a Prometheus server scrapes one at a time).
pub const MAX_CONNECTIONS: usize = 8;
/// The content type of the Prometheus text format.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Where the responder asks the agent loop for a snapshot (the control requests' channel).
pub type Snapshots = mpsc::Sender<(Request, oneshot::Sender<String>)>;

/// Binds the metrics listener (at start, so a taken port fails the start, not later).
pub async fn bind(addr: SocketAddr) -> anyhow::Result<TcpListener> {
    if !addr.ip().is_loopback() {
        tracing::warn!(%addr, "serving metrics beyond loopback: they name the peers and their addresses");
    }
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding the metrics listener on {addr}"))
}

/// Serves `GET /metrics` on `listener` until the agent loop is gone, sampling the snapshot
/// every [`SAMPLE_INTERVAL`].
pub async fn serve(listener: TcpListener, snapshots: Snapshots) {
    let history = Arc::new(Mutex::new(History::default()));
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let mut sample = tokio::time::interval(SAMPLE_INTERVAL);
    loop {
        tokio::select! {
            _ = sample.tick() => {
                let Some(snapshot) = fetch(&snapshots).await else { return };
                lock(&history).observe(Instant::now(), &snapshot.status);
            }
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else { continue };
                let Ok(slot) = slots.clone().try_acquire_owned() else {
                    // Over the limit: close at once rather than queue.
                    continue;
                };
                let (history, snapshots) = (history.clone(), snapshots.clone());
                tokio::spawn(async move {
                    let _ = tokio::time::timeout(REQUEST_TIMEOUT, respond(stream, &history, &snapshots)).await;
                    drop(slot);
                });
            }
        }
    }
}

/// What a request head asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// `GET /metrics` (a query string is ignored).
    Metrics,
    /// Anything else.
    NotFound,
}

impl Route {
    /// The route of a request head (its request line).
    pub fn of(head: &[u8]) -> Route {
        let line = head.split(|b| *b == b'\n').next().unwrap_or_default();
        let line = String::from_utf8_lossy(line);
        let mut parts = line.trim_end().split(' ');
        match (parts.next(), parts.next(), parts.next()) {
            (Some("GET"), Some(target), Some(version))
                if version.starts_with("HTTP/1.")
                    && target.split('?').next() == Some("/metrics") =>
            {
                Route::Metrics
            }
            _ => Route::NotFound,
        }
    }
}

/// Counts the status snapshot does not carry, derived from consecutive snapshots.
#[derive(Debug, Default)]
pub struct History {
    /// By peer public key.
    peers: BTreeMap<String, PeerHistory>,
}

#[derive(Debug)]
struct PeerHistory {
    path: PeerPath,
    /// When the latest handshake seen completed (now minus its age).
    handshake_at: Option<Instant>,
    handshakes: u64,
    path_changes: u64,
}

/// The age of a handshake is reported in whole seconds: estimates of one handshake's time
/// differ by up to a second, so a later estimate counts as a new handshake only past this.
const HANDSHAKE_JITTER: Duration = Duration::from_millis(1500);

impl History {
    /// Takes in the snapshot `status` taken at `now`; peers no longer listed are forgotten.
    pub fn observe(&mut self, now: Instant, status: &Status) {
        let mut seen = BTreeMap::new();
        for p in &status.peers {
            let at = p
                .last_handshake_age_s
                .and_then(|age| now.checked_sub(Duration::from_secs(age)));
            let mut h = self.peers.remove(&p.public_key).unwrap_or(PeerHistory {
                path: p.path,
                handshake_at: None,
                handshakes: 0,
                path_changes: 0,
            });
            if h.path != p.path {
                h.path = p.path;
                h.path_changes += 1;
            }
            if let Some(at) = at {
                let new = h
                    .handshake_at
                    .is_none_or(|prev| at > prev + HANDSHAKE_JITTER);
                if new {
                    h.handshakes += 1;
                    h.handshake_at = Some(at);
                }
            }
            seen.insert(p.public_key.clone(), h);
        }
        self.peers = seen;
    }

    /// (handshakes, path changes) counted for the peer with `public_key`.
    pub fn counts(&self, public_key: &str) -> (u64, u64) {
        self.peers
            .get(public_key)
            .map_or((0, 0), |h| (h.handshakes, h.path_changes))
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct NetworkLabels {
    network: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PeerLabels {
    network: String,
    peer: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PathLabels {
    network: String,
    peer: String,
    path: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DropLabels {
    network: String,
    reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RelayLabels {
    network: String,
    relay: String,
}

/// The Prometheus text of `snapshot`, with the counts of `history`.
pub fn render(snapshot: &NetworkStatus, history: &History) -> String {
    let s = &snapshot.status;
    let mut registry = Registry::default();
    let network = NetworkLabels {
        network: s.network.clone(),
    };
    let peer_labels = |name: &str| PeerLabels {
        network: s.network.clone(),
        peer: name.to_string(),
    };

    let path = Family::<PathLabels, Gauge>::default();
    let rtt = Family::<PeerLabels, Gauge<f64, std::sync::atomic::AtomicU64>>::default();
    let rx = Family::<PeerLabels, Counter>::default();
    let tx = Family::<PeerLabels, Counter>::default();
    let handshakes = Family::<PeerLabels, Counter>::default();
    let path_changes = Family::<PeerLabels, Counter>::default();
    for p in &s.peers {
        for candidate in PeerPath::ALL {
            let labels = PathLabels {
                network: s.network.clone(),
                peer: p.name.clone(),
                path: candidate.as_str().to_string(),
            };
            path.get_or_create(&labels)
                .set(i64::from(candidate == p.path));
        }
        if let Some(ms) = p.rtt_ms {
            rtt.get_or_create(&peer_labels(&p.name)).set(ms / 1000.0);
        }
        rx.get_or_create(&peer_labels(&p.name)).inc_by(p.rx_bytes);
        tx.get_or_create(&peer_labels(&p.name)).inc_by(p.tx_bytes);
        let (h, c) = history.counts(&p.public_key);
        handshakes.get_or_create(&peer_labels(&p.name)).inc_by(h);
        path_changes.get_or_create(&peer_labels(&p.name)).inc_by(c);
    }
    registry.register(
        "meshvpn_peer_path",
        "Path packets to the peer take: 1 for the current one (direct, relay, relay-tcp, relay-tls)",
        path,
    );
    registry.register(
        "meshvpn_peer_rtt_seconds",
        "Round-trip time to the peer on its current path",
        rtt,
    );
    registry.register(
        "meshvpn_peer_rx_bytes",
        "Bytes of decrypted packets received from the peer",
        rx,
    );
    registry.register(
        "meshvpn_peer_tx_bytes",
        "Bytes of packets sent to the peer, before encryption",
        tx,
    );
    registry.register(
        "meshvpn_peer_handshakes",
        "WireGuard handshakes completed with the peer since the metrics started",
        handshakes,
    );
    registry.register(
        "meshvpn_peer_path_changes",
        "Changes of the peer's path since the metrics started",
        path_changes,
    );

    let dropped = Family::<DropLabels, Counter>::default();
    for (reason, count) in drop_reasons(s) {
        let labels = DropLabels {
            network: s.network.clone(),
            reason: reason.to_string(),
        };
        dropped.get_or_create(&labels).inc_by(count);
    }
    registry.register(
        "meshvpn_dropped",
        "Datagrams and packets dropped, by reason",
        dropped,
    );

    let registered = Family::<RelayLabels, Gauge>::default();
    let answering = Family::<RelayLabels, Gauge>::default();
    let primary = Family::<RelayLabels, Gauge>::default();
    let relay_rtt = Family::<RelayLabels, Gauge<f64, std::sync::atomic::AtomicU64>>::default();
    // Older agents list only the primary relay.
    let relays = if s.relays.is_empty() {
        std::slice::from_ref(&s.relay)
    } else {
        s.relays.as_slice()
    };
    for r in relays {
        let labels = RelayLabels {
            network: s.network.clone(),
            relay: r.address.clone(),
        };
        registered
            .get_or_create(&labels)
            .set(i64::from(r.registered));
        answering.get_or_create(&labels).set(i64::from(r.answering));
        primary.get_or_create(&labels).set(i64::from(r.primary));
        if let Some(ms) = r.rtt_ms {
            relay_rtt.get_or_create(&labels).set(ms / 1000.0);
        }
    }
    registry.register(
        "meshvpn_relay_registered",
        "Whether the relay acknowledged a registration recently (1) or not (0)",
        registered,
    );
    registry.register(
        "meshvpn_relay_answering",
        "Whether the relay answers now: registered and the latest registration answered",
        answering,
    );
    registry.register(
        "meshvpn_relay_primary",
        "Whether the member table follows this relay (the first one in the token that answers)",
        primary,
    );
    registry.register(
        "meshvpn_relay_rtt_seconds",
        "Round-trip time of the latest acknowledged registration",
        relay_rtt,
    );
    let gauge = |value: bool| {
        let g = Family::<NetworkLabels, Gauge>::default();
        g.get_or_create(&network).set(i64::from(value));
        g
    };
    registry.register(
        "meshvpn_relay_udp_blocked",
        "Whether UDP to the relay is blocked and it is reached over a TCP or TLS stream",
        gauge(s.nat.udp_blocked),
    );
    registry.register(
        "meshvpn_ready",
        "Registered with the relay and holding its member list (what `meshvpn wait` waits for)",
        gauge(snapshot.ready),
    );
    let peers = Family::<NetworkLabels, Gauge>::default();
    peers
        .get_or_create(&network)
        .set(i64::try_from(s.peers.len()).unwrap_or(i64::MAX));
    registry.register("meshvpn_peers", "Peers this member knows", peers);

    let mut text = String::new();
    // Writing into a String cannot fail.
    let _ = prometheus_client::encoding::text::encode(&mut text, &registry);
    text
}

/// Every drop counter with its reason label, in a fixed order.
fn drop_reasons(s: &Status) -> [(&'static str, u64); 14] {
    let d = &s.dropped;
    [
        ("malformed", d.malformed),
        ("unauthenticated", d.unauthenticated),
        ("wireguard", d.wireguard),
        ("spoofed_source", d.spoofed_source),
        ("no_route", d.no_route),
        ("handshake_flood", d.handshake_flood),
        ("handshake_cookie", d.handshake_cookie),
        ("handshake_replay", d.handshake_replay),
        ("wrong_destination", d.wrong_destination),
        ("stale_announcement", d.stale_announcement),
        ("members_full", d.members_full),
        ("handshake_pending", d.handshake_pending),
        ("spray_refused", d.spray_refused),
        ("too_big", d.too_big),
    ]
}

/// A status snapshot from the agent loop; `None` once the loop is gone.
async fn fetch(snapshots: &Snapshots) -> Option<NetworkStatus> {
    let (tx, rx) = oneshot::channel();
    snapshots.send((Request::Status, tx)).await.ok()?;
    let line = rx.await.ok()?;
    serde_json::from_str(&line).ok()
}

fn lock(history: &Mutex<History>) -> std::sync::MutexGuard<'_, History> {
    // A panic while holding it leaves counts that are still counts.
    history
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Reads one request head and answers it.
async fn respond(
    mut stream: TcpStream,
    history: &Mutex<History>,
    snapshots: &Snapshots,
) -> std::io::Result<()> {
    let Some(head) = read_head(&mut stream).await? else {
        return write_response(&mut stream, "431 Request Header Fields Too Large", "", "").await;
    };
    match Route::of(&head) {
        Route::Metrics => match fetch(snapshots).await {
            Some(snapshot) => {
                let text = {
                    let mut h = lock(history);
                    h.observe(Instant::now(), &snapshot.status);
                    render(&snapshot, &h)
                };
                write_response(&mut stream, "200 OK", CONTENT_TYPE, &text).await
            }
            None => write_response(&mut stream, "503 Service Unavailable", "", "").await,
        },
        Route::NotFound => {
            write_response(&mut stream, "404 Not Found", "text/plain", "not found\n").await
        }
    }
}

/// The request head (up to the blank line); `None` if it exceeds [`MAX_REQUEST`].
pub(crate) async fn read_head(stream: &mut TcpStream) -> std::io::Result<Option<Vec<u8>>> {
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    loop {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            return Ok(Some(head));
        }
        head.extend_from_slice(&buf[..n]);
        if head.windows(4).any(|w| w == b"\r\n\r\n") || head.windows(2).any(|w| w == b"\n\n") {
            return Ok(Some(head));
        }
        if head.len() > MAX_REQUEST {
            return Ok(None);
        }
    }
}

pub(crate) async fn write_response(
    stream: &mut TcpStream,
    status: &str,
    content_type: &str,
    body: &str,
) -> std::io::Result<()> {
    let mut response = format!(
        "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n",
        body.len()
    );
    if !content_type.is_empty() {
        response.push_str(&format!("Content-Type: {content_type}\r\n"));
    }
    response.push_str("\r\n");
    response.push_str(body);
    stream.write_all(response.as_bytes()).await?;
    stream.shutdown().await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::status::{DropCounters, NatMapping, NatStatus, PeerStatus, RelayStatus};

    fn peer(name: &str, path: PeerPath, handshake_age_s: Option<u64>) -> PeerStatus {
        PeerStatus {
            name: name.into(),
            public_key: format!("key-{name}"),
            virtual_ip: "10.0.0.2".into(),
            virtual_ipv6: None,
            dns_name: None,
            path,
            endpoint: None,
            rtt_ms: Some(12.5),
            last_handshake_age_s: handshake_age_s,
            rx_bytes: 100,
            tx_bytes: 200,
            ip_conflict: false,
            relay_reason: None,
            path_mtu: None,
        }
    }

    fn status(peers: Vec<PeerStatus>) -> Status {
        Status {
            network: "n".into(),
            name: "me".into(),
            virtual_ip: "10.0.0.1".into(),
            virtual_ipv6: None,
            dns_name: None,
            public_key: "k".into(),
            relay: RelayStatus {
                address: "198.51.100.1:3478".into(),
                public_key: "r".into(),
                registered: true,
                observed: None,
                answering: true,
                primary: true,
                transport: "udp".into(),
                rtt_ms: Some(12.0),
                keepalive_s: None,
            },
            relays: vec![],
            endpoints: vec![],
            nat: NatStatus {
                mapping: NatMapping::Public,
                summary: String::new(),
                reflexive: None,
                port_mapping: None,
                udp_blocked: false,
                stun: Vec::new(),
            },
            ip_conflict: None,
            peers,
            dropped: DropCounters {
                malformed: 3,
                ..DropCounters::default()
            },
        }
    }

    /// Whether `line` is a comment or `name{labels} value` / `name value`.
    pub(crate) fn is_sample_or_comment(line: &str) -> bool {
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

    #[test]
    fn the_text_parses_and_has_the_per_peer_series() {
        let snapshot = NetworkStatus {
            status: status(vec![
                peer("bob", PeerPath::Direct, Some(3)),
                peer("we\"ird\nname", PeerPath::RelayTcp, None),
            ]),
            ready: true,
        };
        let text = render(&snapshot, &History::default());
        for line in text.lines() {
            assert!(is_sample_or_comment(line), "bad line {line:?} in\n{text}");
        }
        for want in [
            r#"meshvpn_peer_path{network="n",peer="bob",path="direct"} 1"#,
            r#"meshvpn_peer_path{network="n",peer="bob",path="relay"} 0"#,
            r#"meshvpn_peer_path{network="n",peer="we\"ird\nname",path="relay-tcp"} 1"#,
            r#"meshvpn_peer_rtt_seconds{network="n",peer="bob"} 0.0125"#,
            r#"meshvpn_peer_rx_bytes_total{network="n",peer="bob"} 100"#,
            r#"meshvpn_peer_tx_bytes_total{network="n",peer="bob"} 200"#,
            r#"meshvpn_dropped_total{network="n",reason="malformed"} 3"#,
            r#"meshvpn_relay_registered{network="n",relay="198.51.100.1:3478"} 1"#,
            r#"meshvpn_ready{network="n"} 1"#,
            r#"meshvpn_peers{network="n"} 2"#,
        ] {
            assert!(text.contains(want), "{want} missing from\n{text}");
        }
    }

    #[test]
    fn history_counts_handshakes_and_path_changes_between_snapshots() {
        let t0 = Instant::now();
        let mut h = History::default();
        h.observe(t0, &status(vec![peer("bob", PeerPath::Relay, None)]));
        assert_eq!(h.counts("key-bob"), (0, 0));
        h.observe(
            t0 + Duration::from_secs(1),
            &status(vec![peer("bob", PeerPath::Direct, Some(0))]),
        );
        assert_eq!(h.counts("key-bob"), (1, 1));
        // The same handshake, seen again with its age in whole seconds.
        for s in 2..10 {
            h.observe(
                t0 + Duration::from_millis(s * 1000 + 700),
                &status(vec![peer("bob", PeerPath::Direct, Some(s - 1))]),
            );
        }
        assert_eq!(h.counts("key-bob"), (1, 1));
        // A rekey: the age starts again.
        h.observe(
            t0 + Duration::from_secs(130),
            &status(vec![peer("bob", PeerPath::Relay, Some(1))]),
        );
        assert_eq!(h.counts("key-bob"), (2, 2));
        h.observe(t0 + Duration::from_secs(131), &status(vec![]));
        assert_eq!(h.counts("key-bob"), (0, 0), "a peer that left is forgotten");
    }

    #[test]
    fn only_get_metrics_is_routed() {
        assert_eq!(
            Route::of(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"),
            Route::Metrics
        );
        assert_eq!(
            Route::of(b"GET /metrics?x=1 HTTP/1.0\r\n\r\n"),
            Route::Metrics
        );
        for other in [
            &b"GET / HTTP/1.1\r\n\r\n"[..],
            b"POST /metrics HTTP/1.1\r\n\r\n",
            b"GET /metricsx HTTP/1.1\r\n\r\n",
            b"GET /metrics",
            b"\xff\xfe",
            b"",
        ] {
            assert_eq!(Route::of(other), Route::NotFound, "{other:?}");
        }
    }

    /// A stand-in agent loop answering every snapshot request with `snapshot`.
    fn fake_loop(snapshot: NetworkStatus) -> Snapshots {
        let (tx, mut rx) = mpsc::channel::<(Request, oneshot::Sender<String>)>(4);
        tokio::spawn(async move {
            while let Some((_, reply)) = rx.recv().await {
                let _ = reply.send(serde_json::to_string(&snapshot).unwrap_or_default());
            }
        });
        tx
    }

    async fn exchange(addr: SocketAddr, request: &[u8]) -> String {
        let mut s = TcpStream::connect(addr).await.expect("connects");
        s.write_all(request).await.expect("sends");
        let mut answer = String::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_string(&mut answer)).await;
        answer
    }

    #[tokio::test]
    async fn serves_get_metrics_and_refuses_the_rest() {
        let snapshot = NetworkStatus {
            status: status(vec![peer("bob", PeerPath::Direct, Some(1))]),
            ready: false,
        };
        let listener = bind("127.0.0.1:0".parse().expect("literal"))
            .await
            .expect("binds");
        let addr = listener.local_addr().expect("bound");
        tokio::spawn(serve(listener, fake_loop(snapshot)));

        let ok = exchange(addr, b"GET /metrics HTTP/1.1\r\nHost: t\r\n\r\n").await;
        assert!(ok.starts_with("HTTP/1.1 200 OK\r\n"), "{ok}");
        assert!(ok.contains(CONTENT_TYPE), "{ok}");
        assert!(
            ok.contains(r#"meshvpn_peer_handshakes_total{network="n",peer="bob"} 1"#),
            "{ok}"
        );
        let missing = exchange(addr, b"GET / HTTP/1.1\r\n\r\n").await;
        assert!(missing.starts_with("HTTP/1.1 404"), "{missing}");
        let mut huge = b"GET /metrics HTTP/1.1\r\n".to_vec();
        huge.extend(std::iter::repeat_n(b'a', MAX_REQUEST * 2));
        // Answered 431, or reset because the rest was never read: refused either way.
        let refused = exchange(addr, &huge).await;
        assert!(
            refused.starts_with("HTTP/1.1 431") || refused.is_empty(),
            "{refused}"
        );
    }
}
