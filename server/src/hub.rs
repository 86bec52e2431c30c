//! The live state of every consultation: seats, the waiting room, who may signal whom, and the
//! rejoin window.
//!
//! One [`Room`] per consultation, behind its own lock, in a map of rooms. Lock order is always
//! map, then room; nothing awaits while holding either. Messages to participants are queued with
//! `try_send` on each connection's bounded channel, so a slow reader never stalls a room: it is
//! disconnected instead (and can resume its seat). Relayed messages (offers, answers, candidates
//! from another participant) may only fill the queue up to [`RELAY_RESERVE`] free slots: past
//! that the relay is refused to the *sender* (`rate_limited`), so a flooding participant cannot
//! make the hub close its victim. Waiting-room updates are coalesced (at most one per
//! `waiting-room-interval-ms` per consultation), so a storm of joins, drops and resumes costs
//! the doctor a handful of messages.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, Weak};
use std::time::{Duration, Instant};

use bedside_protocol::{
    ConsultationId, ErrorCode, IceServer, LeaveReason, PROTOCOL_VERSION, ParticipantId, Peer, Role,
    ServerMessage, WaitingPatient, close_code,
};
use tokio::sync::mpsc;

use crate::auth::{self, Tokens};
use crate::config::IceConfig;
use crate::limits::LimitsConfig;
use crate::metrics::{
    Metrics, OUTCOME_ADMITTED, OUTCOME_DENIED, OUTCOME_LEFT, ResultLabel, RoleLabel,
};
use crate::store::{AuditEvent, AuditKind, JoinTokenId, SeatRow, Store};

/// Where a fleet node keeps a copy of its seats, so another node can take its consultations
/// over (`cluster::Cluster`, in Redis). Calls must not block: they queue.
pub trait SeatMirror: Send + Sync {
    fn put(&self, cid: &ConsultationId, pid: &ParticipantId, seat: MirroredSeat);
    fn remove(&self, cid: &ConsultationId, pid: &ParticipantId);
    /// The room left this hub (its last seat was released).
    fn room_gone(&self, cid: &ConsultationId);
    /// The consultation ended: its seats are gone with it.
    fn ended(&self, cid: &ConsultationId);
}

/// A fleet region's relays in the order the next participant gets them, least loaded first
/// (`cluster::Cluster`, from the loads its nodes publish). Must not block: it reads a cache.
pub trait RelayChoice: Send + Sync {
    /// Each relay's STUN/TURN URLs; `None`: no region map, the node's own `[ice]` servers.
    fn relays(&self) -> Option<Vec<Vec<String>>>;
}

/// A seat as mirrored: what a restore needs, nothing about the person.
pub struct MirroredSeat {
    pub role: Role,
    pub admitted: bool,
    pub resume_hash: Option<[u8; 32]>,
}

/// What the hub asks a connection task to do.
#[derive(Debug)]
pub enum Outbound {
    Message(ServerMessage),
    /// Send a close frame with this code and reason, then end.
    Close(u16, &'static str),
}

/// The hub's way to reach one WebSocket.
#[derive(Clone)]
pub struct ConnHandle {
    pub id: u64,
    tx: mpsc::Sender<Outbound>,
    overflowed: Arc<AtomicBool>,
}

/// Outbound messages a connection may have queued before it counts as a slow consumer.
pub const OUTBOUND_QUEUE: usize = 128;

/// Free queue slots kept for the hub's own messages (admission, peers, waiting room): relayed
/// messages are refused once fewer are left.
pub const RELAY_RESERVE: usize = 32;

impl ConnHandle {
    pub fn new(id: u64) -> (Self, mpsc::Receiver<Outbound>, Arc<AtomicBool>) {
        let (tx, rx) = mpsc::channel(OUTBOUND_QUEUE);
        let overflowed = Arc::new(AtomicBool::new(false));
        (
            ConnHandle {
                id,
                tx,
                overflowed: overflowed.clone(),
            },
            rx,
            overflowed,
        )
    }

    pub fn send(&self, metrics: &Metrics, msg: ServerMessage) {
        let ty = msg.type_name();
        match self.tx.try_send(Outbound::Message(msg)) {
            Ok(()) => metrics.message("out", ty),
            Err(mpsc::error::TrySendError::Full(_)) => {
                self.overflowed.store(true, Ordering::Relaxed)
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {}
        }
    }

    /// Queues a reply to this connection's own request, waiting for room in the queue.
    pub async fn send_own(&self, metrics: &Metrics, msg: ServerMessage) {
        let ty = msg.type_name();
        if self.tx.send(Outbound::Message(msg)).await.is_ok() {
            metrics.message("out", ty);
        }
    }

    /// Queues a message relayed from another participant, unless the queue is nearly full:
    /// false then, and nothing is queued (the victim of a flood is not closed for it).
    pub fn send_relayed(&self, metrics: &Metrics, msg: ServerMessage) -> bool {
        if self.tx.capacity() <= RELAY_RESERVE {
            metrics.limit("relay_queue_full");
            return false;
        }
        self.send(metrics, msg);
        true
    }

    pub fn close(&self, code: u16, reason: &'static str) {
        // A full queue means the task is about to find the overflow flag and close anyway.
        if self.tx.try_send(Outbound::Close(code, reason)).is_err() {
            self.overflowed.store(true, Ordering::Relaxed);
        }
    }
}

struct Seat {
    role: Role,
    display_name: Option<String>,
    admitted: bool,
    conn: Option<ConnHandle>,
    joined_at: Instant,
    /// Join order, so peers and the waiting room list in a stable order.
    seq: u64,
    /// Bumped on every disconnect and resume: a rejoin timer only fires for its own generation.
    generation: u64,
    /// The invite code (its hash) a patient came with, for the per-invite waiting cap.
    invite: Option<[u8; 32]>,
    /// The join token a doctor or clinician came with: while this seat lives, the same token
    /// seats no one else, and once its holder leaves it is spent (see [`Hub::join`]).
    token: Option<JoinTokenId>,
    /// SHA-256 of the last resume token handed out: only that one resumes the seat (every
    /// resume hands out a new one). Persisted with the seat, so a restored seat has it too
    /// (`None` only for a seat persisted by a release that did not keep it).
    resume_hash: Option<[u8; 32]>,
    /// When the link dropped, while the seat is held (for the dashboard and its alerts).
    down_since: Option<Instant>,
}

struct Room {
    id: ConsultationId,
    seats: HashMap<ParticipantId, Seat>,
    next_seq: u64,
    /// Set when the room is taken out of the map: a join that raced with that must retry.
    closed: bool,
    /// When doctors were last sent the waiting room, and whether a later change waits for the
    /// next slot.
    waiting_sent: Option<Instant>,
    waiting_pending: bool,
    created_at: Instant,
}

/// One live consultation as the dashboard sees it: ids and roles only.
#[derive(Clone, Debug)]
pub struct LiveConsultation {
    pub id: ConsultationId,
    pub age: Duration,
    pub seats: Vec<LiveSeat>,
}

/// One seat of a [`LiveConsultation`].
#[derive(Clone, Debug)]
pub struct LiveSeat {
    pub participant_id: ParticipantId,
    pub role: Role,
    pub admitted: bool,
    /// How long the link has been down, while the seat is held; `None` when connected.
    pub down_for: Option<Duration>,
}

/// What a successful join or resume tells the connection.
#[derive(Debug, Clone)]
pub struct Seated {
    pub consultation_id: ConsultationId,
    pub participant_id: ParticipantId,
    pub role: Role,
}

pub struct Hub {
    me: Weak<Hub>,
    limits: LimitsConfig,
    rooms: Mutex<HashMap<ConsultationId, Arc<Mutex<Room>>>>,
    next_conn_id: AtomicU64,
    store: Store,
    metrics: Arc<Metrics>,
    tokens: Arc<Tokens>,
    ice: IceConfig,
    rejoin_window: Duration,
    max_participants: usize,
    /// Join tokens whose holder left (id to expiry, Unix seconds). The store keeps them too, for
    /// after a restart; this map closes the moment before the store's batch is written.
    spent: Mutex<HashMap<String, u64>>,
    /// A fleet node's seat mirror (set once at start; absent for a single server).
    mirror: OnceLock<Arc<dyn SeatMirror>>,
    relay_choice: OnceLock<Arc<dyn RelayChoice>>,
    /// The in-process SFU, when it runs (set once at start).
    sfu: std::sync::OnceLock<bedside_sfu::SfuHandle>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Hub {
    pub fn new(
        store: Store,
        metrics: Arc<Metrics>,
        tokens: Arc<Tokens>,
        ice: IceConfig,
        rejoin_window: Duration,
        max_participants: usize,
        limits: &LimitsConfig,
    ) -> Arc<Self> {
        Arc::new_cyclic(|me| Hub {
            me: me.clone(),
            limits: limits.clone(),
            rooms: Mutex::new(HashMap::new()),
            next_conn_id: AtomicU64::new(1),
            store,
            metrics,
            tokens,
            ice,
            rejoin_window,
            max_participants,
            sfu: std::sync::OnceLock::new(),
            spent: Mutex::new(HashMap::new()),
            mirror: OnceLock::new(),
            relay_choice: OnceLock::new(),
        })
    }

    /// Mirrors every seat change from now on (a fleet node).
    /// Hands out a fleet region's relays (least loaded first) instead of `[ice]`'s servers.
    pub fn set_relay_choice(&self, choice: Arc<dyn RelayChoice>) {
        let _ = self.relay_choice.set(choice);
    }

    pub fn set_mirror(&self, mirror: Arc<dyn SeatMirror>) {
        let _ = self.mirror.set(mirror);
    }

    fn mirror_put(&self, r: &Room, pid: &ParticipantId) {
        if let (Some(m), Some(seat)) = (self.mirror.get(), r.seats.get(pid)) {
            m.put(
                &r.id,
                pid,
                MirroredSeat {
                    role: seat.role,
                    admitted: seat.admitted,
                    resume_hash: seat.resume_hash,
                },
            );
        }
    }

    fn mirror_remove(&self, cid: &ConsultationId, pid: &ParticipantId) {
        if let Some(m) = self.mirror.get() {
            m.remove(cid, pid);
        }
    }

    /// Writes every seat of a live room to the mirror again (after Redis came back).
    pub fn mirror_room(&self, cid: &ConsultationId) {
        if let Some(room) = self.room(cid) {
            let r = lock(&room);
            for pid in r.seats.keys() {
                self.mirror_put(&r, pid);
            }
        }
    }

    /// Whether this hub holds a live room for `cid`.
    pub fn has_room(&self, cid: &ConsultationId) -> bool {
        self.room(cid).is_some()
    }

    /// Hands the hub the SFU: admitted participants are told it exists, and seats released
    /// or consultations ended close their SFU connections.
    pub fn set_sfu(&self, sfu: bedside_sfu::SfuHandle) {
        let _ = self.sfu.set(sfu);
    }

    pub fn sfu(&self) -> Option<&bedside_sfu::SfuHandle> {
        self.sfu.get()
    }

    /// Whether `seated` may use the SFU now (its seat is admitted and live).
    pub fn sfu_allowed(&self, seated: &Seated) -> Result<(), ErrorCode> {
        let room = self
            .room(&seated.consultation_id)
            .ok_or(ErrorCode::ConsultationNotFound)?;
        let r = lock(&room);
        match r.seats.get(&seated.participant_id) {
            Some(seat) if seat.admitted => Ok(()),
            Some(_) => Err(ErrorCode::NotAdmitted),
            None => Err(ErrorCode::UnknownParticipant),
        }
    }

    /// Delivers an SFU event to the seats it concerns (one participant, or everyone admitted).
    pub fn sfu_event(&self, event: bedside_sfu::Event) {
        use bedside_protocol::SfuSlot;
        let (room_id, to, msg) = match event {
            bedside_sfu::Event::Layout {
                room,
                participant,
                slots,
            } => {
                let slots = slots
                    .into_iter()
                    .map(|s| SfuSlot {
                        participant_id: ParticipantId(s.participant),
                        audio_mid: s.audio_mid,
                        video_mid: s.video_mid,
                    })
                    .collect();
                (
                    room,
                    Some(ParticipantId(participant)),
                    ServerMessage::SfuLayout { slots },
                )
            }
            bedside_sfu::Event::ActiveSpeaker { room, participant } => (
                room,
                None,
                ServerMessage::ActiveSpeaker {
                    participant_id: participant.map(ParticipantId),
                },
            ),
            // The client sees its connection fail and restarts ICE or offers anew.
            bedside_sfu::Event::Disconnected { .. } => return,
        };
        let Some(room) = self.room(&ConsultationId(room_id)) else {
            return;
        };
        let r = lock(&room);
        self.send_to(
            &r,
            |pid, seat| seat.admitted && to.as_ref().is_none_or(|t| t == pid),
            msg,
        );
    }

    pub fn new_conn(&self) -> (ConnHandle, mpsc::Receiver<Outbound>, Arc<AtomicBool>) {
        ConnHandle::new(self.next_conn_id.fetch_add(1, Ordering::Relaxed))
    }

    fn room(&self, cid: &ConsultationId) -> Option<Arc<Mutex<Room>>> {
        lock(&self.rooms).get(cid).cloned()
    }

    fn room_or_create(&self, cid: &ConsultationId) -> Arc<Mutex<Room>> {
        let mut rooms = lock(&self.rooms);
        let room = rooms.entry(cid.clone()).or_insert_with(|| {
            Arc::new(Mutex::new(Room {
                id: cid.clone(),
                seats: HashMap::new(),
                next_seq: 0,
                closed: false,
                waiting_sent: None,
                waiting_pending: false,
                created_at: Instant::now(),
            }))
        });
        let room = room.clone();
        self.metrics.consultations_active.set(rooms.len() as i64);
        room
    }

    /// Takes an empty room out of the map.
    fn drop_room_if_empty(&self, cid: &ConsultationId) {
        let mut rooms = lock(&self.rooms);
        if let Some(room) = rooms.get(cid) {
            let mut r = lock(room);
            if r.seats.is_empty() {
                r.closed = true;
                drop(r);
                rooms.remove(cid);
                if let Some(m) = self.mirror.get() {
                    m.room_gone(cid);
                }
            }
        }
        self.metrics.consultations_active.set(rooms.len() as i64);
    }

    /// The ICE servers for one participant, with TURN credentials bound to its id and its
    /// consultation: the relay's user is `<consultation>/<participant>`, so its group quota
    /// (`turn.relay.group-quota`) bounds what one consultation holds, however many seats.
    ///
    /// In a fleet with a region map, the region's relays instead, one entry each (its STUN and
    /// TURN URLs under the same credentials), the least loaded first.
    pub fn ice_servers(&self, cid: &ConsultationId, pid: &ParticipantId) -> Vec<IceServer> {
        let credentials = || {
            auth::turn_rest_credentials(
                &self.ice.turn_secret,
                &format!("{}/{}", cid.0, pid.0),
                Duration::from_secs(self.ice.turn_credential_ttl_secs),
                auth::unix_now(),
            )
        };
        if let Some(relays) = self.relay_choice.get().and_then(|c| c.relays()) {
            let (username, credential) = credentials();
            return relays
                .into_iter()
                .map(|urls| {
                    let turn = urls.iter().any(|u| u.starts_with("turn"));
                    IceServer {
                        urls,
                        username: turn.then(|| username.clone()),
                        credential: turn.then(|| credential.clone()),
                    }
                })
                .collect();
        }
        let mut servers = Vec::new();
        if !self.ice.stun_urls.is_empty() {
            servers.push(IceServer {
                urls: self.ice.stun_urls.clone(),
                username: None,
                credential: None,
            });
        }
        if !self.ice.turn_urls.is_empty() {
            let (username, credential) = credentials();
            servers.push(IceServer {
                urls: self.ice.turn_urls.clone(),
                username: Some(username),
                credential: Some(credential),
            });
        }
        servers
    }

    /// The ICE servers for a seated participant, only once admitted: a waiting patient gets no
    /// relay credentials.
    pub fn admitted_ice_servers(&self, seated: &Seated) -> Result<Vec<IceServer>, ErrorCode> {
        let room = self
            .room(&seated.consultation_id)
            .ok_or(ErrorCode::ConsultationNotFound)?;
        let admitted = lock(&room)
            .seats
            .get(&seated.participant_id)
            .map(|s| s.admitted);
        match admitted {
            Some(true) => Ok(self.ice_servers(&seated.consultation_id, &seated.participant_id)),
            Some(false) => {
                self.metrics.limit("ice_before_admission");
                Err(ErrorCode::NotAdmitted)
            }
            None => Err(ErrorCode::UnknownParticipant),
        }
    }

    /// Seats a new participant. Doctors and clinicians are admitted at once; patients wait.
    ///
    /// Doctors and clinicians always get a seat while fewer than `max-participants` are
    /// admitted: waiting patients never count against them. Patients are held to the total,
    /// to `max-waiting` and to `max-waiting-per-invite` (`invite` is the code's hash).
    ///
    /// A join token (`token`, a doctor's or clinician's) seats one connection: while its seat
    /// lives a second join with it is `already_joined` (the holder resumes with its resume
    /// token instead), and once its holder left it is spent (`invalid_token`) until it expires.
    /// A seat released by the rejoin window leaves its token usable, so the app's full rejoin
    /// after a long outage still works within the token's lifetime.
    pub fn join(
        &self,
        cid: &ConsultationId,
        role: Role,
        display_name: Option<String>,
        conn: &ConnHandle,
        invite: Option<[u8; 32]>,
        token: Option<JoinTokenId>,
    ) -> Result<Seated, ErrorCode> {
        if let Some(t) = &token
            && lock(&self.spent).contains_key(&t.id)
        {
            self.metrics.limit("join_token_spent");
            return Err(ErrorCode::InvalidToken);
        }
        loop {
            let room = self.room_or_create(cid);
            let mut r = lock(&room);
            if r.closed {
                continue;
            }
            if let Some(t) = &token
                && r.seats
                    .values()
                    .any(|s| s.token.as_ref().is_some_and(|s| s.id == t.id))
            {
                self.metrics.limit("join_token_reused");
                return Err(ErrorCode::AlreadyJoined);
            }
            let admitted_n = r.seats.values().filter(|s| s.admitted).count();
            if role != Role::Patient {
                if admitted_n >= self.max_participants {
                    return Err(ErrorCode::ConsultationFull);
                }
            } else {
                let waiting = r.seats.values().filter(|s| !s.admitted);
                let (mut all, mut same) = (0, 0);
                for s in waiting {
                    all += 1;
                    if invite.is_some() && s.invite == invite {
                        same += 1;
                    }
                }
                if r.seats.len() >= self.max_participants
                    || all >= self.limits.max_waiting
                    || same >= self.limits.max_waiting_per_invite
                {
                    self.metrics.limit("waiting_seats");
                    return Err(ErrorCode::ConsultationFull);
                }
            }
            let pid = ParticipantId(auth::random_id("p"));
            let admitted = role != Role::Patient;
            let seq = r.next_seq;
            r.next_seq += 1;
            r.seats.insert(
                pid.clone(),
                Seat {
                    role,
                    display_name,
                    admitted,
                    conn: Some(conn.clone()),
                    joined_at: Instant::now(),
                    seq,
                    generation: 0,
                    invite,
                    token: token.clone(),
                    resume_hash: None,
                    down_since: None,
                },
            );
            self.metrics.participants_connected.inc();
            if admitted {
                // Doctors and clinicians are admitted on joining.
                self.metrics.join_admitted_seconds.observe(0.0);
            }
            self.metrics
                .joins
                .get_or_create(&RoleLabel {
                    role: role.as_str(),
                })
                .inc();
            self.store
                .audit(AuditEvent::new(cid, AuditKind::Joined).participant(&pid, role));
            self.store.seat_taken(cid, &pid, role, admitted, token);
            self.welcome(&mut r, &pid, false);
            if admitted {
                self.broadcast_admitted(&r, &pid, |seat| ServerMessage::PeerJoined {
                    peer: peer_of(&pid, seat),
                });
            } else {
                self.send_waiting_room(&mut r);
                self.start_waiting_timeout(cid.clone(), pid.clone());
            }
            tracing::info!(consultation = %cid, participant = %pid, role = role.as_str(), "joined");
            return Ok(Seated {
                consultation_id: cid.clone(),
                participant_id: pid,
                role,
            });
        }
    }

    /// Sends a (re)joined participant who it is and where it stands.
    fn welcome(&self, r: &mut Room, pid: &ParticipantId, resumed: bool) {
        let role = r.seats[pid].role;
        let resume_token = self.tokens.issue_resume(&r.id, role, pid);
        let seat = r.seats.get_mut(pid).expect("seated");
        let hash = token_hash(&resume_token);
        seat.resume_hash = Some(hash);
        // Persisted with the seat, so that after a restart only this token resumes it; the
        // connection's writer makes it durable before `joined` goes out (ws.rs).
        self.store.seat_resume_token(pid, hash);
        self.mirror_put(r, pid);
        let seat = &r.seats[pid];
        let Some(conn) = &seat.conn else { return };
        conn.send(
            &self.metrics,
            ServerMessage::Joined {
                protocol_version: PROTOCOL_VERSION,
                participant_id: pid.clone(),
                consultation_id: r.id.clone(),
                role: seat.role,
                resume_token,
                rejoin_window_secs: self.rejoin_window.as_secs(),
                resumed,
            },
        );
        if seat.admitted {
            conn.send(
                &self.metrics,
                ServerMessage::Admitted {
                    peers: peers_of(r, pid),
                    ice_servers: self.ice_servers(&r.id, pid),
                    sfu: self.sfu.get().is_some(),
                },
            );
            if seat.role.can_admit() {
                conn.send(
                    &self.metrics,
                    ServerMessage::WaitingRoom {
                        waiting: waiting_of(r),
                    },
                );
            }
        } else {
            conn.send(&self.metrics, ServerMessage::Waiting);
        }
    }

    /// Sends `msg` to every connected seat that `to` picks.
    fn send_to(&self, r: &Room, to: impl Fn(&ParticipantId, &Seat) -> bool, msg: ServerMessage) {
        for (pid, seat) in &r.seats {
            if let Some(conn) = seat.conn.as_ref().filter(|_| to(pid, seat)) {
                conn.send(&self.metrics, msg.clone());
            }
        }
    }

    /// Sends `make(subject's seat)` to every admitted seat other than the subject.
    fn broadcast_admitted(
        &self,
        r: &Room,
        subject: &ParticipantId,
        make: impl Fn(&Seat) -> ServerMessage,
    ) {
        if let Some(seat) = r.seats.get(subject) {
            self.send_to(r, |pid, s| pid != subject && s.admitted, make(seat));
        }
    }

    fn broadcast_left(&self, r: &Room, left: &ParticipantId, reason: LeaveReason) {
        let msg = ServerMessage::PeerLeft {
            participant_id: left.clone(),
            reason,
        };
        self.send_to(r, |_, s| s.admitted, msg);
    }

    /// Tells every connected doctor and clinician what the waiting room looks like now, or, if
    /// they were told less than `waiting-room-interval-ms` ago, once that interval has passed.
    fn send_waiting_room(&self, r: &mut Room) {
        let interval = Duration::from_millis(self.limits.waiting_room_interval_ms);
        let now = Instant::now();
        match r.waiting_sent {
            Some(at) if now < at + interval => {
                if !r.waiting_pending {
                    r.waiting_pending = true;
                    self.metrics.limit("waiting_room_coalesced");
                    let hub = self.me.clone();
                    let cid = r.id.clone();
                    let at = tokio::time::Instant::from_std(at + interval);
                    tokio::spawn(async move {
                        tokio::time::sleep_until(at).await;
                        let Some(hub) = hub.upgrade() else { return };
                        if let Some(room) = hub.room(&cid) {
                            let mut r = lock(&room);
                            if r.waiting_pending {
                                r.waiting_pending = false;
                                hub.send_waiting_room(&mut r);
                            }
                        }
                    });
                }
            }
            _ => {
                r.waiting_sent = Some(now);
                r.waiting_pending = false;
                let msg = ServerMessage::WaitingRoom {
                    waiting: waiting_of(r),
                };
                self.send_to(r, |_, s| s.admitted && s.role.can_admit(), msg);
            }
        }
    }

    /// Releases a patient's seat if it is still waiting after `waiting-timeout-secs`.
    fn start_waiting_timeout(&self, cid: ConsultationId, pid: ParticipantId) {
        let hub = self.me.clone();
        let after = Duration::from_secs(self.limits.waiting_timeout_secs);
        tokio::spawn(async move {
            tokio::time::sleep(after).await;
            if let Some(hub) = hub.upgrade() {
                hub.close_waiting(&cid, |p, _| *p == pid);
            }
        });
    }

    /// Takes waiting patients picked by `which` out of a consultation (their wait timed out,
    /// or their invite was revoked), closing their links with [`close_code::WAITING_CLOSED`].
    /// Returns how many.
    fn close_waiting(
        &self,
        cid: &ConsultationId,
        which: impl Fn(&ParticipantId, &Seat) -> bool,
    ) -> usize {
        let Some(room) = self.room(cid) else { return 0 };
        let became_empty = {
            let mut r = lock(&room);
            let gone: Vec<ParticipantId> = r
                .seats
                .iter()
                .filter(|(p, s)| !s.admitted && which(p, s))
                .map(|(p, _)| p.clone())
                .collect();
            if gone.is_empty() {
                return 0;
            }
            let n = gone.len();
            for pid in &gone {
                let seat = r.seats.remove(pid).expect("listed");
                self.store.seat_released(pid);
                self.mirror_remove(cid, pid);
                self.store
                    .audit(AuditEvent::new(cid, AuditKind::TimedOut).participant(pid, seat.role));
                self.metrics.seats_timed_out.inc();
                if let Some(conn) = &seat.conn {
                    self.metrics.participants_connected.dec();
                    conn.close(
                        close_code::WAITING_CLOSED,
                        "the waiting room closed for you",
                    );
                }
            }
            self.send_waiting_room(&mut r);
            tracing::info!(consultation = %cid, seats = gone.len(), "waiting seats closed");
            (n, r.seats.is_empty())
        };
        if became_empty.1 {
            self.drop_room_if_empty(cid);
        }
        became_empty.0
    }

    /// An administrator revoked the consultation's invites: the patients waiting with one
    /// leave the waiting room. Returns how many.
    pub fn revoke_invites(&self, cid: &ConsultationId) -> usize {
        self.close_waiting(cid, |_, s| s.invite.is_some())
    }

    /// Whether `by` may admit `target` now; the target's role if so.
    pub fn admission_check(&self, by: &Seated, target: &ParticipantId) -> Result<Role, ErrorCode> {
        let room = self
            .room(&by.consultation_id)
            .ok_or(ErrorCode::ConsultationNotFound)?;
        let r = lock(&room);
        self.may_admit_or_deny(&r, by, target, true)
    }

    /// Whether `by` may admit (or deny) `target` in `r`; the target's role if so.
    fn may_admit_or_deny(
        &self,
        r: &Room,
        by: &Seated,
        target: &ParticipantId,
        admit: bool,
    ) -> Result<Role, ErrorCode> {
        let admitter = r
            .seats
            .get(&by.participant_id)
            .ok_or(ErrorCode::UnknownParticipant)?;
        if !admitter.role.can_admit() {
            return Err(ErrorCode::Forbidden);
        }
        let role = match r.seats.get(target) {
            Some(seat) if !seat.admitted => seat.role,
            _ => return Err(ErrorCode::UnknownParticipant),
        };
        if admit && r.seats.values().filter(|s| s.admitted).count() >= self.max_participants {
            return Err(ErrorCode::ConsultationFull);
        }
        Ok(role)
    }

    /// Lets a waiting patient in (the caller has persisted the admission), or turns them away.
    pub fn admit_or_deny(
        &self,
        by: &Seated,
        target: &ParticipantId,
        admit: bool,
    ) -> Result<(), ErrorCode> {
        let room = self
            .room(&by.consultation_id)
            .ok_or(ErrorCode::ConsultationNotFound)?;
        let mut r = lock(&room);
        self.may_admit_or_deny(&r, by, target, admit)?;
        let cid = r.id.clone();
        if admit {
            let seat = r.seats.get_mut(target).expect("checked above");
            seat.admitted = true;
            self.mirror_put(&r, target);
            let seat = r.seats.get_mut(target).expect("checked above");
            self.metrics.admissions.inc();
            // The store already has the admission: the caller wrote it first (see
            // `ws::Conn::admit`), so what follows is only telling people.
            let waited = seat.joined_at.elapsed().as_secs_f64();
            self.metrics.join_admitted_seconds.observe(waited);
            self.metrics.waited(OUTCOME_ADMITTED, waited);
            let seat = &r.seats[target];
            if let Some(conn) = &seat.conn {
                conn.send(
                    &self.metrics,
                    ServerMessage::Admitted {
                        peers: peers_of(&r, target),
                        ice_servers: self.ice_servers(&r.id, target),
                        sfu: self.sfu.get().is_some(),
                    },
                );
            }
            self.broadcast_admitted(&r, target, |seat| ServerMessage::PeerJoined {
                peer: peer_of(target, seat),
            });
        } else {
            let seat = r.seats.remove(target).expect("checked above");
            self.metrics.denials.inc();
            self.mirror_remove(&cid, target);
            self.metrics
                .waited(OUTCOME_DENIED, seat.joined_at.elapsed().as_secs_f64());
            self.store.seat_released(target);
            if let Some(conn) = &seat.conn {
                self.metrics.participants_connected.dec();
                conn.send(&self.metrics, ServerMessage::Denied);
                conn.close(close_code::DENIED, "denied by the doctor");
            }
            self.store.audit(
                AuditEvent::new(&cid, AuditKind::Denied)
                    .participant(target, seat.role)
                    .actor(&by.participant_id),
            );
        }
        self.send_waiting_room(&mut r);
        Ok(())
    }

    /// Forwards a signaling message between two admitted participants.
    pub fn relay(
        &self,
        from: &Seated,
        to: &ParticipantId,
        msg: ServerMessage,
    ) -> Result<(), ErrorCode> {
        let room = self
            .room(&from.consultation_id)
            .ok_or(ErrorCode::ConsultationNotFound)?;
        let r = lock(&room);
        match r.seats.get(&from.participant_id) {
            Some(seat) if seat.admitted => {}
            Some(_) => return Err(ErrorCode::NotAdmitted),
            None => return Err(ErrorCode::UnknownParticipant),
        }
        match r.seats.get(to) {
            Some(seat) if seat.admitted && *to != from.participant_id => match &seat.conn {
                Some(conn) if conn.send_relayed(&self.metrics, msg) => Ok(()),
                Some(_) => Err(ErrorCode::RateLimited),
                None => Err(ErrorCode::UnknownParticipant),
            },
            _ => Err(ErrorCode::UnknownParticipant),
        }
    }

    /// The participant said `leave`: the seat is released at once.
    pub fn leave(&self, seated: &Seated, conn_id: u64) {
        self.release(seated, Some(conn_id), None, LeaveReason::Left);
    }

    fn release(
        &self,
        seated: &Seated,
        conn_id: Option<u64>,
        generation: Option<u64>,
        reason: LeaveReason,
    ) {
        let Some(room) = self.room(&seated.consultation_id) else {
            return;
        };
        let became_empty = {
            let mut r = lock(&room);
            let Some(seat) = r.seats.get(&seated.participant_id) else {
                return;
            };
            if conn_id.is_some() && seat.conn.as_ref().map(|c| c.id) != conn_id {
                return;
            }
            if generation.is_some_and(|g| seat.conn.is_some() || seat.generation != g) {
                return;
            }
            let seat = r.seats.remove(&seated.participant_id).expect("present");
            self.store.seat_released(&seated.participant_id);
            if let (LeaveReason::Left, Some(token)) = (reason, &seat.token) {
                self.spend(token);
            }
            self.mirror_remove(&seated.consultation_id, &seated.participant_id);
            if !seat.admitted {
                self.metrics
                    .waited(OUTCOME_LEFT, seat.joined_at.elapsed().as_secs_f64());
            }
            if seat.conn.is_some() {
                self.metrics.participants_connected.dec();
            }
            let kind = match reason {
                LeaveReason::TimedOut => {
                    self.metrics.seats_timed_out.inc();
                    AuditKind::TimedOut
                }
                _ => AuditKind::Left,
            };
            self.store.audit(
                AuditEvent::new(&seated.consultation_id, kind)
                    .participant(&seated.participant_id, seat.role),
            );
            if seat.admitted {
                self.broadcast_left(&r, &seated.participant_id, reason);
            } else {
                self.send_waiting_room(&mut r);
            }
            if let Some(sfu) = self.sfu.get() {
                sfu.leave(&seated.consultation_id.0, &seated.participant_id.0);
            }
            tracing::info!(consultation = %seated.consultation_id, participant = %seated.participant_id, ?reason, "seat released");
            r.seats.is_empty()
        };
        if became_empty {
            self.drop_room_if_empty(&seated.consultation_id);
        }
    }

    /// The connection `conn_id` of a seat ended without `leave`: hold the seat for the rejoin
    /// window and tell the others.
    pub fn disconnected(self: &Arc<Self>, seated: &Seated, conn_id: u64) {
        let Some(room) = self.room(&seated.consultation_id) else {
            return;
        };
        let mut r = lock(&room);
        let Some(seat) = r.seats.get_mut(&seated.participant_id) else {
            return;
        };
        if seat.conn.as_ref().map(|c| c.id) != Some(conn_id) {
            return; // Already replaced by a resume, or released.
        }
        seat.conn = None;
        seat.down_since = Some(Instant::now());
        seat.generation += 1;
        let generation = seat.generation;
        let (admitted, role) = (seat.admitted, seat.role);
        self.metrics.participants_connected.dec();
        self.store.audit(
            AuditEvent::new(&seated.consultation_id, AuditKind::Disconnected)
                .participant(&seated.participant_id, role),
        );
        if admitted {
            self.broadcast_admitted(&r, &seated.participant_id, |_| {
                ServerMessage::PeerReconnecting {
                    participant_id: seated.participant_id.clone(),
                }
            });
        } else {
            self.send_waiting_room(&mut r);
        }
        drop(r);
        tracing::info!(consultation = %seated.consultation_id, participant = %seated.participant_id, "link dropped, seat held");
        self.start_window(seated.clone(), generation);
    }

    /// Whether `pid` holds a seat in a live room.
    pub fn has_seat(&self, cid: &ConsultationId, pid: &ParticipantId) -> bool {
        self.room(cid)
            .is_some_and(|room| lock(&room).seats.contains_key(pid))
    }

    /// Brings back a consultation's seats, persisted (after a restart) or mirrored (a fleet
    /// node taking over another's consultation): every seat starts its link down, with a fresh
    /// rejoin window, so each participant can resume it; where the row knows the seat's latest
    /// resume token hash, only that token resumes it. Seats already live are left alone.
    pub fn restore(self: &Arc<Self>, cid: &ConsultationId, seats: Vec<SeatRow>) {
        let room = self.room_or_create(cid);
        let mut r = lock(&room);
        if r.closed {
            return;
        }
        for row in seats {
            if r.seats.contains_key(&row.participant_id) {
                continue;
            }
            let seq = r.next_seq;
            r.next_seq += 1;
            r.seats.insert(
                row.participant_id.clone(),
                Seat {
                    role: row.role,
                    display_name: None,
                    admitted: row.admitted,
                    conn: None,
                    joined_at: Instant::now(),
                    seq,
                    generation: 1,
                    invite: None,
                    token: row.token.clone(),
                    resume_hash: row.resume_hash,
                    down_since: Some(Instant::now()),
                },
            );
            self.start_window(
                Seated {
                    consultation_id: cid.clone(),
                    participant_id: row.participant_id,
                    role: row.role,
                },
                1,
            );
        }
    }

    /// Marks a join token spent: its holder left.
    fn spend(&self, token: &JoinTokenId) {
        let mut spent = lock(&self.spent);
        if spent.len() >= 1024 {
            let now = auth::unix_now();
            spent.retain(|_, exp| *exp > now);
        }
        spent.insert(token.id.clone(), token.expires_at);
        drop(spent);
        self.store.join_token_spent(token.clone());
    }

    /// Releases the seat when the rejoin window passes without a resume.
    fn start_window(self: &Arc<Self>, seated: Seated, generation: u64) {
        let hub = Arc::clone(self);
        let window = self.rejoin_window;
        tokio::spawn(async move {
            tokio::time::sleep(window).await;
            hub.release(&seated, None, Some(generation), LeaveReason::TimedOut);
        });
    }

    /// Gives a held (or still connected) seat to a new connection.
    ///
    /// Only the seat's latest resume token (`token`) is taken: each resume hands out a new one,
    /// so a token copied from an earlier connection cannot take over the seat.
    pub fn resume(
        &self,
        cid: &ConsultationId,
        pid: &ParticipantId,
        conn: &ConnHandle,
        token: &str,
    ) -> Result<Seated, ErrorCode> {
        let room = self.room(cid).ok_or(ErrorCode::ResumeExpired)?;
        let mut r = lock(&room);
        let seat = r.seats.get_mut(pid).ok_or(ErrorCode::ResumeExpired)?;
        if seat.resume_hash.is_some_and(|h| h != token_hash(token)) {
            self.metrics.limit("resume_stale_token");
            return Err(ErrorCode::ResumeExpired);
        }
        let was_down = match seat.conn.replace(conn.clone()) {
            Some(old) => {
                old.close(close_code::REPLACED, "seat resumed on another connection");
                false
            }
            None => {
                self.metrics.participants_connected.inc();
                true
            }
        };
        seat.generation += 1;
        seat.down_since = None;
        let (role, admitted) = (seat.role, seat.admitted);
        self.metrics
            .resumes
            .get_or_create(&ResultLabel { result: "ok" })
            .inc();
        self.store
            .audit(AuditEvent::new(cid, AuditKind::Resumed).participant(pid, role));
        self.welcome(&mut r, pid, true);
        if was_down {
            if admitted {
                self.broadcast_admitted(&r, pid, |_| ServerMessage::PeerBack {
                    participant_id: pid.clone(),
                });
            } else {
                self.send_waiting_room(&mut r);
            }
        }
        tracing::info!(consultation = %cid, participant = %pid, "resumed");
        Ok(Seated {
            consultation_id: cid.clone(),
            participant_id: pid.clone(),
            role,
        })
    }

    /// Ends a consultation for everyone in it.
    pub fn end(&self, cid: &ConsultationId) {
        let Some(room) = lock(&self.rooms).remove(cid) else {
            return;
        };
        if let Some(sfu) = self.sfu.get() {
            sfu.close_room(&cid.0);
        }
        let mut r = lock(&room);
        r.closed = true;
        if let Some(m) = self.mirror.get() {
            m.ended(cid);
        }
        for (_, seat) in r.seats.drain() {
            if let Some(conn) = seat.conn {
                self.metrics.participants_connected.dec();
                conn.send(
                    &self.metrics,
                    ServerMessage::Ended {
                        reason: LeaveReason::Ended,
                    },
                );
                conn.close(close_code::ENDED, "the consultation has ended");
            }
        }
        self.metrics
            .consultations_active
            .set(lock(&self.rooms).len() as i64);
    }

    /// Asks every connection to close because the server is going away. Seats are not
    /// released: clients resume when the server is back.
    pub fn shutdown(&self) {
        let rooms: Vec<_> = lock(&self.rooms).values().cloned().collect();
        for room in rooms {
            let r = lock(&room);
            for seat in r.seats.values() {
                if let Some(conn) = &seat.conn {
                    conn.close(close_code::GOING_AWAY, "server shutting down");
                }
            }
        }
    }

    /// Every live consultation, oldest first (for the dashboard).
    pub fn live(&self) -> Vec<LiveConsultation> {
        let rooms: Vec<_> = lock(&self.rooms).values().cloned().collect();
        let mut out: Vec<(Instant, LiveConsultation)> = rooms
            .iter()
            .map(|room| {
                let r = lock(room);
                let mut seats: Vec<(&ParticipantId, &Seat)> = r.seats.iter().collect();
                seats.sort_by_key(|(_, s)| s.seq);
                let seats = seats
                    .into_iter()
                    .map(|(pid, s)| LiveSeat {
                        participant_id: pid.clone(),
                        role: s.role,
                        admitted: s.admitted,
                        down_for: s.down_since.map(|t| t.elapsed()),
                    })
                    .collect();
                let live = LiveConsultation {
                    id: r.id.clone(),
                    age: r.created_at.elapsed(),
                    seats,
                };
                (r.created_at, live)
            })
            .collect();
        out.sort_by_key(|(t, _)| *t);
        out.into_iter().map(|(_, l)| l).collect()
    }

    /// A summary of a live consultation for the administration API: (seats, waiting, connected).
    pub fn occupancy(&self, cid: &ConsultationId) -> Option<(usize, usize, usize)> {
        let room = self.room(cid)?;
        let r = lock(&room);
        let waiting = r.seats.values().filter(|s| !s.admitted).count();
        let connected = r.seats.values().filter(|s| s.conn.is_some()).count();
        Some((r.seats.len(), waiting, connected))
    }
}

fn token_hash(token: &str) -> [u8; 32] {
    use sha2::Digest;
    sha2::Sha256::digest(token.as_bytes()).into()
}

fn peer_of(pid: &ParticipantId, seat: &Seat) -> Peer {
    Peer {
        participant_id: pid.clone(),
        role: seat.role,
        display_name: seat.display_name.clone(),
        connected: seat.conn.is_some(),
    }
}

fn peers_of(r: &Room, me: &ParticipantId) -> Vec<Peer> {
    let mut peers: Vec<(&ParticipantId, &Seat)> = r
        .seats
        .iter()
        .filter(|(pid, seat)| *pid != me && seat.admitted)
        .collect();
    peers.sort_by_key(|(_, s)| s.seq);
    peers.into_iter().map(|(p, s)| peer_of(p, s)).collect()
}

fn waiting_of(r: &Room) -> Vec<WaitingPatient> {
    let mut waiting: Vec<(&ParticipantId, &Seat)> =
        r.seats.iter().filter(|(_, s)| !s.admitted).collect();
    waiting.sort_by_key(|(_, s)| s.seq);
    waiting
        .into_iter()
        .map(|(pid, s)| WaitingPatient {
            participant_id: pid.clone(),
            display_name: s.display_name.clone(),
            waiting_secs: s.joined_at.elapsed().as_secs(),
            connected: s.conn.is_some(),
        })
        .collect()
}
