//! Congestion control, sans-IO: what the send side may put on the wire, from the feedback the
//! peer sends back and the time that comes with it. No clock, no tasks, no locks; the engine
//! feeds it (from inside webrtc 0.21's interceptor chain) and publishes what it says, and the
//! link simulator (`tests/congestion_sim.rs`) feeds it in virtual time.
//!
//! The composition ([`Estimator`]):
//! - GCC's delay-based estimate (webrtc 0.21's `Gcc`, itself sans-IO: time is an argument);
//! - our loss-based half ([`LossControl`], `loss_control.rs`), which tells random loss from
//!   congestion where GCC's own backs off on any loss over 10%;
//! - the [`DeliveryGuard`], a backstop when a link collapses faster than GCC learns;
//! - the path-change settle: after an ICE restart or a new description the first feedback
//!   reports everything the old path swallowed as lost, so loss and delivery are not judged for
//!   [`CongestionConfig::path_settle`];
//! - the lost-report rule: packets no feedback ever mentioned (the report about them was lost
//!   on the way back) are not judged as lost ([`unreported_run`]);
//! - the floor and ceiling.
//!
//! And the policies next to it: the pacer's rules ([`CongestionConfig::max_video_wait`],
//! [`CongestionConfig::max_audio_wait`]; `pacer.rs` carries them out), the bounded NACK
//! ([`CongestionConfig::nack_log_packets`]; the engine configures webrtc's generator with it)
//! and the audio redundancy ([`AudioRedundancy`]; the call state machine asks for it).
//!
//! Every coupled number is in [`CongestionConfig`], documented once.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use rtc::interceptor::{BandwidthEstimator, EstimatorStats, Gcc, PacketReport};

use crate::loss_control::LossControl;

/// The numbers congestion control depends on, each documented once.
#[derive(Clone, Debug)]
pub struct CongestionConfig {
    /// Where the estimate starts, bits per second: high enough for 720p so a good link does not
    /// begin at the bottom of the quality ladder.
    pub initial_bps: f64,
    /// The floor, bits per second. It is above what audio alone puts on the wire (Opus with FEC
    /// plus RTP/SRTP/UDP/IP headers, [`Self::audio_wire_bps`]): the pacer holds all RTP to the
    /// estimate, so a floor below that starves audio, the starved packets read as loss, and the
    /// estimate never climbs again (measured in the lab: stuck at a 30 kbps floor after a
    /// collapse, video never back).
    pub min_bps: f64,
    /// The ceiling, bits per second.
    pub max_bps: f64,
    /// What our audio costs on the wire, bits per second (Opus at 32 kbps with in-band FEC,
    /// 50 packets a second, each with about 60 bytes of RTP, SRTP, UDP and IP headers).
    pub audio_wire_bps: f64,
    /// How long after a path change loss and delivery are not judged.
    pub path_settle: Duration,
    /// How long a stretch the delivery guard compares what was sent with what arrived.
    pub delivery_window: Duration,
    /// Below this share of what was sent arriving, the guard takes the path to be collapsing.
    pub delivered_share_min: f64,
    /// Growth of the guard's cap per second once deliveries keep up again (GCC's own pace).
    pub cap_growth_per_sec: f64,
    /// Feedback after a silence longer than this starts the guard's window afresh: the reports
    /// were read late, in a burst (the process descheduled on a loaded machine), and judging
    /// the burst's first report against a second of sending read as a collapse (seen in the
    /// lab: the doctor's estimate at the 80 kbps floor twice in 30 s, the call audio-only; the
    /// simulator's `feedback_read_late_in_a_burst_is_not_a_collapse` reproduces it). Shorter
    /// silences cannot bring the share under half: the reports then cover most of the window.
    pub feedback_silence_max: Duration,
    /// A batch that begins with lost packets sent over at least this long, followed by packets
    /// that mostly arrived, begins with what a lost feedback report was about (see
    /// [`unreported_run`]). The receiver reports every 100 ms (webrtc 0.21's TWCC interval), so
    /// a lost report leaves about 100 ms of packets that no report mentions; random loss of
    /// 20% takes seven packets in a row (60 ms of 640x360 video and audio) about once in
    /// 80,000 batches.
    pub unreported_span_min: Duration,
    /// The pacer's rules (`pacer.rs`): audio leaves before video, and a packet that has waited
    /// longer than it can still be useful is dropped rather than sent late. Video older than
    /// this is late for display (the receiver asks for a keyframe)...
    pub max_video_wait: Duration,
    /// ...and audio older than this has been concealed by the receiver's playout buffer.
    pub max_audio_wait: Duration,
    /// Bounded NACK: webrtc 0.21's generator asks for a missing packet every 100 ms for as long
    /// as it is in a 512-packet log. A retransmission that late is refused by the SRTP replay
    /// window (64 packets), so it was asked for again and again, and every refused copy read as
    /// loss to the congestion controller (measured after a bandwidth collapse: a steady 10%
    /// "loss" on a clean link, and video never came back). So the log keeps only the packets
    /// the replay window still takes...
    pub nack_log_packets: u16,
    /// ...and each is asked for at most this many times.
    pub nacks_per_packet_max: u16,
}

impl Default for CongestionConfig {
    fn default() -> Self {
        CongestionConfig {
            initial_bps: 1_500_000.0,
            min_bps: 80_000.0,
            max_bps: 2_500_000.0,
            audio_wire_bps: 55_000.0,
            path_settle: Duration::from_secs(2),
            delivery_window: Duration::from_secs(1),
            delivered_share_min: 0.5,
            cap_growth_per_sec: 1.08,
            feedback_silence_max: Duration::from_millis(500),
            unreported_span_min: Duration::from_millis(60),
            max_video_wait: Duration::from_millis(300),
            max_audio_wait: Duration::from_millis(200),
            nack_log_packets: 64,
            nacks_per_packet_max: 3,
        }
    }
}

/// The send-side estimate of one peer connection (see the module docs).
pub struct Estimator {
    config: CongestionConfig,
    gcc: Gcc,
    loss: LossControl,
    /// Caps the estimate when far less arrives than the pacer sends.
    guard: DeliveryGuard,
    /// The path changed; the next feedback starts the settle.
    path_changed: bool,
    /// Loss and delivery are not judged before this (a path just changed).
    settle_until: Option<Instant>,
}

impl Estimator {
    pub fn new(config: CongestionConfig) -> Self {
        let (initial, min, max) = (config.initial_bps, config.min_bps, config.max_bps);
        Estimator {
            gcc: Gcc::new(initial, min, max),
            loss: LossControl::new(initial, min, max),
            guard: DeliveryGuard::new(&config),
            path_changed: false,
            settle_until: None,
            config,
        }
    }

    pub fn config(&self) -> &CongestionConfig {
        &self.config
    }

    /// The path is changing: an ICE restart (ours or the peer's) or a new session description.
    /// The feedback that first comes back over the new path reports everything the old one
    /// swallowed as lost; read as congestion it cut the estimate to the floor and sent the call
    /// audio-only for seconds after a handover. So at the next feedback a fresh delivery guard
    /// starts and loss and delivery go unjudged for the settle (the delay-based half goes on).
    pub fn path_changed(&mut self) {
        self.path_changed = true;
    }

    /// One batch of transport feedback at `now`, with the bytes the pacer has released so far.
    pub fn on_reports(&mut self, now: Instant, reports: &[PacketReport], sent_total: u64) {
        if reports.is_empty() {
            return;
        }
        self.gcc.on_reports(now, reports);
        if self.settling(now) {
            return;
        }
        let (unreported, judged) =
            reports.split_at(unreported_run(reports, self.config.unreported_span_min));
        let lost = judged.iter().filter(|r| !r.arrived).count();
        self.loss.update(now, lost, judged.len());
        let arrived: u64 = reports
            .iter()
            .filter(|r| r.arrived)
            .map(|r| r.size as u64)
            .sum();
        let unreported: u64 = unreported.iter().map(|r| r.size as u64).sum();
        self.guard.on_feedback(
            now,
            Delivery {
                arrived,
                unreported,
                sent_total,
            },
            self.config.min_bps,
        );
    }

    fn settling(&mut self, now: Instant) -> bool {
        if std::mem::take(&mut self.path_changed) {
            self.settle_until = Some(now + self.config.path_settle);
            self.guard = DeliveryGuard::new(&self.config);
            self.loss.forget_path();
        }
        self.settle_until.is_some_and(|t| now < t)
    }

    /// GCC's and the loss controller's lower estimate, within the floor and ceiling, before
    /// the delivery guard: the rate the pacer drains its queues at (the guard caps what the
    /// encoder is asked for).
    pub fn pacing_bps(&self) -> f64 {
        self.gcc
            .delay_based_bitrate()
            .min(self.loss.target())
            .clamp(self.config.min_bps, self.config.max_bps)
    }

    /// What may be sent now, bits per second: what the encoder and the quality ladder follow.
    pub fn target_bps(&mut self) -> f64 {
        let estimate = self.pacing_bps();
        self.guard.limit(estimate)
    }

    /// Timers of the delay-based half.
    pub fn handle_timeout(&mut self, now: Instant) {
        self.gcc.handle_timeout(now);
    }

    pub fn poll_timeout(&self) -> Option<Instant> {
        self.gcc.poll_timeout()
    }

    pub fn stats(&self) -> EstimatorStats {
        let mut stats = self.gcc.stats();
        stats.loss_based_bitrate = Some(self.loss.target());
        stats.packet_loss = self.loss.average_loss();
        stats
    }
}

/// How many of a batch's first packets were never mentioned by a report that arrived.
///
/// The send side learns a packet's fate only from the receiver's feedback, and webrtc 0.21's
/// send history (`rtpfb::history::take_reports`) hands over as lost every packet up to the
/// highest one reported arrived. When a report is lost on the way back (loss on both
/// directions of a link), the packets it was about come first in the next batch, all "lost":
/// 100 ms of packets at once. Judged as loss, every lost report looked like a burst of
/// congestion, the loss controller backed off, the rate never varied enough for the path's own
/// loss to be learned, and the estimate went to the floor within seconds (an independent lab
/// measured 2.5 Mbit/s to 80 kbps in 8 s at 10-15% loss both ways; the simulator reproduces
/// it: `tests/congestion_sim.rs`, `both_ways_loss_keeps_video`).
///
/// The signature: a run of lost packets at the batch's head sent over at least `span_min`
/// (random loss rarely takes that many in a row), followed by packets that mostly arrived.
/// Congestion looks different: a queue that overflows drops packets between the ones that get
/// through, so what follows the run is mostly lost too (and a collapse is the delivery guard's
/// to catch, which still counts these bytes as not arrived).
pub fn unreported_run(reports: &[PacketReport], span_min: Duration) -> usize {
    let Some(first_arrived) = reports.iter().position(|r| r.arrived) else {
        return 0;
    };
    if first_arrived == 0 {
        return 0;
    }
    let span = reports[first_arrived]
        .departure
        .saturating_duration_since(reports[0].departure);
    let rest = &reports[first_arrived..];
    let rest_lost = rest.iter().filter(|r| !r.arrived).count();
    if span >= span_min && 2 * rest_lost < rest.len() {
        first_arrived
    } else {
        0
    }
}

/// What one batch of feedback says to the [`DeliveryGuard`], in bytes.
#[derive(Clone, Copy, Debug)]
pub struct Delivery {
    /// Reported arrived.
    pub arrived: u64,
    /// Sent, but about them the report was lost ([`unreported_run`]): neither arrived nor
    /// lost as far as anyone knows, so they are left out of what was sent. Counted as not
    /// delivered, a few lost reports in one second (12% of them lost on a both-ways lossy
    /// link) took the share under half at a low packet rate and capped the estimate near the
    /// floor (simulator and lab: the 80 kbps floor, then 8% a second back up).
    pub unreported: u64,
    /// Released by the pacer so far.
    pub sent_total: u64,
}

/// A backstop for the congestion controller on a sudden collapse. When the link drops to a
/// fraction of the send rate, webrtc 0.21's GCC learns it slowly (its feedback then mentions a
/// few arrived packets and seldom the lost ones: measured, the estimate stayed at 2.5 Mbps for
/// 2.5 s on a 100 kbps link, and audio queued behind video all that time). The guard compares
/// the bytes the pacer sent with the bytes the feedback says arrived, over the last second, and
/// when less than half arrived it caps the estimate at 85% of what did. The cap then grows at
/// GCC's pace and is lifted once GCC itself is lower.
#[derive(Debug)]
pub struct DeliveryGuard {
    window: Duration,
    share_min: f64,
    growth_per_sec: f64,
    silence_max: Duration,
    /// (when, total bytes sent so far).
    sent: VecDeque<(Instant, u64)>,
    /// (when, bytes reported arrived, bytes no report mentioned).
    arrived: VecDeque<(Instant, u64, u64)>,
    cap: Option<f64>,
    last: Option<Instant>,
}

impl Default for DeliveryGuard {
    fn default() -> Self {
        Self::new(&CongestionConfig::default())
    }
}

impl DeliveryGuard {
    pub fn new(config: &CongestionConfig) -> Self {
        DeliveryGuard {
            window: config.delivery_window,
            share_min: config.delivered_share_min,
            growth_per_sec: config.cap_growth_per_sec,
            silence_max: config.feedback_silence_max,
            sent: VecDeque::new(),
            arrived: VecDeque::new(),
            cap: None,
            last: None,
        }
    }

    /// One batch of feedback at `now`.
    pub fn on_feedback(&mut self, now: Instant, delivery: Delivery, floor: f64) {
        let sent_total = delivery.sent_total;
        if self
            .last
            .is_some_and(|l| now.saturating_duration_since(l) > self.silence_max)
        {
            // Read late: what the window holds no longer says what was sent against what
            // arrived. Start it again (the cap, if any, stays).
            self.sent.clear();
            self.arrived.clear();
        }
        self.sent.push_back((now, sent_total));
        self.arrived
            .push_back((now, delivery.arrived, delivery.unreported));
        let start = now.checked_sub(self.window).unwrap_or(now);
        // Keep one sent sample at or before the window's start, as its baseline.
        while self.sent.len() > 1 && self.sent[1].0 <= start {
            self.sent.pop_front();
        }
        while self.arrived.front().is_some_and(|(t, _, _)| *t <= start) {
            self.arrived.pop_front();
        }
        let elapsed = self
            .last
            .map_or(Duration::ZERO, |l| now.saturating_duration_since(l));
        self.last = Some(now);
        let (t0, base) = self.sent[0];
        let span = now.saturating_duration_since(t0).as_secs_f64();
        if span < 0.6 * self.window.as_secs_f64() {
            return;
        }
        let unreported: u64 = self.arrived.iter().map(|(_, _, u)| *u).sum();
        let sent_bps = (sent_total - base).saturating_sub(unreported) as f64 * 8.0 / span;
        let arrived_bps = self.arrived.iter().map(|(_, b, _)| *b).sum::<u64>() as f64 * 8.0 / span;
        if sent_bps > 0.0 && arrived_bps < self.share_min * sent_bps {
            let cap = (arrived_bps * 0.85).max(floor);
            self.cap = Some(self.cap.map_or(cap, |c| c.min(cap)));
        } else if let Some(cap) = &mut self.cap {
            *cap *= self.growth_per_sec.powf(elapsed.as_secs_f64().min(1.0));
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

// The audio-redundancy policy.

/// Outbound loss (percent, from a peer's reception reports) at which audio gets redundancy.
const RED_ON_LOSS_PCT: f64 = 2.0;
/// Redundancy stays on until no report has shown that much loss for this long.
const RED_HOLD: Duration = Duration::from_secs(10);
/// Redundancy doubles the audio payload (about 30 kbps more): only with this much estimate.
const RED_MIN_ESTIMATE_KBPS: u32 = 200;

/// Whether audio packets also carry the previous frame (RED, `media::red`): on while the peers
/// report loss on what we send and the estimate has room for the second copy; off on a clean
/// link and when bandwidth is short (after a collapse the extra copy would crowd out the audio
/// it protects). Pure, like the ladder.
#[derive(Debug, Default)]
pub struct AudioRedundancy {
    on: bool,
    lossy_at: Option<Instant>,
    estimate_kbps: Option<u32>,
}

impl AudioRedundancy {
    pub fn is_on(&self) -> bool {
        self.on
    }

    /// A peer reported `loss_pct` on what we send. Returns the new setting when it changed.
    pub fn handle_loss(&mut self, now: Instant, loss_pct: f64) -> Option<bool> {
        if loss_pct >= RED_ON_LOSS_PCT {
            self.lossy_at = Some(now);
        }
        self.decide(now)
    }

    /// A new bandwidth estimate. Returns the new setting when it changed.
    pub fn handle_estimate(&mut self, now: Instant, estimate_kbps: u32) -> Option<bool> {
        self.estimate_kbps = Some(estimate_kbps);
        self.decide(now)
    }

    fn decide(&mut self, now: Instant) -> Option<bool> {
        let want = self.lossy_at.is_some_and(|t| now < t + RED_HOLD)
            && self
                .estimate_kbps
                .is_some_and(|e| e >= RED_MIN_ESTIMATE_KBPS);
        (want != self.on).then(|| {
            self.on = want;
            want
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn audio_redundancy_follows_loss_and_room() {
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        let mut r = AudioRedundancy::default();
        assert_eq!(r.handle_estimate(at(0), 1500), None);
        // A clean link: off.
        assert_eq!(r.handle_loss(at(1), 0.5), None);
        // Loss: on at once.
        assert_eq!(r.handle_loss(at(2), 8.0), Some(true));
        assert_eq!(r.handle_loss(at(3), 1.0), None);
        // The estimate collapses: off, whatever the loss; back when there is room again.
        assert_eq!(r.handle_estimate(at(4), 90), Some(false));
        assert_eq!(r.handle_loss(at(5), 30.0), None);
        assert_eq!(r.handle_estimate(at(6), 400), Some(true));
        // Ten seconds without loss: off.
        assert_eq!(r.handle_loss(at(14), 0.0), None);
        assert_eq!(r.handle_loss(at(15), 0.0), Some(false));
        assert!(!r.is_on());
    }

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
            let delivery = Delivery {
                arrived: (arrived_bps / 80.0) as u64,
                unreported: 0,
                sent_total: *total,
            };
            g.on_feedback(*t, delivery, 80_000.0);
            out = g.limit(estimate);
        }
        out
    }

    /// `lost[i]`: packet i, sent 10 ms after the one before, did not arrive.
    fn batch(lost: &[bool]) -> Vec<PacketReport> {
        let t0 = Instant::now();
        lost.iter()
            .enumerate()
            .map(|(i, lost)| PacketReport {
                ssrc: 1,
                id: i as u64,
                rtp_sequence_number: i as u16,
                is_twcc: true,
                twcc_sequence_number: i as u16,
                size: 1000,
                arrived: !lost,
                departure: t0 + Duration::from_millis(10 * i as u64),
                arrival: (!lost).then(|| Duration::from_millis(10 * i as u64)),
                ecn: rtc::rtcp::transport_feedbacks::cc_feedback_report::Ecn::NotEct,
            })
            .collect()
    }

    #[test]
    fn a_lost_report_s_packets_are_told_from_loss_and_congestion() {
        let span = CongestionConfig::default().unreported_span_min;
        // 100 ms no report mentioned, then a report's packets, one of them lost.
        let mut gap = vec![true; 10];
        gap.extend([false, false, true, false, false, false]);
        assert_eq!(unreported_run(&batch(&gap), span), 10);
        // Random loss: a short run at the head is judged.
        assert_eq!(
            unreported_run(&batch(&[true, true, false, false, true, false]), span),
            0
        );
        // An overflowing queue: what follows the run is mostly lost too.
        let mut overflow = vec![true; 10];
        overflow.extend([false, true, true, true, false, true, true]);
        assert_eq!(unreported_run(&batch(&overflow), span), 0);
        // Nothing arrived at all (no report would say so): nothing to tell.
        assert_eq!(unreported_run(&batch(&[true; 12]), span), 0);
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
