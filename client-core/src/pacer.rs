//! The send pacer: which RTP packet leaves next, and when, under the congestion controller's
//! estimate. It takes the place of webrtc 0.21's pacer, which holds every packet in one FIFO of
//! up to 4096 packets: after a bandwidth collapse that FIFO held a minute of stale video in front
//! of the audio, no feedback came back, and the estimate never recovered (measured in the lab).
//!
//! Real-time rules instead: audio leaves before video; a packet that has waited longer than it
//! can still be useful is dropped rather than sent late (a receiver missing video asks for a
//! keyframe; late audio is played as concealment anyway); RTCP is never held.
//!
//! Also here, the [`DeliveryGuard`]: what was sent against what arrived, a backstop for the
//! congestion controller when a link collapses.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use rtc::interceptor::{Attribute, Interceptor, Pacer, Packet, StreamInfo, TaggedPacket};
use rtc::shared::marshal::MarshalSize;

/// Video older than this in the queue is dropped: by then the frame is late for display.
pub const MAX_VIDEO_WAIT: Duration = Duration::from_millis(300);
/// Audio older than this is dropped: the receiver's playout buffer has concealed it already.
pub const MAX_AUDIO_WAIT: Duration = Duration::from_millis(200);

/// What the pacer sent and dropped.
#[derive(Debug, Default)]
pub struct PacerStats {
    pub video_dropped: AtomicU64,
    pub audio_dropped: AtomicU64,
    /// RTP bytes released to the wire (for the [`DeliveryGuard`]).
    pub bytes_sent: AtomicU64,
}

/// Paces RTP at the estimate, audio first, dropping what waited too long.
pub struct MediaPacer {
    bucket: Pacer,
    /// The SSRC of our audio (Opus or RED, on whatever payload types the session
    /// negotiated): everything else is paced as video.
    audio_ssrc: u32,
    audio: VecDeque<TaggedPacket>,
    video: VecDeque<TaggedPacket>,
    /// RTCP, and packets released by the bucket, waiting for `poll_write`.
    out: VecDeque<TaggedPacket>,
    read: VecDeque<TaggedPacket>,
    stats: Arc<PacerStats>,
}

impl MediaPacer {
    pub fn new(initial_bps: f64, audio_ssrc: u32, stats: Arc<PacerStats>) -> Self {
        MediaPacer {
            bucket: Pacer::new(initial_bps),
            audio_ssrc,
            audio: VecDeque::new(),
            video: VecDeque::new(),
            out: VecDeque::new(),
            read: VecDeque::new(),
            stats,
        }
    }

    fn bits(packet: &TaggedPacket) -> f64 {
        match &packet.message.packet {
            Packet::Rtp(rtp) => (rtp.marshal_size() * 8) as f64,
            _ => 0.0,
        }
    }

    /// Drops what waited longer than it may.
    fn drop_stale(&mut self, now: Instant) {
        for (queue, wait, counter) in [
            (&mut self.audio, MAX_AUDIO_WAIT, &self.stats.audio_dropped),
            (&mut self.video, MAX_VIDEO_WAIT, &self.stats.video_dropped),
        ] {
            while queue
                .front()
                .is_some_and(|p| now.saturating_duration_since(p.now) > wait)
            {
                queue.pop_front();
                counter.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// The queue whose head goes next: audio first.
    fn head(&self) -> Option<&TaggedPacket> {
        self.audio.front().or_else(|| self.video.front())
    }
}

impl rtc::sansio::Protocol<TaggedPacket, TaggedPacket, ()> for MediaPacer {
    type Rout = TaggedPacket;
    type Wout = TaggedPacket;
    type Eout = ();
    type Error = rtc::shared::error::Error;
    type Time = Instant;

    fn handle_read(&mut self, msg: TaggedPacket) -> Result<(), Self::Error> {
        // The congestion controller (wire-most) attaches its new estimate to the feedback that
        // produced it, on the read leg: follow it, as the crate's pacer does.
        if let Some(Attribute::TargetBitrateChanged { bits_per_second }) =
            msg.message.get(&Attribute::TargetBitrateChanged {
                bits_per_second: 0.0,
            })
        {
            self.bucket.set_target_bitrate(*bits_per_second);
        }
        self.read.push_back(msg);
        Ok(())
    }

    fn poll_read(&mut self) -> Option<TaggedPacket> {
        self.read.pop_front()
    }

    fn handle_write(&mut self, msg: TaggedPacket) -> Result<(), Self::Error> {
        // RTCP (and anything else that is not RTP) is never held.
        let audio = match &msg.message.packet {
            Packet::Rtp(rtp) => rtp.header.ssrc == self.audio_ssrc,
            _ => {
                self.out.push_back(msg);
                return Ok(());
            }
        };
        let now = msg.now;
        if audio {
            self.audio.push_back(msg);
        } else {
            self.video.push_back(msg);
        }
        // Whatever the budget allows goes at once, without waiting for a timeout.
        self.handle_timeout(now)
    }

    fn poll_write(&mut self) -> Option<TaggedPacket> {
        self.out.pop_front()
    }

    fn handle_timeout(&mut self, now: Instant) -> Result<(), Self::Error> {
        self.bucket.refill(now);
        self.drop_stale(now);
        while let Some(head) = self.head() {
            let bits = Self::bits(head);
            if !self.bucket.can_release(bits) {
                break;
            }
            let mut packet = if self.audio.is_empty() {
                self.video.pop_front()
            } else {
                self.audio.pop_front()
            }
            .expect("a head was there");
            self.bucket.consume(bits);
            self.stats
                .bytes_sent
                .fetch_add((bits / 8.0) as u64, Ordering::Relaxed);
            // It departs now: the send history congestion control reads must see the release
            // instant, or the wait here would be charged to the network.
            packet.now = now;
            self.out.push_back(packet);
        }
        Ok(())
    }

    fn poll_timeout(&mut self) -> Option<Instant> {
        let head = self.head()?;
        let release = self.bucket.releasable_at(Self::bits(head));
        // Wake up by the time the oldest packet goes stale too, so it is dropped on time.
        let stale = [
            self.audio.front().map(|p| p.now + MAX_AUDIO_WAIT),
            self.video.front().map(|p| p.now + MAX_VIDEO_WAIT),
        ]
        .into_iter()
        .flatten()
        .min();
        [release, stale].into_iter().flatten().min()
    }
}

impl Interceptor for MediaPacer {
    fn bind_local_stream(&mut self, _info: &StreamInfo) {}
    fn unbind_local_stream(&mut self, _info: &StreamInfo) {}
    fn bind_remote_stream(&mut self, _info: &StreamInfo) {}
    fn unbind_remote_stream(&mut self, _info: &StreamInfo) {}
}

/// How long a stretch the delivery guard compares what was sent with what arrived.
const DELIVERY_WINDOW: Duration = Duration::from_secs(1);
/// Below this share of what was sent arriving, the path is collapsing.
const DELIVERED_SHARE_MIN: f64 = 0.5;
/// Growth of the cap per second once deliveries keep up again (GCC's own pace).
const CAP_GROWTH_PER_SEC: f64 = 1.08;

/// A backstop for the congestion controller on a sudden collapse. When the link drops to a
/// fraction of the send rate, webrtc 0.21's GCC learns it slowly (its feedback then mentions a
/// few arrived packets and seldom the lost ones: measured, the estimate stayed at 2.5 Mbps for
/// 2.5 s on a 100 kbps link, and audio queued behind video all that time). The guard compares
/// the bytes the pacer sent with the bytes the feedback says arrived, over the last second, and
/// when less than half arrived it caps the estimate at 85% of what did. The cap then grows at
/// GCC's pace and is lifted once GCC itself is lower.
#[derive(Debug, Default)]
pub struct DeliveryGuard {
    /// (when, total bytes sent so far).
    sent: VecDeque<(Instant, u64)>,
    /// (when, bytes reported arrived).
    arrived: VecDeque<(Instant, u64)>,
    cap: Option<f64>,
    last: Option<Instant>,
}

impl DeliveryGuard {
    /// One batch of feedback at `now`: `arrived_bytes` reported arrived, `sent_total` bytes
    /// sent by the pacer so far.
    pub fn on_feedback(&mut self, now: Instant, arrived_bytes: u64, sent_total: u64, floor: f64) {
        self.sent.push_back((now, sent_total));
        self.arrived.push_back((now, arrived_bytes));
        let start = now.checked_sub(DELIVERY_WINDOW).unwrap_or(now);
        // Keep one sent sample at or before the window's start, as its baseline.
        while self.sent.len() > 1 && self.sent[1].0 <= start {
            self.sent.pop_front();
        }
        while self.arrived.front().is_some_and(|(t, _)| *t <= start) {
            self.arrived.pop_front();
        }
        let elapsed = self
            .last
            .map_or(Duration::ZERO, |l| now.saturating_duration_since(l));
        self.last = Some(now);
        let (t0, base) = self.sent[0];
        let span = now.saturating_duration_since(t0).as_secs_f64();
        if span < 0.6 * DELIVERY_WINDOW.as_secs_f64() {
            return;
        }
        let sent_bps = (sent_total - base) as f64 * 8.0 / span;
        let arrived_bps = self.arrived.iter().map(|(_, b)| *b).sum::<u64>() as f64 * 8.0 / span;
        if sent_bps > 0.0 && arrived_bps < DELIVERED_SHARE_MIN * sent_bps {
            let cap = (arrived_bps * 0.85).max(floor);
            self.cap = Some(self.cap.map_or(cap, |c| c.min(cap)));
        } else if let Some(cap) = &mut self.cap {
            *cap *= CAP_GROWTH_PER_SEC.powf(elapsed.as_secs_f64().min(1.0));
        }
    }

    /// The estimate to use, given the congestion controller's own: the lower of the two while
    /// a cap holds.
    pub fn limit(&mut self, estimate: f64) -> f64 {
        match self.cap {
            Some(cap) if cap < estimate => cap,
            Some(_) => {
                self.cap = None;
                estimate
            }
            None => estimate,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feedback every 100 ms for `secs`: sending `sent_bps`, `arrived_bps` getting through.
    fn run(
        g: &mut DeliveryGuard,
        t: &mut Instant,
        total: &mut u64,
        sent_bps: f64,
        arrived_bps: f64,
        secs: f64,
        estimate: f64,
    ) -> f64 {
        let mut out = estimate;
        for _ in 0..(secs * 10.0) as usize {
            *t += Duration::from_millis(100);
            *total += (sent_bps / 80.0) as u64;
            g.on_feedback(*t, (arrived_bps / 80.0) as u64, *total, 80_000.0);
            out = g.limit(estimate);
        }
        out
    }

    #[test]
    fn a_healthy_or_app_limited_path_is_left_alone() {
        let (mut g, mut t, mut total) = (DeliveryGuard::default(), Instant::now(), 0);
        assert_eq!(run(&mut g, &mut t, &mut total, 2e6, 2e6, 5.0, 2.5e6), 2.5e6);
        // Audio only: little is sent, all of it arrives.
        assert_eq!(run(&mut g, &mut t, &mut total, 5e4, 5e4, 5.0, 2.5e6), 2.5e6);
    }

    #[test]
    fn a_collapse_is_capped_within_a_second_and_the_cap_lifts_after() {
        let (mut g, mut t, mut total) = (DeliveryGuard::default(), Instant::now(), 0);
        run(&mut g, &mut t, &mut total, 2e6, 2e6, 3.0, 2.5e6);
        // The link drops to 100 kbps while GCC still says 2.5 Mbps.
        let capped = run(&mut g, &mut t, &mut total, 2e6, 1e5, 1.0, 2.5e6);
        assert!(capped < 2e5, "{capped}");
        let floor = run(&mut g, &mut t, &mut total, 2e6, 5e4, 2.0, 2.5e6);
        assert!((80_000.0..1e5).contains(&floor), "{floor}");
        // Deliveries keep up again: the cap grows, and goes once GCC is lower.
        let later = run(&mut g, &mut t, &mut total, 9e4, 9e4, 5.0, 2.5e6);
        assert!(later > floor * 1.3, "{later} after {floor}");
        assert_eq!(run(&mut g, &mut t, &mut total, 9e4, 9e4, 0.2, 1e5), 1e5);
        assert_eq!(run(&mut g, &mut t, &mut total, 9e4, 9e4, 0.2, 2.5e6), 2.5e6);
    }
}
