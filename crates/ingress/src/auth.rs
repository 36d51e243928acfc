//! Who is calling, and how often: the bearer-token check in front of every API route, and the
//! per-client rate limit behind it.
//!
//! The token comes from `Authorization: Bearer …`; SSE (`/status/{key}/events`), `/ws` and
//! `POST /status/{key}` also take `?access_token=` (an `EventSource` or a browser WebSocket cannot
//! set headers, and `curl -d … "$CAIRN_PROGRESS_URL"` carries it in the URL). Probes, the UI's
//! pages and assets, `/openapi.json` and `/docs` need none; socket.io checks its own at connect
//! (see `live::socketio`). A verified [`Caller`] is put in the request's extensions for the
//! handlers, which check the scope of what they touch; with auth off every caller is open.

use std::net::{IpAddr, SocketAddr};
use std::num::NonZeroU32;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use axum::extract::{ConnectInfo, FromRequestParts, Query, Request, State};
use axum::http::request::Parts;
use axum::http::{Method, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use cairn_auth::{AuthError, Grant, Verifier};
use governor::clock::{Clock as _, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use serde::Deserialize;

use crate::error::ApiError;

/// The caller of one request: its grant, and its raw token to forward to the aggregator.
#[derive(Clone, Debug)]
pub(crate) struct Caller {
    pub(crate) grant: Grant,
    pub(crate) token: Option<Arc<str>>,
}

impl Caller {
    pub(crate) fn open() -> Caller {
        Caller { grant: Grant::open(), token: None }
    }
}

/// Handlers take the caller the middleware verified. A route outside the middleware has no
/// caller, and is refused rather than served open.
impl<S: Send + Sync> FromRequestParts<S> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, ApiError> {
        parts.extensions.get::<Caller>().cloned().ok_or_else(|| {
            tracing::error!(path = parts.uri.path(), "route reached without the auth middleware");
            ApiError::internal()
        })
    }
}

/// The per-client limit: `rate` requests a second, bursts up to `burst`.
#[derive(Debug, Clone, Copy)]
pub struct RateLimit {
    pub rate: NonZeroU32,
    pub burst: NonZeroU32,
}

/// State of the auth middleware.
#[derive(Clone)]
pub(crate) struct Gate {
    verifier: Option<Verifier>,
    limiter: Option<Arc<DefaultKeyedRateLimiter<String>>>,
    checks: Arc<AtomicU64>,
    allowed_origins: Arc<Vec<String>>,
}

impl Gate {
    pub(crate) fn new(
        verifier: Option<Verifier>,
        rate: Option<RateLimit>,
        allowed_origins: Vec<String>,
    ) -> Gate {
        let limiter =
            rate.map(|r| Arc::new(RateLimiter::keyed(Quota::per_second(r.rate).allow_burst(r.burst))));
        Gate { verifier, limiter, checks: Arc::default(), allowed_origins: Arc::new(allowed_origins) }
    }

    pub(crate) fn verifier(&self) -> Option<&Verifier> {
        self.verifier.as_ref()
    }

    /// `Err` with the seconds to wait when `client` is over its rate.
    fn admit(&self, client: &str) -> Result<(), u64> {
        let Some(limiter) = &self.limiter else { return Ok(()) };
        // Forget idle clients now and then, so the table stays as large as the active set.
        if self.checks.fetch_add(1, Ordering::Relaxed) % 4096 == 4095 {
            limiter.retain_recent();
        }
        limiter.check_key(&client.to_owned()).map_err(|not_until| {
            let wait = not_until.wait_time_from(DefaultClock::default().now());
            wait.as_secs() + u64::from(wait.subsec_nanos() > 0)
        })
    }
}

/// Paths anyone may fetch: probes, the UI shell and its assets, the API description.
/// socket.io authenticates at connect, where its `auth` payload is.
fn is_public(path: &str) -> bool {
    matches!(path, "/" | "/healthz" | "/readyz" | "/openapi.json" | "/trees" | "/requests" | "/dead-letters")
        || path.starts_with("/docs")
        || path.starts_with("/ui/")
        || path.starts_with("/trees/")
        || path.starts_with("/requests/")
        || path.starts_with("/dead-letters/")
        || path.starts_with("/socket.io")
}

/// Routes that also take `?access_token=`.
fn takes_query_token(method: &Method, path: &str) -> bool {
    path == "/ws" || (path.starts_with("/status/") && (path.ends_with("/events") || method == Method::POST))
}

#[derive(Deserialize)]
struct TokenQuery {
    access_token: Option<String>,
}

/// The request's token: the `Authorization` header, else `?access_token=` where allowed.
fn token_of(request: &Request) -> Result<Option<String>, AuthError> {
    if let Some(value) = request.headers().get(header::AUTHORIZATION) {
        let value = value.to_str().map_err(|_| AuthError::Invalid("Authorization is not ASCII".into()))?;
        let token = cairn_auth::bearer(value)
            .ok_or_else(|| AuthError::Invalid("Authorization is not `Bearer <token>`".into()))?;
        return Ok(Some(token.to_owned()));
    }
    if takes_query_token(request.method(), request.uri().path())
        && let Ok(Query(TokenQuery { access_token: Some(token) })) =
            Query::<TokenQuery>::try_from_uri(request.uri())
    {
        return Ok(Some(token));
    }
    Ok(None)
}

fn peer(request: &Request) -> Option<IpAddr> {
    request.extensions().get::<ConnectInfo<SocketAddr>>().map(|ConnectInfo(addr)| addr.ip())
}

/// Verifies the caller (401 when a token is needed and missing or bad), then rate-limits it
/// (429), keyed by the token's subject with auth on, else by the peer address.
pub(crate) async fn authenticate(State(gate): State<Gate>, mut request: Request, next: Next) -> Response {
    // A browser's cross-site call that changes something is refused unless its origin is listed;
    // reads stay open to any page (they carry no cookie, and the token is the caller's own).
    if request.method() != Method::GET
        && request.method() != Method::HEAD
        && let Err(error) = crate::live::check_origin(request.headers(), &gate.allowed_origins)
    {
        return error.into_response();
    }
    let path = request.uri().path();
    let caller = match &gate.verifier {
        None => Caller::open(),
        Some(_) if is_public(path) => Caller::open(),
        Some(verifier) => {
            let checked = token_of(&request).and_then(|token| {
                let token = token.ok_or(AuthError::Missing)?;
                let grant = verifier.verify(&token)?;
                Ok(Caller { grant, token: Some(token.into()) })
            });
            match checked {
                Ok(caller) => caller,
                Err(error) => return ApiError::from(error).into_response(),
            }
        }
    };
    if path == "/healthz" || path == "/readyz" {
        return next.run(request).await;
    }
    let client = match (&caller.grant.subject, peer(&request)) {
        (Some(subject), _) => format!("sub:{subject}"),
        (None, Some(ip)) => format!("ip:{ip}"),
        (None, None) => "unknown".to_owned(),
    };
    if let Err(secs) = gate.admit(&client) {
        return ApiError::rate_limited(secs.max(1)).into_response();
    }
    request.extensions_mut().insert(caller);
    next.run(request).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn public_paths_and_query_tokens() {
        for p in [
            "/",
            "/healthz",
            "/readyz",
            "/openapi.json",
            "/docs",
            "/docs/x.js",
            "/ui/1/app.js",
            "/trees/a.b",
            "/requests/x",
            "/socket.io/",
        ] {
            assert!(is_public(p), "{p}");
        }
        for p in ["/status/a", "/v1/requests", "/v1/dead-letters", "/ws", "/v1/trees", "/health"] {
            assert!(!is_public(p), "{p}");
        }
        assert!(takes_query_token(&Method::GET, "/status/a/events"));
        assert!(takes_query_token(&Method::POST, "/status/a"));
        assert!(takes_query_token(&Method::GET, "/ws"));
        assert!(!takes_query_token(&Method::GET, "/status/a"));
        assert!(!takes_query_token(&Method::DELETE, "/status/a"));
        assert!(!takes_query_token(&Method::GET, "/v1/requests"));
    }

    #[test]
    fn the_rate_limit_admits_a_burst_then_names_the_wait() {
        let gate = Gate::new(
            None,
            Some(RateLimit { rate: NonZeroU32::MIN, burst: NonZeroU32::new(2).unwrap() }),
            Vec::new(),
        );
        assert!(gate.admit("a").is_ok());
        assert!(gate.admit("a").is_ok());
        assert_eq!(gate.admit("a"), Err(1));
        assert!(gate.admit("b").is_ok(), "clients are limited apart");
        assert!(Gate::new(None, None, Vec::new()).admit("a").is_ok());
    }
}
