//! Unit tests of [`Zone`]: every answer kind, built and read back with hickory-proto.

use super::*;
use proptest::prelude::*;
use std::str::FromStr;

const B_V4: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 2);
const B_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 2);

fn zone() -> Zone {
    let mut z = Zone::new("friends").expect("valid network name");
    z.set_members([
        ("Alice", Ipv4Addr::new(10, 77, 0, 1), None),
        ("b", B_V4, Some(B_V6)),
    ]);
    z
}

fn query(name: &str, qtype: RecordType) -> Vec<u8> {
    let mut m = Message::new(0x1234, MessageType::Query, OpCode::Query);
    m.metadata.recursion_desired = true;
    m.add_query(Query::query(
        Name::from_str(name).expect("test name"),
        qtype,
    ));
    m.to_vec().expect("encode test query")
}

fn ask(z: &mut Zone, name: &str, qtype: RecordType) -> Message {
    let bytes = z.answer(&query(name, qtype)).expect("an answer");
    Message::from_vec(&bytes).expect("decodable answer")
}

fn soa_in_authority(m: &Message) -> bool {
    matches!(m.authorities.as_slice(), [r] if r.record_type() == RecordType::SOA && r.ttl == TTL_SECS)
}

#[test]
fn a_and_aaaa_of_a_member() {
    let mut z = zone();
    let m = ask(&mut z, "b.friends.mesh.internal.", RecordType::A);
    assert_eq!(m.metadata.id, 0x1234);
    assert_eq!(m.metadata.message_type, MessageType::Response);
    assert_eq!(m.metadata.response_code, ResponseCode::NoError);
    assert!(m.metadata.authoritative);
    assert!(m.metadata.recursion_desired);
    assert_eq!(m.queries.len(), 1);
    assert!(
        matches!(m.answers.as_slice(), [r] if r.data == RData::A(A(B_V4)) && r.ttl == TTL_SECS)
    );

    let m = ask(&mut z, "b.friends.mesh.internal.", RecordType::AAAA);
    assert!(matches!(m.answers.as_slice(), [r] if r.data == RData::AAAA(AAAA(B_V6))));

    let m = ask(&mut z, "b.friends.mesh.internal.", RecordType::ANY);
    assert_eq!(m.answers.len(), 2);
    assert_eq!(z.counters().answered, 3);
}

#[test]
fn names_are_case_insensitive() {
    let mut z = zone();
    let m = ask(&mut z, "ALICE.Friends.MESH.internal.", RecordType::A);
    assert!(
        matches!(m.answers.as_slice(), [r] if r.data == RData::A(A(Ipv4Addr::new(10, 77, 0, 1))))
    );
}

#[test]
fn unknown_member_is_nxdomain_with_soa() {
    let mut z = zone();
    for name in ["carol.friends.mesh.internal.", "x.b.friends.mesh.internal."] {
        let m = ask(&mut z, name, RecordType::A);
        assert_eq!(m.metadata.response_code, ResponseCode::NXDomain, "{name}");
        assert!(m.answers.is_empty());
        assert!(soa_in_authority(&m), "{name}");
    }
    assert_eq!(z.counters().nxdomain, 2);
}

#[test]
fn known_name_without_the_type_is_nodata_with_soa() {
    let mut z = zone();
    for (name, qtype) in [
        ("alice.friends.mesh.internal.", RecordType::AAAA),
        ("b.friends.mesh.internal.", RecordType::MX),
        ("friends.mesh.internal.", RecordType::A),
    ] {
        let m = ask(&mut z, name, qtype);
        assert_eq!(m.metadata.response_code, ResponseCode::NoError, "{name}");
        assert!(m.answers.is_empty(), "{name}");
        assert!(soa_in_authority(&m), "{name}");
    }
    assert_eq!(z.counters().nodata, 3);
}

#[test]
fn apex_soa_is_answered_and_serial_follows_changes() {
    let mut z = zone();
    let serial = |m: &Message| match m.answers.first().map(|r| &r.data) {
        Some(RData::SOA(soa)) => soa.serial,
        other => panic!("expected an SOA, got {other:?}"),
    };
    let before = serial(&ask(&mut z, "friends.mesh.internal.", RecordType::SOA));
    z.set_members([
        ("b", B_V4, Some(B_V6)),
        ("alice", Ipv4Addr::new(10, 77, 0, 1), None),
    ]);
    assert_eq!(
        serial(&ask(&mut z, "friends.mesh.internal.", RecordType::SOA)),
        before
    );
    z.set_members([("b", B_V4, None::<Ipv6Addr>)]);
    assert_eq!(
        serial(&ask(&mut z, "friends.mesh.internal.", RecordType::SOA)),
        before + 1
    );
}

#[test]
fn a_member_removed_from_the_table_disappears() {
    let mut z = zone();
    z.set_members([("alice", Ipv4Addr::new(10, 77, 0, 1), None::<Ipv6Addr>)]);
    let m = ask(&mut z, "b.friends.mesh.internal.", RecordType::A);
    assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);
    assert_eq!(z.len(), 1);
}

#[test]
fn names_outside_the_zone_and_other_classes_are_refused() {
    let mut z = zone();
    for name in [
        "example.com.",
        "b.enemies.mesh.internal.",
        "mesh.internal.",
        "b.friends.mesh.internal.evil.",
    ] {
        let m = ask(&mut z, name, RecordType::A);
        assert_eq!(m.metadata.response_code, ResponseCode::Refused, "{name}");
        assert!(!m.metadata.authoritative);
        assert!(m.answers.is_empty() && m.authorities.is_empty());
    }
    let mut m = Message::new(7, MessageType::Query, OpCode::Query);
    let mut q = Query::query(
        Name::from_str("b.friends.mesh.internal.").expect("name"),
        RecordType::A,
    );
    q.set_query_class(DNSClass::CH);
    m.add_query(q);
    let bytes = z.answer(&m.to_vec().expect("encode")).expect("answer");
    let r = Message::from_vec(&bytes).expect("decode");
    assert_eq!(r.metadata.response_code, ResponseCode::Refused);
    assert_eq!(z.counters().refused, 5);
}

#[test]
fn malformed_queries_get_formerr_or_are_dropped() {
    let mut z = zone();
    // Too short for a header: dropped.
    assert_eq!(z.answer(&[]), None);
    assert_eq!(z.answer(&[1, 2, 3]), None);
    // A response is never answered.
    let mut resp = Message::new(9, MessageType::Response, OpCode::Query);
    resp.add_query(Query::query(
        Name::from_str("b.friends.mesh.internal.").expect("name"),
        RecordType::A,
    ));
    assert_eq!(z.answer(&resp.to_vec().expect("encode")), None);
    // A header claiming one question that is not there: FORMERR with the same ID.
    let bytes = [0xab, 0xcd, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
    let r = Message::from_vec(&z.answer(&bytes).expect("formerr")).expect("decode");
    assert_eq!(r.metadata.id, 0xabcd);
    assert_eq!(r.metadata.response_code, ResponseCode::FormErr);
    // No question at all: FORMERR.
    let empty = Message::new(5, MessageType::Query, OpCode::Query);
    let r = Message::from_vec(&z.answer(&empty.to_vec().expect("encode")).expect("answer"))
        .expect("decode");
    assert_eq!(r.metadata.response_code, ResponseCode::FormErr);
    // Two questions: FORMERR, and neither is echoed back.
    let mut two = Message::new(8, MessageType::Query, OpCode::Query);
    for name in ["b.friends.mesh.internal.", "alice.friends.mesh.internal."] {
        two.add_query(Query::query(
            Name::from_str(name).expect("name"),
            RecordType::A,
        ));
    }
    let r = Message::from_vec(&z.answer(&two.to_vec().expect("encode")).expect("answer"))
        .expect("decode");
    assert_eq!(r.metadata.response_code, ResponseCode::FormErr);
    assert!(r.queries.is_empty() && r.answers.is_empty());
    // Another opcode: NOTIMP.
    let mut notify = Message::new(6, MessageType::Query, OpCode::Notify);
    notify.add_query(Query::query(
        Name::from_str("friends.mesh.internal.").expect("name"),
        RecordType::SOA,
    ));
    let r = Message::from_vec(&z.answer(&notify.to_vec().expect("encode")).expect("answer"))
        .expect("decode");
    assert_eq!(r.metadata.response_code, ResponseCode::NotImp);
    assert_eq!(z.counters().dropped, 3);
    assert_eq!(z.counters().malformed, 4);
}

#[test]
fn edns_queries_get_an_edns_answer() {
    let mut z = zone();
    let mut m = Message::new(1, MessageType::Query, OpCode::Query);
    m.add_query(Query::query(
        Name::from_str("b.friends.mesh.internal.").expect("name"),
        RecordType::A,
    ));
    m.set_edns(Edns::new());
    let r = Message::from_vec(&z.answer(&m.to_vec().expect("encode")).expect("answer"))
        .expect("decode");
    assert_eq!(r.edns.map(|e| e.max_payload()), Some(EDNS_PAYLOAD));
    assert_eq!(r.answers.len(), 1);
}

#[test]
fn zone_construction_checks_names() {
    assert!(Zone::new("bad.name").is_err());
    assert_eq!(
        Zone::new("Friends").map(|z| z.domain()),
        Ok("friends.mesh.internal".to_owned())
    );
    let mut z = zone();
    z.set_members([
        ("no.dots", B_V4, None::<Ipv6Addr>),
        ("b", B_V4, None),
        ("B", Ipv4Addr::LOCALHOST, None),
    ]);
    assert_eq!(z.len(), 1);
    let m = ask(&mut z, "b.friends.mesh.internal.", RecordType::A);
    assert!(matches!(m.answers.as_slice(), [r] if r.data == RData::A(A(B_V4))));
}

proptest! {
    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
        let mut z = zone();
        if let Some(out) = z.answer(&bytes) {
            prop_assert!(Message::from_vec(&out).is_ok());
        }
    }

    #[test]
    fn mutated_queries_never_panic(
        flips in proptest::collection::vec((0usize..64, any::<u8>()), 1..6),
    ) {
        let mut z = zone();
        let mut bytes = query("b.friends.mesh.internal.", RecordType::A);
        for (at, value) in flips {
            let len = bytes.len();
            bytes[at % len] = value;
        }
        if let Some(out) = z.answer(&bytes) {
            prop_assert!(Message::from_vec(&out).is_ok());
        }
    }
}

#[test]
fn resolved_holders_feed_the_zone() {
    let addresses: BTreeMap<u8, Ipv4Addr> = [(1, Ipv4Addr::new(10, 77, 0, 1)), (2, B_V4)].into();
    let table = resolve_names([
        NameClaim {
            key: 2,
            name: "Bob".into(),
            since: 50,
        },
        NameClaim {
            key: 1,
            name: "bob".into(),
            since: 100,
        },
    ]);
    let mut z = Zone::new("friends").expect("valid network name");
    z.set_members(
        table
            .holders
            .iter()
            .filter_map(|(l, k)| addresses.get(k).map(|ip| (l.as_str(), *ip, None))),
    );
    let m = ask(&mut z, "bob.friends.mesh.internal.", RecordType::A);
    assert!(matches!(m.answers.as_slice(), [r] if r.data == RData::A(A(B_V4))));
    assert_eq!(table.conflicts.len(), 1);
}
