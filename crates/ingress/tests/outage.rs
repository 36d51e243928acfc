//! RabbitMQ going away under load: requests keep running and finishing (the request path needs
//! only Redis), the processor keeps the progress it could not send, and once the broker is back
//! every request's tree catches up. The shared broker stays up for the other tests: the
//! processor reaches it through a proxy that the test cuts off.

mod common;

use std::time::Duration;

use cairn_progress::Update;
use cairn_testkit::{TcpProxy, wait_until};
use common::{Options, Stack, WAIT};
use futures::FutureExt as _;
use futures::future::BoxFuture;
use request_processor::{Context, Handler, HandlerError, HandlerSet};
use serde_json::{Value, json};

/// Two steps, each reported as it starts and as it ends, only over AMQP.
struct TwoSteps;

impl Handler for TwoSteps {
    fn handle<'a>(&'a self, ctx: &'a Context) -> BoxFuture<'a, Result<Value, HandlerError>> {
        async move {
            for step in ["fetch", "store"] {
                ctx.report_step(step, Update::new().status("running").progress(0.0));
                tokio::time::sleep(Duration::from_millis(20)).await;
                ctx.report_step(step, Update::new().status("finished").progress(1.0));
            }
            Ok(json!("done"))
        }
        .boxed()
    }
}

async fn submit(stack: &Stack) -> String {
    let accepted = stack.submit(&json!({"handler": "steps", "payload": null}), None).await;
    assert_eq!(accepted.status, 202, "{}", accepted.json);
    accepted.json["id"].as_str().unwrap().to_owned()
}

async fn steps_done(stack: &Stack, id: &str) -> bool {
    let tree = stack.get(&format!("/status/_requests.{id}?depth=2")).await;
    let tasks = tree.json["tasks"].as_array().cloned().unwrap_or_default();
    tasks.len() == 2 && tasks.iter().all(|t| t["status"] == "finished" && t["progress"] == 1.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_outage_under_load_loses_no_request_and_no_progress() {
    let dir = tempfile::tempdir().unwrap();
    let handlers = dir.path().join("handlers.toml");
    std::fs::write(&handlers, "[handlers.steps]\nkind = \"echo\"\n").unwrap();
    let mut stack = Stack::with(Options::default().arg("--handlers", handlers.to_str().unwrap())).await;
    let proxy = TcpProxy::start("127.0.0.1:5672").await;
    let through_proxy =
        stack.amqp_url().replacen("127.0.0.1:5672", &format!("127.0.0.1:{}", proxy.port()), 1);
    assert_ne!(through_proxy, stack.amqp_url(), "the vhost URL names the broker's address");
    stack.start_processor_on(HandlerSet::new().with("steps", TwoSteps), &through_proxy).await;

    let mut ids = Vec::new();
    for _ in 0..10 {
        ids.push(submit(&stack).await);
    }
    let before = ids.clone();
    wait_until("the first requests' steps reported", WAIT, || async {
        for id in &before {
            if !steps_done(&stack, id).await {
                return false;
            }
        }
        true
    })
    .await
    .unwrap();

    // The broker vanishes for eight seconds while requests keep coming.
    proxy.cut();
    let during_from = ids.len();
    for _ in 0..16 {
        ids.push(submit(&stack).await);
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let during = ids[during_from..].to_vec();
    wait_until("requests submitted during the outage succeed", WAIT, || async {
        for id in &during {
            if stack.request_state(id, None).await.json["state"] != "succeeded" {
                return false;
            }
        }
        true
    })
    .await
    .unwrap();
    for id in &during {
        // Their own node is written with the outcome, in Redis; their steps wait in the buffer.
        let node = stack.get(&format!("/status/_requests.{id}")).await;
        assert_eq!(
            (&node.json["status"], &node.json["state"]),
            (&json!("finished"), &json!("succeeded")),
            "{}",
            node.json
        );
    }
    let stranded = {
        let mut stranded = 0;
        for id in &during {
            stranded += usize::from(!steps_done(&stack, id).await);
        }
        stranded
    };
    assert!(stranded > 0, "with the broker away, steps reported over AMQP cannot have arrived yet");

    proxy.restore();
    for _ in 0..10 {
        ids.push(submit(&stack).await);
    }
    wait_until("every request's steps arrive once the broker is back", Duration::from_secs(90), || async {
        for id in &ids {
            if !steps_done(&stack, id).await {
                return false;
            }
        }
        true
    })
    .await
    .unwrap();
    for id in &ids {
        let view = stack.request_state(id, None).await;
        assert_eq!((&view.json["state"], &view.json["attempts"]), (&json!("succeeded"), &json!(1)), "{id}");
    }
}
