//! The `prix-dispatch` command: a thin layer over the library.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};

use prix_dispatch::config::{self, Config};
use prix_dispatch::{Dispatcher, bridge, demo, http, local, mcp};
use tokio_util::sync::CancellationToken;

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
    ///
    /// Every launch on a machine shares one queue: this process joins the daemon for its
    /// configuration (starting one, detached, if none runs) and relays MCP to it. The daemon
    /// started this way exits after [server] idle_exit_seconds with no clients and no tasks.
    Stdio {
        /// Fleet configuration (TOML). Default: $PRIX_DISPATCH_CONFIG, else
        /// config/prix-dispatch.toml, else the LOCAL_INFERENCE_SERVER_N variables.
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Run the queue in this process instead of joining the machine's daemon (one-off
        /// use, tests). Two standalone launches do not share a queue.
        #[arg(long)]
        standalone: bool,
    },
    /// Run the long-lived daemon on [server] listen: MCP over Streamable HTTP at /mcp, the
    /// OpenAI-compatible API at /v1, /metrics (Prometheus), /status (JSON), /healthz, and a
    /// live status page at /.
    ///
    /// Every client on the machine can share it. SIGINT/SIGTERM drain it gracefully.
    Serve {
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Exit after [server] idle_exit_seconds with no clients and no tasks (set by a
        /// `stdio` launch that starts the daemon).
        #[arg(long, hide = true)]
        idle_exit: bool,
        /// The Unix socket for `stdio` launches (default: derived from the configuration).
        #[arg(long, hide = true)]
        socket: Option<PathBuf>,
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
    use tracing_subscriber::Layer;
    use tracing_subscriber::filter::{EnvFilter, FilterExt, LevelFilter, Targets};
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;

    let wanted = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("prix_dispatch=info,rmcp=warn"));
    // rmcp logs whole requests at debug, `api_key` arguments included: whatever RUST_LOG asks,
    // nothing below info from it. (A directive `rmcp=info` would instead raise it to info when
    // RUST_LOG asks for less, and rmcp logs lines for every stateless HTTP request.)
    let cap = Targets::new()
        .with_default(LevelFilter::TRACE)
        .with_target("rmcp", LevelFilter::INFO);
    tracing_subscriber::registry()
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .with_ansi(false)
                .with_filter(wanted.and(cap)),
        )
        .init();
}

fn load(path: Option<PathBuf>) -> anyhow::Result<Config> {
    Ok(Config::load(path.as_deref(), &config::process_env)?)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    init_logging();
    match Cli::parse().command {
        Command::Stdio {
            config: path,
            standalone: false,
        } => {
            let config = load(path.clone())?;
            let spec = bridge::DaemonSpec {
                socket: config.socket_path(&config::process_env),
                fingerprint: config.fingerprint(),
                config: path.map(std::path::absolute).transpose()?,
            };
            tracing::debug!(socket = %spec.socket.display(), "joining the machine's daemon");
            bridge::run(spec).await?;
        }
        Command::Stdio {
            config,
            standalone: true,
        } => {
            let config = load(config)?;
            tracing::info!(source = %config.source, hosts = config.hosts.len(), "serving MCP on stdio");
            let dispatcher = Dispatcher::start(&config);
            let service = tokio::spawn(mcp::serve_stdio(dispatcher.clone()));
            let served = supervise(
                &dispatcher,
                config.server.shutdown_grace,
                service,
                CancellationToken::new(),
            )
            .await;
            served
                .context("the MCP service stopped unexpectedly")?
                .context("MCP handshake on stdio failed")?;
        }
        Command::Serve {
            config,
            idle_exit,
            socket,
        } => {
            let config = load(config)?;
            let auth_token = match &config.server.auth_token_env {
                Some(var) => Some(std::env::var(var).with_context(|| format!("{var} is not set"))?),
                None => None,
            };
            let socket = socket.unwrap_or_else(|| config.socket_path(&config::process_env));
            let unix = local::bind(&socket).await?;
            let listener = match tokio::net::TcpListener::bind(config.server.listen).await {
                Ok(listener) => Some(listener),
                // A daemon that a stdio launch started serves its launches without HTTP.
                Err(e) if idle_exit => {
                    tracing::warn!(error = %e, listen = %config.server.listen, "no HTTP listener; serving stdio launches only");
                    None
                }
                Err(e) => {
                    return Err(e).with_context(|| {
                        format!(
                            "cannot listen on {} ([server] listen)",
                            config.server.listen
                        )
                    });
                }
            };
            if let Some(addr) = listener.as_ref().and_then(|l| l.local_addr().ok()) {
                tracing::info!(source = %config.source, hosts = config.hosts.len(), "serving on http://{addr} (MCP at /mcp, OpenAI API at /v1, status page at /)");
            }
            tracing::info!(socket = %socket.display(), "stdio launches join at this socket");
            let dispatcher = Dispatcher::start(&config);
            let options = http::HttpOptions {
                auth_token,
                max_request_bytes: config.server.max_request_bytes,
                allowed_hosts: config.server.allowed_hosts.clone(),
                session_idle: config.server.session_idle,
            };
            let stop = CancellationToken::new();
            let idle = idle_exit.then_some(config.server.idle_exit);
            let mut local = tokio::spawn(local::serve(
                unix,
                dispatcher.clone(),
                config.fingerprint(),
                stop.clone(),
                idle,
            ));
            let http = listener.map(|l| {
                tokio::spawn(http::serve(
                    l,
                    dispatcher.clone(),
                    options,
                    stop.clone().cancelled_owned(),
                ))
            });
            let service = tokio::spawn(async move {
                tokio::select! {
                    served = async {
                        match http {
                            Some(task) => task.await,
                            None => std::future::pending().await,
                        }
                    } => served.map_err(anyhow::Error::from)?.map_err(anyhow::Error::from),
                    ended = &mut local => {
                        if ended? == local::Ended::Idle {
                            tracing::info!("no clients and no tasks: exiting (started by a stdio launch)");
                        }
                        Ok(())
                    }
                }
            });
            // On a signal the listeners keep serving the requests in flight while they drain.
            let served = supervise(
                &dispatcher,
                config.server.shutdown_grace,
                service,
                stop.clone(),
            )
            .await;
            // Stops the socket's accept loop, which removes the socket file if it is ours.
            stop.cancel();
            served.context("the daemon stopped unexpectedly")??;
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
/// `listeners` is cancelled once the running tasks are done, before the process exits: the
/// listeners stop accepting (the daemon's socket file goes with them).
async fn supervise<T>(
    dispatcher: &Dispatcher,
    grace: std::time::Duration,
    mut service: tokio::task::JoinHandle<T>,
    listeners: CancellationToken,
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
            // Let the last results and errors reach the clients, and the listeners close. Exit
            // explicitly: the runtime would wait on stdin's blocking reader.
            listeners.cancel();
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
    let _ = writeln!(
        out,
        "socket for stdio launches: {} (fingerprint {})",
        config.socket_path(&config::process_env).display(),
        config.fingerprint()
    );
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
