//! Round-trip and compatibility tests for the version 1 wire format.
//!
//! The fixtures are the contract with clients already in the field: every line must keep
//! decoding, and must encode back to the same JSON. A change that breaks them is a new protocol
//! version, not an edit.

use bedside_protocol::*;
use serde_json::Value;

fn lines(fixture: &str) -> impl Iterator<Item = &str> {
    fixture.lines().filter(|l| !l.trim().is_empty())
}

#[test]
fn every_client_fixture_decodes_and_reencodes_identically() {
    let mut seen = std::collections::BTreeSet::new();
    for line in lines(include_str!("fixtures/v1-client.jsonl")) {
        let msg = ClientMessage::decode(line).unwrap_or_else(|e| panic!("{line}: {e}"));
        seen.insert(msg.type_name());
        let back: Value = serde_json::from_str(&msg.encode()).unwrap();
        let orig: Value = serde_json::from_str(line).unwrap();
        assert_eq!(back, orig, "re-encoding changed {line}");
        assert_eq!(ClientMessage::decode(&msg.encode()).unwrap(), msg);
    }
    let all: std::collections::BTreeSet<_> = ClientMessage::TYPES.iter().copied().collect();
    assert_eq!(seen, all, "every client message type has a fixture");
}

#[test]
fn every_server_fixture_decodes_and_reencodes_identically() {
    let mut seen = std::collections::BTreeSet::new();
    for line in lines(include_str!("fixtures/v1-server.jsonl")) {
        let msg = ServerMessage::decode(line).unwrap_or_else(|e| panic!("{line}: {e}"));
        seen.insert(msg.type_name());
        let back: Value = serde_json::from_str(&msg.encode()).unwrap();
        let orig: Value = serde_json::from_str(line).unwrap();
        assert_eq!(back, orig, "re-encoding changed {line}");
    }
    let all: std::collections::BTreeSet<_> = ServerMessage::TYPES.iter().copied().collect();
    assert_eq!(seen, all, "every server message type has a fixture");
}

#[test]
fn unknown_fields_are_ignored_for_forward_compatibility() {
    let msg = ClientMessage::decode(r#"{"type":"ping","nonce":3,"added_in_v1_5":true}"#).unwrap();
    assert_eq!(msg, ClientMessage::Ping { nonce: 3 });
    let msg = ServerMessage::decode(
        r#"{"type":"peer_joined","peer":{"participant_id":"p","role":"doctor","avatar":"x"}}"#,
    )
    .unwrap();
    assert!(matches!(msg, ServerMessage::PeerJoined { peer } if peer.connected));
}

#[test]
fn an_error_code_from_a_newer_server_decodes_as_unknown() {
    let msg =
        ServerMessage::decode(r#"{"type":"error","code":"quota_exceeded","message":"x"}"#).unwrap();
    assert!(matches!(
        msg,
        ServerMessage::Error {
            code: ErrorCode::Unknown,
            ..
        }
    ));
}

#[test]
fn error_codes_have_stable_wire_names() {
    for code in [
        ErrorCode::MalformedMessage,
        ErrorCode::UnknownMessageType,
        ErrorCode::UnsupportedVersion,
        ErrorCode::OutOfOrder,
        ErrorCode::AlreadyJoined,
        ErrorCode::InvalidToken,
        ErrorCode::TokenExpired,
        ErrorCode::InvalidInviteCode,
        ErrorCode::RateLimited,
        ErrorCode::Forbidden,
        ErrorCode::NotAdmitted,
        ErrorCode::UnknownParticipant,
        ErrorCode::ConsultationNotFound,
        ErrorCode::ConsultationFull,
        ErrorCode::ResumeExpired,
        ErrorCode::Internal,
    ] {
        let json = serde_json::to_string(&code).unwrap();
        assert_eq!(json, format!("\"{}\"", code.as_str()));
        assert_eq!(serde_json::from_str::<ErrorCode>(&json).unwrap(), code);
    }
}

#[test]
fn decode_errors_say_what_was_wrong() {
    assert!(matches!(
        ClientMessage::decode("{not json"),
        Err(DecodeError::NotJson(_))
    ));
    assert!(matches!(
        ClientMessage::decode("[1,2]"),
        Err(DecodeError::NotJson(_))
    ));
    assert!(matches!(
        ClientMessage::decode(r#"{"nonce":1}"#),
        Err(DecodeError::MissingType)
    ));
    let err = ClientMessage::decode(r#"{"type":"teleport"}"#).unwrap_err();
    assert_eq!(err, DecodeError::UnknownType("teleport".into()));
    assert_eq!(err.code(), ErrorCode::UnknownMessageType);
    let err = ClientMessage::decode(r#"{"type":"offer","to":"p"}"#).unwrap_err();
    assert!(matches!(&err, DecodeError::Invalid { ty, .. } if ty == "offer"));
    assert_eq!(err.code(), ErrorCode::MalformedMessage);
    assert_eq!(err.message_type(), Some("offer"));
    // A server-only type is unknown to the server.
    assert!(matches!(
        ClientMessage::decode(r#"{"type":"admitted","peers":[],"ice_servers":[]}"#),
        Err(DecodeError::UnknownType(_))
    ));
}

#[test]
fn oversize_frames_are_refused_before_parsing() {
    let sdp = "a".repeat(MAX_MESSAGE_BYTES);
    let text = ClientMessage::Offer {
        to: ParticipantId("p".into()),
        sdp,
    }
    .encode();
    assert!(matches!(
        ClientMessage::decode(&text),
        Err(DecodeError::TooLarge(n)) if n == text.len()
    ));
}

#[test]
fn echoed_unknown_types_are_truncated() {
    let long = "x".repeat(500);
    let err = ClientMessage::decode(&format!(r#"{{"type":"{long}"}}"#)).unwrap_err();
    assert!(matches!(err, DecodeError::UnknownType(t) if t.len() == 64));
}
