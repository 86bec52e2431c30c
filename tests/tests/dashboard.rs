//! The operations dashboard against a real server with two probe calls, one impaired (relay
//! only, and the patient's datagrams held 450 ms): in headless Chromium (playwright-core from
//! npm, the system's `/usr/bin/chromium`) two live rows, the impaired one poor, live updates;
//! a screenshot in `ci-artifacts/dashboard.png`; and neither the page nor its event stream
//! carries a display name, an invite code, a token or an address.

use std::time::Duration;

use anyhow::{Context, Result, bail};
use bedside_tests::ops::{self, ProbeCall};
use bedside_tests::{TestServer, test_config, with_turn};

const CHROMIUM: &str = "/usr/bin/chromium";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_shows_two_live_calls_and_the_impaired_one_is_poor() -> Result<()> {
    let tools = std::path::Path::new(CHROMIUM).exists() && ops::runs("npm", &["--version"]);
    if !ops::tool_available(tools, "the dashboard test needs /usr/bin/chromium and npm") {
        return Ok(());
    }
    let playwright = match ops::playwright_core() {
        Ok(p) => p,
        Err(e) if ops::tool_available(false, &format!("{e:#}")) => unreachable!(),
        Err(_) => return Ok(()),
    };

    let server = TestServer::start_with(with_turn(test_config())).await?;
    let calls = Duration::from_secs(30);
    let healthy = ProbeCall::start(&server, calls, false, false).await?;
    let impaired = ProbeCall::start(&server, calls, true, true).await?;

    // The event stream, read beside the browser.
    let events = tokio::spawn({
        let (base_url, admin_key) = (server.base_url.clone(), server.admin_key.clone());
        async move { ops::read_events(&base_url, &admin_key, Duration::from_secs(12)).await }
    });

    let profile = tempfile::tempdir()?;
    let shot = ops::artifacts_dir()?.join("dashboard.png");
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("js/dashboard.mjs");
    let out = tokio::process::Command::new("node")
        .arg(&script)
        .env("BASE_URL", &server.base_url)
        .env("ADMIN_KEY", &server.admin_key)
        .env("EXPECT_ROWS", "2")
        .env("SCREENSHOT", &shot)
        .env("CHROMIUM", CHROMIUM)
        .env("PROFILE_DIR", profile.path())
        .env("PLAYWRIGHT", &playwright)
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(60), out)
        .await
        .context("the browser script did not finish in 60 s")??;
    if !out.status.success() {
        bail!(
            "browser script failed: {}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let page: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let rows = page["rows"].as_array().context("rows")?;
    assert_eq!(rows.len(), 2, "{rows:?}");
    let quality_of = |cid: &str| {
        rows.iter()
            .find(|r| r["id"] == cid)
            .map(|r| r["quality"].as_str().unwrap_or("").to_owned())
    };
    let bad = impaired.consultation.consultation_id.0.clone();
    let good = healthy.consultation.consultation_id.0.clone();
    assert_eq!(quality_of(&bad).as_deref(), Some("poor"), "{rows:?}");
    let healthy_quality = quality_of(&good).context("the healthy call's row")?;
    assert_ne!(healthy_quality, "poor", "{rows:?}");
    let impaired_text = rows.iter().find(|r| r["id"] == bad.as_str()).unwrap()["text"]
        .as_str()
        .unwrap_or("")
        .to_owned();
    assert!(page["update_ms"].as_u64().unwrap() < 5000, "{page}");
    assert!(page["timeline_points"].as_u64().unwrap() >= 1, "{page}");
    assert_eq!(page["session_key_kept"], true);
    assert_eq!(page["local_storage_items"], 0);
    assert!(
        std::fs::metadata(&shot)?.len() > 10_000,
        "screenshot {shot:?}"
    );
    eprintln!(
        "dashboard screenshot: {}; a new snapshot rendered {} ms after the first look",
        shot.display(),
        page["update_ms"]
    );

    // Nothing that identifies anyone, in the page or in its event stream.
    let events = events.await??;
    let snaps = ops::snapshots(&events);
    assert!(snaps.len() >= 5, "{} snapshots in 12 s", snaps.len());
    let html = page["html"].as_str().unwrap_or("");
    for secret in ops::secrets_of(&[&healthy.consultation, &impaired.consultation]) {
        assert!(!html.contains(&secret), "the page holds {secret:?}");
        assert!(
            !events.contains(&secret),
            "the event stream holds {secret:?}"
        );
    }
    // Without the key, no events.
    let refused = server
        .http()
        .get(format!("{}/dashboard/events", server.base_url))
        .bearer_auth("not-the-key-0123456789")
        .send()
        .await?;
    assert_eq!(refused.status(), reqwest::StatusCode::UNAUTHORIZED);

    healthy.finish().await?;
    let (doctor, patient) = impaired.finish().await?;
    // The relay call's pair and its transport, as the probes themselves saw it: the relay
    // offers UDP and TCP, and either may win (both legs are held alike), so the page must
    // show one the probes reported (client-core fills `transport`; the page shows it beside
    // the candidate type).
    let seen: Vec<String> = doctor
        .transports
        .iter()
        .chain(&patient.transports)
        .map(|t| format!("relay · {}", format!("{t:?}").to_uppercase()))
        .collect();
    assert!(!seen.is_empty(), "the probes reported no transport");
    assert!(
        seen.iter().any(|s| impaired_text.contains(s.as_str())),
        "the row {impaired_text:?} shows none of the probes' {seen:?}"
    );
    Ok(())
}
