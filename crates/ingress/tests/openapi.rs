//! The API description: `/openapi.json` is OpenAPI 3.1 and needs no token, `/docs` loads nothing
//! from another host, and schemathesis (installed by `scripts/deps.sh` into `.venv-api`) finds
//! no 5xx and no answer that breaks the document in a bounded run against a live ingress.

mod common;

use common::{Options, Stack};
use reqwest::Method;

/// Every `src="…"`/`href="…"`/`url: "…"` target in `text` that names a host.
fn absolute_urls(text: &str) -> Vec<String> {
    let mut found = Vec::new();
    for marker in ["http://", "https://", "//cdn", "\"//"] {
        let mut rest = text;
        while let Some(at) = rest.find(marker) {
            let tail = &rest[at..];
            let end = tail.find(['"', '\'', ' ', ')', '\n']).unwrap_or(tail.len());
            found.push(tail[..end].to_owned());
            rest = &tail[marker.len()..];
        }
    }
    found
}

#[tokio::test]
async fn the_document_and_the_docs_need_no_token_and_no_other_host() {
    let stack = Stack::with(Options::default().shared("--auth-jwt-secret", "openapi-test-secret")).await;
    let doc = stack.get("/openapi.json").await;
    assert_eq!(doc.status, 200);
    assert!(doc.json["openapi"].as_str().unwrap().starts_with("3.1."), "{}", doc.json["openapi"]);
    assert!(doc.json["paths"]["/v1/requests"]["post"].is_object());
    // The API itself still needs one.
    assert_eq!(stack.get("/v1/dead-letters").await.status, 401);

    let html = stack.request(Method::GET, "/docs/").send().await.unwrap();
    assert_eq!(html.status(), 200);
    let html = html.text().await.unwrap();
    assert!(html.contains("swagger"), "{html}");
    assert_eq!(absolute_urls(&html), Vec::<String>::new(), "the page names another host");
    // The page's own scripts and styles, as the browser would fetch them, name no host either
    // (Swagger UI's bundle mentions URLs in strings it never fetches; the initializer is what
    // decides what is loaded).
    let init = stack.request(Method::GET, "/docs/swagger-initializer.js").send().await.unwrap();
    assert_eq!(init.status(), 200);
    let init = init.text().await.unwrap();
    assert!(init.contains("/openapi.json"), "{init}");
    assert!(
        init.contains("\"validatorUrl\": \"none\"") || init.contains("\"validatorUrl\":\"none\""),
        "{init}"
    );
    assert_eq!(absolute_urls(&init), Vec::<String>::new(), "{init}");
    for asset in ["swagger-ui.css", "swagger-ui-bundle.js", "swagger-ui-standalone-preset.js"] {
        let response = stack.request(Method::GET, &format!("/docs/{asset}")).send().await.unwrap();
        assert_eq!(response.status(), 200, "{asset} is served from the binary");
    }
}

/// Runs schemathesis against a live ingress (auth off, so generated calls reach the handlers)
/// for a small number of examples per operation. Needs `scripts/deps.sh` (the `.venv-api`).
#[tokio::test]
async fn schemathesis_finds_no_server_error_and_no_nonconforming_answer() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let schemathesis = root.join(".venv-api/bin/schemathesis");
    assert!(schemathesis.exists(), "run scripts/deps.sh to install schemathesis into .venv-api");
    let stack = Stack::with(Options::with_processor()).await;
    let output = tokio::process::Command::new("timeout")
        .arg("120")
        .arg(&schemathesis)
        .args([
            "run",
            &format!("{}/openapi.json", stack.base),
            "--checks",
            "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance",
            "--max-examples",
            "15",
            "--exclude-path",
            "/status/{key}/events",
            "--request-timeout",
            "20",
            "--no-color",
        ])
        // Its cache goes to the working directory: not the crate's.
        .current_dir(std::env::temp_dir())
        .kill_on_drop(true)
        .output()
        .await
        .expect("schemathesis runs");
    let report = String::from_utf8_lossy(&output.stdout);
    eprintln!("{report}");
    assert!(report.contains("Test cases:"), "no summary: {report}");
    assert!(
        output.status.success(),
        "schemathesis failed ({:?}):\n{report}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
}
