//! `bedside-probe`: a headless participant. It joins a consultation (as a doctor it admits
//! whoever waits; as a patient it waits), stays for a given time, leaves, and reports what it
//! measured as JSON. Clinics use it to test a deployment; the tests and benches use it too.
//!
//! It sends synthetic media (the moving test pattern and its participant tone, both carrying
//! markers) and measures the connection (time to connect, candidate pair, RTT, loss, state
//! transitions, reconnections) and the media it receives: frames decoded, decoded frame rate,
//! glass-to-glass and mouth-to-ear latency, the share of audio frames played from real packets,
//! and which participant's tone it heard.

use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use bedside_client_core::call::{CallEvent, CallState, UserCommand};
use bedside_client_core::driver::{self, ClientOptions};
use bedside_client_core::engine::EngineSettings;
pub use bedside_client_core::impair::SendDelay;
use bedside_client_core::media::{DOCTOR_TONE_HZ, H264Config, PATIENT_TONE_HZ, VideoFrame};
use bedside_client_core::pipeline::{MediaSources, ReceiveStats};
use bedside_protocol::{CandidatePairType, JoinAuth, TransportProtocol};
use serde::Serialize;
use std::sync::atomic::Ordering;

/// How the probe joins.
#[derive(Clone, Debug)]
pub struct ProbeOptions {
    /// Signaling URL, e.g. `ws://127.0.0.1:8443/ws`.
    pub server_url: String,
    pub auth: JoinAuth,
    pub display_name: Option<String>,
    /// How long to stay once connected (or once joined, if nobody comes).
    pub duration: Duration,
    /// Use only TURN relay candidates.
    pub relay_only: bool,
    /// Local UDP addresses for host candidates.
    pub udp_addrs: Vec<String>,
    /// Size of the synthetic picture sent.
    pub width: u32,
    pub height: u32,
    /// Video bitrate to start at, kbps.
    pub bitrate_kbps: u32,
    /// Testing only: hold what this probe sends for this long (and up to `jitter` more).
    pub send_delay: Option<SendDelay>,
    /// A private CA (PEM) trusted beside the web's roots, for `wss://` signaling and `turns:`
    /// relays with certificates of a clinic's or a lab's own CA.
    pub ca_cert_pem: Option<Vec<u8>>,
    /// End-to-end encryption of media (SFrame); both probes of a call must agree.
    pub e2ee: bool,
    /// Testing only: keep the first this many encoded frames of each kind as handed to the
    /// packetizer (after encryption), in [`Report::tapped_frames`].
    pub tap_frames: usize,
    /// Testing only: the user's audio-only switch, turned on this long after the call first
    /// connected and off again after the second (as a doctor on a weak link would do).
    pub audio_only_between: Option<(Duration, Duration)>,
    /// Testing only: tell the client its network changed (a handover: signaling resumes and
    /// ICE restarts) this long after the call first connected.
    pub network_change_after: Option<Duration>,
}

impl ProbeOptions {
    /// Defaults for a 720p probe of `server_url` joining with `auth`.
    pub fn new(server_url: impl Into<String>, auth: JoinAuth) -> Self {
        ProbeOptions {
            server_url: server_url.into(),
            auth,
            display_name: Some("Probe".into()),
            duration: Duration::from_secs(10),
            relay_only: false,
            udp_addrs: vec!["0.0.0.0:0".into()],
            width: 1280,
            height: 720,
            bitrate_kbps: 1500,
            send_delay: None,
            ca_cert_pem: None,
            e2ee: false,
            tap_frames: 0,
            audio_only_between: None,
            network_change_after: None,
        }
    }

    fn is_patient(&self) -> bool {
        matches!(self.auth, JoinAuth::InviteCode { .. })
    }
}

/// What the probe measured.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Report {
    /// Our participant id, once seated.
    pub participant_id: Option<String>,
    pub joined: bool,
    pub connected: bool,
    /// From the join command to media connected with every peer.
    pub time_to_connect_ms: Option<u64>,
    pub candidate_pair: Option<CandidatePairType>,
    /// Every change of the pair media goes on: (ms since start, the local candidate's type).
    pub candidate_pairs: Vec<(u64, CandidatePairType)>,
    /// Every transport the pair media goes on was reported with (UDP, TCP or TLS; for a relay
    /// pair, how the relay is reached), in the order first seen.
    pub transports: Vec<TransportProtocol>,
    pub rtt_ms_p50: Option<f64>,
    pub rtt_ms_p95: Option<f64>,
    pub loss_in_pct_max: Option<f64>,
    /// Loss on what we sent, from the peer's reception reports.
    pub loss_out_pct_max: Option<f64>,
    pub video_frames_sent: u64,
    pub audio_frames_sent: u64,
    pub video_frames_decoded: u64,
    pub decoded_fps: Option<f64>,
    /// Frame counters that never arrived between two that did.
    pub video_frames_missing: u64,
    /// Frames not decoded because a reference was lost (the picture froze until a keyframe).
    pub video_frames_skipped: u64,
    /// Keyframe requests (PLI) we sent, and those we received.
    pub keyframes_requested: u64,
    pub keyframe_requests_received: u64,
    /// Encoded samples not sent because the peer's session negotiated no payload type for
    /// their codec (non-zero means that peer got no video or no audio from us).
    pub samples_unsent: u64,
    /// Chat lines received. The probe answers each with `echo: <text>`, so an app can check
    /// its chat end to end against it.
    pub chat_received: u64,
    /// Freezes of the received video: (ms since start when it moved again, ms frozen).
    pub video_gaps_ms: Vec<(u64, u64)>,
    /// The send-side bandwidth estimate once a second: (ms since start, kbps).
    pub send_estimate_kbps: Vec<(u64, u32)>,
    pub received_resolution: Option<(u32, u32)>,
    /// The last decoded picture in brief: the mean luma (16-235) of each cell of an 8x8 grid,
    /// row by row (what a shared screen looked like at the far end; empty without video).
    pub received_luma_grid: Vec<u8>,
    pub glass_to_glass_ms_p50: Option<f64>,
    pub glass_to_glass_ms_p95: Option<f64>,
    pub audio_frames_received: u64,
    /// Audio frames played from a redundant copy (RED) after their own packet was lost.
    pub audio_frames_redundant: u64,
    /// Share of played audio frames that came from their own packet (not a redundant copy,
    /// FEC or concealment).
    pub audio_played_share: Option<f64>,
    /// Share of played audio frames that carried the sender's audio: their own packet, the
    /// redundant copy (RED) a later packet carried, or rebuilt by Opus FEC from the next one
    /// (the rest is concealment).
    pub audio_recovered_share: Option<f64>,
    pub mouth_to_ear_ms_p50: Option<f64>,
    pub mouth_to_ear_ms_p95: Option<f64>,
    /// Whose tone was heard: "doctor" or "patient".
    pub heard: Option<String>,
    /// Times the call went into reconnecting.
    pub reconnections: u32,
    /// When the network change was played (`ProbeOptions::network_change_after`), milliseconds
    /// since the start.
    pub network_changed_ms: Option<u64>,
    /// Every state the call went through, with milliseconds since the start.
    pub states: Vec<(u64, String)>,
    /// When the call went audio-only (true) or back to video (false), milliseconds since the
    /// start.
    pub audio_only: Vec<(u64, bool)>,
    pub ended: Option<String>,
    /// With end-to-end encryption on: the last safety code shown while someone else was there
    /// (every participant's must match), and what the frame transform did.
    pub safety_code: Option<String>,
    pub e2ee_frames_encrypted: u64,
    pub e2ee_frames_decrypted: u64,
    /// Frames that did not decrypt (typically the few that arrive before their key).
    pub e2ee_decrypt_failures: u64,
    /// The tapped frames (`ProbeOptions::tap_frames`): "h264" or "opus", and the bytes.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub tapped_frames: Vec<(String, Vec<u8>)>,
    /// Every remote participant's media, by participant id (group calls: one per other).
    pub remotes: std::collections::BTreeMap<String, RemoteReport>,
    /// Whom the SFU named the active speaker (`None`: nobody speaks), with milliseconds since
    /// the start, each change.
    pub active_speakers: Vec<(u64, Option<String>)>,
}

/// What the probe received from one remote participant.
#[derive(Clone, Debug, Default, Serialize)]
pub struct RemoteReport {
    pub video_frames_decoded: u64,
    /// Audio frames played from packets, redundancy or FEC (not concealment).
    pub audio_frames_received: u64,
    pub received_resolution: Option<(u32, u32)>,
    /// The participant's video froze: (ms since start when it moved again, ms frozen).
    pub video_gaps_ms: Vec<(u64, u64)>,
    /// When their last frame was decoded, ms since the start.
    pub last_video_frame_ms: Option<u64>,
}

/// `rx`'s video freezes as (ms since `started` when the picture moved again, ms frozen).
fn gaps_ms(rx: &ReceiveStats, started: Instant) -> Vec<(u64, u64)> {
    rx.video_gaps
        .iter()
        .map(|(end, gap)| {
            let end = end.saturating_duration_since(started).as_millis() as u64;
            (end, gap.as_millis() as u64)
        })
        .collect()
}

/// The mean luma of each cell of an `n` x `n` grid over `frame`, row by row.
fn luma_grid(frame: &VideoFrame, n: usize) -> Vec<u8> {
    let (w, h) = (frame.width() as usize, frame.height() as usize);
    let mut out = Vec::with_capacity(n * n);
    for row in 0..n {
        for col in 0..n {
            let (x0, x1) = (col * w / n, (col + 1) * w / n);
            let (y0, y1) = (row * h / n, (row + 1) * h / n);
            let sum: u64 = (y0..y1)
                .flat_map(|y| &frame.y()[y * w + x0..y * w + x1])
                .map(|&v| u64::from(v))
                .sum();
            let count = ((x1 - x0) * (y1 - y0)).max(1) as u64;
            out.push((sum / count) as u8);
        }
    }
    out
}

fn percentile(sorted: &[f64], p: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    Some(sorted[((sorted.len() - 1) as f64 * p).round() as usize])
}

/// Sleeps until `at`, or for ever without it.
async fn sleep_until_some(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Joins, stays, leaves, and reports.
pub async fn run(options: ProbeOptions) -> Result<Report> {
    let mut client_options = ClientOptions::new(&options.server_url);
    if let Some(pem) = &options.ca_cert_pem {
        // The web's roots and this CA's certificates (at least one).
        anyhow::ensure!(
            String::from_utf8_lossy(pem).contains("-----BEGIN CERTIFICATE-----"),
            "the CA file holds no PEM certificate"
        );
        let tls = bedside_client_core::signaling::tls_config(Some(pem))
            .map_err(|e| anyhow::anyhow!("the CA file: {e}"))?;
        client_options.tls = Some(tls);
    }
    client_options.engine = EngineSettings {
        udp_addrs: options.udp_addrs.clone(),
        relay_only: options.relay_only,
        send_delay: options.send_delay,
        ..EngineSettings::default()
    };
    client_options.video = H264Config {
        width: options.width,
        height: options.height,
        bitrate_bps: options.bitrate_kbps * 1000,
        ..H264Config::default()
    };
    client_options.e2ee = options.e2ee;
    client_options.tap_frames = options.tap_frames;
    let (tag, tone) = if options.is_patient() {
        (2, PATIENT_TONE_HZ)
    } else {
        (1, DOCTOR_TONE_HZ)
    };
    let sources = MediaSources::synthetic(options.width, options.height, tag, tone);
    let mut client = driver::start(client_options, sources)?;
    let started = Instant::now();
    client.handle.send(UserCommand::Join {
        auth: options.auth.clone(),
        display_name: options.display_name.clone(),
    });
    let mut report = Report::default();
    let mut rtts = Vec::new();
    // Until connected, the probe waits up to `duration` for someone to come.
    let mut deadline = tokio::time::Instant::now() + options.duration;
    let mut left = false;
    // The audio-only switch's next move (at, on), once connected.
    let mut switch: Option<(tokio::time::Instant, bool)> = None;
    // When to play the network change, once connected.
    let mut handover: Option<tokio::time::Instant> = None;
    // SIGUSR1 plays the host app's network-change signal (NWPathMonitor, ConnectivityManager).
    #[cfg(unix)]
    let mut network_changed =
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::user_defined1())?;
    loop {
        #[cfg(unix)]
        let network_change = network_changed.recv();
        #[cfg(not(unix))]
        let network_change = std::future::pending::<Option<()>>();
        tokio::select! {
            Some(()) = network_change => client.handle.send(UserCommand::NetworkChanged),
            event = client.events.recv() => {
                let Some(event) = event else { break };
                match event {
                    CallEvent::State(state) => {
                        let ms = started.elapsed().as_millis() as u64;
                        report.states.push((ms, format!("{state:?}")));
                        match state {
                            CallState::Waiting | CallState::WaitingForPeers => report.joined = true,
                            CallState::Connected => {
                                report.joined = true;
                                if !report.connected {
                                    report.connected = true;
                                    report.time_to_connect_ms = Some(ms);
                                    deadline = tokio::time::Instant::now() + options.duration;
                                    handover = options
                                        .network_change_after
                                        .map(|after| tokio::time::Instant::now() + after);
                                    switch = options.audio_only_between.map(|(on, _)| {
                                        (tokio::time::Instant::now() + on, true)
                                    });
                                }
                            }
                            CallState::Reconnecting => report.reconnections += 1,
                            CallState::Ended(reason) => {
                                report.ended = Some(format!("{reason:?}"));
                                break;
                            }
                            _ => {}
                        }
                    }
                    // The last code shown (it goes back to none when the other one leaves).
                    CallEvent::SafetyCode(Some(code)) => report.safety_code = Some(code),
                    CallEvent::Seated { participant_id, .. } => {
                        report.participant_id = Some(participant_id.0);
                    }
                    CallEvent::AudioOnly { on, .. } => {
                        report.audio_only.push((started.elapsed().as_millis() as u64, on));
                    }
                    CallEvent::ActiveSpeaker(speaker) => {
                        let ms = started.elapsed().as_millis() as u64;
                        report.active_speakers.push((ms, speaker.map(|p| p.0)));
                    }
                    CallEvent::Chat { text, outgoing: false, .. } => {
                        report.chat_received += 1;
                        client.handle.send(UserCommand::SendChat(format!("echo: {text}")));
                    }
                    // A doctor probe admits whoever waits.
                    CallEvent::WaitingRoom(waiting) => {
                        for w in waiting {
                            client.handle.send(UserCommand::Admit(w.participant_id));
                        }
                    }
                    CallEvent::Stats { report: stats, .. } => {
                        if let Some(rtt) = stats.rtt_ms {
                            rtts.push(rtt);
                        }
                        if let Some(kbps) = stats.send_estimate_kbps {
                            report
                                .send_estimate_kbps
                                .push((started.elapsed().as_millis() as u64, kbps as u32));
                        }
                        if let Some(pair) = stats.candidate_pair {
                            if report.candidate_pair != Some(pair) {
                                report
                                    .candidate_pairs
                                    .push((started.elapsed().as_millis() as u64, pair));
                            }
                            report.candidate_pair = Some(pair);
                        }
                        if let Some(t) = stats.transport
                            && !report.transports.contains(&t)
                        {
                            report.transports.push(t);
                        }
                        if let Some(loss) = stats.loss_in_pct {
                            report.loss_in_pct_max = Some(report.loss_in_pct_max.unwrap_or(0.0).max(loss));
                        }
                        if let Some(loss) = stats.loss_out_pct {
                            report.loss_out_pct_max = Some(report.loss_out_pct_max.unwrap_or(0.0).max(loss));
                        }
                    }
                    _ => {}
                }
            }
            _ = sleep_until_some(handover) => {
                handover = None;
                report.network_changed_ms = Some(started.elapsed().as_millis() as u64);
                client.handle.send(UserCommand::NetworkChanged);
            }
            _ = sleep_until_some(switch.map(|(at, _)| at)) => {
                let on = switch.map(|(_, on)| on).unwrap_or_default();
                client.handle.send(UserCommand::SetAudioOnly(on));
                switch = match (on, options.audio_only_between) {
                    (true, Some((from, until))) => Some((
                        tokio::time::Instant::now() + until.saturating_sub(from),
                        false,
                    )),
                    _ => None,
                };
            }
            _ = tokio::time::sleep_until(deadline) => {
                if left {
                    // The server did not confirm the leave in time; stop anyway.
                    break;
                }
                client.handle.send(UserCommand::Leave);
                left = true;
                deadline = tokio::time::Instant::now() + Duration::from_secs(5);
            }
        }
    }
    report.video_frames_sent = client.sent.video_frames_encoded.load(Ordering::Relaxed);
    report.audio_frames_sent = client.sent.audio_frames_encoded.load(Ordering::Relaxed);
    report.keyframe_requests_received = client
        .sent
        .keyframe_requests_received
        .load(Ordering::Relaxed);
    report.samples_unsent = client.sent.samples_unsent.load(Ordering::Relaxed);
    if let Some(e2ee) = client.transform.stats() {
        report.e2ee_frames_encrypted = e2ee.frames_encrypted;
        report.e2ee_frames_decrypted = e2ee.frames_decrypted;
        report.e2ee_decrypt_failures = e2ee.decrypt_failures;
    }
    if let Some(tap) = client.transform.tap() {
        report.tapped_frames = tap
            .frames()
            .into_iter()
            .map(|(codec, data)| {
                let name = match codec {
                    bedside_client_core::e2ee::Codec::H264 => "h264",
                    bedside_client_core::e2ee::Codec::Opus => "opus",
                };
                (name.to_owned(), data)
            })
            .collect();
    }
    let all = client.received.stats();
    for (pid, rx) in &all {
        report.remotes.insert(
            pid.0.clone(),
            RemoteReport {
                video_frames_decoded: rx.video_frames_decoded,
                audio_frames_received: rx.audio_frames_played
                    + rx.audio_frames_red
                    + rx.audio_frames_fec,
                received_resolution: (rx.width > 0).then_some((rx.width, rx.height)),
                video_gaps_ms: gaps_ms(rx, started),
                last_video_frame_ms: rx
                    .last_frame
                    .map(|t| t.saturating_duration_since(started).as_millis() as u64),
            },
        );
    }
    // The media of the first remote participant (probes test two-party calls).
    if let Some((peer, rx)) = client.received.stats().into_iter().next() {
        if let Some(frame) = client.received.video(&peer).and_then(|v| v.latest().1) {
            report.received_luma_grid = luma_grid(&frame, 8);
        }
        report.video_frames_decoded = rx.video_frames_decoded;
        report.decoded_fps = rx.decoded_fps();
        report.video_frames_missing = rx.frames_missing;
        report.video_frames_skipped = rx.video_frames_skipped;
        report.video_gaps_ms = gaps_ms(&rx, started);
        report.keyframes_requested = rx.keyframes_requested;
        report.received_resolution = (rx.width > 0).then_some((rx.width, rx.height));
        let mut g2g = rx.glass_to_glass_ms.clone();
        g2g.sort_by(f64::total_cmp);
        report.glass_to_glass_ms_p50 = percentile(&g2g, 0.5);
        report.glass_to_glass_ms_p95 = percentile(&g2g, 0.95);
        let recovered = rx.audio_frames_played + rx.audio_frames_red + rx.audio_frames_fec;
        let played = recovered + rx.audio_frames_concealed;
        report.audio_frames_received = played;
        report.audio_frames_redundant = rx.audio_frames_red;
        report.audio_played_share =
            (played > 0).then(|| rx.audio_frames_played as f64 / played as f64);
        report.audio_recovered_share = (played > 0).then(|| recovered as f64 / played as f64);
        let mut m2e = rx.mouth_to_ear_ms.clone();
        m2e.sort_by(f64::total_cmp);
        report.mouth_to_ear_ms_p50 = percentile(&m2e, 0.5);
        report.mouth_to_ear_ms_p95 = percentile(&m2e, 0.95);
        report.heard = rx.tone_heard().map(|hz| {
            if hz == DOCTOR_TONE_HZ as u32 {
                "doctor"
            } else {
                "patient"
            }
            .to_owned()
        });
    }
    rtts.sort_by(f64::total_cmp);
    report.rtt_ms_p50 = percentile(&rtts, 0.5);
    report.rtt_ms_p95 = percentile(&rtts, 0.95);
    if !report.joined {
        bail!("could not join: {:?}", report.ended);
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A CA file that is not one is a clear error before anything connects.
    #[tokio::test]
    async fn a_ca_file_without_a_certificate_is_refused() {
        for pem in [
            &b"not a certificate"[..],
            b"-----BEGIN CERTIFICATE-----\n!!\n-----END CERTIFICATE-----\n",
        ] {
            let options = ProbeOptions {
                ca_cert_pem: Some(pem.to_vec()),
                ..ProbeOptions::new(
                    "wss://127.0.0.1:9/ws",
                    JoinAuth::InviteCode { code: "x".into() },
                )
            };
            let err = run(options).await.expect_err("refused").to_string();
            assert!(err.contains("CA file"), "{err}");
        }
    }
}
