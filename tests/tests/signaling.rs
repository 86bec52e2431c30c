//! End-to-end signaling: a real `bedside-server` on 127.0.0.1, real WebSockets, no mocks.

use std::time::Duration;

use anyhow::Result;
use bedside_client_core::signaling::Message;
use bedside_protocol::{
    ClientMessage, ErrorCode, IceCandidate, JoinAuth, LeaveReason, MAX_MESSAGE_BYTES,
    PROTOCOL_VERSION, Role, ServerMessage, close_code,
};
use bedside_server::auth::{TokenKind, Tokens, unix_now};
use bedside_tests::{Client, TestServer, test_config};

fn offer(to: &bedside_protocol::ParticipantId) -> ClientMessage {
    ClientMessage::Offer {
        to: to.clone(),
        sdp: "v=0\r\no=- 1 1 IN IP4 0.0.0.0\r\n".into(),
    }
}

#[tokio::test]
async fn patient_waits_until_the_doctor_admits_then_both_see_each_other() -> Result<()> {
    let server = TestServer::start().await?;
    let c = server.create_consultation().await?;
    let mut doctor = server.connect().await?;
    match doctor.join_token(&c.doctor_token).await? {
        ServerMessage::Joined {
            role,
            resumed,
            rejoin_window_secs,
            ..
        } => {
            assert_eq!(role, Role::Doctor);
            assert!(!resumed);
            assert_eq!(rejoin_window_secs, 60);
        }
        other => panic!("{other:?}"),
    }
    match doctor.expect_type("admitted").await? {
        ServerMessage::Admitted { peers, .. } => assert!(peers.is_empty()),
        other => panic!("{other:?}"),
    }
    match doctor.expect_type("waiting_room").await? {
        ServerMessage::WaitingRoom { waiting } => assert!(waiting.is_empty()),
        other => panic!("{other:?}"),
    }

    let mut patient = server.connect().await?;
    // Case, spaces and dashes in what the patient typed do not matter.
    let typed = c.invite_code.to_lowercase().replace('-', " ");
    match patient.join_invite(&typed, Some("  Ana Souza ")).await? {
        ServerMessage::Joined { role, .. } => assert_eq!(role, Role::Patient),
        other => panic!("{other:?}"),
    }
    assert_eq!(patient.next().await?, ServerMessage::Waiting);

    let waiting = match doctor.expect_type("waiting_room").await? {
        ServerMessage::WaitingRoom { waiting } => waiting,
        other => panic!("{other:?}"),
    };
    assert_eq!(waiting.len(), 1);
    assert_eq!(waiting[0].participant_id, patient.id());
    assert_eq!(waiting[0].display_name.as_deref(), Some("Ana Souza"));
    assert!(waiting[0].connected);

    doctor
        .send(ClientMessage::Admit {
            participant_id: patient.id(),
        })
        .await?;
    match patient.next().await? {
        ServerMessage::Admitted { peers, .. } => {
            assert_eq!(peers.len(), 1);
            assert_eq!(peers[0].participant_id, doctor.id());
            assert_eq!(peers[0].role, Role::Doctor);
        }
        other => panic!("{other:?}"),
    }
    match doctor.expect_type("peer_joined").await? {
        ServerMessage::PeerJoined { peer } => {
            assert_eq!(peer.participant_id, patient.id());
            assert_eq!(peer.display_name.as_deref(), Some("Ana Souza"));
        }
        other => panic!("{other:?}"),
    }
    match doctor.expect_type("waiting_room").await? {
        ServerMessage::WaitingRoom { waiting } => assert!(waiting.is_empty()),
        other => panic!("{other:?}"),
    }
    Ok(())
}

#[tokio::test]
async fn a_denied_patient_is_told_and_disconnected() -> Result<()> {
    let server = TestServer::start().await?;
    let c = server.create_consultation().await?;
    let mut doctor = server.doctor(&c).await?;
    let mut patient = server.waiting_patient(&c, "Bo").await?;
    doctor.expect_type("waiting_room").await?;
    doctor
        .send(ClientMessage::Deny {
            participant_id: patient.id(),
        })
        .await?;
    assert_eq!(patient.next().await?, ServerMessage::Denied);
    assert_eq!(patient.expect_close().await?, close_code::DENIED);
    match doctor.expect_type("waiting_room").await? {
        ServerMessage::WaitingRoom { waiting } => assert!(waiting.is_empty()),
        other => panic!("{other:?}"),
    }
    // Denying someone who is gone is an error, not a crash.
    doctor
        .send(ClientMessage::Deny {
            participant_id: patient.id(),
        })
        .await?;
    doctor.expect_error(ErrorCode::UnknownParticipant).await?;
    Ok(())
}

#[tokio::test]
async fn session_descriptions_and_candidates_flow_only_after_admission() -> Result<()> {
    let server = TestServer::start().await?;
    let c = server.create_consultation().await?;
    let mut doctor = server.doctor(&c).await?;
    let mut patient = server.waiting_patient(&c, "Cy").await?;
    doctor.expect_type("waiting_room").await?;

    // A waiting patient cannot reach the doctor...
    patient.send(offer(&doctor.id())).await?;
    patient.expect_error(ErrorCode::NotAdmitted).await?;
    // ...and the doctor cannot reach a waiting patient.
    doctor.send(offer(&patient.id())).await?;
    doctor.expect_error(ErrorCode::UnknownParticipant).await?;
    patient.expect_silence(Duration::from_millis(200)).await?;

    doctor
        .send(ClientMessage::Admit {
            participant_id: patient.id(),
        })
        .await?;
    patient.expect_type("admitted").await?;
    doctor.expect_type("peer_joined").await?;

    patient.send(offer(&doctor.id())).await?;
    match doctor.expect_type("offer").await? {
        ServerMessage::Offer { from, sdp } => {
            assert_eq!(from, patient.id());
            assert!(sdp.starts_with("v=0"));
        }
        other => panic!("{other:?}"),
    }
    doctor
        .send(ClientMessage::Answer {
            to: patient.id(),
            sdp: "v=0\r\n".into(),
        })
        .await?;
    assert!(
        matches!(patient.next().await?, ServerMessage::Answer { from, .. } if from == doctor.id())
    );
    let candidate = IceCandidate {
        candidate: "candidate:1 1 udp 2130706431 192.0.2.1 50000 typ host".into(),
        sdp_mid: Some("0".into()),
        sdp_mline_index: Some(0),
        username_fragment: None,
    };
    patient
        .send(ClientMessage::IceCandidate {
            to: doctor.id(),
            candidate: candidate.clone(),
        })
        .await?;
    match doctor.expect_type("ice_candidate").await? {
        ServerMessage::IceCandidate {
            from,
            candidate: got,
        } => {
            assert_eq!(from, patient.id());
            assert_eq!(got, candidate);
        }
        other => panic!("{other:?}"),
    }
    doctor
        .send(ClientMessage::IceRestart { to: patient.id() })
        .await?;
    assert!(
        matches!(patient.next().await?, ServerMessage::IceRestart { from } if from == doctor.id())
    );

    // Addressing yourself or a stranger is refused.
    patient.send(offer(&patient.id())).await?;
    patient.expect_error(ErrorCode::UnknownParticipant).await?;
    patient
        .send(offer(&bedside_protocol::ParticipantId("p-nobody".into())))
        .await?;
    patient.expect_error(ErrorCode::UnknownParticipant).await?;
    Ok(())
}

#[tokio::test]
async fn a_patient_may_not_admit_or_deny() -> Result<()> {
    let server = TestServer::start().await?;
    let c = server.create_consultation().await?;
    let mut doctor = server.doctor(&c).await?;
    let mut first = server.waiting_patient(&c, "First").await?;
    doctor
        .send(ClientMessage::Admit {
            participant_id: first.id(),
        })
        .await?;
    first.expect_type("admitted").await?;
    let second = server.waiting_patient(&c, "Second").await?;
    first
        .send(ClientMessage::Admit {
            participant_id: second.id(),
        })
        .await?;
    first.expect_error(ErrorCode::Forbidden).await?;
    Ok(())
}

#[tokio::test]
async fn resume_inside_the_window_restores_the_same_seat() -> Result<()> {
    let server = TestServer::start().await?;
    let c = server.create_consultation().await?;
    let mut doctor = server.doctor(&c).await?;
    let mut patient = server.waiting_patient(&c, "Di").await?;
    doctor
        .send(ClientMessage::Admit {
            participant_id: patient.id(),
        })
        .await?;
    patient.expect_type("admitted").await?;
    doctor.expect_type("peer_joined").await?;

    let pid = patient.id();
    let token = patient.resume_token.clone().unwrap();
    patient.conn.abort(); // The link drops: no close handshake.
    match doctor.expect_type("peer_reconnecting").await? {
        ServerMessage::PeerReconnecting { participant_id } => assert_eq!(participant_id, pid),
        other => panic!("{other:?}"),
    }

    let mut back = server.connect().await?;
    back.send(ClientMessage::Resume {
        protocol_version: PROTOCOL_VERSION,
        resume_token: token,
    })
    .await?;
    match back.next().await? {
        ServerMessage::Joined {
            participant_id,
            role,
            resumed,
            ..
        } => {
            assert_eq!(participant_id, pid);
            assert_eq!(role, Role::Patient);
            assert!(resumed);
        }
        other => panic!("{other:?}"),
    }
    // Still admitted: no waiting room again.
    match back.next().await? {
        ServerMessage::Admitted { peers, .. } => assert_eq!(peers[0].participant_id, doctor.id()),
        other => panic!("{other:?}"),
    }
    match doctor.expect_type("peer_back").await? {
        ServerMessage::PeerBack { participant_id } => assert_eq!(participant_id, pid),
        other => panic!("{other:?}"),
    }
    // And signaling works again on the new link.
    back.participant_id = Some(pid);
    back.send(offer(&doctor.id())).await?;
    doctor.expect_type("offer").await?;
    Ok(())
}

#[tokio::test]
async fn resuming_on_a_new_link_replaces_a_half_open_old_one() -> Result<()> {
    let server = TestServer::start().await?;
    let c = server.create_consultation().await?;
    let mut doctor = server.doctor(&c).await?;
    let token = doctor.resume_token.clone().unwrap();
    let mut second = server.connect().await?;
    second
        .send(ClientMessage::Resume {
            protocol_version: PROTOCOL_VERSION,
            resume_token: token,
        })
        .await?;
    assert!(matches!(
        second.next().await?,
        ServerMessage::Joined { resumed: true, .. }
    ));
    assert_eq!(doctor.expect_close().await?, close_code::REPLACED);
    Ok(())
}

#[tokio::test]
async fn after_the_window_the_seat_is_released_and_resume_is_refused_cleanly() -> Result<()> {
    let mut config = test_config();
    config.rejoin_window_secs = 1;
    let server = TestServer::start_with(config).await?;
    let c = server.create_consultation().await?;
    let mut doctor = server.doctor(&c).await?;
    let mut patient = server.waiting_patient(&c, "Eve").await?;
    doctor
        .send(ClientMessage::Admit {
            participant_id: patient.id(),
        })
        .await?;
    patient.expect_type("admitted").await?;
    let (pid, token) = (patient.id(), patient.resume_token.clone().unwrap());
    patient.conn.abort();
    doctor.expect_type("peer_reconnecting").await?;
    match doctor.expect_type("peer_left").await? {
        ServerMessage::PeerLeft {
            participant_id,
            reason,
        } => {
            assert_eq!(participant_id, pid);
            assert_eq!(reason, LeaveReason::TimedOut);
        }
        other => panic!("{other:?}"),
    }
    let mut late = server.connect().await?;
    late.send(ClientMessage::Resume {
        protocol_version: PROTOCOL_VERSION,
        resume_token: token,
    })
    .await?;
    late.expect_error(ErrorCode::ResumeExpired).await?;
    // The connection stays usable: the patient can join again from the start.
    late.join_invite(&c.invite_code, None).await?;
    assert_eq!(late.next().await?, ServerMessage::Waiting);
    Ok(())
}

#[tokio::test]
async fn leave_releases_the_seat_at_once() -> Result<()> {
    let server = TestServer::start().await?;
    let c = server.create_consultation().await?;
    let mut doctor = server.doctor(&c).await?;
    let mut patient = server.waiting_patient(&c, "Flo").await?;
    doctor
        .send(ClientMessage::Admit {
            participant_id: patient.id(),
        })
        .await?;
    patient.expect_type("admitted").await?;
    patient.send(ClientMessage::Leave).await?;
    assert_eq!(patient.expect_close().await?, close_code::NORMAL);
    match doctor.expect_type("peer_left").await? {
        ServerMessage::PeerLeft { reason, .. } => assert_eq!(reason, LeaveReason::Left),
        other => panic!("{other:?}"),
    }
    Ok(())
}

#[tokio::test]
async fn expired_forged_and_wrong_kind_tokens_are_refused() -> Result<()> {
    let server = TestServer::start().await?;
    let c = server.create_consultation().await?;
    let cid = c.consultation_id.clone();
    let ours = Tokens::new(server.config.token_secret.as_bytes());
    let theirs = Tokens::new(b"a secret the server never had");
    let hour = Duration::from_secs(3600);

    let cases = [
        (
            ours.issue(
                TokenKind::Join,
                &cid,
                Role::Doctor,
                "t",
                unix_now() - 7200,
                hour,
            ),
            ErrorCode::TokenExpired,
        ),
        (
            theirs.issue(TokenKind::Join, &cid, Role::Doctor, "t", unix_now(), hour),
            ErrorCode::InvalidToken,
        ),
        // A resume token is not a join token.
        (
            ours.issue(
                TokenKind::Resume,
                &cid,
                Role::Doctor,
                "p-x",
                unix_now(),
                hour,
            ),
            ErrorCode::InvalidToken,
        ),
        ("garbage".to_owned(), ErrorCode::InvalidToken),
        // A valid token for a consultation that does not exist.
        (
            ours.issue(
                TokenKind::Join,
                &bedside_protocol::ConsultationId("c-none".into()),
                Role::Doctor,
                "t",
                unix_now(),
                hour,
            ),
            ErrorCode::ConsultationNotFound,
        ),
    ];
    let mut client = server.connect().await?;
    for (token, code) in cases {
        client.send_join(JoinAuth::Token { token }).await?;
        client.expect_error(code).await?;
    }
    // A join token is not a resume token either.
    client
        .send(ClientMessage::Resume {
            protocol_version: PROTOCOL_VERSION,
            resume_token: c.doctor_token.clone(),
        })
        .await?;
    client.expect_error(ErrorCode::InvalidToken).await?;
    // Wrong protocol version.
    client
        .send(ClientMessage::Join {
            protocol_version: 99,
            auth: JoinAuth::Token {
                token: c.doctor_token.clone(),
            },
            display_name: None,
        })
        .await?;
    client.expect_error(ErrorCode::UnsupportedVersion).await?;
    // After all that, the same connection can still join properly.
    client.join_token(&c.doctor_token).await?;
    Ok(())
}

#[tokio::test]
async fn malformed_input_gets_clear_errors_and_costs_the_others_nothing() -> Result<()> {
    let server = TestServer::start().await?;
    let c = server.create_consultation().await?;
    let mut doctor = server.doctor(&c).await?;
    let mut patient = server.waiting_patient(&c, "Gus").await?;
    doctor
        .send(ClientMessage::Admit {
            participant_id: patient.id(),
        })
        .await?;
    patient.expect_type("admitted").await?;
    doctor.expect_type("peer_joined").await?;

    let bad: [(&str, ErrorCode); 5] = [
        ("{not json", ErrorCode::MalformedMessage),
        ("[]", ErrorCode::MalformedMessage),
        (r#"{"no_type":1}"#, ErrorCode::MalformedMessage),
        (r#"{"type":"teleport"}"#, ErrorCode::UnknownMessageType),
        (r#"{"type":"offer","to":42}"#, ErrorCode::MalformedMessage),
    ];
    for (text, code) in bad {
        patient.conn.send_raw(Message::Text(text.into())).await?;
        match patient.expect_type("error").await? {
            ServerMessage::Error {
                code: got, message, ..
            } => {
                assert_eq!(got, code, "{text}");
                assert!(!message.is_empty());
            }
            other => panic!("{other:?}"),
        }
    }
    patient
        .conn
        .send_raw(Message::Binary(vec![1, 2, 3].into()))
        .await?;
    patient.expect_error(ErrorCode::MalformedMessage).await?;
    // Joining twice on one connection.
    patient.join_invite(&c.invite_code, None).await.unwrap_err();

    // The patient is still in the call and the doctor noticed nothing.
    patient.send(ClientMessage::Ping { nonce: 9 }).await?;
    assert_eq!(
        patient.expect_type("pong").await?,
        ServerMessage::Pong { nonce: 9 }
    );
    patient.send(offer(&doctor.id())).await?;
    doctor.expect_type("offer").await?;
    doctor.expect_silence(Duration::from_millis(200)).await?;

    // An oversize frame closes only the sender, with 1009.
    let huge = format!(
        r#"{{"type":"offer","to":"{}","sdp":"{}"}}"#,
        doctor.id(),
        "a".repeat(MAX_MESSAGE_BYTES)
    );
    patient.conn.send_raw(Message::Text(huge.into())).await?;
    assert_eq!(patient.expect_close().await?, close_code::MESSAGE_TOO_BIG);
    // The doctor sees the patient's link drop (the seat is held), not an error of its own.
    doctor.expect_type("peer_reconnecting").await?;
    doctor.send(ClientMessage::Ping { nonce: 1 }).await?;
    doctor.expect_type("pong").await?;
    Ok(())
}

#[tokio::test]
async fn messages_before_join_are_out_of_order() -> Result<()> {
    let server = TestServer::start().await?;
    let mut client = server.connect().await?;
    client
        .send(offer(&bedside_protocol::ParticipantId("p-x".into())))
        .await?;
    client.expect_error(ErrorCode::OutOfOrder).await?;
    client.send(ClientMessage::Leave).await?;
    client.expect_error(ErrorCode::OutOfOrder).await?;
    Ok(())
}

#[tokio::test]
async fn a_connection_that_never_joins_is_closed() -> Result<()> {
    let mut config = test_config();
    config.join_timeout_secs = 1;
    let server = TestServer::start_with(config).await?;
    let mut client = server.connect().await?;
    assert_eq!(client.expect_close().await?, close_code::JOIN_TIMEOUT);
    Ok(())
}

#[tokio::test]
async fn invite_code_guessing_is_rate_limited_per_source() -> Result<()> {
    let mut config = test_config();
    config.invite_attempts_per_minute = 5;
    let server = TestServer::start_with(config).await?;
    let c = server.create_consultation().await?;
    let mut guesser = server.connect().await?;
    for _ in 0..5 {
        guesser
            .send_join(JoinAuth::InviteCode {
                code: "22222-22222".into(),
            })
            .await?;
        guesser.expect_error(ErrorCode::InvalidInviteCode).await?;
    }
    // Now even the right code is refused from this source for a while.
    guesser
        .send_join(JoinAuth::InviteCode {
            code: c.invite_code.clone(),
        })
        .await?;
    guesser.expect_error(ErrorCode::RateLimited).await?;
    // A doctor's token join is not affected.
    let mut doctor = server.connect().await?;
    doctor.join_token(&c.doctor_token).await?;
    Ok(())
}

#[tokio::test]
async fn a_silent_link_is_detected_and_its_seat_held() -> Result<()> {
    let mut config = test_config();
    config.keepalive_interval_secs = 1;
    config.keepalive_timeout_secs = 2;
    let server = TestServer::start_with(config).await?;
    let c = server.create_consultation().await?;
    let mut doctor = server.doctor(&c).await?;
    let mut patient = server.waiting_patient(&c, "Hal").await?;
    doctor
        .send(ClientMessage::Admit {
            participant_id: patient.id(),
        })
        .await?;
    patient.expect_type("admitted").await?;
    doctor.expect_type("peer_joined").await?;
    // The patient's app freezes: it stops reading, so it never answers the server's pings.
    let frozen = patient;
    let started = std::time::Instant::now();
    // Meanwhile the doctor keeps reading (its client answers pings), and sees the patient go.
    match doctor.expect_type("peer_reconnecting").await? {
        ServerMessage::PeerReconnecting { participant_id } => {
            assert_eq!(participant_id, frozen.id())
        }
        other => panic!("{other:?}"),
    }
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    drop(frozen);
    Ok(())
}

#[tokio::test]
async fn ending_a_consultation_closes_it_for_everyone() -> Result<()> {
    let server = TestServer::start().await?;
    let c = server.create_consultation().await?;
    let mut doctor = server.doctor(&c).await?;
    let mut patient = server.waiting_patient(&c, "Ike").await?;
    let resp = server
        .http()
        .delete(server.api(&format!("/consultations/{}", c.consultation_id)))
        .bearer_auth(&server.admin_key)
        .send()
        .await?;
    assert_eq!(resp.status(), 204);
    for client in [&mut doctor, &mut patient] {
        assert!(matches!(
            client.expect_type("ended").await?,
            ServerMessage::Ended { .. }
        ));
        assert_eq!(client.expect_close().await?, close_code::ENDED);
    }
    let mut again = server.connect().await?;
    again
        .send_join(JoinAuth::Token {
            token: c.doctor_token.clone(),
        })
        .await?;
    again.expect_error(ErrorCode::ConsultationNotFound).await?;
    again
        .send_join(JoinAuth::InviteCode {
            code: c.invite_code.clone(),
        })
        .await?;
    again.expect_error(ErrorCode::InvalidInviteCode).await?;
    Ok(())
}

#[tokio::test]
async fn a_full_consultation_refuses_more_seats() -> Result<()> {
    let mut config = test_config();
    config.max_participants = 2;
    let server = TestServer::start_with(config).await?;
    let c = server.create_consultation().await?;
    let _doctor = server.doctor(&c).await?;
    let _patient = server.waiting_patient(&c, "J").await?;
    let mut third = server.connect().await?;
    third
        .send_join(JoinAuth::InviteCode {
            code: c.invite_code.clone(),
        })
        .await?;
    third.expect_error(ErrorCode::ConsultationFull).await?;
    Ok(())
}

#[tokio::test]
async fn graceful_shutdown_says_going_away_and_returns() -> Result<()> {
    let mut server = TestServer::start().await?;
    let c = server.create_consultation().await?;
    let mut doctor = server.doctor(&c).await?;
    let mut patient = server.waiting_patient(&c, "Kim").await?;
    server.shutdown().await?;
    assert_eq!(doctor.expect_close().await?, close_code::GOING_AWAY);
    assert_eq!(patient.expect_close().await?, close_code::GOING_AWAY);
    assert!(Client::connect(&server.ws_url).await.is_err());
    Ok(())
}

#[tokio::test]
async fn three_hundred_concurrent_consultations() -> Result<()> {
    // Every patient comes from 127.0.0.1 here, so the per-source invite limit must allow them.
    let mut config = test_config();
    config.invite_attempts_per_minute = 10_000;
    let server = std::sync::Arc::new(TestServer::start_with(config).await?);
    let mut tasks = Vec::new();
    for _ in 0..300 {
        let server = server.clone();
        tasks.push(tokio::spawn(async move {
            let c = server.create_consultation().await?;
            let mut doctor = server.doctor(&c).await?;
            let mut patient = server.waiting_patient(&c, "P").await?;
            doctor
                .send(ClientMessage::Admit {
                    participant_id: patient.id(),
                })
                .await?;
            patient.expect_type("admitted").await?;
            patient.send(offer(&doctor.id())).await?;
            doctor.expect_type("offer").await?;
            doctor
                .send(ClientMessage::Answer {
                    to: patient.id(),
                    sdp: "v=0\r\n".into(),
                })
                .await?;
            patient.expect_type("answer").await?;
            anyhow::Ok((doctor, patient))
        }));
    }
    let mut held = Vec::new();
    for t in tasks {
        held.push(t.await??);
    }
    let metrics = server.metrics().await?;
    assert!(
        metrics.contains("bedside_consultations_active 300"),
        "{metrics}"
    );
    assert!(metrics.contains("bedside_participants_connected 600"));
    assert!(metrics.contains("bedside_admissions_total 300"));
    drop(held);
    Ok(())
}

#[tokio::test]
async fn admitted_participants_get_the_bundled_relay_with_short_lived_credentials() -> Result<()> {
    let mut config = bedside_tests::with_turn(test_config());
    config.turn.relay.auth_secret = "test-turn-secret".into();
    let server = TestServer::start_with(config).await?;
    let c = server.create_consultation().await?;
    let mut doctor = server.connect().await?;
    doctor.join_token(&c.doctor_token).await?;
    let ice = match doctor.expect_type("admitted").await? {
        ServerMessage::Admitted { ice_servers, .. } => ice_servers,
        other => panic!("{other:?}"),
    };
    assert!(
        ice.iter()
            .any(|s| s.urls.iter().any(|u| u.starts_with("stun:127.0.0.1:")))
    );
    let turn = ice
        .iter()
        .find(|s| {
            s.urls
                .iter()
                .any(|u| u.starts_with("turn:127.0.0.1:") && u.ends_with("?transport=udp"))
        })
        .expect("a TURN server");
    assert!(turn.urls.iter().any(|u| u.ends_with("?transport=tcp")));
    // TURN REST credentials bound to this participant and its consultation (the relay's group),
    // expiring within the configured TTL.
    let username = turn.username.clone().unwrap();
    let (expiry, user) = username.split_once(':').unwrap();
    assert_eq!(user, format!("{}/{}", c.consultation_id, doctor.id().0));
    let expiry: u64 = expiry.parse()?;
    let now = unix_now();
    assert!(expiry > now && expiry <= now + 600 + 5, "{expiry} vs {now}");
    let (_, expected) = bedside_server::auth::turn_rest_credentials(
        "test-turn-secret",
        user,
        Duration::from_secs(expiry - now),
        now,
    );
    assert_eq!(turn.credential.as_deref(), Some(expected.as_str()));
    Ok(())
}
