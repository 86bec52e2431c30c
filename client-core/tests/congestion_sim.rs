//! The congestion controller (`congestion::Estimator`) and the quality ladder
//! (`quality::QualityController`) over a deterministic link simulator, in virtual time: the
//! impairment lab's scenarios in milliseconds instead of minutes (the models are str0m's
//! `netem` and quinn's test `Pair`).
//!
//! The link is a seeded bottleneck: a FIFO served at a capacity that may change over time, a
//! queue depth past which packets are dropped, random loss (independent, or bursty: a
//! Gilbert-Elliott chain), a one-way delay with jitter, and path changes (a blackout, then a
//! fresh path). The sender is the real encoder-rate model: audio at its wire rate, video at the
//! ladder's bitrate in frames of up to 1200-byte packets, paced at the estimator's pacing rate
//! with audio first and stale packets dropped (the pacer's rules). The receiver reports what
//! arrived since its last report in transport feedback every 100 ms, and that feedback crosses
//! the return path, which may lose it too. A lost report is never resent (TWCC), and the send
//! side reads as lost every packet up to the highest one reported arrived that no report
//! mentioned (what webrtc 0.21's send history does: `rtpfb::history::take_reports`).
//!
//! The figures are the lab's: time to audio-only after a collapse, video back after the
//! recovery, the rate held under random loss, the share of audio that arrived, and how often
//! the ladder changed its mind. Where the simulator and the lab disagree, ARCHITECTURE.md says
//! so and why.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use bedside_client_core::congestion::{CongestionConfig, Estimator};
use bedside_client_core::quality::{QualityConfig, QualityController, VideoTarget};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rtc::interceptor::PacketReport;
use rtc::rtcp::transport_feedbacks::cc_feedback_report::Ecn;

const TICK: Duration = Duration::from_millis(5);
const FEEDBACK_EVERY: Duration = Duration::from_millis(100);
/// The driver hands the estimate to the ladder this often (as `driver.rs` does).
const LADDER_EVERY: Duration = Duration::from_millis(250);
const MTU: usize = 1200;
/// The impairment lab's probes send 320x180; the independent lab of issue #12 sent 640x360.
const LAB_CAMERA: (u32, u32) = (320, 180);
const WIDER_CAMERA: (u32, u32) = (640, 360);
const AUDIO_SSRC: u32 = 1;
const VIDEO_SSRC: u32 = 2;

/// Loss on one direction of the link.
#[derive(Clone, Copy, Debug)]
enum Loss {
    None,
    /// Each packet lost with this probability.
    Random(f64),
    /// Gilbert-Elliott: from good to bad with `p`, back with `r`; in the bad state packets are
    /// lost with `bad_loss`.
    Bursty {
        p: f64,
        r: f64,
        bad_loss: f64,
    },
}

/// One direction's impairments from a given time on.
#[derive(Clone, Copy, Debug)]
struct Conditions {
    capacity_bps: f64,
    /// Bytes the bottleneck queue holds before it drops.
    queue_bytes: usize,
    delay: Duration,
    /// Arrival times vary uniformly by up to this either way.
    jitter: Duration,
    loss: Loss,
    /// Feedback from the receiver is lost with this probability (loss on the way back).
    return_loss: f64,
    /// Nothing gets through (the old path of a handover).
    blackout: bool,
    /// The sender reads no feedback: it is held and then read all at once (a process that is
    /// descheduled for a while on a loaded machine, or a stalled receive loop).
    feedback_held: bool,
}

impl Default for Conditions {
    fn default() -> Self {
        Conditions {
            capacity_bps: 2_500_000.0,
            queue_bytes: 250_000,
            delay: Duration::from_millis(20),
            jitter: Duration::ZERO,
            loss: Loss::None,
            return_loss: 0.0,
            blackout: false,
            feedback_held: false,
        }
    }
}

/// A scenario: conditions changing at given times, and path changes (ICE restarts) signalled.
struct Scenario {
    name: &'static str,
    seconds: u64,
    /// (from, conditions), in time order; the first is from 0.
    phases: Vec<(Duration, Conditions)>,
    path_changes: Vec<Duration>,
    /// The camera's size: the ladder's top rung (the lab's probes send 320x180).
    camera: (u32, u32),
}

/// A packet in flight or queued.
#[derive(Clone, Copy, Debug)]
struct Sent {
    id: u64,
    ssrc: u32,
    size: usize,
    departure: Instant,
}

#[derive(Default, Debug)]
struct Figures {
    /// (time, estimate kbps), every ladder update.
    estimates: Vec<(Duration, f64)>,
    /// (time, target), each change.
    targets: Vec<(Duration, VideoTarget)>,
    audio_sent: u64,
    audio_arrived: u64,
    /// Audio (sent, arrived) per second.
    audio_per_second: Vec<(u64, u64)>,
}

impl Figures {
    /// The first time at or after `from` the ladder was audio-only (`true`) or sending video.
    fn first(&self, from: Duration, audio_only: bool) -> Option<Duration> {
        let is = |t: &VideoTarget| matches!(t, VideoTarget::AudioOnly) == audio_only;
        // The target in force at `from`, or the first change after it.
        let before = self.targets.iter().rev().find(|(t, _)| *t <= from);
        if before.is_some_and(|(_, t)| is(t)) {
            return Some(Duration::ZERO);
        }
        self.targets
            .iter()
            .find(|(t, target)| *t > from && is(target))
            .map(|(t, _)| *t - from)
    }

    fn mean_kbps(&self, from: Duration, to: Duration) -> f64 {
        let window: Vec<f64> = self
            .estimates
            .iter()
            .filter(|(t, _)| (from..to).contains(t))
            .map(|(_, k)| *k)
            .collect();
        window.iter().sum::<f64>() / window.len().max(1) as f64
    }

    fn min_kbps(&self, from: Duration, to: Duration) -> f64 {
        self.estimates
            .iter()
            .filter(|(t, _)| (from..to).contains(t))
            .map(|(_, k)| *k)
            .fold(f64::INFINITY, f64::min)
    }

    fn audio_only_spells(&self) -> usize {
        self.targets
            .iter()
            .filter(|(_, t)| matches!(t, VideoTarget::AudioOnly))
            .count()
    }

    /// Seconds spent audio-only between `from` and `to`.
    fn audio_only_secs(&self, from: Duration, to: Duration) -> f64 {
        let mut total = Duration::ZERO;
        for (i, (at, target)) in self.targets.iter().enumerate() {
            if !matches!(target, VideoTarget::AudioOnly) {
                continue;
            }
            let end = self.targets.get(i + 1).map_or(to, |(t, _)| *t);
            let (a, b) = ((*at).max(from), end.min(to));
            if b > a {
                total += b - a;
            }
        }
        total.as_secs_f64()
    }

    fn audio_arrived_pct(&self) -> f64 {
        100.0 * self.audio_arrived as f64 / self.audio_sent.max(1) as f64
    }
}

/// Runs `scenario` with `seed`.
fn simulate(scenario: &Scenario, seed: u64) -> Figures {
    let mut rng = StdRng::seed_from_u64(seed);
    let start = Instant::now();
    let config = CongestionConfig::default();
    let audio_bytes = (config.audio_wire_bps / 50.0 / 8.0) as usize;
    let mut estimator = Estimator::new(config);
    let mut ladder = QualityController::new(
        QualityConfig::default(),
        QualityController::top_rung_for(scenario.camera.0, scenario.camera.1),
    );
    let mut figures = Figures::default();
    figures.targets.push((Duration::ZERO, ladder.target()));
    // Sender state.
    let (mut next_id, mut sent_total) = (0u64, 0u64);
    let (mut audio_q, mut video_q) = (VecDeque::<Sent>::new(), VecDeque::<Sent>::new());
    let mut bucket_bytes = 0.0f64;
    let mut next_audio = Duration::ZERO;
    let mut next_frame = Duration::ZERO;
    // Link state: when the bottleneck is free again, the last arrival (no reordering).
    let mut busy_until = Duration::ZERO;
    let mut last_arrival = Duration::ZERO;
    let mut bad_state = false;
    // Receiver: what arrived (id -> arrival) and what has been sent, waiting to be reported.
    let mut in_flight: VecDeque<(Sent, Option<Duration>)> = VecDeque::new();
    let mut next_feedback = FEEDBACK_EVERY;
    // Feedback on its way back: (delivery time, (id, arrival) of what arrived).
    let mut returning: VecDeque<(Duration, Vec<(u64, Duration)>)> = VecDeque::new();
    // The last packet the receiver has reported.
    let mut receiver_reported = 0u64;
    let mut next_ladder = LADDER_EVERY;
    let mut path_changes = scenario.path_changes.iter().copied().peekable();
    let end = Duration::from_secs(scenario.seconds);
    let mut second = (0u64, 0u64);
    let mut t = Duration::ZERO;
    while t < end {
        let now = start + t;
        let cond = scenario
            .phases
            .iter()
            .rev()
            .find(|(from, _)| *from <= t)
            .map(|(_, c)| *c)
            .unwrap_or_default();
        if path_changes.next_if(|at| *at <= t).is_some() {
            estimator.path_changed();
            // A fresh path: an empty queue.
            busy_until = t;
        }
        // The encoder: audio every 20 ms, video frames at the rung's rate.
        if t >= next_audio {
            next_audio += Duration::from_millis(20);
            audio_q.push_back(Sent {
                id: 0,
                ssrc: AUDIO_SSRC,
                size: audio_bytes,
                departure: now,
            });
            figures.audio_sent += 1;
            second.0 += 1;
        }
        if t >= next_frame {
            match ladder.target() {
                VideoTarget::Video { rung, bitrate_kbps } => {
                    let fps = bedside_client_core::quality::LADDER[rung].fps;
                    next_frame += Duration::from_secs(1) / fps;
                    let mut frame = (bitrate_kbps as usize * 1000 / 8) / fps as usize;
                    while frame > 0 {
                        let size = frame.min(MTU);
                        frame -= size;
                        video_q.push_back(Sent {
                            id: 0,
                            ssrc: VIDEO_SSRC,
                            size,
                            departure: now,
                        });
                    }
                }
                VideoTarget::AudioOnly => next_frame += Duration::from_millis(33),
            }
        }
        // The pacer: at the pacing rate, audio first, stale packets dropped.
        let (max_audio_wait, max_video_wait) = {
            let c = estimator.config();
            (c.max_audio_wait, c.max_video_wait)
        };
        audio_q.retain(|p| now.duration_since(p.departure) <= max_audio_wait);
        video_q.retain(|p| now.duration_since(p.departure) <= max_video_wait);
        let rate = estimator.pacing_bps();
        bucket_bytes =
            (bucket_bytes + rate * TICK.as_secs_f64() / 8.0).min(rate * 0.02 / 8.0 + MTU as f64);
        loop {
            let queue = if !audio_q.is_empty() {
                &mut audio_q
            } else if !video_q.is_empty() {
                &mut video_q
            } else {
                break;
            };
            let size = queue[0].size as f64;
            if bucket_bytes < size {
                break;
            }
            bucket_bytes -= size;
            let mut packet = queue.pop_front().expect("a head");
            next_id += 1;
            packet.id = next_id;
            packet.departure = now;
            sent_total += packet.size as u64;
            // The link: loss, the bottleneck queue, delay and jitter.
            let lost_on_path = match cond.loss {
                Loss::None => false,
                Loss::Random(p) => rng.random::<f64>() < p,
                Loss::Bursty { p, r, bad_loss } => {
                    bad_state = if bad_state {
                        rng.random::<f64>() >= r
                    } else {
                        rng.random::<f64>() < p
                    };
                    bad_state && rng.random::<f64>() < bad_loss
                }
            };
            let queued = busy_until.saturating_sub(t).as_secs_f64() * cond.capacity_bps / 8.0;
            let arrival = if cond.blackout
                || lost_on_path
                || queued + packet.size as f64 > cond.queue_bytes as f64
            {
                None
            } else {
                busy_until = busy_until.max(t)
                    + Duration::from_secs_f64(packet.size as f64 * 8.0 / cond.capacity_bps);
                let jitter = if cond.jitter.is_zero() {
                    0.0
                } else {
                    rng.random_range(-1.0..1.0) * cond.jitter.as_secs_f64()
                };
                let at = Duration::from_secs_f64((busy_until + cond.delay).as_secs_f64() + jitter)
                    .max(last_arrival);
                last_arrival = at;
                Some(at)
            };
            if packet.ssrc == AUDIO_SSRC && arrival.is_some() {
                figures.audio_arrived += 1;
                second.1 += 1;
            }
            in_flight.push_back((packet, arrival));
        }
        // The receiver's feedback: what arrived since its last one; lost on the way back, or
        // delivered one delay later.
        if t >= next_feedback {
            next_feedback += FEEDBACK_EVERY;
            let arrived_by_now = in_flight
                .iter()
                .filter(|(p, a)| p.id > receiver_reported && a.is_some_and(|a| a <= t))
                .map(|(p, a)| (p.id, a.expect("arrived")))
                .collect::<Vec<_>>();
            if let Some(&(last, _)) = arrived_by_now.last() {
                receiver_reported = last;
                if !cond.blackout && rng.random::<f64>() >= cond.return_loss {
                    returning.push_back((t + cond.delay, arrived_by_now));
                }
            }
        }
        // The send side: a report marks what arrived; then everything up to the highest
        // arrived packet is reported, the rest of it as lost.
        while !cond.feedback_held && returning.front().is_some_and(|(at, _)| *at <= t) {
            let (_, arrivals) = returning.pop_front().expect("a head");
            let highest = arrivals.last().map(|(id, _)| *id).unwrap_or(0);
            let mut arrivals = arrivals.into_iter().peekable();
            let mut reports = Vec::new();
            while in_flight.front().is_some_and(|(p, _)| p.id <= highest) {
                let (p, _) = in_flight.pop_front().expect("a head");
                let arrival = arrivals.next_if(|(id, _)| *id == p.id).map(|(_, a)| a);
                reports.push(PacketReport {
                    ssrc: p.ssrc,
                    id: p.id,
                    rtp_sequence_number: p.id as u16,
                    is_twcc: true,
                    twcc_sequence_number: p.id as u16,
                    size: p.size,
                    arrived: arrival.is_some(),
                    departure: p.departure,
                    arrival,
                    ecn: Ecn::NotEct,
                });
            }
            estimator.on_reports(now, &reports, sent_total);
        }
        if estimator.poll_timeout().is_some_and(|at| at <= now) {
            estimator.handle_timeout(now);
        }
        if t >= next_ladder {
            next_ladder += LADDER_EVERY;
            let kbps = estimator.target_bps() / 1000.0;
            figures.estimates.push((t, kbps));
            if let Some(target) = ladder.handle_estimate(now, kbps as u32) {
                figures.targets.push((t, target));
            }
        }
        if t.as_millis().is_multiple_of(1000) && t > Duration::ZERO {
            figures.audio_per_second.push(std::mem::take(&mut second));
        }
        t += TICK;
    }
    figures
}

fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

fn at(s: u64, conditions: Conditions) -> (Duration, Conditions) {
    (secs(s), conditions)
}

fn collapse() -> Scenario {
    let narrow = Conditions {
        capacity_bps: 100_000.0,
        queue_bytes: 30_000,
        ..Default::default()
    };
    Scenario {
        name: "bandwidth collapse 100 kbps, back",
        seconds: 50,
        phases: vec![
            at(0, Conditions::default()),
            at(10, narrow),
            at(25, Conditions::default()),
        ],
        path_changes: vec![],
        camera: LAB_CAMERA,
    }
}

/// 30 s under one set of conditions.
fn steady(name: &'static str, conditions: Conditions, camera: (u32, u32)) -> Scenario {
    Scenario {
        name,
        seconds: 30,
        phases: vec![at(0, conditions)],
        path_changes: vec![],
        camera,
    }
}

fn random_loss(pct: u32) -> Scenario {
    steady(
        "random loss",
        Conditions {
            loss: Loss::Random(f64::from(pct) / 100.0),
            ..Default::default()
        },
        LAB_CAMERA,
    )
}

fn print(name: &str, f: &Figures) {
    let per_s: Vec<String> = f
        .estimates
        .iter()
        .filter(|(t, _)| t.as_millis().is_multiple_of(2000))
        .map(|(t, k)| format!("{}s:{k:.0}", t.as_secs()))
        .collect();
    eprintln!(
        "{name}: audio arrived {:.1}%, {} audio-only spells, targets {}, estimate {}",
        f.audio_arrived_pct(),
        f.audio_only_spells(),
        f.targets.len(),
        per_s.join(" ")
    );
}

/// The lab: audio-only about 2 s after a collapse to 100 kbit/s, video back about 5 s after
/// the recovery.
#[test]
fn a_collapse_goes_audio_only_within_seconds_and_video_comes_back_after() {
    {
        let seed = 1;
        let f = simulate(&collapse(), seed);
        print(collapse().name, &f);
        let audio_only = f
            .first(secs(10), true)
            .expect("audio-only during the collapse");
        assert!(
            audio_only <= Duration::from_millis(3000),
            "audio-only after {audio_only:?}"
        );
        let back = f
            .first(secs(25), false)
            .expect("video back after the recovery");
        eprintln!(
            "  seed {seed}: audio-only {} ms after the collapse, video back {} ms after the \
             recovery, {:.1} s audio-only during the collapse, audio arrived {:.1}% during it, \
             {:.0} kbps 20 s after the recovery",
            audio_only.as_millis(),
            back.as_millis(),
            f.audio_only_secs(secs(10), secs(25)),
            {
                let (sent, arrived) = f.audio_per_second[10..25]
                    .iter()
                    .fold((0, 0), |a, s| (a.0 + s.0, a.1 + s.1));
                100.0 * arrived as f64 / sent as f64
            },
            f.mean_kbps(secs(44), secs(46)),
        );
        assert!(back <= secs(10), "video back {back:?} after the recovery");
        // Before the collapse, the link's rate was found.
        assert!(f.mean_kbps(secs(5), secs(10)) > 1000.0);
    }
}

/// The lab: at 5, 10 and 20% random loss video is kept (the loss is the path's, not ours).
#[test]
fn random_loss_is_not_read_as_congestion() {
    for pct in [5, 10, 20] {
        let f = simulate(&random_loss(pct), u64::from(pct));
        print(&format!("random loss {pct}%"), &f);
        assert_eq!(f.audio_only_spells(), 0, "{pct}%: video kept");
        let held = f.mean_kbps(secs(10), secs(30));
        assert!(held >= 400.0, "{pct}%: rate held at {held:.0} kbps");
    }
}

/// A shallow queue (200 ms) in front of a 600 kbit/s link, sending 640x360 (600 kbps of video
/// and audio: a little more than the link): video stays on and audio gets through. The
/// estimate does not settle under the capacity here: the sender is application-limited, the
/// standing queue drops about a tenth of the video, which the loss rule holds in its 2-10%
/// band, and a full queue no longer grows the delay (see ARCHITECTURE.md).
#[test]
fn a_shallow_600_kbps_queue_is_found_without_losing_audio() {
    let scenario = steady(
        "shallow 600 kbps queue",
        Conditions {
            capacity_bps: 600_000.0,
            queue_bytes: 15_000,
            ..Default::default()
        },
        WIDER_CAMERA,
    );
    let f = simulate(&scenario, 7);
    print(scenario.name, &f);
    assert!(f.audio_only_secs(secs(10), secs(30)) < 1.0, "video kept");
    let late: (u64, u64) = f.audio_per_second[15..]
        .iter()
        .fold((0, 0), |a, s| (a.0 + s.0, a.1 + s.1));
    let pct = 100.0 * late.1 as f64 / late.0 as f64;
    assert!(pct >= 99.0, "audio arrived {pct:.1}% once settled");
}

/// A handover: the old path swallows a second of packets, then the ICE restart signals a new
/// path. The estimate is not cut for it and the call stays on video.
#[test]
fn a_handover_does_not_cut_the_estimate() {
    let scenario = Scenario {
        name: "handover",
        seconds: 25,
        phases: vec![
            at(0, Conditions::default()),
            at(
                10,
                Conditions {
                    blackout: true,
                    ..Default::default()
                },
            ),
            (Duration::from_millis(11_000), Conditions::default()),
        ],
        path_changes: vec![Duration::from_millis(10_900)],
        camera: LAB_CAMERA,
    };
    let f = simulate(&scenario, 3);
    print(scenario.name, &f);
    let before = f.mean_kbps(secs(8), secs(10));
    let after = f.min_kbps(secs(12), secs(25));
    assert!(after >= 0.5 * before, "{before:.0} -> {after:.0} kbps");
    assert_eq!(f.audio_only_spells(), 0);
}

/// 200 ms one way with 40 ms of jitter either way (the lab's long path): video kept.
#[test]
fn a_long_jittery_path_keeps_video() {
    let scenario = steady(
        "delay 200 ms +- 40 ms",
        Conditions {
            delay: Duration::from_millis(200),
            jitter: Duration::from_millis(40),
            ..Default::default()
        },
        LAB_CAMERA,
    );
    let f = simulate(&scenario, 11);
    print(scenario.name, &f);
    assert_eq!(f.audio_only_spells(), 0);
    let held = f.mean_kbps(secs(10), secs(30));
    assert!(held >= 400.0, "rate held at {held:.0} kbps");
}

/// Bursty loss (Gilbert-Elliott, about 5% of packets in bursts of about 4): video kept.
#[test]
fn bursty_loss_keeps_video() {
    let scenario = steady(
        "bursty loss",
        Conditions {
            loss: Loss::Bursty {
                p: 0.015,
                r: 0.25,
                bad_loss: 0.8,
            },
            ..Default::default()
        },
        LAB_CAMERA,
    );
    let f = simulate(&scenario, 5);
    print(scenario.name, &f);
    assert_eq!(f.audio_only_spells(), 0);
}

/// Both-ways loss (the miss an independent lab found: loss on the patient's link in both
/// directions, so feedback is lost too, and the send side reads each lost report's packets as
/// lost). Before the lost-report rule (`congestion::unreported_run`) the estimate fell towards
/// the floor within about 10 s and the call went audio-only, as in that lab.
#[test]
fn both_ways_loss_keeps_video() {
    let scenario = steady(
        "12% loss both ways",
        Conditions {
            loss: Loss::Random(0.12),
            return_loss: 0.12,
            ..Default::default()
        },
        WIDER_CAMERA,
    );
    let f = simulate(&scenario, 13);
    print(scenario.name, &f);
    assert_eq!(f.audio_only_spells(), 0, "video kept");
    let held = f.mean_kbps(secs(10), secs(30));
    assert!(held >= 300.0, "rate held at {held:.0} kbps");
}

/// The sender reads its feedback late, in one burst, twice (its process descheduled for a
/// second on a loaded machine): the first report of the burst alone is not a collapse.
#[test]
fn feedback_read_late_in_a_burst_is_not_a_collapse() {
    let held = Conditions {
        feedback_held: true,
        ..Default::default()
    };
    let scenario = Scenario {
        name: "feedback read late",
        seconds: 30,
        phases: vec![
            at(0, Conditions::default()),
            at(10, held),
            (Duration::from_millis(11_000), Conditions::default()),
            at(20, held),
            (Duration::from_millis(21_000), Conditions::default()),
        ],
        path_changes: vec![],
        camera: LAB_CAMERA,
    };
    let f = simulate(&scenario, 17);
    print(scenario.name, &f);
    assert_eq!(f.audio_only_spells(), 0);
    let before = f.mean_kbps(secs(8), secs(10));
    let after = f.min_kbps(secs(11), secs(30));
    assert!(after >= 0.5 * before, "{before:.0} -> {after:.0} kbps");
}

/// Both-ways loss with jitter, over several seeds (the lab's probes jitter: shared cores). A
/// few lost reports within one second took the delivery guard's share under half at a low
/// packet rate until unreported bytes were left out of what was sent (`congestion::Delivery`):
/// before, 3 of the first 5 of these runs went to the floor and audio-only.
#[test]
fn both_ways_loss_with_jitter_keeps_video_whatever_the_seed() {
    for (jitter, seed) in [
        (5u64, 1u64),
        (10, 2),
        (20, 3),
        (10, 4),
        (10, 5),
        (20, 6),
        (5, 7),
        (20, 8),
    ] {
        let scenario = steady(
            "12% loss both ways, jitter",
            Conditions {
                loss: Loss::Random(0.12),
                return_loss: 0.12,
                jitter: Duration::from_millis(jitter),
                ..Default::default()
            },
            LAB_CAMERA,
        );
        let f = simulate(&scenario, seed);
        print(
            &format!("12% both ways, jitter {jitter} ms, seed {seed}"),
            &f,
        );
        assert_eq!(f.audio_only_spells(), 0, "seed {seed}: video kept");
        let low = f.min_kbps(secs(10), secs(30));
        assert!(
            low >= 300.0,
            "seed {seed}: the estimate fell to {low:.0} kbps"
        );
    }
}
