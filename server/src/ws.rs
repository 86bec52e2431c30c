//! Two tasks per signaling WebSocket. The reader reads frames, charges them to the
//! connection's inbound budget, decodes them and asks the hub; the writer writes what the hub
//! queued for it, and the keepalive pings, each write under a deadline.
//!
//! The split is what lets a slow reader be detected: a write that blocks (the peer stopped
//! reading and the kernel buffers are full) stops only the writer, which gives up after
//! `keepalive-timeout-secs`; the reader sees the writer end and declares the link dead, so the
//! seat goes into the rejoin window and the peers are told `peer_reconnecting`. The join
//! deadline keeps running in the reader meanwhile.
//!
//! Keepalive is one timer per link, in the writer ([`Keepalive`]): every
//! `keepalive-interval-secs` it declares the link dead if nothing was heard for longer than
//! `keepalive-timeout-secs`, and pings it only if nothing was heard since the previous tick. A
//! live idle link then answers a ping every second tick instead of every tick, and a link whose
//! client talks (client-core pings every 5 s) is pinged less still; detection is unchanged (the
//! same check, as often). The reader only stamps when it last heard a frame. Measured with
//! `cargo xtask bench-signaling` (idle CPU while holding 19,800 links): see ARCHITECTURE.md.
//!
//! A sender over its budget (see [`crate::limits::Budget`]) is throttled: the reader holds its
//! frame and stops reading until the budget allows it, so TCP pushes back on the sender and no
//! one else waits. After `throttled-messages-before-close` throttled messages it is closed with
//! [`close_code::FLOODING`]. An honest client's burst (200 pipelined pings) fits the burst.

use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket};
use bedside_protocol::{
    ClientMessage, DecodeError, ErrorCode, JoinAuth, MAX_MESSAGE_BYTES, PROTOCOL_VERSION,
    ServerMessage, close_code,
};
use futures_util::stream::SplitSink;
use futures_util::{SinkExt, StreamExt};
use tokio::sync::mpsc;
use tokio::time::{Instant, MissedTickBehavior, interval_at, sleep, sleep_until, timeout};

use crate::AppState;
use crate::auth::{self, TokenKind, invite};
use crate::hub::{ConnHandle, Outbound, Seated};
use crate::limits::Budget;
use crate::metrics::ResultLabel;
use crate::store::{AuditEvent, AuditKind, JoinTokenId, Store};
use bedside_protocol::{ConsultationId, ParticipantId};

/// Why the read loop ended.
enum End {
    /// The link went away without `leave`: hold the seat.
    Dropped,
    /// The participant left, was denied, replaced, or the consultation ended: nothing to hold.
    Done,
}

/// Why the writer stopped.
enum WriterEnd {
    /// It sent a close frame with this code.
    Closed(u16),
    /// A write failed, passed its deadline, or the queue overflowed: the link is dead.
    Dead,
}

struct Conn {
    state: Arc<AppState>,
    handle: ConnHandle,
    peer_ip: IpAddr,
    seated: Option<Seated>,
    /// A fleet node: the home node this link's frames are relayed to (see `cluster`).
    relay: Option<String>,
    /// A fleet node: this is the home's side of a link another node relays, so it never
    /// relays again.
    remote: bool,
}

/// Why a join token whose holder left is refused.
const SPENT: &str =
    "this join token was used by someone who has left; ask the clinic for a new one";

/// Longest display name kept (characters); longer ones are cut, not refused.
const MAX_DISPLAY_NAME: usize = 80;

pub async fn serve(state: Arc<AppState>, socket: WebSocket, peer_ip: IpAddr) {
    let (handle, outbound, overflowed) = state.hub.new_conn();
    state.metrics.connections.inc();
    let mut conn = Conn {
        state: state.clone(),
        handle,
        peer_ip,
        seated: None,
        relay: None,
        remote: false,
    };
    let keepalive = Duration::from_secs(state.config.keepalive_interval_secs);
    let dead_after = Duration::from_secs(state.config.keepalive_timeout_secs);
    let (sink, mut stream) = socket.split();
    let (ctl, ctl_rx) = mpsc::channel(1);
    let heard = Arc::new(Heard::new());
    let mut writer = tokio::spawn(write_loop(
        sink,
        outbound,
        ctl_rx,
        overflowed,
        state.store.clone(),
        Keepalive::new(keepalive, dead_after, heard.clone()),
    ));
    let mut writer_done = false;
    let join_deadline = sleep(Duration::from_secs(state.config.join_timeout_secs));
    tokio::pin!(join_deadline);
    let budget = Budget::new(&state.config.limits);
    let mut throttled: u32 = 0;
    // A frame read while over budget, and when to charge it again.
    let mut held: Option<(Utf8Bytes, Instant)> = None;
    let close_after = state.config.limits.throttled_messages_before_close;

    // What to do with a frame the budget let through; `Some` ends the connection.
    let end = loop {
        let text = tokio::select! {
            w = &mut writer => {
                writer_done = true;
                break match w {
                    Ok(WriterEnd::Closed(code)) if code != close_code::GOING_AWAY => End::Done,
                    _ => End::Dropped,
                };
            }
            _ = sleep_until(held.as_ref().map_or_else(Instant::now, |h| h.1)), if held.is_some() => {
                let (text, _) = held.take().expect("guarded");
                match budget.charge(text.len()) {
                    None => text,
                    Some(wait) => {
                        held = Some((text, Instant::now() + wait));
                        continue;
                    }
                }
            }
            frame = stream.next(), if held.is_none() => {
                heard.stamp();
                let text = match frame {
                    Some(Ok(Message::Text(text))) => text,
                    Some(Ok(Message::Binary(b))) => {
                        if budget.charge(b.len()).is_some() {
                            throttled += 1;
                        }
                        conn.reply_error(
                            ErrorCode::MalformedMessage,
                            "binary frames are not part of the protocol; send JSON text",
                            None,
                        )
                        .await;
                        continue;
                    }
                    Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                    Some(Ok(Message::Close(_))) | None => break End::Dropped,
                    Some(Err(err)) => {
                        if is_capacity_error(&err) {
                            let _ = ctl.try_send((close_code::MESSAGE_TOO_BIG, "message too large"));
                        }
                        break End::Dropped;
                    }
                };
                if text.len() > MAX_MESSAGE_BYTES {
                    let _ = ctl.try_send((close_code::MESSAGE_TOO_BIG, "message too large"));
                    break End::Dropped;
                }
                match budget.charge(text.len()) {
                    None => text,
                    Some(wait) => {
                        throttled += 1;
                        state.metrics.limit("inbound_budget");
                        if throttled > close_after {
                            tracing::info!("sender over its inbound budget: closed");
                            state.metrics.limit("inbound_budget_closed");
                            let _ = ctl.try_send((close_code::FLOODING, "over the message budget"));
                            break End::Dropped;
                        }
                        held = Some((text, Instant::now() + wait));
                        continue;
                    }
                }
            }
            _ = &mut join_deadline, if conn.seated.is_none() && conn.relay.is_none() => {
                let _ = ctl.try_send((close_code::JOIN_TIMEOUT, "no join in time"));
                break End::Done;
            }
        };
        if let Some(end) = conn.on_text(&text).await {
            let _ = ctl.try_send((close_code::NORMAL, "left"));
            break end;
        }
    };
    if let (End::Dropped, Some(seated)) = (&end, &conn.seated) {
        state.hub.disconnected(seated, conn.handle.id);
        note(&state, seated, crate::telemetry::Change::LinkDropped);
    }
    if let (Some(home), Some(cluster)) = (&conn.relay, &state.cluster) {
        cluster
            .relay_end(conn.handle.id, home, matches!(end, End::Dropped))
            .await;
    }
    if !writer_done {
        // Let the writer send what it was asked to (a close frame), within its deadline.
        drop(ctl);
        if timeout(dead_after, &mut writer).await.is_err() {
            writer.abort();
        }
    }
    state.metrics.connections.dec();
}

/// When the reader last heard a frame, in microseconds since the link opened: written by the
/// reader, read by the writer's keepalive tick.
struct Heard {
    opened: Instant,
    micros: AtomicU64,
}

impl Heard {
    fn new() -> Self {
        Heard {
            opened: Instant::now(),
            micros: AtomicU64::new(0),
        }
    }

    fn stamp(&self) {
        let now = self.opened.elapsed().as_micros() as u64;
        // At least 1, so that a frame heard in the first microsecond still differs from "never".
        self.micros.store(now.max(1), Ordering::Relaxed);
    }

    fn load(&self) -> u64 {
        self.micros.load(Ordering::Relaxed)
    }
}

/// What the writer does at each keepalive tick.
#[derive(Debug, PartialEq, Eq)]
enum Tick {
    /// Nothing heard for longer than the timeout: the link is dead.
    Dead,
    /// Silent since the previous tick: ask for a pong.
    Ping,
    /// Heard since the previous tick: the link is alive, no ping needed.
    Skip,
}

/// The keepalive of one link: a tick every `interval`; dead after `dead_after` of silence.
///
/// A ping is skipped when a frame was heard since the previous tick (the pong to the last ping
/// counts). That is safe only while a live link's longest silence, about two intervals plus a
/// round trip, stays well under the timeout: with `keepalive-timeout-secs` under three intervals
/// every tick pings, as before.
struct Keepalive {
    interval: Duration,
    dead_after: Duration,
    heard: Arc<Heard>,
    /// What `heard` said at the previous tick.
    seen: u64,
    adaptive: bool,
}

impl Keepalive {
    fn new(interval: Duration, dead_after: Duration, heard: Arc<Heard>) -> Self {
        Keepalive {
            interval,
            dead_after,
            heard,
            seen: 0,
            adaptive: dead_after >= interval * 3,
        }
    }

    /// Decides a tick at `since_open` (time since the link opened).
    fn tick(&mut self, since_open: Duration) -> Tick {
        let heard = self.heard.load();
        let silent = since_open.saturating_sub(Duration::from_micros(heard));
        if silent > self.dead_after {
            return Tick::Dead;
        }
        let fresh = heard != self.seen;
        self.seen = heard;
        if self.adaptive && fresh {
            Tick::Skip
        } else {
            Tick::Ping
        }
    }
}

/// Writes queued messages, control frames and pings; every write has `deadline`.
///
/// `joined` (a join or a resume) goes out only once the store has committed what was queued
/// before it: the seat and its new resume token. A server killed right after a client read its
/// resume token gives the seat back to that token when it starts again. The store batches
/// these commits, so a join storm costs one commit per batch, not one per join.
async fn write_loop(
    mut sink: SplitSink<WebSocket, Message>,
    mut outbound: mpsc::Receiver<Outbound>,
    mut ctl: mpsc::Receiver<(u16, &'static str)>,
    overflowed: Arc<AtomicBool>,
    store: Store,
    mut keepalive: Keepalive,
) -> WriterEnd {
    let deadline = keepalive.dead_after;
    let mut ping = interval_at(Instant::now() + keepalive.interval, keepalive.interval);
    ping.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        let frame = tokio::select! {
            biased;
            c = ctl.recv() => match c {
                Some((code, reason)) => return close(&mut sink, code, reason, deadline).await,
                // The reader is done and asked for nothing more.
                None => return WriterEnd::Dead,
            },
            out = outbound.recv() => match out {
                Some(Outbound::Message(msg)) => {
                    if matches!(msg, ServerMessage::Joined { .. })
                        && !matches!(timeout(deadline, store.flush_audit()).await, Ok(Ok(())))
                    {
                        tracing::error!("store write failed before joined");
                    }
                    Message::Text(msg.encode().into())
                }
                Some(Outbound::Close(code, reason)) => {
                    return close(&mut sink, code, reason, deadline).await;
                }
                None => return WriterEnd::Dead,
            },
            _ = ping.tick() => match keepalive.tick(keepalive.heard.opened.elapsed()) {
                Tick::Dead => {
                    tracing::debug!("keepalive timeout");
                    return WriterEnd::Dead;
                }
                Tick::Ping => Message::Ping(Default::default()),
                Tick::Skip => continue,
            },
        };
        match timeout(deadline, sink.send(frame)).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) => return WriterEnd::Dead,
            Err(_) => {
                tracing::info!("write deadline passed: link declared dead");
                return WriterEnd::Dead;
            }
        }
        if overflowed.load(Ordering::Relaxed) {
            close(
                &mut sink,
                close_code::SLOW_CONSUMER,
                "too slow to read",
                deadline,
            )
            .await;
            return WriterEnd::Dead;
        }
    }
}

async fn close(
    sink: &mut SplitSink<WebSocket, Message>,
    code: u16,
    reason: &'static str,
    deadline: Duration,
) -> WriterEnd {
    let frame = Message::Close(Some(CloseFrame {
        code,
        reason: Utf8Bytes::from_static(reason),
    }));
    let _ = timeout(deadline, sink.send(frame)).await;
    WriterEnd::Closed(code)
}

/// Puts a change the server saw on the consultation's telemetry timeline.
fn note(state: &AppState, seated: &Seated, change: crate::telemetry::Change) {
    state.telemetry.note(
        &seated.consultation_id,
        &seated.participant_id,
        seated.role,
        crate::telemetry::now_ms(),
        change,
    );
}

fn is_capacity_error(err: &axum::Error) -> bool {
    let inner = std::error::Error::source(err);
    inner
        .and_then(|e| e.downcast_ref::<tungstenite::Error>())
        .is_some_and(|e| matches!(e, tungstenite::Error::Capacity(_)))
}

impl Conn {
    /// Replies go through the same queue as everything the hub sends, so order is kept. A
    /// reply waits for room in the queue: a client that pipelines requests is slowed to the
    /// pace it reads its answers at, never closed for it (a client that stops reading is caught
    /// by the writer's deadline, which also ends this wait).
    async fn reply(&self, msg: ServerMessage) {
        self.handle.send_own(&self.state.metrics, msg).await;
    }

    async fn reply_error(&self, code: ErrorCode, message: &str, in_reply_to: Option<&str>) {
        self.state.metrics.error(code);
        self.reply(ServerMessage::error(code, message, in_reply_to))
            .await;
    }

    /// Handles one text frame; `Some` ends the connection.
    async fn on_text(&mut self, text: &str) -> Option<End> {
        if let (Some(home), Some(cluster)) = (&self.relay, &self.state.cluster) {
            if !cluster.relay_frame(self.handle.id, home, text).await {
                self.handle
                    .close(close_code::GOING_AWAY, "the consultation's node is gone");
            }
            return None;
        }
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
                self.reply_error(err.code(), &message, err.message_type())
                    .await;
                return None;
            }
        };
        let ty = msg.type_name();
        self.state.metrics.message("in", ty);
        if self.seated.is_none()
            && self.state.cluster.is_some()
            && matches!(
                msg,
                ClientMessage::Join { .. } | ClientMessage::Resume { .. }
            )
            && (self.redirected(&msg).await || self.routed_elsewhere(&msg, text).await)
        {
            return None;
        }
        let result = match (&self.seated, msg) {
            (_, ClientMessage::Ping { nonce }) => {
                self.reply(ServerMessage::Pong { nonce }).await;
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
                return self.seated_message(&seated, msg).await;
            }
        };
        if let Err((code, message)) = result {
            self.reply_error(code, message, Some(ty)).await;
        }
        None
    }

    async fn seated_message(&mut self, seated: &Seated, msg: ClientMessage) -> Option<End> {
        let ty = msg.type_name();
        let hub = &self.state.hub;
        let from = seated.participant_id.clone();
        let result = match msg {
            ClientMessage::Admit { participant_id } => self.admit(seated, &participant_id).await,
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
            // Opaque to the server: commitments, public keys and sealed media keys.
            ClientMessage::E2ee { to, message } => {
                hub.relay(seated, &to, ServerMessage::E2ee { from, message })
            }
            ClientMessage::RefreshIceServers => match hub.admitted_ice_servers(seated) {
                Ok(ice_servers) => {
                    self.reply(ServerMessage::IceServers { ice_servers }).await;
                    Ok(())
                }
                Err(code) => Err(code),
            },
            ClientMessage::Stats { report } => {
                if let Some(rtt) = report.rtt_ms.filter(|r| r.is_finite() && *r >= 0.0) {
                    self.state.metrics.stats_rtt_seconds.observe(rtt / 1000.0);
                }
                self.state.telemetry.record(
                    &seated.consultation_id,
                    &seated.participant_id,
                    seated.role,
                    crate::telemetry::now_ms(),
                    &report,
                );
                Ok(())
            }
            ClientMessage::Leave => {
                hub.leave(seated, self.handle.id);
                // The seat's release (and its join token's spending) is durable before the
                // close tells the client it is done.
                if let Err(e) = self.state.store.flush_audit().await {
                    tracing::error!(error = %e, "store write failed");
                }
                return Some(End::Done);
            }
            ClientMessage::SfuOffer { sdp } => self.sfu_offer(seated, sdp).await,
            ClientMessage::SfuCandidate { candidate } => {
                hub.sfu_allowed(seated).and_then(|()| match hub.sfu() {
                    Some(sfu) => {
                        sfu.add_candidate(
                            &seated.consultation_id.0,
                            &seated.participant_id.0,
                            candidate.candidate,
                        );
                        Ok(())
                    }
                    None => Err(ErrorCode::OutOfOrder),
                })
            }
            ClientMessage::SfuLeave => {
                if let Some(sfu) = hub.sfu() {
                    sfu.leave(&seated.consultation_id.0, &seated.participant_id.0);
                }
                Ok(())
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
                ErrorCode::OutOfOrder => "not possible now (or this server runs no SFU)",
                _ => "the request could not be carried out",
            };
            self.reply_error(code, message, Some(ty)).await;
        }
        None
    }

    /// Hands an offer to the SFU and replies with its answer.
    async fn sfu_offer(&self, seated: &Seated, sdp: String) -> Result<(), ErrorCode> {
        let hub = &self.state.hub;
        hub.sfu_allowed(seated)?;
        let sfu = hub.sfu().ok_or(ErrorCode::OutOfOrder)?;
        match sfu
            .connect(&seated.consultation_id.0, &seated.participant_id.0, sdp)
            .await
        {
            Ok(sdp) => {
                self.reply(ServerMessage::SfuAnswer { sdp }).await;
                Ok(())
            }
            Err(e) => {
                // The error names what was wrong, never the SDP itself.
                tracing::warn!(consultation = %seated.consultation_id, participant = %seated.participant_id, error = e.kind(), "sfu offer refused");
                Err(ErrorCode::MalformedMessage)
            }
        }
    }

    /// Admits a waiting patient, durably: the admission is in the store (committed) before the
    /// patient or anyone else is told, so a crash right after `admitted` cannot undo it.
    async fn admit(&self, by: &Seated, target: &ParticipantId) -> Result<(), ErrorCode> {
        let state = &self.state;
        let role = state.hub.admission_check(by, target)?;
        if let Some(cluster) = &state.cluster
            && let Err(e) = cluster.persist_admission(&by.consultation_id, target).await
        {
            tracing::error!(error = %e, "redis write failed");
            return Err(ErrorCode::Internal);
        }
        state.store.seat_admitted(target);
        state.store.audit(
            AuditEvent::new(&by.consultation_id, AuditKind::Admitted)
                .participant(target, role)
                .actor(&by.participant_id),
        );
        if let Err(e) = state.store.flush_audit().await {
            tracing::error!(error = %e, "store write failed");
            return Err(ErrorCode::Internal);
        }
        state.hub.admit_or_deny(by, target, true)
    }

    /// A fleet node, before a join or resume: the consultation's id, from the token's claims
    /// or the invite code's record (`None` when neither says: the normal path then answers).
    async fn consultation_of(&self, msg: &ClientMessage) -> Option<ConsultationId> {
        let tokens = &self.state.tokens;
        match msg {
            ClientMessage::Resume { resume_token, .. } => tokens
                .verify(resume_token, TokenKind::Resume)
                .ok()
                .map(|c| c.cid),
            ClientMessage::Join {
                auth: JoinAuth::Token { token },
                ..
            } => tokens.verify(token, TokenKind::Join).ok().map(|c| c.cid),
            ClientMessage::Join {
                auth: JoinAuth::InviteCode { code },
                ..
            } => {
                let hash = invite::hash(&self.normalize_invite(code)?);
                self.state
                    .store
                    .redeem_invite(hash, auth::unix_now())
                    .await
                    .ok()
                    .flatten()
            }
            _ => None,
        }
    }

    /// A fleet with a region map, before a join or resume: true if its token or invite code
    /// belongs to another region. The client is told `redirect` (that region's signaling URL),
    /// then, for clients that do not know that message, an error naming the region; then the
    /// link is closed. Nothing is looked up or spent here: the home region checks the rest.
    async fn redirected(&mut self, msg: &ClientMessage) -> bool {
        let Some(cluster) = self.state.cluster.clone() else {
            return false;
        };
        let regions = cluster.regions();
        let Some(region) = regions.elsewhere(msg, &self.state.tokens) else {
            return false;
        };
        let Some(redirect) = regions.redirect(region) else {
            return false;
        };
        cluster.redirected();
        tracing::info!(region, "join sent to the consultation's region");
        let message = format!(
            "this consultation belongs to the fleet's region {region:?}: connect to {}",
            match &redirect {
                ServerMessage::Redirect { url, .. } => url.as_str(),
                _ => "",
            }
        );
        self.reply(redirect).await;
        self.reply_error(
            ErrorCode::ConsultationNotFound,
            &message,
            Some(msg.type_name()),
        )
        .await;
        self.handle.close(
            close_code::NORMAL,
            "redirected to the consultation's region",
        );
        true
    }

    /// The canonical form of a typed invite code (in a fleet with a region map, its region
    /// tag kept in front).
    fn normalize_invite(&self, typed: &str) -> Option<String> {
        match &self.state.cluster {
            Some(cluster) => cluster.regions().normalize_invite(typed),
            None => invite::normalize(typed),
        }
    }

    /// A fleet node, before a join or resume: true if another node homes the consultation and
    /// this link now relays there (or was closed so its client tries again: a home's own
    /// relayed link is never relayed on, and a home that is gone is not waited for).
    async fn routed_elsewhere(&mut self, msg: &ClientMessage, text: &str) -> bool {
        let Some(cluster) = self.state.cluster.clone() else {
            return false;
        };
        let Some(cid) = self.consultation_of(msg).await else {
            return false;
        };
        let home = match cluster.home_of(&cid).await {
            Ok(crate::cluster::Home::Here) => return false,
            Ok(crate::cluster::Home::There(node)) => node,
            Err(e) => {
                tracing::warn!(error = %e, "redis: cannot tell the consultation's node");
                self.reply_error(
                    ErrorCode::Internal,
                    "the fleet cannot reach its shared state; try again",
                    Some(msg.type_name()),
                )
                .await;
                return true;
            }
        };
        if self.remote
            || !cluster
                .open_relay(&self.handle, &home, self.peer_ip, text)
                .await
        {
            self.handle
                .close(close_code::GOING_AWAY, "the consultation moved; try again");
        } else {
            self.state.metrics.cluster_relayed_links.inc();
            self.relay = Some(home);
        }
        true
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
        let (cid, role, invite_hash, token_id) = match auth {
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
                // Spent before a restart (its holder left): the hub's own map covers the rest.
                match state.store.is_join_token_spent(&claims.sub).await {
                    Ok(false) => {}
                    Ok(true) => {
                        state.metrics.limit("join_token_spent");
                        return Err((ErrorCode::InvalidToken, SPENT));
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "store lookup failed");
                        return Err((ErrorCode::Internal, "try again"));
                    }
                }
                let token = JoinTokenId {
                    id: claims.sub,
                    expires_at: claims.exp,
                };
                (claims.cid, claims.role, None, Some(token))
            }
            JoinAuth::InviteCode { code } => {
                // Only wrong codes spend the source's budget (see `limits::FailureBudget`).
                let source = crate::limits::source_key(self.peer_ip);
                if state
                    .invite_limiter
                    .blocked(&source, std::time::Instant::now())
                {
                    state.metrics.limit("invite_attempts");
                    return Err((
                        ErrorCode::RateLimited,
                        "too many invite code attempts; wait a minute",
                    ));
                }
                let Some(code) = self.normalize_invite(&code) else {
                    return Err((ErrorCode::InvalidInviteCode, "that is not an invite code"));
                };
                let hash = invite::hash(&code);
                match state.store.redeem_invite(hash, auth::unix_now()).await {
                    Ok(Some(cid)) => (cid, bedside_protocol::Role::Patient, Some(hash), None),
                    Ok(None) => {
                        state.invite_limiter.fail(source, std::time::Instant::now());
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
            .map(|n| clean_display_name(&n))
            .filter(|n| !n.is_empty());
        let seated = state
            .hub
            .join(&cid, role, display_name, &self.handle, invite_hash, token_id)
            .map_err(|code| match code {
                ErrorCode::AlreadyJoined => (
                    code,
                    "this join token already holds a seat; resume that seat, or ask for a new token",
                ),
                ErrorCode::InvalidToken => (code, SPENT),
                _ => (code, "the consultation has no free seat"),
            })?;
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
        // Throttled per seat and per source before anything is looked up, audited or told.
        let source = crate::limits::source_key(self.peer_ip);
        if state.resume_limiter.check_key(&claims.sub).is_err()
            || state.resume_source_limiter.check_key(&source).is_err()
        {
            state.metrics.limit("resumes");
            return Err((
                ErrorCode::RateLimited,
                "too many resumes; wait a few seconds",
            ));
        }
        let pid = bedside_protocol::ParticipantId(claims.sub);
        if !state.hub.has_seat(&claims.cid, &pid)
            && let Some(cluster) = &state.cluster
        {
            // A fleet node taking over a consultation (its home is gone): the mirror has it.
            match cluster.seats(&claims.cid).await {
                Ok(seats) if seats.iter().any(|s| s.participant_id == pid) => {
                    state.hub.restore(&claims.cid, seats);
                }
                Ok(_) => {}
                Err(e) => tracing::error!(error = %e, "redis lookup failed"),
            }
        } else if !state.hub.has_seat(&claims.cid, &pid) {
            // Not live here: after a restart, the seat may be in the store.
            match state.store.seats(claims.cid.clone()).await {
                Ok(seats) if seats.iter().any(|s| s.participant_id == pid) => {
                    state.hub.restore(&claims.cid, seats);
                }
                Ok(_) => {}
                Err(e) => tracing::error!(error = %e, "store lookup failed"),
            }
        }
        match state.hub.resume(&claims.cid, &pid, &self.handle, token) {
            Ok(seated) => {
                note(state, &seated, crate::telemetry::Change::Resumed);
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

/// A display name as kept: control and format characters (bidi overrides and isolates,
/// zero-width characters, the BOM) removed, whitespace runs folded to one space, trimmed, and
/// cut at [`MAX_DISPLAY_NAME`] characters. Hand-written: no crate in the workspace has the
/// Unicode general category, and the format characters that can disguise a name are few.
pub fn clean_display_name(name: &str) -> String {
    let is_format = |c: char| {
        matches!(c,
            '\u{00AD}' | '\u{061C}' | '\u{180E}' | '\u{200B}'..='\u{200F}' | '\u{202A}'..='\u{202E}'
            | '\u{2060}'..='\u{2064}' | '\u{2066}'..='\u{206F}' | '\u{FEFF}' | '\u{FFF9}'..='\u{FFFB}'
            | '\u{E0000}'..='\u{E007F}')
    };
    let mut out = String::new();
    let mut space = false;
    for c in name.chars() {
        if c.is_whitespace() {
            space = !out.is_empty();
            continue;
        }
        if c.is_control() || is_format(c) {
            continue;
        }
        if space {
            out.push(' ');
            space = false;
        }
        out.push(c);
    }
    out.chars().take(MAX_DISPLAY_NAME).collect()
}

/// A fleet node: the home's side of a link that another node (`edge`) relays (see `cluster`).
/// Frames arrive on `frames`; whatever the hub queues for the link is published back to the
/// edge, which keeps the transport (budget, keepalive, frame size). The sender being dropped
/// (the edge said the link ended, or the edge node is gone) is a dropped link: the seat is held.
pub async fn serve_remote(
    state: Arc<AppState>,
    cluster: Arc<crate::cluster::Cluster>,
    edge: String,
    edge_conn: u64,
    peer_ip: IpAddr,
    mut frames: mpsc::Receiver<crate::cluster::Inbound>,
) {
    use crate::cluster::{Envelope, Inbound};
    let (handle, mut outbound, overflowed) = state.hub.new_conn();
    let mut conn = Conn {
        state: state.clone(),
        handle,
        peer_ip,
        seated: None,
        relay: None,
        remote: true,
    };
    let publisher = {
        let (cluster, edge) = (cluster.clone(), edge.clone());
        tokio::spawn(async move {
            while let Some(out) = outbound.recv().await {
                let (env, code) = match out {
                    Outbound::Message(msg) => (
                        Envelope::Out {
                            conn: edge_conn,
                            text: msg.encode(),
                        },
                        None,
                    ),
                    Outbound::Close(code, _) => (
                        Envelope::Close {
                            conn: edge_conn,
                            code,
                        },
                        Some(code),
                    ),
                };
                cluster.to_edge(&edge, env).await;
                let code = code.or_else(|| {
                    overflowed
                        .load(Ordering::Relaxed)
                        .then_some(close_code::SLOW_CONSUMER)
                });
                if let Some(code) = code {
                    if code == close_code::SLOW_CONSUMER {
                        let env = Envelope::Close {
                            conn: edge_conn,
                            code,
                        };
                        cluster.to_edge(&edge, env).await;
                    }
                    return code;
                }
            }
            close_code::GOING_AWAY
        })
    };
    tokio::pin!(publisher);
    let join_deadline = sleep(Duration::from_secs(state.config.join_timeout_secs));
    tokio::pin!(join_deadline);
    let mut published_all = false;
    let end = loop {
        tokio::select! {
            code = &mut publisher, if !published_all => {
                published_all = true;
                break match code {
                    Ok(code) if code != close_code::GOING_AWAY && code != close_code::SLOW_CONSUMER => End::Done,
                    _ => End::Dropped,
                };
            }
            frame = frames.recv() => match frame {
                Some(Inbound::Frame(text)) => {
                    if let Some(end) = conn.on_text(&text).await {
                        conn.handle.close(close_code::NORMAL, "left");
                        break end;
                    }
                }
                None => break End::Dropped,
            },
            _ = &mut join_deadline, if conn.seated.is_none() => {
                conn.handle.close(close_code::JOIN_TIMEOUT, "no join in time");
                break End::Done;
            }
        }
    };
    if let (End::Dropped, Some(seated)) = (&end, &conn.seated) {
        state.hub.disconnected(seated, conn.handle.id);
        note(&state, seated, crate::telemetry::Change::LinkDropped);
    }
    cluster.remote_done(&edge, edge_conn);
    drop(conn);
    // Let the publisher deliver what it was given (a close), then stop it.
    if !published_all
        && timeout(Duration::from_secs(2), &mut publisher)
            .await
            .is_err()
    {
        publisher.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::{Heard, Keepalive, Tick, clean_display_name};
    use std::sync::Arc;
    use std::sync::atomic::Ordering;
    use std::time::Duration;

    fn secs(s: f64) -> Duration {
        Duration::from_secs_f64(s)
    }

    /// Sets when the reader last heard a frame.
    fn heard_at(heard: &Heard, at: f64) {
        heard
            .micros
            .store(secs(at).as_micros() as u64, Ordering::Relaxed);
    }

    #[test]
    fn a_live_idle_link_is_pinged_every_second_tick_and_never_declared_dead() {
        let heard = Arc::new(Heard::new());
        let mut k = Keepalive::new(secs(2.0), secs(6.0), heard.clone());
        let mut pings = 0;
        for n in 1..=30 {
            let t = 2.0 * n as f64;
            let tick = k.tick(secs(t));
            assert_ne!(tick, Tick::Dead, "at {t} s");
            if tick == Tick::Ping {
                pings += 1;
                // The pong comes back a millisecond later.
                heard_at(&heard, t + 0.001);
            }
        }
        assert_eq!(pings, 15);
    }

    #[test]
    fn a_link_that_goes_silent_is_dead_at_the_same_tick_as_with_a_ping_every_tick() {
        // Last heard at 1.0 s: the first tick with more than 6 s of silence is at 8 s.
        for adaptive in [true, false] {
            let heard = Arc::new(Heard::new());
            heard_at(&heard, 1.0);
            let mut k = Keepalive::new(secs(2.0), secs(6.0), heard);
            k.adaptive = adaptive;
            let ticks: Vec<Tick> = (1..=4).map(|n| k.tick(secs(2.0 * n as f64))).collect();
            assert_eq!(ticks[3], Tick::Dead, "adaptive {adaptive}: {ticks:?}");
            assert!(!ticks[..3].contains(&Tick::Dead), "{ticks:?}");
            // A silent link is still asked for a pong before it is declared dead.
            assert!(ticks[..3].contains(&Tick::Ping), "{ticks:?}");
        }
    }

    #[test]
    fn a_short_timeout_pings_every_tick() {
        let heard = Arc::new(Heard::new());
        let mut k = Keepalive::new(secs(1.0), secs(2.0), heard.clone());
        for n in 1..=10 {
            let t = n as f64;
            assert_eq!(k.tick(secs(t)), Tick::Ping, "at {t} s");
            heard_at(&heard, t + 0.001);
        }
    }

    #[test]
    fn display_names_lose_bidi_zero_width_and_control_characters() {
        assert_eq!(clean_display_name("  Ana \t Souza "), "Ana Souza");
        assert_eq!(clean_display_name("Dr\u{202E}gnuoY"), "DrgnuoY");
        assert_eq!(clean_display_name("A\u{200B}n\u{FEFF}a\u{0007}"), "Ana");
        assert_eq!(clean_display_name("\u{2066}\u{2069}"), "");
        assert_eq!(clean_display_name(&"x".repeat(200)).chars().count(), 80);
    }
}
