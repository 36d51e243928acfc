//! Temporary experiment: gRPC Get latency with and without TCP_NODELAY on the server's sockets.
use std::time::{Duration, Instant};

use cairn_progress::{Key, Update};
use cairn_proto::v1::GetRequest;
use cairn_proto::v1::progress_client::ProgressClient;
use cairn_proto::v1::progress_server::ProgressServer;
use cairn_redis::progress::Change;
use cairn_redis::{ProgressStore, RedisConfig};
use cairn_testkit::RedisNamespace;
use progress_aggregator::grpc::ProgressService;
use tonic::transport::server::TcpIncoming;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let ns = RedisNamespace::new();
    let config = RedisConfig::new(ns.url.clone(), ns.prefix.clone());
    let store = ProgressStore::new(config.manager()?, ns.prefix.clone());
    let changes: Vec<Change> = (0..2000)
        .map(|i| Change {
            key: Key::parse(&format!("_b.f.p.c{i}")).unwrap(),
            update: Update::new().progress(0.5),
            time_ms: 1,
        })
        .collect();
    store.apply(&changes).await?;
    for nodelay in [false, true] {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let incoming = TcpIncoming::from(listener).with_nodelay(Some(nodelay));
        let svc = ProgressServer::new(ProgressService::new(store.clone()));
        let server =
            tokio::spawn(tonic::transport::Server::builder().add_service(svc).serve_with_incoming(incoming));
        let mut client = ProgressClient::connect(format!("http://{addr}")).await?;
        for (depth, key) in [(2, "_b.f.p"), (1, "_b.f.p.c5")] {
            let mut lat = Vec::new();
            for i in 0..250 {
                let t = Instant::now();
                client.get(GetRequest { key: key.into(), depth, limit: 100, after: String::new() }).await?;
                if i >= 50 {
                    lat.push(t.elapsed());
                }
            }
            lat.sort();
            let p = |q: f64| lat[((q * lat.len() as f64) as usize).min(lat.len() - 1)].as_secs_f64() * 1e3;
            println!("nodelay={nodelay} depth={depth} p50={:.3}ms p90={:.3}ms", p(0.5), p(0.9));
        }
        server.abort();
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}
