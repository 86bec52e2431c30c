//! The send pacer: which RTP packet leaves next, and when, under the congestion controller's
//! estimate. It takes the place of webrtc 0.21's pacer, which holds every packet in one FIFO of
//! up to 4096 packets: after a bandwidth collapse that FIFO held a minute of stale video in front
//! of the audio, no feedback came back, and the estimate never recovered (measured in the lab).
//!
//! Real-time rules instead: audio leaves before video; a packet that has waited longer than it
//! can still be useful is dropped rather than sent late (a receiver missing video asks for a
//! keyframe; late audio is played as concealment anyway); RTCP is never held.
//!
//! What the estimate is, and the rules' numbers, come from `congestion.rs`.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use rtc::interceptor::{Attribute, Interceptor, Pacer, Packet, StreamInfo, TaggedPacket};
use rtc::shared::marshal::MarshalSize;

use crate::congestion::CongestionConfig;

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
    /// How long audio and video may wait (`CongestionConfig::max_audio_wait`, `max_video_wait`).
    max_audio_wait: Duration,
    max_video_wait: Duration,
}

impl MediaPacer {
    pub fn new(config: &CongestionConfig, audio_ssrc: u32, stats: Arc<PacerStats>) -> Self {
        MediaPacer {
            max_audio_wait: config.max_audio_wait,
            max_video_wait: config.max_video_wait,
            bucket: Pacer::new(config.initial_bps),
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
            (
                &mut self.audio,
                self.max_audio_wait,
                &self.stats.audio_dropped,
            ),
            (
                &mut self.video,
                self.max_video_wait,
                &self.stats.video_dropped,
            ),
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
            self.audio.front().map(|p| p.now + self.max_audio_wait),
            self.video.front().map(|p| p.now + self.max_video_wait),
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
