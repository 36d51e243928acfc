use anyhow::Context;
use cairn_runtime::ServiceMain;
use request_processor::{App, Config};

cairn_runtime::global_allocator!();

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let service = ServiceMain {
        name: "request-processor",
        about: "Runs Cairn requests from the Redis stream",
        health_port: |config: &Config| config.admin_addr.port(),
        log: |config: &Config| &config.log,
    };
    service
        .run(|config, shutdown| async move {
            let app = App::build(config).await.context("cannot start request-processor")?;
            app.run(shutdown).await
        })
        .await
}
