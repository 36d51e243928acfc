use anyhow::Context;
use cairn_runtime::ServiceMain;
use ingress::{App, Config};

cairn_runtime::global_allocator!();

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let service = ServiceMain {
        name: "ingress",
        about: "Cairn's public REST API",
        health_port: |config: &Config| config.admin_addr.port(),
        log: |config: &Config| &config.log,
    };
    service
        .run(|config, shutdown| async move {
            let app = App::build(config).await.context("cannot start ingress")?;
            app.run(shutdown).await
        })
        .await
}
