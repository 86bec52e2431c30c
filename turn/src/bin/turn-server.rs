//! Runs the relay alone: `turn-server CONFIG.json` or `turn-server --json '{...}'` (kebab-case
//! [`bedside_turn::TurnConfig`]). Prints one JSON line with the bound addresses, then serves
//! until SIGINT/SIGTERM. Used by the bench so both servers are measured as child processes.

use anyhow::Context;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let text = match args.as_slice() {
        [flag, json] if flag == "--json" => json.clone(),
        [path] => std::fs::read_to_string(path).with_context(|| format!("reading {path}"))?,
        _ => anyhow::bail!("usage: turn-server CONFIG.json | turn-server --json '{{...}}'"),
    };
    let config: bedside_turn::TurnConfig = serde_json::from_str(&text).context("parsing config")?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let shutdown = async {
            let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                .expect("SIGTERM handler");
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {},
                _ = term.recv() => {},
            }
        };
        let h = bedside_turn::start(config, shutdown).await?;
        println!(
            "{}",
            serde_json::json!({
                "udp": h.udp_addrs(), "tcp": h.tcp_addrs(), "tls": h.tls_addrs(), "pid": std::process::id()
            })
        );
        let m = h.metrics();
        h.join().await;
        eprintln!("{}", m.prometheus());
        Ok(())
    })
}
