//! The real server library in a process of its own, for suites that must kill it (SIGKILL)
//! mid-consultation: `server-under-test --config <config.toml>` (the arguments
//! `bedside_tests::spawn_server_process` passes). It prints `listening on <base URL>`
//! once bound, as `bedside-server` does, then serves until killed (SIGTERM stops it gracefully,
//! as it does `bedside-server`).

use anyhow::{Context, Result};

#[tokio::main]
async fn main() -> Result<()> {
    let path = std::env::args()
        .nth(2)
        .context("usage: server-under-test --config <config.toml>")?;
    let config = bedside_server::Config::from_file(std::path::Path::new(&path))?;
    let server = bedside_server::Server::bind(config).await?;
    println!("listening on {}", server.base_url());
    server.serve(bedside_server::shutdown_signal()).await?;
    Ok(())
}
