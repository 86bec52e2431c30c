//! What the signaling benches share (`signaling-bench`, `fleet-bench`): one consultation's
//! joins timed from the patient's first SYN, the bare tokio-tungstenite echo server they are
//! compared with, and the figures (percentiles, RSS, CPU, the kernel's listen-queue drops).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use bedside_client_core::signaling::{Incoming, SignalingConnection};
use bedside_protocol::{ClientMessage, JoinAuth, PROTOCOL_VERSION, ServerMessage};
use futures_util::{SinkExt, StreamExt};
use serde::{Deserialize, Serialize};

/// Where a client opens its WebSocket: a node, or a load balancer in front of nodes.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Target {
    pub ws_url: String,
    pub addr: SocketAddr,
}

impl Target {
    /// The signaling endpoint of a server whose base URL is `http://ip:port`.
    pub fn of_base(base: &str) -> Result<Self> {
        Ok(Target {
            ws_url: format!("{}/ws", base.replacen("http://", "ws://", 1)),
            addr: base.trim_start_matches("http://").parse()?,
        })
    }
}

/// The secrets of one consultation a bench joins.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Secrets {
    pub doctor_token: String,
    pub invite_code: String,
}

/// Opens a TCP connection from a loopback source address chosen by `n`, then the WebSocket.
/// Twenty thousand connections from one source address to one port make the kernel's
/// ephemeral-port search the load generator's main cost (76% of its CPU, measured with perf);
/// spreading them over 62,500 addresses of 127.1.0.0/16 removes it, and makes each client its
/// own source, as real clients are, for the server's per-source limits (connections, resumes).
pub async fn connect(target: &Target, n: usize) -> Result<SignalingConnection> {
    let stream = tcp(target.addr, n).await?;
    Ok(SignalingConnection::connect_over(&target.ws_url, stream, None).await?)
}

async fn tcp(addr: SocketAddr, n: usize) -> Result<tokio::net::TcpStream> {
    let socket = tokio::net::TcpSocket::new_v4()?;
    let (hi, lo) = ((n / 250) % 250, n % 250);
    socket.bind(SocketAddr::from(([127, 1, hi as u8, 2 + lo as u8], 0)))?;
    let stream = socket.connect(addr).await?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// One consultation set up: the patient's timings and both open links.
pub struct Consulted {
    /// From just before the patient's TCP connect (its first SYN) to `admitted`.
    pub syn_to_admitted: Duration,
    /// From the patient's `join` (sent on an open WebSocket) to `admitted`.
    pub join_to_admitted: Duration,
    pub doctor: SignalingConnection,
    pub patient: SignalingConnection,
    /// The resume tokens `joined` gave each.
    pub doctor_resume: String,
    pub patient_resume: String,
}

const STEP: Duration = Duration::from_secs(30);

/// Waits for the message `pick` accepts, skipping others; an error or a close fails.
async fn wait_for<T>(
    conn: &mut SignalingConnection,
    who: &str,
    mut pick: impl FnMut(ServerMessage) -> Option<T>,
) -> Result<T> {
    loop {
        match conn.recv_timeout(STEP).await? {
            Incoming::Message(ServerMessage::Error { code, .. }) => bail!("{who}: {code}"),
            Incoming::Message(m) => {
                if let Some(t) = pick(m) {
                    return Ok(t);
                }
            }
            other => bail!("{who}: {other:?}"),
        }
    }
}

/// One consultation: the doctor joins (on `doctor_at`), the patient joins (on `patient_at`)
/// and is admitted, and an offer and an answer of 1 KB are exchanged. `n` picks the source
/// addresses.
pub async fn consult(
    doctor_at: &Target,
    patient_at: &Target,
    n: usize,
    c: &Secrets,
) -> Result<Consulted> {
    let mut doctor = connect(doctor_at, 2 * n).await?;
    doctor
        .send(&ClientMessage::Join {
            protocol_version: PROTOCOL_VERSION,
            auth: JoinAuth::Token {
                token: c.doctor_token.clone(),
            },
            display_name: None,
        })
        .await?;
    let (doctor_id, doctor_resume) = wait_for(&mut doctor, "doctor", |m| match m {
        ServerMessage::Joined {
            participant_id,
            resume_token,
            ..
        } => Some((participant_id, resume_token)),
        _ => None,
    })
    .await?;
    let syn = Instant::now();
    let mut patient = connect(patient_at, 2 * n + 1).await?;
    let started = Instant::now();
    patient
        .send(&ClientMessage::Join {
            protocol_version: PROTOCOL_VERSION,
            auth: JoinAuth::InviteCode {
                code: c.invite_code.clone(),
            },
            display_name: Some("Bench".into()),
        })
        .await?;
    // The doctor admits whoever shows up in the waiting room.
    let patient_id = wait_for(&mut doctor, "doctor", |m| match m {
        ServerMessage::WaitingRoom { waiting } if !waiting.is_empty() => {
            Some(waiting[0].participant_id.clone())
        }
        _ => None,
    })
    .await?;
    doctor
        .send(&ClientMessage::Admit {
            participant_id: patient_id,
        })
        .await?;
    let mut patient_resume = String::new();
    wait_for(&mut patient, "patient", |m| match m {
        ServerMessage::Joined { resume_token, .. } => {
            patient_resume = resume_token;
            None
        }
        ServerMessage::Admitted { .. } => Some(()),
        _ => None,
    })
    .await?;
    let (syn_to_admitted, join_to_admitted) = (syn.elapsed(), started.elapsed());
    patient
        .send(&ClientMessage::Offer {
            to: doctor_id,
            sdp: "v=0\r\n".repeat(200),
        })
        .await?;
    let patient_id = wait_for(&mut doctor, "doctor", |m| match m {
        ServerMessage::Offer { from, .. } => Some(from),
        _ => None,
    })
    .await?;
    doctor
        .send(&ClientMessage::Answer {
            to: patient_id,
            sdp: "v=0\r\n".repeat(200),
        })
        .await?;
    wait_for(&mut patient, "patient", |m| match m {
        ServerMessage::Answer { .. } => Some(()),
        _ => None,
    })
    .await?;
    Ok(Consulted {
        syn_to_admitted,
        join_to_admitted,
        doctor,
        patient,
        doctor_resume,
        patient_resume,
    })
}

/// Takes a seat back with `token` on `target`: the time to `joined` (resumed), or why not.
pub async fn resume(
    target: &Target,
    n: usize,
    token: &str,
) -> Result<(SignalingConnection, String)> {
    let mut conn = connect(target, n).await?;
    conn.send(&ClientMessage::Resume {
        protocol_version: PROTOCOL_VERSION,
        resume_token: token.to_owned(),
    })
    .await?;
    let token = wait_for(&mut conn, "resume", |m| match m {
        ServerMessage::Joined {
            resume_token,
            resumed: true,
            ..
        } => Some(resume_token),
        _ => None,
    })
    .await?;
    Ok((conn, token))
}

/// The bare anchor: a tokio-tungstenite server that echoes every text frame, on a listener
/// with the server's backlog (4,096) and `TCP_NODELAY`, on a runtime with as many workers as
/// the server's. Runs until the process is killed; prints `listening on ws://ADDR` first.
pub async fn echo_server() -> Result<()> {
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.set_reuseaddr(true)?;
    socket.bind("127.0.0.1:0".parse()?)?;
    let listener = socket.listen(4096)?;
    println!("listening on ws://{}", listener.local_addr()?);
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let _ = stream.set_nodelay(true);
        tokio::spawn(async move {
            let Ok(mut ws) = tokio_tungstenite::accept_async(stream).await else {
                return;
            };
            while let Some(Ok(msg)) = ws.next().await {
                if msg.is_text() && ws.send(msg).await.is_err() {
                    break;
                }
            }
        });
    }
}

/// One join against the echo anchor: connect, the WebSocket handshake, a `join` of the real
/// size sent and echoed. Returns (first SYN → echo, send → echo) and the open link.
pub async fn echo_join(
    target: &Target,
    n: usize,
) -> Result<(
    Duration,
    Duration,
    tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>,
)> {
    let syn = Instant::now();
    let stream = tcp(target.addr, n).await?;
    let (mut ws, _) = tokio_tungstenite::client_async(&target.ws_url, stream).await?;
    let started = Instant::now();
    let join = ClientMessage::Join {
        protocol_version: PROTOCOL_VERSION,
        auth: JoinAuth::InviteCode {
            code: "ABCDE-FGHJK".into(),
        },
        display_name: Some("Bench".into()),
    };
    ws.send(tokio_tungstenite::tungstenite::Message::Text(
        join.encode().into(),
    ))
    .await?;
    loop {
        match ws.next().await.context("echo closed")?? {
            tokio_tungstenite::tungstenite::Message::Text(_) => break,
            _ => continue,
        }
    }
    Ok((syn.elapsed(), started.elapsed(), ws))
}

/// The `p` quantile (0..=1) of sorted durations.
pub fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx]
}

/// "p50 / p99" in milliseconds.
pub fn p50_p99(sorted: &[Duration]) -> String {
    format!(
        "{:.1} / {:.1}",
        percentile(sorted, 0.5).as_secs_f64() * 1e3,
        percentile(sorted, 0.99).as_secs_f64() * 1e3
    )
}

/// Resident memory of a process, KiB.
pub fn rss_kib(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .context("no VmRSS")
}

/// The kernel's count of connections dropped because a listen queue was full
/// (`TcpExt: ListenOverflows` in `/proc/net/netstat`; for the whole network namespace).
pub fn listen_overflows() -> u64 {
    let Ok(text) = std::fs::read_to_string("/proc/net/netstat") else {
        return 0;
    };
    let lines: Vec<&str> = text.lines().filter(|l| l.starts_with("TcpExt:")).collect();
    let [names, values] = lines[..] else {
        return 0;
    };
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .find(|(n, _)| *n == "ListenOverflows")
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0)
}

/// The 1-minute load average, as the benches print it beside their figures.
pub fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|l| l.split_whitespace().next().map(str::to_owned))
        .unwrap_or_else(|| "?".into())
}
