//! Prometheus metrics of a running relay (`meshvpn relay --metrics ADDR`; off by default),
//! served by the same bounded HTTP/1.1 responder as the agent's (see [`crate::metrics`]).
//!
//! Every number in [`RelayStatus`] (what `meshvpn relay-status --json` shows) becomes one
//! series named after its path: `meshvpn_relay_members`, `meshvpn_relay_networks`,
//! `meshvpn_relay_tcp_connections`, the limits in force (`meshvpn_relay_tcp_limits_*`,
//! `meshvpn_relay_descriptors_*`) as gauges, and every counter (`meshvpn_relay_server_*`:
//! requests, forwarded datagrams and bytes, each refusal and tripped limit;
//! `meshvpn_relay_tcp_counters_*`; `meshvpn_relay_udp_*`) as a counter. Deriving the series
//! from the status keeps the two from ever disagreeing, and a counter added to the status is
//! exported without further code.

#![allow(clippy::disallowed_methods)] // a driver piece: spawns one task per scrape

use std::sync::Arc;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot, Semaphore};

use super::control::StatusRequest;
use super::status::RelayStatus;
use crate::metrics::{
    read_head, write_response, Route, CONTENT_TYPE, MAX_CONNECTIONS, REQUEST_TIMEOUT,
};

/// Serves `GET /metrics` on `listener` with the relay's status, asked for through `requests`
/// (the control socket's channel), until the relay loop is gone.
pub async fn serve(listener: TcpListener, requests: mpsc::Sender<StatusRequest>) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            continue;
        };
        let requests = requests.clone();
        tokio::spawn(async move {
            let _ = tokio::time::timeout(REQUEST_TIMEOUT, respond(stream, &requests)).await;
            drop(slot);
        });
    }
}

/// Reads one request head and answers it.
async fn respond(
    mut stream: TcpStream,
    requests: &mpsc::Sender<StatusRequest>,
) -> std::io::Result<()> {
    let Some(head) = read_head(&mut stream).await? else {
        return write_response(&mut stream, "431 Request Header Fields Too Large", "", "").await;
    };
    match Route::of(&head) {
        Route::Metrics => {
            let (tx, rx) = oneshot::channel();
            let status = match requests.send(tx).await {
                Ok(()) => rx.await.ok(),
                Err(_) => None,
            };
            match status {
                Some(s) => write_response(&mut stream, "200 OK", CONTENT_TYPE, &render(&s)).await,
                None => write_response(&mut stream, "503 Service Unavailable", "", "").await,
            }
        }
        Route::NotFound => {
            write_response(&mut stream, "404 Not Found", "text/plain", "not found\n").await
        }
    }
}

/// The Prometheus text of `status` (see the module doc).
pub fn render(status: &RelayStatus) -> String {
    let mut registry = Registry::default();
    // Every non-negative integer field; strings, flags and lists are not series.
    let numbers = status
        .fields()
        .into_iter()
        .filter_map(|(path, value)| Some((path.replace('.', "_"), value.parse::<u64>().ok()?)));
    for (path, n) in numbers {
        let name = format!("meshvpn_relay_{path}");
        let help = format!(
            "`{}` in `meshvpn relay-status --json`",
            path.replace('_', ".")
        );
        if is_counter(&path) {
            let c = Counter::<u64>::default();
            c.inc_by(n);
            registry.register(name, help, c);
        } else {
            let g = Gauge::<i64>::default();
            g.set(i64::try_from(n).unwrap_or(i64::MAX));
            registry.register(name, help, g);
        }
    }
    let mut text = String::new();
    if prometheus_client::encoding::text::encode(&mut text, &registry).is_err() {
        text.clear();
    }
    text
}

/// Whether the number at `path` only ever grows: the server's, the TCP listener's and the UDP
/// sockets' counters (limits, sizes and the uptime are gauges).
fn is_counter(path: &str) -> bool {
    path.starts_with("server_") || path.starts_with("tcp_counters_") || path.starts_with("udp_")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_number_of_the_status_is_a_series_and_counters_are_counters() {
        let status = super::super::status::sample();
        let text = render(&status);
        assert!(text.contains("meshvpn_relay_members 2\n"), "{text}");
        assert!(text.contains("meshvpn_relay_networks 1\n"), "{text}");
        assert!(text.contains("meshvpn_relay_tcp_connections 3\n"), "{text}");
        assert!(
            text.contains("# TYPE meshvpn_relay_tcp_counters_refused_per_source counter"),
            "{text}"
        );
        assert!(
            text.contains("meshvpn_relay_tcp_counters_refused_per_source_total 2985"),
            "{text}"
        );
        assert!(
            text.contains("# TYPE meshvpn_relay_members gauge"),
            "{text}"
        );
        // Every server counter is there, whatever its name.
        let value = serde_json::to_value(status.server).expect("serialises");
        let fields = value.as_object().expect("an object").len();
        let exported = text
            .lines()
            .filter(|l| l.starts_with("meshvpn_relay_server_"))
            .count();
        assert_eq!(exported, fields, "{text}");
        // Every line is a comment or `name value`.
        for line in text.lines() {
            assert!(
                line.starts_with('#')
                    || line.split_whitespace().count() == 2
                        && line
                            .split_whitespace()
                            .nth(1)
                            .is_some_and(|v| v.parse::<f64>().is_ok()),
                "{line}"
            );
        }
    }
}
