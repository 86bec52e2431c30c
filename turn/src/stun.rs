//! STUN (RFC 8489) message codec and TURN (RFC 8656) ChannelData framing.
//!
//! Written by hand rather than taken from `stun-proto`/`turn-server-proto` or `rtc-stun`:
//! the relay's fast path must parse a message in place without allocating (the parser below
//! borrows the packet and walks attributes lazily), replies are encoded into one reused
//! buffer, and ChannelData from peers is framed in the receive buffer's headroom so a relayed
//! packet is never copied. `turn-server-proto` 0.7 also keeps a fixed user table
//! (`add_user`) where TURN REST credentials are derived from the username on the fly, and has
//! no denied-peer policy or quotas; `rtc-turn` 0.21 is client-only.
//!
//! Every function here takes untrusted input and must never panic: lengths are checked before
//! every slice, and the fuzz targets in `fuzz/` call `fuzz_parse_stun` and
//! `fuzz_channel_data`.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use hmac::{Hmac, Mac};
use sha1::Sha1;

/// The fixed magic cookie of RFC 5389/8489 messages.
pub const MAGIC_COOKIE: u32 = 0x2112_A442;
/// Size of a STUN header.
pub const HEADER_LEN: usize = 20;

/// STUN methods used by TURN.
pub mod method {
    /// Binding (RFC 8489).
    pub const BINDING: u16 = 0x001;
    /// Allocate (RFC 8656).
    pub const ALLOCATE: u16 = 0x003;
    /// Refresh.
    pub const REFRESH: u16 = 0x004;
    /// Send indication.
    pub const SEND: u16 = 0x006;
    /// Data indication.
    pub const DATA: u16 = 0x007;
    /// CreatePermission.
    pub const CREATE_PERMISSION: u16 = 0x008;
    /// ChannelBind.
    pub const CHANNEL_BIND: u16 = 0x009;
}

/// STUN attribute types used here.
pub mod attr {
    #![allow(missing_docs)]
    pub const MAPPED_ADDRESS: u16 = 0x0001;
    pub const USERNAME: u16 = 0x0006;
    pub const MESSAGE_INTEGRITY: u16 = 0x0008;
    pub const ERROR_CODE: u16 = 0x0009;
    pub const UNKNOWN_ATTRIBUTES: u16 = 0x000A;
    pub const CHANNEL_NUMBER: u16 = 0x000C;
    pub const LIFETIME: u16 = 0x000D;
    pub const XOR_PEER_ADDRESS: u16 = 0x0012;
    pub const DATA: u16 = 0x0013;
    pub const REALM: u16 = 0x0014;
    pub const NONCE: u16 = 0x0015;
    pub const XOR_RELAYED_ADDRESS: u16 = 0x0016;
    pub const REQUESTED_ADDRESS_FAMILY: u16 = 0x0017;
    pub const EVEN_PORT: u16 = 0x0018;
    pub const REQUESTED_TRANSPORT: u16 = 0x0019;
    pub const DONT_FRAGMENT: u16 = 0x001A;
    pub const MESSAGE_INTEGRITY_SHA256: u16 = 0x001C;
    pub const USERHASH: u16 = 0x001E;
    pub const XOR_MAPPED_ADDRESS: u16 = 0x0020;
    pub const RESERVATION_TOKEN: u16 = 0x0022;
    pub const PRIORITY: u16 = 0x0024;
    pub const USE_CANDIDATE: u16 = 0x0025;
    pub const SOFTWARE: u16 = 0x8022;
    pub const FINGERPRINT: u16 = 0x8028;
}

/// Message class (the two class bits of the message type).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    /// Request.
    Request,
    /// Indication.
    Indication,
    /// Success response.
    Success,
    /// Error response.
    Error,
}

impl Class {
    fn bits(self) -> u16 {
        match self {
            Class::Request => 0x000,
            Class::Indication => 0x010,
            Class::Success => 0x100,
            Class::Error => 0x110,
        }
    }
}

/// Encodes a method and class into the 14-bit STUN message type.
pub fn message_type(method: u16, class: Class) -> u16 {
    let m = method & 0x0FFF;
    ((m & 0x000F) | ((m & 0x0070) << 1) | ((m & 0x0F80) << 2)) | class.bits()
}

/// Splits a STUN message type into method and class.
pub fn split_type(t: u16) -> (u16, Class) {
    let method = (t & 0x000F) | ((t & 0x00E0) >> 1) | ((t & 0x3E00) >> 2);
    let class = match t & 0x0110 {
        0x000 => Class::Request,
        0x010 => Class::Indication,
        0x100 => Class::Success,
        _ => Class::Error,
    };
    (method, class)
}

/// Why a datagram was not a valid STUN message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    /// Shorter than its header or its stated length.
    #[error("truncated message")]
    Truncated,
    /// Not a STUN message (top bits, cookie or alignment wrong).
    #[error("not a STUN message")]
    NotStun,
    /// An attribute runs past the end of the message.
    #[error("malformed attribute")]
    BadAttribute,
    /// FINGERPRINT present but wrong.
    #[error("bad fingerprint")]
    BadFingerprint,
}

/// A parsed STUN message borrowing the packet it came from.
#[derive(Debug, Clone, Copy)]
pub struct Message<'a> {
    /// The whole message (header plus attributes, exactly `20 + length` bytes).
    pub raw: &'a [u8],
    /// Method (e.g. [`method::ALLOCATE`]).
    pub method: u16,
    /// Class.
    pub class: Class,
    /// Transaction id.
    pub tid: [u8; 12],
    /// Offset of MESSAGE-INTEGRITY's header if present (attributes after it are ignored,
    /// except FINGERPRINT, as RFC 8489 section 14.5 asks).
    pub integrity_offset: Option<usize>,
    /// Whether the message carried a (valid) FINGERPRINT.
    pub has_fingerprint: bool,
}

/// One attribute: type and value (without padding).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Attr<'a> {
    /// Attribute type.
    pub typ: u16,
    /// Value bytes.
    pub value: &'a [u8],
}

/// Iterator over attributes of a message, stopping after MESSAGE-INTEGRITY.
#[derive(Debug, Clone)]
pub struct Attrs<'a> {
    buf: &'a [u8],
    pos: usize,
    end: usize,
}

impl<'a> Iterator for Attrs<'a> {
    type Item = Attr<'a>;
    fn next(&mut self) -> Option<Attr<'a>> {
        if self.pos + 4 > self.end {
            return None;
        }
        let typ = u16::from_be_bytes([self.buf[self.pos], self.buf[self.pos + 1]]);
        let len = u16::from_be_bytes([self.buf[self.pos + 2], self.buf[self.pos + 3]]) as usize;
        let start = self.pos + 4;
        let value = self.buf.get(start..start + len)?;
        self.pos = start + pad4(len);
        Some(Attr { typ, value })
    }
}

/// Rounds up to a multiple of four.
#[inline]
pub fn pad4(n: usize) -> usize {
    (n + 3) & !3
}

/// Quick check for the first bytes of a STUN message (used to tell STUN from ChannelData).
#[inline]
pub fn looks_like_stun(buf: &[u8]) -> bool {
    buf.len() >= HEADER_LEN && buf[0] & 0xC0 == 0 && buf[4..8] == MAGIC_COOKIE.to_be_bytes()
}

fn fingerprint(data: &[u8]) -> u32 {
    crc32fast::hash(data) ^ 0x5354_554e
}

impl<'a> Message<'a> {
    /// Parses and validates a message: header, cookie, attribute layout and FINGERPRINT.
    /// Trailing bytes after `20 + length` are ignored (stream framing is done elsewhere).
    pub fn parse(buf: &'a [u8]) -> Result<Message<'a>, ParseError> {
        if buf.len() < HEADER_LEN {
            return Err(ParseError::Truncated);
        }
        if buf[0] & 0xC0 != 0 || buf[4..8] != MAGIC_COOKIE.to_be_bytes() {
            return Err(ParseError::NotStun);
        }
        let len = u16::from_be_bytes([buf[2], buf[3]]) as usize;
        if !len.is_multiple_of(4) {
            return Err(ParseError::NotStun);
        }
        let raw = buf.get(..HEADER_LEN + len).ok_or(ParseError::Truncated)?;
        let (method, class) = split_type(u16::from_be_bytes([buf[0], buf[1]]));
        let mut tid = [0u8; 12];
        tid.copy_from_slice(&raw[8..20]);
        let mut pos = HEADER_LEN;
        let mut integrity_offset = None;
        let mut has_fingerprint = false;
        while pos < raw.len() {
            if pos + 4 > raw.len() {
                return Err(ParseError::BadAttribute);
            }
            let typ = u16::from_be_bytes([raw[pos], raw[pos + 1]]);
            let alen = u16::from_be_bytes([raw[pos + 2], raw[pos + 3]]) as usize;
            let next = pos + 4 + pad4(alen);
            if next > raw.len() {
                return Err(ParseError::BadAttribute);
            }
            if typ == attr::FINGERPRINT {
                if alen != 4 || next != raw.len() {
                    return Err(ParseError::BadAttribute);
                }
                // CRC over the message up to the fingerprint, with the header length as sent
                // (which already includes the fingerprint attribute).
                let want =
                    u32::from_be_bytes([raw[pos + 4], raw[pos + 5], raw[pos + 6], raw[pos + 7]]);
                if fingerprint(&raw[..pos]) != want {
                    return Err(ParseError::BadFingerprint);
                }
                has_fingerprint = true;
            } else if typ == attr::MESSAGE_INTEGRITY && integrity_offset.is_none() {
                if alen != 20 {
                    return Err(ParseError::BadAttribute);
                }
                integrity_offset = Some(pos);
            }
            pos = next;
        }
        Ok(Message {
            raw,
            method,
            class,
            tid,
            integrity_offset,
            has_fingerprint,
        })
    }

    /// Attributes in order, up to and including MESSAGE-INTEGRITY.
    pub fn attrs(&self) -> Attrs<'a> {
        let end = match self.integrity_offset {
            Some(o) => o + 24,
            None => self.raw.len(),
        };
        Attrs {
            buf: self.raw,
            pos: HEADER_LEN,
            end,
        }
    }

    /// First attribute of a type (before MESSAGE-INTEGRITY, or MESSAGE-INTEGRITY itself).
    pub fn get(&self, typ: u16) -> Option<&'a [u8]> {
        self.attrs().find(|a| a.typ == typ).map(|a| a.value)
    }

    /// A XOR-encoded address attribute (XOR-PEER-ADDRESS etc.).
    pub fn get_xor_addr(&self, typ: u16) -> Option<Result<SocketAddr, ParseError>> {
        self.get(typ).map(|v| decode_xor_addr(v, &self.tid))
    }

    /// All values of an attribute type.
    pub fn get_all(&self, typ: u16) -> impl Iterator<Item = &'a [u8]> + 'a {
        self.attrs().filter(move |a| a.typ == typ).map(|a| a.value)
    }

    /// Checks MESSAGE-INTEGRITY (HMAC-SHA1) with `key`. False if absent or wrong.
    pub fn check_integrity(&self, key: &[u8]) -> bool {
        let Some(off) = self.integrity_offset else {
            return false;
        };
        let mut mac = <Hmac<Sha1> as Mac>::new_from_slice(key).expect("hmac takes any key length");
        // The length field must cover the message up to and including MESSAGE-INTEGRITY.
        let adj = (off + 24 - HEADER_LEN) as u16;
        mac.update(&self.raw[0..2]);
        mac.update(&adj.to_be_bytes());
        mac.update(&self.raw[4..off]);
        mac.verify_slice(&self.raw[off + 4..off + 24]).is_ok()
    }

    /// Comprehension-required attribute types this implementation does not understand.
    pub fn unknown_required(&self, known: &'static [u16]) -> impl Iterator<Item = u16> + 'a {
        self.attrs()
            .map(|a| a.typ)
            .filter(move |t| *t < 0x8000 && !known.contains(t))
    }
}

/// Decodes an XOR-MAPPED-ADDRESS style value.
pub fn decode_xor_addr(v: &[u8], tid: &[u8; 12]) -> Result<SocketAddr, ParseError> {
    if v.len() < 4 {
        return Err(ParseError::BadAttribute);
    }
    let port = u16::from_be_bytes([v[2], v[3]]) ^ (MAGIC_COOKIE >> 16) as u16;
    match v[1] {
        1 if v.len() == 8 => {
            let a = u32::from_be_bytes([v[4], v[5], v[6], v[7]]) ^ MAGIC_COOKIE;
            Ok(SocketAddr::new(IpAddr::V4(Ipv4Addr::from(a)), port))
        }
        2 if v.len() == 20 => {
            let mut x = [0u8; 16];
            x[..4].copy_from_slice(&MAGIC_COOKIE.to_be_bytes());
            x[4..].copy_from_slice(tid);
            let mut a = [0u8; 16];
            for i in 0..16 {
                a[i] = v[4 + i] ^ x[i];
            }
            Ok(SocketAddr::new(IpAddr::V6(Ipv6Addr::from(a)), port))
        }
        _ => Err(ParseError::BadAttribute),
    }
}

/// Writes a STUN message into a reused buffer. Call [`Builder::finish`] (optionally with a key
/// for MESSAGE-INTEGRITY) to fix the length and add FINGERPRINT.
#[derive(Debug)]
pub struct Builder<'b> {
    buf: &'b mut Vec<u8>,
    start: usize,
    tid: [u8; 12],
}

impl<'b> Builder<'b> {
    /// Starts a message at the end of `buf` (which is not cleared).
    pub fn new(buf: &'b mut Vec<u8>, method: u16, class: Class, tid: &[u8; 12]) -> Self {
        let start = buf.len();
        buf.extend_from_slice(&message_type(method, class).to_be_bytes());
        buf.extend_from_slice(&[0, 0]);
        buf.extend_from_slice(&MAGIC_COOKIE.to_be_bytes());
        buf.extend_from_slice(tid);
        Builder {
            buf,
            start,
            tid: *tid,
        }
    }

    /// Adds a raw attribute (padded with zeros).
    pub fn attr(&mut self, typ: u16, value: &[u8]) -> &mut Self {
        let len = value.len().min(0xFFFF);
        self.buf.extend_from_slice(&typ.to_be_bytes());
        self.buf.extend_from_slice(&(len as u16).to_be_bytes());
        self.buf.extend_from_slice(&value[..len]);
        let pad = pad4(len) - len;
        self.buf.extend_from_slice(&[0u8; 3][..pad]);
        self
    }

    /// Adds a 32-bit attribute (LIFETIME etc.).
    pub fn attr_u32(&mut self, typ: u16, v: u32) -> &mut Self {
        self.attr(typ, &v.to_be_bytes())
    }

    /// Adds an XOR-encoded address.
    pub fn xor_addr(&mut self, typ: u16, addr: SocketAddr) -> &mut Self {
        let port = addr.port() ^ (MAGIC_COOKIE >> 16) as u16;
        match addr.ip() {
            IpAddr::V4(ip) => {
                let mut v = [0u8; 8];
                v[1] = 1;
                v[2..4].copy_from_slice(&port.to_be_bytes());
                v[4..8].copy_from_slice(&(u32::from(ip) ^ MAGIC_COOKIE).to_be_bytes());
                self.attr(typ, &v)
            }
            IpAddr::V6(ip) => {
                let mut v = [0u8; 20];
                v[1] = 2;
                v[2..4].copy_from_slice(&port.to_be_bytes());
                let mut x = [0u8; 16];
                x[..4].copy_from_slice(&MAGIC_COOKIE.to_be_bytes());
                x[4..].copy_from_slice(&self.tid);
                let o = ip.octets();
                for i in 0..16 {
                    v[4 + i] = o[i] ^ x[i];
                }
                self.attr(typ, &v)
            }
        }
    }

    /// Adds ERROR-CODE with its standard reason phrase.
    pub fn error_code(&mut self, code: u16) -> &mut Self {
        let reason = reason_phrase(code).as_bytes();
        let mut v = Vec::with_capacity(4 + reason.len());
        v.extend_from_slice(&[0, 0, (code / 100) as u8, (code % 100) as u8]);
        v.extend_from_slice(reason);
        self.attr(attr::ERROR_CODE, &v)
    }

    fn set_len(&mut self) {
        let len = (self.buf.len() - self.start - HEADER_LEN) as u16;
        self.buf[self.start + 2..self.start + 4].copy_from_slice(&len.to_be_bytes());
    }

    /// Adds MESSAGE-INTEGRITY (if `key`) and FINGERPRINT (if `fingerprint`), fixes the length.
    pub fn finish(mut self, key: Option<&[u8]>, fingerprint_attr: bool) {
        if let Some(key) = key {
            // While hashing, the length must already count the 24-byte MESSAGE-INTEGRITY.
            let len = (self.buf.len() - self.start - HEADER_LEN + 24) as u16;
            self.buf[self.start + 2..self.start + 4].copy_from_slice(&len.to_be_bytes());
            let mut mac =
                <Hmac<Sha1> as Mac>::new_from_slice(key).expect("hmac takes any key length");
            mac.update(&self.buf[self.start..]);
            let tag = mac.finalize().into_bytes();
            self.attr(attr::MESSAGE_INTEGRITY, &tag);
        }
        if fingerprint_attr {
            self.buf.extend_from_slice(&attr::FINGERPRINT.to_be_bytes());
            self.buf.extend_from_slice(&4u16.to_be_bytes());
            self.buf.extend_from_slice(&[0; 4]);
            self.set_len();
            let end = self.buf.len() - 8;
            let fp = fingerprint(&self.buf[self.start..end]);
            let n = self.buf.len();
            self.buf[n - 4..].copy_from_slice(&fp.to_be_bytes());
        } else {
            self.set_len();
        }
    }
}

/// Standard reason phrases (RFC 8489, RFC 8656).
pub fn reason_phrase(code: u16) -> &'static str {
    match code {
        300 => "Try Alternate",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        420 => "Unknown Attribute",
        437 => "Allocation Mismatch",
        438 => "Stale Nonce",
        440 => "Address Family not Supported",
        441 => "Wrong Credentials",
        442 => "Unsupported Transport Protocol",
        443 => "Peer Address Family Mismatch",
        486 => "Allocation Quota Reached",
        500 => "Server Error",
        508 => "Insufficient Capacity",
        _ => "Error",
    }
}

/// Reads the ERROR-CODE value of a message (for clients and tests).
pub fn parse_error_code(v: &[u8]) -> Option<u16> {
    if v.len() < 4 {
        return None;
    }
    Some((v[2] & 7) as u16 * 100 + v[3] as u16)
}

/// Lowest channel number.
pub const CHANNEL_MIN: u16 = 0x4000;
/// Highest channel number accepted: RFC 8656 narrowed the range to 0x4FFF, but RFC 5766
/// clients (coturn's own `turnutils_uclient` among them) still use up to 0x7FFF, so we do too.
pub const CHANNEL_MAX: u16 = 0x7FFF;

/// ChannelData: a channel number (0x4000..=0x7FFF) and its payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChannelData<'a> {
    /// Channel number.
    pub channel: u16,
    /// Application data.
    pub data: &'a [u8],
}

impl<'a> ChannelData<'a> {
    /// Parses a ChannelData message (trailing padding, as sent over TCP, is allowed).
    #[inline]
    pub fn parse(buf: &'a [u8]) -> Option<ChannelData<'a>> {
        if buf.len() < 4 {
            return None;
        }
        let channel = u16::from_be_bytes([buf[0], buf[1]]);
        if !(CHANNEL_MIN..=CHANNEL_MAX).contains(&channel) {
            return None;
        }
        let len = u16::from_be_bytes([buf[2], buf[3]]) as usize;
        let data = buf.get(4..4 + len)?;
        Some(ChannelData { channel, data })
    }

    /// Encodes into `out` (cleared first), padding to four bytes when `pad`.
    pub fn encode(&self, out: &mut Vec<u8>, pad: bool) {
        out.clear();
        out.extend_from_slice(&self.channel.to_be_bytes());
        out.extend_from_slice(&(self.data.len() as u16).to_be_bytes());
        out.extend_from_slice(self.data);
        if pad {
            out.resize(4 + pad4(self.data.len()), 0);
        }
    }
}

/// Length of the next frame in a TCP/TLS byte stream (RFC 8656 section 12.5): a STUN message
/// or a ChannelData message padded to four bytes. `Ok(None)` means more bytes are needed,
/// `Err(_)` that the stream is not STUN/TURN and should be closed.
pub fn stream_frame_len(buf: &[u8]) -> Result<Option<usize>, ParseError> {
    if buf.len() < 4 {
        return Ok(None);
    }
    let len = u16::from_be_bytes([buf[2], buf[3]]) as usize;
    match buf[0] >> 6 {
        0 => Ok(Some(HEADER_LEN + len)),
        1 => {
            let ch = u16::from_be_bytes([buf[0], buf[1]]);
            if !(CHANNEL_MIN..=CHANNEL_MAX).contains(&ch) {
                return Err(ParseError::NotStun);
            }
            Ok(Some(4 + pad4(len)))
        }
        _ => Err(ParseError::NotStun),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_type_round_trip() {
        for m in [1u16, 3, 4, 6, 7, 8, 9, 0xFFF] {
            for c in [
                Class::Request,
                Class::Indication,
                Class::Success,
                Class::Error,
            ] {
                assert_eq!(split_type(message_type(m, c)), (m, c));
            }
        }
        assert_eq!(message_type(method::BINDING, Class::Request), 0x0001);
        assert_eq!(message_type(method::BINDING, Class::Success), 0x0101);
        assert_eq!(message_type(method::ALLOCATE, Class::Error), 0x0113);
        assert_eq!(message_type(method::DATA, Class::Indication), 0x0017);
    }

    #[test]
    fn build_parse_round_trip_with_integrity_and_fingerprint() {
        let tid = [7u8; 12];
        let mut buf = Vec::new();
        let mut b = Builder::new(&mut buf, method::ALLOCATE, Class::Success, &tid);
        let v4: SocketAddr = "192.0.2.1:32853".parse().unwrap();
        let v6: SocketAddr = "[2001:db8::1]:40000".parse().unwrap();
        b.xor_addr(attr::XOR_RELAYED_ADDRESS, v4)
            .xor_addr(attr::XOR_PEER_ADDRESS, v6)
            .attr_u32(attr::LIFETIME, 600)
            .attr(attr::USERNAME, b"abc");
        b.finish(Some(b"key"), true);
        let m = Message::parse(&buf).unwrap();
        assert_eq!(m.method, method::ALLOCATE);
        assert_eq!(m.class, Class::Success);
        assert_eq!(m.tid, tid);
        assert!(m.has_fingerprint);
        assert!(m.check_integrity(b"key"));
        assert!(!m.check_integrity(b"other"));
        assert_eq!(m.get_xor_addr(attr::XOR_RELAYED_ADDRESS), Some(Ok(v4)));
        assert_eq!(m.get_xor_addr(attr::XOR_PEER_ADDRESS), Some(Ok(v6)));
        assert_eq!(m.get(attr::LIFETIME), Some(&600u32.to_be_bytes()[..]));
        assert_eq!(m.get(attr::USERNAME), Some(&b"abc"[..]));
        // A flipped bit breaks the fingerprint.
        let mut bad = buf.clone();
        bad[30] ^= 1;
        assert!(matches!(
            Message::parse(&bad),
            Err(ParseError::BadFingerprint)
        ));
    }

    #[test]
    fn rfc5769_sample_request_integrity() {
        // RFC 5769 section 2.1 sample request (short-term credentials, password "VOkJxbRl1RmTxUk/WvJxBt").
        let hex = "000100582112a442b7e7a701bc34d686fa87dfae802200105354554e207465737420636c69656e74002400046e0001ff80290008932ff9b151263b36000600096576746a3a68367659202020000800149aeaa70cbfd8cb56781ef2b5b2d3f249c1b571a280280004e57a3bcf";
        let bytes: Vec<u8> = (0..hex.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
            .collect();
        let m = Message::parse(&bytes).unwrap();
        assert!(m.has_fingerprint);
        assert_eq!(m.get(attr::USERNAME), Some(&b"evtj:h6vY"[..]));
        assert!(m.check_integrity(b"VOkJxbRl1RmTxUk/WvJxBt"));
    }

    #[test]
    fn channel_data_round_trip_and_framing() {
        let mut out = Vec::new();
        ChannelData {
            channel: 0x4001,
            data: b"hello",
        }
        .encode(&mut out, true);
        assert_eq!(out.len(), 12);
        assert_eq!(
            ChannelData::parse(&out),
            Some(ChannelData {
                channel: 0x4001,
                data: b"hello"
            })
        );
        assert_eq!(stream_frame_len(&out), Ok(Some(12)));
        assert_eq!(ChannelData::parse(&[0x3f, 0xff, 0, 0]), None);
        assert_eq!(ChannelData::parse(&[0x40, 0x00, 0, 9, 1]), None);
        assert_eq!(stream_frame_len(&[0x80, 0, 0, 0]), Err(ParseError::NotStun));
        assert_eq!(stream_frame_len(&[0, 1, 0]), Ok(None));
    }

    #[test]
    fn rejects_garbage_without_panicking() {
        assert!(Message::parse(&[]).is_err());
        let mut m = vec![0u8, 1, 0, 8, 0x21, 0x12, 0xa4, 0x42];
        m.extend_from_slice(&[0; 12]);
        m.extend_from_slice(&[0, 6, 0, 200, 1, 2, 3, 4]);
        assert_eq!(Message::parse(&m).unwrap_err(), ParseError::BadAttribute);
    }
}
