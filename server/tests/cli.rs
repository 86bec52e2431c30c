//! The `bedside-server` binary as an administrator uses it.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use bedside_server::Config;

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_bedside-server"))
}

#[test]
fn print_config_prints_the_commented_defaults() {
    let out = bin().arg("--print-config").output().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.lines().filter(|l| l.starts_with('#')).count() > 20);
    assert_eq!(Config::from_toml(&text).unwrap(), Config::default());
}

#[test]
fn a_bad_config_file_is_refused_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bedside.toml");
    std::fs::write(&path, "rejoin-window-secs = \"a minute\"\n").unwrap();
    let out = bin().arg("--config").arg(&path).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("rejoin-window-secs"), "{err}");

    std::fs::write(
        &path,
        "keepalive-interval-secs = 9\nkeepalive-timeout-secs = 3\n",
    )
    .unwrap();
    let out = bin().arg("--config").arg(&path).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("keepalive"));
}

#[test]
fn starts_with_no_config_prints_the_key_once_and_stops_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    // The relay on free ports too, so the test does not depend on 3478 being free.
    let config = dir.path().join("bedside.toml");
    std::fs::write(
        &config,
        "[turn.relay]\nlisten-udp = [\"127.0.0.1:0\"]\nlisten-tcp = [\"127.0.0.1:0\"]\n",
    )
    .unwrap();
    let start = || {
        bin()
            .args(["--listen", "127.0.0.1:0", "--config"])
            .arg(&config)
            .arg("--data-dir")
            .arg(dir.path())
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let mut child = start();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let first = lines.next().unwrap().unwrap();
    assert!(first.starts_with("Administration key"), "{first}");
    let key = std::fs::read_to_string(dir.path().join("admin-api-key")).unwrap();
    assert!(first.ends_with(key.trim()));
    let listening = lines.next().unwrap().unwrap();
    assert!(
        listening.contains("listening on http://127.0.0.1:"),
        "{listening}"
    );

    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "server did not stop on SIGTERM");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "{status:?}");

    // Second start: same key, not printed again.
    let mut child = start();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let first = lines.next().unwrap().unwrap();
    assert!(first.contains("listening on"), "{first}");
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    assert!(child.wait().unwrap().success());
}

#[test]
fn only_turn_runs_the_relay_alone() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("bedside.toml");
    std::fs::write(
        &config,
        "[turn.relay]\nlisten-udp = [\"127.0.0.1:0\"]\nlisten-tcp = [\"127.0.0.1:0\"]\n",
    )
    .unwrap();
    let mut child = bin()
        .args(["--only-turn", "--config"])
        .arg(&config)
        .arg("--data-dir")
        .arg(dir.path())
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let first = lines.next().unwrap().unwrap();
    assert!(
        first.contains("relay only: STUN/TURN on UDP [127.0.0.1:"),
        "{first}"
    );
    // A STUN binding request over UDP gets a success response.
    let port: u16 = first
        .split("127.0.0.1:")
        .nth(1)
        .unwrap()
        .split(']')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    let sock = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut req = vec![0x00, 0x01, 0x00, 0x00, 0x21, 0x12, 0xa4, 0x42];
    req.extend_from_slice(&[7u8; 12]);
    sock.send_to(&req, ("127.0.0.1", port)).unwrap();
    let mut buf = [0u8; 512];
    let (n, _) = sock.recv_from(&mut buf).unwrap();
    assert!(n >= 20);
    assert_eq!(&buf[..2], &[0x01, 0x01], "binding success response");
    assert_eq!(&buf[8..20], &[7u8; 12], "same transaction id");
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    assert!(child.wait().unwrap().success());
}
