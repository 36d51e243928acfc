//! The `cairn` command. `cairn dev` runs every service in one process for development; the other
//! commands operate a deployment through ingress alone (REST and SSE at `CAIRN_URL`, with
//! `CAIRN_TOKEN`), except `cairn streams`, which reads Redis. This file only parses the command
//! line, dispatches, and turns the outcome into an exit code.

mod cli;
mod client;
mod commands;
mod error;
mod output;
mod upload;
mod watch;

use std::process::ExitCode;

use clap::CommandFactory as _;

use crate::cli::{Cli, Command};
use crate::client::Client;
use crate::commands::{dev, dlq, progress, requests, streams};
use crate::error::{CliError, Exit};
use crate::output::Output;

cairn_runtime::global_allocator!();

#[tokio::main]
async fn main() -> ExitCode {
    let cli: Cli = cairn_runtime::parse_args();
    let out = Output::detect(cli.global.json);
    match run(cli, out).await {
        Ok(exit) => exit.into(),
        Err(error) => {
            eprintln!("{} {error:#}", console::style("error:").red().bold().for_stderr());
            error.exit().into()
        }
    }
}

async fn run(cli: Cli, out: Output) -> Result<Exit, CliError> {
    let client = || Client::new(&cli.global.url, cli.global.token.as_deref());
    match cli.command {
        Command::Dev { log, only } => dev::dev(&log, &only, cairn_runtime::shutdown_token()).await?,
        Command::Streams { redis } => streams::streams(&redis, out).await?,
        Command::Completions { shell } => {
            clap_complete::generate(shell, &mut Cli::command(), "cairn", &mut std::io::stdout());
        }
        Command::Submit(args) => return requests::submit(&client()?, out, args).await,
        Command::Upload(args) => return upload::run(&client()?, out, args).await,
        Command::Status(args) => return progress::status(&client()?, out, args).await,
        Command::Watch(args) => {
            let ended = watch::follow(&client()?, &args.key, args.depth, out).await?;
            return Ok(ended.exit());
        }
        Command::Post(args) => return progress::post(&client()?, out, args).await,
        Command::Delete(args) => return progress::delete(&client()?, out, args).await,
        Command::Requests(args) => return requests::list(&client()?, out, args).await,
        Command::Request(args) => return requests::show(&client()?, out, args).await,
        Command::Cancel(args) => return requests::cancel(&client()?, out, args).await,
        Command::Dlq(command) => return dlq::run(&client()?, out, command).await,
    }
    Ok(Exit::Success)
}
