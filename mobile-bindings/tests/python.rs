//! The generated Python bindings against the built `libbedside_mobile.so`: a Python patient
//! (tests/python/patient.py) joins a real local server with an invite code, is admitted by a
//! headless doctor (`bedside-probe`), receives its video through the listener and leaves.
//!
//! Uses the checked-in bindings (`bindings/python/bedside_mobile.py`); `tests/bindgen.rs`
//! (feature `bindgen`) checks they match what uniffi generates now. Skips when python3 is missing.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_python_patient_is_admitted_and_sees_the_doctor() -> anyhow::Result<()> {
    let has_python = Command::new("python3")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !has_python {
        bedside_tests::skip("python3 not found; the Python bindings test did not run");
        return Ok(());
    }
    let so = common::cdylib();
    anyhow::ensure!(so.exists(), "{} not built", so.display());
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    let dir = tempfile::tempdir()?;
    std::fs::copy(
        manifest.join("bindings/python/bedside_mobile.py"),
        dir.path().join("bedside_mobile.py"),
    )?;
    std::fs::copy(&so, dir.path().join(so.file_name().expect("file name")))?;

    let clinic = common::clinic().await?;
    let mut python = tokio::process::Command::new("python3");
    python
        .arg(manifest.join("tests/python/patient.py"))
        .env("BEDSIDE_BINDINGS_DIR", dir.path())
        .env("BEDSIDE_WS_URL", &clinic.server.ws_url)
        .env("BEDSIDE_INVITE_CODE", &clinic.invite_code)
        .env("PYTHONDONTWRITEBYTECODE", "1");
    let result = common::run_app(python, Duration::from_secs(90), "PYTHON PATIENT OK").await;
    clinic.doctor.abort();
    result
}
