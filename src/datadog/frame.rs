//! Frames: a 4-byte little-endian body length, then the msgpack body.
//!
//! Writing: one buffer per frame (the agent reads the header with a single
//! read(2) and drops the connection when it gets 1 to 3 bytes), and never a
//! body over [`MAX_BODY`] (the agent drops the connection for that too): an
//! exec that would not fit loses environment entries from the end (the
//! priority variables come first), then arguments from the end, with
//! `EnvsTruncated` / `ArgsTruncated` set; a Hello loses entrypoint arguments
//! from the end (it has no flag for that). Anything else that does not fit
//! is refused.
//!
//! Reading: the agent's limits (no empty body, none over [`MAX_BODY`], a
//! connection that ends inside a frame is an error), except that a header
//! split across reads is put back together.

use std::fmt;

use tokio::io::{AsyncRead, AsyncReadExt};

use super::msg::{Message, Payload};
use super::wire::Writer;

/// The agent's largest body, inclusive.
pub const MAX_BODY: usize = 256 * 1024;

const HEADER: usize = 4;

/// A message that cannot fit in [`MAX_BODY`] even with its exec arguments
/// and environment (or entrypoint arguments) cut.
#[derive(Debug, PartialEq, Eq)]
pub struct TooLarge {
    pub body: usize,
}

impl fmt::Display for TooLarge {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "a {} byte message is over the agent's {MAX_BODY} byte limit", self.body)
    }
}

impl std::error::Error for TooLarge {}

/// The whole frame of `message`, header included, to be written at once.
pub fn frame(mut message: Message) -> Result<Vec<u8>, TooLarge> {
    let frame = encode(&message);
    let excess = (frame.len() - HEADER).saturating_sub(MAX_BODY);
    if excess == 0 {
        return Ok(frame);
    }
    // Each entry dropped saves at least its encoded size (array headers only
    // shrink), so one more encoding fits unless the rest alone is too large.
    let cut = match &mut message {
        Message::Syscall(syscall) => match &mut syscall.payload {
            Payload::Exec(exec) => {
                let left = cut_tail(&mut exec.envs, excess, &mut exec.envs_truncated);
                cut_tail(&mut exec.args, left, &mut exec.args_truncated);
                true
            }
            _ => false,
        },
        Message::Hello(hello) | Message::Probe(hello) => {
            cut_tail(&mut hello.entrypoint_args, excess, &mut false);
            true
        }
    };
    let frame = if cut { encode(&message) } else { frame };
    match frame.len() - HEADER {
        body if body <= MAX_BODY => Ok(frame),
        body => Err(TooLarge { body }),
    }
}

fn encode(message: &Message) -> Vec<u8> {
    let mut w = Writer::with_prefix(&[0; HEADER]);
    message.encode(&mut w);
    let mut frame = w.into_bytes();
    // Over u32::MAX the length would wrap; such a body is refused anyway.
    let body = u32::try_from(frame.len() - HEADER).unwrap_or(u32::MAX);
    frame[..HEADER].copy_from_slice(&body.to_le_bytes());
    frame
}

/// Drops entries from the end until `excess` bytes are saved or none is
/// left; returns what is still to save.
fn cut_tail(items: &mut Option<Vec<String>>, mut excess: usize, truncated: &mut bool) -> usize {
    let Some(items) = items else { return excess };
    while excess > 0 {
        let Some(item) = items.pop() else { break };
        excess = excess.saturating_sub(encoded_str_len(&item));
        *truncated = true;
    }
    excess
}

/// Size of a msgpack string: header and bytes.
fn encoded_str_len(text: &str) -> usize {
    let header = match text.len() {
        0..32 => 1,
        32..256 => 2,
        256..65536 => 3,
        _ => 5,
    };
    header + text.len()
}

/// Why a frame could not be read. Each one ends the connection, as at the
/// agent.
#[derive(Debug)]
pub enum FrameError {
    Io(std::io::Error),
    /// The connection ended after 1 to 3 header bytes.
    TruncatedHeader(usize),
    /// The connection ended inside the body.
    TruncatedBody {
        expected: usize,
        got: usize,
    },
    /// Length 0: the agent cannot decode an empty body.
    Empty,
    TooLarge(u32),
}

impl fmt::Display for FrameError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FrameError::Io(error) => write!(f, "{error}"),
            FrameError::TruncatedHeader(got) => write!(f, "connection ended after {got} of 4 length bytes"),
            FrameError::TruncatedBody { expected, got } => {
                write!(f, "connection ended after {got} of {expected} message bytes")
            }
            FrameError::Empty => write!(f, "empty message"),
            FrameError::TooLarge(len) => write!(f, "a {len} byte message is over the {MAX_BODY} byte limit"),
        }
    }
}

impl std::error::Error for FrameError {}

/// The next frame's body, or None when the connection ended between frames.
/// The body buffer grows with what arrives, not with what the header
/// claims.
pub async fn read_frame<R: AsyncRead + Unpin>(reader: &mut R) -> Result<Option<Vec<u8>>, FrameError> {
    let mut header = [0u8; HEADER];
    let mut got = 0;
    while got < HEADER {
        match reader.read(&mut header[got..]).await.map_err(FrameError::Io)? {
            0 if got == 0 => return Ok(None),
            0 => return Err(FrameError::TruncatedHeader(got)),
            n => got += n,
        }
    }
    let len = u32::from_le_bytes(header);
    let expected = len as usize;
    if expected == 0 {
        return Err(FrameError::Empty);
    }
    if expected > MAX_BODY {
        return Err(FrameError::TooLarge(len));
    }
    let mut body = Vec::new();
    reader.take(u64::from(len)).read_to_end(&mut body).await.map_err(FrameError::Io)?;
    if body.len() < expected {
        return Err(FrameError::TruncatedBody { expected, got: body.len() });
    }
    Ok(Some(body))
}
