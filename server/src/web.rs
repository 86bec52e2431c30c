//! The patient's join page and the app-link files.
//!
//! - `GET /j/<invite>` and `GET /j` (a code field): the page a patient opens from the link
//!   (`server/web/`: plain JavaScript, no build step), compiled into the binary with
//!   `include_str!` so a clinic serves it with nothing else installed and no CDN. The page
//!   speaks the signaling protocol on `/ws` and the chat protocol of `bedside_protocol::chat`
//!   on its data channel, like the native clients. `/j#token=<join token>` joins as a doctor
//!   or clinician (the fragment never reaches the server, so the token is in no log).
//! - `GET /.well-known/assetlinks.json` (Android App Links) and
//!   `GET /.well-known/apple-app-site-association` (iOS universal links), made from `[web]`
//!   in the configuration, so the same link opens the patient app where it is installed.
//!
//! Every page response carries a strict Content-Security-Policy (scripts, styles and
//! connections from this origin only; no frames, no inline code), no referrer (the invite code
//! is in the path), and `no-store`. The page is served only over HTTPS, or plain HTTP to a
//! loopback host: cameras and microphones need a secure context, and an invite code must not
//! cross a network in the clear.

use std::sync::Arc;

use axum::Json;
use axum::Router;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::AppState;

const INDEX_HTML: &str = include_str!("../web/index.html");
const JOIN_JS: &str = include_str!("../web/join.js");
const JOIN_CSS: &str = include_str!("../web/join.css");

/// The page's Content-Security-Policy. `connect-src 'self'` covers the same-origin `ws:`/`wss:`
/// WebSocket (CSP level 3); media comes from the peer connection, which CSP does not govern.
pub const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
    img-src 'self' data:; media-src 'self' blob: mediastream:; connect-src 'self'; \
    base-uri 'none'; form-action 'self'; frame-ancestors 'none'; \
    require-trusted-types-for 'script'";

/// `[web]`: the apps a join link may open instead of the page.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", default, deny_unknown_fields)]
pub struct WebSection {
    /// Android apps trusted with `/j/…` links (App Links).
    pub android_apps: Vec<AndroidApp>,
    /// iOS apps trusted with `/j/…` links, as `<team id>.<bundle id>` (universal links).
    pub ios_app_ids: Vec<String>,
}

/// One Android app: its package name and its signing certificates' SHA-256 fingerprints.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct AndroidApp {
    pub package: String,
    pub sha256_cert_fingerprints: Vec<String>,
}

/// The join page's routes, merged into [`crate::api::router`].
pub fn router() -> Router<Arc<AppState>> {
    Router::new()
        .route("/j", get(page))
        .route("/j/", get(page))
        .route("/j/{invite}", get(invite_page))
        .route("/assets/join.js", get(script))
        .route("/assets/join.css", get(style))
        .route("/.well-known/assetlinks.json", get(assetlinks))
        .route("/.well-known/apple-app-site-association", get(apple_links))
}

/// `<public-url>/j/<code>`: the link a patient is sent.
pub fn invite_url(state: &AppState, code: &str) -> String {
    format!("{}/j/{code}", public_base(state))
}

/// The clinic's public `http(s)://host[:port]`: `public-url`, else derived from the signaling
/// URL (which is derived from the bound address and TLS).
pub fn public_base(state: &AppState) -> String {
    if !state.config.public_url.is_empty() {
        return state.config.public_url.trim_end_matches('/').to_owned();
    }
    state
        .ws_url
        .trim_end_matches("/ws")
        .replacen("wss://", "https://", 1)
        .replacen("ws://", "http://", 1)
}

/// Whether the page may be served for this request: over HTTPS (our TLS, or a proxy's named in
/// `public-url`), or to a loopback host.
fn secure_enough(state: &AppState, headers: &HeaderMap) -> bool {
    if state.ws_url.starts_with("wss://") {
        return true;
    }
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("");
    is_loopback_host(host)
}

/// `host[:port]` names this machine: `localhost`, 127.0.0.0/8 or `[::1]`.
fn is_loopback_host(host: &str) -> bool {
    let name = if let Some(rest) = host.strip_prefix('[') {
        rest.split(']').next().unwrap_or("")
    } else {
        host.rsplit_once(':').map_or(host, |(h, _)| h)
    };
    name.eq_ignore_ascii_case("localhost")
        || name
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

fn with_page_headers(mut resp: Response, content_type: &'static str) -> Response {
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(
        "permissions-policy",
        HeaderValue::from_static("camera=(self), microphone=(self), geolocation=()"),
    );
    resp
}

async fn page(State(state): State<Arc<AppState>>, headers: HeaderMap) -> Response {
    if !secure_enough(&state, &headers) {
        let body = "This page must be opened over HTTPS. Ask the clinic for an https:// link.\n";
        return with_page_headers(
            (StatusCode::FORBIDDEN, body).into_response(),
            "text/plain; charset=utf-8",
        );
    }
    with_page_headers(INDEX_HTML.into_response(), "text/html; charset=utf-8")
}

/// The code is read by the page from its own address; the server only checks its shape, so a
/// link that cannot be an invite says so before the patient types a name.
async fn invite_page(
    state: State<Arc<AppState>>,
    headers: HeaderMap,
    Path(invite): Path<String>,
) -> Response {
    let plausible = invite.len() <= 32
        && invite
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-');
    if !plausible {
        return with_page_headers(
            (StatusCode::NOT_FOUND, "This is not a consultation link.\n").into_response(),
            "text/plain; charset=utf-8",
        );
    }
    page(state, headers).await
}

async fn script() -> Response {
    with_page_headers(JOIN_JS.into_response(), "text/javascript; charset=utf-8")
}

async fn style() -> Response {
    with_page_headers(JOIN_CSS.into_response(), "text/css; charset=utf-8")
}

async fn assetlinks(State(state): State<Arc<AppState>>) -> Response {
    let apps = &state.config.web.android_apps;
    if apps.is_empty() {
        return StatusCode::NOT_FOUND.into_response();
    }
    let statements: Vec<_> = apps
        .iter()
        .map(|app| {
            json!({
                "relation": ["delegate_permission/common.handle_all_urls"],
                "target": {
                    "namespace": "android_app",
                    "package_name": app.package,
                    "sha256_cert_fingerprints": app.sha256_cert_fingerprints,
                }
            })
        })
        .collect();
    Json(statements).into_response()
}

async fn apple_links(State(state): State<Arc<AppState>>) -> Response {
    let ids = &state.config.web.ios_app_ids;
    if ids.is_empty() {
        return StatusCode::NOT_FOUND.into_response();
    }
    // Served as JSON at this extension-less path, as Apple requires.
    Json(json!({
        "applinks": {
            "details": [{
                "appIDs": ids,
                "components": [{ "/": "/j/*", "comment": "Bedside consultation links" }],
            }]
        }
    }))
    .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_hosts_are_recognised() {
        for host in [
            "127.0.0.1:8443",
            "localhost",
            "LOCALHOST:1",
            "[::1]:80",
            "127.3.4.5",
        ] {
            assert!(is_loopback_host(host), "{host}");
        }
        for host in [
            "clinic.example.org",
            "10.0.0.1:8443",
            "[2001:db8::1]:443",
            "",
        ] {
            assert!(!is_loopback_host(host), "{host}");
        }
    }
}
