//! The optional bearer token: one check in front of every route but `/healthz`.

use axum::extract::{Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::App;
use super::openai::error_body;

/// Accepts `Authorization: Bearer <token>`, or `?token=<token>` on the status page and
/// `/status` (a browser cannot add a header to the page it opens).
pub(super) async fn require_token(
    State(app): State<App>,
    request: Request,
    next: Next,
) -> Response {
    let Some(expected) = app.token.as_deref() else {
        return next.run(request).await;
    };
    let from_header = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    let path = request.uri().path();
    let from_query = (path == "/" || path == "/status")
        .then(|| request.uri().query())
        .flatten()
        .and_then(|q| q.split('&').find_map(|kv| kv.strip_prefix("token=")));
    let offered = from_header.or(from_query).unwrap_or("");
    if constant_time_eq(offered.as_bytes(), expected.as_bytes()) {
        return next.run(request).await;
    }
    let mut response = error_body(
        StatusCode::UNAUTHORIZED,
        "unauthorized",
        "authentication_error",
        "missing or wrong bearer token: send Authorization: Bearer <token> (the value of the \
         daemon's [server] auth_token_env variable)",
    );
    response.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        header::HeaderValue::from_static("Bearer"),
    );
    response.into_response()
}

/// Compares without an early exit, so the time taken says nothing about where they differ.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let mut diff = a.len() ^ b.len();
    for i in 0..a.len().max(b.len()) {
        let x = a.get(i).copied().unwrap_or(0);
        let y = b.get(i).copied().unwrap_or(0);
        diff |= usize::from(x ^ y);
    }
    diff == 0
}

#[cfg(test)]
mod tests {
    use super::constant_time_eq;

    #[test]
    fn equal_only_when_equal() {
        assert!(constant_time_eq(b"secret", b"secret"));
        assert!(!constant_time_eq(b"secret", b"secreT"));
        assert!(!constant_time_eq(b"secret", b"secret2"));
        assert!(!constant_time_eq(b"", b"secret"));
        assert!(constant_time_eq(b"", b""));
    }
}
