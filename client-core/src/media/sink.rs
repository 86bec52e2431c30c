//! Where decoded video goes: a latest-frame slot the UI reads.

use std::sync::{Arc, Mutex, MutexGuard};

use super::frame::VideoFrame;

type Waker = Arc<dyn Fn() + Send + Sync>;

#[derive(Default)]
struct Slot {
    frame: Option<Arc<VideoFrame>>,
    seq: u64,
}

/// Holds only the newest frame (not a queue): the decoder publishes, the UI reads whenever it
/// redraws and never blocks for longer than an `Arc` clone under a short lock.
///
/// Every publish increments a sequence number, so a reader can tell whether anything is new,
/// and calls an optional waker (e.g. egui's `request_repaint`) outside the lock.
#[derive(Default)]
pub struct LatestFrame {
    slot: Mutex<Slot>,
    waker: Mutex<Option<Waker>>,
}

impl std::fmt::Debug for LatestFrame {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LatestFrame")
            .field("seq", &self.seq())
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl LatestFrame {
    /// An empty slot (sequence number 0).
    pub fn new() -> Self {
        Self::default()
    }

    /// Replaces the frame; returns its sequence number (starting at 1).
    pub fn publish(&self, frame: VideoFrame) -> u64 {
        let seq = {
            let mut s = lock(&self.slot);
            s.seq += 1;
            s.frame = Some(Arc::new(frame));
            s.seq
        };
        let waker = lock(&self.waker).clone();
        if let Some(w) = waker {
            w();
        }
        seq
    }

    /// Empties the slot (the remote camera went away); counts as an update.
    pub fn clear(&self) {
        {
            let mut s = lock(&self.slot);
            s.seq += 1;
            s.frame = None;
        }
        let waker = lock(&self.waker).clone();
        if let Some(w) = waker {
            w();
        }
    }

    /// The newest frame with its sequence number.
    pub fn latest(&self) -> (u64, Option<Arc<VideoFrame>>) {
        let s = lock(&self.slot);
        (s.seq, s.frame.clone())
    }

    /// The newest frame if it is newer than `seen` (a sequence number from an earlier read).
    pub fn newer_than(&self, seen: u64) -> Option<(u64, Option<Arc<VideoFrame>>)> {
        let s = lock(&self.slot);
        (s.seq > seen).then(|| (s.seq, s.frame.clone()))
    }

    /// The sequence number of the last update.
    pub fn seq(&self) -> u64 {
        lock(&self.slot).seq
    }

    /// Sets the hook called after every update (from the publishing thread).
    pub fn set_waker(&self, waker: impl Fn() + Send + Sync + 'static) {
        *lock(&self.waker) = Some(Arc::new(waker));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    #[test]
    fn keeps_only_newest_and_wakes() {
        let sink = LatestFrame::new();
        let wakes = Arc::new(AtomicU32::new(0));
        let w = wakes.clone();
        sink.set_waker(move || {
            w.fetch_add(1, Ordering::SeqCst);
        });
        assert_eq!(sink.latest().0, 0);
        for i in 0..5 {
            sink.publish(VideoFrame::filled(4, 4, 0, i).unwrap());
        }
        let (seq, f) = sink.latest();
        assert_eq!((seq, f.unwrap().capture_us), (5, 4));
        assert!(sink.newer_than(5).is_none());
        sink.clear();
        assert_eq!(
            sink.newer_than(5).map(|(s, f)| (s, f.is_none())),
            Some((6, true))
        );
        assert_eq!(wakes.load(Ordering::SeqCst), 6);
    }
}

/// Frames [`PlayedAudio`] holds before dropping the oldest: 200 ms.
pub const PLAYED_AUDIO_CAPACITY: usize = 10;

/// The call's decoded audio, mixed over every participant: 20 ms frames of 48 kHz mono, ready
/// for a speaker (which pulls with [`PlayedAudio::pop`] on its audio thread) or a platform
/// player fed from a thread of the host's (which waits with [`PlayedAudio::wait`]).
///
/// The receive pipeline pushes a frame every 20 ms while anyone is heard. It holds at most
/// [`PLAYED_AUDIO_CAPACITY`] frames: a consumer that falls further behind loses the oldest
/// (counted), so latency stays bounded instead of growing.
#[derive(Debug, Default)]
pub struct PlayedAudio {
    frames: Mutex<std::collections::VecDeque<super::frame::AudioFrame>>,
    ready: std::sync::Condvar,
    pushed: std::sync::atomic::AtomicU64,
    dropped: std::sync::atomic::AtomicU64,
}

impl PlayedAudio {
    /// Queues one frame (the pipeline's side).
    pub fn push(&self, frame: super::frame::AudioFrame) {
        use std::sync::atomic::Ordering;
        let mut frames = lock(&self.frames);
        if frames.len() >= PLAYED_AUDIO_CAPACITY {
            frames.pop_front();
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
        frames.push_back(frame);
        self.pushed.fetch_add(1, Ordering::Relaxed);
        drop(frames);
        self.ready.notify_one();
    }

    /// The oldest queued frame, without waiting (for an audio callback, which must not block).
    pub fn pop(&self) -> Option<super::frame::AudioFrame> {
        lock(&self.frames).pop_front()
    }

    /// The oldest queued frame, waiting up to `timeout` for one.
    pub fn wait(&self, timeout: std::time::Duration) -> Option<super::frame::AudioFrame> {
        let frames = lock(&self.frames);
        let (mut frames, _) = self
            .ready
            .wait_timeout_while(frames, timeout, |f| f.is_empty())
            .unwrap_or_else(|e| e.into_inner());
        frames.pop_front()
    }

    /// Frames pushed so far.
    pub fn pushed(&self) -> u64 {
        self.pushed.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Frames dropped because nobody took them in time.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(std::sync::atomic::Ordering::Relaxed)
    }
}

#[cfg(test)]
mod played_audio_tests {
    use super::super::frame::{AudioFrame, FRAME_SAMPLES};
    use super::*;
    use std::time::Duration;

    fn frame(n: u64) -> AudioFrame {
        AudioFrame {
            samples: Box::new([n as i16; FRAME_SAMPLES]),
            capture_us: n,
        }
    }

    #[test]
    fn keeps_order_bounds_latency_and_wakes_a_waiting_player() {
        let audio = Arc::new(PlayedAudio::default());
        assert!(audio.pop().is_none());
        assert!(audio.wait(Duration::from_millis(1)).is_none());
        for n in 0..(PLAYED_AUDIO_CAPACITY as u64 + 3) {
            audio.push(frame(n));
        }
        // The three oldest made way.
        assert_eq!(audio.dropped(), 3);
        assert_eq!(audio.pop().unwrap().capture_us, 3);
        while audio.pop().is_some() {}
        let pusher = audio.clone();
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(20));
            pusher.push(frame(99));
        });
        assert_eq!(
            audio.wait(Duration::from_secs(5)).map(|f| f.capture_us),
            Some(99)
        );
        t.join().unwrap();
        assert_eq!(audio.pushed(), PLAYED_AUDIO_CAPACITY as u64 + 4);
    }
}
