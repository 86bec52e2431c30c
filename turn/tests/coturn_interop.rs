//! Interop with coturn's own test clients: `turnutils_uclient` relays through OUR server to
//! `turnutils_peer` (or to another uclient allocation with `-y`). Skips, with a message, when
//! the coturn tools are not installed (`apt-get install coturn`).

mod common;

use std::process::Stdio;
use std::time::Duration;

use common::*;
use tokio::process::Command;

fn have(tool: &str) -> bool {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
        .unwrap_or(false)
}

fn free_udp_port() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Runs uclient with `flags` against a fresh server; returns (sent, received, lost line).
async fn run_uclient(flags: &[&str], messages: u32, clients: u32) -> Option<(u64, u64, u64)> {
    if !have("turnutils_uclient") || !have("turnutils_peer") {
        skip("turnutils_uclient/turnutils_peer not on PATH (install the coturn package)");
        return None;
    }
    let mut cfg = config();
    cfg.allow_loopback_peers = true;
    let h = bedside_turn::start(cfg, std::future::pending())
        .await
        .unwrap();
    let udp = h.udp_addrs()[0];
    let tcp = h.tcp_addrs()[0];
    let peer_port = free_udp_port();
    let mut peer = Command::new("turnutils_peer")
        .args(["-p", &peer_port.to_string(), "-L", "127.0.0.1"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let port = if flags.contains(&"-t") {
        tcp.port()
    } else {
        udp.port()
    };
    let mut cmd = Command::new("turnutils_uclient");
    cmd.args(flags)
        .args([
            "-W",
            SECRET,
            "-p",
            &port.to_string(),
            "-e",
            "127.0.0.1",
            "-r",
            &peer_port.to_string(),
        ])
        .args([
            "-n",
            &messages.to_string(),
            "-l",
            "400",
            "-m",
            &clients.to_string(),
            "-z",
            "5",
        ])
        .arg("127.0.0.1")
        .kill_on_drop(true);
    let out = tokio::time::timeout(Duration::from_secs(90), cmd.output())
        .await
        .expect("uclient timed out")
        .unwrap();
    let _ = peer.kill().await;
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    let last = |key: &str| -> u64 {
        text.lines()
            .filter_map(|l| l.split(key).nth(1))
            .filter_map(|rest| {
                rest.split(|c: char| !c.is_ascii_digit())
                    .next()?
                    .parse()
                    .ok()
            })
            .next_back()
            .unwrap_or_else(|| panic!("no {key} in uclient output:\n{text}"))
    };
    let sent = last("tot_send_msgs=");
    let recv = last("tot_recv_msgs=");
    let lost = last("Total lost packets ");
    let relayed = h.metrics().snapshot().relayed_packets;
    println!(
        "uclient {flags:?}: sent {sent}, received {recv}, lost {lost}; our relayed_packets {relayed}"
    );
    assert!(
        relayed >= 2 * sent,
        "traffic did not go through our relay ({relayed} < 2 x {sent})"
    );
    h.shutdown();
    h.join().await;
    Some((sent, recv, lost))
}

async fn check(flags: &[&str]) {
    if let Some((sent, recv, lost)) = run_uclient(flags, 40, 4).await {
        assert_eq!(sent, 160, "{flags:?}");
        assert_eq!(recv, sent, "{flags:?}");
        assert_eq!(lost, 0, "{flags:?}");
    }
}

#[tokio::test]
async fn uclient_udp_channels() {
    check(&["-c"]).await;
}

#[tokio::test]
async fn uclient_udp_send_indications() {
    check(&["-c", "-s"]).await;
}

#[tokio::test]
async fn uclient_tcp_channels() {
    check(&["-c", "-t"]).await;
}

#[tokio::test]
async fn uclient_tcp_send_indications() {
    check(&["-c", "-t", "-s"]).await;
}

#[tokio::test]
async fn uclient_client_to_client_udp() {
    check(&["-c", "-y"]).await;
}

#[tokio::test]
async fn uclient_client_to_client_tcp() {
    check(&["-c", "-y", "-t"]).await;
}

/// Without `-c` uclient allocates RTP/RTCP pairs: EVEN-PORT with the R bit, then
/// RESERVATION-TOKEN.
#[tokio::test]
async fn uclient_udp_channels_with_rtcp_pairs() {
    if let Some((sent, recv, lost)) = run_uclient(&[], 40, 2).await {
        assert!(sent >= 80, "sent {sent}");
        assert_eq!(recv, sent);
        assert_eq!(lost, 0);
    }
}
