//! The server's JSON log stream (`log-format = "json"`, installed by the server's own
//! `logging::init_with`): every line is a JSON object without colour codes, and the lines of a
//! consultation's connections carry its id in their `consultation` span, so an administrator
//! can follow one consultation with `jq 'select(.span.id == "…")'`.

use anyhow::Result;
use bedside_server::config::LogFormat;
use bedside_tests::{CapturedLogs as Captured, TestServer};

#[tokio::test]
async fn a_consultations_lines_can_be_followed_by_its_id() -> Result<()> {
    let logs = Captured::default();
    let writer = logs.clone();
    bedside_server::logging::init_with(
        LogFormat::Json,
        "info,reqwest=off,hyper_util=off".into(),
        // Colour asked for: the JSON layer must still write none.
        true,
        move || writer.clone(),
    );

    let server = TestServer::start().await?;
    let a = server.create_consultation().await?;
    let b = server.create_consultation().await?;
    let doctor_a = server.doctor(&a).await?;
    let doctor_b = server.doctor(&b).await?;
    // Their links drop: the hub logs it from each connection's task.
    drop(doctor_a);
    drop(doctor_b);
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
    let text = loop {
        let text = String::from_utf8(logs.0.lock().unwrap().clone())?;
        if text.matches("link dropped").count() >= 2 || tokio::time::Instant::now() > deadline {
            break text;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    assert!(!text.contains('\x1b'), "colour codes in JSON logs");
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    for c in [&a, &b] {
        let id = c.consultation_id.0.as_str();
        let followed: Vec<&serde_json::Value> = lines
            .iter()
            .filter(|l| l["span"]["name"] == "consultation" && l["span"]["id"] == id)
            .collect();
        assert!(
            followed
                .iter()
                .any(|l| l["fields"]["message"] == "link dropped, seat held"),
            "no line of {id} found by its span:\n{text}"
        );
        // Nothing of the other consultation under this one's id.
        assert!(
            followed
                .iter()
                .all(|l| l["fields"]["consultation"].as_str().is_none_or(|c| c == id)),
            "{text}"
        );
    }
    Ok(())
}
