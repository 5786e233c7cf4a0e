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
        Ok(Self { key, host, port })
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
            relays.push(RelayEndpoint { key, host, port });
        }
        if !r.is_empty() {
            return Err("trailing bytes".into());
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
            }],
        }
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
