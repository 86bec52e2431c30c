//! The socket loop: one OS thread owns one UDP socket and the [`Core`] (every participant's
//! `Rtc`), reads the clock and hands it in. Commands from the signaling side arrive over a
//! channel plus an eventfd that wakes the thread's `poll(2)`; events go out on a tokio channel.
//!
//! Per wake-up: drain the socket (up to [`BATCH`] datagrams, each handed to the core, which
//! forwards at once), drive the timers that are due, send everything the core queued, then
//! sleep until the socket, a command or the next timer. A consultation lives on one thread
//! (today there is one shard; more shards would each own a socket and a core, with the room
//! mapped to a shard by the signaling side).

use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::Arc;
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc as tmpsc, oneshot};

use crate::core::{Core, Counters, Event, ParticipantStats, SfuError};

/// Datagrams read per wake-up before the timers get a turn.
pub const BATCH: usize = 64;

enum Cmd {
    Connect {
        room: String,
        participant: String,
        offer: String,
        reply: oneshot::Sender<Result<String, SfuError>>,
    },
    Candidate {
        room: String,
        participant: String,
        candidate: String,
    },
    Leave {
        room: String,
        participant: String,
    },
    CloseRoom {
        room: String,
    },
    Stats {
        room: String,
        participant: String,
        reply: oneshot::Sender<Option<ParticipantStats>>,
    },
    RoomStats {
        room: String,
        reply: oneshot::Sender<Vec<(String, ParticipantStats)>>,
    },
    Shutdown,
}

/// Where the SFU listens and what it announces.
#[derive(Clone, Debug)]
pub struct SfuSettings {
    /// The UDP address to bind (port 0: one the OS picks).
    pub listen: SocketAddr,
    /// The address put in answers as the SFU's candidate; `None`: the bound address (an
    /// unspecified bound IP is replaced by 127.0.0.1, for tests on one host).
    pub public: Option<SocketAddr>,
}

/// The running SFU: a cheap, cloneable handle to its thread.
#[derive(Clone)]
pub struct SfuHandle {
    tx: mpsc::Sender<Cmd>,
    wake: Arc<OwnedFd>,
    local: SocketAddr,
    public: SocketAddr,
    counters: Arc<Counters>,
}

/// The SFU's thread; [`Sfu::shutdown`] stops it.
pub struct Sfu {
    handle: SfuHandle,
    thread: Option<JoinHandle<()>>,
}

impl Sfu {
    /// Binds the socket and starts the thread. Events (layouts, speakers, disconnections) go
    /// to `events`.
    pub fn start(settings: SfuSettings, events: tmpsc::UnboundedSender<Event>) -> io::Result<Sfu> {
        let socket = UdpSocket::bind(settings.listen)?;
        socket.set_nonblocking(true)?;
        let local = socket.local_addr()?;
        let public = settings.public.unwrap_or_else(|| {
            let mut a = local;
            if a.ip().is_unspecified() {
                a.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
            }
            a
        });
        // SAFETY: eventfd returns a new descriptor we then own, or -1.
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd is a valid descriptor nobody else owns.
        let wake = Arc::new(unsafe { OwnedFd::from_raw_fd(fd) });
        let counters = Arc::new(Counters::default());
        let (tx, rx) = mpsc::channel();
        let core = Core::new(local, public, counters.clone());
        let thread_wake = wake.clone();
        let thread = std::thread::Builder::new()
            .name("bedside-sfu".into())
            .spawn(move || run(socket, core, rx, thread_wake, events))?;
        Ok(Sfu {
            handle: SfuHandle {
                tx,
                wake,
                local,
                public,
                counters,
            },
            thread: Some(thread),
        })
    }

    pub fn handle(&self) -> &SfuHandle {
        &self.handle
    }

    /// Stops the thread and waits for it.
    pub fn shutdown(mut self) {
        self.handle.send(Cmd::Shutdown);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Sfu {
    fn drop(&mut self) {
        if self.thread.is_some() {
            self.handle.send(Cmd::Shutdown);
        }
    }
}

impl SfuHandle {
    fn send(&self, c: Cmd) -> bool {
        if self.tx.send(c).is_err() {
            return false;
        }
        let one: u64 = 1;
        // SAFETY: writing 8 bytes from a valid u64 to an eventfd we hold.
        unsafe { libc::write(self.wake.as_raw_fd(), (&one as *const u64).cast(), 8) };
        true
    }

    /// The socket's bound address.
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// The address clients are told to reach.
    pub fn public_addr(&self) -> SocketAddr {
        self.public
    }

    pub fn counters(&self) -> &Arc<Counters> {
        &self.counters
    }

    /// A participant's offer to the SFU; returns the SFU's answer.
    pub async fn connect(
        &self,
        room: &str,
        participant: &str,
        offer: String,
    ) -> Result<String, SfuError> {
        let (reply, rx) = oneshot::channel();
        if !self.send(Cmd::Connect {
            room: room.to_owned(),
            participant: participant.to_owned(),
            offer,
            reply,
        }) {
            return Err(SfuError::Stopped);
        }
        rx.await.map_err(|_| SfuError::Stopped)?
    }

    pub fn add_candidate(&self, room: &str, participant: &str, candidate: String) {
        self.send(Cmd::Candidate {
            room: room.to_owned(),
            participant: participant.to_owned(),
            candidate,
        });
    }

    pub fn leave(&self, room: &str, participant: &str) {
        self.send(Cmd::Leave {
            room: room.to_owned(),
            participant: participant.to_owned(),
        });
    }

    pub fn close_room(&self, room: &str) {
        self.send(Cmd::CloseRoom {
            room: room.to_owned(),
        });
    }

    /// What the SFU measured of one participant's traffic.
    pub async fn participant_stats(
        &self,
        room: &str,
        participant: &str,
    ) -> Option<ParticipantStats> {
        let (reply, rx) = oneshot::channel();
        if !self.send(Cmd::Stats {
            room: room.to_owned(),
            participant: participant.to_owned(),
            reply,
        }) {
            return None;
        }
        rx.await.ok().flatten()
    }
}

impl SfuHandle {
    /// Every participant of a consultation on the SFU, with what it measured of each.
    pub async fn room_stats(&self, room: &str) -> Vec<(String, ParticipantStats)> {
        let (reply, rx) = oneshot::channel();
        if !self.send(Cmd::RoomStats {
            room: room.to_owned(),
            reply,
        }) {
            return Vec::new();
        }
        rx.await.unwrap_or_default()
    }
}

fn run(
    socket: UdpSocket,
    mut core: Core,
    rx: mpsc::Receiver<Cmd>,
    wake: Arc<OwnedFd>,
    events: tmpsc::UnboundedSender<Event>,
) {
    let mut buf = vec![0u8; 2048];
    loop {
        let now = Instant::now();
        // Commands.
        let mut drained = 0u64;
        // SAFETY: reading 8 bytes into a u64 from our own nonblocking eventfd.
        unsafe { libc::read(wake.as_raw_fd(), (&mut drained as *mut u64).cast(), 8) };
        loop {
            match rx.try_recv() {
                Ok(Cmd::Connect {
                    room,
                    participant,
                    offer,
                    reply,
                }) => {
                    let _ = reply.send(core.connect(now, &room, &participant, &offer));
                }
                Ok(Cmd::Candidate {
                    room,
                    participant,
                    candidate,
                }) => {
                    let _ = core.add_candidate(&room, &participant, &candidate);
                }
                Ok(Cmd::Leave { room, participant }) => core.leave(now, &room, &participant),
                Ok(Cmd::CloseRoom { room }) => core.close_room(now, &room),
                Ok(Cmd::Stats {
                    room,
                    participant,
                    reply,
                }) => {
                    let _ = reply.send(core.participant_stats(&room, &participant));
                }
                Ok(Cmd::RoomStats { room, reply }) => {
                    let _ = reply.send(core.room_stats(&room));
                }
                Ok(Cmd::Shutdown) | Err(mpsc::TryRecvError::Disconnected) => return,
                Err(mpsc::TryRecvError::Empty) => break,
            }
        }
        // Datagrams.
        for _ in 0..BATCH {
            match socket.recv_from(&mut buf) {
                Ok((n, from)) => core.handle_receive(Instant::now(), from, &buf[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                // ICMP errors surface as ECONNREFUSED on the next read; nothing to do.
                Err(_) => continue,
            }
            flush(&socket, &mut core);
        }
        // Timers.
        let now = Instant::now();
        if core.poll_timeout().is_some_and(|t| t <= now) {
            core.handle_timeout(now);
        }
        flush(&socket, &mut core);
        while let Some(e) = core.poll_event() {
            let _ = events.send(e);
        }
        // Sleep until the socket, a command or the next timer.
        let wait = core
            .poll_timeout()
            .map(|t| t.saturating_duration_since(Instant::now()))
            .unwrap_or(Duration::from_millis(100))
            .min(Duration::from_millis(100));
        let ms = wait.as_micros().div_ceil(1000) as libc::c_int;
        let mut fds = [
            libc::pollfd {
                fd: socket.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: wake.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: fds is a valid array of two pollfd for the call's duration.
        unsafe { libc::poll(fds.as_mut_ptr(), 2, ms) };
    }
}

fn flush(socket: &UdpSocket, core: &mut Core) {
    while let Some((to, data)) = core.poll_transmit() {
        // A full send buffer drops the datagram, as the network would; RTP recovers.
        let _ = socket.send_to(&data, to);
    }
}
