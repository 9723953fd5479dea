//! Framing: `u32 length · u16 type · body`, big-endian, the length counting type and body.
//! A frame longer than the receiver's limit is an error (the connection is dropped); a frame
//! of an unknown type is skipped whole.

use crate::codec::InvalidMessage;
use crate::messages::Message;

/// Frames larger than this are refused by default. Snapshots are split into parts well
/// below it.
pub const DEFAULT_MAX_FRAME: usize = 16 << 20;

/// The largest first frame a control plane reads from a peer it has not authenticated yet:
/// a Hello is a few hundred bytes.
pub const MAX_HELLO_FRAME: usize = 4096;

/// The type of the frame at the start of `buf`, once its header has arrived (without
/// decoding its body).
pub fn peek_type(buf: &[u8]) -> Option<u16> {
    let h = buf.get(..6)?;
    Some(u16::from_be_bytes([h[4], h[5]]))
}

/// Appends `msg` as one frame.
pub fn encode_frame(msg: &Message, out: &mut Vec<u8>) {
    let start = out.len();
    out.extend_from_slice(&[0; 4]);
    out.extend_from_slice(&msg.type_code().to_be_bytes());
    msg.encode_body(out);
    let len = (out.len() - start - 4) as u32;
    out[start..start + 4].copy_from_slice(&len.to_be_bytes());
}

/// A decoded frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    Message(Message),
    /// A type this version does not know; already skipped.
    Unknown(u16),
}

/// Decodes the frame at the start of `buf`. `Ok(None)`: more bytes are needed. On success
/// also returns how many bytes the frame took.
pub fn decode_frame(
    buf: &[u8],
    max_frame: usize,
) -> Result<Option<(Frame, usize)>, InvalidMessage> {
    let Some(len) = buf.get(..4) else {
        return Ok(None);
    };
    let len = u32::from_be_bytes([len[0], len[1], len[2], len[3]]) as usize;
    if len > max_frame {
        return Err(InvalidMessage::FrameTooLarge(len));
    }
    if len < 2 {
        return Err(InvalidMessage::Truncated);
    }
    let Some(frame) = buf.get(4..4 + len) else {
        return Ok(None);
    };
    let code = u16::from_be_bytes([frame[0], frame[1]]);
    let frame_out = match Message::decode_body(code, &frame[2..])? {
        Some(m) => Frame::Message(m),
        None => Frame::Unknown(code),
    };
    Ok(Some((frame_out, 4 + len)))
}
