//! Adversarial suite: each attack of the hardening review, run against the real server on
//! loopback, asserting that the attack fails *and* that the honest participants keep their
//! seats. Figures (messages sent before a close, time to detection) are printed with
//! `--nocapture`.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use bedside_client_core::signaling::{Incoming, SignalingConnection, SignalingError};
use bedside_protocol::{
    ClientMessage, ErrorCode, IceCandidate, PROTOCOL_VERSION, ParticipantId, ServerMessage,
    close_code,
};
use bedside_server::Config;
use bedside_tests::{Client, TestServer, test_config};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn candidate(to: &ParticipantId, bytes: usize) -> ClientMessage {
    ClientMessage::IceCandidate {
        to: to.clone(),
        candidate: IceCandidate {
            candidate: format!(
                "candidate:1 1 udp 1 127.0.0.1 9 typ host {}",
                "x".repeat(bytes)
            ),
            sdp_mid: Some("0".into()),
            sdp_mline_index: Some(0),
            username_fragment: None,
        },
    }
}

/// A doctor and an admitted patient.
async fn call(server: &TestServer) -> Result<(Client, Client)> {
    let c = server.create_consultation().await?;
    let mut doctor = server.doctor(&c).await?;
    let mut patient = server.waiting_patient(&c, "Ana").await?;
    doctor
        .send(ClientMessage::Admit {
            participant_id: patient.id(),
        })
        .await?;
    patient.expect_type("admitted").await?;
    doctor.expect_type("peer_joined").await?;
    Ok((doctor, patient))
}

/// The client still has its seat and a working link: a ping is answered.
async fn still_connected(client: &mut Client) -> Result<()> {
    client.send(ClientMessage::Ping { nonce: 77 }).await?;
    loop {
        match client.next().await? {
            ServerMessage::Pong { nonce: 77 } => return Ok(()),
            _ => continue,
        }
    }
}

/// Reads until a close; returns its code, and how many messages came before it.
async fn read_until_close(client: &mut Client, within: Duration) -> Result<(u16, usize)> {
    let deadline = Instant::now() + within;
    let mut n = 0;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match client.conn.recv_timeout(left).await {
            Ok(Incoming::Closed { code, .. }) => return Ok((code, n)),
            Ok(Incoming::Message(_)) => n += 1,
            Err(SignalingError::Timeout) => bail!("no close within {within:?}"),
            Err(e) => bail!("link lost without a close: {e}"),
        }
    }
}

fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name) && !l.starts_with('#'))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test]
async fn a_flooding_patient_is_throttled_then_closed_while_the_doctor_stays() -> Result<()> {
    let mut config = test_config();
    config.limits.throttled_messages_before_close = 20;
    let server = TestServer::start_with(config).await?;
    let (mut doctor, mut patient) = call(&server).await?;
    let doctor_id = doctor.id();
    // The doctor reads everything, as a real client does.
    let reader = tokio::spawn(async move {
        let mut candidates = 0usize;
        let mut reconnecting = false;
        let end = Instant::now() + Duration::from_secs(30);
        while Instant::now() < end && !reconnecting {
            match doctor.conn.recv_timeout(Duration::from_secs(1)).await {
                Ok(Incoming::Message(ServerMessage::IceCandidate { .. })) => candidates += 1,
                Ok(Incoming::Message(ServerMessage::PeerReconnecting { .. })) => {
                    reconnecting = true
                }
                Ok(Incoming::Message(_)) | Err(SignalingError::Timeout) => {}
                Ok(Incoming::Closed { code, .. }) => panic!("the doctor was closed with {code}"),
                Err(e) => panic!("the doctor lost its link: {e}"),
            }
        }
        (doctor, candidates, reconnecting)
    });
    let started = Instant::now();
    let mut sent = 0usize;
    let code = loop {
        let msg = candidate(&doctor_id, 60 * 1024);
        match tokio::time::timeout(Duration::from_secs(5), patient.send(msg)).await {
            Ok(Ok(())) => sent += 1,
            Ok(Err(_)) | Err(_) => break None,
        }
        if sent >= 2_000 {
            break None;
        }
        // A close frame arrives on the read side: peek without blocking the flood.
        if let Ok(Incoming::Closed { code, .. }) =
            patient.conn.recv_timeout(Duration::from_millis(1)).await
        {
            break Some(code);
        }
    };
    // The close frame may be lost to a write error on the flooder's side (the server closes
    // while it still sends): the server's own count says why it closed.
    let code = match code {
        Some(code) => Some(code),
        None => read_until_close(&mut patient, Duration::from_secs(10))
            .await
            .ok()
            .map(|c| c.0),
    };
    let flood_secs = started.elapsed().as_secs_f64();
    if let Some(code) = code {
        assert_eq!(code, close_code::FLOODING, "the flooder is closed as such");
    }
    let m = server.metrics().await?;
    assert_eq!(
        metric(&m, "bedside_limited_total{limit=\"inbound_budget_closed\"}"),
        1.0,
        "{m}"
    );
    let (mut doctor, candidates, reconnecting) = reader.await?;
    assert!(
        reconnecting,
        "the doctor is told the patient's link dropped"
    );
    still_connected(&mut doctor).await?;
    println!(
        "flood of 60 KB candidates: attacker closed ({code:?}) after {sent} messages in \
         {flood_secs:.1} s; the doctor received {candidates} and is still connected"
    );
    assert!(candidates < sent + 1);
    Ok(())
}

#[tokio::test]
async fn an_honest_client_pipelining_200_pings_keeps_its_seat() -> Result<()> {
    let server = TestServer::start().await?;
    let (mut doctor, _patient) = call(&server).await?;
    for i in 0..200 {
        doctor.send(ClientMessage::Ping { nonce: i }).await?;
    }
    let mut pongs = 0;
    while pongs < 200 {
        if let ServerMessage::Pong { .. } = doctor.next().await? {
            pongs += 1;
        }
    }
    still_connected(&mut doctor).await?;
    Ok(())
}

#[tokio::test]
async fn a_patient_that_stops_reading_is_declared_dead_and_the_doctor_told() -> Result<()> {
    let mut config = test_config();
    // The doctor sends large offers fast; its own budget is not what is under test.
    config.limits.inbound_bytes_per_sec = 64 * 1024 * 1024;
    config.limits.inbound_byte_burst = 64 * 1024 * 1024;
    config.limits.inbound_messages_per_sec = 10_000;
    let server = TestServer::start_with(config.clone()).await?;
    let c = server.create_consultation().await?;
    let mut doctor = server.doctor(&c).await?;
    // A patient with a tiny receive buffer, so that the server's writes block soon.
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.set_recv_buffer_size(4096)?;
    let addr = server.base_url.trim_start_matches("http://").parse()?;
    let stream = socket.connect(addr).await?;
    let mut patient = Client {
        conn: SignalingConnection::connect_over(&server.ws_url, stream, None).await?,
        participant_id: None,
        resume_token: None,
    };
    patient.join_invite(&c.invite_code, Some("Bo")).await?;
    patient.expect_type("waiting").await?;
    doctor
        .send(ClientMessage::Admit {
            participant_id: patient.id(),
        })
        .await?;
    patient.expect_type("admitted").await?;
    doctor.expect_type("peer_joined").await?;
    // From here the patient never reads again.
    let sdp = format!("v=0\r\n{}", "a=x\r\n".repeat(6_000));
    let started = Instant::now();
    let mut offers = 0;
    let detected = loop {
        if started.elapsed() > Duration::from_secs(40) {
            break None;
        }
        if offers < 400 {
            doctor
                .send(ClientMessage::Offer {
                    to: patient.id(),
                    sdp: sdp.clone(),
                })
                .await?;
            offers += 1;
        }
        match doctor.conn.recv_timeout(Duration::from_millis(20)).await {
            Ok(Incoming::Message(ServerMessage::PeerReconnecting { participant_id }))
                if participant_id == patient.id() =>
            {
                break Some(started.elapsed());
            }
            Ok(Incoming::Closed { code, .. }) => bail!("the doctor was closed with {code}"),
            _ => {}
        }
    };
    let detected = detected.context("the non-reading patient was never declared dead")?;
    println!(
        "non-reading patient declared dead {:.1} s after the doctor started sending \
         ({offers} offers of {} KB)",
        detected.as_secs_f64(),
        sdp.len() / 1024
    );
    assert!(detected < Duration::from_secs(config.keepalive_timeout_secs + 20));
    still_connected(&mut doctor).await?;
    drop(patient);
    Ok(())
}

#[tokio::test]
async fn unjoined_clients_that_never_read_are_closed_at_the_join_deadline() -> Result<()> {
    let mut config = test_config();
    config.join_timeout_secs = 1;
    let server = TestServer::start_with(config.clone()).await?;
    let mut clients = Vec::new();
    for _ in 0..20 {
        let mut c = server.connect().await?;
        // Pings the server must answer, which the client never reads.
        for _ in 0..2_000 {
            c.conn
                .send_raw(tokio_tungstenite::tungstenite::Message::Ping(
                    vec![0u8; 100].into(),
                ))
                .await?;
        }
        clients.push(c);
    }
    let before = metric(&server.metrics().await?, "bedside_websocket_connections");
    let m = server.metrics().await?;
    assert_eq!(before, 20.0, "the clients are connected: {m}");
    let started = Instant::now();
    let open = loop {
        let open = metric(&server.metrics().await?, "bedside_websocket_connections");
        if open == 0.0 || started.elapsed() > Duration::from_secs(20) {
            break open;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    println!(
        "20 unjoined non-reading clients: {open} still open {:.1} s later",
        started.elapsed().as_secs_f64()
    );
    assert_eq!(open, 0.0);
    Ok(())
}

#[tokio::test]
async fn the_doctor_joins_a_consultation_full_of_waiting_seats() -> Result<()> {
    let mut config = test_config();
    config.limits.waiting_timeout_secs = 2;
    let server = TestServer::start_with(config).await?;
    let c = server.create_consultation().await?;
    // One invite code: two may wait with it, the third is refused.
    let mut held = Vec::new();
    for i in 0..8 {
        let mut p = server.connect().await?;
        match p.join_invite(&c.invite_code, Some("Mallory")).await {
            Ok(_) => held.push(p),
            Err(e) => {
                assert!(i >= 2, "seat {i} refused: {e}");
                assert!(e.to_string().contains("ConsultationFull"), "{e}");
            }
        }
    }
    assert_eq!(held.len(), 2);
    let mut doctor = server.doctor(&c).await?;
    still_connected(&mut doctor).await?;
    // Nobody admits them: they time out and are told.
    for p in &mut held {
        assert_eq!(
            read_until_close(p, Duration::from_secs(10)).await?.0,
            close_code::WAITING_CLOSED
        );
    }
    still_connected(&mut doctor).await?;
    Ok(())
}

#[tokio::test]
async fn a_revoked_invite_empties_its_waiting_seats_and_redeems_no_more() -> Result<()> {
    let server = TestServer::start().await?;
    let c = server.create_consultation().await?;
    let mut doctor = server.doctor(&c).await?;
    let mut waiting = server.waiting_patient(&c, "Eve").await?;
    let resp = server
        .http()
        .delete(server.api(&format!("/consultations/{}/invites", c.consultation_id.0)))
        .bearer_auth(&server.admin_key)
        .send()
        .await?;
    assert_eq!(resp.status(), 200);
    let body: serde_json::Value = resp.json().await?;
    assert_eq!(body["revoked"], 1);
    assert_eq!(body["waiting_removed"], 1);
    assert_eq!(
        read_until_close(&mut waiting, Duration::from_secs(5))
            .await?
            .0,
        close_code::WAITING_CLOSED
    );
    let mut again = server.connect().await?;
    assert!(again.join_invite(&c.invite_code, None).await.is_err());
    still_connected(&mut doctor).await?;
    Ok(())
}

#[tokio::test]
async fn a_waiting_patient_gets_no_turn_credentials() -> Result<()> {
    let mut config = test_config();
    config.ice.turn_urls = vec!["turn:127.0.0.1:3478?transport=udp".into()];
    config.ice.turn_secret = "test-turn-secret".into();
    let server = TestServer::start_with(config).await?;
    let c = server.create_consultation().await?;
    let mut doctor = server.doctor(&c).await?;
    let mut patient = server.waiting_patient(&c, "Wanda").await?;
    patient.send(ClientMessage::RefreshIceServers).await?;
    patient.expect_error(ErrorCode::NotAdmitted).await?;
    doctor
        .send(ClientMessage::Admit {
            participant_id: patient.id(),
        })
        .await?;
    patient.expect_type("admitted").await?;
    patient.send(ClientMessage::RefreshIceServers).await?;
    match patient.expect_type("ice_servers").await? {
        ServerMessage::IceServers { ice_servers } => {
            assert!(ice_servers.iter().any(|s| s.credential.is_some()));
        }
        other => bail!("{other:?}"),
    }
    Ok(())
}

#[tokio::test]
async fn a_resume_storm_is_throttled_and_the_doctor_hears_little_of_it() -> Result<()> {
    let server = TestServer::start().await?;
    let c = server.create_consultation().await?;
    let mut doctor = server.doctor(&c).await?;
    let patient = server.waiting_patient(&c, "Storm").await?;
    let mut token = patient.resume_token.clone().unwrap();
    patient.conn.abort();
    let started = Instant::now();
    let (mut ok, mut limited) = (0, 0);
    for _ in 0..300 {
        let mut c = server.connect().await?;
        c.send(ClientMessage::Resume {
            protocol_version: PROTOCOL_VERSION,
            resume_token: token.clone(),
        })
        .await?;
        match c.next().await? {
            ServerMessage::Joined { resume_token, .. } => {
                ok += 1;
                token = resume_token;
            }
            ServerMessage::Error {
                code: ErrorCode::RateLimited,
                ..
            } => limited += 1,
            other => bail!("{other:?}"),
        }
        c.conn.abort();
    }
    let storm = started.elapsed();
    // Count what reached the doctor.
    let mut updates = 0;
    while let Ok(Incoming::Message(m)) = doctor.conn.recv_timeout(Duration::from_millis(600)).await
    {
        if m.type_name() == "waiting_room" {
            updates += 1;
        }
    }
    let audit: Vec<serde_json::Value> = server
        .http()
        .get(server.api(&format!("/consultations/{}/audit", c.consultation_id.0)))
        .bearer_auth(&server.admin_key)
        .send()
        .await?
        .json()
        .await?;
    let resumed_rows = audit.iter().filter(|e| e["event"] == "resumed").count();
    println!(
        "resume storm: 300 attempts in {:.2} s, {ok} resumed, {limited} refused; the doctor got \
         {updates} waiting-room updates; {resumed_rows} resume audit rows",
        storm.as_secs_f64()
    );
    assert!(ok <= 15, "{ok} resumes went through");
    assert!(updates <= 40, "{updates} waiting-room updates");
    still_connected(&mut doctor).await?;
    Ok(())
}

#[tokio::test]
async fn an_old_resume_token_cannot_take_over_the_seat() -> Result<()> {
    let server = TestServer::start().await?;
    let (_doctor, patient) = call(&server).await?;
    let stolen = patient.resume_token.clone().unwrap();
    patient.conn.abort();
    let mut back = server.connect().await?;
    back.send(ClientMessage::Resume {
        protocol_version: PROTOCOL_VERSION,
        resume_token: stolen.clone(),
    })
    .await?;
    back.expect_type("joined").await?;
    // The thief's copy of the first token is no good any more.
    let mut thief = server.connect().await?;
    thief
        .send(ClientMessage::Resume {
            protocol_version: PROTOCOL_VERSION,
            resume_token: stolen,
        })
        .await?;
    thief.expect_error(ErrorCode::ResumeExpired).await?;
    back.send(ClientMessage::Ping { nonce: 77 }).await?;
    back.expect_type("pong").await?;
    Ok(())
}

/// Opens a WebSocket upgrade by hand with the given extra headers; returns the status line.
async fn raw_upgrade(server: &TestServer, path: &str, headers: &[(&str, &str)]) -> Result<String> {
    let addr = server.base_url.trim_start_matches("http://");
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    let mut req = format!(
        "GET {path} HTTP/1.1\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
    );
    if !headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("host")) {
        req.push_str(&format!("Host: {addr}\r\n"));
    }
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).await?;
    let mut buf = vec![0u8; 1024];
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await??;
    let text = String::from_utf8_lossy(&buf[..n]).to_string();
    Ok(text.lines().next().unwrap_or("").to_owned())
}

#[tokio::test]
async fn cross_origin_websockets_and_unknown_hosts_are_refused() -> Result<()> {
    let server = TestServer::start().await?;
    let evil = raw_upgrade(&server, "/ws", &[("Origin", "https://evil.example")]).await?;
    assert!(evil.contains(" 403 "), "{evil}");
    let rebound = raw_upgrade(&server, "/ws", &[("Host", "evil.example:8443")]).await?;
    assert!(rebound.contains(" 421 "), "{rebound}");
    let own = server.base_url.clone();
    let same = raw_upgrade(&server, "/ws", &[("Origin", &own)]).await?;
    assert!(same.contains(" 101 "), "{same}");
    let native = raw_upgrade(&server, "/ws", &[]).await?;
    assert!(native.contains(" 101 "), "{native}");
    // /metrics through a rebound name is refused as well.
    let resp = server
        .http()
        .get(format!("{}/metrics", server.base_url))
        .header("Host", "rebind.example")
        .send()
        .await?;
    assert_eq!(resp.status(), 421);
    let m = server.metrics().await?;
    assert!(
        metric(&m, "bedside_limited_total{limit=\"origin\"}") >= 1.0,
        "{m}"
    );
    Ok(())
}

/// Connects from `local` (any 127.0.0.0/8 address) to the server.
async fn connect_from(local: &str, server: &TestServer) -> std::io::Result<tokio::net::TcpStream> {
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.bind(format!("{local}:0").parse().unwrap())?;
    socket
        .connect(
            server
                .base_url
                .trim_start_matches("http://")
                .parse()
                .unwrap(),
        )
        .await
}

#[tokio::test]
async fn slow_http_connections_are_capped_and_closed_while_a_doctor_joins() -> Result<()> {
    let mut config: Config = test_config();
    config.limits.header_read_timeout_secs = 2;
    config.limits.http_idle_timeout_secs = 2;
    config.limits.max_connections_per_source = 100;
    // Both ends of 2,000 connections live in this process: raise the soft open-files limit to
    // the hard one, and say so if that is still too few.
    let limit = bedside_tests::raise_fd_limit();
    assert!(
        limit >= 4_400,
        "open-files limit {limit}: this test needs 4,400"
    );
    let server = TestServer::start_with(config).await?;
    let c = server.create_consultation().await?;
    // 2,000 connections from one attacker address, each with a partial request.
    let started = Instant::now();
    let mut attack = Vec::new();
    for _ in 0..2_000 {
        if let Ok(mut s) = connect_from("127.0.0.2", &server).await {
            let _ = s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n").await;
            attack.push(s);
        }
    }
    // The doctor (another address) gets in at once.
    let t = Instant::now();
    let _doctor = server.doctor(&c).await?;
    let doctor_join = t.elapsed();
    // Within the header timeout (and a margin) every attack connection is closed.
    let mut closed = 0;
    for s in &mut attack {
        let mut b = [0u8; 256];
        match tokio::time::timeout(Duration::from_secs(10), s.read(&mut b)).await {
            Ok(Ok(0)) | Ok(Err(_)) => closed += 1,
            Ok(Ok(_)) => {
                // An error response, then the close.
                if let Ok(Ok(0) | Err(_)) =
                    tokio::time::timeout(Duration::from_secs(10), s.read(&mut b)).await
                {
                    closed += 1
                }
            }
            Err(_) => {}
        }
    }
    let all_closed = started.elapsed();
    // An idle keep-alive connection is closed too.
    let mut idle = connect_from("127.0.0.3", &server).await?;
    idle.write_all(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        .await?;
    let mut b = vec![0u8; 1024];
    let n = idle.read(&mut b).await?;
    assert!(String::from_utf8_lossy(&b[..n]).contains("200 OK"));
    let t = Instant::now();
    let n = tokio::time::timeout(Duration::from_secs(10), idle.read(&mut b)).await??;
    assert_eq!(n, 0, "the idle connection is closed");
    let idle_closed = t.elapsed();
    let m = server.metrics().await?;
    println!(
        "slowloris: {} of 2000 attack connections opened, all {closed} closed {:.1} s after \
         the attack began; doctor joined in {:.0} ms meanwhile; idle keep-alive closed after \
         {:.1} s; refused per source: {}",
        attack.len(),
        all_closed.as_secs_f64(),
        doctor_join.as_secs_f64() * 1000.0,
        idle_closed.as_secs_f64(),
        metric(
            &m,
            "bedside_limited_total{limit=\"connections_per_source\"}"
        )
    );
    assert_eq!(closed, attack.len());
    assert!(doctor_join < Duration::from_secs(5));
    Ok(())
}

#[tokio::test]
async fn behind_a_trusted_proxy_guessers_are_limited_by_their_forwarded_address() -> Result<()> {
    let mut config = test_config();
    config.invite_attempts_per_minute = 3;
    config.limits.trusted_proxies = vec!["127.0.0.1/32".parse()?];
    let server = TestServer::start_with(config).await?;
    let c = server.create_consultation().await?;
    let join = |from: &'static str, code: String| {
        let url = server.ws_url.clone();
        async move {
            use futures_util::{SinkExt, StreamExt};
            use tokio_tungstenite::tungstenite::client::IntoClientRequest;
            let mut req = url.into_client_request()?;
            req.headers_mut()
                .insert("x-forwarded-for", from.parse().unwrap());
            let (mut ws, _) = tokio_tungstenite::connect_async(req).await?;
            let msg = ClientMessage::Join {
                protocol_version: PROTOCOL_VERSION,
                auth: bedside_protocol::JoinAuth::InviteCode { code },
                display_name: None,
            };
            ws.send(tokio_tungstenite::tungstenite::Message::Text(
                msg.encode().into(),
            ))
            .await?;
            loop {
                if let Some(tokio_tungstenite::tungstenite::Message::Text(t)) =
                    ws.next().await.transpose()?
                {
                    return anyhow::Ok(ServerMessage::decode(&t)?);
                }
            }
        }
    };
    let mut limited = false;
    for _ in 0..5 {
        if let ServerMessage::Error {
            code: ErrorCode::RateLimited,
            ..
        } = join("198.51.100.7", "ZZZZZ-ZZZZZ".into()).await?
        {
            limited = true;
        }
    }
    assert!(limited, "the guesser is limited");
    // Another patient behind the same proxy is not.
    match join("198.51.100.8", c.invite_code.clone()).await? {
        ServerMessage::Joined { .. } => {}
        other => bail!("the honest patient was refused: {other:?}"),
    }
    // IPv6 guessers are limited per /64: another address in the same /64 is still limited.
    for _ in 0..3 {
        join("2001:db8:1:2::1", "ZZZZZ-ZZZZZ".into()).await?;
    }
    match join("2001:db8:1:2::99", "ZZZZZ-ZZZZZ".into()).await? {
        ServerMessage::Error {
            code: ErrorCode::RateLimited,
            ..
        } => {}
        other => bail!("same /64 not limited: {other:?}"),
    }
    Ok(())
}

/// Starts the server library in its own process on `dir`, so that it can be SIGKILLed.
async fn killable_server(dir: &std::path::Path) -> Result<(tokio::process::Child, TestApi)> {
    let config = dir.join("server.toml");
    std::fs::write(
        &config,
        format!(
            "listen = \"127.0.0.1:0\"\ndata-dir = \"{}\"\nadmin-api-key = \"{ADMIN}\"\n\
             token-secret = \"kill-test-secret\"\n[turn]\nenabled = false\n",
            dir.join("data").display()
        ),
    )?;
    let (child, base) = bedside_tests::spawn_server_process(
        std::path::Path::new(env!("CARGO_BIN_EXE_server-under-test")),
        &config,
    )
    .await?;
    Ok((child, TestApi { base }))
}

const ADMIN: &str = "kill-test-admin-key-0123";

struct TestApi {
    base: String,
}

impl TestApi {
    fn ws(&self) -> String {
        format!("{}/ws", self.base.replacen("http://", "ws://", 1))
    }
}

#[tokio::test]
async fn an_admission_survives_a_sigkill_right_after_it_was_acknowledged() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let http = reqwest::Client::new();
    for round in 0..3 {
        let (mut child, api) = killable_server(dir.path()).await?;
        let c: bedside_server::api::CreatedConsultation = http
            .post(format!("{}/api/v1/consultations", api.base))
            .bearer_auth(ADMIN)
            .send()
            .await?
            .json()
            .await?;
        let mut doctor = Client::connect(&api.ws()).await?;
        doctor.join_token(&c.doctor_token).await?;
        doctor.expect_type("waiting_room").await?;
        let mut patient = Client::connect(&api.ws()).await?;
        patient.join_invite(&c.invite_code, Some("Kim")).await?;
        patient.expect_type("waiting").await?;
        doctor
            .send(ClientMessage::Admit {
                participant_id: patient.id(),
            })
            .await?;
        patient.expect_type("admitted").await?;
        // Killed the moment the patient has been told.
        child.start_kill()?;
        child.wait().await?;

        let (mut child, api) = killable_server(dir.path()).await?;
        let mut back = Client::connect(&api.ws()).await?;
        back.send(ClientMessage::Resume {
            protocol_version: PROTOCOL_VERSION,
            resume_token: patient.resume_token.clone().unwrap(),
        })
        .await?;
        back.expect_type("joined").await?;
        match back.next().await? {
            ServerMessage::Admitted { .. } => {}
            other => bail!("round {round}: after the kill the patient got {other:?}"),
        }
        let audit: Vec<serde_json::Value> = http
            .get(format!(
                "{}/api/v1/consultations/{}/audit",
                api.base, c.consultation_id.0
            ))
            .bearer_auth(ADMIN)
            .send()
            .await?
            .json()
            .await?;
        assert!(
            audit.iter().any(|e| e["event"] == "admitted"),
            "round {round}: no admission in the audit"
        );
        child.start_kill()?;
        child.wait().await?;
    }
    Ok(())
}

#[tokio::test]
async fn a_doctor_token_seats_one_connection_and_is_spent_once_the_doctor_left() -> Result<()> {
    let server = TestServer::start().await?;
    let c = server.create_consultation().await?;
    let mut doctor = server.doctor(&c).await?;
    let copied = |server: &TestServer| {
        let url = server.ws_url.clone();
        let token = c.doctor_token.clone();
        async move {
            let mut thief = Client::connect(&url).await?;
            thief
                .send_join(bedside_protocol::JoinAuth::Token { token })
                .await?;
            anyhow::Ok(thief)
        }
    };
    // A copy of the token cannot take a second seat while the doctor holds the first...
    copied(&server)
        .await?
        .expect_error(ErrorCode::AlreadyJoined)
        .await?;
    still_connected(&mut doctor).await?;
    // ...nor while the doctor's link is down and the seat held for the rejoin window; the
    // doctor's own resume takes the seat back.
    let resume_token = doctor.resume_token.clone().unwrap();
    doctor.conn.abort();
    copied(&server)
        .await?
        .expect_error(ErrorCode::AlreadyJoined)
        .await?;
    let mut doctor = server.connect().await?;
    doctor
        .send(ClientMessage::Resume {
            protocol_version: PROTOCOL_VERSION,
            resume_token,
        })
        .await?;
    match doctor.expect_type("joined").await? {
        ServerMessage::Joined { resumed: true, .. } => {}
        other => bail!("{other:?}"),
    }
    still_connected(&mut doctor).await?;
    // Once the doctor has left, the token is spent: a copy seats no one.
    doctor.send(ClientMessage::Leave).await?;
    doctor.expect_close().await?;
    copied(&server)
        .await?
        .expect_error(ErrorCode::InvalidToken)
        .await?;
    let m = server.metrics().await?;
    assert_eq!(
        metric(&m, "bedside_limited_total{limit=\"join_token_spent\"}"),
        1.0,
        "{m}"
    );
    // A fresh token from the clinic seats the doctor again.
    let fresh: bedside_server::api::IssuedToken = server
        .http()
        .post(server.api(&format!("/consultations/{}/tokens", c.consultation_id)))
        .bearer_auth(&server.admin_key)
        .json(&serde_json::json!({ "role": "doctor" }))
        .send()
        .await?
        .json()
        .await?;
    let mut again = server.connect().await?;
    again.join_token(&fresh.token).await?;
    Ok(())
}

/// Sends `resume` with `token` on a new connection to `api`; returns the first answer.
async fn resume_with(api: &TestApi, token: &str) -> Result<(Client, ServerMessage)> {
    let mut c = Client::connect(&api.ws()).await?;
    c.send(ClientMessage::Resume {
        protocol_version: PROTOCOL_VERSION,
        resume_token: token.to_owned(),
    })
    .await?;
    let first = c.next().await?;
    if let ServerMessage::Joined { resume_token, .. } = &first {
        c.resume_token = Some(resume_token.clone());
    }
    Ok((c, first))
}

#[tokio::test]
async fn after_a_sigkill_the_newest_resume_token_resumes_its_seat_and_spent_tokens_stay_spent()
-> Result<()> {
    let dir = tempfile::tempdir()?;
    let http = reqwest::Client::new();
    let (mut child, api) = killable_server(dir.path()).await?;
    let c: bedside_server::api::CreatedConsultation = http
        .post(format!("{}/api/v1/consultations", api.base))
        .bearer_auth(ADMIN)
        .send()
        .await?
        .json()
        .await?;
    let mut doctor = Client::connect(&api.ws()).await?;
    doctor.join_token(&c.doctor_token).await?;
    doctor.expect_type("waiting_room").await?;
    let mut patient = Client::connect(&api.ws()).await?;
    patient.join_invite(&c.invite_code, Some("Kim")).await?;
    patient.expect_type("waiting").await?;
    doctor
        .send(ClientMessage::Admit {
            participant_id: patient.id(),
        })
        .await?;
    patient.expect_type("admitted").await?;
    // The patient's link drops and it resumes: its first resume token is now stale. The server
    // is killed the moment the patient holds the new one.
    let first = patient.resume_token.clone().unwrap();
    patient.conn.abort();
    let (back, answer) = resume_with(&api, &first).await?;
    assert!(
        matches!(answer, ServerMessage::Joined { resumed: true, .. }),
        "{answer:?}"
    );
    let newest = back.resume_token.clone().unwrap();
    // The doctor leaves just before: its join token is spent.
    doctor.send(ClientMessage::Leave).await?;
    doctor.expect_close().await?;
    child.start_kill()?;
    child.wait().await?;

    let (mut child, api) = killable_server(dir.path()).await?;
    // A stale copy is refused after the restart as before it...
    let (_, answer) = resume_with(&api, &first).await?;
    assert!(
        matches!(
            answer,
            ServerMessage::Error {
                code: ErrorCode::ResumeExpired,
                ..
            }
        ),
        "the stale resume token after the restart: {answer:?}"
    );
    // ...the newest one takes the seat back, still admitted.
    let (mut back, answer) = resume_with(&api, &newest).await?;
    assert!(
        matches!(answer, ServerMessage::Joined { resumed: true, .. }),
        "{answer:?}"
    );
    match back.next().await? {
        ServerMessage::Admitted { .. } => {}
        other => bail!("after the kill the patient got {other:?}"),
    }
    still_connected(&mut back).await?;
    // And the doctor's spent token seats no one after the restart either.
    let mut thief = Client::connect(&api.ws()).await?;
    thief
        .send_join(bedside_protocol::JoinAuth::Token {
            token: c.doctor_token.clone(),
        })
        .await?;
    thief.expect_error(ErrorCode::InvalidToken).await?;
    child.start_kill()?;
    child.wait().await?;
    Ok(())
}

/// A signaling client whose TCP connection comes from `local` (a 127.0.0.0/8 address): another
/// source, as far as the server's per-source limits go.
async fn client_from(local: &str, server: &TestServer) -> Result<Client> {
    let stream = connect_from(local, server).await?;
    Ok(Client {
        conn: SignalingConnection::connect_over(&server.ws_url, stream, None).await?,
        participant_id: None,
        resume_token: None,
    })
}

#[tokio::test]
async fn an_invite_guesser_locks_out_only_its_own_source() -> Result<()> {
    let mut config = test_config();
    config.invite_attempts_per_minute = 3;
    let server = TestServer::start_with(config).await?;
    let a = server.create_consultation().await?;
    let b = server.create_consultation().await?;
    let mut guesser = client_from("127.0.0.2", &server).await?;
    let mut guesses = 0;
    let limited = loop {
        guesser
            .send_join(bedside_protocol::JoinAuth::InviteCode {
                code: "ZZZZZ-ZZZZZ".into(),
            })
            .await?;
        guesses += 1;
        match guesser.expect_type("error").await? {
            ServerMessage::Error {
                code: ErrorCode::RateLimited,
                ..
            } => break true,
            ServerMessage::Error {
                code: ErrorCode::InvalidInviteCode,
                ..
            } if guesses < 10 => continue,
            other => bail!("guess {guesses}: {other:?}"),
        }
    };
    assert!(limited && guesses == 4, "limited after {guesses} guesses");
    // Patients of either consultation on other addresses are not locked out.
    for (from, c) in [("127.0.0.3", &a), ("127.0.0.4", &b)] {
        let mut p = client_from(from, &server).await?;
        p.join_invite(&c.invite_code, Some("Honest")).await?;
        assert_eq!(p.next().await?, ServerMessage::Waiting);
    }
    // Right codes cost nothing: a shared address (a clinic's kiosk) redeems more than the
    // budget's worth of them.
    for _ in 0..5 {
        let mut p = client_from("127.0.0.5", &server).await?;
        p.join_invite(&b.invite_code, None).await?;
        p.send(ClientMessage::Leave).await?;
        p.expect_close().await?;
    }
    // The guesser's address stays refused, right code or not.
    guesser
        .send_join(bedside_protocol::JoinAuth::InviteCode {
            code: a.invite_code.clone(),
        })
        .await?;
    guesser.expect_error(ErrorCode::RateLimited).await?;
    Ok(())
}
