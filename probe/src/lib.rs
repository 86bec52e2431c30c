//! `bedside-probe`: a headless participant. It joins a consultation (as a doctor it admits
//! whoever waits; as a patient it waits), stays for a given time, leaves, and reports what it
//! measured as JSON. Clinics use it to test a deployment; the tests and benches use it too.
//!
//! Today it measures the connection (time to connect, candidate pair, RTT, loss, state
//! transitions, reconnections) and the RTP it receives per kind. Decoded frames, glass-to-glass
//! and mouth-to-ear latency, and which peer's tone it heard come with the media pipeline
//! (issue #4).

use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use bedside_client_core::call::{CallEvent, CallState, UserCommand};
use bedside_client_core::driver::{self, ClientOptions};
use bedside_client_core::engine::{EngineSettings, MediaKind};
use bedside_protocol::{CandidatePairType, JoinAuth};
use serde::Serialize;

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
    /// Send marker RTP on both tracks while connected (until the media pipeline lands, this is
    /// what the far end counts).
    pub send_rtp: bool,
}

/// What the probe measured.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Report {
    pub joined: bool,
    pub connected: bool,
    /// From the join command to media connected with every peer.
    pub time_to_connect_ms: Option<u64>,
    pub candidate_pair: Option<CandidatePairType>,
    pub rtt_ms_p50: Option<f64>,
    pub rtt_ms_p95: Option<f64>,
    pub loss_in_pct_max: Option<f64>,
    pub audio_packets_received: u64,
    pub video_packets_received: u64,
    /// Times the call went into reconnecting.
    pub reconnections: u32,
    /// Every state the call went through, with milliseconds since the start.
    pub states: Vec<(u64, String)>,
    pub ended: Option<String>,
}

fn percentile(sorted: &[f64], p: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    Some(sorted[((sorted.len() - 1) as f64 * p).round() as usize])
}

/// Joins, stays, leaves, and reports.
pub async fn run(options: ProbeOptions) -> Result<Report> {
    let mut client_options = ClientOptions::new(&options.server_url);
    client_options.engine = EngineSettings {
        udp_addrs: options.udp_addrs.clone(),
        relay_only: options.relay_only,
    };
    let mut client = driver::start(client_options)?;
    let started = Instant::now();
    client.handle.send(UserCommand::Join {
        auth: options.auth.clone(),
        display_name: options.display_name.clone(),
    });
    let mut report = Report::default();
    let mut rtts = Vec::new();
    // Until connected, the probe waits up to `duration` for someone to come.
    let mut deadline = tokio::time::Instant::now() + options.duration;
    let mut sender = None;
    let mut left = false;
    loop {
        tokio::select! {
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
                                    if options.send_rtp {
                                        sender = Some(tokio::spawn(send_rtp(client.handle.tracks().clone())));
                                    }
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
                        if stats.candidate_pair.is_some() {
                            report.candidate_pair = stats.candidate_pair;
                        }
                        if let Some(loss) = stats.loss_in_pct {
                            report.loss_in_pct_max = Some(report.loss_in_pct_max.unwrap_or(0.0).max(loss));
                        }
                    }
                    _ => {}
                }
            }
            Some(media) = client.media.recv() => match media.kind {
                MediaKind::Audio => report.audio_packets_received += 1,
                MediaKind::Video => report.video_packets_received += 1,
            },
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
    if let Some(sender) = sender {
        sender.abort();
    }
    rtts.sort_by(f64::total_cmp);
    report.rtt_ms_p50 = percentile(&rtts, 0.5);
    report.rtt_ms_p95 = percentile(&rtts, 0.95);
    if !report.joined {
        bail!("could not join: {:?}", report.ended);
    }
    Ok(report)
}

/// Sends marker packets on both tracks (not decodable media: the media pipeline replaces this).
async fn send_rtp(tracks: std::sync::Arc<bedside_client_core::engine::LocalTracks>) {
    let mut tick = tokio::time::interval(Duration::from_millis(20));
    let mut n: u32 = 0;
    loop {
        tick.tick().await;
        n = n.wrapping_add(1);
        let _ = tracks
            .write_audio(n.to_be_bytes().to_vec().into(), Duration::from_millis(20))
            .await;
        if n % 2 == 0 {
            let mut au = vec![0, 0, 0, 1, 0x65];
            au.extend_from_slice(&n.to_be_bytes());
            let _ = tracks
                .write_video(au.into(), Duration::from_millis(40))
                .await;
        }
    }
}
