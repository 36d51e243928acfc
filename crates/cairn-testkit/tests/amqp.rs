//! The RabbitMQ vhost fixture against the shared broker's AMQP port and management API.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use cairn_testkit::{AmqpVhost, wait_until};
use lapin::options::{BasicPublishOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Connection, ConnectionProperties};

/// Whether the management API knows vhost `name`.
async fn vhost_exists(name: &str) -> bool {
    let api =
        std::env::var("CAIRN_TEST_RABBITMQ_API").unwrap_or_else(|_| "http://127.0.0.1:15672".to_owned());
    let user = std::env::var("CAIRN_TEST_RABBITMQ_USER").unwrap_or_else(|_| "guest".to_owned());
    let pass = std::env::var("CAIRN_TEST_RABBITMQ_PASS").unwrap_or_else(|_| "guest".to_owned());
    let status = reqwest::Client::new()
        .get(format!("{api}/api/vhosts/{name}"))
        .basic_auth(user, Some(pass))
        .send()
        .await
        .unwrap()
        .status();
    assert!(status == 200 || status == 404, "unexpected {status}");
    status == 200
}

#[tokio::test]
async fn vhost_is_usable_and_removed_on_drop() {
    let vhost = AmqpVhost::new().await;
    assert!(vhost.name.starts_with("t-"), "{}", vhost.name);
    assert!(vhost.url.ends_with(&format!("/{}", vhost.name)), "{}", vhost.url);
    assert!(vhost_exists(&vhost.name).await);

    let connection = Connection::connect(&vhost.url, ConnectionProperties::default()).await.unwrap();
    assert_eq!(connection.status().vhost().as_str(), vhost.name);
    let channel = connection.create_channel().await.unwrap();
    channel
        .queue_declare("work".into(), QueueDeclareOptions::default(), FieldTable::default())
        .await
        .unwrap();
    let mut headers = FieldTable::default();
    headers.insert("x-reason".into(), AMQPValue::LongString("bad key".into()));
    for payload in [&b"first"[..], b"second"] {
        channel
            .basic_publish(
                "".into(),
                "work".into(),
                BasicPublishOptions::default(),
                payload,
                BasicProperties::default().with_headers(headers.clone()),
            )
            .await
            .unwrap()
            .await
            .unwrap();
    }

    wait_until("the API to count both messages", Duration::from_secs(20), || async {
        vhost.queue_depth("work").await.ok() == Some(2)
    })
    .await
    .unwrap();

    let first = vhost.get_message("work").await.expect("a message");
    assert_eq!(first["payload"], "first");
    assert_eq!(first["properties"]["headers"]["x-reason"], "bad key");
    let second = vhost.get_message("work").await.expect("a message");
    assert_eq!(second["payload"], "second");
    assert_eq!(vhost.get_message("work").await, None);
    assert!(vhost.queue_depth("nope").await.is_err());

    connection.close(200, "done".into()).await.unwrap();
    let name = vhost.name.clone();
    drop(vhost);
    assert!(!vhost_exists(&name).await, "vhost {name} removed on drop");
}

#[tokio::test]
async fn close_connections_drops_clients() {
    let vhost = AmqpVhost::new().await;
    let first = Connection::connect(&vhost.url, ConnectionProperties::default()).await.unwrap();
    let second = Connection::connect(&vhost.url, ConnectionProperties::default()).await.unwrap();
    assert!(first.status().connected());

    // The API lists connections a moment after they open; wait for both. A connection the broker
    // closed passes through `Closing` before it is closed or errored: wait for the end state.
    let closed = AtomicUsize::new(0);
    let ended = |c: &Connection| c.status().closed() || c.status().errored();
    wait_until("both connections to be closed", Duration::from_secs(10), || async {
        if first.status().connected() || second.status().connected() {
            closed.fetch_add(vhost.close_connections().await, Ordering::SeqCst);
        }
        ended(&first) && ended(&second)
    })
    .await
    .unwrap();
    assert!((1..=2).contains(&closed.load(Ordering::SeqCst)));
    for connection in [&first, &second] {
        let status = connection.status();
        assert!(status.closed() || status.errored(), "{status:?}");
    }
}

#[tokio::test]
async fn vhosts_are_isolated() {
    let a = AmqpVhost::new().await;
    let b = AmqpVhost::new().await;
    assert_ne!(a.name, b.name);
    let connection = Connection::connect(&a.url, ConnectionProperties::default()).await.unwrap();
    let channel = connection.create_channel().await.unwrap();
    channel
        .queue_declare("only-in-a".into(), QueueDeclareOptions::default(), FieldTable::default())
        .await
        .unwrap();
    assert_eq!(a.get_message("only-in-a").await, None);
    let missing = tokio::spawn(async move { b.get_message("only-in-a").await });
    assert!(missing.await.is_err(), "the queue does not exist in the other vhost");
}

#[tokio::test]
async fn progress_messages_reach_the_progress_exchange_confirmed() {
    use lapin::options::QueueBindOptions;

    let vhost = AmqpVhost::new().await;
    let (_connection, channel) = vhost.progress_publisher().await;
    channel
        .queue_declare("seen".into(), QueueDeclareOptions::default(), FieldTable::default())
        .await
        .unwrap();
    channel
        .queue_bind(
            "seen".into(),
            "progress".into(),
            "_t.#".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let properties = BasicProperties::default().with_delivery_mode(2);
    cairn_testkit::publish_progress(&channel, "_t.job", br#"{"progress": 0.5}"#, properties).await;
    let message = vhost.get_message("seen").await.expect("the message, confirmed before the call returned");
    assert_eq!(message["routing_key"], "_t.job");
    assert_eq!(message["payload"], r#"{"progress": 0.5}"#);
    assert_eq!(message["properties"]["delivery_mode"], 2);
}
