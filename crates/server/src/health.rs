//! Status endpoints: `/` (what RJMetrics clients poll), `/health` (process alive) and
//! `/ready` (database reachable), and `/openapi.json` (the API's description).

use actix_web::{HttpResponse, web};
use serde_json::json;

use crate::app::AppState;
use crate::errors::ApiError;

pub async fn status() -> HttpResponse {
    HttpResponse::Ok().json(json!({"status": "ok"}))
}

/// The OpenAPI 3 description of both protocols; docs/openapi.json is its one source.
const OPENAPI: &str = include_str!("../../../docs/openapi.json");

/// `GET /openapi.json`.
pub async fn openapi() -> HttpResponse {
    HttpResponse::Ok()
        .content_type("application/json")
        .body(OPENAPI)
}

pub async fn alive() -> HttpResponse {
    HttpResponse::Ok().json(json!({"status": "ok"}))
}

pub async fn ready(state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    database_reachable(&state, "not ready: the database is unreachable").await?;
    Ok(HttpResponse::Ok().json(json!({"status": "ready"})))
}

/// Pings the database through the gate; a 503 with Retry-After and `message` if it does not
/// answer. Shared by `/ready` and Stitch's `/v2/import/status`.
pub async fn database_reachable(state: &AppState, message: &str) -> Result<(), ApiError> {
    state.gate.run(intake_core::db::ping).await.map_err(|e| {
        log::warn!("database check failed: {e}");
        ApiError {
            message: message.to_owned(),
            ..state.unavailable()
        }
    })
}
