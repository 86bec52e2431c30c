//! The `bedside-server` binary as an administrator uses it.

mod common;

use common::http;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use bedside_server::Config;

fn http_get(addr: &str, path: &str) -> (u16, String) {
    http(addr, "GET", path, None)
}

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
fn starts_with_no_config_keeps_the_key_off_its_output_and_stops_on_sigterm() {
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
            .env("RUST_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let mut child = start();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let first = lines.next().unwrap().unwrap();
    // Not a terminal: the key's file, never the key.
    let key_file = dir.path().join("admin-api-key");
    assert!(first.starts_with("Administration key"), "{first}");
    assert!(first.contains(&key_file.display().to_string()), "{first}");
    let key = std::fs::read_to_string(&key_file).unwrap();
    assert!(!first.contains(key.trim()), "the key was printed: {first}");
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
    let rest: Vec<String> = lines.map_while(Result::ok).collect();
    let mut logs = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut logs).unwrap();
    assert!(logs.contains("listening"), "{logs}");
    assert!(!logs.contains(key.trim()), "the key reached the log stream");
    assert!(!rest.iter().any(|l| l.contains(key.trim())));
    // Piped logs carry no colour codes.
    assert!(!logs.contains('\x1b'), "ANSI codes in piped logs: {logs:?}");

    // Second start: same key, nothing said about it.
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
        .args(["--only-turn", "--listen", "127.0.0.1:0", "--config"])
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

    // Its own small HTTP listener: health, readiness and the relay's metrics.
    let second = lines.next().unwrap().unwrap();
    let http_addr = common::http_addr_in(&second);
    assert_eq!(http_get(&http_addr, "/healthz").0, 200);
    let (status, body) = http_get(&http_addr, "/readyz");
    assert_eq!(status, 200, "{body}");
    let (status, body) = http_get(&http_addr, "/metrics");
    assert_eq!(status, 200);
    assert!(body.contains("bedside_turn_active_allocations"), "{body}");
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    assert!(child.wait().unwrap().success());
}

#[test]
fn check_config_reports_every_problem_with_its_key() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("token-secret");
    std::fs::write(&secret, "a-secret-anyone-can-read\n").unwrap();
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o644)).unwrap();
    let path = dir.path().join("bedside.toml");
    std::fs::write(
        &path,
        format!(
            "listen = \"0.0.0.0:8443\"\n\
             rejoin-window-secs = \"a minute\"\n\
             rejoin-windw-secs = 5\n\
             log-format = \"xml\"\n\
             audit-retention-days = -1\n\
             keepalive-interval-secs = 9\n\
             keepalive-timeout-secs = 3\n\
             token-secret-file = \"{}\"\n\
             [tls]\nmode = \"files\"\ncert = \"/nonexistent/cert.pem\"\nkey = \"/nonexistent/key.pem\"\n\
             [tsl]\nmode = \"off\"\n",
            secret.display()
        ),
    )
    .unwrap();
    let out = bin().arg("--check-config").arg(&path).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let report = String::from_utf8_lossy(&out.stdout);
    for key in [
        "rejoin-window-secs:",
        "rejoin-windw-secs:",
        "log-format:",
        "audit-retention-days:",
        "keepalive-timeout-secs",
        "token-secret-file:",
        "tls.cert:",
        "tls.key:",
        "tsl:",
        "turn.relay.relay-ips:",
    ] {
        assert!(
            report.lines().any(|l| l.starts_with(key)),
            "{key} missing from:\n{report}"
        );
    }
    assert!(report.contains("chmod 600"), "{report}");

    // A good file: exit 0.
    std::fs::write(
        &path,
        "listen = \"127.0.0.1:8443\"\naudit-retention-days = 2190\n",
    )
    .unwrap();
    let out = bin().arg("--check-config").arg(&path).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    // The reference file, as printed, passes.
    let reference = bin().arg("--print-config").output().unwrap().stdout;
    std::fs::write(&path, reference).unwrap();
    assert!(
        bin()
            .arg("--check-config")
            .arg(&path)
            .output()
            .unwrap()
            .status
            .success()
    );
}

#[test]
fn print_config_with_a_file_prints_the_effective_settings_redacted() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bedside.toml");
    std::fs::write(
        &path,
        "admin-api-key = \"admin-key-0123456789-secret\"\nrejoin-window-secs = 120\n\
         [turn.relay]\nauth-secret = \"relay-secret-xyz\"\n",
    )
    .unwrap();
    let out = bin()
        .arg("--print-config")
        .arg("--config")
        .arg(&path)
        .env("BEDSIDE_TOKEN_SECRET", "token-from-the-environment")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    for secret in [
        "admin-key-0123456789-secret",
        "relay-secret-xyz",
        "token-from-the-environment",
    ] {
        assert!(!text.contains(secret), "{secret} printed:\n{text}");
    }
    let printed = Config::from_toml(&text).unwrap();
    assert_eq!(printed.rejoin_window_secs, 120);
    assert_eq!(printed.admin_api_key, "<redacted>");
    assert_eq!(
        printed.token_secret, "<redacted>",
        "the environment's secret is in effect"
    );
    assert_eq!(printed.turn.relay.auth_secret, "<redacted>");
    assert_eq!(printed.ice.turn_secret, "", "an unset secret stays empty");
}

/// Runs the server with `extra` config lines until it has logged its start, then stops it.
fn run_and_capture(extra: &str, envs: &[(&str, &str)]) -> (String, String) {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("bedside.toml");
    std::fs::write(
        &config,
        format!(
            "{extra}\n[turn.relay]\nlisten-udp = [\"127.0.0.1:0\"]\nlisten-tcp = [\"127.0.0.1:0\"]\n"
        ),
    )
    .unwrap();
    let mut child = bin()
        .args(["--listen", "127.0.0.1:0", "--config"])
        .arg(&config)
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .envs(envs.iter().copied())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let stdout: Vec<String> = (&mut lines)
        .map_while(Result::ok)
        .take_while(|l| !l.contains("listening on"))
        .collect();
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    assert!(child.wait().unwrap().success());
    let mut logs = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut logs).unwrap();
    (stdout.join("\n"), logs)
}

#[test]
fn json_logs_are_one_object_a_line_without_colour_codes() {
    let (_, logs) = run_and_capture("log-format = \"json\"", &[("RUST_LOG", "debug")]);
    let lines: Vec<&str> = logs.lines().collect();
    assert!(lines.len() >= 2, "{logs}");
    for line in &lines {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        assert!(
            v["timestamp"].is_string() && v["level"].is_string(),
            "{line}"
        );
    }
    assert!(!logs.contains('\x1b'));
    assert!(lines.iter().any(|l| l.contains("\"listening\"")), "{logs}");
    assert!(lines.iter().any(|l| l.contains("shutting down")), "{logs}");
}

/// Runs `bedside-server` under `script`, which gives it a terminal.
fn on_a_terminal(no_color: bool) -> Option<String> {
    let script = ["/usr/bin/script", "/bin/script"]
        .into_iter()
        .find(|p| Path::new(p).exists());
    let Some(script) = script else {
        if std::env::var_os("CI").is_some() {
            panic!("`script` (util-linux/bsdutils) is needed to give the server a terminal");
        }
        eprintln!("skipping: no `script` to give the server a terminal");
        return None;
    };
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("bedside.toml");
    std::fs::write(&config, "[turn]\nenabled = false\n").unwrap();
    // Started, then stopped by the shell once it has said where it listens.
    let cmd = format!(
        "{} --listen 127.0.0.1:0 --config {} --data-dir {} & pid=$!; sleep 2; kill -TERM $pid; wait $pid",
        env!("CARGO_BIN_EXE_bedside-server"),
        config.display(),
        dir.path().join("data").display()
    );
    let mut c = Command::new(script);
    c.args(["-qec", &cmd, "/dev/null"]).env("RUST_LOG", "info");
    if no_color {
        c.env("NO_COLOR", "1");
    } else {
        c.env_remove("NO_COLOR");
    }
    let out = c.output().unwrap();
    assert!(out.status.success(), "{out:?}");
    let key = std::fs::read_to_string(dir.path().join("data/admin-api-key")).unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        text.contains(key.trim()),
        "a person at a terminal is shown the key: {text}"
    );
    Some(text)
}

#[test]
fn colour_only_on_a_terminal_and_never_with_no_color() {
    let Some(coloured) = on_a_terminal(false) else {
        return;
    };
    assert!(
        coloured.contains("\x1b["),
        "a terminal gets colour: {coloured:?}"
    );
    let plain = on_a_terminal(true).unwrap();
    assert!(plain.contains("listening"), "{plain}");
    assert!(!plain.contains("\x1b["), "NO_COLOR: {plain:?}");
}
