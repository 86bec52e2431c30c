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
