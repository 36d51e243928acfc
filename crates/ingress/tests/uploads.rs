//! Resumable uploads (tus 1.0.0) against a real ingress and Redis, driven by the stock PyPI tus
//! client (`tuspy`, installed by `scripts/deps.sh` into `tests/tus/.venv`) and by raw HTTP.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use cairn_redis::BlobStore;
use cairn_testkit::{test_bytes, wait_until};
use common::{Options, Stack, WAIT};
use futures::TryStreamExt as _;
use redis::AsyncCommands as _;
use reqwest::Method;
use serde_json::Value;
use sha2::{Digest as _, Sha256};

const MIB: usize = 1024 * 1024;

fn python() -> PathBuf {
    std::env::var_os("CAIRN_TUS_PYTHON").map_or_else(
        || Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/tus/.venv/bin/python"),
        PathBuf::from,
    )
}

/// Runs `tests/tus/client.py` with `args`; its JSON answer.
async fn tus_client(args: &[&str]) -> Value {
    let python = python();
    assert!(python.exists(), "{} is missing: run scripts/deps.sh (it installs tuspy)", python.display());
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/tus/client.py");
    let output =
        tokio::process::Command::new(&python).arg(&script).args(args).output().await.expect("python runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "client.py {args:?} failed: {}\n{stdout}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("client.py printed {stdout:?}: {e}"))
}

fn upload_id(url: &str) -> String {
    url.rsplit('/').next().expect("an upload URL").to_owned()
}

async fn head(stack: &Stack, id: &str) -> reqwest::Response {
    stack
        .request(Method::HEAD, &format!("/v1/uploads/{id}"))
        .header("tus-resumable", "1.0.0")
        .send()
        .await
        .expect("ingress answers")
}

async fn offset(stack: &Stack, id: &str) -> u64 {
    let response = head(stack, id).await;
    assert_eq!(response.status(), 200, "HEAD {id}");
    response.headers()["upload-offset"].to_str().unwrap().parse().unwrap()
}

/// Bytes the server ever received into the upload (its `received` counter in Redis).
async fn received(stack: &Stack, id: &str) -> u64 {
    let key = stack.ns().key(&format!("upload:{id}"));
    let received: Option<u64> = stack.redis().await.hget(key, "received").await.unwrap();
    received.unwrap_or(0)
}

async fn stored_bytes(stack: &Stack, id: &str) -> Vec<u8> {
    let store = BlobStore::new(
        stack.redis().await,
        &cairn_redis::requests::QueueLayout::new(&stack.ns().prefix, "requests", "processors"),
    );
    let chunks: Vec<bytes::Bytes> =
        store.read(&store.upload_key(id)).try_collect().await.expect("blob reads");
    chunks.concat()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tuspy_uploads_resume_from_the_server_offset_and_checksums_are_enforced() {
    let stack = Stack::start().await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("data.bin");
    let data = test_bytes(5 * MIB, 1);
    std::fs::write(&file, &data).unwrap();
    let file = file.to_str().unwrap();
    let store = dir.path().join("urls.json");
    let store = store.to_str().unwrap();
    let endpoint = format!("{}/v1/uploads", stack.base);

    // Discovery.
    let options = stack.request(Method::OPTIONS, "/v1/uploads").send().await.unwrap();
    assert_eq!(options.status(), 204);
    assert_eq!(options.headers()["tus-version"], "1.0.0");
    let extensions = options.headers()["tus-extension"].to_str().unwrap();
    for extension in ["creation", "creation-with-upload", "termination", "expiration", "checksum"] {
        assert!(extensions.split(',').any(|e| e == extension), "{extension} in {extensions}");
    }
    assert_eq!(options.headers()["tus-max-size"], (64 * MIB).to_string().as_str());
    assert!(options.headers()["tus-checksum-algorithm"].to_str().unwrap().contains("sha256"));

    // 1. The client stops after two 1 MiB chunks (a process that went away between chunks).
    let first = tus_client(&[
        "upload",
        &endpoint,
        file,
        "--chunk-size",
        &MIB.to_string(),
        "--stop-at",
        &(2 * MIB).to_string(),
        "--store",
        store,
    ])
    .await;
    let url = first["url"].as_str().expect("an upload URL").to_owned();
    assert!(url.starts_with(&endpoint), "{url}");
    let id = upload_id(&url);
    assert_eq!(offset(&stack, &id).await, 2 * MIB as u64);
    let response = head(&stack, &id).await;
    assert_eq!(response.headers()["upload-length"], (5 * MIB).to_string().as_str());
    assert_eq!(response.headers()["tus-resumable"], "1.0.0");
    assert!(response.headers()["upload-metadata"].to_str().unwrap().contains("filename ZGF0YS5iaW4="));
    assert!(response.headers().contains_key("upload-expires"));
    let node = stack.get(&format!("/status/_uploads.{id}")).await.json;
    assert_eq!(node["bytes"], 2 * MIB as u64, "{node}");
    assert_eq!(node["total_bytes"], 5 * MIB as u64);
    assert_eq!(node["status"], "running");

    // 2. A PATCH whose connection dies after 1.5 MiB of the announced 3 MiB: what arrived stays.
    let cut = tus_client(&["cut", &url, file, &(2 * MIB).to_string(), &(3 * MIB / 2).to_string()]).await;
    assert_eq!(cut["sent"], 3 * MIB / 2);
    let expected = (2 * MIB + 3 * MIB / 2) as u64;
    wait_until("the cut PATCH's bytes are stored", WAIT, || async { offset(&stack, &id).await == expected })
        .await
        .expect("every byte that arrived is kept");
    assert_eq!(received(&stack, &id).await, expected);

    // 3. A fresh client process resumes (tuspy asks the server's offset with HEAD), with sha256.
    let resumed = tus_client(&["upload", &endpoint, file, "--store", store, "--checksum", "sha256"]).await;
    assert_eq!(resumed["url"], url.as_str(), "the stored upload URL is reused");
    assert_eq!(resumed["offset"], 5 * MIB as u64);
    assert_eq!(offset(&stack, &id).await, 5 * MIB as u64);
    assert_eq!(received(&stack, &id).await, 5 * MIB as u64, "no acknowledged byte was sent twice");
    let stored = stored_bytes(&stack, &id).await;
    assert_eq!(Sha256::digest(&stored), Sha256::digest(&data), "the stored bytes are the file's");
    let node = stack.get(&format!("/status/_uploads.{id}")).await.json;
    assert_eq!(node["bytes"], 5 * MIB as u64, "{node}");
    assert_eq!(node["progress"].as_f64(), Some(1.0), "{node}");
    assert_eq!(node["status"], "finished");

    // 4. A wrong checksum is refused with 460 and its bytes are dropped.
    let other = dir.path().join("other.bin");
    std::fs::write(&other, test_bytes(300_000, 2)).unwrap();
    let refused = tus_client(&["upload", &endpoint, other.to_str().unwrap(), "--checksum", "wrong"]).await;
    assert_eq!(refused["error_status"], 460, "{refused}");
    let refused_id = upload_id(refused["url"].as_str().unwrap());
    assert_eq!(offset(&stack, &refused_id).await, 0);
    let chunks: u64 =
        stack.redis().await.hlen(stack.ns().key(&format!("upload:{refused_id}:c"))).await.unwrap();
    assert_eq!(chunks, 0, "the refused bytes were discarded");
    let sha1 = tus_client(&["upload", &endpoint, other.to_str().unwrap(), "--checksum", "sha1"]).await;
    assert_eq!(sha1["offset"], 300_000, "tuspy's default sha1 checksum is accepted: {sha1}");

    // 5. Termination.
    let deleted = stack
        .request(Method::DELETE, &format!("/v1/uploads/{refused_id}"))
        .header("tus-resumable", "1.0.0")
        .send()
        .await
        .unwrap();
    assert_eq!(deleted.status(), 204);
    assert_eq!(head(&stack, &refused_id).await.status(), 404);
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn protocol_errors_are_answered_as_tus_says() {
    let stack = Stack::start().await;
    let create = |length: &str| {
        stack
            .request(Method::POST, "/v1/uploads")
            .header("tus-resumable", "1.0.0")
            .header("upload-length", length)
    };
    // creation-with-upload: the first bytes come with the POST.
    let response = create("10")
        .header("content-type", "application/offset+octet-stream")
        .body("hello")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 201);
    let location = response.headers()["location"].to_str().unwrap().to_owned();
    assert!(location.starts_with("/v1/uploads/"), "relative Location: {location}");
    assert_eq!(response.headers()["upload-offset"], "5");
    let id = upload_id(&location);

    let patch = |offset: &str, body: &'static str| {
        stack
            .request(Method::PATCH, &location)
            .header("tus-resumable", "1.0.0")
            .header("content-type", "application/offset+octet-stream")
            .header("upload-offset", offset)
            .body(body)
    };
    let conflict = patch("0", "hello").send().await.unwrap();
    assert_eq!(conflict.status(), 409);
    assert_eq!(conflict.headers()["upload-offset"], "5");
    let too_long = patch("5", "world!!").send().await.unwrap();
    assert_eq!(too_long.status(), 413);
    let wrong_type = stack
        .request(Method::PATCH, &location)
        .header("tus-resumable", "1.0.0")
        .header("upload-offset", "5")
        .body("world")
        .send()
        .await
        .unwrap();
    assert_eq!(wrong_type.status(), 415);
    let old = stack.request(Method::HEAD, &location).header("tus-resumable", "0.2.2").send().await.unwrap();
    assert_eq!(old.status(), 412);
    assert_eq!(old.headers()["tus-version"], "1.0.0");
    let sha = base64_sha256(b"world");
    let done = patch("5", "world").header("upload-checksum", format!("sha256 {sha}")).send().await.unwrap();
    assert_eq!(done.status(), 204);
    assert_eq!(done.headers()["upload-offset"], "10");
    let stored = stored_bytes(&stack, &id).await;
    assert_eq!(stored, b"helloworld");

    let too_big = create(&(64 * MIB + 1).to_string()).send().await.unwrap();
    assert_eq!(too_big.status(), 413);
    let no_length =
        stack.request(Method::POST, "/v1/uploads").header("tus-resumable", "1.0.0").send().await.unwrap();
    assert_eq!(no_length.status(), 400);
    let bad_metadata = create("3").header("upload-metadata", "a !!").send().await.unwrap();
    assert_eq!(bad_metadata.status(), 400);
    let unknown = head(&stack, "0190f5c2-7b8e-4c3d-9a2b-123456789abc").await;
    assert_eq!(unknown.status(), 404);
    stack.stop().await;
}

fn base64_sha256(data: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(Sha256::digest(data))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_upload_is_gone_with_its_bytes() {
    let stack = Stack::with(Options::default().arg("--upload-expiry", "2s")).await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("data.bin");
    std::fs::write(&file, test_bytes(600_000, 3)).unwrap();
    let endpoint = format!("{}/v1/uploads", stack.base);
    let partial = tus_client(&[
        "upload",
        &endpoint,
        file.to_str().unwrap(),
        "--chunk-size",
        "300000",
        "--stop-at",
        "300000",
    ])
    .await;
    let id = upload_id(partial["url"].as_str().unwrap());
    let response = head(&stack, &id).await;
    assert_eq!(response.status(), 200);
    let expires = response.headers()["upload-expires"].to_str().unwrap().to_owned();
    let expires = httpdate::parse_http_date(&expires).expect("an HTTP date");
    let left = expires.duration_since(std::time::SystemTime::now()).unwrap_or_default();
    assert!(left <= Duration::from_secs(3), "expires within the configured 2 s: {left:?}");

    wait_until("the upload expires", WAIT, || async { head(&stack, &id).await.status() == 404 })
        .await
        .expect("an expired upload answers 404");
    let mut redis = stack.redis().await;
    let base = stack.ns().key(&format!("upload:{id}"));
    for key in [base.clone(), format!("{base}:c"), format!("{base}:i")] {
        let exists: bool = redis.exists(&key).await.unwrap();
        assert!(!exists, "{key} was deleted with the upload");
    }
    let resumed = tus_client(&["upload", &endpoint, file.to_str().unwrap(), "--stop-at", "600000"]).await;
    assert_ne!(upload_id(resumed["url"].as_str().unwrap()), id, "a new upload, the old one is gone");
    stack.stop().await;
}
