//! Routes and shared state of the HTTP API.

use std::sync::Arc;

use actix_web::{HttpResponse, web};
use intake_core::push_body::BodyLimits;
use intake_core::settings::Settings;

use crate::auth::KeyVerifier;
use crate::db_gate::DbGate;
use crate::errors::ApiError;
use crate::group_commit::GroupCommitter;
use crate::rate_limit::RateLimiter;
use crate::{health, ingest, stitch};

/// What every handler can reach.
pub struct AppState {
    pub settings: Settings,
    pub gate: DbGate,
    pub keys: Arc<KeyVerifier>,
    /// Per-key token buckets; `None` when `rate_limit.enabled` is false.
    pub rate_limiter: Option<RateLimiter>,
    /// Writes pushes to staging, several requests per transaction.
    pub committer: GroupCommitter,
}

impl AppState {
    pub fn body_limits(&self) -> BodyLimits {
        BodyLimits {
            max_records: self.settings.server.max_records_per_request,
            max_depth: self.settings.server.max_json_depth,
        }
    }

    pub fn unavailable(&self) -> ApiError {
        ApiError::unavailable(self.settings.server.retry_after_secs)
    }
}

/// Registers every route. Known paths answer 405 (in the JSON error shape) to other methods;
/// unknown paths answer 404.
pub fn configure(cfg: &mut web::ServiceConfig) {
    let wrong_method = |allow: &'static str| {
        web::to(move || async move { Err::<HttpResponse, _>(ApiError::method_not_allowed(allow)) })
    };
    cfg.service(
        web::resource("/")
            .route(web::get().to(health::status))
            .default_service(wrong_method("GET")),
    )
    .service(
        web::resource("/health")
            .route(web::get().to(health::alive))
            .default_service(wrong_method("GET")),
    )
    .service(
        web::resource("/ready")
            .route(web::get().to(health::ready))
            .default_service(wrong_method("GET")),
    );
    cfg.service(
        web::resource("/openapi.json")
            .route(web::get().to(health::openapi))
            .default_service(wrong_method("GET")),
    );
    // The Stitch Import API v2.
    cfg.service(
        web::resource("/v2/import/status")
            .route(web::get().to(stitch::status))
            .default_service(stitch_wrong_method("GET")),
    );
    for (path, handler) in [
        ("/v2/import/push", StitchHandler::Push),
        ("/v2/import/batch", StitchHandler::Batch),
        ("/v2/import/validate", StitchHandler::Validate),
    ] {
        let route = match handler {
            StitchHandler::Push => web::post().to(stitch::push),
            StitchHandler::Batch => web::post().to(stitch::batch),
            StitchHandler::Validate => web::post().to(stitch::validate),
        };
        cfg.service(
            web::resource(path)
                .route(route)
                .default_service(stitch_wrong_method("POST")),
        );
    }
    for (prefix, sandbox) in [("/v2", false), ("/sandbox/v2", true)] {
        cfg.service(
            web::resource(format!("{prefix}/client/{{cid}}/authenticate"))
                .route(web::get().to(ingest::authenticate))
                .default_service(wrong_method("GET")),
        )
        .service(
            web::resource(format!("{prefix}/client/{{cid}}/table/{{table}}/data"))
                .app_data(web::Data::new(ingest::Sandbox(sandbox)))
                .route(web::post().to(ingest::push))
                .default_service(wrong_method("POST")),
        );
    }
}

enum StitchHandler {
    Push,
    Batch,
    Validate,
}

/// 405 in Stitch's error shape.
fn stitch_wrong_method(allow: &'static str) -> actix_web::Route {
    web::to(move || async move {
        Err::<HttpResponse, _>(stitch::StitchError::from(ApiError::method_not_allowed(
            allow,
        )))
    })
}

pub async fn not_found() -> Result<HttpResponse, ApiError> {
    Err(ApiError::not_found())
}
