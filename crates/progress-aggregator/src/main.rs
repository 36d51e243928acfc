use anyhow::Context;
use cairn_runtime::ServiceMain;
use progress_aggregator::{App, Config};

cairn_runtime::global_allocator!();

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let service = ServiceMain {
        name: "progress-aggregator",
        about: "Applies progress updates and serves the tree over gRPC",
        health_port: |config: &Config| config.admin_addr.port(),
        log: |config: &Config| &config.log,
    };
    service
        .run(|config, shutdown| async move {
            let app = App::build(config).await.context("cannot start progress-aggregator")?;
            app.run(shutdown).await
        })
        .await
}
