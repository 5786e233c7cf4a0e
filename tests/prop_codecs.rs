//! Property tests: every codec of outside bytes decodes what it encodes, for generated values.
//!
//! Complements the fuzz targets under `fuzz/` (which throw arbitrary bytes at the decoders):
//! here the values are well-formed and the property is `decode(encode(x)) == x`, through the
//! plaintext codecs and through the sealed frames that carry them.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use ipnet::Ipv4Net;
use meshvpn::control::Request;
use meshvpn::keys::{NetworkId, NetworkSecret, PeerKey};
use meshvpn::wire::admission::{open_request, seal_request, Cookie};
use meshvpn::wire::plain::{
    decode_announcement, decode_disco, decode_relay_reply, decode_relay_request,
    encode_announcement, encode_disco, encode_relay_reply, encode_relay_request,
};
use meshvpn::wire::rotation::{ENTRIES_PER_REQUEST, SEALED_LEN};
use meshvpn::wire::token::{RelayEndpoint, TlsEndpoint, Token, MAX_RELAYS};
use meshvpn::wire::{
    open_disco, open_from_relay, seal_disco, seal_from_relay, stun, Announcement, Disco,
    DiscoStamp, Frame, MemberEntry, NatKind, RelayReply, RelayRequest, RotationEntry, SyncTag,
    MAX_ANNOUNCEMENT, MAX_ANSWER_AFTER_MS, MAX_ENDPOINTS, MAX_FORWARD_LEN,
};
use proptest::collection::vec;
use proptest::prelude::*;

fn peer_key() -> impl Strategy<Value = PeerKey> {
    any::<[u8; 32]>().prop_map(PeerKey)
}

fn network_id() -> impl Strategy<Value = NetworkId> {
    any::<[u8; 32]>().prop_map(NetworkId)
}

/// Socket addresses as they travel on the wire: IP and port (no IPv6 flow label or scope).
fn socket_addr() -> impl Strategy<Value = SocketAddr> {
    (any::<IpAddr>(), any::<u16>()).prop_map(|(ip, port)| SocketAddr::new(ip, port))
}

/// Host names and address literals as users write them for relays.
fn host() -> impl Strategy<Value = String> {
    prop_oneof![
        "[a-z0-9]([a-z0-9-]{0,20}[a-z0-9])?(\\.[a-z0-9]{1,10}){0,3}",
        any::<Ipv4Addr>().prop_map(|ip| ip.to_string()),
        any::<std::net::Ipv6Addr>().prop_map(|ip| ip.to_string()),
    ]
}

fn relay_endpoint() -> impl Strategy<Value = RelayEndpoint> {
    let tls = proptest::option::of((any::<u16>(), "/[a-z0-9/_-]{0,20}"))
        .prop_map(|t| t.map(|(port, path)| TlsEndpoint { port, path }));
    (peer_key(), host(), any::<u16>(), tls).prop_map(|(key, host, port, tls)| RelayEndpoint {
        key,
        host,
        port,
        tls,
    })
}

fn token() -> impl Strategy<Value = Token> {
    (
        "[a-z0-9][a-z0-9-]{0,31}",
        any::<[u8; 32]>(),
        any::<Ipv4Addr>(),
        0u8..=32,
        vec(relay_endpoint(), 1..=MAX_RELAYS),
    )
        .prop_map(|(network, secret, ip, prefix, relays)| Token {
            network,
            secret: NetworkSecret(secret),
            subnet: Ipv4Net::new(ip, prefix)
                .expect("prefix is at most 32")
                .trunc(),
            relays,
        })
}

/// An owned frame body, turned into a borrowing [`Frame`] by [`frame_of`].
#[derive(Debug, Clone)]
enum FrameSpec {
    KeyRequest,
    KeyResponse(PeerKey),
    ToRelay(PeerKey, Cookie, Vec<u8>),
    CookieReply([u8; 16], Cookie),
    FromRelay(PeerKey, Vec<u8>),
    RelaySend(PeerKey, Vec<u8>),
    RelayRecv(PeerKey, Vec<u8>),
    Disco(PeerKey, Vec<u8>),
}

fn frame_spec() -> impl Strategy<Value = FrameSpec> {
    let body = || vec(any::<u8>(), 0..200);
    prop_oneof![
        Just(FrameSpec::KeyRequest),
        peer_key().prop_map(FrameSpec::KeyResponse),
        (peer_key(), any::<Cookie>(), body()).prop_map(|(k, c, b)| FrameSpec::ToRelay(k, c, b)),
        (any::<[u8; 16]>(), any::<Cookie>()).prop_map(|(e, c)| FrameSpec::CookieReply(e, c)),
        (peer_key(), body()).prop_map(|(k, b)| FrameSpec::FromRelay(k, b)),
        (peer_key(), body()).prop_map(|(k, b)| FrameSpec::RelaySend(k, b)),
        (peer_key(), body()).prop_map(|(k, b)| FrameSpec::RelayRecv(k, b)),
        (peer_key(), body()).prop_map(|(k, b)| FrameSpec::Disco(k, b)),
    ]
}

fn frame_of(spec: &FrameSpec) -> Frame<'_> {
    match spec {
        FrameSpec::KeyRequest => Frame::KeyRequest,
        FrameSpec::KeyResponse(relay) => Frame::KeyResponse { relay: *relay },
        FrameSpec::ToRelay(sender, cookie, sealed) => Frame::ToRelay {
            sender: *sender,
            cookie: *cookie,
            sealed,
        },
        FrameSpec::CookieReply(echo, cookie) => Frame::CookieReply {
            echo: *echo,
            cookie: *cookie,
        },
        FrameSpec::FromRelay(relay, sealed) => Frame::FromRelay {
            relay: *relay,
            sealed,
        },
        FrameSpec::RelaySend(to, payload) => Frame::RelaySend { to: *to, payload },
        FrameSpec::RelayRecv(from, payload) => Frame::RelayRecv {
            from: *from,
            payload,
        },
        FrameSpec::Disco(sender, sealed) => Frame::Disco {
            sender: *sender,
            sealed,
        },
    }
}

fn relay_request() -> impl Strategy<Value = RelayRequest> {
    prop_oneof![
        (
            network_id(),
            any::<u64>(),
            vec(any::<u8>(), 0..=MAX_ANNOUNCEMENT)
        )
            .prop_map(|(network, ts_ms, announcement)| RelayRequest::Register {
                network,
                ts_ms,
                announcement,
            }),
        (network_id(), any::<u64>())
            .prop_map(|(network, ts_ms)| RelayRequest::Leave { network, ts_ms }),
        (network_id(), any::<u64>())
            .prop_map(|(network, ts_ms)| RelayRequest::Sync { network, ts_ms }),
        (network_id(), any::<u64>(), 0..=MAX_ANSWER_AFTER_MS).prop_map(
            |(network, ts_ms, answer_after_ms)| RelayRequest::Refresh {
                network,
                ts_ms,
                answer_after_ms,
            }
        ),
        (
            network_id(),
            any::<u64>(),
            any::<bool>(),
            vec(rotation_entry(), 0..=ENTRIES_PER_REQUEST)
        )
            .prop_map(|(network, ts_ms, complete, entries)| RelayRequest::Rotate {
                network,
                ts_ms,
                complete,
                entries,
            }),
    ]
}

fn rotation_entry() -> impl Strategy<Value = RotationEntry> {
    (peer_key(), peer_key(), vec(any::<u8>(), SEALED_LEN)).prop_map(
        |(recipient, ephemeral, sealed)| RotationEntry {
            recipient,
            ephemeral,
            sealed: sealed.try_into().expect("SEALED_LEN bytes"),
        },
    )
}

/// `req` about network `id` instead.
fn with_network(req: RelayRequest, id: NetworkId) -> RelayRequest {
    match req {
        RelayRequest::Register {
            ts_ms,
            announcement,
            ..
        } => RelayRequest::Register {
            network: id,
            ts_ms,
            announcement,
        },
        RelayRequest::Leave { ts_ms, .. } => RelayRequest::Leave { network: id, ts_ms },
        RelayRequest::Sync { ts_ms, .. } => RelayRequest::Sync { network: id, ts_ms },
        RelayRequest::Refresh {
            ts_ms,
            answer_after_ms,
            ..
        } => RelayRequest::Refresh {
            network: id,
            ts_ms,
            answer_after_ms,
        },
        RelayRequest::Rotate {
            ts_ms,
            complete,
            entries,
            ..
        } => RelayRequest::Rotate {
            network: id,
            ts_ms,
            complete,
            entries,
        },
    }
}

fn relay_reply() -> impl Strategy<Value = RelayReply> {
    prop_oneof![
        (
            any::<u64>(),
            socket_addr(),
            any::<u32>(),
            any::<[u8; 8]>(),
            any::<u16>(),
            any::<u64>()
        )
            .prop_map(|(echo_ts_ms, observed, members, digest, ttl_s, since)| {
                RelayReply::RegisterAck {
                    echo_ts_ms,
                    observed,
                    members,
                    digest,
                    ttl_s,
                    since,
                }
            }),
        (
            (any::<u32>(), any::<u16>(), any::<u16>(), any::<u64>()),
            peer_key(),
            socket_addr(),
            vec(any::<u8>(), 0..=MAX_ANNOUNCEMENT),
            any::<u64>()
        )
            .prop_map(
                |((generation, index, total, seq), key, observed, announcement, since)| {
                    RelayReply::Member {
                        tag: SyncTag {
                            generation,
                            index,
                            total,
                            seq,
                        },
                        entry: MemberEntry {
                            key,
                            observed,
                            announcement,
                            since,
                        },
                    }
                }
            ),
        (peer_key(), any::<u64>()).prop_map(|(key, seq)| RelayReply::MemberGone { key, seq }),
        any::<u64>().prop_map(|echo_ts_ms| RelayReply::Unregistered { echo_ts_ms }),
        (any::<u32>(), any::<u64>())
            .prop_map(|(generation, seq)| RelayReply::SyncEmpty { generation, seq }),
        ".{0,100}".prop_map(|message| RelayReply::Error { message }),
        (any::<u64>(), any::<u32>(), any::<bool>()).prop_map(|(echo_ts_ms, stored, complete)| {
            RelayReply::RotateAck {
                echo_ts_ms,
                stored,
                complete,
            }
        }),
        (network_id(), proptest::option::of(rotation_entry()))
            .prop_map(|(network, entry)| RelayReply::Rotated { network, entry }),
    ]
}

fn disco() -> impl Strategy<Value = Disco> {
    prop_oneof![
        any::<[u8; 12]>().prop_map(|tx| Disco::Ping { tx }),
        (any::<[u8; 12]>(), socket_addr()).prop_map(|(tx, observed)| Disco::Pong { tx, observed }),
        vec(socket_addr(), 0..=MAX_ENDPOINTS).prop_map(|endpoints| Disco::CallMe { endpoints }),
        socket_addr().prop_map(|reflexive| Disco::Spray { reflexive }),
        (any::<[u8; 32]>(), vec(any::<u8>(), 0..=MAX_FORWARD_LEN)).prop_map(|(to, inner)| {
            Disco::Forward {
                to: PeerKey(to),
                inner,
            }
        }),
        (
            any::<[u8; 32]>(),
            socket_addr(),
            vec(any::<u8>(), 0..=MAX_FORWARD_LEN)
        )
            .prop_map(|(from, observed, inner)| Disco::Forwarded {
                from: PeerKey(from),
                observed,
                inner
            }),
    ]
}

fn nat_kind() -> impl Strategy<Value = NatKind> {
    prop_oneof![
        Just(NatKind::Unknown),
        Just(NatKind::Public),
        Just(NatKind::EndpointIndependent),
        Just(NatKind::EndpointDependent),
        Just(NatKind::UdpBlocked),
    ]
}

fn announcement(max_endpoints: usize) -> impl Strategy<Value = Announcement> {
    (
        peer_key(),
        ".{0,40}",
        any::<Ipv4Addr>(),
        any::<u64>(),
        vec(socket_addr(), 0..=max_endpoints),
        nat_kind(),
    )
        .prop_map(
            |(key, name, virtual_ip, ts_ms, endpoints, nat)| Announcement {
                key,
                name,
                virtual_ip,
                ts_ms,
                endpoints,
                nat,
            },
        )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn token_round_trips(t in token()) {
        let line = t.encode();
        prop_assert!(line.starts_with("mvpn2"));
        prop_assert_eq!(Token::decode(&line), Ok(t));
    }

    /// The text form (`KEY@HOST:PORT`, what `--relay` takes) names no TLS endpoint: members
    /// learn that from the relay, and the token carries it (see `token_round_trips`).
    #[test]
    fn relay_endpoint_round_trips(r in relay_endpoint().prop_map(|r| RelayEndpoint { tls: None, ..r })) {
        prop_assert_eq!(r.to_string().parse::<RelayEndpoint>(), Ok(r));
    }

    #[test]
    fn frames_round_trip(spec in frame_spec()) {
        let frame = frame_of(&spec);
        let bytes = frame.to_vec();
        prop_assert_eq!(Frame::parse(&bytes), Ok(frame));
    }

    #[test]
    fn relay_requests_round_trip(req in relay_request(), session in any::<[u8; 32]>(),
                                 sender in peer_key(), relay in peer_key(),
                                 secret in any::<[u8; 32]>(), cookie in any::<Cookie>(),
                                 signed_by_network in any::<bool>(), nonce in any::<[u8; 24]>()) {
        prop_assert_eq!(decode_relay_request(&encode_relay_request(&req)), Ok(req.clone()));
        let keys = NetworkSecret(secret).derive();
        // Half the cases name the signer's own network (a member), half a random id (someone
        // who only saw an id on the wire): only the first verifies.
        let req = if signed_by_network { with_network(req, keys.network_id) } else { req };
        let datagram = seal_request(&session, sender, &relay, &keys.signing, cookie, &req, nonce);
        let Ok(Frame::ToRelay { sender: s, cookie: c, sealed }) = Frame::parse(&datagram) else {
            return Err(TestCaseError::fail("a sealed request is a ToRelay frame"));
        };
        prop_assert_eq!(s, sender);
        prop_assert_eq!(c, cookie);
        let opened = open_request(&session, &s, &relay, &c, sealed);
        let Ok(signed) = opened else {
            return Err(TestCaseError::fail(format!("sealed request did not open: {opened:?}")));
        };
        prop_assert_eq!(&signed.request, &req);
        prop_assert_eq!(signed.verify(), req.network() == keys.network_id);
        // The signature binds the relay and the cookie: another relay or cookie does not verify.
        let mut other_relay = relay;
        other_relay.0[0] ^= 1;
        let moved = open_request(&session, &s, &other_relay, &c, sealed);
        prop_assert!(moved.is_ok_and(|m| !m.verify()));
        let mut other_cookie = cookie;
        other_cookie[0] ^= 1;
        prop_assert!(open_request(&session, &s, &relay, &other_cookie, sealed).is_err());
    }

    #[test]
    fn relay_replies_round_trip(reply in relay_reply(), session in any::<[u8; 32]>(),
                                relay in peer_key(), nonce in any::<[u8; 24]>()) {
        prop_assert_eq!(decode_relay_reply(&encode_relay_reply(&reply)), Ok(reply.clone()));
        let datagram = seal_from_relay(&session, relay, &reply, nonce);
        let Ok(Frame::FromRelay { relay: r, sealed }) = Frame::parse(&datagram) else {
            return Err(TestCaseError::fail("a sealed reply is a FromRelay frame"));
        };
        prop_assert_eq!(open_from_relay(&session, &r, sealed), Ok(reply));
    }

    #[test]
    fn disco_round_trips(msg in disco(), key in any::<[u8; 32]>(), sender in peer_key(),
                         nonce in any::<[u8; 24]>(), ts_ms in any::<u64>(), stamp_nonce in any::<u64>()) {
        let stamp = DiscoStamp { ts_ms, nonce: stamp_nonce };
        prop_assert_eq!(decode_disco(&encode_disco(stamp, &msg)), Ok((stamp, msg.clone())));
        let datagram = seal_disco(&key, sender, stamp, &msg, nonce);
        let Ok(Frame::Disco { sender: s, sealed }) = Frame::parse(&datagram) else {
            return Err(TestCaseError::fail("a sealed disco message is a Disco frame"));
        };
        prop_assert_eq!(open_disco(&key, &s, sealed), Ok((stamp, msg)));
    }

    #[test]
    fn call_me_keeps_the_first_endpoints(endpoints in vec(socket_addr(), 0..40)) {
        let msg = Disco::CallMe { endpoints: endpoints.clone() };
        let kept = endpoints.into_iter().take(MAX_ENDPOINTS).collect();
        let stamp = DiscoStamp { ts_ms: 1, nonce: 2 };
        prop_assert_eq!(
            decode_disco(&encode_disco(stamp, &msg)),
            Ok((stamp, Disco::CallMe { endpoints: kept }))
        );
    }

    #[test]
    fn announcements_round_trip(a in announcement(MAX_ENDPOINTS), control in any::<[u8; 32]>(),
                                network in network_id(), nonce in any::<[u8; 24]>()) {
        prop_assert_eq!(decode_announcement(a.key, &encode_announcement(&a)), Ok(a.clone()));
        let sealed = a.seal(&control, &network, nonce);
        prop_assert_eq!(Announcement::open(&control, &network, a.key, &sealed), Ok(a));
    }

    #[test]
    fn announcements_keep_the_first_endpoints(mut a in announcement(40)) {
        let decoded = decode_announcement(a.key, &encode_announcement(&a));
        a.endpoints.truncate(MAX_ENDPOINTS);
        prop_assert_eq!(decoded, Ok(a));
    }

    #[test]
    fn stun_round_trips(tx in any::<[u8; 12]>(), mapped in socket_addr()) {
        prop_assert_eq!(stun::parse(&stun::binding_request(tx)), Some(stun::Binding::Request(tx)));
        prop_assert_eq!(
            stun::parse(&stun::binding_response(tx, mapped)),
            Some(stun::Binding::Response { tx, mapped })
        );
    }

    #[test]
    fn control_requests_round_trip(req in prop_oneof![
        Just(Request::Status),
        Just(Request::Down),
        "[!-~]{1,40}".prop_map(Request::Ping),
        Just(Request::Rotate { exclude: None }),
        "[!-~]{1,40}".prop_map(|m| Request::Rotate { exclude: Some(m) }),
    ]) {
        prop_assert_eq!(Request::parse(&req.to_line()), Some(req));
    }
}
