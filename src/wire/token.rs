//! The group token: one copy-pasteable line that makes a machine a member of a network.
//!
//! Format: `mvpn2` followed by URL-safe base64 (no padding) of `payload || checksum`, where the
//! checksum is the first 4 bytes of SHA-256 over a label and the payload. A mistyped character
//! fails the checksum and is reported as such, never as a confusing decode error further on.
//!
//! Payload (big-endian, see `wire::codec`): network name, the 32-byte network secret, the
//! virtual subnet (IPv4 address + prefix length), and the relays, each as its public key, host
//! and port. The version digit in the prefix leaves room for other schemes (for example an
//! enterprise mode whose tokens carry a signing key instead of a shared secret).
//!
//! After the relays an optional extension area may follow: records of `tag u8, length u16,
//! body`. Tag 1 gives a relay's WebSocket-over-TLS endpoint (relay index u8, TCP port u16,
//! WebSocket path, empty for [`DEFAULT_WS_PATH`]). A token without the area parses as before and
//! unknown tags are skipped, so later additions stay readable by this version.
//!
//! Version 2 changed what the secret derives (the network id became an Ed25519 public key that
//! relays verify registrations with, see `keys`); a version 1 token is refused with a message
//! saying so, since a member holding one could not register with a current relay.

use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use ipnet::Ipv4Net;
use sha2::{Digest, Sha256};

use super::codec::{Reader, Writer};
use crate::keys::{NetworkSecret, PeerKey};

/// The prefix of current (version 2) tokens.
pub const PREFIX: &str = "mvpn2";
/// The version digit in [`PREFIX`].
const VERSION: &str = "2";
const CHECKSUM_LEN: usize = 4;
const CHECKSUM_LABEL: &[u8] = b"meshvpn token v2";
/// Most relays a token may carry.
pub const MAX_RELAYS: usize = 8;
/// The WebSocket path a relay serves members on unless told otherwise (`--ws-path`).
pub const DEFAULT_WS_PATH: &str = "/meshvpn";
/// Longest WebSocket path recorded: enough for a reverse proxy's prefix, short enough that a
/// key response carrying it stays smaller than the padded request that asks for it.
pub const MAX_WS_PATH: usize = 64;
/// Size a key request is padded to by a client that wants the relay's TLS endpoint too: the
/// largest answer (key response, port, length-prefixed path of [`MAX_WS_PATH`] bytes).
pub const KEY_REQUEST_WITH_TLS_LEN: usize = super::RELAY_OVERHEAD + 2 + 2 + MAX_WS_PATH;
/// Extension tag: a relay's WebSocket-over-TLS endpoint.
const EXT_TLS: u8 = 1;

/// Why a token was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// Does not start with `mvpn`.
    #[error("not a meshvpn group token (it should start with \"{PREFIX}\")")]
    NotAToken,
    /// A token from an older meshvpn, whose keys current relays no longer accept.
    #[error("this token is from an older meshvpn (version {0}); create a new network or ask for a new token")]
    OldVersion(String),
    /// A token from a newer (or unknown) format version.
    #[error("unsupported token version {0:?} (this meshvpn reads version {VERSION} tokens; is it out of date?)")]
    Version(String),
    /// Characters that base64 cannot contain.
    #[error("token contains a character that cannot appear in a token: {0:?}")]
    BadCharacter(char),
    /// The checksum does not match: a typo, or a cut-off token.
    #[error("token checksum mismatch (was it mistyped or cut off?)")]
    ChecksumMismatch,
    /// Checksum fine but the content is not valid (should not happen with tokens made by meshvpn).
    #[error("token content is invalid: {0}")]
    Invalid(String),
}

/// A relay as named in a token or config: its public key and where it listens.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct RelayEndpoint {
    /// The relay's public key, which it must prove before a member trusts it.
    pub key: PeerKey,
    /// Host name or IP literal.
    pub host: String,
    /// UDP (and TCP) port.
    pub port: u16,
    /// Where the relay also serves members over WebSocket-over-TLS, if it does.
    pub tls: Option<TlsEndpoint>,
}

/// A relay's WebSocket-over-TLS endpoint, on the same host as its UDP port.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct TlsEndpoint {
    /// TCP port (usually 443).
    pub port: u16,
    /// HTTP path of the WebSocket (starts with `/`).
    pub path: String,
}

impl TlsEndpoint {
    /// An endpoint on `port` at the default path.
    pub fn new(port: u16) -> Self {
        Self {
            port,
            path: DEFAULT_WS_PATH.to_string(),
        }
    }

    /// Checks a WebSocket path: starts with `/`, at most [`MAX_WS_PATH`] printable ASCII bytes.
    pub fn validate_path(path: &str) -> Result<(), String> {
        if path.starts_with('/')
            && path.len() <= MAX_WS_PATH
            && path.bytes().all(|b| b.is_ascii_graphic())
        {
            Ok(())
        } else {
            Err(format!(
                "WebSocket path {path:?} is invalid: it must start with '/' and be at most {MAX_WS_PATH} printable characters"
            ))
        }
    }

    /// Appends the endpoint as `port u16, path str` (empty path for the default).
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        let mut w = Writer::new();
        let path = if self.path == DEFAULT_WS_PATH {
            ""
        } else {
            &self.path
        };
        w.u16(self.port).str(path);
        out.extend_from_slice(&w.buf);
    }

    /// Reads what [`encode_into`](Self::encode_into) wrote; `None` if it is not that.
    pub fn decode(bytes: &[u8]) -> Option<Self> {
        let mut r = Reader::new(bytes);
        let port = r.u16().ok()?;
        let path = r.str().ok()?;
        if !r.is_empty() || port == 0 {
            return None;
        }
        let path = if path.is_empty() {
            DEFAULT_WS_PATH.to_string()
        } else {
            Self::validate_path(&path).ok()?;
            path
        };
        Some(Self { port, path })
    }
}

impl fmt::Display for RelayEndpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "{}@[{}]:{}", self.key, self.host, self.port)
        } else {
            write!(f, "{}@{}:{}", self.key, self.host, self.port)
        }
    }
}

impl RelayEndpoint {
    /// `host:port` for resolving.
    pub fn host_port(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

/// Splits `HOST:PORT` (IPv6 literals in brackets) into host and port.
pub fn split_host_port(text: &str) -> Result<(String, u16), String> {
    let (host, port) = text
        .rsplit_once(':')
        .ok_or_else(|| format!("{text:?} is not HOST:PORT"))?;
    let port: u16 = port
        .parse()
        .map_err(|_| format!("{port:?} in {text:?} is not a port number"))?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() {
        return Err(format!("{text:?} has no host"));
    }
    Ok((host.to_string(), port))
}

impl FromStr for RelayEndpoint {
    type Err = String;

    /// Parses `KEY@HOST:PORT`.
    fn from_str(text: &str) -> Result<Self, String> {
        let (key, addr) = text
            .split_once('@')
            .ok_or_else(|| format!("{text:?} is not KEY@HOST:PORT"))?;
        let key = PeerKey::from_base64(key)
            .ok_or_else(|| format!("relay key {key:?} is not a base64 public key"))?;
        let (host, port) = split_host_port(addr)?;
        Ok(Self {
            key,
            host,
            port,
            tls: None,
        })
    }
}

/// Checks a network name: 1 to 32 of `a-z 0-9 -`, not starting with `-`.
pub fn validate_network_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 32
        && !name.starts_with('-')
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "network name {name:?} is invalid: use 1 to 32 lowercase letters, digits or '-', not starting with '-'"
        ))
    }
}

/// A decoded group token.
#[derive(Clone, PartialEq, Eq)]
pub struct Token {
    /// Network name (also the config file name and part of the TUN name).
    pub network: String,
    /// The shared network secret.
    pub secret: NetworkSecret,
    /// The virtual subnet members take addresses from.
    pub subnet: Ipv4Net,
    /// Relays (rendezvous + STUN + relay), in order of preference.
    pub relays: Vec<RelayEndpoint>,
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Token")
            .field("network", &self.network)
            .field("subnet", &self.subnet)
            .field("relays", &self.relays)
            .finish_non_exhaustive()
    }
}

impl Token {
    /// Encodes the token as one line.
    pub fn encode(&self) -> String {
        let mut w = Writer::new();
        w.str(&self.network).raw(&self.secret.0);
        w.raw(&self.subnet.network().octets())
            .u8(self.subnet.prefix_len());
        w.u8(self.relays.len().min(MAX_RELAYS) as u8);
        for r in self.relays.iter().take(MAX_RELAYS) {
            w.raw(&r.key.0).str(&r.host).u16(r.port);
        }
        for (i, r) in self.relays.iter().take(MAX_RELAYS).enumerate() {
            if let Some(tls) = &r.tls {
                let mut body = vec![i as u8];
                tls.encode_into(&mut body);
                w.u8(EXT_TLS).u16(body.len() as u16).raw(&body);
            }
        }
        let sum = checksum(&w.buf);
        w.raw(&sum);
        format!("{PREFIX}{}", URL_SAFE_NO_PAD.encode(&w.buf))
    }

    /// Decodes and verifies a token (surrounding whitespace is ignored).
    pub fn decode(text: &str) -> Result<Self, TokenError> {
        let text = text.trim();
        let Some(rest) = text.strip_prefix("mvpn") else {
            return Err(TokenError::NotAToken);
        };
        let version: String = rest.chars().take_while(|c| c.is_ascii_digit()).collect();
        if version == "1" {
            return Err(TokenError::OldVersion(version));
        }
        if version != VERSION {
            return Err(TokenError::Version(version));
        }
        let body = &rest[VERSION.len()..];
        if let Some(bad) = body
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || *c == '-' || *c == '_'))
        {
            return Err(TokenError::BadCharacter(bad));
        }
        // A length base64 cannot produce is a cut-off token: report it like any other typo.
        let raw = URL_SAFE_NO_PAD
            .decode(body)
            .map_err(|_| TokenError::ChecksumMismatch)?;
        if raw.len() < CHECKSUM_LEN {
            return Err(TokenError::ChecksumMismatch);
        }
        let (payload, sum) = raw.split_at(raw.len() - CHECKSUM_LEN);
        if checksum(payload) != sum {
            return Err(TokenError::ChecksumMismatch);
        }
        Self::decode_payload(payload).map_err(TokenError::Invalid)
    }

    fn decode_payload(payload: &[u8]) -> Result<Self, String> {
        let short = |e: super::WireError| e.to_string();
        let mut r = Reader::new(payload);
        let network = r.str().map_err(short)?;
        validate_network_name(&network)?;
        let secret = NetworkSecret(r.array().map_err(short)?);
        let ip = Ipv4Addr::from(r.array::<4>().map_err(short)?);
        let prefix = r.u8().map_err(short)?;
        let subnet =
            Ipv4Net::new(ip, prefix).map_err(|_| format!("bad subnet prefix /{prefix}"))?;
        let n = usize::from(r.u8().map_err(short)?);
        if n == 0 || n > MAX_RELAYS {
            return Err(format!(
                "token names {n} relays (expected 1 to {MAX_RELAYS})"
            ));
        }
        let mut relays = Vec::with_capacity(n);
        for _ in 0..n {
            let key = PeerKey(r.array().map_err(short)?);
            let host = r.str().map_err(short)?;
            let port = r.u16().map_err(short)?;
            relays.push(RelayEndpoint {
                key,
                host,
                port,
                tls: None,
            });
        }
        while !r.is_empty() {
            let tag = r.u8().map_err(short)?;
            let body = r.bytes().map_err(short)?;
            if tag == EXT_TLS {
                let (index, endpoint) = body
                    .split_first()
                    .ok_or_else(|| "empty TLS endpoint record".to_string())?;
                let relay = relays
                    .get_mut(usize::from(*index))
                    .ok_or_else(|| format!("TLS endpoint for relay {index}, which is not named"))?;
                relay.tls = Some(
                    TlsEndpoint::decode(endpoint)
                        .ok_or_else(|| "malformed TLS endpoint record".to_string())?,
                );
            }
        }
        Ok(Self {
            network,
            secret,
            subnet,
            relays,
        })
    }
}

fn checksum(payload: &[u8]) -> [u8; CHECKSUM_LEN] {
    let mut h = Sha256::new();
    h.update(CHECKSUM_LABEL);
    h.update(payload);
    let mut out = [0u8; CHECKSUM_LEN];
    out.copy_from_slice(&h.finalize()[..CHECKSUM_LEN]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Token {
        Token {
            network: "friends".into(),
            secret: NetworkSecret([0x5a; 32]),
            subnet: "10.147.0.0/16".parse().expect("lit"),
            relays: vec![RelayEndpoint {
                key: PeerKey([3; 32]),
                host: "relay.example.org".into(),
                port: 3478,
                tls: None,
            }],
        }
    }

    #[test]
    fn tls_endpoints_round_trip_and_old_tokens_still_parse() {
        let plain = sample();
        let mut t = sample();
        t.relays.push(RelayEndpoint {
            key: PeerKey([4; 32]),
            host: "203.0.113.9".into(),
            port: 3478,
            tls: Some(TlsEndpoint::new(443)),
        });
        t.relays.push(RelayEndpoint {
            key: PeerKey([5; 32]),
            host: "relay2.example.org".into(),
            port: 3478,
            tls: Some(TlsEndpoint {
                port: 8443,
                path: "/vpn/relay".into(),
            }),
        });
        let line = t.encode();
        assert_eq!(Token::decode(&line), Ok(t.clone()));
        // A token without the extension area is exactly the old encoding.
        let mut w = Writer::new();
        w.str(&plain.network).raw(&plain.secret.0);
        w.raw(&plain.subnet.network().octets())
            .u8(plain.subnet.prefix_len());
        w.u8(1).raw(&[3; 32]).str("relay.example.org").u16(3478);
        let sum = checksum(&w.buf);
        w.raw(&sum);
        let old = format!("{PREFIX}{}", URL_SAFE_NO_PAD.encode(&w.buf));
        assert_eq!(old, plain.encode());
        assert_eq!(Token::decode(&old), Ok(plain));
    }

    /// Encodes `payload` as a token with a valid checksum.
    fn with_payload(payload: &[u8]) -> String {
        let mut raw = payload.to_vec();
        raw.extend_from_slice(&checksum(payload));
        format!("{PREFIX}{}", URL_SAFE_NO_PAD.encode(&raw))
    }

    #[test]
    fn unknown_extensions_are_skipped_and_bad_ones_refused() {
        let t = sample();
        let line = t.encode();
        let raw = URL_SAFE_NO_PAD
            .decode(&line[PREFIX.len()..])
            .expect("base64");
        let payload = &raw[..raw.len() - CHECKSUM_LEN];
        let mut unknown = payload.to_vec();
        unknown.extend_from_slice(&[9, 0, 3, 1, 2, 3]);
        assert_eq!(Token::decode(&with_payload(&unknown)), Ok(t));
        for bad in [
            &[EXT_TLS, 0, 0][..],                          // empty record
            &[EXT_TLS, 0, 5, 7, 1, 187, 0, 0],             // relay 7 does not exist
            &[EXT_TLS, 0, 5, 0, 0, 0, 0, 0],               // port 0
            &[EXT_TLS, 0, 7, 0, 1, 187, 0, 2, b'x', b'y'], // path without '/'
            &[EXT_TLS, 0, 9],                              // record cut off
        ] {
            let mut p = payload.to_vec();
            p.extend_from_slice(bad);
            assert!(
                matches!(
                    Token::decode(&with_payload(&p)),
                    Err(TokenError::Invalid(_))
                ),
                "{bad:?}"
            );
        }
        assert!(TlsEndpoint::validate_path("/ok/path").is_ok());
        assert!(TlsEndpoint::validate_path("no-slash").is_err());
        assert!(TlsEndpoint::validate_path("/with space").is_err());
        assert!(TlsEndpoint::validate_path(&format!("/{}", "a".repeat(MAX_WS_PATH))).is_err());
    }

    #[test]
    fn round_trip() {
        let t = sample();
        let line = t.encode();
        assert!(line.starts_with("mvpn2"));
        assert!(!line.contains(char::is_whitespace));
        assert_eq!(Token::decode(&line), Ok(t.clone()));
        assert_eq!(Token::decode(&format!("  {line}\n")), Ok(t));
    }

    #[test]
    fn every_single_character_typo_is_a_checksum_mismatch() {
        let line = sample().encode();
        let alphabet: Vec<char> =
            "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
                .chars()
                .collect();
        for i in PREFIX.len()..line.len() {
            let original = line.as_bytes()[i] as char;
            let replacement =
                alphabet[(alphabet.iter().position(|c| *c == original).unwrap_or(0) + 7) % 64];
            let mut typo = line.clone();
            typo.replace_range(i..=i, &replacement.to_string());
            assert_eq!(
                Token::decode(&typo),
                Err(TokenError::ChecksumMismatch),
                "typo at {i}"
            );
        }
        let cut = &line[..line.len() - 3];
        assert_eq!(Token::decode(cut), Err(TokenError::ChecksumMismatch));
    }

    #[test]
    fn other_errors_are_named() {
        assert_eq!(Token::decode("hello"), Err(TokenError::NotAToken));
        assert_eq!(
            Token::decode("mvpn3abc"),
            Err(TokenError::Version("3".into()))
        );
        let old = Token::decode("mvpn1abc").expect_err("version 1 is refused");
        assert_eq!(old, TokenError::OldVersion("1".into()));
        assert_eq!(
            old.to_string(),
            "this token is from an older meshvpn (version 1); create a new network or ask for a new token"
        );
        assert_eq!(
            Token::decode("mvpn2ab!c"),
            Err(TokenError::BadCharacter('!'))
        );
        assert_eq!(
            TokenError::ChecksumMismatch.to_string(),
            "token checksum mismatch (was it mistyped or cut off?)"
        );
        // Secrets stay out of Debug output.
        assert!(!format!("{:?}", sample()).contains("5a5a"));
    }

    #[test]
    fn relay_endpoint_parsing() {
        let key = PeerKey([1; 32]);
        let r: RelayEndpoint = format!("{key}@198.51.100.1:3478").parse().expect("valid");
        assert_eq!(r.host, "198.51.100.1");
        assert_eq!(r.port, 3478);
        let r6: RelayEndpoint = format!("{key}@[2001:db8::1]:3478").parse().expect("valid");
        assert_eq!(r6.host_port(), "[2001:db8::1]:3478");
        assert_eq!(r6.to_string().parse::<RelayEndpoint>(), Ok(r6));
        assert!("nokey@1.2.3.4:5".parse::<RelayEndpoint>().is_err());
        assert!(format!("{key}@host").parse::<RelayEndpoint>().is_err());
        assert!(validate_network_name("ok-name1").is_ok());
        assert!(validate_network_name("Bad").is_err());
        assert!(validate_network_name("").is_err());
        assert!(validate_network_name("-x").is_err());
    }
}
