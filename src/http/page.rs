//! The live status page: one self-contained HTML file (no external assets, no build step)
//! that polls `/status` and draws each host as a lane.

use axum::http::header;
use axum::response::IntoResponse;

const PAGE: &str = include_str!("status.html");

pub(super) async fn status_page() -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        PAGE,
    )
}
