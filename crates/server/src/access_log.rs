//! One log line per request, with a request id that is also returned as `X-Request-Id`.
//! API keys never reach the log: the `apikey` query parameter and anything shaped like a key
//! are replaced by `[redacted]` before the path is printed.

use std::time::Instant;

use actix_web::Error;
use actix_web::body::MessageBody;
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::http::header::{HeaderName, HeaderValue};
use actix_web::middleware::Next;
use intake_core::keys::KEY_PREFIX;

/// Records accepted by a request, set by handlers for the access log.
#[derive(Clone, Copy)]
pub struct RecordCount(pub usize);

pub async fn access_log(
    req: ServiceRequest,
    next: Next<impl MessageBody>,
) -> Result<ServiceResponse<impl MessageBody>, Error> {
    let started = Instant::now();
    let request_id = new_request_id();
    let method = req.method().to_string();
    let path = redact(&req.uri().to_string());
    let mut response = next.call(req).await?;
    let records = response
        .response()
        .extensions()
        .get::<RecordCount>()
        .map_or(0, |c| c.0);
    if let Ok(value) = HeaderValue::from_str(&request_id) {
        response
            .headers_mut()
            .insert(HeaderName::from_static("x-request-id"), value);
    }
    log::info!(
        target: "intake::access",
        "request_id={request_id} method={method} path={path} status={} latency_ms={:.2} records={records}",
        response.status().as_u16(),
        started.elapsed().as_secs_f64() * 1000.0
    );
    Ok(response)
}

fn new_request_id() -> String {
    format!("{:016x}", rand::random::<u64>())
}

/// Replaces API keys in a request target: the value of any `apikey` query parameter, and any
/// `intake_...` token wherever it appears (a key pasted into the wrong place).
pub fn redact(target: &str) -> String {
    let (path, query) = match target.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (target, None),
    };
    let mut out = redact_tokens(path);
    if let Some(query) = query {
        out.push('?');
        let parts: Vec<String> = query
            .split('&')
            .map(|pair| match pair.split_once('=') {
                Some((name, _)) if name.eq_ignore_ascii_case("apikey") => {
                    format!("{name}=[redacted]")
                }
                _ => redact_tokens(pair),
            })
            .collect();
        out.push_str(&parts.join("&"));
    }
    out
}

/// Decodes `%XX` escapes and `+` (as query strings are read), lossily for invalid UTF-8.
fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => match (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                (Some(hi), Some(lo)) => {
                    out.push(hi * 16 + lo);
                    i += 3;
                    continue;
                }
                _ => out.push(b'%'),
            },
            b'+' => out.push(b' '),
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn hex(b: u8) -> Option<u8> {
    (b as char).to_digit(16).map(|d| d as u8)
}

fn redact_tokens(text: &str) -> String {
    let decoded = percent_decode(text);
    let text = if decoded.contains(&format!("{KEY_PREFIX}_")) {
        decoded.as_str()
    } else {
        text
    };
    let needle = format!("{KEY_PREFIX}_");
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(pos) = rest.find(&needle) {
        out.push_str(&rest[..pos]);
        let after = &rest[pos..];
        let end = after
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == '%'))
            .unwrap_or(after.len());
        out.push_str("[redacted]");
        rest = &after[end..];
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::redact;

    #[test]
    fn keys_are_redacted_wherever_they_appear() {
        let key = "intake_abcdefghijkl_ABCDEFGHIJKLMNOPQRSTUVWXYZ012345";
        assert_eq!(
            redact(&format!("/v2/client/1/authenticate?apikey={key}")),
            "/v2/client/1/authenticate?apikey=[redacted]"
        );
        assert_eq!(
            redact("/x?a=1&APIKEY=whatever&b=2"),
            "/x?a=1&APIKEY=[redacted]&b=2"
        );
        assert_eq!(
            redact(&format!("/v2/client/{key}/x?token={key}")),
            "/v2/client/[redacted]/x?token=[redacted]"
        );
        assert_eq!(
            redact("/v2/client/1/table/t/data"),
            "/v2/client/1/table/t/data"
        );
    }
}
