//! What participants send each other directly, on the peer connection's data channel (label
//! [`CHANNEL_LABEL`], negotiated out of band as SCTP stream [`CHANNEL_ID`] on both sides, so
//! neither waits for the other to announce it). The server never sees these: chat between the
//! doctor and the patient goes end to end under DTLS and is stored nowhere.
//!
//! Like the signaling messages, one JSON object per message, tagged by `"type"`; receivers
//! ignore fields they do not know and drop (with [`PeerMessageError`]) what they cannot read.

use serde::{Deserialize, Serialize};

/// The data channel's label.
pub const CHANNEL_LABEL: &str = "bedside-chat";
/// The SCTP stream id both sides open the channel on.
pub const CHANNEL_ID: u16 = 0;
/// The longest chat text, in bytes of UTF-8 (a few paragraphs; a consultation is not a
/// file transfer).
pub const MAX_CHAT_BYTES: usize = 4096;

/// One message on the data channel.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum PeerMessage {
    /// A chat line. `id` is the sender's own counter (for its "not delivered" notices).
    Chat { id: u64, text: String },
}

/// Why a data channel message was dropped.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PeerMessageError {
    #[error("the message is not a Bedside peer message")]
    Malformed,
    #[error("chat text is empty")]
    EmptyChat,
    #[error("chat text is {0} bytes, over the limit of {MAX_CHAT_BYTES}")]
    ChatTooLong(usize),
}

/// Checks a chat text before it is sent or after it is received.
///
/// # Errors
/// [`PeerMessageError::EmptyChat`] for blank text, [`PeerMessageError::ChatTooLong`] over
/// [`MAX_CHAT_BYTES`].
pub fn check_chat_text(text: &str) -> Result<(), PeerMessageError> {
    if text.trim().is_empty() {
        return Err(PeerMessageError::EmptyChat);
    }
    if text.len() > MAX_CHAT_BYTES {
        return Err(PeerMessageError::ChatTooLong(text.len()));
    }
    Ok(())
}

impl PeerMessage {
    pub fn encode(&self) -> String {
        serde_json::to_string(self).expect("peer messages serialize")
    }

    /// Reads one data channel message, checking what it carries.
    ///
    /// # Errors
    /// [`PeerMessageError`] for anything but a well-formed message within the limits.
    pub fn decode(data: &[u8]) -> Result<Self, PeerMessageError> {
        // The JSON framing adds a little to the text; anything far beyond is not ours to parse.
        if data.len() > 2 * MAX_CHAT_BYTES + 256 {
            return Err(PeerMessageError::ChatTooLong(data.len()));
        }
        let msg: PeerMessage =
            serde_json::from_slice(data).map_err(|_| PeerMessageError::Malformed)?;
        match &msg {
            PeerMessage::Chat { text, .. } => check_chat_text(text)?,
        }
        Ok(msg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chat_round_trips_and_has_a_stable_shape() {
        let msg = PeerMessage::Chat {
            id: 7,
            text: "Please hold the camera closer ✋".into(),
        };
        let wire = msg.encode();
        assert_eq!(
            wire,
            r#"{"type":"chat","id":7,"text":"Please hold the camera closer ✋"}"#
        );
        assert_eq!(PeerMessage::decode(wire.as_bytes()), Ok(msg));
        // Unknown fields are ignored (a later version may add some).
        let newer = r#"{"type":"chat","id":1,"text":"hi","lang":"en"}"#;
        assert!(PeerMessage::decode(newer.as_bytes()).is_ok());
    }

    #[test]
    fn bad_messages_are_refused_with_a_reason() {
        assert_eq!(
            PeerMessage::decode(b"\xff\xfe"),
            Err(PeerMessageError::Malformed)
        );
        assert_eq!(
            PeerMessage::decode(br#"{"type":"file","id":1}"#),
            Err(PeerMessageError::Malformed)
        );
        assert_eq!(
            PeerMessage::decode(br#"{"type":"chat","id":1,"text":"   "}"#),
            Err(PeerMessageError::EmptyChat)
        );
        let long = PeerMessage::Chat {
            id: 1,
            text: "x".repeat(MAX_CHAT_BYTES + 1),
        }
        .encode();
        assert_eq!(
            PeerMessage::decode(long.as_bytes()),
            Err(PeerMessageError::ChatTooLong(MAX_CHAT_BYTES + 1))
        );
        assert!(check_chat_text(&"é".repeat(MAX_CHAT_BYTES / 2)).is_ok());
    }
}
