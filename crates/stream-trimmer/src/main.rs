use anyhow::Context;
use cairn_runtime::ServiceMain;
use stream_trimmer::{App, Config};

cairn_runtime::global_allocator!();

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let service = ServiceMain {
        name: "stream-trimmer",
        about: "Keeps Cairn's Redis bounded: safe stream trimming and retention of finished work",
        health_port: |config: &Config| config.admin_addr.port(),
        log: |config: &Config| &config.log,
    };
    service
        .run(|config, shutdown| async move {
            let app = App::build(config).await.context("cannot start stream-trimmer")?;
            app.run(shutdown).await
        })
        .await
}
