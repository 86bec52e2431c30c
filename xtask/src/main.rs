//! `cargo xtask <command>`: the project's commands, so that the README needs only two.
//!
//! - `demo`: with a display, the doctor's desktop app with a local clinic in-process and a
//!   simulated patient waiting; headless, the local clinic (server with its embedded store and
//!   relay), a simulated patient, and a headless doctor that admits the patient, holds a call and
//!   prints what it measured.
//! - `test`: installs the system packages the suites need (Debian, as root), then checks
//!   formatting, clippy (warnings are errors) and the sans-IO rule (`sans-io`), and runs every
//!   test in the workspace. Under `CI=true` a suite whose tool is missing fails instead of
//!   skipping.
//! - `packages`: prints the Debian packages `test` needs, one line, for CI to install.
//! - `sans-io`: the sans-IO code reads no clock and starts no task (`sans_io.rs`).
//! - `bench-signaling [ARGS]`: the signaling bench (joins beside a bare echo server, capacity,
//!   keepalive cost), in release.
//! - `bench-fleet [ARGS]`: two nodes with Redis and PostgreSQL behind HAProxy beside one node
//!   without Redis, then a node killed under load, in release.
//! - `bench-call [ARGS]`: a 720p call between two probes, in release.
//! - `bench-turn`: the relay against coturn, in release.
//! - `bench-sfu [ARGS]`: the SFU's forwarding capacity on one core (`sfu-bench`), in release.
//! - `bench-media`: codec and pattern figures (criterion-free bench), in release.
//! - `lint`: rustfmt and clippy, as CI expects them.
//! - `package`: the server's Debian package (`bedside-server_*.deb`, release build) with
//!   cargo-deb, installed into `~/.cargo/bin` first if missing.
//! - `package-check`: only the Debian package step of `test` (root).

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

mod sans_io;

/// Debian packages the test suites need: codec and device-support builds, coturn for the relay's interop tests,
/// iproute2 and nftables for the impairment lab, and an X server with screenshots and the GL/X
/// libraries eframe loads for the desktop test.
const TEST_PACKAGES: &[&str] = &[
    "pkg-config",
    "cmake",
    "nasm",
    "libasound2-dev",
    "libclang-dev",
    "coturn",
    "iproute2",
    "nftables",
    "libjna-java",
    "xvfb",
    "x11-apps",
    "imagemagick",
    "libgl1-mesa-dri",
    "libegl1",
    "libxkbcommon-x11-0",
    "libxcursor1",
    "libxi6",
    "libxrandr2",
    "gcc-aarch64-linux-gnu",
    "g++-aarch64-linux-gnu",
    // The mobile bindings' Python and Kotlin (JVM) tests: under CI=true they fail without them.
    "python3",
    "default-jre-headless",
    // The join page's browser suite (tests/tests/browser.rs): headless Chromium, and node with
    // npm to install playwright-core into target/.
    "chromium",
    "nodejs",
    // The same suite's TLS: certutil puts the test CA in an NSS database in Chromium's HOME
    // (no certificate error is ignored); its lab test asks the lab's HTTPS API with curl.
    "libnss3-tools",
    "curl",
    // The operations dashboard's browser test (the same Chromium and node: this image's nodejs
    // is NodeSource's, which bundles npm; with Debian's own nodejs add "npm") and promtool for
    // /metrics and the shipped Prometheus rules.
    "prometheus",
    // The Debian package check: `systemd-analyze verify` on the installed unit, and the
    // package's postinst creates its user with adduser.
    "systemd",
    "adduser",
    // The fleet suite (tests/tests/fleet.rs): Redis for the live state and HAProxy as the load
    // balancer, each started by the suite.
    "redis-server",
    "haproxy",
    // The store's PostgreSQL backend suite (tests/tests/postgres.rs): initdb and postgres 15,
    // started by the test on a loopback port as the postgres user.
    "postgresql",
];
/// Debian packages the demo needs (the desktop app's device support builds against ALSA and
/// generates V4L2 bindings with libclang).
const DEMO_PACKAGES: &[&str] = &[
    "pkg-config",
    "cmake",
    "nasm",
    "libasound2-dev",
    "libclang-dev",
];

const DEMO_ADDR: &str = "127.0.0.1:8443";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("demo") => demo(),
        Some("test") => test(&args[1..]),
        Some("bench-signaling") => bench_signaling(&args[1..]),
        Some("bench-fleet") => bench_fleet(&args[1..]),
        Some("bench-call") => bench_call(&args[1..]),
        Some("bench-turn") => bench_turn(),
        Some("bench-sfu") => bench_sfu(&args[1..]),
        Some("bench-continuity") => bench_continuity(&args[1..]),
        Some("bench-media") => {
            run(cargo().args(["bench", "-p", "bedside-client-core", "--bench", "media"]))
        }
        Some("lint") => lint(),
        Some("packages") => {
            println!("{}", TEST_PACKAGES.join(" "));
            Ok(())
        }
        Some("sans-io") => sans_io::check(&root()),
        Some("package") => package(Profile::Release).map(|deb| {
            println!("{}", deb.display());
        }),
        Some("package-check") => run(cargo().args(["build", "-p", "bedside-server", "--bins"]))
            .and_then(|()| package_check()),
        _ => {
            eprintln!(
                "usage: cargo xtask <demo | test [cargo test args] | bench-signaling [args] | \
                 bench-fleet [args] | bench-call [args] | bench-turn | bench-sfu [args] | bench-media | \
                 bench-continuity [--only NAME] | lint | packages | sans-io | package | package-check>"
            );
            return ExitCode::from(2);
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_owned()
}

fn cargo() -> Command {
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cmd.current_dir(root());
    cmd
}

fn run(cmd: &mut Command) -> Result<()> {
    let status = cmd.status().with_context(|| format!("running {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}

/// Installs missing Debian packages when running as root; otherwise says exactly what to run.
fn ensure_packages(packages: &[&str]) -> Result<()> {
    let missing: Vec<&str> = packages
        .iter()
        .copied()
        .filter(|p| {
            !Command::new("dpkg-query")
                .args(["-W", "-f=${Status}", p])
                .output()
                .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
        })
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    let is_root = Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0");
    if !is_root {
        bail!(
            "missing system packages; install them with:\n  sudo apt-get install -y {}",
            missing.join(" ")
        );
    }
    eprintln!("xtask: installing {}", missing.join(" "));
    run(Command::new("apt-get").arg("update").arg("-q"))?;
    run(Command::new("apt-get")
        .args(["install", "-y", "-q", "--no-install-recommends"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive"))
}

fn test(extra: &[String]) -> Result<()> {
    ensure_packages(TEST_PACKAGES)?;
    run(cargo().args(["fmt", "--all", "--", "--check"]))
        .context("code is not formatted: run cargo fmt --all")?;
    clippy()?;
    sans_io::check(&root())?;
    // The impairment lab runs the real server and probe binaries: build them first (a test
    // target alone does not build another package's binaries, and the lab would skip).
    run(cargo().args([
        "build",
        "-p",
        "bedside-server",
        "-p",
        "bedside-probe",
        "--bins",
    ]))?;
    run(cargo().args(["test", "--workspace"]).args(extra))?;
    package_check()?;
    // The mobile bindings as a Kotlin (JVM) and a Swift developer get them: generated, the
    // Kotlin run against a real server, the Swift C header compiled and linked. The generator is
    // behind a feature (slow to compile), so this is a second, smaller build.
    let mut mobile = cargo();
    mobile.args([
        "test",
        "-p",
        "bedside-mobile",
        "--features",
        "bindgen",
        "--test",
        "bindgen",
        "--test",
        "kotlin",
    ]);
    if let Some(kotlinc) = kotlin_compiler() {
        mobile.env("KOTLINC", kotlinc);
    }
    run(&mut mobile)?;
    android_check()?;
    // The desktop end-to-end tests' screenshots (a 1:1 call, a group consult), kept as
    // artifacts of the run.
    for name in ["desktop-e2e.png", "desktop-group.png"] {
        let shot = root().join("target").join(name);
        if shot.exists() {
            let dir = root().join("ci-artifacts");
            std::fs::create_dir_all(&dir)?;
            std::fs::copy(&shot, dir.join(name))?;
            eprintln!("xtask: screenshot of the desktop call saved to ci-artifacts/{name}");
        }
    }
    if root().join("fuzz/Cargo.toml").exists() {
        // The fuzz targets must keep building (running them needs nightly and cargo-fuzz).
        run(cargo().args(["check", "--manifest-path", "fuzz/Cargo.toml", "--bins"]))?;
    }
    Ok(())
}

/// Type-checks the bindings for Android (aarch64): the `cfg(target_os = "android")` code and
/// every Rust dependency compile for the phone. There is no NDK here, so the C dependencies
/// (ring, openh264, libopus) are built by Debian's aarch64 GNU cross compilers: enough for a
/// check, not for a library a phone can load (`mobile-bindings/README.md` has that recipe).
fn android_check() -> Result<()> {
    const TARGET: &str = "aarch64-linux-android";
    let added = Command::new("rustup")
        .args(["target", "add", TARGET])
        .status()
        .is_ok_and(|s| s.success());
    if !added {
        eprintln!("xtask: rustup could not add {TARGET}; the Android type-check did not run");
        return Ok(());
    }
    let toolchain = root().join("target/aarch64-gnu.cmake");
    std::fs::create_dir_all(root().join("target"))?;
    std::fs::write(
        &toolchain,
        "set(CMAKE_SYSTEM_NAME Linux)\nset(CMAKE_SYSTEM_PROCESSOR aarch64)\n\
         set(CMAKE_C_COMPILER aarch64-linux-gnu-gcc)\nset(CMAKE_CXX_COMPILER aarch64-linux-gnu-g++)\n",
    )?;
    run(cargo()
        .args(["check", "--target", TARGET, "-p", "bedside-mobile"])
        .env("CC_aarch64_linux_android", "aarch64-linux-gnu-gcc")
        .env("CXX_aarch64_linux_android", "aarch64-linux-gnu-g++")
        .env("AR_aarch64_linux_android", "aarch64-linux-gnu-ar")
        .env("CMAKE_TOOLCHAIN_FILE_aarch64_linux_android", &toolchain))
    .context("the mobile bindings do not compile for Android (aarch64)")
}

/// The Kotlin 2.x compiler from the npm registry (Debian's kotlin is too old for uniffi's
/// output), installed once under target/. `None` (and the Kotlin test says it skipped) when
/// npm cannot fetch it.
fn kotlin_compiler() -> Option<PathBuf> {
    let dir = root().join("target/kotlin-compiler");
    let kotlinc = dir.join("node_modules/kotlin-compiler/bin/kotlinc");
    if !kotlinc.exists() {
        let installed = Command::new("npm")
            .args(["install", "--no-audit", "--no-fund", "--prefix"])
            .arg(&dir)
            .arg("kotlin-compiler@2")
            .status()
            .is_ok_and(|s| s.success());
        if !installed {
            eprintln!("xtask: could not install kotlin-compiler from npm");
            return None;
        }
    }
    kotlinc.exists().then_some(kotlinc)
}

fn lint() -> Result<()> {
    run(cargo().args(["fmt", "--all", "--", "--check"]))?;
    clippy()
}

fn clippy() -> Result<()> {
    run(cargo().args([
        "clippy",
        "--workspace",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))
    .context("clippy found warnings")
}

fn bench_signaling(extra: &[String]) -> Result<()> {
    run_server_bench("signaling-bench", extra)
}

/// The fleet bench needs redis-server, haproxy and PostgreSQL (installed as for the tests).
fn bench_fleet(extra: &[String]) -> Result<()> {
    ensure_packages(&["redis-server", "haproxy", "postgresql"])?;
    run_server_bench("fleet-bench", extra)
}

/// Builds the release server and the bench binary `bench`, and runs it.
fn run_server_bench(bench: &str, extra: &[String]) -> Result<()> {
    run(cargo().args([
        "build",
        "--release",
        "-p",
        "bedside-server",
        "-p",
        "bedside-tests",
        "--bin",
        "bedside-server",
        "--bin",
        bench,
    ]))?;
    run(Command::new(root().join("target/release").join(bench))
        .current_dir(root())
        .args(extra))
}

fn bench_call(extra: &[String]) -> Result<()> {
    run_probe_bench("release", "call-bench", extra)
}

/// The continuity scenarios in the impairment lab (root): the lab runs the debug server and
/// probe, as the tests do.
fn bench_continuity(extra: &[String]) -> Result<()> {
    ensure_packages(TEST_PACKAGES)?;
    run_probe_bench("debug", "continuity-bench", extra)
}

/// Builds the server, the probe and the bench binary `bench` (in `profile`), and runs it.
fn run_probe_bench(profile: &str, bench: &str, extra: &[String]) -> Result<()> {
    let mut build = cargo();
    build.arg("build");
    if profile == "release" {
        build.arg("--release");
    }
    build.args([
        "-p",
        "bedside-server",
        "-p",
        "bedside-probe",
        "-p",
        "bedside-tests",
        "--bin",
        "bedside-server",
        "--bin",
        "bedside-probe",
        "--bin",
        bench,
    ]);
    run(&mut build)?;
    run(
        Command::new(root().join("target").join(profile).join(bench))
            .current_dir(root())
            .args(extra),
    )
}

fn bench_turn() -> Result<()> {
    ensure_packages(TEST_PACKAGES)?;
    run(cargo().args(["build", "--release", "-p", "bedside-turn"]))?;
    run(Command::new(root().join("target/release/turn-bench")).current_dir(root()))
}

/// The SFU thread pinned to one core, str0m clients on the other (`sfu/src/bin/sfu-bench`).
fn bench_sfu(extra: &[String]) -> Result<()> {
    run(cargo().args([
        "build",
        "--release",
        "-p",
        "bedside-sfu",
        "--bin",
        "sfu-bench",
    ]))?;
    run(Command::new(root().join("target/release/sfu-bench"))
        .current_dir(root())
        .args(extra))
}

fn demo() -> Result<()> {
    ensure_packages(DEMO_PACKAGES)?;
    let has_display = ["DISPLAY", "WAYLAND_DISPLAY"]
        .iter()
        .any(|v| std::env::var_os(v).is_some_and(|d| !d.is_empty()));
    if has_display {
        // The doctor's app, with a local clinic in-process and a simulated patient waiting.
        run(cargo().args(["build", "-p", "bedside-desktop"]))?;
        return run(Command::new(root().join("target/debug/bedside-desktop"))
            .arg("--demo")
            .arg("--data-dir")
            .arg(root().join(".bedside-data/desktop")));
    }
    eprintln!("xtask: no display: running the clinic and a call headless");
    run(cargo().args(["build", "-p", "bedside-server", "-p", "bedside-probe"]))?;
    let data_dir = root().join(".bedside-data");
    let mut server = Command::new(root().join("target/debug/bedside-server"))
        .args(["--listen", DEMO_ADDR, "--data-dir"])
        .arg(&data_dir)
        .spawn()
        .context("starting bedside-server")?;
    let ready = wait_healthy(Duration::from_secs(20));
    if let Err(e) = ready {
        let _ = server.kill();
        return Err(e);
    }
    let key = std::fs::read_to_string(data_dir.join("admin-api-key"))
        .context("reading the generated administration key")?;
    let (status, body) = http("POST", "/api/v1/consultations", Some(key.trim()))?;
    if status != 201 {
        let _ = server.kill();
        bail!("creating a consultation: HTTP {status}: {body}");
    }
    let created: serde_json::Value = serde_json::from_str(&body)?;
    let ws = created["ws_url"].as_str().unwrap_or("").to_owned();
    let probe = |auth: &str, secret: &str, seconds: &str| {
        Command::new(root().join("target/debug/bedside-probe"))
            .args(["--server", &ws, auth, secret, "--duration", seconds])
            .args(["--width", "640", "--height", "360", "--bitrate-kbps", "800"])
            .args(["--udp", "127.0.0.1:0"])
            .stdout(std::process::Stdio::piped())
            .spawn()
    };
    // A simulated patient waits in the waiting room (and stays an hour).
    let mut patient = probe(
        "--invite",
        created["invite_code"].as_str().unwrap_or(""),
        "3600",
    )?;
    println!(
        "A simulated patient joined the waiting room; a headless doctor admits them for 15 s..."
    );
    let doctor = probe(
        "--token",
        created["doctor_token"].as_str().unwrap_or(""),
        "15",
    )?;
    let report = doctor.wait_with_output()?;
    println!("{}", String::from_utf8_lossy(&report.stdout));
    println!();
    println!(
        "Local clinic running at http://{DEMO_ADDR} (store: {})",
        data_dir.display()
    );
    println!(
        "  signaling:            {}",
        created["ws_url"].as_str().unwrap_or("")
    );
    println!(
        "  consultation:         {}",
        created["consultation_id"].as_str().unwrap_or("")
    );
    println!(
        "  patient invite code:  {}",
        created["invite_code"].as_str().unwrap_or("")
    );
    println!(
        "  doctor token:         {}",
        created["doctor_token"].as_str().unwrap_or("")
    );
    println!("  metrics:              http://{DEMO_ADDR}/metrics");
    println!("Above: the headless doctor's report of its call with the simulated patient, who");
    println!("stays in the consultation. With a display, `cargo xtask demo` opens the doctor's");
    println!("desktop app instead.");
    println!("Ctrl-C stops everything.");
    let status = server.wait()?;
    let _ = patient.kill();
    if !status.success() && status.code().is_some() {
        bail!("bedside-server exited with {status}");
    }
    Ok(())
}

fn wait_healthy(timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok((200, _)) = http("GET", "/healthz", None) {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("the server did not answer on {DEMO_ADDR} within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A minimal HTTP/1.1 request to the demo server on loopback.
fn http(method: &str, path: &str, bearer: Option<&str>) -> Result<(u16, String)> {
    http_at(DEMO_ADDR, method, path, bearer)
}

/// A minimal HTTP/1.1 request to `addr`.
fn http_at(addr: &str, method: &str, path: &str, bearer: Option<&str>) -> Result<(u16, String)> {
    let mut stream = TcpStream::connect(addr)?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    let auth = bearer
        .map(|k| format!("Authorization: Bearer {k}\r\n"))
        .unwrap_or_default();
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\n{auth}Content-Length: 0\r\nConnection: close\r\n\r\n"
    )?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .context("malformed HTTP response")?;
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    Ok((status, body))
}

/// Which build goes into the Debian package.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Profile {
    /// `cargo xtask package`: cargo-deb's own release build.
    Release,
    /// The CI check: the debug binary `test` already built (a release build of the server
    /// takes minutes on a small machine), packaged unstripped with fast compression.
    Debug,
}

/// cargo-deb, installed with `cargo install cargo-deb --locked` when missing.
fn ensure_cargo_deb() -> Result<()> {
    let found = cargo()
        .args(["deb", "--version"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !found {
        eprintln!("xtask: installing cargo-deb (once)");
        run(cargo().args(["install", "cargo-deb", "--locked"]))?;
    }
    Ok(())
}

/// Builds the server's Debian package and returns its path. The conffile
/// `/etc/bedside/bedside.toml` is written first from `server/config.reference.toml` (one
/// source for the reference and the installed file), with the service's data directory.
fn package(profile: Profile) -> Result<PathBuf> {
    ensure_cargo_deb()?;
    let reference = std::fs::read_to_string(root().join("server/config.reference.toml"))?;
    let body: String = reference
        .lines()
        .skip_while(|l| l.starts_with('#'))
        .map(|l| {
            if l == "data-dir = \"\"" {
                "data-dir = \"/var/lib/bedside\"\n".to_owned()
            } else {
                format!("{l}\n")
            }
        })
        .collect();
    if !body.contains("data-dir = \"/var/lib/bedside\"") {
        bail!("server/config.reference.toml has no `data-dir = \"\"` line to set");
    }
    let conffile = format!(
        "# /etc/bedside/bedside.toml: the bedside-server service's configuration (a conffile: an\n\
         # upgrade keeps your edits). `bedside-server --print-config` prints the reference.\n\
         # Check it before a restart: bedside-server --check-config /etc/bedside/bedside.toml\n\
         # The guide (ports, TLS, proxies, backups): /usr/share/doc/bedside-server/deploying.md\n\
         #\n\
         # As installed it serves on localhost only. For a clinic: listen = \"0.0.0.0:8443\",\n\
         # public-url, [tls] (or mode = \"off\" behind a TLS proxy) and turn.relay.relay-ips.\n\n{body}"
    );
    let dir = root().join("target/deb");
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join("bedside.toml"), conffile)?;
    let out = dir.join(match profile {
        Profile::Release => "bedside-server.deb",
        Profile::Debug => "bedside-server-debug.deb",
    });
    let mut deb = cargo();
    deb.args(["deb", "-p", "bedside-server", "--output"])
        .arg(&out);
    match profile {
        // The release profile keeps debug info (for profiling); the package does not need it.
        Profile::Release => deb.arg("--strip"),
        Profile::Debug => deb.args(["--profile", "dev", "--no-build", "--no-strip", "--fast"]),
    };
    run(&mut deb)?;
    Ok(out)
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

/// The Debian package as an administrator meets it: built (from the debug binary), installed
/// with `dpkg -i`, its unit accepted by `systemd-analyze verify`, the installed binary started
/// with the installed config (directly: CI has no systemd as PID 1) and answering /healthz and
/// /readyz, then removed with `dpkg -r`. Needs root: skipped without it, a failure under CI.
fn package_check() -> Result<()> {
    if !is_root() {
        if std::env::var_os("CI").is_some() {
            bail!("the Debian package check needs root (dpkg -i)");
        }
        eprintln!("xtask: skipping the Debian package check: it needs root (dpkg -i)");
        return Ok(());
    }
    let started = Instant::now();
    let deb = package(Profile::Debug)?;
    run(Command::new("dpkg").arg("-i").arg(&deb))?;
    let result = check_installed_package();
    let removed = run(Command::new("dpkg").args(["-r", "bedside-server"]));
    let gone = !Path::new("/usr/bin/bedside-server").exists();
    // Leave the machine as it was: the conffile, the user and /var/lib/bedside too.
    let _ = run(Command::new("dpkg").args(["--purge", "bedside-server"]));
    result?;
    removed?;
    if !gone {
        bail!("dpkg -r left /usr/bin/bedside-server behind");
    }
    eprintln!(
        "xtask: the Debian package built, installed, ran and was removed in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

fn check_installed_package() -> Result<()> {
    const UNIT: &str = "/lib/systemd/system/bedside-server.service";
    const CONFFILE: &str = "/etc/bedside/bedside.toml";
    for path in ["/usr/bin/bedside-server", UNIT, CONFFILE] {
        if !Path::new(path).exists() {
            bail!("the package did not install {path}");
        }
    }
    let user = Command::new("getent")
        .args(["passwd", "bedside"])
        .output()?;
    if !user.status.success() {
        bail!("postinst did not create the bedside user");
    }
    let verify = Command::new("systemd-analyze")
        .args(["verify", UNIT])
        .output()
        .context("running systemd-analyze (package systemd)")?;
    let said = String::from_utf8_lossy(&verify.stderr);
    if !verify.status.success() || said.contains("bedside-server.service:") {
        bail!("systemd-analyze verify refused the unit: {said}");
    }
    run(Command::new("/usr/bin/bedside-server").args(["--check-config", CONFFILE]))?;
    // The installed binary with the installed config; the address and data directory moved
    // aside so the check touches neither port 8443 nor /var/lib/bedside.
    let data = tempfile_dir("bedside-package-check")?;
    let mut server = Command::new("/usr/bin/bedside-server")
        .args([
            "--config",
            CONFFILE,
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
        ])
        .arg(&data)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .context("starting the installed bedside-server")?;
    let result = (|| -> Result<()> {
        let stdout = server.stdout.take().context("server stdout")?;
        let mut lines = std::io::BufRead::lines(std::io::BufReader::new(stdout));
        let listening = lines
            .by_ref()
            .map_while(Result::ok)
            .find(|l| l.contains("listening on http://"))
            .context("the installed server did not say where it listens")?;
        std::thread::spawn(move || lines.for_each(drop));
        let addr = listening
            .split("http://")
            .nth(1)
            .and_then(|r| r.split(' ').next())
            .context("no address")?
            .to_owned();
        for path in ["/healthz", "/readyz"] {
            let (status, body) = http_at(&addr, "GET", path, None)?;
            if status != 200 {
                bail!("the installed server answered {path} with {status}: {body}");
            }
        }
        Ok(())
    })();
    sigterm(server.id());
    let status = server.wait()?;
    let _ = std::fs::remove_dir_all(&data);
    result?;
    if !status.success() {
        bail!("the installed server did not stop cleanly on SIGTERM: {status}");
    }
    Ok(())
}

/// A new private directory under the system temp dir.
fn tempfile_dir(prefix: &str) -> Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("{prefix}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

/// SIGTERM, as systemd stops the service.
fn sigterm(pid: u32) {
    let _ = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status();
}
