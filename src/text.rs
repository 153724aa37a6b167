//! Names are bytes: a Linux path, argument, environment entry, socket
//! name or process name is any byte string, not text. Events carry them as
//! proto `string`s, so every such name goes through [`lossless`]: a
//! documented, reversible escaping under which two different byte strings
//! never become the same text.
//!
//! The rule (also in `events.proto` and the README, for agents):
//! - valid UTF-8 passes through unchanged, except that a backslash is
//!   written `\\` (two backslashes);
//! - every byte that is not part of valid UTF-8 is written `\xHH` (two
//!   lowercase hex digits).
//!
//! So a name that is valid UTF-8 without a backslash, the usual case, reads
//! as itself; [`bytes`] reverses the escaping.

use std::ffi::OsStr;
use std::fmt::Write;
use std::os::unix::ffi::OsStrExt;

/// `raw` as text, losslessly.
pub fn lossless(raw: &[u8]) -> String {
    let mut out = String::with_capacity(raw.len());
    for chunk in raw.utf8_chunks() {
        let valid = chunk.valid();
        if valid.contains('\\') {
            out.push_str(&valid.replace('\\', "\\\\"));
        } else {
            out.push_str(valid);
        }
        for byte in chunk.invalid() {
            let _ = write!(out, "\\x{byte:02x}");
        }
    }
    out
}

/// An OS string (a path from readlink, an argument) as text, losslessly.
pub fn lossless_os(raw: &OsStr) -> String {
    lossless(raw.as_bytes())
}

/// The bytes a [`lossless`] text stands for; None for text it cannot have
/// produced.
pub fn bytes(text: &str) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(text.len());
    let mut rest = text.as_bytes();
    while let Some((&first, tail)) = rest.split_first() {
        if first != b'\\' {
            out.push(first);
            rest = tail;
            continue;
        }
        match tail {
            [b'\\', tail @ ..] => {
                out.push(b'\\');
                rest = tail;
            }
            [b'x', hi, lo, tail @ ..] => {
                let hex = |d: u8| (d as char).to_digit(16).filter(|_| !d.is_ascii_uppercase());
                out.push((hex(*hi)? * 16 + hex(*lo)?) as u8);
                rest = tail;
            }
            _ => return None,
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn valid_utf8_passes_through_but_backslashes() {
        assert_eq!(lossless(b"/etc/passwd"), "/etc/passwd");
        assert_eq!(lossless("caf\u{e9} \u{fffd}".as_bytes()), "caf\u{e9} \u{fffd}");
        assert_eq!(lossless(br"a\b"), r"a\\b");
        assert_eq!(lossless(br"\xff"), r"\\xff");
    }

    #[test]
    fn names_that_differ_only_in_invalid_bytes_stay_different() {
        let names: [&[u8]; 4] = [b"\xff", b"\xfe", "\u{fffd}".as_bytes(), br"\xff"];
        let texts: Vec<String> = names.iter().map(|n| lossless(n)).collect();
        assert_eq!(texts, [r"\xff", r"\xfe", "\u{fffd}", r"\\xff"]);
        // A truncated multi-byte sequence, then valid text.
        assert_eq!(lossless(b"\xe2\x82x\xc3\xa9"), "\\xe2\\x82x\u{e9}");
    }

    #[test]
    fn escaping_round_trips() {
        let samples: [&[u8]; 7] =
            [b"", b"plain", br"back\slash", b"\xff\xfe\x00\x80", b"\xf0\x9f\x98\x80 ok", b"\\\xff\\", b"\xed\xa0\x80"];
        for raw in samples {
            assert_eq!(bytes(&lossless(raw)).as_deref(), Some(raw), "{raw:?}");
        }
        for byte in 0..=255u8 {
            assert_eq!(bytes(&lossless(&[byte, b'a', byte])), Some(vec![byte, b'a', byte]));
        }
    }

    #[test]
    fn text_no_escaping_produces_is_refused() {
        assert_eq!(bytes(r"\q"), None);
        assert_eq!(bytes(r"\x4"), None);
        assert_eq!(bytes(r"\xFF"), None);
        assert_eq!(bytes("trailing\\"), None);
    }
}
