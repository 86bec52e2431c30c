//! An alert webhook receiver for tests that cannot listen in their own process (the
//! impairment lab runs the server in a network namespace): `webhook-receiver <ip:port>` prints
//! `listening` once bound, then every JSON body POSTed to `/hook` as one line of standard
//! output, and answers 200.

use anyhow::{Context, Result};
use axum::Json;
use axum::routing::post;
use std::io::Write;

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<()> {
    let addr = std::env::args()
        .nth(1)
        .context("usage: webhook-receiver <ip:port>")?;
    let listener = tokio::net::TcpListener::bind(&addr).await?;
    let app = axum::Router::new().route(
        "/hook",
        post(|Json(body): Json<serde_json::Value>| async move {
            let mut out = std::io::stdout().lock();
            let _ = writeln!(out, "{body}");
            let _ = out.flush();
            "ok"
        }),
    );
    println!("listening");
    std::io::stdout().flush()?;
    axum::serve(listener, app).await?;
    Ok(())
}
