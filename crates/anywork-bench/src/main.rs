//! `anywork-bench`: latency, throughput and memory of AnyWork's processes, against the fake
//! model on loopback (it answers at once, so what is measured is AnyWork's own overhead).
//!
//! ```sh
//! cargo run --release -p anywork-bench -- worker     # see docs/benchmarks.md
//! ```

mod stats;
mod worker;

use clap::{Parser, Subcommand};

/// AnyWork benchmarks.
#[derive(Debug, Parser)]
struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Worker: `/chat` → first SSE byte and → `done` per executor, native overhead per model
    /// turn, idle RSS of the worker binary.
    Worker(worker::Options),
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    match Args::parse().command {
        Command::Worker(options) => worker::run(options).await,
    }
}
