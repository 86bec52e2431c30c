//! Doctor credentials: what a doctor's app on a remote clinic signs in with.
//!
//! An administrator issues one per doctor (`POST /api/v1/doctor-credentials`, admin key): a
//! random secret, shown once, valid for days rather than minutes (default 90 days, at most
//! 365), and revocable (`DELETE /api/v1/doctor-credentials/{id}`). The store keeps only its
//! SHA-256, like invite codes, with its id and dates: never a name.
//!
//! With it the app reaches a subset of the administration API under `/api/v1/doctor/`: today's
//! consultations, creating one, a fresh short-lived join token, a new invite code, ending one.
//! Those routes are the administration API's own handlers (so both stay one implementation):
//! a middleware checks the doctor credential (not expired, not revoked) and only then lets the
//! request through as the clinic's own, in place of the admin key. Audit lines and the
//! metrics are therefore the same as for the administrator's calls.

use std::sync::Arc;

use axum::extract::{Path, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::AppState;
use crate::api;
use crate::auth::{self, invite};

/// How long a credential lasts unless the administrator asks otherwise.
pub const DEFAULT_TTL_DAYS: u64 = 90;
/// The longest a credential may last.
pub const MAX_TTL_DAYS: u64 = 365;
/// Every doctor credential starts with this, so a leaked one is recognisable in a scan.
pub const PREFIX: &str = "bdc_";

/// The routes this module adds: the administrator's credential management and the doctor's
/// subset of the consultation API.
pub fn router(state: &Arc<AppState>) -> Router<Arc<AppState>> {
    let doctor = Router::new()
        .route(
            "/api/v1/doctor/consultations",
            post(api::create_consultation).get(api::list_consultations),
        )
        .route(
            "/api/v1/doctor/consultations/{id}",
            get(api::get_consultation).delete(api::end_consultation),
        )
        .route(
            "/api/v1/doctor/consultations/{id}/tokens",
            post(api::issue_token),
        )
        .route(
            "/api/v1/doctor/consultations/{id}/invites",
            post(api::issue_invite),
        )
        .route_layer(middleware::from_fn_with_state(state.clone(), doctor_auth));
    Router::new()
        .route("/api/v1/doctor-credentials", post(issue).get(list))
        .route("/api/v1/doctor-credentials/{id}", delete(revoke))
        .merge(doctor)
}

struct Error(StatusCode, &'static str, String);

impl IntoResponse for Error {
    fn into_response(self) -> Response {
        let body = json!({ "error": { "code": self.1, "message": self.2 } });
        (self.0, Json(body)).into_response()
    }
}

impl From<crate::store::StoreError> for Error {
    fn from(e: crate::store::StoreError) -> Self {
        tracing::error!(error = %e, "store error");
        Error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "the store failed; nothing was changed".into(),
        )
    }
}

fn bearer(headers: &HeaderMap) -> &str {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("")
}

fn require_admin(state: &AppState, headers: &HeaderMap) -> Result<(), Error> {
    let given = bearer(headers);
    if !given.is_empty() && auth::constant_time_eq(given.as_bytes(), state.admin_key.as_bytes()) {
        Ok(())
    } else {
        Err(Error(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "send the administration key as 'Authorization: Bearer <key>'".into(),
        ))
    }
}

/// What the store keeps instead of the credential.
fn hash(credential: &str) -> [u8; 32] {
    invite::hash(credential)
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IssueCredential {
    /// Days until it expires (default [`DEFAULT_TTL_DAYS`], at most [`MAX_TTL_DAYS`]).
    pub ttl_days: Option<u64>,
}

/// A credential as issued: the secret is in this answer and nowhere else.
#[derive(Debug, Serialize, Deserialize)]
pub struct IssuedCredential {
    pub credential_id: String,
    pub credential: String,
    pub expires_at: u64,
}

/// A credential as listed: never the secret.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CredentialSummary {
    pub credential_id: String,
    pub created_at: u64,
    pub expires_at: u64,
    pub revoked_at: Option<u64>,
}

async fn issue(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Option<Json<IssueCredential>>,
) -> Result<(StatusCode, Json<IssuedCredential>), Error> {
    require_admin(&state, &headers)?;
    let req = body.map(|Json(b)| b).unwrap_or_default();
    let days = req.ttl_days.unwrap_or(DEFAULT_TTL_DAYS);
    if days == 0 || days > MAX_TTL_DAYS {
        return Err(Error(
            StatusCode::BAD_REQUEST,
            "bad_request",
            format!("ttl_days must be between 1 and {MAX_TTL_DAYS}"),
        ));
    }
    let id = auth::random_id("d");
    let credential = format!("{PREFIX}{}", auth::random_secret(24));
    let now = auth::unix_now();
    let expires_at = now + days * 24 * 3600;
    let row = crate::store::CredentialRow {
        id: id.clone(),
        created_at: now,
        expires_at,
        revoked_at: None,
    };
    state
        .store
        .insert_credential(row, hash(&credential))
        .await?;
    tracing::info!(credential = %id, "doctor credential issued");
    Ok((
        StatusCode::CREATED,
        Json(IssuedCredential {
            credential_id: id,
            credential,
            expires_at,
        }),
    ))
}

async fn list(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
) -> Result<Json<Vec<CredentialSummary>>, Error> {
    require_admin(&state, &headers)?;
    let rows = state
        .store
        .credentials()
        .await?
        .into_iter()
        .map(|r| CredentialSummary {
            credential_id: r.id,
            created_at: r.created_at,
            expires_at: r.expires_at,
            revoked_at: r.revoked_at,
        })
        .collect();
    Ok(Json(rows))
}

async fn revoke(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<StatusCode, Error> {
    require_admin(&state, &headers)?;
    let now = auth::unix_now();
    if !state.store.revoke_credential(id.clone(), now).await? {
        return Err(Error(
            StatusCode::NOT_FOUND,
            "credential_not_found",
            "no such doctor credential".into(),
        ));
    }
    tracing::info!(credential = %id, "doctor credential revoked");
    Ok(StatusCode::NO_CONTENT)
}

/// Why a doctor credential was refused (one answer for all, so a caller learns nothing about
/// which credentials exist).
fn refused() -> Response {
    Error(
        StatusCode::UNAUTHORIZED,
        "unauthorized",
        "send a valid, unrevoked doctor credential as 'Authorization: Bearer <credential>'".into(),
    )
    .into_response()
}

/// Lets a request with a valid doctor credential through to the administration handlers.
async fn doctor_auth(State(state): State<Arc<AppState>>, mut req: Request, next: Next) -> Response {
    let given = bearer(req.headers());
    if !given.starts_with(PREFIX) {
        return refused();
    }
    let digest = hash(given);
    let now = auth::unix_now();
    match state.store.credential_valid(digest, now).await {
        Ok(true) => {}
        Ok(false) => return refused(),
        Err(e) => return Error::from(e).into_response(),
    }
    let Ok(admin) = HeaderValue::from_str(&format!("Bearer {}", state.admin_key)) else {
        return refused();
    };
    req.headers_mut().insert(header::AUTHORIZATION, admin);
    next.run(req).await
}
