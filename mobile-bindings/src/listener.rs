//! Events out: one listener, fed by one task that forwards `CallEvent`s as they come and polls
//! remote video about every 15 ms, and by one thread that hands on decoded audio every 20 ms.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bedside_client_core::call::CallEvent;
use bedside_client_core::pipeline::Received;
use bedside_protocol::ParticipantId;
use tokio::sync::mpsc;

use crate::types::{CallStateFfi, PeerEventFfi, RoleFfi, StatsFfi, WaitingPatientFfi, media_state};

/// How often remote video is polled for a newer frame.
pub const VIDEO_POLL_INTERVAL: Duration = Duration::from_millis(15);

/// The app's receiver of call events. Called on a Bedside thread (never the UI thread):
/// implementations hop to their UI thread themselves and return quickly.
///
/// Admission is a state: `on_state(Waiting)` means the waiting room, a later
/// `WaitingForPeers`/`Connecting` means admitted, `Ended { Denied }` means denied.
#[uniffi::export(foreign)]
pub trait ClientListener: Send + Sync {
    fn on_state(&self, state: CallStateFfi);
    /// Who we are, once seated.
    fn on_seated(&self, participant_id: String, role: RoleFfi);
    /// The waiting room changed (only doctors and clinicians receive this).
    fn on_waiting_room(&self, patients: Vec<WaitingPatientFfi>);
    fn on_peer(&self, participant_id: String, event: PeerEventFfi);
    fn on_microphone_muted(&self, muted: bool);
    fn on_camera_enabled(&self, enabled: bool);
    /// `manual`: the user asked for it; otherwise the network forced it.
    fn on_audio_only(&self, on: bool, manual: bool);
    /// A newly decoded remote picture, I420 tightly packed; display it rotated clockwise by
    /// `rotation_degrees` (0, 90, 180, 270).
    #[allow(clippy::too_many_arguments)]
    fn on_remote_video_frame(
        &self,
        participant_id: String,
        width: u32,
        height: u32,
        y: Vec<u8>,
        u: Vec<u8>,
        v: Vec<u8>,
        rotation_degrees: u16,
    );
    /// 20 ms of the call's decoded audio (everyone heard, mixed): 960 samples, 48 kHz mono,
    /// for the platform's player (AudioTrack, AVAudioEngine). Delivered on a dedicated thread,
    /// every 20 ms while anyone is heard; write it to the player and return.
    fn on_remote_audio(&self, samples: Vec<i16>);
    /// Call quality with one peer, about once a second.
    fn on_stats(&self, participant_id: String, stats: StatsFfi);
    /// A chat line: ours once it is on its way (`outgoing`), or one from `participant_id`.
    /// Chat goes end to end over the data channel and is stored nowhere; keep it in memory.
    fn on_chat(&self, participant_id: String, text: String, outgoing: bool);
    /// A chat line of ours did not go out, and why (nobody connected, a dropped link).
    fn on_chat_not_delivered(&self, reason: String);
    /// A refusal that does not end the call; `code` is the server's stable error code.
    fn on_error(&self, code: String, details: String);
}

/// The current listener, if any, tagged with the id of the handle that installed it.
#[derive(Default)]
pub(crate) struct ListenerSlot {
    current: Mutex<Option<(u64, Arc<dyn ClientListener>)>>,
    next_id: AtomicU64,
}

impl ListenerSlot {
    pub(crate) fn install(self: &Arc<Self>, listener: Arc<dyn ClientListener>) -> ListenerHandle {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        *self.lock() = Some((id, listener));
        ListenerHandle {
            slot: Arc::downgrade(self),
            id,
        }
    }

    fn get(&self) -> Option<Arc<dyn ClientListener>> {
        self.lock().as_ref().map(|(_, l)| l.clone())
    }

    fn remove(&self, id: u64) {
        let mut current = self.lock();
        if current.as_ref().is_some_and(|(i, _)| *i == id) {
            *current = None;
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<(u64, Arc<dyn ClientListener>)>> {
        self.current.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Keeps a listener installed. Dropping it or calling [`ListenerHandle::cancel`] stops delivery
/// (a callback already running on another thread still completes). Installing another listener
/// replaces this one.
#[derive(uniffi::Object)]
pub struct ListenerHandle {
    slot: std::sync::Weak<ListenerSlot>,
    id: u64,
}

#[uniffi::export]
impl ListenerHandle {
    /// Stops delivery to this handle's listener. Idempotent.
    pub fn cancel(&self) {
        if let Some(slot) = self.slot.upgrade() {
            slot.remove(self.id);
        }
    }
}

impl Drop for ListenerHandle {
    fn drop(&mut self) {
        self.cancel();
    }
}

/// Forwards events and remote video to whichever listener is installed, until the client ends.
/// Events arriving while no listener is installed are dropped.
pub(crate) async fn dispatch(
    mut events: mpsc::UnboundedReceiver<CallEvent>,
    received: Received,
    slot: Arc<ListenerSlot>,
) {
    // Remote participants and the sequence number of the last frame seen from each.
    let mut peers: HashMap<ParticipantId, u64> = HashMap::new();
    let mut tick = tokio::time::interval(VIDEO_POLL_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        tokio::select! {
            event = events.recv() => {
                let Some(event) = event else { break };
                // Whose video to poll: every peer from `PeerJoined` (which also announces those
                // already present when we are admitted) until `PeerLeft`.
                match &event {
                    CallEvent::PeerLeft { participant_id, .. } => {
                        peers.remove(participant_id);
                    }
                    CallEvent::PeerJoined(peer) => {
                        peers.entry(peer.participant_id.clone()).or_insert(0);
                    }
                    _ => {}
                }
                if let Some(listener) = slot.get() {
                    forward(listener.as_ref(), event);
                }
            }
            _ = tick.tick() => poll_video(&received, &mut peers, &slot),
        }
    }
}

/// Hands decoded audio to the listener as it is played, until `stop` is set. Frames played while
/// no listener is installed are dropped.
pub(crate) fn dispatch_audio(
    audio: Arc<bedside_client_core::media::PlayedAudio>,
    slot: Arc<ListenerSlot>,
    stop: Arc<std::sync::atomic::AtomicBool>,
) {
    while !stop.load(Ordering::Relaxed) {
        let Some(frame) = audio.wait(Duration::from_millis(100)) else {
            continue;
        };
        if let Some(listener) = slot.get() {
            listener.on_remote_audio(frame.samples.to_vec());
        }
    }
}

fn poll_video(received: &Received, peers: &mut HashMap<ParticipantId, u64>, slot: &ListenerSlot) {
    for (pid, seen) in peers.iter_mut() {
        let Some(sink) = received.video(pid) else {
            continue;
        };
        let Some((seq, frame)) = sink.newer_than(*seen) else {
            continue;
        };
        *seen = seq;
        let (Some(frame), Some(listener)) = (frame, slot.get()) else {
            continue;
        };
        listener.on_remote_video_frame(
            pid.0.clone(),
            frame.width(),
            frame.height(),
            frame.y().to_vec(),
            frame.u().to_vec(),
            frame.v().to_vec(),
            frame.rotation.degrees(),
        );
    }
}

fn forward(listener: &dyn ClientListener, event: CallEvent) {
    let peer = |pid: ParticipantId, event: PeerEventFfi| listener.on_peer(pid.0, event);
    match event {
        CallEvent::State(s) => listener.on_state(s.into()),
        CallEvent::Seated {
            participant_id,
            role,
        } => listener.on_seated(participant_id.0, role.into()),
        CallEvent::WaitingRoom(w) => {
            listener.on_waiting_room(w.into_iter().map(Into::into).collect())
        }
        CallEvent::PeerJoined(p) => peer(
            p.participant_id.clone(),
            PeerEventFfi::Joined { peer: p.into() },
        ),
        CallEvent::PeerLeft {
            participant_id,
            reason,
        } => peer(
            participant_id,
            PeerEventFfi::Left {
                reason: reason.into(),
            },
        ),
        CallEvent::PeerReconnecting(pid) => peer(pid, PeerEventFfi::Reconnecting),
        CallEvent::PeerBack(pid) => peer(pid, PeerEventFfi::Back),
        CallEvent::PeerMedia {
            participant_id,
            state,
        } => peer(
            participant_id,
            PeerEventFfi::Media {
                state: media_state(state),
            },
        ),
        CallEvent::MicrophoneMuted(m) => listener.on_microphone_muted(m),
        CallEvent::CameraEnabled(e) => listener.on_camera_enabled(e),
        CallEvent::AudioOnly { on, manual } => listener.on_audio_only(on, manual),
        CallEvent::Stats {
            participant_id,
            report,
        } => listener.on_stats(participant_id.0, report.into()),
        CallEvent::Chat {
            from,
            text,
            outgoing,
            ..
        } => listener.on_chat(from.0, text, outgoing),
        CallEvent::ChatNotDelivered { reason, .. } => listener.on_chat_not_delivered(reason),
        // Not exposed to the hosts yet.
        CallEvent::ActiveSpeaker(_) => {}
        CallEvent::Error { code, message } => listener.on_error(code.as_str().to_owned(), message),
        // End-to-end encryption is not offered to mobile hosts yet (ClientOptionsFfi has no
        // switch), so no safety code is ever produced here.
        CallEvent::SafetyCode(_) => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    #[derive(Default)]
    struct Counter(AtomicUsize);

    impl ClientListener for Counter {
        fn on_state(&self, _: CallStateFfi) {
            self.0.fetch_add(1, Ordering::Relaxed);
        }
        fn on_seated(&self, _: String, _: RoleFfi) {}
        fn on_waiting_room(&self, _: Vec<WaitingPatientFfi>) {}
        fn on_peer(&self, _: String, _: PeerEventFfi) {}
        fn on_microphone_muted(&self, _: bool) {}
        fn on_camera_enabled(&self, _: bool) {}
        fn on_audio_only(&self, _: bool, _: bool) {}
        fn on_chat(&self, _: String, _: String, _: bool) {}
        fn on_chat_not_delivered(&self, _: String) {}
        fn on_remote_video_frame(
            &self,
            _: String,
            _: u32,
            _: u32,
            _: Vec<u8>,
            _: Vec<u8>,
            _: Vec<u8>,
            _: u16,
        ) {
        }
        fn on_remote_audio(&self, samples: Vec<i16>) {
            assert_eq!(samples.len(), 960);
            self.0.fetch_add(1, Ordering::Relaxed);
        }
        fn on_stats(&self, _: String, _: StatsFfi) {}
        fn on_error(&self, _: String, _: String) {}
    }

    #[test]
    fn played_audio_reaches_the_listener_until_stopped() {
        use bedside_client_core::media::{AudioFrame, PlayedAudio};
        let audio = Arc::new(PlayedAudio::default());
        let slot = Arc::new(ListenerSlot::default());
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let counter = Arc::new(Counter::default());
        let _handle = slot.install(counter.clone());
        let thread = {
            let (audio, slot, stop) = (audio.clone(), slot.clone(), stop.clone());
            std::thread::spawn(move || dispatch_audio(audio, slot, stop))
        };
        for n in 0..5 {
            audio.push(AudioFrame {
                samples: Box::new([n; 960]),
                capture_us: 0,
            });
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while counter.0.load(Ordering::Relaxed) < 5 && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        stop.store(true, Ordering::Relaxed);
        thread.join().unwrap();
        assert_eq!(counter.0.load(Ordering::Relaxed), 5);
    }

    #[tokio::test]
    async fn events_reach_the_listener_until_its_handle_goes() {
        let (tx, rx) = mpsc::unbounded_channel();
        let slot = Arc::new(ListenerSlot::default());
        let task = tokio::spawn(dispatch(rx, Received::default(), slot.clone()));
        let first = Arc::new(Counter::default());
        let second = Arc::new(Counter::default());
        let state = || CallEvent::State(bedside_client_core::call::CallState::Joining);

        let h1 = slot.install(first.clone());
        tx.send(state()).unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        let h2 = slot.install(second.clone()); // replaces the first
        drop(h1); // an old handle does not remove the new listener
        tx.send(state()).unwrap();
        tx.send(state()).unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        h2.cancel();
        tx.send(state()).unwrap();
        drop(tx);
        task.await.unwrap();

        assert_eq!(first.0.load(Ordering::Relaxed), 1);
        assert_eq!(second.0.load(Ordering::Relaxed), 2);
    }
}
