//! The RJMetrics Import API v2 endpoints: authenticate and push.

use std::time::Duration;

use actix_web::http::StatusCode;
use actix_web::http::header::{CONTENT_ENCODING, CONTENT_LENGTH, CONTENT_TYPE};
use actix_web::{HttpRequest, HttpResponse, web};
use futures_util::StreamExt;
use intake_core::keys::parse_key;
use intake_core::push_body::{BodyRejection, parse_push_body};
use intake_core::table_name::normalize_table_name;
use serde_json::json;

use crate::access_log::RecordCount;
use crate::app::AppState;
use crate::auth::{AuthFailure, presented_key};
use crate::errors::ApiError;
use crate::rate_limit::RetryAfter;

/// Whether a push route belongs to the sandbox, which validates but stores nothing.
pub struct Sandbox(pub bool);

/// `GET /v2/client/{cid}/authenticate`: 200 when the key is valid for the client.
pub async fn authenticate(
    req: HttpRequest,
    cid: web::Path<String>,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let client_id = authorize(&req, &cid, &state).await?;
    Ok(HttpResponse::Ok()
        .json(json!({"code": 200, "message": "authenticated", "client_id": client_id})))
}

/// `POST /v2/client/{cid}/table/{table}/data`: validates every record and commits them all
/// to staging before answering 201, or stores nothing and says why.
pub async fn push(
    req: HttpRequest,
    path: web::Path<(String, String)>,
    payload: web::Payload,
    sandbox: web::Data<Sandbox>,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let (cid, table) = path.into_inner();
    let client_id = authorize(&req, &cid, &state).await?;
    check_content_type(&req)?;
    let table = normalize_table_name(&table).map_err(|why| ApiError::bad_request(why, vec![]))?;
    let body = read_body(&req, payload, &state, state.settings.server.max_body_bytes).await?;
    let records =
        parse_push_body(&body, state.body_limits()).map_err(|rejection| match rejection {
            BodyRejection::TooManyRecords { count, max } => ApiError::too_large(format!(
                "request holds {count} records; the limit is {max} per request"
            )),
            BodyRejection::Invalid { message, reasons } => ApiError::bad_request(message, reasons),
        })?;
    let accepted = records.len();
    if !sandbox.0 {
        // Each record's byte range in the body, so the body travels to the database uncopied.
        let base = body.as_ptr() as usize;
        let ranges: Vec<(usize, usize)> = records
            .iter()
            .map(|r| {
                let start = r.as_ptr() as usize - base;
                (start, start + r.len())
            })
            .collect();
        let body = String::from_utf8(body)
            .map_err(|_| ApiError::bad_request("request body is not UTF-8", vec![]))?;
        let received_at = intake_core::timestamps::now();
        match state
            .committer
            .commit(client_id, table, received_at, body, ranges)
            .await
        {
            Ok(_) => {}
            Err(e) => {
                log::error!("push for client {client_id} not stored: {e:?}");
                return Err(state.unavailable());
            }
        }
    }
    let mut response = HttpResponse::Created().json(json!({
        "code": 201,
        "message": if sandbox.0 { "valid (sandbox: nothing was stored)" } else { "created" },
        "accepted": accepted,
        "sandbox": sandbox.0,
    }));
    if !sandbox.0 {
        response.extensions_mut().insert(RecordCount(accepted));
    }
    Ok(response)
}

/// The client id a request may act for: its key must be valid (401), within its rate limit
/// (429) and be that client's (403).
async fn authorize(req: &HttpRequest, cid: &str, state: &AppState) -> Result<i64, ApiError> {
    let key_client = verified_client(req, state).await?;
    // Only the canonical spelling names a client: not "+42", not "0042".
    match cid.parse::<i64>() {
        Ok(id) if id == key_client && id.to_string() == cid => Ok(id),
        _ => Err(ApiError::forbidden()),
    }
}

/// The client of the request's key, once the key is found valid (401) and within its rate
/// limit (429).
pub(crate) async fn verified_client(req: &HttpRequest, state: &AppState) -> Result<i64, ApiError> {
    let key = presented_key(req).ok_or_else(ApiError::unauthorized)?;
    let key_client = state
        .keys
        .verify(&key)
        .await
        .map_err(|failure| match failure {
            AuthFailure::Invalid => ApiError::unauthorized(),
            AuthFailure::Unavailable(e) => {
                log::error!("key lookup failed: {e}");
                state.unavailable()
            }
            AuthFailure::Throttled(secs) => ApiError::too_many_requests(
                "too many wrong secrets were tried for this key id; retry later",
                secs,
            ),
        })?;
    check_rate_limit(&key, state)?;
    Ok(key_client)
}

/// Takes one request from the verified key's allowance (`[rate_limit]`), or answers 429.
fn check_rate_limit(verified_key: &str, state: &AppState) -> Result<(), ApiError> {
    let (Some(limiter), Some(presented)) = (&state.rate_limiter, parse_key(verified_key)) else {
        return Ok(());
    };
    limiter.check(presented.key_id).map_err(|RetryAfter(secs)| {
        let limits = &state.settings.rate_limit;
        ApiError::too_many_requests(
            format!(
                "rate limit exceeded for this API key ({} requests per second, bursts of {}); \
                 retry after {secs} s",
                limits.requests_per_sec, limits.burst
            ),
            secs,
        )
    })
}

/// JSON only, uncompressed; a missing Content-Type is accepted (older clients omit it).
pub(crate) fn check_content_type(req: &HttpRequest) -> Result<(), ApiError> {
    if let Some(encoding) = req.headers().get(CONTENT_ENCODING)
        && !encoding
            .to_str()
            .unwrap_or("")
            .trim()
            .eq_ignore_ascii_case("identity")
    {
        return Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "compressed bodies are not accepted: send the JSON uncompressed (no Content-Encoding)",
        ));
    }
    let Some(value) = req.headers().get(CONTENT_TYPE) else {
        return Ok(());
    };
    let essence = value
        .to_str()
        .unwrap_or("")
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    if essence == "application/json"
        || (essence.starts_with("application/") && essence.ends_with("+json"))
    {
        Ok(())
    } else {
        Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "the body must be JSON: send Content-Type: application/json",
        ))
    }
}

/// Reads the body up to `limit` bytes (413 beyond) within the body timeout (408 beyond).
pub(crate) async fn read_body(
    req: &HttpRequest,
    mut payload: web::Payload,
    state: &AppState,
    limit: usize,
) -> Result<Vec<u8>, ApiError> {
    let too_large =
        || ApiError::too_large(format!("request body exceeds the limit of {limit} bytes"));
    let declared = req
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|len| len > limit) {
        return Err(too_large());
    }
    let timeout = Duration::from_secs(state.settings.server.body_timeout_secs.max(1));
    let read = async {
        let mut body = Vec::with_capacity(declared.unwrap_or(0).min(limit));
        while let Some(chunk) = payload.next().await {
            let chunk = chunk.map_err(|e| {
                ApiError::bad_request(format!("could not read the request body: {e}"), vec![])
            })?;
            if body.len() + chunk.len() > limit {
                return Err(too_large());
            }
            body.extend_from_slice(&chunk);
        }
        Ok(body)
    };
    tokio::time::timeout(timeout, read)
        .await
        .unwrap_or_else(|_| {
            Err(ApiError::new(
                StatusCode::REQUEST_TIMEOUT,
                "the request body did not arrive in time",
            ))
        })
}
