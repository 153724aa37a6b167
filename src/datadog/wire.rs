//! msgpack as Datadog's Go encoder (vmihailenco/msgpack v5, default
//! options) writes it, and as the agent's decoder reads it.
//!
//! Writing: every Go type has one encoding, whatever its value: `uint32` is
//! always `ce` + 4 bytes, `int32` always `d2`, `int64` `d3`; only Go's `int`
//! ([`Int`]) takes the smallest form. Strings, byte slices, arrays and maps
//! take the smallest header. A nil pointer or slice is `c0`.
//!
//! Reading is as lenient as the agent: any integer form for any integer field
//! (narrowed without range check, as Go does), str or bin for a string, nil
//! for a zero value, unknown keys skipped. Nothing recurses on the input's
//! nesting: values are skipped with a counter, so a frame of nested arrays
//! cannot exhaust the stack.

use std::fmt;
use std::net::IpAddr;

use rmp::encode::{self, ByteBuf};
use rmp::Marker;

/// Go's `int`: encoded in its smallest msgpack form.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Int(pub i64);

/// The msgpack body being written. Writes to memory cannot fail: the
/// `Infallible` error type of `ByteBuf` makes every `let Ok(..)` below
/// irrefutable.
#[derive(Default)]
pub struct Writer(ByteBuf);

impl Writer {
    pub fn with_prefix(prefix: &[u8]) -> Self {
        Writer(ByteBuf::from_vec(prefix.to_vec()))
    }

    pub fn into_bytes(self) -> Vec<u8> {
        self.0.into_vec()
    }

    pub fn nil(&mut self) {
        let Ok(()) = encode::write_nil(&mut self.0);
    }

    pub fn map_len(&mut self, len: usize) {
        let Ok(_) = encode::write_map_len(&mut self.0, len as u32);
    }

    pub fn array_len(&mut self, len: usize) {
        let Ok(_) = encode::write_array_len(&mut self.0, len as u32);
    }

    pub fn str(&mut self, value: &str) {
        let Ok(()) = encode::write_str(&mut self.0, value);
    }

    pub fn bin(&mut self, value: &[u8]) {
        let Ok(()) = encode::write_bin(&mut self.0, value);
    }
}

/// Why a body could not be decoded. The agent drops the connection for each
/// of these (or, for the missing payloads, crashes).
#[derive(Debug, PartialEq, Eq)]
pub enum DecodeError {
    /// A value runs past the end of the body (an empty body included).
    Truncated,
    /// A value of the wrong msgpack type for its field (by its first byte).
    Unexpected { expected: &'static str, found: u8 },
    /// `Addr` holds text that is not an IP address.
    BadIp(String),
    /// Type 1 without a Hello map (the agent dereferences it).
    MissingHello,
    /// Type 2 without a Syscall map.
    MissingSyscall,
    /// A syscall type without its payload map.
    MissingPayload(i32),
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DecodeError::Truncated => write!(f, "message cut short"),
            DecodeError::Unexpected { expected, found } => write!(f, "expected {expected}, found byte {found:#04x}"),
            DecodeError::BadIp(text) => write!(f, "Addr {text:?} is not an IP address"),
            DecodeError::MissingHello => write!(f, "hello message without its Hello map"),
            DecodeError::MissingSyscall => write!(f, "syscall message without its Syscall map"),
            DecodeError::MissingPayload(kind) => write!(f, "syscall type {kind} without its payload"),
        }
    }
}

impl std::error::Error for DecodeError {}

/// A cursor over one msgpack body.
pub struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    pub fn new(bytes: &'a [u8]) -> Self {
        Reader { bytes, pos: 0 }
    }

    fn take(&mut self, len: usize) -> Result<&'a [u8], DecodeError> {
        let end = self.pos.checked_add(len).filter(|&end| end <= self.bytes.len()).ok_or(DecodeError::Truncated)?;
        let taken = &self.bytes[self.pos..end];
        self.pos = end;
        Ok(taken)
    }

    fn peek(&self) -> Result<u8, DecodeError> {
        self.bytes.get(self.pos).copied().ok_or(DecodeError::Truncated)
    }

    fn be(&mut self, len: usize) -> Result<u64, DecodeError> {
        Ok(self.take(len)?.iter().fold(0, |value, &b| value << 8 | u64::from(b)))
    }

    fn unexpected(&self, expected: &'static str) -> DecodeError {
        DecodeError::Unexpected { expected, found: self.bytes.get(self.pos).copied().unwrap_or(0) }
    }

    /// Consumes a nil if one is next.
    pub fn nil(&mut self) -> Result<bool, DecodeError> {
        let is_nil = self.peek()? == 0xc0;
        self.pos += usize::from(is_nil);
        Ok(is_nil)
    }

    /// Any integer form (nil is 0), as a 64-bit pattern: signed forms are
    /// sign-extended, so narrowing with `as` wraps exactly as Go's decoder.
    pub fn int(&mut self) -> Result<u64, DecodeError> {
        let value = match Marker::from_u8(self.peek()?) {
            Marker::FixPos(n) => u64::from(n),
            Marker::FixNeg(n) => n as u64,
            Marker::Null => 0,
            Marker::U8 | Marker::U16 | Marker::U32 | Marker::U64 => {
                let len = 1 << (self.peek()? - 0xcc);
                self.pos += 1;
                return self.be(len);
            }
            Marker::I8 | Marker::I16 | Marker::I32 | Marker::I64 => {
                let len = 1 << (self.peek()? - 0xd0);
                self.pos += 1;
                let bits = self.be(len)?;
                let unused = 64 - 8 * len as u32;
                return Ok(((bits << unused) as i64 >> unused) as u64);
            }
            _ => return Err(self.unexpected("an integer")),
        };
        self.pos += 1;
        Ok(value)
    }

    pub fn bool(&mut self) -> Result<bool, DecodeError> {
        let value = match Marker::from_u8(self.peek()?) {
            Marker::True => true,
            Marker::False | Marker::Null => false,
            _ => return Err(self.unexpected("a bool")),
        };
        self.pos += 1;
        Ok(value)
    }

    /// A str or bin, or nil (None).
    pub fn bytes(&mut self) -> Result<Option<&'a [u8]>, DecodeError> {
        let len = match Marker::from_u8(self.peek()?) {
            Marker::Null => {
                self.pos += 1;
                return Ok(None);
            }
            Marker::FixStr(n) => {
                self.pos += 1;
                usize::from(n)
            }
            Marker::Str8 | Marker::Bin8 => self.length(1)?,
            Marker::Str16 | Marker::Bin16 => self.length(2)?,
            Marker::Str32 | Marker::Bin32 => self.length(4)?,
            _ => return Err(self.unexpected("a string")),
        };
        self.take(len).map(Some)
    }

    /// Skips a marker byte and reads the big-endian length after it.
    fn length(&mut self, width: usize) -> Result<usize, DecodeError> {
        self.pos += 1;
        usize::try_from(self.be(width)?).map_err(|_| DecodeError::Truncated)
    }

    /// The entry count of a map, or None for nil.
    pub fn map_len(&mut self) -> Result<Option<usize>, DecodeError> {
        match Marker::from_u8(self.peek()?) {
            Marker::Null => {
                self.pos += 1;
                Ok(None)
            }
            Marker::FixMap(n) => {
                self.pos += 1;
                Ok(Some(usize::from(n)))
            }
            Marker::Map16 => self.length(2).map(Some),
            Marker::Map32 => self.length(4).map(Some),
            _ => Err(self.unexpected("a map")),
        }
    }

    /// The element count of an array, or None for nil.
    pub fn array_len(&mut self) -> Result<Option<usize>, DecodeError> {
        match Marker::from_u8(self.peek()?) {
            Marker::Null => {
                self.pos += 1;
                Ok(None)
            }
            Marker::FixArray(n) => {
                self.pos += 1;
                Ok(Some(usize::from(n)))
            }
            Marker::Array16 => self.length(2).map(Some),
            Marker::Array32 => self.length(4).map(Some),
            _ => Err(self.unexpected("an array")),
        }
    }

    /// A capacity to reserve for `count` elements: never more than the bytes
    /// left could hold (each element takes at least one), so a forged count
    /// costs nothing.
    pub fn capacity(&self, count: usize) -> usize {
        count.min(self.bytes.len() - self.pos)
    }

    /// A map key: its bytes (str or bin; nil names no field, as in Go).
    pub fn key(&mut self) -> Result<&'a [u8], DecodeError> {
        Ok(self.bytes()?.unwrap_or_default())
    }

    /// Skips the next value, as `skip`; whether it was `true`.
    pub fn skip_noting_true(&mut self) -> Result<bool, DecodeError> {
        let is_true = matches!(Marker::from_u8(self.peek()?), Marker::True);
        self.skip()?;
        Ok(is_true)
    }

    /// Skips one value of any type, without recursion.
    pub fn skip(&mut self) -> Result<(), DecodeError> {
        let mut pending: u64 = 1;
        while pending > 0 {
            pending -= 1;
            let marker = Marker::from_u8(self.peek()?);
            self.pos += 1;
            let data = match marker {
                Marker::FixPos(_) | Marker::FixNeg(_) | Marker::Null | Marker::True | Marker::False => 0,
                Marker::U8 | Marker::I8 => 1,
                Marker::U16 | Marker::I16 => 2,
                Marker::U32 | Marker::I32 | Marker::F32 => 4,
                Marker::U64 | Marker::I64 | Marker::F64 => 8,
                Marker::FixStr(n) => usize::from(n),
                Marker::Str8 | Marker::Bin8 => self.be(1)? as usize,
                Marker::Str16 | Marker::Bin16 => self.be(2)? as usize,
                Marker::Str32 | Marker::Bin32 => self.be(4)? as usize,
                // Extension values: a type byte, then the data.
                Marker::FixExt1 => 2,
                Marker::FixExt2 => 3,
                Marker::FixExt4 => 5,
                Marker::FixExt8 => 9,
                Marker::FixExt16 => 17,
                Marker::Ext8 => self.be(1)? as usize + 1,
                Marker::Ext16 => self.be(2)? as usize + 1,
                Marker::Ext32 => self.be(4)? as usize + 1,
                Marker::FixArray(n) => {
                    pending += u64::from(n);
                    0
                }
                Marker::Array16 => {
                    pending += self.be(2)?;
                    0
                }
                Marker::Array32 => {
                    pending += self.be(4)?;
                    0
                }
                Marker::FixMap(n) => {
                    pending += 2 * u64::from(n);
                    0
                }
                Marker::Map16 => {
                    pending += 2 * self.be(2)?;
                    0
                }
                Marker::Map32 => {
                    pending += 2 * self.be(4)?;
                    0
                }
                Marker::Reserved => {
                    self.pos -= 1;
                    return Err(self.unexpected("a msgpack value"));
                }
            };
            self.take(data)?;
        }
        Ok(())
    }
}

/// A Go value: how it is written, and read back.
pub trait Value: Sized {
    fn encode(&self, w: &mut Writer);
    fn decode(r: &mut Reader<'_>) -> Result<Self, DecodeError>;
}

macro_rules! fixed_width {
    ($($ty:ty => $write:ident),* $(,)?) => {$(
        impl Value for $ty {
            fn encode(&self, w: &mut Writer) {
                let Ok(()) = encode::$write(&mut w.0, *self);
            }
            fn decode(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
                // Go narrows without a range check: so does `as`.
                r.int().map(|bits| bits as $ty)
            }
        }
    )*};
}

fixed_width!(u8 => write_u8, u16 => write_u16, u32 => write_u32, u64 => write_u64, i32 => write_i32, i64 => write_i64);

impl Value for Int {
    fn encode(&self, w: &mut Writer) {
        let Ok(_) = encode::write_sint(&mut w.0, self.0);
    }
    fn decode(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        r.int().map(|bits| Int(bits as i64))
    }
}

impl Value for bool {
    fn encode(&self, w: &mut Writer) {
        let Ok(()) = encode::write_bool(&mut w.0, *self);
    }
    fn decode(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        r.bool()
    }
}

/// Go strings are bytes; ours are UTF-8, so invalid sequences read as U+FFFD.
impl Value for String {
    fn encode(&self, w: &mut Writer) {
        w.str(self);
    }
    fn decode(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        Ok(r.bytes()?.map(|b| String::from_utf8_lossy(b).into_owned()).unwrap_or_default())
    }
}

/// `[]string`; nil is `Option::None`.
impl Value for Vec<String> {
    fn encode(&self, w: &mut Writer) {
        w.array_len(self.len());
        for item in self {
            w.str(item);
        }
    }
    fn decode(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        let len = r.array_len()?.unwrap_or(0);
        let mut items = Vec::with_capacity(r.capacity(len));
        for _ in 0..len {
            items.push(String::decode(r)?);
        }
        Ok(items)
    }
}

/// `[]byte`: bin (Go also reads a str into it).
impl Value for Vec<u8> {
    fn encode(&self, w: &mut Writer) {
        w.bin(self);
    }
    fn decode(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        Ok(r.bytes()?.map(<[u8]>::to_vec).unwrap_or_default())
    }
}

/// `net.IP`, written as its text in a bin (`net.IP.MarshalText`), never as
/// raw address bytes: the agent drops the connection for anything it cannot
/// parse as text. `None` is the empty IP (`c4 00`) that the Go tracer sends
/// for AF_UNIX sockets.
impl Value for Option<IpAddr> {
    fn encode(&self, w: &mut Writer) {
        w.bin(self.map(go_ip_text).unwrap_or_default().as_bytes());
    }
    fn decode(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        match r.bytes()? {
            None | Some([]) => Ok(None),
            Some(text) => {
                let text = String::from_utf8_lossy(text);
                text.parse().map(Some).map_err(|_| DecodeError::BadIp(text.into_owned()))
            }
        }
    }
}

/// An address as Go's `net.IP.String` writes it: IPv4-mapped IPv6 addresses
/// in dotted form.
fn go_ip_text(ip: IpAddr) -> String {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or_else(|| v6.to_string(), |v4| v4.to_string()),
        IpAddr::V4(v4) => v4.to_string(),
    }
}

/// A Go pointer (or nil slice): nil is None.
impl<T: Value> Value for Option<T> {
    fn encode(&self, w: &mut Writer) {
        match self {
            Some(value) => value.encode(w),
            None => w.nil(),
        }
    }
    fn decode(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        if r.nil()? {
            return Ok(None);
        }
        T::decode(r).map(Some)
    }
}

/// A Go struct: a map of its fields by name, in declaration order, every one
/// present. Embedded structs put their fields inline.
pub trait Struct: Default {
    const FIELDS: usize;
    fn encode_fields(&self, w: &mut Writer);
    /// Reads the value of `key` into its field; false when no field has
    /// that name.
    fn decode_field(&mut self, key: &[u8], r: &mut Reader<'_>) -> Result<bool, DecodeError>;

    /// Reads a map into `self`, field by field (Go's decoder overwrites the
    /// fields present and keeps the others). Nil sets the zero value.
    fn decode_into(&mut self, r: &mut Reader<'_>) -> Result<(), DecodeError> {
        let Some(len) = r.map_len()? else {
            *self = Self::default();
            return Ok(());
        };
        for _ in 0..len {
            let key = r.key()?;
            if !self.decode_field(key, r)? {
                r.skip()?;
            }
        }
        Ok(())
    }
}

/// Defines a Go struct: its Rust fields, and the Go names in Go's order.
/// `..field: Type as "Name"` embeds a struct: its fields go inline, and the
/// agent also accepts them nested under the embedded type's name.
macro_rules! go_struct {
    (
        $(#[$meta:meta])*
        pub struct $name:ident {
            $(
                $(#[$field_meta:meta])*
                $(..$inline:ident: $inline_ty:ty as $inline_key:literal)?
                $($key:literal => $field:ident: $ty:ty)?,
            )*
        }
    ) => {
        $(#[$meta])*
        #[derive(Clone, Debug, Default, PartialEq)]
        pub struct $name {
            $(
                $(#[$field_meta])*
                $(pub $inline: $inline_ty)?
                $(pub $field: $ty)?,
            )*
        }

        impl $crate::datadog::wire::Struct for $name {
            const FIELDS: usize = 0 $(
                $(+ <$inline_ty as $crate::datadog::wire::Struct>::FIELDS)?
                $(+ { let _ = $key; 1 })?
            )*;

            fn encode_fields(&self, w: &mut $crate::datadog::wire::Writer) {
                $(
                    $($crate::datadog::wire::Struct::encode_fields(&self.$inline, w);)?
                    $(
                        w.str($key);
                        $crate::datadog::wire::Value::encode(&self.$field, w);
                    )?
                )*
            }

            fn decode_field(
                &mut self,
                key: &[u8],
                r: &mut $crate::datadog::wire::Reader<'_>,
            ) -> Result<bool, $crate::datadog::wire::DecodeError> {
                $(
                    $(
                        if $crate::datadog::wire::Struct::decode_field(&mut self.$inline, key, r)? {
                            return Ok(true);
                        }
                        if key == $inline_key.as_bytes() {
                            $crate::datadog::wire::Struct::decode_into(&mut self.$inline, r)?;
                            return Ok(true);
                        }
                    )?
                    $(
                        if key == $key.as_bytes() {
                            self.$field = $crate::datadog::wire::Value::decode(r)?;
                            return Ok(true);
                        }
                    )?
                )*
                Ok(false)
            }
        }

        impl $crate::datadog::wire::Value for $name {
            fn encode(&self, w: &mut $crate::datadog::wire::Writer) {
                w.map_len(<Self as $crate::datadog::wire::Struct>::FIELDS);
                $crate::datadog::wire::Struct::encode_fields(self, w);
            }

            fn decode(r: &mut $crate::datadog::wire::Reader<'_>) -> Result<Self, $crate::datadog::wire::DecodeError> {
                let mut value = Self::default();
                $crate::datadog::wire::Struct::decode_into(&mut value, r)?;
                Ok(value)
            }
        }
    };
}

pub(crate) use go_struct;

#[cfg(test)]
mod tests {
    use super::*;

    fn encoded<T: Value>(value: T) -> Vec<u8> {
        let mut w = Writer::default();
        value.encode(&mut w);
        w.into_bytes()
    }

    #[test]
    fn go_types_keep_their_width_and_go_int_takes_the_smallest_form() {
        assert_eq!(encoded(2u32), [0xce, 0, 0, 0, 2]);
        assert_eq!(encoded(2i32), [0xd2, 0, 0, 0, 2]);
        assert_eq!(encoded(-115i64), [0xd3, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x8d]);
        assert_eq!(encoded(7u8), [0xcc, 7]);
        assert_eq!(encoded(443u16), [0xcd, 0x01, 0xbb]);
        assert_eq!(encoded(Int(15)), [0x0f]);
        assert_eq!(encoded(Int(-1)), [0xff]);
        assert_eq!(encoded(Int(200)), [0xcc, 200]);
        assert_eq!(encoded(Int(-200)), [0xd1, 0xff, 0x38]);
        assert_eq!(encoded(Int(524289)), [0xce, 0x00, 0x08, 0x00, 0x01]);
    }

    #[test]
    fn ips_are_text_in_a_bin_and_empty_for_none() {
        assert_eq!(encoded(Some(IpAddr::from([10, 0, 2, 15]))), b"\xc4\x0910.0.2.15");
        assert_eq!(encoded(None::<IpAddr>), [0xc4, 0]);
        let mapped: IpAddr = "::ffff:10.0.2.15".parse().unwrap();
        assert_eq!(encoded(Some(mapped)), b"\xc4\x0910.0.2.15");
        let mut r = Reader::new(b"\xa4nope");
        assert_eq!(Option::<IpAddr>::decode(&mut r), Err(DecodeError::BadIp("nope".into())));
        // The raw 4 address bytes are not text: refused, as by the agent.
        let mut r = Reader::new(b"\xc4\x04\x0a\x00\x02\x0f");
        assert!(matches!(Option::<IpAddr>::decode(&mut r), Err(DecodeError::BadIp(_))));
    }

    #[test]
    fn integers_read_from_any_form_and_narrow_like_go() {
        let read = |bytes: &[u8]| Reader::new(bytes).int();
        assert_eq!(read(&[0x05]), Ok(5));
        assert_eq!(read(&[0xc0]), Ok(0));
        assert_eq!(read(&[0xff]).map(|b| b as i32), Ok(-1));
        assert_eq!(read(&[0xd0, 0x80]).map(|b| b as i64), Ok(-128));
        assert_eq!(read(&[0xd1, 0xff, 0x38]).map(|b| b as i64), Ok(-200));
        assert_eq!(read(&[0xcd, 0x01, 0xbb]), Ok(443));
        // An unsigned 0xffffffff read into an int32 is -1, as in Go.
        assert_eq!(i32::decode(&mut Reader::new(&[0xce, 0xff, 0xff, 0xff, 0xff])), Ok(-1));
        assert_eq!(read(&[0xca, 0, 0, 0, 0]), Err(DecodeError::Unexpected { expected: "an integer", found: 0xca }));
        assert_eq!(read(&[0xcf, 0]), Err(DecodeError::Truncated));
    }

    #[test]
    fn skipping_deep_nesting_does_not_recurse() {
        let mut deep = vec![0x91; 200_000];
        deep.push(0xc0);
        assert_eq!(Reader::new(&deep).skip(), Ok(()));
        deep.pop();
        assert_eq!(Reader::new(&deep).skip(), Err(DecodeError::Truncated));
        // A map32 claiming 2^32 entries ends at the end of the bytes.
        assert_eq!(Reader::new(&[0xdf, 0xff, 0xff, 0xff, 0xff, 0xc0]).skip(), Err(DecodeError::Truncated));
        assert!(matches!(Reader::new(&[0xc1]).skip(), Err(DecodeError::Unexpected { found: 0xc1, .. })));
    }
}
