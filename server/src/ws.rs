//! One task per signaling WebSocket: reads frames, decodes them, asks the hub, and writes what
//! the hub queued for it. Keepalive and the join deadline live here too.

use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket};
use bedside_protocol::{
    ClientMessage, DecodeError, ErrorCode, JoinAuth, MAX_MESSAGE_BYTES, PROTOCOL_VERSION,
    ServerMessage, close_code,
};
use tokio::time::{Instant, interval_at, sleep};

use crate::AppState;
use crate::auth::{self, TokenKind, invite};
use crate::hub::{ConnHandle, Outbound, Seated};
use crate::metrics::ResultLabel;

/// Why the read loop ended.
enum End {
    /// The link went away without `leave`: hold the seat.
    Dropped,
    /// The participant left, was denied, replaced, or the consultation ended: nothing to hold.
    Done,
}

struct Conn {
    state: Arc<AppState>,
    handle: ConnHandle,
    peer_ip: IpAddr,
    seated: Option<Seated>,
}

/// Longest display name kept (characters); longer ones are cut, not refused.
const MAX_DISPLAY_NAME: usize = 80;

pub async fn serve(state: Arc<AppState>, mut socket: WebSocket, peer_ip: IpAddr) {
    let (handle, mut outbound, overflowed) = state.hub.new_conn();
    state.metrics.connections.inc();
    let mut conn = Conn {
        state: state.clone(),
        handle,
        peer_ip,
        seated: None,
    };
    let keepalive = Duration::from_secs(state.config.keepalive_interval_secs);
    let dead_after = Duration::from_secs(state.config.keepalive_timeout_secs);
    let mut ping = interval_at(Instant::now() + keepalive, keepalive);
    let join_deadline = sleep(Duration::from_secs(state.config.join_timeout_secs));
    tokio::pin!(join_deadline);
    let mut last_heard = Instant::now();

    let end = loop {
        tokio::select! {
            frame = socket.recv() => {
                last_heard = Instant::now();
                match frame {
                    Some(Ok(Message::Text(text))) => {
                        if text.len() > MAX_MESSAGE_BYTES {
                            close(&mut socket, close_code::MESSAGE_TOO_BIG, "message too large").await;
                            break End::Dropped;
                        }
                        if let Some(end) = conn.on_text(&text).await {
                            close(&mut socket, close_code::NORMAL, "left").await;
                            break end;
                        }
                    }
                    Some(Ok(Message::Binary(_))) => conn.reply_error(
                        ErrorCode::MalformedMessage,
                        "binary frames are not part of the protocol; send JSON text",
                        None,
                    ),
                    Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
                    Some(Ok(Message::Close(_))) | None => break End::Dropped,
                    Some(Err(err)) => {
                        if is_capacity_error(&err) {
                            close(&mut socket, close_code::MESSAGE_TOO_BIG, "message too large").await;
                        }
                        break End::Dropped;
                    }
                }
            }
            out = outbound.recv() => match out {
                Some(Outbound::Message(msg)) => {
                    if socket.send(Message::Text(msg.encode().into())).await.is_err() {
                        break End::Dropped;
                    }
                    if overflowed.load(Ordering::Relaxed) {
                        close(&mut socket, close_code::SLOW_CONSUMER, "too slow to read").await;
                        break End::Dropped;
                    }
                }
                Some(Outbound::Close(code, reason)) => {
                    close(&mut socket, code, reason).await;
                    break if code == close_code::GOING_AWAY { End::Dropped } else { End::Done };
                }
                None => break End::Dropped,
            },
            _ = ping.tick() => {
                if last_heard.elapsed() > dead_after {
                    tracing::debug!("keepalive timeout");
                    break End::Dropped;
                }
                if socket.send(Message::Ping(Default::default())).await.is_err() {
                    break End::Dropped;
                }
            }
            _ = &mut join_deadline, if conn.seated.is_none() => {
                close(&mut socket, close_code::JOIN_TIMEOUT, "no join in time").await;
                break End::Done;
            }
        }
    };
    if let (End::Dropped, Some(seated)) = (end, &conn.seated) {
        state.hub.disconnected(seated, conn.handle.id);
    }
    state.metrics.connections.dec();
}

async fn close(socket: &mut WebSocket, code: u16, reason: &'static str) {
    let _ = socket
        .send(Message::Close(Some(CloseFrame {
            code,
            reason: Utf8Bytes::from_static(reason),
        })))
        .await;
}

fn is_capacity_error(err: &axum::Error) -> bool {
    let inner = std::error::Error::source(err);
    inner
        .and_then(|e| e.downcast_ref::<tungstenite::Error>())
        .is_some_and(|e| matches!(e, tungstenite::Error::Capacity(_)))
}

impl Conn {
    /// Replies go through the same queue as everything the hub sends, so order is kept.
    fn reply(&self, msg: ServerMessage) {
        self.handle.send(&self.state.metrics, msg);
    }

    fn reply_error(&self, code: ErrorCode, message: &str, in_reply_to: Option<&str>) {
        self.state.metrics.error(code);
        self.reply(ServerMessage::error(code, message, in_reply_to));
    }

    /// Handles one text frame; `Some` ends the connection.
    async fn on_text(&mut self, text: &str) -> Option<End> {
        let msg = match ClientMessage::decode(text) {
            Ok(msg) => msg,
            Err(err) => {
                self.state.metrics.message("in", "invalid");
                let message = match &err {
                    DecodeError::UnknownType(_) => {
                        "unknown message type; see the bedside protocol".to_owned()
                    }
                    other => other.to_string(),
                };
                self.reply_error(err.code(), &message, err.message_type());
                return None;
            }
        };
        let ty = msg.type_name();
        self.state.metrics.message("in", ty);
        let result = match (&self.seated, msg) {
            (_, ClientMessage::Ping { nonce }) => {
                self.reply(ServerMessage::Pong { nonce });
                Ok(())
            }
            (_, ClientMessage::Pong { .. }) => Ok(()),
            (
                None,
                ClientMessage::Join {
                    protocol_version,
                    auth,
                    display_name,
                },
            ) => self.join(protocol_version, auth, display_name).await,
            (
                None,
                ClientMessage::Resume {
                    protocol_version,
                    resume_token,
                },
            ) => self.resume(protocol_version, &resume_token).await,
            (Some(_), ClientMessage::Join { .. } | ClientMessage::Resume { .. }) => Err((
                ErrorCode::AlreadyJoined,
                "this connection already has a seat",
            )),
            (None, _) => Err((ErrorCode::OutOfOrder, "send join or resume first")),
            (Some(seated), msg) => {
                let seated = seated.clone();
                return self.seated_message(&seated, msg);
            }
        };
        if let Err((code, message)) = result {
            self.reply_error(code, message, Some(ty));
        }
        None
    }

    fn seated_message(&mut self, seated: &Seated, msg: ClientMessage) -> Option<End> {
        let ty = msg.type_name();
        let hub = &self.state.hub;
        let from = seated.participant_id.clone();
        let result = match msg {
            ClientMessage::Admit { participant_id } => {
                hub.admit_or_deny(seated, &participant_id, true)
            }
            ClientMessage::Deny { participant_id } => {
                hub.admit_or_deny(seated, &participant_id, false)
            }
            ClientMessage::Offer { to, sdp } => {
                hub.relay(seated, &to, ServerMessage::Offer { from, sdp })
            }
            ClientMessage::Answer { to, sdp } => {
                hub.relay(seated, &to, ServerMessage::Answer { from, sdp })
            }
            ClientMessage::IceCandidate { to, candidate } => {
                hub.relay(seated, &to, ServerMessage::IceCandidate { from, candidate })
            }
            ClientMessage::IceRestart { to } => {
                hub.relay(seated, &to, ServerMessage::IceRestart { from })
            }
            ClientMessage::RefreshIceServers => {
                self.reply(ServerMessage::IceServers {
                    ice_servers: hub.ice_servers(&seated.participant_id),
                });
                Ok(())
            }
            ClientMessage::Stats { report } => {
                if let Some(rtt) = report.rtt_ms.filter(|r| r.is_finite() && *r >= 0.0) {
                    self.state.metrics.stats_rtt_seconds.observe(rtt / 1000.0);
                }
                Ok(())
            }
            ClientMessage::Leave => {
                hub.leave(seated, self.handle.id);
                return Some(End::Done);
            }
            ClientMessage::Join { .. }
            | ClientMessage::Resume { .. }
            | ClientMessage::Ping { .. }
            | ClientMessage::Pong { .. } => unreachable!("handled before"),
        };
        if let Err(code) = result {
            let message = match code {
                ErrorCode::NotAdmitted => "wait until the doctor admits you",
                ErrorCode::Forbidden => "only doctors and clinicians may do this",
                ErrorCode::UnknownParticipant => {
                    "that participant is not (or not yet, or no longer) reachable here"
                }
                _ => "the request could not be carried out",
            };
            self.reply_error(code, message, Some(ty));
        }
        None
    }

    async fn join(
        &mut self,
        version: u32,
        auth: JoinAuth,
        display_name: Option<String>,
    ) -> Result<(), (ErrorCode, &'static str)> {
        if version != PROTOCOL_VERSION {
            return Err((
                ErrorCode::UnsupportedVersion,
                "this server speaks protocol version 1",
            ));
        }
        let state = &self.state;
        let (cid, role) = match auth {
            JoinAuth::Token { token } => {
                let claims = state
                    .tokens
                    .verify(&token, TokenKind::Join)
                    .map_err(|e| (e.code(), "the token was refused"))?;
                match state.store.consultation(claims.cid.clone()).await {
                    Ok(Some(row)) if row.ended_at.is_none() => {}
                    Ok(_) => {
                        return Err((
                            ErrorCode::ConsultationNotFound,
                            "this consultation has ended or does not exist",
                        ));
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "store lookup failed");
                        return Err((ErrorCode::Internal, "try again"));
                    }
                }
                (claims.cid, claims.role)
            }
            JoinAuth::InviteCode { code } => {
                if state.invite_limiter.check_key(&self.peer_ip).is_err() {
                    return Err((
                        ErrorCode::RateLimited,
                        "too many invite code attempts; wait a minute",
                    ));
                }
                let Some(code) = invite::normalize(&code) else {
                    return Err((ErrorCode::InvalidInviteCode, "that is not an invite code"));
                };
                match state
                    .store
                    .redeem_invite(invite::hash(&code), auth::unix_now())
                    .await
                {
                    Ok(Some(cid)) => (cid, bedside_protocol::Role::Patient),
                    Ok(None) => {
                        return Err((
                            ErrorCode::InvalidInviteCode,
                            "the invite code is unknown or has expired",
                        ));
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "store lookup failed");
                        return Err((ErrorCode::Internal, "try again"));
                    }
                }
            }
        };
        // This connection's span (api.rs) is named by its consultation from here on.
        tracing::Span::current().record("id", cid.0.as_str());
        let display_name = display_name
            .map(|n| n.trim().chars().take(MAX_DISPLAY_NAME).collect::<String>())
            .filter(|n| !n.is_empty());
        let seated = state
            .hub
            .join(&cid, role, display_name, &self.handle)
            .map_err(|code| (code, "the consultation has no free seat"))?;
        self.seated = Some(seated);
        Ok(())
    }

    async fn resume(&mut self, version: u32, token: &str) -> Result<(), (ErrorCode, &'static str)> {
        if version != PROTOCOL_VERSION {
            return Err((
                ErrorCode::UnsupportedVersion,
                "this server speaks protocol version 1",
            ));
        }
        let state = &self.state;
        let claims = state
            .tokens
            .verify(token, TokenKind::Resume)
            .map_err(|e| (e.code(), "the resume token was refused"))?;
        tracing::Span::current().record("id", claims.cid.0.as_str());
        let pid = bedside_protocol::ParticipantId(claims.sub);
        if !state.hub.has_seat(&claims.cid, &pid) {
            // Not live here: after a restart, the seat may be in the store.
            match state.store.seats(claims.cid.clone()).await {
                Ok(seats) if seats.iter().any(|s| s.participant_id == pid) => {
                    state.hub.restore(&claims.cid, seats);
                }
                Ok(_) => {}
                Err(e) => tracing::error!(error = %e, "store lookup failed"),
            }
        }
        match state.hub.resume(&claims.cid, &pid, &self.handle) {
            Ok(seated) => {
                self.seated = Some(seated);
                Ok(())
            }
            Err(code) => {
                state
                    .metrics
                    .resumes
                    .get_or_create(&ResultLabel { result: "expired" })
                    .inc();
                Err((
                    code,
                    "the seat was released (the rejoin window passed); join again",
                ))
            }
        }
    }
}
