//! `example-processor`: the stock request-processor plus the `steps` handler. Configured by the
//! same flags and `CAIRN_*` variables as `request-processor`.

use anyhow::Context as _;
use request_processor::{App, Config, HandlerSet};

cairn_runtime::global_allocator!();

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config: Config = cairn_runtime::parse_args();
    cairn_runtime::init_logging(&config.log)?;
    let handlers = HandlerSet::new()
        .with("echo", request_processor::handlers::echo::Echo)
        .with("steps", example_processor::Steps);
    let app = App::build_with_handlers(config, handlers).await.context("cannot start example-processor")?;
    app.run(cairn_runtime::shutdown_token()).await
}
