//! `bedside-desktop`: the doctor's app.

use std::path::PathBuf;

use anyhow::Result;
use std::sync::Arc;

use bedside_desktop::app::{AppOptions, DesktopApp};
use bedside_desktop::clinic::{DoctorJoin, NetOptions};
use bedside_desktop::settings::{Keyring, SettingsFile};
use clap::Parser;

#[derive(Parser, Debug)]
#[command(version, about = "Bedside: the doctor's desktop app")]
struct Args {
    /// Start a local clinic and a simulated patient waiting to be admitted.
    #[arg(long, env = "BEDSIDE_DEMO")]
    demo: bool,
    /// Where the local clinic keeps its data (default: ~/.local/share/bedside-desktop).
    #[arg(long, env = "BEDSIDE_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Where the app keeps its settings (default: $XDG_CONFIG_HOME/bedside).
    #[arg(long, env = "BEDSIDE_CONFIG_DIR")]
    config_dir: Option<PathBuf>,
    /// Join a consultation at once on this signaling URL (with BEDSIDE_TOKEN).
    #[arg(long, env = "BEDSIDE_SERVER_URL")]
    server_url: Option<String>,
    /// The doctor token (from the environment only, so it is not visible in `ps`).
    #[arg(skip)]
    token: Option<String>,
    /// Sign in at once to the remote clinic at this address (with BEDSIDE_CREDENTIAL).
    #[arg(long, env = "BEDSIDE_CLINIC_URL")]
    clinic_url: Option<String>,
    /// Once signed in, open this consultation.
    #[arg(long, env = "BEDSIDE_CONSULTATION")]
    consultation: Option<String>,
    /// The patient's invite code to show (and, with --demo, to start the simulated patient with).
    #[arg(long, env = "BEDSIDE_INVITE_CODE")]
    invite_code: Option<String>,
    /// Local UDP address(es) for media (default 0.0.0.0:0).
    #[arg(long = "udp", env = "BEDSIDE_UDP")]
    udp_addrs: Vec<String>,
    /// Testing only (feature `test-hooks`): write a small JSON status here twice a second (no
    /// names or secrets).
    #[cfg(feature = "test-hooks")]
    #[arg(long, env = "BEDSIDE_STATUS_FILE")]
    status_file: Option<PathBuf>,
    /// Testing only (feature `test-hooks`): admit whoever waits.
    #[cfg(feature = "test-hooks")]
    #[arg(long, env = "BEDSIDE_AUTO_ADMIT")]
    auto_admit: bool,
    /// Testing only (feature `test-hooks`): share the entire screen once the call is connected.
    #[cfg(feature = "test-hooks")]
    #[arg(long, env = "BEDSIDE_SHARE_SCREEN")]
    share_screen: bool,
    /// Window size.
    #[arg(long, default_value_t = 1280.0)]
    width: f32,
    #[arg(long, default_value_t = 800.0)]
    height: f32,
}

fn default_data_dir() -> PathBuf {
    std::env::var_os("XDG_DATA_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/share")))
        .unwrap_or_else(std::env::temp_dir)
        .join("bedside-desktop")
}

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                // Only Bedside's own logs by default: the WebRTC stack logs addresses.
                .unwrap_or_else(|_| {
                    "off,bedside_desktop=info,bedside_server=info,bedside_client_core=warn,\
                     bedside_probe=warn"
                        .into()
                }),
        )
        .init();
    let mut args = Args::parse();
    args.token = std::env::var("BEDSIDE_TOKEN")
        .ok()
        .filter(|t| !t.is_empty());
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let connect = match (args.server_url, args.token) {
        (Some(ws_url), Some(token)) => Some(DoctorJoin {
            ws_url,
            token,
            invite_code: args.invite_code,
            invite_url: None,
            consultation_id: None,
        }),
        (Some(_), None) => anyhow::bail!("--server-url needs BEDSIDE_TOKEN in the environment"),
        _ => None,
    };
    // The credential, like the token, only from the environment (not visible in `ps`).
    let credential = std::env::var("BEDSIDE_CREDENTIAL")
        .ok()
        .filter(|t| !t.is_empty());
    let sign_in = match (args.clinic_url, credential) {
        (Some(url), Some(credential)) => Some((url, credential)),
        (Some(_), None) => {
            anyhow::bail!("--clinic-url needs BEDSIDE_CREDENTIAL in the environment")
        }
        _ => None,
    };
    let udp_addrs = if args.udp_addrs.is_empty() {
        vec!["0.0.0.0:0".to_owned()]
    } else {
        args.udp_addrs
    };
    let options = AppOptions {
        data_dir: args.data_dir.unwrap_or_else(default_data_dir),
        demo: args.demo,
        connect,
        net: NetOptions { udp_addrs },
        #[cfg(feature = "test-hooks")]
        test_hooks: bedside_desktop::test_hooks::TestHooks::new(
            args.status_file,
            args.auto_admit,
            args.share_screen,
        ),
        settings_dir: args.config_dir.unwrap_or_else(SettingsFile::default_dir),
        secrets: Arc::new(Keyring),
        sign_in,
        open_consultation: args.consultation.map(bedside_protocol::ConsultationId),
    };
    let native = eframe::NativeOptions {
        renderer: eframe::Renderer::Glow,
        viewport: egui::ViewportBuilder::default()
            .with_title("Bedside")
            .with_inner_size([args.width, args.height]),
        ..Default::default()
    };
    let handle = runtime.handle().clone();
    let result = eframe::run_native(
        "Bedside",
        native,
        Box::new(move |cc| {
            Ok(Box::new(DesktopApp::new(
                cc.egui_ctx.clone(),
                handle,
                options,
            )))
        }),
    );
    // Give the client a moment to send its Leave, then stop everything.
    runtime.shutdown_timeout(std::time::Duration::from_secs(2));
    result.map_err(|e| anyhow::anyhow!("window: {e}"))
}
