//! The `prix-dispatch` command: a thin layer over the library.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};

use prix_dispatch::config::{self, Config};
use prix_dispatch::daemon::{self, ServeOptions};
use prix_dispatch::local::Op;
use prix_dispatch::{Dispatcher, bridge, demo, mcp, remote};
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
    /// Every launch on a machine shares one queue: this process joins the daemon that owns its
    /// hosts, else this user's daemon (/tmp/prix-dispatch-<uid>/daemon.sock), starting one,
    /// detached, if none runs, and relays MCP to it. The daemon started this way takes the
    /// hosts of later launches too, and exits after [server] idle_exit_seconds with no clients
    /// and no tasks.
    Stdio {
        /// Fleet configuration file (TOML). Default: $PRIX_DISPATCH_CONFIG, else the
        /// LOCAL_INFERENCE_SERVER_N variables, else ~/.config/prix-dispatch/config.toml
        /// ($XDG_CONFIG_HOME/prix-dispatch/config.toml). A named file must exist.
        #[arg(long, short, value_name = "FILE")]
        config: Option<PathBuf>,
        /// Run the queue in this process instead of joining the machine's daemon (one-off
        /// use, tests). Two standalone launches do not share a queue.
        #[arg(long, conflicts_with = "connect")]
        standalone: bool,
        /// Join the daemon at this URL (`prix-dispatch serve` on another machine, e.g.
        /// http://gpu-box:8765) instead of this machine's; its token is read from
        /// PRIX_DISPATCH_TOKEN. Overrides [server] connect; needs no local configuration.
        #[arg(long, value_name = "URL")]
        connect: Option<String>,
    },
    /// Run the long-lived daemon on [server] listen: MCP over Streamable HTTP at /mcp, the
    /// OpenAI-compatible API at /v1, /metrics (Prometheus), /status (JSON), /healthz, and a
    /// live status page at /.
    ///
    /// Every client on the machine can share it. It owns its hosts: a second daemon for any
    /// of them is refused. It re-reads its configuration when the file changes and on SIGHUP.
    /// SIGINT/SIGTERM (or `prix-dispatch stop`) drain it gracefully.
    Serve {
        /// Fleet configuration file (TOML). Default: $PRIX_DISPATCH_CONFIG, else the
        /// LOCAL_INFERENCE_SERVER_N variables, else ~/.config/prix-dispatch/config.toml
        /// ($XDG_CONFIG_HOME/prix-dispatch/config.toml). A named file must exist.
        #[arg(long, short, value_name = "FILE")]
        config: Option<PathBuf>,
        /// Exit after [server] idle_exit_seconds with no clients and no tasks (set by a
        /// `stdio` launch that starts the daemon).
        #[arg(long, hide = true)]
        idle_exit: bool,
        /// The Unix socket for `stdio` launches (default: [server] socket, else
        /// /tmp/prix-dispatch-<uid>/daemon.sock).
        #[arg(long, hide = true)]
        socket: Option<PathBuf>,
    },
    /// Show this user's running daemon: pid, socket, configuration sources, hosts, queue and
    /// clients. Exits 1 when none runs.
    Status {
        /// The daemon's socket (default: /tmp/prix-dispatch-<uid>/daemon.sock).
        #[arg(long)]
        socket: Option<PathBuf>,
        /// Print the status as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Stop this user's running daemon gracefully (running tasks finish, as on SIGTERM).
    /// Exits 1 when none runs.
    Stop {
        /// The daemon's socket (default: /tmp/prix-dispatch-<uid>/daemon.sock).
        #[arg(long)]
        socket: Option<PathBuf>,
    },
    /// Validate a configuration and print where it came from and the resolved fleet (keys are
    /// never printed). Exits 78 when the configuration is unusable.
    CheckConfig {
        /// Fleet configuration file (TOML). Default: $PRIX_DISPATCH_CONFIG, else the
        /// LOCAL_INFERENCE_SERVER_N variables, else ~/.config/prix-dispatch/config.toml
        /// ($XDG_CONFIG_HOME/prix-dispatch/config.toml). A named file must exist.
        #[arg(long, short, value_name = "FILE")]
        config: Option<PathBuf>,
        /// Also read each host's /v1/models and report what it serves; exits 1 when any host
        /// fails (a health check for scripts), with what to check next to each failure.
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

/// Resolves the configuration and logs its one source line.
fn load(path: Option<PathBuf>) -> anyhow::Result<Config> {
    let config = Config::load(path.as_deref(), &config::process_env)?;
    config.log_source();
    Ok(config)
}

/// Errors are printed as their message alone — never with a backtrace, whatever
/// `RUST_BACKTRACE` says: each already names what failed and what to do. A configuration that
/// cannot be used exits with [`config::CONFIG_ERROR_EXIT`], anything else with 1.
fn main() -> std::process::ExitCode {
    init_logging();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("prix-dispatch: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(Cli::parse().command)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("prix-dispatch: {e:#}");
            if e.downcast_ref::<config::ConfigError>().is_some() {
                std::process::ExitCode::from(config::CONFIG_ERROR_EXIT)
            } else {
                std::process::ExitCode::FAILURE
            }
        }
    }
}

async fn run(command: Command) -> anyhow::Result<std::process::ExitCode> {
    match command {
        Command::Stdio {
            connect: Some(url), ..
        } => {
            let spec =
                told(remote::RemoteSpec::from_env(&url).map_err(anyhow::Error::from)).await?;
            remote::run(spec).await?
        }
        Command::Stdio {
            config: path,
            standalone: false,
            connect: None,
        } => {
            // Record the variables the configuration reads: the daemon re-reads this file
            // later, in its own environment, which may lack this launch's `api_key_env`s.
            let recording = prix_dispatch::fleet::RecordingEnv::new(&config::process_env);
            let config = told(
                Config::load(path.as_deref(), &|name| recording.lookup(name))
                    .map_err(anyhow::Error::from),
            )
            .await?;
            config.log_source();
            if let Some(url) = &config.server.connect {
                let spec =
                    told(remote::RemoteSpec::from_env(url).map_err(anyhow::Error::from)).await?;
                remote::run(spec).await?;
                return Ok(std::process::ExitCode::SUCCESS);
            }
            // The daemon this launch may start reads the file this launch resolved, whatever
            // told it (`--config`, PRIX_DISPATCH_CONFIG or the default location), not its own
            // guess.
            let file = match &config.source {
                config::ConfigSource::File(file) => Some(file.clone()),
                config::ConfigSource::Environment => None,
            };
            let spec = file
                .map(std::path::absolute)
                .transpose()
                .map_err(anyhow::Error::from)
                .and_then(|p| daemon::launch_spec(&config, p).map_err(anyhow::Error::from));
            let mut spec = told(spec).await?;
            if spec.fleet.file.is_some() {
                spec.fleet.env = recording.into_env();
            }
            tracing::debug!(socket = %spec.socket.display(), "joining the machine's daemon");
            bridge::run(spec).await?;
        }
        Command::Stdio {
            config,
            standalone: true,
            connect: None,
        } => {
            let config = load(config)?;
            has_hosts(&config)?;
            // A queue of its own, but never a second scheduler for a host: take its locks.
            let dir = prix_dispatch::daemon_dir::DaemonDir::for_this_user()?;
            let source = prix_dispatch::fleet::SourceFleet::from_config(&config);
            let owner = prix_dispatch::ownership::Owner {
                pid: std::process::id(),
                socket: PathBuf::new(),
                source: source.source.clone(),
                launched: false,
            };
            let locks = prix_dispatch::reload::acquire_all(
                &dir,
                &prix_dispatch::fleet::Fleet::new(source),
                &owner,
            )
            .map_err(|e| {
                anyhow::anyhow!(
                    "{e}; stdio --standalone schedules its hosts itself: stop that daemon ({}) or \
                     launch without --standalone to share it",
                    e.stop_hint()
                )
            })?;
            tracing::info!(source = %config.source, hosts = config.hosts.len(), "serving MCP on stdio");
            let dispatcher = Dispatcher::start(&config);
            let service = tokio::spawn(mcp::serve_stdio(dispatcher.clone()));
            // Dropped (the lock files removed) on every way out, `std::process::exit` included.
            let locks = std::sync::Mutex::new(Some(locks));
            let release = || {
                locks
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .take();
            };
            let served = daemon::supervise(
                &dispatcher,
                config.server.shutdown_grace,
                service,
                CancellationToken::new(),
                CancellationToken::new(),
                release,
            )
            .await;
            release();
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
            has_hosts(&config)?;
            daemon::serve(ServeOptions {
                config,
                launched: idle_exit,
                socket,
            })
            .await?;
        }
        Command::Status { socket, json } => {
            let socket = default_socket(socket)?;
            let Some(info) = bridge::ask(&socket, Op::Status).await? else {
                println!("no prix-dispatch daemon runs at {}", socket.display());
                return Ok(std::process::ExitCode::FAILURE);
            };
            if json {
                println!("{}", serde_json::to_string_pretty(&info)?);
            } else {
                print!("{}", info.describe());
            }
        }
        Command::Stop { socket } => {
            let socket = default_socket(socket)?;
            let Some(info) = bridge::ask(&socket, Op::Stop).await? else {
                println!("no prix-dispatch daemon runs at {}", socket.display());
                return Ok(std::process::ExitCode::FAILURE);
            };
            // Wait until the process is gone — not merely its socket, which goes first —
            // so that its host locks are released and a script can start the next daemon
            // (`stop; serve`) right after.
            let deadline = std::time::Instant::now() + STOP_WAIT;
            while prix_dispatch::ownership::process_exists(info.pid) {
                if std::time::Instant::now() >= deadline {
                    eprintln!(
                        "asked the prix-dispatch daemon (pid {}) at {} to stop; after {} s it is \
                         still draining its running tasks. Wait, or `kill {}` to end them now",
                        info.pid,
                        socket.display(),
                        STOP_WAIT.as_secs(),
                        info.pid
                    );
                    std::process::exit(1);
                }
                tokio::time::sleep(std::time::Duration::from_millis(25)).await;
            }
            println!(
                "stopped the prix-dispatch daemon (pid {}) at {}",
                info.pid,
                socket.display()
            );
        }
        Command::CheckConfig { config, probe } => {
            let config = load(config)?;
            print!("{}", describe(&config));
            if probe {
                println!("probe (GET /v1/models on each host):");
                let http = prix_dispatch::backend::http_client();
                let mut failed = 0;
                for host in &config.hosts {
                    let client = prix_dispatch::backend::HostClient::new(host, http.clone());
                    match client.read_manifest().await {
                        Ok(models) => println!(
                            "  {}: ok, {}{}",
                            host.name,
                            prix_dispatch::plural(models.len(), "model", "models"),
                            if models.is_empty() {
                                String::new()
                            } else {
                                format!(": {}", models.join(", "))
                            }
                        ),
                        Err(why) => {
                            failed += 1;
                            println!(
                                "  {}: FAILED: {why}\n    check: {}",
                                host.name,
                                why.what_to_check(&host.base_url)
                            );
                        }
                    }
                }
                if failed > 0 {
                    println!(
                        "{failed} of {} failed the probe",
                        prix_dispatch::plural(config.hosts.len(), "host", "hosts")
                    );
                    return Ok(std::process::ExitCode::FAILURE);
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
    Ok(std::process::ExitCode::SUCCESS)
}

/// How long `prix-dispatch stop` waits for the daemon to finish its running tasks and exit.
const STOP_WAIT: std::time::Duration = std::time::Duration::from_secs(120);

/// A `stdio` launch that cannot start tells its MCP client why, as the answer to the client's
/// first request (the `initialize`), before exiting: otherwise the client sees only "connection
/// closed" and the reason is lost in a log the user may never open.
async fn told<T>(result: anyhow::Result<T>) -> anyhow::Result<T> {
    if let Err(e) = &result {
        prix_dispatch::stdio::refuse_first_request(&format!("prix-dispatch cannot start: {e:#}"))
            .await;
    }
    result
}

/// `--socket`, else this user's daemon socket (looked at only: `status` and `stop` create
/// nothing).
fn default_socket(socket: Option<PathBuf>) -> anyhow::Result<PathBuf> {
    Ok(socket.unwrap_or_else(prix_dispatch::daemon_dir::default_socket))
}

/// A configuration that only joins another machine's daemon ([server] connect) has no hosts
/// to run a queue for.
fn has_hosts(config: &Config) -> anyhow::Result<()> {
    match &config.server.connect {
        Some(url) if config.hosts.is_empty() => anyhow::bail!(
            "{}: this configuration joins the daemon at {url} ([server] connect) and lists no \
             [[host]] to serve; run `prix-dispatch stdio` with it, or serve the fleet's own \
             configuration",
            config.source
        ),
        _ => Ok(()),
    }
}

fn describe(config: &Config) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let _ = writeln!(out, "{}", config.source_line());
    let _ = writeln!(out, "valid: yes");
    if let Some(url) = &config.server.connect {
        let _ = writeln!(out, "stdio joins the daemon at: {url}");
    }
    let _ = writeln!(out, "listen: {}", config.server.listen);
    match prix_dispatch::daemon_dir::DaemonDir::for_this_user() {
        Ok(dir) => {
            let _ = writeln!(
                out,
                "socket for stdio launches: {}",
                daemon::socket_for(config, &dir).display()
            );
        }
        Err(e) => {
            let _ = writeln!(out, "socket for stdio launches: unusable: {e}");
        }
    }
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
    let _ = writeln!(
        out,
        "{}:",
        prix_dispatch::plural(config.hosts.len(), "host", "hosts")
    );
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
