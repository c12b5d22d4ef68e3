//! The `prix-dispatch` command: a thin layer over the library.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};

use prix_dispatch::config::{self, Config};
use prix_dispatch::{Dispatcher, demo, http, mcp};

#[derive(Parser)]
#[command(
    name = "prix-dispatch",
    version,
    about = "One queue for a fleet of local GPU inference servers (LM Studio, llama.cpp, any \
             OpenAI-compatible server): never two requests on one GPU, no idle GPU while work waits.",
    long_about = None
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve MCP over stdin/stdout: what Claude Code, Claude Desktop or prompt-prix launch.
    ///
    /// Tools: complete_stream, complete, list_models, dispatch_status. Logs go to stderr
    /// (filter with RUST_LOG); stdout carries only MCP messages.
    Stdio {
        /// Fleet configuration (TOML). Default: $PRIX_DISPATCH_CONFIG, else
        /// config/prix-dispatch.toml, else the LOCAL_INFERENCE_SERVER_N variables.
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// Run the long-lived daemon on [server] listen: MCP over Streamable HTTP at /mcp, the
    /// OpenAI-compatible API at /v1, /metrics (Prometheus), /status (JSON), /healthz, and a
    /// live status page at /.
    ///
    /// Every client on the machine can share it. SIGINT/SIGTERM drain it gracefully.
    Serve {
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// Validate a configuration and print the resolved fleet (keys are never printed).
    CheckConfig {
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Also read each host's /v1/models and report what it serves.
        #[arg(long)]
        probe: bool,
    },
    /// Run a small battery on simulated GPU hosts in this process and show the schedule.
    ///
    /// Needs no LM Studio: two simulated GPUs, model A on both and model B on one, a battery
    /// of A and B tasks through the real scheduler; prints which host ran what, peak
    /// concurrency per host, and the makespan against the ideal.
    Demo {
        /// Tasks of the model both hosts serve.
        #[arg(long, default_value_t = 20)]
        a_tasks: usize,
        /// Tasks of the model only one host serves.
        #[arg(long, default_value_t = 10)]
        b_tasks: usize,
        /// Generation time of each task, in milliseconds.
        #[arg(long, default_value_t = 100)]
        task_ms: u64,
    },
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("prix_dispatch=info"))
        // rmcp logs whole requests at debug, `api_key` arguments included: never below info.
        .add_directive("rmcp=info".parse().expect("a static directive"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .init();
}

fn load(path: Option<PathBuf>) -> anyhow::Result<Config> {
    Ok(Config::load(path.as_deref(), &config::process_env)?)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    init_logging();
    match Cli::parse().command {
        Command::Stdio { config } => {
            let config = load(config)?;
            tracing::info!(source = %config.source, hosts = config.hosts.len(), "serving MCP on stdio");
            let dispatcher = Dispatcher::start(&config);
            let service = tokio::spawn(mcp::serve_stdio(dispatcher.clone()));
            let served = supervise(&dispatcher, config.server.shutdown_grace, service).await;
            served
                .context("the MCP service stopped unexpectedly")?
                .context("MCP handshake on stdio failed")?;
        }
        Command::Serve { config } => {
            let config = load(config)?;
            let auth_token = match &config.server.auth_token_env {
                Some(var) => Some(std::env::var(var).with_context(|| format!("{var} is not set"))?),
                None => None,
            };
            let listener = tokio::net::TcpListener::bind(config.server.listen)
                .await
                .with_context(|| {
                    format!(
                        "cannot listen on {} ([server] listen)",
                        config.server.listen
                    )
                })?;
            let addr = listener.local_addr()?;
            tracing::info!(source = %config.source, hosts = config.hosts.len(), "serving on http://{addr} (MCP at /mcp, OpenAI API at /v1, status page at /)");
            let dispatcher = Dispatcher::start(&config);
            let options = http::HttpOptions {
                auth_token,
                max_request_bytes: config.server.max_request_bytes,
                allowed_hosts: config.server.allowed_hosts.clone(),
            };
            let stop = tokio_util::sync::CancellationToken::new();
            let server = tokio::spawn(http::serve(
                listener,
                dispatcher.clone(),
                options,
                stop.clone().cancelled_owned(),
            ));
            // On a signal the listener keeps serving the requests in flight while they drain.
            let served = supervise(&dispatcher, config.server.shutdown_grace, server).await;
            stop.cancel();
            served
                .context("the HTTP server stopped unexpectedly")?
                .context("HTTP server failed")?;
        }
        Command::CheckConfig { config, probe } => {
            let config = load(config)?;
            print!("{}", describe(&config));
            if probe {
                let http = prix_dispatch::backend::http_client();
                for host in &config.hosts {
                    let client = prix_dispatch::backend::HostClient::new(host, http.clone());
                    match client.read_manifest().await {
                        Ok(models) => println!(
                            "  {}: {} models: {}",
                            host.name,
                            models.len(),
                            models.join(", ")
                        ),
                        Err(why) => println!("  {}: FAILED: {why}", host.name),
                    }
                }
            }
        }
        Command::Demo {
            a_tasks,
            b_tasks,
            task_ms,
        } => {
            let report = demo::run(demo::DemoPlan {
                a_tasks,
                b_tasks,
                task_ms,
            })
            .await?;
            print!("{report}");
        }
    }
    Ok(())
}

/// Runs `service` until it ends by itself, or until SIGINT/SIGTERM: then no new work, waiting
/// tasks fail with "shutting down", running ones get `grace` to finish, and the process exits
/// 0 (130 on a second signal). A scheduler panic exits 70 so that a supervisor restarts us.
async fn supervise<T>(
    dispatcher: &Dispatcher,
    grace: std::time::Duration,
    mut service: tokio::task::JoinHandle<T>,
) -> Result<T, tokio::task::JoinError> {
    tokio::select! {
        served = &mut service => served,
        _ = next_signal() => {
            tracing::info!(grace_seconds = grace.as_secs_f64(), "signal received: finishing running tasks (a second signal exits at once)");
            // The front end keeps running meanwhile, so finished tasks reach their clients.
            tokio::select! {
                in_time = dispatcher.drain(grace) => {
                    if !in_time {
                        tracing::warn!("grace period over: stopping the tasks still running");
                    }
                }
                _ = next_signal() => {
                    tracing::warn!("second signal: exiting now");
                    std::process::exit(130);
                }
            }
            // Let the last results and errors reach the clients. Exit explicitly: the runtime
            // would wait on stdin's blocking reader.
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            std::process::exit(0);
        }
        _ = dispatcher.crashed() => {
            // Every waiting client already got an error.
            tracing::error!("scheduler crashed: exiting so that a supervisor restarts prix-dispatch");
            std::process::exit(70);
        }
    }
}

/// SIGINT or SIGTERM.
async fn next_signal() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(term) => term,
        Err(e) => {
            tracing::warn!(error = %e, "cannot listen for SIGTERM; only Ctrl-C stops gracefully");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

fn describe(config: &Config) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let _ = writeln!(out, "configuration: {} (ok)", config.source);
    let _ = writeln!(out, "listen: {}", config.server.listen);
    let wait = config
        .queue
        .wait_timeout
        .map_or("none".to_string(), |d| format!("{}s", d.as_secs_f64()));
    let _ = writeln!(
        out,
        "queue: max_pending {}, wait timeout {wait}, max_bypass {}s",
        config.queue.max_pending,
        config.queue.max_bypass.as_secs_f64()
    );
    let _ = writeln!(out, "hosts ({}):", config.hosts.len());
    for h in &config.hosts {
        let key = if h.api_key.is_some() {
            "key set"
        } else {
            "no key"
        };
        let _ = writeln!(
            out,
            "  {:<12} {}  slots {}  {key}",
            h.name, h.base_url, h.slots
        );
    }
    out
}
