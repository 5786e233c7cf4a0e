//! Member names in DNS: the zone of one network and the responder that answers for it.
//!
//! Every member is reachable as `NAME.NETWORK.mesh.internal`. The suffix is [`SUFFIX`]:
//!
//! - `.internal` is reserved by ICANN (2024) for private use and will never be delegated in the
//!   public DNS, so nobody can register a name that a member's resolver would send to us, or
//!   that we would shadow;
//! - the extra `mesh` label keeps our names out of the way of other private users of
//!   `.internal` on the same host (cloud metadata services answer under `*.internal`, e.g.
//!   `metadata.google.internal`): a network named `google` is `google.mesh.internal`, which no one
//!   else claims.
//!
//! [`Zone`] is sans-IO: it holds the member table of one network and turns one DNS query
//! message into one response message ([`Zone::answer`]); the tokio piece that moves datagrams is
//! [`server`]. The wire format is hickory-proto's; nothing here hand-encodes DNS.
//!
//! ## Answers
//! | question | answer |
//! |---|---|
//! | `A`/`AAAA`/`ANY` of a member | its address(es), authoritative, TTL [`TTL_SECS`] |
//! | another type of a member, or `AAAA` of a member without IPv6 | NOERROR, no records (NODATA), SOA in authority |
//! | the apex `NETWORK.mesh.internal`, `SOA` | the SOA; other types NODATA |
//! | any other name in the zone | NXDOMAIN, SOA in authority |
//! | a name outside the zone, or a class other than `IN` | REFUSED |
//! | opcode other than `QUERY` | NOTIMP |
//! | not exactly one question, or undecodable after the header | FORMERR |
//! | shorter than a header, or a response (QR set) | dropped, no answer |
//!
//! Responses are small (one question, at most one `A` and one `AAAA`, or one SOA), so they fit
//! the 512 bytes of plain UDP DNS and are never truncated.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, Ipv6Addr};

use hickory_proto::op::{Edns, Message, MessageType, Metadata, OpCode, Query, ResponseCode};
use hickory_proto::rr::rdata::{A, AAAA, SOA};
use hickory_proto::rr::{DNSClass, Name, RData, Record, RecordType};

pub mod names;

pub mod server;

pub use names::{label, resolve_names, NameClaim, NameConflict, NameError, NameTable};

/// The suffix under which each network has its zone: `NETWORK.mesh.internal` (see the module
/// doc for why this one).
pub const SUFFIX: &str = "mesh.internal";

/// TTL of every answer and the SOA's negative-caching TTL, in seconds.
///
/// Member addresses rarely change, but a member that leaves must vanish from DNS within the
/// leave time; a resolver cache (systemd-resolved's, an application's) may hold an answer for
/// the whole TTL, so the TTL bounds that staleness. Ten seconds is well under the leave time and
/// costs nothing: the server is on the member's own virtual IP, so a cache miss is a local query.
pub const TTL_SECS: u32 = 10;

/// The payload size we advertise in EDNS replies: the 1232 bytes recommended by DNS Flag Day
/// 2020 (fits an IPv6 minimum-MTU path without fragmentation); our answers are far smaller.
const EDNS_PAYLOAD: u16 = 1232;

/// Length of a DNS header; anything shorter has no ID to answer to and is dropped.
const HEADER_LEN: usize = 12;

/// How many queries a [`Zone`] answered, by kind, and how many it dropped.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ZoneCounters {
    /// Answers carrying records (including the apex SOA).
    pub answered: u64,
    /// NODATA answers: the name exists without the asked type.
    pub nodata: u64,
    /// NXDOMAIN answers: no such member.
    pub nxdomain: u64,
    /// REFUSED: outside the zone or not class IN.
    pub refused: u64,
    /// FORMERR and NOTIMP answers to queries we could not or would not serve.
    pub malformed: u64,
    /// Datagrams dropped without an answer (too short, or not a query).
    pub dropped: u64,
}

/// One member's addresses in the zone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Member {
    v4: Ipv4Addr,
    v6: Option<Ipv6Addr>,
}

/// The DNS zone of one network, `NETWORK.mesh.internal`, and its responder.
///
/// Driving contract: build with [`Zone::new`]; replace the member table with
/// [`Zone::set_members`] whenever membership changes (names already made unique by
/// [`resolve_names`]); hand every received DNS message to [`Zone::answer`] and send back what it
/// returns, if anything. No I/O, no clock: the SOA serial counts member-table changes.
#[derive(Debug, Clone)]
pub struct Zone {
    apex: Name,
    soa: Record,
    /// The SOA serial: starts at 1, counts changes of the member table.
    serial: u32,
    members: BTreeMap<String, Member>,
    counters: ZoneCounters,
}

impl Zone {
    /// A zone for `network`, empty; fails if the network name is not a DNS label.
    pub fn new(network: &str) -> Result<Zone, NameError> {
        let network_label = label(network)?;
        let apex = Name::from_ascii(format!("{network_label}.{SUFFIX}."))
            .expect("a checked label plus the fixed suffix is a valid name");
        let mut zone = Zone {
            soa: soa_record(&apex, 0),
            serial: 0,
            apex,
            members: BTreeMap::new(),
            counters: ZoneCounters::default(),
        };
        zone.bump_serial();
        Ok(zone)
    }

    /// The zone's apex, `NETWORK.mesh.internal` without the trailing dot (what resolved routes).
    pub fn domain(&self) -> String {
        self.apex.to_ascii().trim_end_matches('.').to_owned()
    }

    /// Replaces the member table. Names go through [`label`]; an invalid name is skipped and a
    /// repeated label keeps its first entry, so pass the holders from [`resolve_names`].
    pub fn set_members<S, I>(&mut self, members: I)
    where
        S: AsRef<str>,
        I: IntoIterator<Item = (S, Ipv4Addr, Option<Ipv6Addr>)>,
    {
        let mut table = BTreeMap::new();
        for (name, v4, v6) in members {
            if let Ok(l) = label(name.as_ref()) {
                table.entry(l).or_insert(Member { v4, v6 });
            }
        }
        if table != self.members {
            self.members = table;
            self.bump_serial();
        }
    }

    /// Number of members with a name in the zone.
    pub fn len(&self) -> usize {
        self.members.len()
    }

    /// Whether the zone has no member names.
    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    /// The counters so far.
    pub fn counters(&self) -> ZoneCounters {
        self.counters
    }

    /// Answers one DNS message; `None` means drop it (see the table in the module doc).
    pub fn answer(&mut self, query: &[u8]) -> Option<Vec<u8>> {
        let response = self.respond(query)?;
        match response.to_vec() {
            Ok(bytes) => Some(bytes),
            Err(_) => {
                self.counters.dropped += 1;
                None
            }
        }
    }

    fn respond(&mut self, query: &[u8]) -> Option<Message> {
        // Header: ID (2), then QR|OPCODE(4)|AA|TC|RD in byte 2.
        let (id, flags) = match query {
            [hi, lo, flags, ..] if query.len() >= HEADER_LEN => {
                (u16::from_be_bytes([*hi, *lo]), *flags)
            }
            _ => {
                self.counters.dropped += 1;
                return None;
            }
        };
        if flags & 0x80 != 0 {
            // A response: answering it could start a loop between two servers.
            self.counters.dropped += 1;
            return None;
        }
        let Ok(request) = Message::from_vec(query) else {
            self.counters.malformed += 1;
            let op_code = OpCode::from_u8((flags >> 3) & 0x0f);
            return Some(Message::error_msg(id, op_code, ResponseCode::FormErr));
        };
        let mut response = Message::new(0, MessageType::Response, OpCode::Query);
        response.metadata = Metadata::response_from_request(&request.metadata);
        if request.edns.is_some() {
            let mut edns = Edns::new();
            edns.set_max_payload(EDNS_PAYLOAD);
            response.set_edns(edns);
        }
        if request.metadata.op_code != OpCode::Query {
            self.counters.malformed += 1;
            response.metadata.response_code = ResponseCode::NotImp;
            return Some(response);
        }
        // Only a single question is echoed, so an answer is never larger than it must be.
        let [question] = request.queries.as_slice() else {
            self.counters.malformed += 1;
            response.metadata.response_code = ResponseCode::FormErr;
            return Some(response);
        };
        response.add_query(question.clone());
        self.resolve(question, &mut response);
        Some(response)
    }

    /// Fills `response` for one question inside or outside the zone.
    fn resolve(&mut self, question: &Query, response: &mut Message) {
        let name = question.name();
        if question.query_class() != DNSClass::IN || !self.apex.zone_of(name) {
            self.counters.refused += 1;
            response.metadata.response_code = ResponseCode::Refused;
            return;
        }
        response.metadata.authoritative = true;
        let qtype = question.query_type();
        let depth = name.num_labels().saturating_sub(self.apex.num_labels());
        let records = match depth {
            0 => {
                if matches!(qtype, RecordType::SOA | RecordType::ANY) {
                    vec![self.soa.clone()]
                } else {
                    Vec::new()
                }
            }
            1 => {
                let first = name.iter().next().map(<[u8]>::to_ascii_lowercase);
                let member = first
                    .and_then(|l| String::from_utf8(l).ok())
                    .and_then(|l| self.members.get(&l).copied());
                let Some(member) = member else {
                    return self.negative(response, ResponseCode::NXDomain);
                };
                member_records(name, member, qtype)
            }
            _ => return self.negative(response, ResponseCode::NXDomain),
        };
        if records.is_empty() {
            return self.negative(response, ResponseCode::NoError);
        }
        self.counters.answered += 1;
        response.add_answers(records);
    }

    /// A negative answer (NXDOMAIN or NODATA) with the SOA for negative caching (RFC 2308).
    fn negative(&mut self, response: &mut Message, code: ResponseCode) {
        if code == ResponseCode::NXDomain {
            self.counters.nxdomain += 1;
        } else {
            self.counters.nodata += 1;
        }
        response.metadata.response_code = code;
        response.add_authority(self.soa.clone());
    }

    fn bump_serial(&mut self) {
        self.serial = self.serial.wrapping_add(1);
        self.soa = soa_record(&self.apex, self.serial);
    }
}

/// The records of `member` that answer `qtype` at `name`.
fn member_records(name: &Name, member: Member, qtype: RecordType) -> Vec<Record> {
    let mut out = Vec::new();
    if matches!(qtype, RecordType::A | RecordType::ANY) {
        out.push(Record::from_rdata(
            name.clone(),
            TTL_SECS,
            RData::A(A(member.v4)),
        ));
    }
    if let (true, Some(v6)) = (
        matches!(qtype, RecordType::AAAA | RecordType::ANY),
        member.v6,
    ) {
        out.push(Record::from_rdata(
            name.clone(),
            TTL_SECS,
            RData::AAAA(AAAA(v6)),
        ));
    }
    out
}

/// The zone's SOA. The primary name is the apex itself (every member serves the zone on its own
/// address; there is no separate name server name); the refresh/retry/expire timers matter only
/// to secondaries, which this zone never has, and are set to the TTL.
fn soa_record(apex: &Name, serial: u32) -> Record {
    let ttl = i32::try_from(TTL_SECS).expect("TTL_SECS fits an i32");
    let rname = Name::from_ascii("hostmaster")
        .ok()
        .and_then(|h| h.append_domain(apex).ok())
        .unwrap_or_else(|| apex.clone());
    let soa = SOA::new(apex.clone(), rname, serial, ttl, ttl, ttl, TTL_SECS);
    Record::from_rdata(apex.clone(), TTL_SECS, RData::SOA(soa))
}

#[cfg(test)]
mod tests;
