//! Feature `bindgen`: the generated Kotlin bindings on the JVM (JNA) against the built `.so`: a
//! Kotlin patient (tests/kotlin/Patient.kt) joins a real local server, is admitted by a headless
//! doctor, receives its video and leaves.
//!
//! Needs `kotlinc` (Kotlin 2.x, e.g. the npm package `kotlin-compiler`; set `KOTLINC` or put it on
//! PATH), `java`, and JNA (Debian `libjna-java`, or `JNA_JAR`). Skips with a message when any is
//! missing. Compiling the bindings takes about 15-20 s.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

fn works(program: &Path, arg: &str) -> bool {
    Command::new(program)
        .arg(arg)
        .output()
        .is_ok_and(|o| o.status.success())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kotlin_patient_is_admitted_and_sees_the_doctor() -> anyhow::Result<()> {
    let kotlinc = PathBuf::from(std::env::var_os("KOTLINC").unwrap_or("kotlinc".into()));
    let jna =
        PathBuf::from(std::env::var_os("JNA_JAR").unwrap_or("/usr/share/java/jna.jar".into()));
    if !works(&kotlinc, "-version") || !works(Path::new("java"), "-version") || !jna.exists() {
        bedside_tests::skip(&format!(
            "needs kotlinc ({}), java and JNA ({}); the Kotlin test did not run",
            kotlinc.display(),
            jna.display()
        ));
        return Ok(());
    }
    let so = common::cdylib();
    let dir = tempfile::tempdir()?;
    let status = Command::new(env!("CARGO_BIN_EXE_uniffi-bindgen"))
        .args(["generate", "--no-format", "--library"])
        .arg(&so)
        .args(["--language", "kotlin", "--out-dir"])
        .arg(dir.path())
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .status()?;
    anyhow::ensure!(status.success(), "uniffi-bindgen kotlin: {status}");
    let jar = dir.path().join("patient.jar");
    let out = Command::new(&kotlinc)
        .arg(dir.path().join("uniffi/bedside_mobile/bedside_mobile.kt"))
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/kotlin/Patient.kt"))
        .arg("-cp")
        .arg(&jna)
        .args(["-include-runtime", "-nowarn", "-d"])
        .arg(&jar)
        .output()?;
    anyhow::ensure!(
        out.status.success(),
        "kotlinc: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    let clinic = common::clinic().await?;
    let mut java = tokio::process::Command::new("java");
    java.arg(format!(
        "-Djna.library.path={}",
        so.parent().expect("dir").display()
    ))
    .arg("-cp")
    .arg(format!("{}:{}", jar.display(), jna.display()))
    .arg("PatientKt")
    .env("BEDSIDE_WS_URL", &clinic.server.ws_url)
    .env("BEDSIDE_INVITE_CODE", &clinic.invite_code);
    let result = common::run_app(java, Duration::from_secs(90), "KOTLIN PATIENT OK").await;
    clinic.doctor.abort();
    result
}
