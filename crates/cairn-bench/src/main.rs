//! cairn-bench: Cairn's benchmarks. Each prints one JSON object on stdout (progress lines go to
//! stderr); figures for the issue tracker come from here, never from timed tests.
//!
//! `cairn-bench progress` measures the progress pipeline against the real Redis and RabbitMQ:
//! (a) the broker ceiling — a no-op lapin consumer draining a pre-filled durable queue;
//! (b) single-update messages applied per second by one aggregator (`--shards 1`) draining the
//! same pre-filled stream into a depth-4 tree, and its ratio to (a); (c) the same with burst
//! messages; (d) gRPC `Update` calls per second from concurrent callers, with latencies;
//! (e) the cost of one update under a parent with 10 versus 100 000 siblings; (f) the latency of
//! `GET /status/{key}?depth=2` through the ingress REST API and of gRPC `Get`. Phases (a)–(d) also
//! report where the CPU went (this process, Redis, RabbitMQ: cores busy, and CPU µs per message,
//! update or call) and Redis's script time.
//!
//! `cairn-bench requests` measures the request path (lifecycle progress reporting on): the REST
//! round trip of one client with `Prefer: wait`, one processor draining a pre-filled stream, and
//! end-to-end REST throughput with 64 connections.
//!
//! `cairn-bench soak` runs processor, aggregator and trimmer under a steady request rate and
//! follows Redis's `used_memory` (JSON lines on stderr), to show retention keeps it flat.
//!
//! `cairn-bench live` runs N SSE subscribers over M trees updated at 10 Hz each against an
//! ingress process of its own: update-to-client latency p50/p99, events per subscriber per
//! second, ingress RSS per idle subscriber and CPU per delivered event.
//!
//! `cairn-bench upload` sends files with `cairn upload` through ingress (tus), Redis and the
//! processor to an `http` handler, next to `curl -F` to the same receiving server: MB/s of both,
//! and the ingress and processor RSS meanwhile (needs the release `ingress`,
//! `request-processor` and `cairn` binaries next to it).
//!
//! `cairn-bench lua-library` prints the Redis function library with Cairn's Lua (plain text, not
//! JSON), for `scripts/profile-progress-lua.sh`.
//!
//! Run in release (a debug build measures the compiler, not Cairn):
//! `cargo run --release -p cairn-bench -- progress`, or a subset and other sizes, e.g.
//! `cairn-bench progress --only b,c --messages 200000`. Default sizes take about two minutes on a
//! 2-core machine. Every measurement works in a fresh Redis key prefix and RabbitMQ vhost
//! (`cairn-testkit`; `CAIRN_TEST_REDIS_URL`, `CAIRN_TEST_AMQP_URL`, `CAIRN_TEST_RABBITMQ_API`…),
//! both removed when it ends.

mod live;
mod progress;
mod requests;
mod soak;
mod stats;
mod system;
mod upload;

use clap::Parser;

cairn_runtime::global_allocator!();

#[derive(Parser)]
#[command(name = "cairn-bench", version, about = "Cairn benchmarks that print one JSON object")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Subcommand)]
enum Command {
    /// The progress pipeline: broker ceiling, aggregator throughput, gRPC, sibling cost, reads.
    Progress(progress::Args),
    /// The request path: REST round trip, one processor's drain rate, end-to-end REST throughput.
    Requests(requests::Args),
    /// Redis memory under steady load with the trimmer's retention on (bounded, default 5 min).
    Soak(soak::Args),
    /// Live fan-out: N SSE subscribers over M trees updated at a rate; latency, memory, CPU.
    Live(live::Args),
    /// Files from `cairn upload` to an http handler through the system, next to plain curl;
    /// ingress and processor RSS.
    Upload(upload::Args),
    /// Prints the Redis function library with Cairn's Lua, as `FUNCTION LOAD` takes it.
    LuaLibrary,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let report = match Cli::parse().command {
        Command::Progress(args) => progress::run(args).await?,
        Command::Requests(args) => requests::run(args).await?,
        Command::Soak(args) => soak::run(args).await?,
        Command::Live(args) => live::run(args).await?,
        Command::Upload(args) => upload::run(args).await?,
        Command::LuaLibrary => {
            print!("{}", cairn_redis::function_library());
            return Ok(());
        }
    };
    println!("{report}");
    Ok(())
}
