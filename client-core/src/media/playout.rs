//! The audio playout (jitter) buffer: RTP-like packets in, one 20 ms frame out per pull.
//!
//! Sans-IO: arrival and playout times are arguments, the buffer never reads the clock, so it is
//! tested with virtual time.
//!
//! # Policy
//! - **Start**: buffer until the packets span the target delay (or the first packet has waited
//!   that long), then play from the lowest sequence number.
//! - **Each pull** plays the next sequence number: the packet itself if present; else the FEC
//!   copy carried by the following packet; else concealment (PLC). When later packets exist the
//!   missing one is considered lost and skipped; when nothing at all is buffered (an underrun,
//!   usually a delay spike) the buffer conceals *without* advancing, so the late packet still
//!   plays when it arrives: that is how a spike grows the actual delay. After `max_expand_ms`
//!   of underrun it stops concealing, plays silence and buffers again.
//! - **Target delay** = the spread of packet transit times (arrival minus media time) over the
//!   last `jitter_window_ms`, plus one frame, rounded up to whole frames and clamped to
//!   `[min_delay_ms, max_delay_ms]`. A spike raises it at once; it falls back once the spike
//!   leaves the window.
//! - **Shrink**: when more than target + 2 frames are buffered, one frame is decoded and
//!   dropped (at most every 60 ms; without limit above `max_delay_ms`). A real time-stretcher
//!   would be smoother; dropping whole frames is the simple first version.
//! - Packets older than the playout point are counted as late and dropped; duplicates ignored;
//!   a sequence jump of more than 2 s restarts the buffer.

use std::collections::{BTreeMap, VecDeque};

use super::frame::{AudioFrame, FRAME_SAMPLES, FRAME_US, SAMPLE_RATE};
use super::opus_codec::{AudioDecoder, OpusDecoder};

/// Playout buffer settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PlayoutConfig {
    /// Lowest target delay (ms).
    pub min_delay_ms: u32,
    /// Highest target delay (ms).
    pub max_delay_ms: u32,
    /// How long a jitter observation counts (ms).
    pub jitter_window_ms: u32,
    /// Longest concealment during an underrun before falling back to silence (ms).
    pub max_expand_ms: u32,
}

impl Default for PlayoutConfig {
    fn default() -> Self {
        Self {
            min_delay_ms: 20,
            max_delay_ms: 200,
            jitter_window_ms: 4_000,
            max_expand_ms: 100,
        }
    }
}

/// How a pulled frame was produced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PlayoutKind {
    /// Decoded from its own packet.
    Normal,
    /// Recovered from the next packet's forward error correction.
    Fec,
    /// Decoded from the copy a later packet carried (RED, `red.rs`): its own packet was lost.
    Redundant,
    /// Synthesised by packet-loss concealment.
    Concealed,
    /// Silence: buffering, or the stream stopped.
    Silence,
}

/// One pulled frame.
#[derive(Debug, Clone)]
pub struct Playout {
    /// The audio; `capture_us` holds the pull's `now_us`.
    pub frame: AudioFrame,
    /// How it was produced.
    pub kind: PlayoutKind,
    /// Sequence number played (for `Normal` and `Fec`) or concealed.
    pub seq: Option<u16>,
}

/// Counters and levels of a playout buffer.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PlayoutStats {
    /// Frames decoded from their own packet.
    pub played: u64,
    /// Frames recovered through FEC.
    pub fec_recovered: u64,
    /// Frames decoded from a redundant copy (RED) after their own packet was lost.
    pub red_recovered: u64,
    /// Frames concealed (PLC), including after decode errors.
    pub concealed: u64,
    /// Silent frames (buffering or stopped).
    pub silence: u64,
    /// Packets that arrived after their playout time.
    pub late_dropped: u64,
    /// Duplicate packets ignored.
    pub duplicates: u64,
    /// Frames dropped to shrink the delay.
    pub accelerated: u64,
    /// Packets the decoder rejected.
    pub decode_errors: u64,
    /// Current target delay (ms).
    pub target_delay_ms: u32,
    /// Audio currently buffered ahead of the playout point (ms).
    pub buffered_ms: u32,
}

/// One buffered frame's packet.
#[derive(Debug)]
struct Buffered {
    payload: Vec<u8>,
    /// A redundant copy (RED) a later packet carried, not the frame's own packet.
    copy: bool,
}

/// Adaptive audio jitter buffer owning its decoder (Opus by default).
#[derive(Debug)]
pub struct AudioPlayoutBuffer<D: AudioDecoder = OpusDecoder> {
    decoder: D,
    config: PlayoutConfig,
    packets: BTreeMap<u64, Buffered>,
    /// Next extended sequence number to play; `None` while buffering.
    next_seq: Option<u64>,
    highest_seq: Option<u64>,
    highest_ts: Option<u64>,
    /// (arrival_us, transit_us) observations within the jitter window.
    transits: VecDeque<(u64, i64)>,
    target_delay_us: u64,
    buffering_since: Option<u64>,
    expand_run: u32,
    last_accelerate_us: Option<u64>,
    stats: PlayoutStats,
}

fn unwrap_seq(seq: u16, reference: Option<u64>) -> Option<u64> {
    match reference {
        None => Some(u64::from(seq) + (1 << 16)),
        Some(r) => {
            let diff = i64::from(seq.wrapping_sub(r as u16) as i16);
            u64::try_from(r as i64 + diff).ok()
        }
    }
}

fn unwrap_ts(ts: u32, reference: Option<u64>) -> u64 {
    match reference {
        None => u64::from(ts) + (1 << 32),
        Some(r) => {
            let diff = i64::from(ts.wrapping_sub(r as u32) as i32);
            (r as i64 + diff).max(0) as u64
        }
    }
}

impl AudioPlayoutBuffer<OpusDecoder> {
    /// A buffer with a new Opus decoder.
    ///
    /// # Errors
    /// If libopus cannot create a decoder.
    pub fn new(config: PlayoutConfig) -> super::Result<Self> {
        Ok(Self::with_decoder(OpusDecoder::new()?, config))
    }
}

impl<D: AudioDecoder> AudioPlayoutBuffer<D> {
    /// A buffer around any [`AudioDecoder`].
    pub fn with_decoder(decoder: D, config: PlayoutConfig) -> Self {
        let min = u64::from(config.min_delay_ms.max(1)) * 1000;
        Self {
            decoder,
            config,
            packets: BTreeMap::new(),
            next_seq: None,
            highest_seq: None,
            highest_ts: None,
            transits: VecDeque::new(),
            target_delay_us: min,
            buffering_since: None,
            expand_run: 0,
            last_accelerate_us: None,
            stats: PlayoutStats {
                target_delay_ms: config.min_delay_ms,
                ..Default::default()
            },
        }
    }

    /// Counters, target delay and buffered level.
    pub fn stats(&self) -> PlayoutStats {
        PlayoutStats {
            target_delay_ms: (self.target_delay_us / 1000) as u32,
            buffered_ms: self.buffered_ms(),
            ..self.stats
        }
    }

    /// Current target delay (ms).
    pub fn target_delay_ms(&self) -> u32 {
        (self.target_delay_us / 1000) as u32
    }

    /// Audio buffered ahead of the playout point (ms), gaps included.
    pub fn buffered_ms(&self) -> u32 {
        let Some(&high) = self.packets.keys().next_back() else {
            return 0;
        };
        let from = match self.next_seq {
            Some(n) => n,
            None => *self.packets.keys().next().unwrap_or(&high),
        };
        (high + 1).saturating_sub(from).min(1000) as u32 * (FRAME_US / 1000) as u32
    }

    /// A packet arrived: RTP sequence number and timestamp (48 kHz units), payload, and the
    /// arrival time on the receiver's clock.
    pub fn push(&mut self, seq: u16, rtp_ts: u32, payload: Vec<u8>, arrival_us: u64) {
        let Some(ext) = unwrap_seq(seq, self.highest_seq) else {
            self.stats.late_dropped += 1;
            return;
        };
        // The packet itself after its redundant copy (reordered, or resent) takes the copy's
        // place, and the frame counts as played from its own packet.
        if self.packets.get(&ext).is_some_and(|b| !b.copy) {
            self.stats.duplicates += 1;
            return;
        }
        let ext_ts = unwrap_ts(rtp_ts, self.highest_ts);
        self.observe_transit(ext_ts, arrival_us);
        if self.highest_seq.is_none_or(|h| ext > h) {
            self.highest_seq = Some(ext);
            self.highest_ts = Some(ext_ts);
        }
        if let Some(n) = self.next_seq {
            if ext < n {
                self.stats.late_dropped += 1;
                return;
            }
            if ext > n + 100 {
                // More than 2 s ahead: the sender restarted or we fell far behind.
                self.packets.clear();
                self.next_seq = None;
                self.buffering_since = None;
            }
        }
        if self.next_seq.is_none() && self.buffering_since.is_none() {
            self.buffering_since = Some(arrival_us);
        }
        self.packets.insert(
            ext,
            Buffered {
                payload,
                copy: false,
            },
        );
        self.bound();
    }

    /// A redundant copy of packet `seq` arrived inside a later packet (RED). It fills the gap
    /// if `seq` was lost and is still ahead of the playout point; otherwise it is ignored. It
    /// says nothing about transit times (it came late on purpose) and counts as neither late
    /// nor duplicate. Push the carrying packet first.
    pub fn push_redundant(&mut self, seq: u16, payload: Vec<u8>) {
        let Some(ext) = unwrap_seq(seq, self.highest_seq) else {
            return;
        };
        if self.packets.contains_key(&ext)
            || self.next_seq.is_none_or(|n| ext < n)
            || self.highest_seq.is_none_or(|h| ext >= h)
        {
            return;
        }
        self.packets.insert(
            ext,
            Buffered {
                payload,
                copy: true,
            },
        );
        self.bound();
    }

    /// Bounds memory: never hold more than 2 s.
    fn bound(&mut self) {
        while self.packets.len() > 100 {
            self.packets.pop_first();
        }
    }

    fn observe_transit(&mut self, ext_ts: u64, arrival_us: u64) {
        let media_us = ext_ts.saturating_mul(1_000_000) / u64::from(SAMPLE_RATE);
        let transit = arrival_us as i64 - media_us as i64;
        self.transits.push_back((arrival_us, transit));
        let window = u64::from(self.config.jitter_window_ms) * 1000;
        while let Some(&(t, _)) = self.transits.front() {
            if t + window < arrival_us {
                self.transits.pop_front();
            } else {
                break;
            }
        }
        let (lo, hi) = self
            .transits
            .iter()
            .fold((i64::MAX, i64::MIN), |(lo, hi), &(_, d)| {
                (lo.min(d), hi.max(d))
            });
        let spread = (hi - lo).max(0) as u64;
        let frames = (spread + FRAME_US).div_ceil(FRAME_US);
        let min = u64::from(self.config.min_delay_ms) * 1000;
        let max = u64::from(self.config.max_delay_ms.max(self.config.min_delay_ms)) * 1000;
        self.target_delay_us = (frames * FRAME_US).clamp(min, max);
    }

    /// Pulls the next 20 ms frame to play at `now_us` (call once per 20 ms of device time).
    pub fn pull(&mut self, now_us: u64) -> Playout {
        let mut frame = AudioFrame::silence(now_us);
        let Some(mut n) = self.playout_point(now_us) else {
            self.stats.silence += 1;
            return Playout {
                frame,
                kind: PlayoutKind::Silence,
                seq: None,
            };
        };
        // Shrink towards the target by dropping a frame.
        let buffered = u64::from(self.buffered_ms()) * 1000;
        let over_max = buffered > u64::from(self.config.max_delay_ms) * 1000 + 2 * FRAME_US;
        let may_drop = over_max
            || self
                .last_accelerate_us
                .is_none_or(|t| now_us >= t + 3 * FRAME_US);
        if buffered > self.target_delay_us + 2 * FRAME_US
            && may_drop
            && self.packets.contains_key(&(n + 1))
            && let Some(p) = self.packets.remove(&n)
        {
            let mut scratch = [0i16; FRAME_SAMPLES];
            if self.decoder.decode(&p.payload, &mut scratch).is_err() {
                self.stats.decode_errors += 1;
            }
            self.stats.accelerated += 1;
            self.last_accelerate_us = Some(now_us);
            n += 1;
            self.next_seq = Some(n);
        }
        let seq = Some(n as u16);
        if let Some(p) = self.packets.remove(&n) {
            self.next_seq = Some(n + 1);
            self.expand_run = 0;
            return match self.decoder.decode(&p.payload, &mut frame.samples) {
                Ok(()) if p.copy => {
                    self.stats.red_recovered += 1;
                    Playout {
                        frame,
                        kind: PlayoutKind::Redundant,
                        seq,
                    }
                }
                Ok(()) => {
                    self.stats.played += 1;
                    Playout {
                        frame,
                        kind: PlayoutKind::Normal,
                        seq,
                    }
                }
                Err(_) => {
                    self.stats.decode_errors += 1;
                    self.conceal(frame, seq)
                }
            };
        }
        if let Some(next) = self.packets.get(&(n + 1)) {
            self.next_seq = Some(n + 1);
            self.expand_run = 0;
            return match self.decoder.decode_fec(&next.payload, &mut frame.samples) {
                Ok(()) => {
                    self.stats.fec_recovered += 1;
                    Playout {
                        frame,
                        kind: PlayoutKind::Fec,
                        seq,
                    }
                }
                Err(_) => {
                    self.stats.decode_errors += 1;
                    self.conceal(frame, seq)
                }
            };
        }
        if !self.packets.is_empty() {
            // Later packets exist but neither this one nor the next: lost, skip it.
            self.next_seq = Some(n + 1);
            self.expand_run = 0;
            return self.conceal(frame, seq);
        }
        // Underrun: conceal without advancing so a late packet still plays.
        self.expand_run += 1;
        if u64::from(self.expand_run) * FRAME_US > u64::from(self.config.max_expand_ms) * 1000 {
            self.next_seq = None;
            self.buffering_since = None;
            self.expand_run = 0;
            self.stats.silence += 1;
            return Playout {
                frame,
                kind: PlayoutKind::Silence,
                seq: None,
            };
        }
        self.conceal(frame, seq)
    }

    /// The sequence number to play now, starting playout when enough is buffered.
    fn playout_point(&mut self, now_us: u64) -> Option<u64> {
        if let Some(n) = self.next_seq {
            return Some(n);
        }
        let (&low, _) = self.packets.first_key_value()?;
        let (&high, _) = self.packets.last_key_value()?;
        let span = (high - low + 1) * FRAME_US;
        let waited = self.buffering_since.map_or(0, |t| now_us.saturating_sub(t));
        if span >= self.target_delay_us || waited >= self.target_delay_us {
            self.next_seq = Some(low);
            self.buffering_since = None;
            Some(low)
        } else {
            None
        }
    }

    fn conceal(&mut self, mut frame: AudioFrame, seq: Option<u16>) -> Playout {
        if self.decoder.conceal(&mut frame.samples).is_err() {
            frame.samples.fill(0);
        }
        self.stats.concealed += 1;
        Playout {
            frame,
            kind: PlayoutKind::Concealed,
            seq,
        }
    }
}
