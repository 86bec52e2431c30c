//! Where raw media comes from: pull-style source traits, and a push-fed source for hosts whose
//! cameras and microphones deliver frames by callback (Camera2, AVFoundation, cpal).

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};

use super::frame::{AudioFrame, VideoFrame};

/// The answer of a source asked for its next frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Capture<T> {
    /// A frame is ready.
    Frame(T),
    /// The device is there but has no new frame yet: ask again later.
    Pending,
    /// There is no device (no camera, no microphone, or it was lost). A normal state, not an error:
    /// the call goes on without this medium.
    NoDevice,
}

impl<T> Capture<T> {
    /// The frame, if one is ready.
    pub fn into_frame(self) -> Option<T> {
        match self {
            Capture::Frame(f) => Some(f),
            _ => None,
        }
    }
}

/// What a video source shows, which decides how it is encoded (as WebRTC's
/// `MediaStreamTrack.contentHint`: "motion" or "text"/"detail").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ContentHint {
    /// A camera: smooth motion matters more than sharp detail.
    #[default]
    Motion,
    /// A shared screen or window: text must stay legible, a low frame rate is fine (see
    /// [`super::screen::screen_encoding`]).
    Text,
}

/// A source of video frames, polled by the call driver.
///
/// `now_us` is the session clock in microseconds: sources never read the clock themselves.
pub trait VideoSource: Send {
    /// The next frame to send, if any.
    fn poll_video(&mut self, now_us: u64) -> Capture<VideoFrame>;

    /// What this source shows (a camera unless it says otherwise).
    fn content_hint(&self) -> ContentHint {
        ContentHint::Motion
    }
}

/// A source of 20 ms audio frames, polled by the call driver.
pub trait AudioSource: Send {
    /// The next 20 ms frame to send, if any.
    fn poll_audio(&mut self, now_us: u64) -> Capture<AudioFrame>;
}

/// A source that never has a device: "no camera" / "no microphone".
#[derive(Debug, Default, Clone, Copy)]
pub struct NoDevice;

impl VideoSource for NoDevice {
    fn poll_video(&mut self, _now_us: u64) -> Capture<VideoFrame> {
        Capture::NoDevice
    }
}

impl AudioSource for NoDevice {
    fn poll_audio(&mut self, _now_us: u64) -> Capture<AudioFrame> {
        Capture::NoDevice
    }
}

#[derive(Debug)]
struct Shared<T> {
    queue: VecDeque<T>,
    capacity: usize,
    device_present: bool,
    pushers: usize,
    dropped: u64,
}

fn lock<T>(m: &Mutex<Shared<T>>) -> MutexGuard<'_, Shared<T>> {
    // A poisoned lock only means a pusher panicked mid-push; the queue itself stays consistent.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The host's end of a push-fed source: the platform capture callback calls [`FramePusher::push`].
///
/// Cloneable and `Send`; pushing never blocks for long (one short lock) and never fails. When
/// the queue is full the oldest frame is dropped (live media: newest wins).
#[derive(Debug)]
pub struct FramePusher<T> {
    shared: Arc<Mutex<Shared<T>>>,
}

impl<T> Clone for FramePusher<T> {
    fn clone(&self) -> Self {
        lock(&self.shared).pushers += 1;
        Self {
            shared: self.shared.clone(),
        }
    }
}

/// The driver's end of a push-fed source: implements [`VideoSource`] for `VideoFrame` and
/// [`AudioSource`] for `AudioFrame`.
#[derive(Debug)]
pub struct PushedSource<T> {
    shared: Arc<Mutex<Shared<T>>>,
}

/// A push-fed source holding at most `capacity` frames (at least 1).
///
/// Video typically uses a capacity of 1 or 2 (latest frame wins), audio 5 to 10 frames.
/// The source reports [`Capture::NoDevice`] until the host calls
/// [`FramePusher::set_device_present`]`(true)` or pushes a frame, and again once every pusher is
/// dropped.
pub fn push_source<T>(capacity: usize) -> (FramePusher<T>, PushedSource<T>) {
    let shared = Arc::new(Mutex::new(Shared {
        queue: VecDeque::new(),
        capacity: capacity.max(1),
        device_present: false,
        pushers: 1,
        dropped: 0,
    }));
    (
        FramePusher {
            shared: shared.clone(),
        },
        PushedSource { shared },
    )
}

impl<T> FramePusher<T> {
    /// Pushes a captured frame; marks the device present.
    pub fn push(&self, frame: T) {
        let mut s = lock(&self.shared);
        s.device_present = true;
        if s.queue.len() >= s.capacity {
            s.queue.pop_front();
            s.dropped += 1;
        }
        s.queue.push_back(frame);
    }

    /// Declares that the device exists (e.g. opened but no frame yet) or is gone (unplugged,
    /// permission revoked). When gone, queued frames are discarded.
    pub fn set_device_present(&self, present: bool) {
        let mut s = lock(&self.shared);
        s.device_present = present;
        if !present {
            s.queue.clear();
        }
    }
}

impl<T> Drop for FramePusher<T> {
    fn drop(&mut self) {
        let mut s = lock(&self.shared);
        s.pushers -= 1;
    }
}

impl<T> PushedSource<T> {
    /// Takes the oldest queued frame.
    pub fn poll(&mut self) -> Capture<T> {
        let mut s = lock(&self.shared);
        if let Some(f) = s.queue.pop_front() {
            return Capture::Frame(f);
        }
        if s.device_present && s.pushers > 0 {
            Capture::Pending
        } else {
            Capture::NoDevice
        }
    }

    /// Frames dropped because the driver did not poll fast enough.
    pub fn dropped(&self) -> u64 {
        lock(&self.shared).dropped
    }
}

impl VideoSource for PushedSource<VideoFrame> {
    fn poll_video(&mut self, _now_us: u64) -> Capture<VideoFrame> {
        self.poll()
    }
}

impl AudioSource for PushedSource<AudioFrame> {
    fn poll_audio(&mut self, _now_us: u64) -> Capture<AudioFrame> {
        self.poll()
    }
}

/// Holds a frame source to real time: admits at most one frame per `frame_us` of the clock,
/// with a credit of up to `credit_us` for a device that hands over a backlog at once (after a
/// stall, or several frames per callback). Frames beyond that come faster than real time and
/// are to be dropped.
///
/// Why: a device may deliver capture as fast as it is read. ALSA's `null` device, the only one
/// cpal finds on a computer with no sound card, generates silence with no clock of its own: it
/// handed over about 3,500 20 ms frames a second here (70 times real time). Unchecked, that
/// ran the echo canceller and Opus flat out and flooded the link with audio, and the patient
/// decoded no video at all. A credit of a second lets a real device catch up after any stall
/// shorter than that (the frames are sent, late), while a flooding one gets real time plus at
/// most one second of extra frames each time it floods after a pause.
///
/// Sans-IO: the clock is an argument.
#[derive(Debug, Clone)]
pub struct RealTimeGate {
    frame_us: u64,
    credit_us: u64,
    /// Time owed to the source, µs (at most `credit_us`).
    owed_us: u64,
    last_us: Option<u64>,
    dropped: u64,
}

impl RealTimeGate {
    /// A gate for frames of `frame_us` each, with `credit_us` of catch-up (at least one frame).
    pub fn new(frame_us: u64, credit_us: u64) -> Self {
        let frame_us = frame_us.max(1);
        let credit_us = credit_us.max(frame_us);
        RealTimeGate {
            frame_us,
            credit_us,
            owed_us: credit_us,
            last_us: None,
            dropped: 0,
        }
    }

    /// Whether a frame arriving at `now_us` is within real time (true: send it; false: it came
    /// too fast, drop it; counted in [`Self::dropped`]).
    pub fn admit(&mut self, now_us: u64) -> bool {
        let elapsed = self.last_us.map_or(0, |last| now_us.saturating_sub(last));
        self.last_us = Some(self.last_us.map_or(now_us, |last| last.max(now_us)));
        self.owed_us = self.owed_us.saturating_add(elapsed).min(self.credit_us);
        if self.owed_us >= self.frame_us {
            self.owed_us -= self.frame_us;
            true
        } else {
            self.dropped += 1;
            false
        }
    }

    /// Frames refused so far.
    pub fn dropped(&self) -> u64 {
        self.dropped
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn push_source_states() {
        let (pusher, mut src) = push_source::<AudioFrame>(2);
        assert_eq!(src.poll_audio(0), Capture::NoDevice);
        pusher.set_device_present(true);
        assert_eq!(src.poll_audio(0), Capture::Pending);
        for i in 0..3 {
            pusher.push(AudioFrame::silence(i));
        }
        assert_eq!(src.dropped(), 1);
        assert_eq!(src.poll_audio(0).into_frame().unwrap().capture_us, 1);
        assert_eq!(src.poll_audio(0).into_frame().unwrap().capture_us, 2);
        assert_eq!(src.poll_audio(0), Capture::Pending);
        let p2 = pusher.clone();
        drop(pusher);
        assert_eq!(src.poll_audio(0), Capture::Pending);
        drop(p2);
        assert_eq!(src.poll_audio(0), Capture::NoDevice);
        let mut none = NoDevice;
        assert_eq!(VideoSource::poll_video(&mut none, 0), Capture::NoDevice);
    }

    #[test]
    fn real_time_gate_cuts_a_flood_to_real_time_and_lets_a_backlog_through() {
        const FRAME: u64 = 20_000;
        // A flood: 70 frames per 20 ms for 10 s (ALSA's null device) gets its one second of
        // credit, then exactly real time.
        let mut gate = RealTimeGate::new(FRAME, 1_000_000);
        let mut admitted = 0u64;
        for tick in 0..500u64 {
            for _ in 0..70 {
                admitted += u64::from(gate.admit(tick * FRAME));
            }
        }
        assert_eq!(admitted, 50 + 499);
        assert_eq!(gate.dropped(), 500 * 70 - admitted);
        // A real device: 10 s at real time, with a 600 ms stall made up at once, loses nothing.
        let mut gate = RealTimeGate::new(FRAME, 1_000_000);
        for i in 0..500u64 {
            let t = if (200..230).contains(&i) { 230 } else { i };
            assert!(gate.admit(t * FRAME), "frame {i}");
        }
        assert_eq!(gate.dropped(), 0);
        // A clock that steps back does not mint credit.
        let mut gate = RealTimeGate::new(FRAME, FRAME);
        assert!(gate.admit(1_000_000));
        assert!(!gate.admit(500_000));
        assert!(!gate.admit(1_010_000));
        assert!(gate.admit(1_020_000));
    }
}
