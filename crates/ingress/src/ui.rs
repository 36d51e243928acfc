//! The web UI (docs/contract.md §6), served from files compiled into the binary (`crates/ingress/ui/`, see
//! its README): `cargo build` alone produces it and nothing is fetched at run time.
//!
//! Pages live at `/`, `/trees/…`, `/requests/…` and `/dead-letters…`; each answers the same
//! `index.html`, whose scripts route by URL, so every view is a deep link. Assets live under
//! `/ui/{version}/…`, where the version is a digest of every embedded file: they are cached for a
//! year (`immutable`), and a new build changes the URL. Pages are revalidated on every load
//! (`no-cache` with an `ETag`). The UI's own routes never shadow the API's (`/status`, `/v1`,
//! `/healthz`, `/readyz`, `/ws`, `/socket.io`, `/docs`, `/openapi.json` stay theirs), and a
//! Content-Security-Policy keeps the page from loading or connecting to anything but this origin.

use std::sync::LazyLock;

use axum::Router;
use axum::extract::Path;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use rust_embed::Embed;

use cairn_error::ErrorKind;

use crate::error::ApiError;

#[derive(Embed)]
#[folder = "ui/"]
#[exclude = "README.md"]
struct Assets;

/// Replaced in `index.html` by the assets' version, so its links name the current build.
const VERSION_MARK: &str = "{{version}}";

const CSP: &str = "default-src 'self'; connect-src 'self'; img-src 'self' data:; style-src 'self'; \
                   script-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'";

/// A digest of every embedded file (FNV-1a over their SHA-256 hashes), as 16 hex digits.
static VERSION: LazyLock<String> = LazyLock::new(|| {
    let mut names: Vec<_> = Assets::iter().collect();
    names.sort();
    let mut digest: u64 = 0xcbf2_9ce4_8422_2325;
    for name in names {
        let hash = Assets::get(&name).map(|file| file.metadata.sha256_hash()).unwrap_or_default();
        for byte in name.as_bytes().iter().chain(&hash) {
            digest = (digest ^ u64::from(*byte)).wrapping_mul(0x0100_0000_01b3);
        }
    }
    format!("{digest:016x}")
});

/// `index.html` with its asset links pointing at this build.
static INDEX: LazyLock<String> = LazyLock::new(|| {
    let page = Assets::get("index.html").expect("ui/index.html is embedded");
    String::from_utf8_lossy(&page.data).replace(VERSION_MARK, &VERSION)
});

pub(crate) fn router() -> Router {
    Router::new()
        .route("/", get(page))
        .route("/trees", get(page))
        .route("/trees/{*rest}", get(page))
        .route("/requests", get(page))
        .route("/requests/{*rest}", get(page))
        .route("/dead-letters", get(page))
        .route("/dead-letters/{*rest}", get(page))
        .route("/ui/{version}/{*path}", get(asset))
}

/// Any page of the UI: `index.html`, revalidated on each load.
async fn page(headers: HeaderMap) -> Response {
    let etag = format!("\"{}\"", *VERSION);
    if not_modified(&headers, &etag) {
        return (StatusCode::NOT_MODIFIED, page_headers(&etag)).into_response();
    }
    (page_headers(&etag), INDEX.as_str()).into_response()
}

fn page_headers(etag: &str) -> [(header::HeaderName, HeaderValue); 6] {
    [
        (header::CONTENT_TYPE, HeaderValue::from_static("text/html; charset=utf-8")),
        (header::CACHE_CONTROL, HeaderValue::from_static("no-cache")),
        (header::ETAG, HeaderValue::from_str(etag).expect("hex etag")),
        (header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(CSP)),
        (header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff")),
        (header::REFERRER_POLICY, HeaderValue::from_static("no-referrer")),
    ]
}

/// `/ui/{version}/{path}`: an embedded file. Under the current version it is immutable; under
/// another (a page loaded before an upgrade) it is served as it is now, revalidated each time.
async fn asset(Path((version, path)): Path<(String, String)>, headers: HeaderMap) -> Response {
    let Some(file) = Assets::get(&path).filter(|_| path != "index.html") else {
        return ApiError::new(ErrorKind::NotFound, format!("no UI asset {path:?}")).into_response();
    };
    let etag = format!("\"{}\"", hex(&file.metadata.sha256_hash()[..8]));
    let cache = if version == *VERSION { "public, max-age=31536000, immutable" } else { "no-cache" };
    let headers_out = [
        (header::CONTENT_TYPE, HeaderValue::from_static(mime_type(&path))),
        (header::CACHE_CONTROL, HeaderValue::from_static(cache)),
        (header::ETAG, HeaderValue::from_str(&etag).expect("hex etag")),
        (header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff")),
    ];
    if not_modified(&headers, &etag) {
        return (StatusCode::NOT_MODIFIED, headers_out).into_response();
    }
    (headers_out, file.data.into_owned()).into_response()
}

/// Whether the client's `If-None-Match` names `etag` (or `*`).
fn not_modified(headers: &HeaderMap, etag: &str) -> bool {
    headers
        .get_all(header::IF_NONE_MATCH)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .map(|tag| tag.trim().trim_start_matches("W/"))
        .any(|tag| tag == etag || tag == "*")
}

fn mime_type(path: &str) -> &'static str {
    match path.rsplit_once('.').map_or("", |(_, ext)| ext) {
        "html" => "text/html; charset=utf-8",
        "js" | "mjs" => "text/javascript; charset=utf-8",
        "css" => "text/css; charset=utf-8",
        "svg" => "image/svg+xml",
        "png" => "image/png",
        "ico" => "image/x-icon",
        "json" | "webmanifest" => "application/json",
        "txt" => "text/plain; charset=utf-8",
        "woff2" => "font/woff2",
        _ => "application/octet-stream",
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn index_links_name_this_build() {
        assert!(!INDEX.contains(VERSION_MARK));
        assert!(INDEX.contains(&format!("/ui/{}/app.js", *VERSION)), "{}", *INDEX);
        assert_eq!(VERSION.len(), 16);
    }

    #[test]
    fn every_asset_has_a_known_type() {
        for name in Assets::iter() {
            assert_ne!(mime_type(&name), "application/octet-stream", "{name}");
        }
        assert_eq!(mime_type("a/b.js"), "text/javascript; charset=utf-8");
        assert_eq!(mime_type("noext"), "application/octet-stream");
    }

    #[test]
    fn etags_are_matched_as_rfc_9110_says() {
        let with = |value: &str| {
            let mut headers = HeaderMap::new();
            headers.insert(header::IF_NONE_MATCH, HeaderValue::from_str(value).unwrap());
            headers
        };
        assert!(not_modified(&with("\"ab\""), "\"ab\""));
        assert!(not_modified(&with("\"x\", W/\"ab\""), "\"ab\""));
        assert!(not_modified(&with("*"), "\"ab\""));
        assert!(!not_modified(&with("\"abc\""), "\"ab\""));
        assert!(!not_modified(&HeaderMap::new(), "\"ab\""));
    }
}
