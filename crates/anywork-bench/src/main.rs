//! `anywork-bench`: latency, throughput and memory of AnyWork's processes, against the fake
//! model on loopback (it answers at once, so what is measured is AnyWork's own overhead).
//!
//! ```sh
//! cargo run --release -p anywork-bench -- worker     # see docs/benchmarks.md
//! cargo run --release -p anywork-bench -- server
//! bash scripts/bench-load.sh                           # `load`: the server binary under load
//! cargo run --release -p anywork-bench -- docker     # needs a Docker engine
//! cargo run --release -p anywork-bench -- channels   # webhook intake at 500 req/s
//! cargo run -p anywork-bench -- claude               # Claude Code warm vs cold; needs the CLI
//! scripts/soak.sh [--store postgres]                 # 1,000 sessions for 10 min: docs/soak-*.csv/png
//! ```

mod channels;
mod claude;
mod docker;
mod load;
mod plot;
mod procfs;
mod replicas;
mod server;
mod soak;
mod standin;
mod stats;
mod worker;
mod ws;

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
    /// turn, idle RSS of the worker binary and its memory per idle session.
    Worker(worker::Options),
    /// Server: dispatch overhead (WebSocket chat → executor start) and tasks/s with N
    /// concurrent sessions on SQLite, RSS per idle WebSocket session of the server binary.
    Server(server::Options),
    /// Claude Code: a session's next task in its warm CLI against a new CLI per task (first
    /// event, done, AnyWork's part), a new session's first event, resident memory under the cap.
    Claude(claude::Options),
    /// Channels: signed generic-webhook requests at a fixed rate → `202`, p50/p99, req/s.
    Channels(channels::Options),
    /// The load generator of `channels --client-process`, run by it: requests at a fixed rate
    /// to a URL, one line per request on stdout.
    #[command(hide = true)]
    ChannelsClient(channels::ClientOptions),
    /// Docker driver: cold `get_worker` (create + start + ready) and warm reuse, p50/p99.
    Docker(docker::Options),
    /// The release server binary under WebSocket load (this process) with a stand-in worker
    /// (a process of its own): tasks/s, dispatch and chat → done p50/p99, the server's CPU
    /// and context switches per task, RSS per idle and per chatted session, at each number
    /// of sessions; a markdown table and a PNG plot.
    Load(load::Options),
    /// The stand-in worker alone (the original AnyWork's worker protocol, answering at once;
    /// `load` starts it).
    StandIn(standin::Options),
    /// Soak: the server binary holds 1,000 WebSocket sessions chatting at a steady rate for
    /// 10 minutes; its RSS, fds and store size over time go to a CSV and a PNG plot. Fails on
    /// any error or lost task.
    Soak(soak::Options),
    /// Replicas: N servers on one PostgreSQL — tasks/s, dispatch latency, and the latency of
    /// events followed on another replica than the one running the task.
    Replicas(replicas::Options),
}

fn main() -> anyhow::Result<()> {
    let command = Args::parse().command;
    // The load generator and the stand-in worker each take one thread, so that the server
    // under test has the other core(s).
    let runtime = match command {
        Command::Load(_) | Command::StandIn(_) | Command::ChannelsClient(_) => {
            tokio::runtime::Builder::new_current_thread()
        }
        _ => tokio::runtime::Builder::new_multi_thread(),
    }
    .enable_all()
    .build()?;
    let result = runtime.block_on(async move {
        match command {
            Command::Worker(options) => worker::run(options).await,
            Command::Server(options) => server::run(options).await,
            Command::Docker(options) => docker::run(options).await,
            Command::Claude(options) => claude::run(options).await,
            Command::Channels(options) => channels::run(options).await,
            Command::ChannelsClient(options) => channels::client(options).await,
            Command::Soak(options) => soak::run(options).await,
            Command::Replicas(options) => replicas::run(options).await,
            Command::Load(options) => load::run(options).await,
            Command::StandIn(options) => standin::run(options).await,
        }
    });
    if let Err(e) = result {
        // Exit now: dropping the runtime would wait for whatever a failed run left hanging
        // (a soak whose server stopped answering kept the process alive).
        eprintln!("Error: {e:?}");
        std::process::exit(1);
    }
    Ok(())
}
