//! The API description: an OpenAPI 3.1 document generated from the handlers' annotations, served
//! at `/openapi.json`, and Swagger UI at `/docs` with its assets compiled into the binary (its
//! validator badge, the one thing that would call another host, is off). Neither needs a token.

use axum::Router;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};
use utoipa_swagger_ui::{Config, SwaggerUi};

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Cairn ingress",
        description = "Progress trees (SCA-compatible), live updates and the request queue. With auth on, \
                       every call needs `Authorization: Bearer <JWT>`; see the README's Auth section."
    ),
    paths(
        crate::progress_api::read,
        crate::progress_api::update,
        crate::progress_api::remove,
        crate::progress_api::health,
        crate::live::sse::events,
        crate::requests_api::submit,
        crate::requests_api::read,
        crate::requests_api::cancel,
        crate::requests_api::dead_letters,
        crate::requests_api::dead_letter,
        crate::requests_api::retry,
        crate::browse_api::trees,
        crate::browse_api::requests,
        crate::browse_api::payload,
    ),
    modifiers(&Bearer),
    security(("bearer" = []))
)]
pub struct ApiDoc;

struct Bearer;

impl Modify for Bearer {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        let scheme = HttpBuilder::new().scheme(HttpAuthScheme::Bearer).bearer_format("JWT").build();
        components.add_security_scheme("bearer", SecurityScheme::Http(scheme));
    }
}

/// `/openapi.json` and `/docs`.
pub(crate) fn router() -> Router {
    let config = Config::new(["/openapi.json"]).validator_url("none");
    Router::from(SwaggerUi::new("/docs").url("/openapi.json", ApiDoc::openapi()).config(config))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_document_is_openapi_3_1_with_every_route() {
        let doc = serde_json::to_value(ApiDoc::openapi()).unwrap();
        assert!(doc["openapi"].as_str().unwrap().starts_with("3.1"), "{}", doc["openapi"]);
        let paths = doc["paths"].as_object().unwrap();
        for path in
            ["/status/{key}", "/status/{key}/events", "/v1/requests", "/v1/requests/{id}", "/v1/dead-letters"]
        {
            assert!(paths.contains_key(path), "{path}");
        }
        assert_eq!(doc["components"]["securitySchemes"]["bearer"]["scheme"], "bearer");
    }
}
