//! HTTP routes: the administration API (`/api/v1`, bearer key), health, metrics, and the
//! signaling WebSocket upgrade (`/ws`).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::rejection::JsonRejection;
use axum::extract::ws::WebSocketUpgrade;
use axum::extract::{ConnectInfo, Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use bedside_protocol::{ConsultationId, MAX_MESSAGE_BYTES, Role};
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::AppState;
use crate::auth::{self, TokenKind, invite};
use crate::store::{AuditEvent, AuditKind};

pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/metrics", get(metrics))
        .route("/ws", get(ws_upgrade))
        .route(
            "/api/v1/consultations",
            post(create_consultation).get(list_consultations),
        )
        .route(
            "/api/v1/consultations/{id}",
            get(get_consultation).delete(end_consultation),
        )
        .route("/api/v1/consultations/{id}/tokens", post(issue_token))
        .route(
            "/api/v1/consultations/{id}/invites",
            post(issue_invite).delete(revoke_invites),
        )
        .route("/api/v1/consultations/{id}/audit", get(audit_log))
        .route("/api/v1/fleet", get(fleet))
        .route("/readyz", get(crate::health::readyz))
        .merge(crate::dashboard::routes())
        .merge(crate::web::router())
        .merge(crate::credentials::router(&state))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            check_host,
        ))
        .with_state(state)
}

/// Refuses a request whose `Host` is not one this server answers to (DNS rebinding: a page on
/// `evil.example` whose name now points at 127.0.0.1 sends `Host: evil.example`).
async fn check_host(
    State(state): State<Arc<AppState>>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let host = crate::limits::host_header(request.headers())
        .map(str::to_owned)
        .or_else(|| request.uri().authority().map(|a| a.to_string()));
    if !state.gate.host_allowed(host.as_deref()) {
        state.metrics.limit("host");
        return ApiError(
            StatusCode::MISDIRECTED_REQUEST,
            "unknown_host",
            "this server does not answer to that host name; see limits.allowed-hosts".into(),
        )
        .into_response();
    }
    next.run(request).await
}

/// An API error: a status and a stable code, as JSON.
pub struct ApiError(StatusCode, &'static str, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({ "error": { "code": self.1, "message": self.2 } });
        (self.0, Json(body)).into_response()
    }
}

impl From<crate::store::StoreError> for ApiError {
    fn from(e: crate::store::StoreError) -> Self {
        tracing::error!(error = %e, "store error");
        ApiError(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "the store failed; nothing was changed".into(),
        )
    }
}

impl From<JsonRejection> for ApiError {
    fn from(e: JsonRejection) -> Self {
        ApiError(StatusCode::BAD_REQUEST, "bad_request", e.body_text())
    }
}

/// A fleet node: the region's nodes with their consultations, connections and relay load.
async fn fleet(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
) -> Result<Json<crate::cluster::Fleet>, ApiError> {
    require_admin(&state, &headers)?;
    let Some(cluster) = &state.cluster else {
        return Err(ApiError(
            StatusCode::NOT_FOUND,
            "not_a_fleet",
            "this server runs alone (no [cluster] section)".into(),
        ));
    };
    cluster.fleet().await.map(Json).map_err(|e| {
        tracing::warn!(error = %e, "redis: the fleet could not be read");
        ApiError(
            StatusCode::SERVICE_UNAVAILABLE,
            "redis_unavailable",
            "the region's Redis does not answer; try again".into(),
        )
    })
}

fn not_found() -> ApiError {
    ApiError(
        StatusCode::NOT_FOUND,
        "consultation_not_found",
        "no such consultation".into(),
    )
}

pub(crate) fn require_admin(state: &AppState, headers: &HeaderMap) -> Result<(), ApiError> {
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    if !given.is_empty() && auth::constant_time_eq(given.as_bytes(), state.admin_key.as_bytes()) {
        Ok(())
    } else {
        Err(ApiError(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "send the administration key as 'Authorization: Bearer <key>'".into(),
        ))
    }
}

async fn metrics(State(state): State<Arc<AppState>>, headers: HeaderMap) -> impl IntoResponse {
    let mut body = state.metrics.render();
    if let Some(extra) = &state.extra_metrics {
        // OpenMetrics ends with `# EOF`: the relay's families go before it.
        let end = body.rfind("# EOF").unwrap_or(body.len());
        body.insert_str(end, &extra());
    }
    // OpenMetrics unless the scraper asks for the classic text format alone (promtool reads
    // that one; Prometheus asks for OpenMetrics first).
    let accept = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if accept.contains("text/plain") && !accept.contains("openmetrics") {
        let body = crate::metrics::to_classic_text(&body);
        return (
            [(
                header::CONTENT_TYPE,
                "text/plain; version=0.0.4; charset=utf-8",
            )],
            body,
        );
    }
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        body,
    )
}

async fn ws_upgrade(
    State(state): State<Arc<AppState>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    ws: WebSocketUpgrade,
) -> Response {
    let origin = headers
        .get(header::ORIGIN)
        .map(|v| v.to_str().unwrap_or("?"));
    if !state
        .gate
        .origin_allowed(origin, crate::limits::host_header(&headers))
    {
        state.metrics.limit("origin");
        return ApiError(
            StatusCode::FORBIDDEN,
            "forbidden_origin",
            "WebSockets from this web origin are refused; see limits.allowed-origins".into(),
        )
        .into_response();
    }
    let client =
        crate::limits::client_ip(peer.ip(), &headers, &state.config.limits.trusted_proxies);
    // Small buffers keep an idle connection cheap; frames are capped at the protocol's limit.
    ws.read_buffer_size(4096)
        .write_buffer_size(0)
        .max_write_buffer_size(4 * MAX_MESSAGE_BYTES)
        .max_message_size(MAX_MESSAGE_BYTES)
        .max_frame_size(MAX_MESSAGE_BYTES)
        .on_upgrade(move |socket| {
            // One span per connection, named by the consultation it joins (ws.rs records it),
            // so a consultation's lines can be followed by its id.
            tracing::Instrument::instrument(
                crate::ws::serve(state, socket, client),
                tracing::info_span!("consultation", id = tracing::field::Empty),
            )
        })
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateConsultation {
    /// How long the patient's invite code is valid (default: the server's `invite-ttl-secs`).
    pub invite_ttl_secs: Option<u64>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct CreatedConsultation {
    pub consultation_id: ConsultationId,
    pub doctor_token: String,
    pub doctor_token_expires_at: u64,
    pub invite_code: String,
    pub invite_expires_at: u64,
    /// Where clients open the signaling WebSocket.
    pub ws_url: String,
    /// The link to send the patient: `<public-url>/j/<invite_code>` (the join page).
    #[serde(default)]
    pub invite_url: String,
    /// The fleet region the consultation belongs to (a fleet with a region map only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
}

/// A new invite code: in a fleet with a region map, with this region's tag in front.
fn new_invite_code(state: &AppState) -> String {
    let tag = state.cluster.as_ref().and_then(|c| c.regions().own_tag());
    invite::generate_tagged(&mut rand::rng(), tag.as_deref().unwrap_or(""))
}

fn invite_ttl(state: &AppState, asked: Option<u64>) -> Result<u64, ApiError> {
    let ttl = asked.unwrap_or(state.config.invite_ttl_secs);
    if ttl == 0 || ttl > state.config.max_invite_ttl_secs {
        return Err(ApiError(
            StatusCode::BAD_REQUEST,
            "bad_request",
            format!(
                "invite_ttl_secs must be between 1 and {}",
                state.config.max_invite_ttl_secs
            ),
        ));
    }
    Ok(ttl)
}

pub(crate) async fn create_consultation(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Result<Json<CreateConsultation>, JsonRejection>,
) -> Result<(StatusCode, Json<CreatedConsultation>), ApiError> {
    require_admin(&state, &headers)?;
    // An empty body is fine: every field has a default.
    let req = match body {
        Ok(Json(req)) => req,
        Err(JsonRejection::MissingJsonContentType(_))
            if headers.get(header::CONTENT_LENGTH).is_none_or(|l| l == "0") =>
        {
            CreateConsultation::default()
        }
        Err(e) => return Err(e.into()),
    };
    let ttl = invite_ttl(&state, req.invite_ttl_secs)?;
    let cid = ConsultationId(auth::random_id("c"));
    let code = new_invite_code(&state);
    let now = auth::unix_now();
    let invite_expires_at = now + ttl;
    state
        .store
        .create_consultation(
            cid.clone(),
            invite::hash(&code.replace('-', "")),
            invite_expires_at,
        )
        .await?;
    state.store.audit(AuditEvent::new(&cid, AuditKind::Created));
    let token_ttl = Duration::from_secs(state.config.join_token_ttl_secs);
    let doctor_token = state.tokens.issue(
        TokenKind::Join,
        &cid,
        Role::Doctor,
        &auth::random_id("t"),
        now,
        token_ttl,
    );
    tracing::info!(consultation = %cid, "consultation created");
    Ok((
        StatusCode::CREATED,
        Json(CreatedConsultation {
            consultation_id: cid,
            doctor_token,
            doctor_token_expires_at: now + token_ttl.as_secs(),
            invite_expires_at,
            ws_url: state.ws_url.clone(),
            invite_url: crate::web::invite_url(&state, &code),
            invite_code: code,
            region: state
                .cluster
                .as_ref()
                .filter(|c| c.regions().mapped())
                .map(|c| c.region().to_owned()),
        }),
    ))
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConsultationSummary {
    pub consultation_id: ConsultationId,
    pub created_at: u64,
    pub ended_at: Option<u64>,
    pub seats: usize,
    pub waiting: usize,
    pub connected: usize,
}

fn summary(state: &AppState, row: crate::store::ConsultationRow) -> ConsultationSummary {
    let (seats, waiting, connected) = state.hub.occupancy(&row.id).unwrap_or((0, 0, 0));
    ConsultationSummary {
        consultation_id: row.id,
        created_at: row.created_at,
        ended_at: row.ended_at,
        seats,
        waiting,
        connected,
    }
}

/// Consultations of the last 24 hours, newest first.
pub(crate) async fn list_consultations(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
) -> Result<Json<Vec<ConsultationSummary>>, ApiError> {
    require_admin(&state, &headers)?;
    let rows = state
        .store
        .consultations_since(auth::unix_now().saturating_sub(24 * 3600))
        .await?;
    Ok(Json(rows.into_iter().map(|r| summary(&state, r)).collect()))
}

pub(crate) async fn get_consultation(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Json<ConsultationSummary>, ApiError> {
    require_admin(&state, &headers)?;
    let row = state
        .store
        .consultation(ConsultationId(id))
        .await?
        .ok_or_else(not_found)?;
    Ok(Json(summary(&state, row)))
}

pub(crate) async fn end_consultation(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    require_admin(&state, &headers)?;
    let cid = ConsultationId(id);
    if !state.store.end_consultation(cid.clone()).await? {
        return Err(not_found());
    }
    state.hub.end(&cid);
    if let Some(cluster) = &state.cluster {
        // Its home may be another node of the fleet.
        cluster.end_everywhere(&cid).await;
    }
    state.store.audit(AuditEvent::new(&cid, AuditKind::Ended));
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenRequest {
    pub role: Role,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct IssuedToken {
    pub token: String,
    pub expires_at: u64,
}

/// A fresh join token for a role in an open consultation (another clinician, or a doctor whose
/// token expired). Through a doctor credential (`credential`), only a doctor's token: a patient's
/// or a clinician's would let the credential's holder sit in someone else's seat.
pub(crate) async fn issue_token(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    credential: Option<axum::Extension<crate::credentials::DoctorCredential>>,
    Path(id): Path<String>,
    body: Result<Json<TokenRequest>, JsonRejection>,
) -> Result<Json<IssuedToken>, ApiError> {
    require_admin(&state, &headers)?;
    let Json(req) = body?;
    if credential.is_some() && req.role != Role::Doctor {
        state.metrics.limit("credential_scope");
        return Err(ApiError(
            StatusCode::FORBIDDEN,
            "forbidden",
            "a doctor credential issues doctor tokens only; patients join with an invite".into(),
        ));
    }
    let cid = open_consultation(&state, id).await?;
    let now = auth::unix_now();
    let ttl = Duration::from_secs(state.config.join_token_ttl_secs);
    let token = state.tokens.issue(
        TokenKind::Join,
        &cid,
        req.role,
        &auth::random_id("t"),
        now,
        ttl,
    );
    state
        .store
        .audit(AuditEvent::new(&cid, AuditKind::TokenIssued));
    Ok(Json(IssuedToken {
        token,
        expires_at: now + ttl.as_secs(),
    }))
}

#[derive(Debug, Serialize, Deserialize)]
pub struct IssuedInvite {
    pub invite_code: String,
    pub expires_at: u64,
    /// `<public-url>/j/<invite_code>`.
    #[serde(default)]
    pub invite_url: String,
}

pub(crate) async fn issue_invite(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: Result<Json<CreateConsultation>, JsonRejection>,
) -> Result<Json<IssuedInvite>, ApiError> {
    require_admin(&state, &headers)?;
    let asked = match body {
        Ok(Json(req)) => req.invite_ttl_secs,
        Err(JsonRejection::MissingJsonContentType(_)) => None,
        Err(e) => return Err(e.into()),
    };
    let ttl = invite_ttl(&state, asked)?;
    let cid = open_consultation(&state, id).await?;
    let code = new_invite_code(&state);
    let expires_at = auth::unix_now() + ttl;
    state
        .store
        .add_invite(
            cid.clone(),
            invite::hash(&code.replace('-', "")),
            expires_at,
        )
        .await?;
    state
        .store
        .audit(AuditEvent::new(&cid, AuditKind::InviteIssued));
    Ok(Json(IssuedInvite {
        invite_url: crate::web::invite_url(&state, &code),
        invite_code: code,
        expires_at,
    }))
}

#[derive(Debug, Serialize, Deserialize)]
pub struct RevokedInvites {
    pub revoked: usize,
    /// Patients who were waiting with one of them and were taken out of the waiting room.
    pub waiting_removed: usize,
}

/// Voids every invite code of a consultation; patients waiting with one leave the waiting room
/// (admitted ones keep their seats).
async fn revoke_invites(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Json<RevokedInvites>, ApiError> {
    require_admin(&state, &headers)?;
    let cid = open_consultation(&state, id).await?;
    let revoked = state.store.revoke_invites(cid.clone()).await?;
    let waiting_removed = match &state.cluster {
        // Its waiting room is on its home node, wherever that is.
        Some(cluster) => cluster.revoke_invites_everywhere(&cid).await.unwrap_or(0),
        None => state.hub.revoke_invites(&cid),
    };
    state
        .store
        .audit(AuditEvent::new(&cid, AuditKind::InviteRevoked));
    Ok(Json(RevokedInvites {
        revoked,
        waiting_removed,
    }))
}

async fn open_consultation(state: &AppState, id: String) -> Result<ConsultationId, ApiError> {
    match state.store.consultation(ConsultationId(id)).await? {
        Some(row) if row.ended_at.is_none() => Ok(row.id),
        _ => Err(not_found()),
    }
}

async fn audit_log(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Json<Vec<AuditEvent>>, ApiError> {
    require_admin(&state, &headers)?;
    let cid = ConsultationId(id);
    if state.store.consultation(cid.clone()).await?.is_none() {
        return Err(not_found());
    }
    Ok(Json(state.store.audit_log(cid).await?))
}
