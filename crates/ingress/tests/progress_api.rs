//! SCA's progress REST API end to end: ingress → gRPC → aggregator → Redis, each test with its
//! own aggregator, key prefix and vhost.

mod common;

use common::Stack;
use reqwest::Method;
use serde_json::{Map, Value, json};

fn progress(node: &Value) -> f64 {
    node["progress"].as_f64().unwrap_or_else(|| panic!("no progress in {node}"))
}

fn assert_close(got: f64, want: f64, what: &str) {
    assert!((got - want).abs() < 1e-9, "{what}: got {got}, want {want}");
}

#[tokio::test]
async fn every_validation_rule_is_a_4xx_naming_the_problem() {
    let stack = Stack::start().await;
    let key = "_test.v.node";
    let before = stack.publish(key, json!({"progress": 0.25, "status": "running", "msg": "ok"})).await;

    let long_segment = "s".repeat(65);
    let many_segments = vec!["s"; 17].join(".");
    let bad_keys = [
        ("a..b", "key \"a..b\": key segment 1 is empty"),
        (long_segment.as_str(), "key segment 0 has 65 characters; at most 64 are allowed"),
        (many_segments.as_str(), "key has 17 segments; at most 16 are allowed"),
        ("a%2Fb", "key \"a/b\": key contains '/' in segment 0"),
        ("a%20b", "key \"a b\": key contains ' ' in segment 0"),
    ];
    for (bad, problem) in bad_keys {
        for method in [Method::GET, Method::POST, Method::DELETE] {
            let request =
                stack.request(method.clone(), &format!("/status/{bad}")).body(r#"{"progress":0.5}"#);
            let reply = stack.send(request).await;
            assert_eq!(reply.status, 400, "{method} {bad}: {}", reply.json);
            assert!(reply.error().contains(problem), "{method} {bad}: {}", reply.error());
        }
    }

    let mut many_fields = Map::new();
    for i in 0..65 {
        many_fields.insert(format!("f{i}"), json!(i));
    }
    let many_fields = Value::Object(many_fields).to_string();
    let bad_bodies = [
        (r#"{"progress": 1.5}"#, r#"field "progress": must be a number between 0 and 1"#),
        (r#"{"progress": -0.1}"#, r#"field "progress": must be a number between 0 and 1"#),
        (r#"{"weight": -1}"#, r#"field "weight": must be a number between 0 and 1e12"#),
        (r#"{"progress": "abc"}"#, r#"field "progress": must be a number between 0 and 1, got "abc""#),
        (r#"{"foo": {"a": 1}}"#, r#"field "foo": nested objects are not allowed"#),
        (r#"{"foo": [1, 2]}"#, r#"field "foo": arrays are not allowed"#),
        (r#"{"_x": 1}"#, r#"field "_x": names starting with "_" are reserved for the server"#),
        (r#"{"start_time": 1}"#, r#"field "start_time": is set by the server and cannot be updated"#),
        (many_fields.as_str(), "update has 65 fields; at most 64 are allowed"),
        (r#"{"progress":"#, "invalid JSON: EOF while parsing"),
        (r#"[{"progress": 0.5}]"#, "update must be a JSON object"),
        (r#"{"progress": 1e400}"#, r#"field "progress": number is out of range"#),
        (r#"{"weight": NaN}"#, r#"field "weight": number is out of range"#),
        (r#"{"progress": Infinity}"#, r#"field "progress": number is out of range"#),
        (r#"{"weight": 1e308}"#, r#"field "weight": must be a number between 0 and 1e12"#),
        (r#"{"weight": 1e17}"#, r#"field "weight": must be a number between 0 and 1e12"#),
    ];
    for (body, problem) in bad_bodies {
        let reply = stack.post(key, body).await;
        assert_eq!(reply.status, 400, "{body}: {}", reply.json);
        assert!(reply.error().starts_with(problem), "{body}: {}", reply.error());
    }

    let huge = format!(r#"{{"msg": "{}"}}"#, "x".repeat(70 * 1024));
    let reply = stack.post(key, &huge).await;
    assert_eq!(reply.status, 413, "{}", reply.json);
    assert!(reply.error().contains("65536 bytes"), "{}", reply.error());

    // Nothing was applied: the node is as the first update left it.
    let node = stack.get(&format!("/status/{key}")).await;
    assert_eq!(node.status, 200);
    for field in ["progress", "status", "msg", "update_time"] {
        assert_eq!(node.json[field], before[field], "{field}");
    }
    assert!(node.json.get("foo").is_none() && node.json.get("f0").is_none(), "{}", node.json);

    let after = stack.publish(key, json!({"progress": 0.75})).await;
    assert_close(progress(&after), 0.75, "good update after the bad ones");
    assert_eq!(after["msg"], "ok");
}

#[tokio::test]
async fn any_content_type_is_read_as_json() {
    let stack = Stack::start().await;
    let form = stack
        .request(Method::POST, "/status/_test.curl.job")
        .header("content-type", "application/x-www-form-urlencoded")
        .body(r#"{"progress":0.5}"#);
    let reply = stack.send(form).await;
    assert_eq!(reply.status, 200, "{}", reply.json);
    assert_eq!(reply.json["status"], "published");
    assert_close(progress(&reply.json["node"]), 0.5, "form-encoded curl -d");

    let bare = stack.request(Method::POST, "/status/_test.curl.job").body(r#"{"progress":0.6,"msg":"bare"}"#);
    let reply = stack.send(bare).await;
    assert_eq!(reply.status, 200, "{}", reply.json);
    assert_close(progress(&reply.json["node"]), 0.6, "no content type");
    assert_eq!(reply.json["node"]["msg"], "bare");
    assert_eq!(reply.json["node"]["key"], "_test.curl.job");
}

#[tokio::test]
async fn namespaces_are_boundaries_never_nodes() {
    let stack = Stack::start().await;
    for key in ["_test", "_test.job._inner"] {
        let reply = stack.post(key, r#"{"progress":0.5}"#).await;
        assert_eq!(reply.status, 400, "{key}: {}", reply.json);
        assert!(reply.error().contains("namespace"), "{key}: {}", reply.error());
    }
    assert_eq!(stack.get("/status/_test").await.status, 404);
    assert_eq!(stack.post("_test.job._inner.step", r#"{"progress":0.5}"#).await.status, 200);
    assert_eq!(stack.get("/status/_test.job._inner").await.status, 404, "not created as an ancestor");
}

#[tokio::test]
async fn scas_example_sequence() {
    let stack = Stack::start().await;
    stack
        .publish("_test.scott1", json!({"name": "test instance", "status": "waiting", "msg": "root msg"}))
        .await;
    stack
        .publish("_test.scott1.task1", json!({"name": "task1", "status": "running", "msg": "initializing"}))
        .await;
    stack.publish("_test.scott1.task2", json!({"name": "task2", "status": "running"})).await;
    stack.publish("_test.scott1.task2.subtask1", json!({"name": "subtask1", "status": "running"})).await;
    stack
        .publish("_test.scott1.task1.subtask1", json!({"name": "task1", "status": "finished", "progress": 1}))
        .await;

    let reply = stack.get("/status/_test.scott1?depth=3").await;
    assert_eq!(reply.status, 200, "{}", reply.json);
    let root = &reply.json;
    assert_eq!(root["key"], "_test.scott1");
    assert_eq!(root["name"], "test instance");
    assert_eq!(root["status"], "waiting");
    assert_eq!(root["msg"], "root msg");
    // task1 is finished through its only child, task2's child has no progress yet: (1 + 0) / 2.
    assert_close(progress(root), 0.5, "root");
    assert_eq!(root["_children"], json!(["_test.scott1.task1", "_test.scott1.task2"]));
    assert_eq!(root["_counts"], json!({"running": 2}));
    assert_eq!(root["_child_count"], 2);
    // The latest message below the root, kept apart from the root's own `msg`.
    assert_eq!(root["_last_msg"], "initializing");
    assert!(root["start_time"].as_i64().unwrap() > 0 && root["update_time"].as_i64().unwrap() > 0);

    let tasks = root["tasks"].as_array().expect("tasks at depth 3");
    assert_eq!(tasks.len(), 2);
    assert_eq!(tasks[0]["key"], "_test.scott1.task1");
    assert_eq!(tasks[1]["key"], "_test.scott1.task2");
    assert!(tasks[0]["start_time"].as_i64() <= tasks[1]["start_time"].as_i64());
    assert_close(progress(&tasks[0]), 1.0, "task1");
    assert_close(progress(&tasks[1]), 0.0, "task2");
    assert_eq!(tasks[0]["msg"], "initializing");
    assert_eq!(tasks[0]["_counts"], json!({"finished": 1}));
    assert_eq!(tasks[1]["_counts"], json!({"running": 1}));
    let subtask = &tasks[0]["tasks"][0];
    assert_eq!(subtask["key"], "_test.scott1.task1.subtask1");
    assert_eq!(subtask["status"], "finished");
    assert_close(progress(subtask), 1.0, "task1.subtask1");
    // The last update touched its ancestors.
    assert_eq!(root["update_time"], subtask["update_time"]);
    assert!(subtask.get("_children").is_none(), "leaves have no _children: {subtask}");

    // Depth 1 (the default) lists the children but does not embed them.
    let shallow = stack.get("/status/_test.scott1").await;
    assert_eq!(shallow.status, 200);
    assert_eq!(shallow.json["_children"], root["_children"]);
    assert!(shallow.json.get("tasks").is_none(), "{}", shallow.json);

    // Namespaces are never nodes.
    let reply = stack.get("/status/_test").await;
    assert_eq!(reply.status, 404);
    assert_eq!(reply.json, json!({"key": "_test", "missing": true}));
    let reply = stack.get("/status/_test.nobody").await;
    assert_eq!(reply.status, 404);
    assert_eq!(reply.json, json!({"key": "_test.nobody", "missing": true}));
}

#[tokio::test]
async fn weights_shape_the_parent() {
    let stack = Stack::start().await;
    for (step, weight) in [("s1", 1), ("s2", 2), ("s3", 1)] {
        stack.publish(&format!("_test.w.job.{step}"), json!({"progress": 0, "weight": weight})).await;
    }
    let parent = || async { progress(&stack.get("/status/_test.w.job").await.json) };
    assert_close(parent().await, 0.0, "pending steps pull the parent down");

    stack.publish("_test.w.job.s1", json!({"progress": 1})).await;
    assert_close(parent().await, 0.25, "first of 1+2+1 done");

    stack.publish("_test.w.job.s2", json!({"weight": 6})).await;
    assert_close(parent().await, 0.125, "s2 reweighted to 6");

    stack.publish("_test.w.job.s2", json!({"weight": 0})).await;
    assert_close(parent().await, 0.5, "s2 weighs nothing");

    // Zero weights everywhere: the parent keeps the progress posted on it.
    stack.publish("_test.w.zero", json!({"progress": 0.3})).await;
    stack.publish("_test.w.zero.a", json!({"progress": 1, "weight": 0})).await;
    stack.publish("_test.w.zero.b", json!({"progress": 0, "weight": 0})).await;
    let zero = stack.get("/status/_test.w.zero").await;
    assert_eq!(zero.status, 200);
    assert_close(progress(&zero.json), 0.3, "sum of weights is 0");
    assert_eq!(zero.json["_children"].as_array().map(Vec::len), Some(2));
}

#[tokio::test]
async fn children_page_through_after() {
    let stack = Stack::start().await;
    let expected: Vec<String> = (0..250).map(|i| format!("_test.p.parent.c{i:03}")).collect();
    for key in &expected {
        stack.publish(key, json!({"progress": 0.5})).await;
    }

    let mut seen: Vec<String> = Vec::new();
    let mut after = String::new();
    let mut pages = 0;
    loop {
        let reply = stack.get(&format!("/status/_test.p.parent?limit=100&depth=2&after={after}")).await;
        assert_eq!(reply.status, 200, "{}", reply.json);
        let page = &reply.json;
        assert_eq!(page["_child_count"], 250);
        let children: Vec<String> = serde_json::from_value(page["_children"].clone()).expect("child keys");
        let tasks = page["tasks"].as_array().expect("tasks at depth 2");
        let task_keys: Vec<&str> = tasks.iter().map(|t| t["key"].as_str().unwrap()).collect();
        assert_eq!(task_keys, children);
        let starts: Vec<i64> = tasks.iter().map(|t| t["start_time"].as_i64().unwrap()).collect();
        assert!(starts.windows(2).all(|w| w[0] <= w[1]), "page sorted by start_time: {starts:?}");
        assert!(children.len() <= 100);
        seen.extend(children);
        pages += 1;
        match page.get("_next").and_then(Value::as_str) {
            Some(next) => {
                assert_eq!(Some(next), seen.last().map(String::as_str));
                after = next.to_owned();
            }
            None => break,
        }
        assert!(pages < 10, "pagination does not end");
    }
    assert_eq!(pages, 3);
    assert_eq!(seen, expected, "all 250 children exactly once, in start_time order");
    assert_close(progress(&stack.get("/status/_test.p.parent").await.json), 0.5, "parent");

    let reply = stack.get("/status/_test.p.parent?after=_test.p.other").await;
    assert_eq!(reply.status, 400, "{}", reply.json);
    assert!(reply.error().contains("not a child"), "{}", reply.error());
    for (query, problem) in [
        ("after=a..b", "after \"a..b\""),
        ("depth=0", "depth must be an integer from 1 to 8"),
        ("depth=9", "depth must be an integer from 1 to 8"),
        ("limit=0", "limit must be an integer from 1 to 1000"),
        ("limit=1001", "limit must be an integer from 1 to 1000"),
        ("limit=ten", "limit must be an integer from 1 to 1000"),
    ] {
        let reply = stack.get(&format!("/status/_test.p.parent?{query}")).await;
        assert_eq!(reply.status, 400, "{query}: {}", reply.json);
        assert!(reply.error().contains(problem), "{query}: {}", reply.error());
    }
}

#[tokio::test]
async fn delete_removes_subtree_and_fixes_parent() {
    let stack = Stack::start().await;
    stack.publish("_test.d.job.a", json!({"progress": 1})).await;
    stack.publish("_test.d.job.b", json!({"progress": 0.2})).await;
    stack.publish("_test.d.job.b.x", json!({"progress": 0.2})).await;
    assert_close(progress(&stack.get("/status/_test.d.job").await.json), 0.6, "before delete");

    let reply = stack.delete("_test.d.job.b").await;
    assert_eq!(reply.status, 200, "{}", reply.json);
    assert_eq!(reply.json, json!({"status": "removed _test.d.job.b and its children", "removed": 2}));

    let parent = stack.get("/status/_test.d.job").await;
    assert_close(progress(&parent.json), 1.0, "only the finished child is left");
    assert_eq!(parent.json["_children"], json!(["_test.d.job.a"]));
    for gone in ["_test.d.job.b", "_test.d.job.b.x"] {
        let reply = stack.get(&format!("/status/{gone}")).await;
        assert_eq!(reply.status, 404);
        assert_eq!(reply.json, json!({"key": gone, "missing": true}));
    }
    let reply = stack.delete("_test.d.job.b").await;
    assert_eq!(reply.status, 404);
    assert_eq!(reply.json, json!({"key": "_test.d.job.b", "missing": true}));
}

#[tokio::test]
async fn health_and_readiness_follow_the_aggregator() {
    let stack = Stack::start().await;
    let health = stack.get("/health").await;
    assert_eq!((health.status, &health.json), (200, &json!({"status": "ok"})));
    let alive = stack.get("/healthz").await;
    assert_eq!((alive.status, &alive.json["status"]), (200, &json!("ok")));
    let ready = stack.get("/readyz").await;
    assert_eq!((ready.status, &ready.json["status"]), (200, &json!("ready")));
    stack.stop().await;

    let lonely = Stack::without_aggregator("http://127.0.0.1:1", "5s").await;
    let alive = lonely.get("/healthz").await;
    assert_eq!(alive.status, 200, "alive does not depend on the aggregator");
    let ready = lonely.get("/readyz").await;
    assert_eq!(ready.status, 503, "{}", ready.json);
    assert_eq!(ready.json["status"], "not ready");
    let health = lonely.get("/health").await;
    assert_eq!(health.status, 503, "{}", health.json);
    assert_eq!(health.json["status"], "failed");
    assert!(health.json["message"].as_str().unwrap().contains("progress aggregator"), "{}", health.json);

    let started = std::time::Instant::now();
    for reply in [lonely.get("/status/_test.a").await, lonely.post("_test.a", r#"{"progress": 0.5}"#).await] {
        assert_eq!(reply.status, 503, "{}", reply.json);
        assert_eq!(reply.headers.get("retry-after").map(|v| v.to_str().unwrap()), Some("1"));
        assert_eq!(reply.error(), "the progress aggregator is unavailable; retry shortly");
    }
    assert!(started.elapsed() < std::time::Duration::from_secs(5), "answered without waiting for a timeout");
    // Input is still judged locally while the aggregator is away.
    assert_eq!(lonely.post("_test.a", r#"{"progress": 2}"#).await.status, 400);
    lonely.stop().await;
}

#[tokio::test]
async fn a_silent_aggregator_is_a_gateway_timeout() {
    // Accepts connections and never answers: neither the HTTP/2 handshake nor any call completes.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let silent_addr = silent.local_addr().unwrap();
    let accepted = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = silent.accept().await {
            held.push(socket);
        }
    });
    let stack = Stack::without_aggregator(&format!("http://{silent_addr}"), "1s").await;

    let started = std::time::Instant::now();
    let reply = stack.get("/status/_test.a").await;
    let elapsed = started.elapsed();
    assert_eq!(reply.status, 504, "{}", reply.json);
    assert_eq!(reply.error(), "the progress aggregator did not answer in time; retry shortly");
    assert!(elapsed < std::time::Duration::from_secs(4), "bounded by the request timeout: {elapsed:?}");
    let ready = stack.get("/readyz").await;
    assert_eq!(ready.status, 503, "{}", ready.json);
    stack.stop().await;
    accepted.abort();
}

#[tokio::test]
async fn unknown_routes_and_methods_answer_json() {
    let stack = Stack::without_aggregator("http://127.0.0.1:1", "5s").await;
    let reply = stack.get("/nope").await;
    assert_eq!(reply.status, 404);
    assert_eq!(reply.error(), "no route for GET /nope");
    let reply = stack.get("/status/").await;
    assert_eq!(reply.status, 404);
    let reply = stack.send(stack.request(Method::PUT, "/status/_test.a")).await;
    assert_eq!(reply.status, 405, "{}", reply.json);
    assert_eq!(reply.headers.get("allow").map(|v| v.to_str().unwrap()), Some("GET,HEAD,POST,DELETE"));
    assert_eq!(reply.error(), "PUT is not allowed on /status/_test.a");
}

#[tokio::test]
async fn metrics_use_route_templates() {
    let stack = Stack::start().await;
    stack.publish("_test.m.job", json!({"progress": 0.5})).await;
    assert_eq!(stack.get("/status/_test.m.job").await.status, 200);
    assert_eq!(stack.get("/status/_test.m.none").await.status, 404);

    let (status, text) = stack.text("/metrics").await;
    assert_eq!(status, 200);
    let requests: Vec<&str> = text.lines().filter(|l| l.starts_with("http_server_requests_total{")).collect();
    let has = |method: &str, code: &str| {
        requests.iter().any(|l| {
            l.contains(&format!("method=\"{method}\""))
                && l.contains("route=\"/status/{key}\"")
                && l.contains(&format!("status=\"{code}\""))
        })
    };
    assert!(has("POST", "200") && has("GET", "200") && has("GET", "404"), "{text}");
    assert!(text.contains("http_server_request_duration_seconds_bucket{"), "{text}");
    assert!(!text.contains("route=\"/status/_test"), "raw paths never become labels: {text}");
}

#[tokio::test]
async fn shutdown_stops_the_ingress() {
    let stack = Stack::start().await;
    assert_eq!(stack.get("/readyz").await.status, 200);
    let base = stack.base.clone();
    stack.stop().await;
    let refused = reqwest::Client::new().get(format!("{base}/healthz")).send().await;
    assert!(refused.is_err(), "the listener is closed after run returns");
}
