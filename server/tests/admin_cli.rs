//! `bedside-server admin …` against a real server: the administrator's commands print the
//! invite link, and errors say what went wrong.

use std::path::Path;
use std::process::Command;

use bedside_server::{Config, Server};

fn admin(config: &Path, data_dir: &Path, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_bedside-server"))
        .arg("--config")
        .arg(config)
        .arg("--data-dir")
        .arg(data_dir)
        .arg("admin")
        .args(args)
        .env_remove("BEDSIDE_ADMIN_KEY")
        .output()
        .expect("runs");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn field<'a>(out: &'a str, name: &str) -> &'a str {
    out.lines()
        .find_map(|l| l.strip_prefix(name))
        .map(str::trim)
        .unwrap_or_else(|| panic!("no {name} in {out}"))
}

#[test]
fn the_admin_cli_creates_a_consultation_prints_its_link_and_administers_it() {
    let dir = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut config = Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        data_dir: dir.path().to_owned(),
        ..Config::default()
    };
    config.turn.enabled = false;
    // No key configured: the server generates one into the data directory, where the CLI
    // finds it.
    let server = rt.block_on(Server::bind(config.clone())).unwrap();
    let base = server.base_url();
    config.listen = server.local_addr();
    rt.spawn(server.serve(std::future::pending()));
    let file = dir.path().join("bedside.toml");
    std::fs::write(
        &file,
        format!("listen = \"{}\"\n[turn]\nenabled = false\n", config.listen),
    )
    .unwrap();
    let run = |args: &[&str]| admin(&file, dir.path(), args);

    let (ok, out, err) = run(&["create"]);
    assert!(ok, "{err}");
    let id = field(&out, "consultation").to_owned();
    let code = field(&out, "invite code");
    assert_eq!(field(&out, "patient link"), format!("{base}/j/{code}"));
    assert_eq!(field(&out, "doctor token").split('.').count(), 3, "{out}");

    let (ok, out, _) = run(&["list"]);
    assert!(ok);
    assert!(
        out.lines()
            .any(|l| l.starts_with(&id) && l.contains("open")),
        "{out}"
    );

    let (ok, out, _) = run(&["invite", &id]);
    assert!(ok);
    let link = field(&out, "patient link");
    assert!(
        link.starts_with(&format!("{base}/j/")) && !link.ends_with(code),
        "{out}"
    );

    let (ok, out, _) = run(&["token", &id, "--role", "clinician"]);
    assert!(ok);
    assert_eq!(out.trim().split('.').count(), 3, "{out}");

    let (ok, out, _) = run(&["--json", "invite", &id, "--invite-ttl-secs", "60"]);
    assert!(ok);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert!(v["invite_url"].as_str().unwrap().contains("/j/"), "{out}");

    let (ok, out, _) = run(&["end", &id]);
    assert!(ok, "{out}");
    let (_, out, _) = run(&["list"]);
    assert!(
        out.lines()
            .any(|l| l.starts_with(&id) && l.contains("ended")),
        "{out}"
    );

    let (ok, out, _) = run(&["audit", &id]);
    assert!(ok);
    for event in ["created", "invite_issued", "token_issued", "ended"] {
        assert!(out.contains(event), "{event} missing from {out}");
    }

    // A doctor credential for the desktop app: issued (shown once), listed without its
    // secret, working on the doctor's routes, revoked, refused.
    let (ok, out, err) = run(&["issue-credential", "--ttl-days", "30"]);
    assert!(ok, "{err}");
    let cred_id = field(&out, "credential id").to_owned();
    let cred = field(&out, "credential  ").to_owned();
    assert!(!cred.is_empty() && cred != cred_id, "{out}");
    let doctor_list = |cred: &str| {
        rt.block_on(async {
            reqwest::Client::new()
                .get(format!("{base}/api/v1/doctor/consultations"))
                .bearer_auth(cred)
                .send()
                .await
                .unwrap()
                .status()
        })
    };
    assert_eq!(doctor_list(&cred), reqwest::StatusCode::OK);
    let (ok, out, _) = run(&["credentials"]);
    assert!(ok);
    let line = out
        .lines()
        .find(|l| l.starts_with(&cred_id))
        .unwrap_or_else(|| panic!("{cred_id} not listed: {out}"));
    assert!(line.ends_with("valid"), "{line}");
    assert!(!out.contains(&cred), "the list shows the secret: {out}");
    let (ok, out, err) = run(&["revoke-credential", &cred_id]);
    assert!(ok, "{err}");
    assert_eq!(out.trim(), format!("revoked {cred_id}"));
    assert_eq!(doctor_list(&cred), reqwest::StatusCode::UNAUTHORIZED);
    let (_, out, _) = run(&["credentials"]);
    assert!(
        out.lines()
            .any(|l| l.starts_with(&cred_id) && l.contains("revoked 20")),
        "{out}"
    );
    let (ok, _, err) = run(&["revoke-credential", "d_no_such_credential"]);
    assert!(!ok);
    assert!(err.contains("404"), "{err}");
    let (ok, _, err) = run(&["issue-credential", "--ttl-days", "400"]);
    assert!(!ok);
    assert!(err.contains("between 1 and 365"), "{err}");

    // Errors: an ended consultation, a wrong key, no server.
    let (ok, _, err) = run(&["invite", &id]);
    assert!(!ok);
    assert!(err.contains("no such consultation"), "{err}");
    let (ok, _, err) = run(&["--key", "not-the-key-0123456789", "list"]);
    assert!(!ok);
    assert!(err.contains("401"), "{err}");
    let (ok, _, err) = run(&["--url", "http://127.0.0.1:1", "list"]);
    assert!(!ok);
    assert!(err.contains("cannot reach"), "{err}");
}
