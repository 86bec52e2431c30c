//! `cargo xtask bench-continuity`: runs every continuity scenario of the impairment lab (needs
//! root, iproute2, nftables and the debug server and probe) and prints, per scenario: whether
//! the call survived, how long media took to come back after the event, when the call went
//! audio-only and when video came back, the share of audio frames played from real packets,
//! the video frames decoded, and the patient's state changes.
//!
//! `--only NAME` runs the scenarios whose name contains NAME; `--reports DIR` also writes each
//! scenario's two probe reports there (JSON), for a closer look.

use std::time::Duration;

use anyhow::Result;
use bedside_tests::scenarios::{self, Trial};

type Scenario = (&'static str, fn() -> Result<Trial>);

fn main() -> Result<()> {
    if let Some(why) = scenarios::unavailable() {
        anyhow::bail!("the impairment lab cannot run here: {why}");
    }
    let flag = |name: &str| std::env::args().skip_while(|a| a != name).nth(1);
    let only = flag("--only").unwrap_or_default();
    let reports = flag("--reports").map(std::path::PathBuf::from);
    let all: [Scenario; 13] = [
        ("handover", || scenarios::handovers(1, Duration::ZERO)),
        ("signaling outage", scenarios::signaling_outage),
        ("server restart", scenarios::server_restart),
        ("tcp 443 only", scenarios::tcp_443_only),
        ("bandwidth collapse", scenarios::bandwidth_collapse),
        ("loss 5%", || scenarios::random_loss(5)),
        ("loss 10%", || scenarios::random_loss(10)),
        ("loss 20%", || scenarios::random_loss(20)),
        ("delay and jitter", scenarios::delay_and_jitter),
        ("loss both ways", scenarios::both_ways_loss),
        ("bursty loss", scenarios::bursty_loss),
        ("delay and loss", scenarios::delay_and_loss),
        ("long call", || {
            scenarios::handovers(4, Duration::from_secs(30))
        }),
    ];
    println!(
        "| scenario | survived | media back after event (ms) | audio-only after (ms) | video back after recovery (ms) | audio from packets, doctor / patient | audio from packets, RED or FEC | video frames decoded, doctor / patient | patient's states |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    for (name, scenario) in all {
        if !name.contains(only.as_str()) {
            continue;
        }
        eprintln!("continuity-bench: {name}…");
        let row = match scenario() {
            Ok(t) => {
                if let Some(dir) = &reports {
                    std::fs::create_dir_all(dir)?;
                    let file = dir.join(format!("{}.json", name.replace(' ', "-")));
                    let both = serde_json::json!({
                        "events_ms": t.events_ms,
                        "doctor": t.doctor,
                        "patient": t.patient,
                    });
                    std::fs::write(file, serde_json::to_string_pretty(&both)?)?;
                }
                row(&t)
            }
            Err(e) => format!("| {name} | no: {e:#} | | | | | | | |"),
        };
        println!("{row}");
    }
    Ok(())
}

fn row(t: &Trial) -> String {
    let ms = |v: Option<u64>| v.map_or("–".to_owned(), |v| v.to_string());
    let (went, back) = t.audio_only_and_back_ms();
    let (audio_doc, audio_pat) = t.audio_played_pct();
    let (fec_doc, fec_pat) = t.audio_recovered_pct();
    let back_after: Vec<String> = t.media_back_ms().iter().map(u64::to_string).collect();
    let mut states = t.patient_states();
    states.dedup();
    format!(
        "| {} | {} | {} | {} | {} | {audio_doc:.1}% / {audio_pat:.1}% | {fec_doc:.1}% / \
         {fec_pat:.1}% | {} / {} | {} |",
        t.name,
        if t.survived() { "yes" } else { "no" },
        back_after.join(", "),
        ms(went),
        ms(back),
        t.doctor["video_frames_decoded"],
        t.patient["video_frames_decoded"],
        states.join(" → ")
    )
}
