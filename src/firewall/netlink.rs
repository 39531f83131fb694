//! Reads jitd's table straight from the kernel over nfnetlink dumps (GETTABLE, GETCHAIN,
//! GETRULE, GETSET, GETSETELEM). `nft list` fetches every set element and prints it as
//! text or JSON, which takes seconds at 100,000 grants; a dump takes milliseconds.
//!
//! Writes stay with `nft` (the nftables crate's JSON batches): this module only reads
//! nftables. [`Reader::request_to`] also speaks to other nfnetlink subsystems
//! (ctnetlink, for [`super::conntrack`]).

use std::io;

use netlink_sys::{protocols::NETLINK_NETFILTER, Socket, SocketAddr};

/// The nfnetlink subsystem of nftables (high byte of a message type).
pub const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NFT_MSG_GETTABLE: u16 = 1;
const NFT_MSG_GETCHAIN: u16 = 4;
const NFT_MSG_GETRULE: u16 = 7;
const NFT_MSG_GETSET: u16 = 10;
const NFT_MSG_GETSETELEM: u16 = 13;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_DUMP: u16 = 0x300;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NFPROTO_INET: u8 = 1;
const NLA_TYPE_MASK: u16 = 0x3fff;
const HDR: usize = 16;
/// Size of the nfgenmsg header that starts every nfnetlink message body.
pub const NFGEN: usize = 4;

/// A netlink attribute: its type (flags masked off) and payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attr {
    /// Attribute type.
    pub kind: u16,
    /// Payload bytes.
    pub value: Vec<u8>,
}

/// One object of a dump: the message type and its attributes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Object {
    /// nftables message type (NEWCHAIN, NEWRULE, ...), subsystem stripped.
    pub kind: u16,
    /// Top-level attributes, in kernel order.
    pub attrs: Vec<Attr>,
}

impl Object {
    /// The payload of the first attribute of `kind`.
    pub fn get(&self, kind: u16) -> Option<&[u8]> {
        self.attrs.iter().find(|a| a.kind == kind).map(|a| a.value.as_slice())
    }

    /// The string payload of attribute `kind` (NUL stripped).
    pub fn string(&self, kind: u16) -> Option<String> {
        self.get(kind)
            .map(|v| String::from_utf8_lossy(v).trim_end_matches('\0').to_string())
    }
}

/// Splits a payload into attributes.
pub fn parse_attrs(mut data: &[u8]) -> Vec<Attr> {
    let mut attrs = Vec::new();
    while data.len() >= 4 {
        let len = u16::from_ne_bytes([data[0], data[1]]) as usize;
        let kind = u16::from_ne_bytes([data[2], data[3]]) & NLA_TYPE_MASK;
        if len < 4 || len > data.len() {
            break;
        }
        attrs.push(Attr {
            kind,
            value: data[4..len].to_vec(),
        });
        data = &data[align4(len).min(data.len())..];
    }
    attrs
}

fn align4(n: usize) -> usize {
    (n + 3) & !3
}

/// Splits a datagram into netlink messages: (type, sequence number, body after the
/// header). Stops at the first truncated message.
pub fn messages(mut data: &[u8]) -> Vec<(u16, u32, &[u8])> {
    let mut found = Vec::new();
    while data.len() >= HDR {
        let len = u32::from_ne_bytes(data[0..4].try_into().expect("4 bytes")) as usize;
        let kind = u16::from_ne_bytes(data[4..6].try_into().expect("2 bytes"));
        let seq = u32::from_ne_bytes(data[8..12].try_into().expect("4 bytes"));
        if len < HDR || len > data.len() {
            break;
        }
        found.push((kind, seq, &data[HDR..len]));
        data = &data[align4(len).min(data.len())..];
    }
    found
}

/// Appends an attribute (header, payload, padding) to `buf`.
pub fn put_attr(buf: &mut Vec<u8>, kind: u16, value: &[u8]) {
    buf.extend_from_slice(&((4 + value.len()) as u16).to_ne_bytes());
    buf.extend_from_slice(&kind.to_ne_bytes());
    buf.extend_from_slice(value);
    while buf.len() % 4 != 0 {
        buf.push(0);
    }
}

fn cstr(s: &str) -> Vec<u8> {
    let mut v = s.as_bytes().to_vec();
    v.push(0);
    v
}

/// A netfilter netlink socket for one dump at a time.
pub struct Reader {
    socket: Socket,
    seq: u32,
    buf: Vec<u8>,
}

impl Reader {
    /// Opens the socket (fails when the kernel has no nfnetlink).
    pub fn open() -> io::Result<Reader> {
        let mut socket = Socket::new(NETLINK_NETFILTER)?;
        socket.bind(&SocketAddr::new(0, 0))?;
        let _ = socket.set_rx_buf_sz(8 * 1024 * 1024);
        Ok(Reader {
            socket,
            seq: 0,
            buf: vec![0u8; 1 << 20],
        })
    }

    /// Sends one request and collects every object of the answer. `Ok(None)` when the
    /// kernel answers ENOENT (no such table or set).
    pub fn request(&mut self, msg: u16, dump: bool, attrs: &[(u16, Vec<u8>)]) -> io::Result<Option<Vec<Object>>> {
        self.request_to(NFNL_SUBSYS_NFTABLES, msg, NFPROTO_INET, dump, attrs)
    }

    /// Like [`Reader::request`], to another nfnetlink subsystem (e.g. ctnetlink) and
    /// with the nfgenmsg family `family`.
    pub fn request_to(
        &mut self,
        subsys: u16,
        msg: u16,
        family: u8,
        dump: bool,
        attrs: &[(u16, Vec<u8>)],
    ) -> io::Result<Option<Vec<Object>>> {
        let mut objects = Vec::new();
        let found = self.request_each(subsys, msg, family, dump, attrs, |o| objects.push(o))?;
        Ok(found.then_some(objects))
    }

    /// Like [`Reader::request_to`], handing each object of the answer to `each` as it
    /// arrives instead of collecting them (a dump of 100,000 set elements is then never
    /// held whole). `Ok(false)` when the kernel answers ENOENT.
    pub fn request_each(
        &mut self,
        subsys: u16,
        msg: u16,
        family: u8,
        dump: bool,
        attrs: &[(u16, Vec<u8>)],
        mut each: impl FnMut(Object),
    ) -> io::Result<bool> {
        self.seq = self.seq.wrapping_add(1);
        let flags = NLM_F_REQUEST | if dump { NLM_F_DUMP } else { NLM_F_ACK };
        let mut packet = Vec::new();
        put_message(&mut packet, (subsys << 8) | msg, flags, self.seq, family, attrs);
        self.socket.send_to(&packet, &SocketAddr::new(0, 0), 0)?;
        loop {
            let n = self.socket.recv(&mut &mut self.buf[..], 0)?;
            for (kind, seq, body) in messages(&self.buf[..n.min(self.buf.len())]) {
                if seq != self.seq {
                    continue;
                }
                match kind {
                    NLMSG_DONE => return Ok(true),
                    NLMSG_ERROR => {
                        let errno =
                            i32::from_ne_bytes(body.get(0..4).and_then(|b| b.try_into().ok()).unwrap_or([0; 4]));
                        return match -errno {
                            0 if !dump => Ok(true),
                            0 => continue,
                            e if e == nix::errno::Errno::ENOENT as i32 => Ok(false),
                            e => Err(io::Error::from_raw_os_error(e)),
                        };
                    }
                    _ if body.len() >= NFGEN => {
                        each(Object {
                            kind: kind & 0xff,
                            attrs: parse_attrs(&body[NFGEN..]),
                        });
                        if !dump {
                            // the ACK that follows ends the exchange
                            continue;
                        }
                    }
                    _ => {}
                }
            }
        }
    }
}

impl Reader {
    /// Sends the nftables get requests `requests` (the attributes of each), many to one
    /// datagram, and hands each answer to `each` with its index: the object, or `None`
    /// when the kernel answers ENOENT. A round trip per [`MANY_AT_ONCE`] requests
    /// rather than per request.
    fn get_many(
        &mut self,
        msg: u16,
        requests: &[Vec<(u16, Vec<u8>)>],
        mut each: impl FnMut(usize, Option<Object>),
    ) -> io::Result<()> {
        for (chunk, batch) in requests.chunks(MANY_AT_ONCE).enumerate() {
            let first = self.seq.wrapping_add(1);
            let mut packet = Vec::new();
            for attrs in batch {
                self.seq = self.seq.wrapping_add(1);
                // no NLM_F_ACK: one answer per request, the object or an error
                put_message(
                    &mut packet,
                    (NFNL_SUBSYS_NFTABLES << 8) | msg,
                    NLM_F_REQUEST,
                    self.seq,
                    NFPROTO_INET,
                    attrs,
                );
            }
            self.socket.send_to(&packet, &SocketAddr::new(0, 0), 0)?;
            let mut left = batch.len();
            while left > 0 {
                let n = self.socket.recv(&mut &mut self.buf[..], 0)?;
                for (kind, seq, body) in messages(&self.buf[..n.min(self.buf.len())]) {
                    let i = seq.wrapping_sub(first) as usize;
                    if i >= batch.len() {
                        continue; // an answer to an earlier request
                    }
                    let index = chunk * MANY_AT_ONCE + i;
                    match kind {
                        NLMSG_ERROR => {
                            let errno =
                                i32::from_ne_bytes(body.get(0..4).and_then(|b| b.try_into().ok()).unwrap_or([0; 4]));
                            match -errno {
                                e if e == nix::errno::Errno::ENOENT as i32 => each(index, None),
                                0 => continue, // not asked for; never counts as the answer
                                e => return Err(io::Error::from_raw_os_error(e)),
                            }
                        }
                        _ if body.len() >= NFGEN => each(
                            index,
                            Some(Object {
                                kind: kind & 0xff,
                                attrs: parse_attrs(&body[NFGEN..]),
                            }),
                        ),
                        _ => continue,
                    }
                    left -= 1;
                }
            }
        }
        Ok(())
    }
}

/// How many get requests [`Reader::get_many`] sends in one datagram: their answers
/// (about 150 bytes each) stay far below the socket's receive buffer.
const MANY_AT_ONCE: usize = 256;

/// Appends one netlink message (header, nfgenmsg of `family`, `attrs`) to `packet`.
fn put_message(packet: &mut Vec<u8>, kind: u16, flags: u16, seq: u32, family: u8, attrs: &[(u16, Vec<u8>)]) {
    let mut payload = vec![family, 0, 0, 0];
    for (attr, value) in attrs {
        put_attr(&mut payload, *attr, value);
    }
    packet.extend_from_slice(&((HDR + payload.len()) as u32).to_ne_bytes());
    packet.extend_from_slice(&kind.to_ne_bytes());
    packet.extend_from_slice(&flags.to_ne_bytes());
    packet.extend_from_slice(&seq.to_ne_bytes());
    packet.extend_from_slice(&0u32.to_ne_bytes());
    packet.extend_from_slice(&payload);
}

/// Attribute numbers (linux/netfilter/nf_tables.h) the readers below use.
pub mod attr {
    /// NFTA_TABLE_NAME.
    pub const TABLE_NAME: u16 = 1;
    /// NFTA_CHAIN_TABLE / NFTA_RULE_TABLE / NFTA_SET_TABLE / NFTA_SET_ELEM_LIST_TABLE: all 1.
    pub const OBJ_TABLE: u16 = 1;
    /// NFTA_SET_NAME / NFTA_SET_ELEM_LIST_SET.
    pub const SET_NAME: u16 = 2;
    /// NFTA_CHAIN_HANDLE.
    pub const CHAIN_HANDLE: u16 = 2;
    /// NFTA_CHAIN_USE.
    pub const CHAIN_USE: u16 = 6;
    /// NFTA_CHAIN_COUNTERS.
    pub const CHAIN_COUNTERS: u16 = 8;
    /// NFTA_RULE_HANDLE.
    pub const RULE_HANDLE: u16 = 3;
    /// NFTA_RULE_EXPRESSIONS.
    pub const RULE_EXPRESSIONS: u16 = 4;
    /// NFTA_RULE_POSITION.
    pub const RULE_POSITION: u16 = 6;
    /// NFTA_SET_HANDLE.
    pub const SET_HANDLE: u16 = 16;
    /// NFTA_SET_COUNT (number of elements, newer kernels).
    pub const SET_COUNT: u16 = 20;
    /// NFTA_SET_ELEM_LIST_ELEMENTS.
    pub const ELEM_LIST_ELEMENTS: u16 = 3;
    /// NFTA_SET_ELEM_KEY.
    pub const ELEM_KEY: u16 = 1;
    /// NFTA_SET_ELEM_FLAGS.
    pub const ELEM_FLAGS: u16 = 3;
    /// NFTA_SET_ELEM_EXPIRATION.
    pub const ELEM_EXPIRATION: u16 = 5;
    /// NFTA_SET_ELEM_EXPR: the element's one stateful expression (its counter).
    pub const ELEM_EXPR: u16 = 7;
    /// NFTA_SET_ELEM_EXPRESSIONS: its expressions, when it has more than one.
    pub const ELEM_EXPRESSIONS: u16 = 11;
    /// NFTA_SET_ELEM_KEY_END.
    pub const ELEM_KEY_END: u16 = 10;
    /// NFTA_DATA_VALUE.
    pub const DATA_VALUE: u16 = 1;
    /// NFTA_EXPR_NAME.
    pub const EXPR_NAME: u16 = 1;
    /// NFTA_EXPR_DATA.
    pub const EXPR_DATA: u16 = 2;
    /// NFTA_COUNTER_PACKETS (inside a counter's NFTA_EXPR_DATA).
    pub const COUNTER_PACKETS: u16 = 2;
}

/// The message types of the objects a table listing is made of.
pub mod msg {
    /// NFT_MSG_NEWCHAIN.
    pub const CHAIN: u16 = 3;
    /// NFT_MSG_NEWRULE.
    pub const RULE: u16 = 6;
    /// NFT_MSG_NEWSET.
    pub const SET: u16 = 9;
}

/// One set element as the kernel holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawElement {
    /// Key bytes (each field padded to 4 bytes).
    pub key: Vec<u8>,
    /// End of the range, for interval sets of concatenations.
    pub key_end: Option<Vec<u8>>,
    /// NFTA_SET_ELEM_FLAGS (1: interval end).
    pub flags: u32,
    /// Milliseconds left before the kernel drops it.
    pub expires_ms: Option<u64>,
    /// The packets its counter has counted, when it has one (jitd's grant sets give
    /// every element a counter).
    pub packets: Option<u64>,
}

/// Everything of table `inet TABLE` except set elements: chains, rules and sets, each
/// as the kernel dumps it. `None` when the table does not exist.
pub fn dump_table(reader: &mut Reader, table: &str) -> io::Result<Option<Vec<Object>>> {
    if reader
        .request(NFT_MSG_GETTABLE, false, &[(attr::TABLE_NAME, cstr(table))])?
        .is_none()
    {
        return Ok(None);
    }
    let mut objects = Vec::new();
    for msg in [NFT_MSG_GETCHAIN, NFT_MSG_GETRULE, NFT_MSG_GETSET] {
        let found = reader
            .request(msg, true, &[(attr::OBJ_TABLE, cstr(table))])?
            .unwrap_or_default();
        objects.extend(
            found
                .into_iter()
                .filter(|o| o.string(attr::OBJ_TABLE).as_deref() == Some(table)),
        );
    }
    Ok(Some(objects))
}

/// The elements of set `set` in table `inet TABLE`; `None` when the set does not exist.
pub fn dump_elements(reader: &mut Reader, table: &str, set: &str) -> io::Result<Option<Vec<RawElement>>> {
    let mut elements = Vec::new();
    let found = reader.request_each(
        NFNL_SUBSYS_NFTABLES,
        NFT_MSG_GETSETELEM,
        NFPROTO_INET,
        true,
        &[(attr::OBJ_TABLE, cstr(table)), (attr::SET_NAME, cstr(set))],
        |object| elements.extend(elements_of(std::slice::from_ref(&object))),
    )?;
    Ok(found.then_some(elements))
}

/// Elements of set `set` in table `inet TABLE`, asked for by `(key, range end)` (the
/// end in an interval set), as the kernel holds them now: the answers in the order of
/// `keys`, `None` where the set holds no such element (or there is no such set). One
/// request per element, since the kernel stops at the first element of a request it
/// does not find; many requests to a round trip.
pub fn get_elements(
    reader: &mut Reader,
    table: &str,
    set: &str,
    keys: &[(Vec<u8>, Option<Vec<u8>>)],
) -> io::Result<Vec<Option<RawElement>>> {
    let requests: Vec<_> = keys
        .iter()
        .map(|(key, end)| get_element_attrs(table, set, key, end.as_deref()))
        .collect();
    let mut found = vec![None; keys.len()];
    reader.get_many(NFT_MSG_GETSETELEM, &requests, |i, object| {
        found[i] = object.and_then(|o| elements_of(std::slice::from_ref(&o)).into_iter().next());
    })?;
    Ok(found)
}

/// The attributes of a GETSETELEM request for one element.
fn get_element_attrs(table: &str, set: &str, key: &[u8], key_end: Option<&[u8]>) -> Vec<(u16, Vec<u8>)> {
    let data = |bytes: &[u8]| {
        let mut value = Vec::new();
        put_attr(&mut value, attr::DATA_VALUE, bytes);
        value
    };
    let mut element = Vec::new();
    put_attr(&mut element, attr::ELEM_KEY | NLA_F_NESTED, &data(key));
    if let Some(end) = key_end {
        put_attr(&mut element, attr::ELEM_KEY_END | NLA_F_NESTED, &data(end));
    }
    let mut list = Vec::new();
    put_attr(&mut list, NFTA_LIST_ELEM | NLA_F_NESTED, &element);
    vec![
        (attr::OBJ_TABLE, cstr(table)),
        (attr::SET_NAME, cstr(set)),
        (attr::ELEM_LIST_ELEMENTS | NLA_F_NESTED, list),
    ]
}

/// NFTA_LIST_ELEM: one item of a nested list.
const NFTA_LIST_ELEM: u16 = 1;
/// The flag of a nested attribute.
const NLA_F_NESTED: u16 = 0x8000;

/// The elements carried by NEWSETELEM messages (a dump's, or a get's answer).
fn elements_of(objects: &[Object]) -> Vec<RawElement> {
    let mut elements = Vec::new();
    for object in objects {
        let Some(list) = object.get(attr::ELEM_LIST_ELEMENTS) else {
            continue;
        };
        let mut items = list;
        while let Some((_, item, rest)) = next_attr(items) {
            elements.push(parse_element(item));
            items = rest;
        }
    }
    elements
}

/// One NFTA_LIST_ELEM's payload as a [`RawElement`], read without copying more than
/// the keys (a drift check reads 100,000 of them).
fn parse_element(payload: &[u8]) -> RawElement {
    let field = |kind| find_attr(payload, kind);
    let data = |kind| {
        field(kind)
            .and_then(|v| find_attr(v, attr::DATA_VALUE))
            .map(<[u8]>::to_vec)
    };
    RawElement {
        key: data(attr::ELEM_KEY).unwrap_or_default(),
        key_end: data(attr::ELEM_KEY_END),
        flags: field(attr::ELEM_FLAGS)
            .and_then(|v| v.try_into().ok())
            .map(u32::from_be_bytes)
            .unwrap_or(0),
        expires_ms: field(attr::ELEM_EXPIRATION)
            .and_then(|v| v.try_into().ok())
            .map(u64::from_be_bytes),
        packets: counter_packets(payload),
    }
}

/// The packets of an element's counter: its one expression (NFTA_SET_ELEM_EXPR), or
/// the first counter among several (NFTA_SET_ELEM_EXPRESSIONS).
fn counter_packets(element: &[u8]) -> Option<u64> {
    let counter = |expr: &[u8]| {
        if find_attr(expr, attr::EXPR_NAME)? != b"counter\0" {
            return None;
        }
        let packets = find_attr(find_attr(expr, attr::EXPR_DATA)?, attr::COUNTER_PACKETS)?;
        Some(u64::from_be_bytes(packets.try_into().ok()?))
    };
    if let Some(one) = find_attr(element, attr::ELEM_EXPR) {
        return counter(one);
    }
    let mut many = find_attr(element, attr::ELEM_EXPRESSIONS)?;
    while let Some((_, expr, rest)) = next_attr(many) {
        if let Some(packets) = counter(expr) {
            return Some(packets);
        }
        many = rest;
    }
    None
}

/// The payload of the first attribute of `kind` in `data`, without copying.
fn find_attr(mut data: &[u8], kind: u16) -> Option<&[u8]> {
    while let Some((k, value, rest)) = next_attr(data) {
        if k == kind {
            return Some(value);
        }
        data = rest;
    }
    None
}

/// The first attribute of `data` (type, payload) and what follows it; `None` at the
/// end or at a truncated attribute.
fn next_attr(data: &[u8]) -> Option<(u16, &[u8], &[u8])> {
    let len = usize::from(u16::from_ne_bytes([*data.first()?, *data.get(1)?]));
    let kind = u16::from_ne_bytes([*data.get(2)?, *data.get(3)?]) & NLA_TYPE_MASK;
    if len < 4 || len > data.len() {
        return None;
    }
    Some((kind, &data[4..len], &data[align4(len).min(data.len())..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attributes_round_trip_with_padding_and_flags_masked() {
        let mut buf = Vec::new();
        put_attr(&mut buf, 1, b"jitd\0");
        put_attr(&mut buf, 0x8000 | 3, &[1, 2]);
        assert_eq!(buf.len() % 4, 0);
        let attrs = parse_attrs(&buf);
        assert_eq!(
            attrs,
            vec![
                Attr {
                    kind: 1,
                    value: b"jitd\0".to_vec()
                },
                Attr {
                    kind: 3,
                    value: vec![1, 2]
                }
            ]
        );
        let object = Object { kind: 0, attrs };
        assert_eq!(object.string(1).as_deref(), Some("jitd"));
    }

    fn nla(kind: u16, value: &[u8]) -> Vec<u8> {
        let mut b = Vec::new();
        put_attr(&mut b, kind, value);
        b
    }

    #[test]
    fn an_elements_counter_is_read_from_its_expression() {
        let key = nla(attr::ELEM_KEY | NLA_F_NESTED, &nla(attr::DATA_VALUE, &[192, 0, 2, 7]));
        let mut data = nla(1, &300u64.to_be_bytes()); // NFTA_COUNTER_BYTES
        data.extend(nla(attr::COUNTER_PACKETS, &5u64.to_be_bytes()));
        let mut counter = nla(attr::EXPR_NAME, b"counter\0");
        counter.extend(nla(attr::EXPR_DATA | NLA_F_NESTED, &data));
        let mut one = key.clone();
        one.extend(nla(attr::ELEM_EXPR | NLA_F_NESTED, &counter));
        let e = parse_element(&one);
        assert_eq!((e.key, e.packets), (vec![192, 0, 2, 7], Some(5)));
        // several expressions: the counter among them
        let mut limit = nla(attr::EXPR_NAME, b"limit\0");
        limit.extend(nla(attr::EXPR_DATA | NLA_F_NESTED, &nla(1, &[0; 8])));
        let mut list = nla(NFTA_LIST_ELEM | NLA_F_NESTED, &limit);
        list.extend(nla(NFTA_LIST_ELEM | NLA_F_NESTED, &counter));
        let mut many = key.clone();
        many.extend(nla(attr::ELEM_EXPRESSIONS | NLA_F_NESTED, &list));
        assert_eq!(parse_element(&many).packets, Some(5));
        assert_eq!(parse_element(&key).packets, None, "no counter");
        // a counter whose packets are not 8 bytes is no counter
        let mut short = nla(attr::EXPR_NAME, b"counter\0");
        short.extend(nla(attr::EXPR_DATA, &nla(attr::COUNTER_PACKETS, &[5])));
        let mut bad = key;
        bad.extend(nla(attr::ELEM_EXPR, &short));
        assert_eq!(parse_element(&bad).packets, None);
    }

    #[test]
    fn a_truncated_attribute_ends_parsing() {
        assert!(parse_attrs(&[8, 0, 1, 0, 1]).is_empty());
        assert!(parse_attrs(&[]).is_empty());
    }
}
