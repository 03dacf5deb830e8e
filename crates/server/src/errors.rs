//! The one error type of the HTTP API. Every error answer has the same JSON shape:
//! `{"code": <status>, "message": "...", "reasons": ["..."]}`.

use actix_web::http::StatusCode;
use actix_web::http::header::{ALLOW, CONTENT_TYPE, RETRY_AFTER};
use actix_web::{HttpResponse, ResponseError};
use serde::Serialize;

#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub reasons: Vec<String>,
    /// Seconds for a `Retry-After` header (503 and 429 answers).
    pub retry_after: Option<u64>,
    /// The methods an endpoint does accept, for the `Allow` header of a 405.
    pub allow: Option<&'static str>,
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    code: u16,
    message: &'a str,
    reasons: &'a [String],
}

impl ApiError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            message: message.into(),
            reasons: Vec::new(),
            retry_after: None,
            allow: None,
        }
    }

    pub fn bad_request(message: impl Into<String>, reasons: Vec<String>) -> ApiError {
        ApiError {
            reasons,
            ..ApiError::new(StatusCode::BAD_REQUEST, message)
        }
    }

    /// The single answer for every unusable key (missing, malformed, unknown, wrong secret,
    /// revoked), so that an attacker learns nothing about which it was.
    pub fn unauthorized() -> ApiError {
        ApiError::new(
            StatusCode::UNAUTHORIZED,
            "missing or invalid API key: pass a valid key as ?apikey=, \
             'Authorization: Bearer <key>' or 'X-Api-Key: <key>'",
        )
    }

    /// Says nothing about the client id in the URL: a key pasted there must not be echoed.
    pub fn forbidden() -> ApiError {
        ApiError::new(
            StatusCode::FORBIDDEN,
            "this API key is not valid for the client id in the URL",
        )
    }

    pub fn not_found() -> ApiError {
        ApiError::new(StatusCode::NOT_FOUND, "no such endpoint; see docs/api.md")
    }

    pub fn method_not_allowed(allow: &'static str) -> ApiError {
        ApiError {
            allow: Some(allow),
            ..ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                format!("method not allowed on this endpoint; it accepts {allow}"),
            )
        }
    }

    pub fn too_large(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, message)
    }

    /// 429: the client should slow down and may retry after `retry_after` seconds.
    pub fn too_many_requests(message: impl Into<String>, retry_after: u64) -> ApiError {
        ApiError {
            retry_after: Some(retry_after),
            ..ApiError::new(StatusCode::TOO_MANY_REQUESTS, message)
        }
    }

    pub fn unavailable(retry_after: u64) -> ApiError {
        ApiError {
            retry_after: Some(retry_after),
            ..ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "the database could not take the request in time; retry later (retrying is safe: records with keys are upserted, so one stored despite this answer is not duplicated)",
            )
        }
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.status.as_u16(), self.message)
    }
}

impl ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        self.status
    }

    fn error_response(&self) -> HttpResponse {
        let body = ErrorBody {
            code: self.status.as_u16(),
            message: &self.message,
            reasons: &self.reasons,
        };
        error_answer(
            self.status,
            serde_json::to_string(&body).unwrap_or_else(|_| "{}".into()),
            self.retry_after,
            self.allow,
        )
    }
}

/// An error answer of either protocol: its JSON body, and the `Retry-After` and `Allow`
/// headers when they apply.
pub fn error_answer(
    status: StatusCode,
    body: String,
    retry_after: Option<u64>,
    allow: Option<&'static str>,
) -> HttpResponse {
    let mut response = HttpResponse::build(status);
    response.insert_header((CONTENT_TYPE, "application/json"));
    if let Some(secs) = retry_after {
        response.insert_header((RETRY_AFTER, secs.to_string()));
    }
    if let Some(allow) = allow {
        response.insert_header((ALLOW, allow));
    }
    response.body(body)
}
