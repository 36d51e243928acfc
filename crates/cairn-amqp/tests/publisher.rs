//! The coalescing burst publisher against the real RabbitMQ, each test in a vhost of its own. An
//! observer queue bound to the exchange with `#` shows exactly what was published.

use cairn_progress::now_ms;
use std::collections::HashSet;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use cairn_amqp::publisher::{PublishError, TIME_HEADER};
use cairn_amqp::{ProgressPublisher, PublisherConfig, name};
use cairn_progress::{Key, Update, parse_message};
use cairn_testkit::{AmqpVhost, wait_until};
use futures::StreamExt;
use lapin::message::Delivery;
use lapin::options::{BasicConsumeOptions, ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Connection, ConnectionProperties, Consumer, ExchangeKind};

const EXCHANGE: &str = "progress";
const QUEUE: &str = "observer";
/// Long enough that only explicit flushes send, for tests that count messages exactly.
const NO_TICKS: Duration = Duration::from_secs(3600);
/// Upper bound of every wait for a message that should come.
const PATIENCE: Duration = Duration::from_secs(10);
/// How long silence must last to conclude that no further message comes.
const QUIET: Duration = Duration::from_millis(400);

fn key(s: &str) -> Key {
    Key::parse(s).unwrap()
}

/// A consumer on a durable queue bound to the exchange with `#`; the queue outlives the
/// observer's connection, so messages published while it reconnects are kept.
struct Observer {
    url: String,
    consumer: Consumer,
    _connection: Connection,
}

impl Observer {
    async fn start(vhost: &AmqpVhost) -> Result<Self> {
        let connection = Connection::connect(&vhost.url, ConnectionProperties::default()).await?;
        let channel = connection.create_channel().await?;
        let durable = ExchangeDeclareOptions { durable: true, ..Default::default() };
        channel.exchange_declare(name(EXCHANGE), ExchangeKind::Topic, durable, FieldTable::default()).await?;
        let queue = QueueDeclareOptions { durable: true, ..Default::default() };
        channel.queue_declare(name(QUEUE), queue, FieldTable::default()).await?;
        channel
            .queue_bind(
                name(QUEUE),
                name(EXCHANGE),
                name("#"),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
        let options = BasicConsumeOptions { no_ack: true, ..Default::default() };
        let consumer = channel.basic_consume(name(QUEUE), name(""), options, FieldTable::default()).await?;
        Ok(Self { url: vhost.url.clone(), consumer, _connection: connection })
    }

    /// A new connection and consumer on the same queue (after the broker closed the old one).
    async fn reconnect(&mut self) -> Result<()> {
        let connection = Connection::connect(&self.url, ConnectionProperties::default()).await?;
        let channel = connection.create_channel().await?;
        let options = BasicConsumeOptions { no_ack: true, ..Default::default() };
        self.consumer = channel.basic_consume(name(QUEUE), name(""), options, FieldTable::default()).await?;
        self._connection = connection;
        Ok(())
    }

    /// The next message, or `None` if none comes within `within`.
    async fn next(&mut self, within: Duration) -> Result<Option<Delivery>> {
        match tokio::time::timeout(within, self.consumer.next()).await {
            Err(_) => Ok(None),
            Ok(None) => bail!("observer consumer ended"),
            Ok(Some(delivery)) => Ok(Some(delivery?)),
        }
    }

    /// Exactly `count` messages, then checks that no further one arrives.
    async fn expect(&mut self, count: usize) -> Result<Vec<Delivery>> {
        let mut out = Vec::new();
        while out.len() < count {
            let delivery = self.next(PATIENCE).await?;
            out.push(
                delivery.with_context(|| format!("message {} of {count} did not arrive", out.len() + 1))?,
            );
        }
        if let Some(extra) = self.next(QUIET).await? {
            bail!("unexpected message {} on {}", body_text(&extra), extra.routing_key);
        }
        Ok(out)
    }

    /// Every message until none arrives for `QUIET`.
    async fn drain(&mut self) -> Result<Vec<Delivery>> {
        let mut out = Vec::new();
        while let Some(delivery) = self.next(QUIET).await? {
            out.push(delivery);
        }
        Ok(out)
    }
}

fn body_text(delivery: &Delivery) -> String {
    String::from_utf8_lossy(&delivery.data).into_owned()
}

fn updates(delivery: &Delivery) -> Vec<(Key, Update)> {
    parse_message(delivery.routing_key.as_str(), &delivery.data)
        .unwrap_or_else(|e| panic!("published body does not parse ({e}): {}", body_text(delivery)))
}

fn config(vhost: &AmqpVhost, interval: Duration) -> PublisherConfig {
    let mut config = PublisherConfig::new(vhost.url.clone(), EXCHANGE);
    config.interval = interval;
    config
}

#[tokio::test]
async fn coalesces_many_updates_of_a_key_into_one_message() -> Result<()> {
    let vhost = AmqpVhost::new().await;
    let mut observer = Observer::start(&vhost).await?;
    let publisher = ProgressPublisher::start(config(&vhost, NO_TICKS));
    let job = key("_test.job");

    let before = now_ms();
    for i in 1..=500u32 {
        let mut update = Update::new().progress(f64::from(i) / 1000.0);
        match i {
            100 => update = update.status("running"),
            200 => update = update.msg("halfway"),
            300 => update = update.name("copy files").status("paused"),
            400 => update = update.field("files", 400),
            _ => {}
        }
        publisher.publish(job.clone(), update);
    }
    assert_eq!(publisher.pending(), 1);
    publisher.flush().await?;
    assert_eq!(publisher.pending(), 0);

    let messages = observer.expect(1).await?;
    let message = &messages[0];
    // routed by the namespace that holds the tree `_test.job`
    assert_eq!(message.routing_key.as_str(), "_test");
    let expected =
        Update::new().progress(0.5).status("paused").msg("halfway").name("copy files").field("files", 400);
    assert_eq!(updates(message), vec![(job, expected)]);

    let properties = &message.properties;
    assert_eq!(properties.content_type().as_ref().map(|c| c.as_str()), Some("application/json"));
    assert_eq!(*properties.delivery_mode(), Some(2));
    let id = properties.message_id().as_ref().context("message_id missing")?;
    assert_eq!(uuid::Uuid::parse_str(id.as_str())?.get_version_num(), 7);
    let headers = properties.headers().as_ref().context("headers missing")?;
    let Some(AMQPValue::LongLongInt(time)) = headers.inner().get(TIME_HEADER) else {
        bail!("header {TIME_HEADER} missing or not an i64: {headers:?}");
    };
    assert!((before..=now_ms()).contains(time), "flush time {time} not within the test");

    publisher.close(PATIENCE).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn continuous_publishing_sends_about_ten_bursts_a_second() -> Result<()> {
    let vhost = AmqpVhost::new().await;
    let mut observer = Observer::start(&vhost).await?;
    let publisher = ProgressPublisher::start(config(&vhost, Duration::from_millis(100)));
    let job = key("_test.rate");
    wait_until("publisher connected", PATIENCE, || async { publisher.is_connected() }).await?;

    let started = Instant::now();
    let mut last = 0.0;
    let mut published = 0u32;
    while started.elapsed() < Duration::from_secs(1) {
        published += 1;
        last = f64::from(published % 1000) / 1000.0;
        publisher.publish(job.clone(), Update::new().progress(last));
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    publisher.close(PATIENCE).await?;

    let messages = observer.drain().await?;
    assert!(published > 200, "only {published} publishes in a second");
    assert!(
        (3..=15).contains(&messages.len()),
        "{} messages for {published} updates in one second at a 100 ms interval",
        messages.len()
    );
    let final_state = updates(messages.last().context("no message")?);
    assert_eq!(final_state, vec![(job, Update::new().progress(last))]);
    Ok(())
}

#[tokio::test]
async fn groups_updates_by_route_and_splits_long_bursts() -> Result<()> {
    let vhost = AmqpVhost::new().await;
    let mut observer = Observer::start(&vhost).await?;
    let mut config = config(&vhost, NO_TICKS);
    config.max_burst = 10;
    let publisher = ProgressPublisher::start(config);

    // Two trees (a, b) go as two messages; the trees of one namespace go as one.
    let ax = (key("a.x"), Update::new().progress(0.1));
    let r1 = (key("_test.r1"), Update::new().status("waiting"));
    let bz = (key("b.z"), Update::new().status("running"));
    let ay = (key("a.y"), Update::new().progress(0.2).weight(3.0));
    let r2 = (key("_test.r2.step"), Update::new().status("running"));
    for (k, u) in [&ax, &r1, &bz, &ay, &r2] {
        publisher.publish(k.clone(), u.clone());
    }
    publisher.flush().await?;
    let messages = observer.expect(3).await?;
    let routing: Vec<_> = messages.iter().map(|m| m.routing_key.as_str()).collect();
    assert_eq!(routing, ["a", "_test", "b"]);
    assert_eq!(updates(&messages[0]), vec![ax, ay]);
    assert_eq!(updates(&messages[1]), vec![r1, r2]);
    assert_eq!(updates(&messages[2]), vec![bz]);

    let keys: Vec<Key> = (0..25).map(|i| key(&format!("_test.c.k{i}"))).collect();
    for (i, k) in keys.iter().enumerate() {
        publisher.publish(k.clone(), Update::new().field("n", i));
    }
    publisher.flush().await?;
    let messages = observer.expect(3).await?;
    let sizes: Vec<_> = messages.iter().map(|m| updates(m).len()).collect();
    assert_eq!(sizes, [10, 10, 5]);
    let delivered: Vec<Key> = messages
        .iter()
        .inspect(|m| assert_eq!(m.routing_key.as_str(), "_test"))
        .flat_map(|m| updates(m).into_iter().map(|(k, _)| k))
        .collect();
    assert_eq!(delivered, keys, "every key once, in first-seen order");
    let ids: HashSet<_> = messages.iter().map(|m| m.properties.message_id().clone()).collect();
    assert_eq!(ids.len(), 3, "each message has its own id");

    publisher.close(PATIENCE).await?;
    Ok(())
}

#[tokio::test]
async fn close_flushes_the_final_state() -> Result<()> {
    let vhost = AmqpVhost::new().await;
    let mut observer = Observer::start(&vhost).await?;
    let publisher = ProgressPublisher::start(config(&vhost, Duration::from_millis(100)));
    let step = key("_test.final.step");

    publisher.publish(step.clone(), Update::new().progress(0.3).status("running"));
    publisher.publish(step.clone(), Update::new().progress(0.9));
    publisher.publish(step.clone(), Update::new().progress(1.0).status("finished").msg("done"));
    publisher.close(PATIENCE).await?;
    assert_eq!(publisher.pending(), 0);
    assert!(!publisher.is_connected());

    // Whatever the periodic flush sent first, the updates applied in order end in the final state.
    let mut state = Update::new();
    for message in observer.drain().await? {
        assert_eq!(message.routing_key.as_str(), "_test");
        for (k, update) in updates(&message) {
            assert_eq!(k, step);
            state.merge(&update);
        }
    }
    assert_eq!(state, Update::new().progress(1.0).status("finished").msg("done"));
    Ok(())
}

#[tokio::test]
async fn buffers_without_blocking_while_the_broker_is_away() -> Result<()> {
    let port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        listener.local_addr()?.port()
    };
    let mut config = PublisherConfig::new(format!("amqp://guest:guest@127.0.0.1:{port}/%2f"), EXCHANGE);
    config.interval = Duration::from_millis(10);
    let publisher = ProgressPublisher::start(config);

    let started = Instant::now();
    for i in 0..10_000u32 {
        let k = key(&format!("_test.away.k{}", i % 100));
        publisher.publish(k, Update::new().progress(f64::from(i) / 10_000.0));
    }
    let publishing = started.elapsed();
    assert!(publishing < Duration::from_secs(2), "10 000 publishes took {publishing:?}");
    assert_eq!(publisher.pending(), 100);
    assert!(!publisher.is_connected());

    let started = Instant::now();
    let err = publisher.close(Duration::from_millis(300)).await.expect_err("nothing can be delivered");
    let closing = started.elapsed();
    assert!(closing < Duration::from_secs(3), "close took {closing:?}");
    match &err {
        PublishError::Undelivered { undelivered, .. } => assert_eq!(*undelivered, 100),
        other => panic!("unexpected error {other:?}"),
    }
    assert!(err.to_string().contains("100 progress updates were not delivered"), "{err}");
    assert_eq!(publisher.pending(), 100, "undelivered updates stay buffered");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnects_by_itself_after_the_connection_is_dropped() -> Result<()> {
    let vhost = AmqpVhost::new().await;
    let mut observer = Observer::start(&vhost).await?;
    let publisher = ProgressPublisher::start(config(&vhost, Duration::from_millis(100)));
    let job = key("_test.drop.job");

    publisher.publish(job.clone(), Update::new().progress(0.1).status("running"));
    publisher.flush().await?;
    let first = observer.expect(1).await?;
    assert_eq!(updates(&first[0]), vec![(job.clone(), Update::new().progress(0.1).status("running"))]);

    // Closes the publisher's connection and the observer's.
    assert!(vhost.close_connections().await >= 2);
    publisher.publish(job.clone(), Update::new().progress(0.6));
    publisher.publish(job.clone(), Update::new().msg("after the drop"));
    observer.reconnect().await?;

    // Applied in order, what arrives after the drop ends in the newer state.
    let wanted = Update::new().progress(0.6).msg("after the drop");
    let mut state = Update::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while state != wanted && Instant::now() < deadline {
        let Some(message) = observer.next(Duration::from_millis(200)).await? else { continue };
        for (k, update) in updates(&message) {
            assert_eq!(k, job);
            state.merge(&update);
        }
    }
    assert_eq!(state, wanted, "state delivered after the connection was dropped");
    wait_until("publisher reconnected", PATIENCE, || async { publisher.is_connected() }).await?;
    assert_eq!(publisher.pending(), 0);
    publisher.close(PATIENCE).await?;
    Ok(())
}

#[tokio::test]
async fn unroutable_updates_stay_buffered_until_a_queue_is_bound() -> Result<()> {
    let vhost = AmqpVhost::new().await;
    let publisher = ProgressPublisher::start(config(&vhost, NO_TICKS));
    let job = key("_test.unroutable");

    publisher.publish(job.clone(), Update::new().progress(0.4));
    let err = publisher.flush().await.expect_err("no queue is bound to the exchange");
    match &err {
        PublishError::Unroutable { routing_key, updates, pending, .. } => {
            assert_eq!((routing_key.as_str(), *updates, *pending), ("_test", 1, 1));
        }
        other => panic!("unexpected error {other:?}"),
    }
    assert!(err.to_string().contains("no queue bound for routing key `_test`"), "{err}");
    assert_eq!(publisher.pending(), 1);

    publisher.publish(job.clone(), Update::new().status("running"));
    let mut observer = Observer::start(&vhost).await?;
    publisher.flush().await?;
    let messages = observer.expect(1).await?;
    assert_eq!(updates(&messages[0]), vec![(job, Update::new().progress(0.4).status("running"))]);
    publisher.close(PATIENCE).await?;
    Ok(())
}
