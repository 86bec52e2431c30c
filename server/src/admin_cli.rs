//! `bedside-server admin …`: the administration API from the command line, for clinics without
//! tooling. By default it talks to the server this machine's configuration describes (its
//! `listen` address, its administration key from the configuration or `<data-dir>/admin-api-key`,
//! and the development certificate in the data directory when TLS is self-signed); `--url` and
//! `--key` (or `BEDSIDE_ADMIN_KEY`) reach a remote one. It prints what a person needs (the invite
//! link above all), or the API's JSON with `--json`.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use bedside_server::Config;
use bedside_server::api::{ConsultationSummary, CreatedConsultation, IssuedInvite, IssuedToken};
use bedside_server::credentials::{CredentialSummary, IssuedCredential};
use clap::{Args, Subcommand};
use serde_json::{Value, json};

#[derive(Args, Debug)]
pub struct AdminArgs {
    /// The server's base URL, e.g. https://clinic.example.org (default: this machine's server,
    /// from its configuration).
    #[arg(long)]
    url: Option<String>,
    /// The administration key (default: the configuration's, or <data-dir>/admin-api-key).
    #[arg(long, env = "BEDSIDE_ADMIN_KEY", hide_env_values = true)]
    key: Option<String>,
    /// A PEM certificate to trust (a self-signed server's).
    #[arg(long)]
    ca: Option<PathBuf>,
    /// Print the API's JSON instead of text.
    #[arg(long)]
    json: bool,
    #[command(subcommand)]
    command: AdminCommand,
}

#[derive(Subcommand, Debug)]
enum AdminCommand {
    /// Create a consultation: prints the patient's invite link and the doctor's token.
    Create {
        /// How long the invite is valid, in seconds (default: the server's invite-ttl-secs).
        #[arg(long)]
        invite_ttl_secs: Option<u64>,
    },
    /// The last 24 hours' consultations, newest first.
    List,
    /// A fresh invite link for a consultation's patient.
    Invite {
        consultation_id: String,
        #[arg(long)]
        invite_ttl_secs: Option<u64>,
    },
    /// A fresh join token (doctor, clinician or patient).
    Token {
        consultation_id: String,
        #[arg(long, default_value = "doctor")]
        role: String,
    },
    /// End a consultation for everyone in it.
    End { consultation_id: String },
    /// Who joined, was admitted and left, when (ids and roles only).
    Audit { consultation_id: String },
    /// Issue a doctor credential for the desktop app (printed once; the server keeps only its
    /// hash). The doctor pastes it into the app's "Connect to a clinic".
    IssueCredential {
        /// Days until it expires (1-365; default: 90).
        #[arg(long)]
        ttl_days: Option<u64>,
    },
    /// The doctor credentials: ids, dates, revoked or not (never the secret).
    Credentials,
    /// Revoke a doctor credential: the app using it is signed out at its next request.
    RevokeCredential { credential_id: String },
}

/// Where and how to reach the API.
struct Target {
    base: String,
    key: String,
    http: reqwest::Client,
}

fn target(
    args: &AdminArgs,
    config_file: Option<&Path>,
    data_dir: Option<PathBuf>,
) -> Result<Target> {
    let mut config = match config_file {
        Some(path) => Config::from_file(path)?,
        None => Config::default(),
    };
    if let Some(dir) = data_dir {
        config.data_dir = dir;
    }
    let data_dir = config.data_dir();
    let base = match &args.url {
        Some(url) => url.trim_end_matches('/').to_owned(),
        None => {
            let mut addr = config.listen;
            if addr.ip().is_unspecified() {
                addr.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
            }
            let scheme = if config.tls_enabled() {
                "https"
            } else {
                "http"
            };
            format!("{scheme}://{addr}")
        }
    };
    let key = match &args.key {
        Some(key) => key.clone(),
        None if !config.admin_api_key.is_empty() => config.admin_api_key.clone(),
        None => {
            let path = data_dir.join("admin-api-key");
            std::fs::read_to_string(&path)
                .with_context(|| format!("no --key given and {} cannot be read", path.display()))?
                .trim()
                .to_owned()
        }
    };
    let mut http = reqwest::Client::builder().timeout(std::time::Duration::from_secs(15));
    let dev_cert = data_dir.join("dev-cert.pem");
    let ca = args
        .ca
        .clone()
        .or_else(|| (args.url.is_none() && dev_cert.is_file()).then_some(dev_cert));
    if let Some(ca) = ca {
        let pem = std::fs::read(&ca).with_context(|| format!("reading {}", ca.display()))?;
        http = http.add_root_certificate(reqwest::Certificate::from_pem(&pem)?);
    }
    Ok(Target {
        base,
        key,
        http: http.build()?,
    })
}

impl Target {
    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<Value> {
        let url = format!("{}/api/v1{path}", self.base);
        let mut req = self.http.request(method, &url).bearer_auth(&self.key);
        if let Some(body) = body {
            req = req.json(&body);
        }
        let resp = req
            .send()
            .await
            .with_context(|| format!("cannot reach {}", self.base))?;
        let status = resp.status();
        let text = resp.text().await?;
        if !status.is_success() {
            let message = serde_json::from_str::<Value>(&text)
                .ok()
                .and_then(|v| v["error"]["message"].as_str().map(str::to_owned))
                .unwrap_or(text);
            bail!("{status}: {message}");
        }
        if text.is_empty() {
            return Ok(Value::Null);
        }
        Ok(serde_json::from_str(&text)?)
    }
}

/// Unix seconds as `YYYY-MM-DD HH:MM` in UTC.
fn utc(unix_secs: u64) -> String {
    match i64::try_from(unix_secs).map(time::OffsetDateTime::from_unix_timestamp) {
        Ok(Ok(t)) => format!(
            "{:04}-{:02}-{:02} {:02}:{:02}",
            t.year(),
            u8::from(t.month()),
            t.day(),
            t.hour(),
            t.minute()
        ),
        _ => unix_secs.to_string(),
    }
}

fn ttl_body(ttl: Option<u64>) -> Value {
    match ttl {
        Some(t) => json!({ "invite_ttl_secs": t }),
        None => json!({}),
    }
}

/// Runs one admin command and prints its outcome.
pub async fn run(
    args: AdminArgs,
    config_file: Option<&Path>,
    data_dir: Option<PathBuf>,
) -> Result<()> {
    use reqwest::Method;
    let t = target(&args, config_file, data_dir)?;
    let value = match &args.command {
        AdminCommand::Create { invite_ttl_secs } => {
            t.call(
                Method::POST,
                "/consultations",
                Some(ttl_body(*invite_ttl_secs)),
            )
            .await?
        }
        AdminCommand::List => t.call(Method::GET, "/consultations", None).await?,
        AdminCommand::Invite {
            consultation_id,
            invite_ttl_secs,
        } => {
            t.call(
                Method::POST,
                &format!("/consultations/{consultation_id}/invites"),
                Some(ttl_body(*invite_ttl_secs)),
            )
            .await?
        }
        AdminCommand::Token {
            consultation_id,
            role,
        } => {
            t.call(
                Method::POST,
                &format!("/consultations/{consultation_id}/tokens"),
                Some(json!({ "role": role })),
            )
            .await?
        }
        AdminCommand::End { consultation_id } => {
            t.call(
                Method::DELETE,
                &format!("/consultations/{consultation_id}"),
                None,
            )
            .await?
        }
        AdminCommand::Audit { consultation_id } => {
            t.call(
                Method::GET,
                &format!("/consultations/{consultation_id}/audit"),
                None,
            )
            .await?
        }
        AdminCommand::IssueCredential { ttl_days } => {
            let body = match ttl_days {
                Some(days) => json!({ "ttl_days": days }),
                None => json!({}),
            };
            t.call(Method::POST, "/doctor-credentials", Some(body))
                .await?
        }
        AdminCommand::Credentials => t.call(Method::GET, "/doctor-credentials", None).await?,
        AdminCommand::RevokeCredential { credential_id } => {
            t.call(
                Method::DELETE,
                &format!("/doctor-credentials/{credential_id}"),
                None,
            )
            .await?
        }
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&value)?);
        return Ok(());
    }
    match &args.command {
        AdminCommand::Create { .. } => {
            let c: CreatedConsultation = serde_json::from_value(value)?;
            println!("consultation  {}", c.consultation_id);
            println!("patient link  {}", c.invite_url);
            println!("invite code   {}", c.invite_code);
            println!("doctor token  {}", c.doctor_token);
        }
        AdminCommand::List => {
            let list: Vec<ConsultationSummary> = serde_json::from_value(value)?;
            println!("consultation           created     state   seats waiting connected");
            for c in list {
                let state = if c.ended_at.is_some() {
                    "ended"
                } else {
                    "open"
                };
                println!(
                    "{:<22} {:<11} {:<7} {:>5} {:>7} {:>9}",
                    c.consultation_id.0, c.created_at, state, c.seats, c.waiting, c.connected
                );
            }
        }
        AdminCommand::Invite { .. } => {
            let i: IssuedInvite = serde_json::from_value(value)?;
            println!("patient link  {}", i.invite_url);
            println!("invite code   {}", i.invite_code);
        }
        AdminCommand::Token { .. } => {
            let token: IssuedToken = serde_json::from_value(value)?;
            println!("{}", token.token);
        }
        AdminCommand::End { consultation_id } => println!("ended {consultation_id}"),
        AdminCommand::IssueCredential { .. } => {
            let c: IssuedCredential = serde_json::from_value(value)?;
            println!("credential id  {}", c.credential_id);
            println!("credential     {}", c.credential);
            println!("expires        {} UTC", utc(c.expires_at));
            println!("(shown once: give it to the doctor, who pastes it into the app)");
        }
        AdminCommand::Credentials => {
            let list: Vec<CredentialSummary> = serde_json::from_value(value)?;
            println!("credential           created (UTC)     expires (UTC)     state");
            for c in list {
                let state = match c.revoked_at {
                    Some(at) => format!("revoked {}", utc(at)),
                    None => "valid".to_owned(),
                };
                println!(
                    "{:<20} {:<17} {:<17} {state}",
                    c.credential_id,
                    utc(c.created_at),
                    utc(c.expires_at)
                );
            }
        }
        AdminCommand::RevokeCredential { credential_id } => println!("revoked {credential_id}"),
        AdminCommand::Audit { .. } => {
            for e in value.as_array().into_iter().flatten() {
                let text = |k: &str| e[k].as_str().unwrap_or("-").to_owned();
                println!(
                    "{:>14} {:<14} {:<10} {}",
                    e["at_ms"],
                    text("event"),
                    text("role"),
                    text("participant_id")
                );
            }
        }
    }
    Ok(())
}
