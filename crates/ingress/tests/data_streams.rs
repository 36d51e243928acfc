//! Data streams of requests through the real stack (ingress, aggregator, processor in-process;
//! Redis and RabbitMQ real): multipart submissions, uploads named by a submission, limits,
//! idempotency, what handlers receive and the byte progress of every stream.

mod common;

use std::collections::BTreeMap;

use cairn_testkit::{hex, sha256_hex, test_bytes, wait_until};
use common::{Options, Stack, WAIT, handlers_file};
use futures::FutureExt as _;
use futures::future::BoxFuture;
use redis::AsyncCommands as _;
use request_processor::handlers::Echo;
use request_processor::{Context, Handler, HandlerError, HandlerSet};
use reqwest::Method;
use reqwest::multipart::{Form, Part};
use serde_json::{Value, json};
use sha2::{Digest as _, Sha256};
use tokio::io::AsyncReadExt as _;

/// Reads every stream through `ctx.streams.open` and answers each one's size and SHA-256.
struct Sha;

impl Handler for Sha {
    fn handle<'a>(&'a self, ctx: &'a Context) -> BoxFuture<'a, Result<Value, HandlerError>> {
        async move {
            let mut out = BTreeMap::new();
            for stream in ctx.streams.list() {
                let mut reader = ctx.streams.open(&stream.name).expect("a listed stream opens");
                let mut hasher = Sha256::new();
                let mut buffer = vec![0u8; 64 * 1024];
                let mut bytes = 0u64;
                loop {
                    let n =
                        reader.read(&mut buffer).await.map_err(|e| HandlerError::Retryable(e.to_string()))?;
                    if n == 0 {
                        break;
                    }
                    bytes += n as u64;
                    hasher.update(&buffer[..n]);
                }
                out.insert(stream.name.clone(), json!({"bytes": bytes, "sha256": hex(&hasher.finalize())}));
            }
            Ok(json!(out))
        }
        .boxed()
    }
}

async fn stack(extra: &[(&str, &str)]) -> (Stack, tempfile::TempDir) {
    stack_with(Options::default(), extra).await
}

/// [`stack`] with `options` (on a Redis Cluster, say).
async fn stack_with(options: Options, extra: &[(&str, &str)]) -> (Stack, tempfile::TempDir) {
    let (dir, handlers) = handlers_file(&["echo", "sha"]);
    let processor = HandlerSet::new().with("echo", Echo).with("sha", Sha);
    let mut options = options.handlers(processor).arg("--handlers", &handlers);
    for (flag, value) in extra {
        options = options.arg(flag, value);
    }
    (Stack::with(options).await, dir)
}

fn multipart(submission: &Value, files: &[(&str, Vec<u8>)]) -> Form {
    let mut form =
        Form::new().part("request", Part::text(submission.to_string()).mime_str("application/json").unwrap());
    for (name, data) in files {
        form = form.part(name.to_string(), Part::bytes(data.clone()).file_name(name.to_string()));
    }
    form
}

async fn submit_multipart(stack: &Stack, form: Form, wait: Option<u64>) -> common::Reply {
    let mut request = stack.request(Method::POST, "/v1/requests").multipart(form);
    if let Some(wait) = wait {
        request = request.header("prefer", format!("wait={wait}"));
    }
    stack.send(request).await
}

/// Waits until the stream node shows the whole stream handed over; returns it.
async fn whole_stream_node(stack: &Stack, key: &str, bytes: u64) -> Value {
    let path = format!("/status/{key}");
    let last = std::sync::Mutex::new(Value::Null);
    let done = wait_until("the stream node shows every byte", WAIT, || async {
        let node = stack.get(&path).await.json;
        let whole =
            node["bytes"] == bytes && node["total_bytes"] == bytes && node["progress"].as_f64() == Some(1.0);
        *last.lock().unwrap() = node;
        whole
    })
    .await;
    let node = last.into_inner().unwrap();
    assert!(done.is_ok(), "{key}: {node}");
    node
}

/// Keys of request data streams left in the stack's Redis.
async fn stream_keys(stack: &Stack) -> Vec<String> {
    let pattern = stack.ns().key("req:*:s:*");
    let mut redis = stack.redis().await;
    let keys: Vec<String> = redis.keys(pattern).await.unwrap();
    keys
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multipart_streams_reach_the_handler_whole_and_show_their_bytes() {
    let (stack, _dir) = stack(&[]).await;
    let image = test_bytes(3 * 1024 * 1024 + 17, 7);
    let notes = b"ten bytes!".to_vec();
    let form = multipart(
        &json!({"handler": "sha", "payload": {"x": 1}}),
        &[("image", image.clone()), ("notes", notes.clone())],
    );
    let reply = submit_multipart(&stack, form, Some(30)).await;
    assert_eq!(reply.status, 200, "{}", reply.json);
    assert_eq!(reply.json["state"], "succeeded", "{}", reply.json);
    let result = &reply.json["result"];
    assert_eq!(result["image"]["sha256"], sha256_hex(&image), "the handler read identical bytes");
    assert_eq!(result["image"]["bytes"], image.len() as u64);
    assert_eq!(result["notes"]["sha256"], sha256_hex(&notes));
    assert_eq!(
        reply.json["streams"],
        json!([{"name": "image", "bytes": image.len()}, {"name": "notes", "bytes": 10}]),
        "the request lists its streams"
    );
    let key = reply.json["progress_key"].as_str().unwrap();
    let node = whole_stream_node(&stack, &format!("{key}.streams.image"), image.len() as u64).await;
    assert_eq!(node["weight"], 1.0, "{node}");
    whole_stream_node(&stack, &format!("{key}.streams.notes"), 10).await;

    // echo never reads its streams: they are drained, and show whole all the same.
    let form = multipart(&json!({"handler": "echo", "payload": 1}), &[("data", test_bytes(700_000, 3))]);
    let reply = submit_multipart(&stack, form, Some(30)).await;
    assert_eq!(reply.json["state"], "succeeded", "{}", reply.json);
    let key = reply.json["progress_key"].as_str().unwrap();
    whole_stream_node(&stack, &format!("{key}.streams.data"), 700_000).await;
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_over_its_limit_is_refused_naming_it_and_leaves_nothing() {
    let (stack, _dir) =
        stack(&[("--max-stream-bytes", "1048576"), ("--max-request-stream-bytes", "1572864")]).await;
    let form = multipart(
        &json!({"handler": "echo"}),
        &[("small", test_bytes(1000, 1)), ("big", test_bytes(2 * 1024 * 1024, 2))],
    );
    let reply = submit_multipart(&stack, form, None).await;
    assert_eq!(reply.status, 413, "{}", reply.json);
    assert!(reply.error().contains("\"big\""), "names the stream: {}", reply.error());
    assert!(reply.error().contains("1048576"), "names the limit: {}", reply.error());

    let form = multipart(
        &json!({"handler": "echo"}),
        &[("one", test_bytes(1_000_000, 1)), ("two", test_bytes(1_000_000, 2))],
    );
    let reply = submit_multipart(&stack, form, None).await;
    assert_eq!(reply.status, 413, "{}", reply.json);
    assert!(reply.error().contains("\"two\"") && reply.error().contains("in all"), "{}", reply.error());
    assert!(stream_keys(&stack).await.is_empty(), "refused streams are removed");

    let bad = multipart(&json!({"handler": "echo"}), &[("a.b", b"x".to_vec())]);
    let reply = submit_multipart(&stack, bad, None).await;
    assert_eq!(reply.status, 400);
    assert!(reply.error().contains("a.b"), "{}", reply.error());
    let form = Form::new().part("data", Part::bytes(b"x".to_vec()));
    let reply = submit_multipart(&stack, form, None).await;
    assert_eq!(reply.status, 400);
    assert!(reply.error().contains("\"request\""), "{}", reply.error());
    stack.stop().await;
}

/// Creates a finished upload of `data` (tus creation-with-upload); its id.
async fn upload(stack: &Stack, data: &[u8]) -> String {
    let response = stack
        .request(Method::POST, "/v1/uploads")
        .header("tus-resumable", "1.0.0")
        .header("upload-length", data.len().to_string())
        .header("content-type", "application/offset+octet-stream")
        .body(data.to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 201);
    assert_eq!(response.headers()["upload-offset"], data.len().to_string().as_str());
    response.headers()["location"].to_str().unwrap().rsplit('/').next().unwrap().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finished_uploads_become_streams_and_a_repeat_finds_its_request() {
    let (stack, _dir) = stack(&[]).await;
    let data = test_bytes(1_300_000, 11);
    let id = upload(&stack, &data).await;
    let submission =
        json!({"handler": "sha", "payload": null, "streams": {"data": id}, "idempotency_key": "up-1"});
    let reply = stack.submit(&submission, Some(30)).await;
    assert_eq!(reply.status, 200, "{}", reply.json);
    assert_eq!(reply.json["result"]["data"]["sha256"], sha256_hex(&data));
    let request = reply.json["id"].as_str().unwrap().to_owned();
    let head = stack
        .request(Method::HEAD, &format!("/v1/uploads/{id}"))
        .header("tus-resumable", "1.0.0")
        .send()
        .await
        .unwrap();
    assert_eq!(head.status(), 404, "the request took the upload");
    let key = reply.json["progress_key"].as_str().unwrap();
    whole_stream_node(&stack, &format!("{key}.streams.data"), data.len() as u64).await;

    // The same submission again: the upload is gone, the first request is the answer.
    let again = stack.submit(&submission, None).await;
    assert_eq!(again.status, 200, "{}", again.json);
    assert_eq!(again.json["id"], request.as_str());

    // An upload that does not exist, or is not finished.
    let missing = json!({"handler": "sha", "streams": {"data": id}});
    let reply = stack.submit(&missing, None).await;
    assert_eq!(reply.status, 400, "{}", reply.json);
    assert!(reply.error().contains("\"data\"") && reply.error().contains(&id), "{}", reply.error());
    let partial = stack
        .request(Method::POST, "/v1/uploads")
        .header("tus-resumable", "1.0.0")
        .header("upload-length", "10")
        .send()
        .await
        .unwrap();
    let partial = partial.headers()["location"].to_str().unwrap().rsplit('/').next().unwrap().to_owned();
    let reply = stack.submit(&json!({"handler": "sha", "streams": {"half": partial}}), None).await;
    assert_eq!(reply.status, 409, "{}", reply.json);
    assert!(reply.error().contains("\"half\"") && reply.error().contains("0 of 10"), "{}", reply.error());
    stack.stop().await;
}

/// Whether upload `id` is gone (HEAD answers 404).
async fn upload_gone(stack: &Stack, id: &str) -> bool {
    let head = stack
        .request(Method::HEAD, &format!("/v1/uploads/{id}"))
        .header("tus-resumable", "1.0.0")
        .send()
        .await
        .unwrap();
    head.status() == 404
}

/// Idempotency keys `{prefix}-{n}` that fall in another partition than upload `upload`, so a
/// request they place must copy it.
fn keys_outside<'a>(
    layout: &'a cairn_redis::requests::QueueLayout,
    upload: &'a str,
    prefix: &'a str,
) -> impl Iterator<Item = String> + 'a {
    (0..)
        .map(move |n| format!("{prefix}-{n}"))
        .filter(move |key| layout.partition_of(key) != layout.partition_of(upload))
}

/// On a Redis Cluster (three partitions, one slot each) an upload becomes a data stream whatever
/// its partition: a request with no idempotency key is put in its first upload's partition and
/// takes that upload over in its submission's step; an upload of another partition (a second
/// one, or one of a request that an idempotency key places) is copied into the request's streams,
/// which then keep no expiry, and deleted. Multipart streams work there too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uploads_of_any_partition_become_streams_on_a_cluster() {
    let (stack, _dir) = stack_with(Options::default().on_cluster(), &[]).await;
    let queues = stack.queues();
    let layout = queues.layout();
    let blobs = cairn_redis::BlobStore::new(stack.connection(), layout);
    let sha = |reply: &common::Reply, name: &str| reply.json["result"][name]["sha256"].clone();

    // Two uploads in different partitions (more than a chunk each: the copy goes chunk by chunk).
    let first = test_bytes(300_000, 21);
    let first_id = upload(&stack, &first).await;
    let mut second = Vec::new();
    let mut second_id = String::new();
    for seed in 0..60 {
        second = test_bytes(600_000 + seed, 22 + seed as u64);
        second_id = upload(&stack, &second).await;
        if layout.partition_of(&second_id) != layout.partition_of(&first_id) {
            break;
        }
    }
    assert_ne!(layout.partition_of(&second_id), layout.partition_of(&first_id));
    let submission = json!({"handler": "sha", "streams": {"a": first_id, "b": second_id}});
    let reply = stack.submit(&submission, Some(30)).await;
    assert_eq!(reply.status, 200, "{}", reply.json);
    assert_eq!((sha(&reply, "a"), sha(&reply, "b")), (json!(sha256_hex(&first)), json!(sha256_hex(&second))));
    let request = reply.json["id"].as_str().unwrap().to_owned();
    assert_eq!(layout.partition_of(&request), layout.partition_of(&first_id), "the first upload's partition");
    assert!(upload_gone(&stack, &first_id).await && upload_gone(&stack, &second_id).await, "both used up");
    let key = reply.json["progress_key"].as_str().unwrap();
    whole_stream_node(&stack, &format!("{key}.streams.a"), first.len() as u64).await;
    whole_stream_node(&stack, &format!("{key}.streams.b"), second.len() as u64).await;
    let mut conn = stack.connection();
    for name in ["a", "b"] {
        let ttl: i64 = conn.pttl(blobs.stream_key(&request, name)).await.unwrap();
        assert_eq!(ttl, -1, "stream {name} belongs to its request and does not expire");
    }

    // An idempotency key in another partition than the upload: copied too, and a repeat finds
    // the request.
    let data = test_bytes(50_000, 31);
    let upload_id = upload(&stack, &data).await;
    let idempotency_key = keys_outside(layout, &upload_id, "up").next().unwrap();
    let keyed = json!({"handler": "sha", "streams": {"data": upload_id}, "idempotency_key": idempotency_key});
    let accepted = stack.submit(&keyed, None).await;
    assert_eq!(accepted.status, 202, "{}", accepted.json);
    let keyed_request = accepted.json["id"].as_str().unwrap().to_owned();
    assert!(upload_gone(&stack, &upload_id).await, "the copied upload is deleted once the request is stored");
    assert_eq!(layout.partition_of(&keyed_request), layout.partition_of(&idempotency_key));
    let reply = stack.request_state(&keyed_request, Some(30)).await;
    assert_eq!(reply.json["state"], "succeeded", "{}", reply.json);
    assert_eq!(sha(&reply, "data"), json!(sha256_hex(&data)));
    let again = stack.submit(&keyed, None).await;
    assert_eq!((again.status, &again.json["id"]), (200, &json!(keyed_request)), "{}", again.json);
    let used = stack.submit(&json!({"handler": "sha", "streams": {"data": upload_id}}), None).await;
    assert_eq!(used.status, 400, "{}", used.json);

    // A multipart stream is written at its request's keys, in the request's slot.
    let inline = test_bytes(70_000, 41);
    let form = multipart(&json!({"handler": "sha"}), &[("file", inline.clone())]);
    let reply = submit_multipart(&stack, form, Some(30)).await;
    assert_eq!(reply.status, 200, "{}", reply.json);
    assert_eq!(sha(&reply, "file"), json!(sha256_hex(&inline)));
    stack.stop().await;
}

/// On a Redis Cluster the submission that copies an upload of another partition claims it first:
/// while the claim holds, no other submission copies it or takes it over (each is told the upload
/// was used), so racing submissions never both get one upload. A claim given up, or lapsed (its
/// submission died), frees the upload again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_being_copied_is_nobody_elses_on_a_cluster() {
    let (stack, _dir) = stack_with(Options::default().on_cluster(), &[]).await;
    let queues = stack.queues();
    let layout = queues.layout();
    let blobs = cairn_redis::BlobStore::new(stack.connection(), layout);
    let data = test_bytes(400_000, 51);
    let claimed = upload(&stack, &data).await;
    let key_elsewhere = keys_outside(layout, &claimed, "claim").next().unwrap();

    // Another submission is copying it: a copy (a key in another partition) and a takeover (no
    // key: the request goes to the upload's partition) are both refused, naming the upload.
    let holder = cairn_redis::blobs::upload_claimant("another-request", None);
    let upload_key = blobs.upload_key(&claimed);
    assert_eq!(blobs.claim(&upload_key, &holder, 60_000).await.unwrap(), cairn_redis::blobs::Claim::Taken);
    for submission in [
        json!({"handler": "sha", "streams": {"data": claimed}, "idempotency_key": key_elsewhere}),
        json!({"handler": "sha", "streams": {"data": claimed}}),
    ] {
        let refused = stack.submit(&submission, None).await;
        assert_eq!(refused.status, 400, "{}", refused.json);
        assert!(refused.error().contains("used by another request"), "{}", refused.error());
    }
    assert!(!upload_gone(&stack, &claimed).await, "a refused submission leaves the upload");

    // Given up, it is free: the keyed submission copies it, and the request sees every byte.
    blobs.release(&upload_key, &holder).await.unwrap();
    let keyed = json!({"handler": "sha", "streams": {"data": claimed}, "idempotency_key": key_elsewhere});
    let reply = stack.submit(&keyed, Some(30)).await;
    assert_eq!(reply.status, 200, "{}", reply.json);
    assert_eq!(reply.json["result"]["data"]["sha256"], json!(sha256_hex(&data)));

    // A claim whose submission died lapses.
    let lapsing = upload(&stack, &data).await;
    let lapsing_key = blobs.upload_key(&lapsing);
    assert_eq!(blobs.claim(&lapsing_key, &holder, 1).await.unwrap(), cairn_redis::blobs::Claim::Taken);
    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    let reply = stack.submit(&json!({"handler": "sha", "streams": {"data": lapsing}}), Some(30)).await;
    assert_eq!(reply.status, 200, "{}", reply.json);

    // Racing submissions that each copy one shared upload: exactly one gets it.
    let shared_data = test_bytes(900_000, 52);
    let shared = upload(&stack, &shared_data).await;
    let submissions: Vec<Value> = keys_outside(layout, &shared, "race")
        .take(6)
        .map(|key| json!({"handler": "sha", "streams": {"data": shared}, "idempotency_key": key}))
        .collect();
    let replies = futures::future::join_all(submissions.iter().map(|s| stack.submit(s, None))).await;
    let accepted = replies.iter().filter(|r| r.status == 202).count();
    let refused = replies.iter().filter(|r| r.status == 400).count();
    assert_eq!((accepted, refused), (1, 5), "{:?}", replies.iter().map(|r| &r.json).collect::<Vec<_>>());
    stack.stop().await;
}
