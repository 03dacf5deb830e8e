//! The Stitch Import API v2 endpoints (`/v2/import/...`), beside the RJMetrics ones: the same
//! keys, group committer, staging and loader; Stitch's own bodies, answers and error shape.

use actix_web::http::StatusCode;
use actix_web::{HttpRequest, HttpResponse, ResponseError, web};
use serde_json::json;

use crate::access_log::RecordCount;
use crate::app::AppState;
use crate::errors::{ApiError, error_answer};
use crate::group_commit::JobPart;
use crate::health;
use crate::ingest::{check_content_type, read_body, verified_client};
use crate::stitch_body::{self, Limits, MARKER_TEXT, Parts, Problem, Refusal};

/// An error answer in Stitch's shape: `{"status": "ERROR", "error": "...", "errors": [...]}`.
#[derive(Debug)]
pub struct StitchError {
    status: StatusCode,
    message: String,
    problems: Vec<Problem>,
    retry_after: Option<u64>,
    allow: Option<&'static str>,
}

impl StitchError {
    fn new(status: StatusCode, message: String, problems: Vec<Problem>) -> StitchError {
        StitchError {
            status,
            message,
            problems,
            retry_after: None,
            allow: None,
        }
    }
}

/// The shared checks (key, rate limit, content type, body size and time) answer in the
/// RJMetrics shape; here they keep their status and message but take Stitch's shape.
impl From<ApiError> for StitchError {
    fn from(e: ApiError) -> StitchError {
        let mut message = e.message;
        for reason in e.reasons {
            message.push_str("; ");
            message.push_str(&reason);
        }
        StitchError {
            status: e.status,
            message,
            problems: Vec::new(),
            retry_after: e.retry_after,
            allow: e.allow,
        }
    }
}

impl From<Refusal> for StitchError {
    fn from(refusal: Refusal) -> StitchError {
        match refusal {
            Refusal::BadRequest(m, p) => StitchError::new(StatusCode::BAD_REQUEST, m, p),
            Refusal::Forbidden(m) => StitchError::new(StatusCode::FORBIDDEN, m, vec![]),
            Refusal::Unprocessable(m, p) => {
                StitchError::new(StatusCode::UNPROCESSABLE_ENTITY, m, p)
            }
        }
    }
}

impl std::fmt::Display for StitchError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.status.as_u16(), self.message)
    }
}

impl ResponseError for StitchError {
    fn status_code(&self) -> StatusCode {
        self.status
    }

    fn error_response(&self) -> HttpResponse {
        let body = json!({"status": "ERROR", "error": self.message, "errors": self.problems});
        error_answer(self.status, body.to_string(), self.retry_after, self.allow)
    }
}

/// `GET /v2/import/status`: 200 while the database answers, 503 otherwise.
pub async fn status(state: web::Data<AppState>) -> Result<HttpResponse, StitchError> {
    health::database_reachable(&state, "the database is unreachable").await?;
    Ok(HttpResponse::Ok().json(json!({"status": "OK"})))
}

/// Which body a request carries.
#[derive(Clone, Copy)]
enum BodyKind {
    Push,
    Batch,
    /// `/validate`: a push body (array) or a batch body (object), by its first character.
    Either,
}

/// `POST /v2/import/push`: records for one or more tables, committed together.
pub async fn push(
    req: HttpRequest,
    payload: web::Payload,
    state: web::Data<AppState>,
) -> Result<HttpResponse, StitchError> {
    accept(req, payload, state, BodyKind::Push, true).await
}

/// `POST /v2/import/batch`: one table's records, validated against its JSON Schema.
pub async fn batch(
    req: HttpRequest,
    payload: web::Payload,
    state: web::Data<AppState>,
) -> Result<HttpResponse, StitchError> {
    accept(req, payload, state, BodyKind::Batch, true).await
}

/// `POST /v2/import/validate`: every check of push (or batch), nothing stored.
pub async fn validate(
    req: HttpRequest,
    payload: web::Payload,
    state: web::Data<AppState>,
) -> Result<HttpResponse, StitchError> {
    accept(req, payload, state, BodyKind::Either, false).await
}

async fn accept(
    req: HttpRequest,
    payload: web::Payload,
    state: web::Data<AppState>,
    kind: BodyKind,
    store: bool,
) -> Result<HttpResponse, StitchError> {
    let client_id = verified_client(&req, &state).await?;
    check_content_type(&req)?;
    let limits = &state.settings.stitch;
    let body = read_body(&req, payload, &state, limits.max_body_bytes).await?;
    let body = String::from_utf8(body).map_err(|_| {
        StitchError::new(
            StatusCode::BAD_REQUEST,
            "request body is not UTF-8".into(),
            vec![],
        )
    })?;
    let limits = Limits {
        max_records: limits.max_records_per_request,
    };
    let is_batch = match kind {
        BodyKind::Push => false,
        BodyKind::Batch => true,
        BodyKind::Either => body.trim_start().starts_with('{'),
    };
    // Up to 20 MB of JSON and a schema check per record: off the HTTP worker threads.
    let (body, parsed) = web::block(move || {
        let parsed = if is_batch {
            stitch_body::parse_batch(&body, limits)
        } else {
            stitch_body::parse_push(&body, client_id, limits)
        };
        (body, parsed)
    })
    .await
    .map_err(|e| {
        log::error!("parsing a Stitch body did not complete: {e}");
        StitchError::from(state.unavailable())
    })?;
    let parts = parsed?;
    if !store {
        return Ok(HttpResponse::Ok().json(json!({"status": "OK", "message": "Batch is valid!"})));
    }
    let accepted = parts.record_count();
    commit(&state, client_id, body, parts).await?;
    let mut response =
        HttpResponse::Created().json(json!({"status": "OK", "message": "Batch Accepted!"}));
    response.extensions_mut().insert(RecordCount(accepted));
    Ok(response)
}

/// Stages every part in one transaction; answers only once committed.
async fn commit(
    state: &AppState,
    client_id: i64,
    mut body: String,
    parts: Parts,
) -> Result<(), StitchError> {
    if parts.marker_range.is_some() {
        body.push_str(MARKER_TEXT);
    }
    let jobs = parts
        .tables
        .into_iter()
        .map(|part| JobPart {
            table: part.table,
            records: part.ranges,
            meta: Some(part.meta),
            schema: part.schema,
        })
        .collect();
    let received_at = intake_core::timestamps::now();
    state
        .committer
        .commit_parts(client_id, received_at, body, jobs)
        .await
        .map_err(|e| {
            log::error!("Stitch push for client {client_id} not stored: {e:?}");
            StitchError::from(state.unavailable())
        })?;
    Ok(())
}
