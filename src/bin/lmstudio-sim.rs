//! `lmstudio-sim`: a simulated LM Studio host for demos, benchmarks and
//! manual testing. Inspect and steer it over HTTP via `/sim/*`.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::Parser;
use prix_dispatch::sim::{ResidencyApi, SimConfig, SimHost};
use tracing_subscriber::EnvFilter;

#[derive(Debug, Parser)]
#[command(
    version,
    about = "Simulated LM Studio / OpenAI-compatible inference host"
)]
struct Args {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:1234")]
    listen: SocketAddr,
    /// Models to list, comma-separated (overrides the config file's).
    #[arg(long, value_delimiter = ',')]
    models: Option<Vec<String>>,
    /// JSON file holding a SimConfig.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Default behaviour: delay before the first byte.
    #[arg(long)]
    ttft_ms: Option<u64>,
    /// Default behaviour: content tokens per answer.
    #[arg(long)]
    tokens: Option<usize>,
    /// Default behaviour: delay before each token.
    #[arg(long)]
    token_interval_ms: Option<u64>,
    /// Default behaviour: milliseconds to load a model that is not resident.
    #[arg(long)]
    load_ms: Option<u64>,
    /// Models held at once, least recently used evicted first.
    #[arg(long)]
    max_loaded_models: Option<usize>,
    /// Whose loaded-state listing to serve: lm_studio, lm_studio_v0, llama_router, ollama, none.
    #[arg(long)]
    residency_api: Option<ResidencyApi>,
    /// Abort the streams of a model evicted for another one (LM Studio's JIT auto-evict).
    #[arg(long)]
    auto_evict: bool,
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(filter)
        .init();
    let args = Args::parse();
    let mut config = match &args.config {
        Some(path) => SimConfig::from_json_file(path)?,
        None => SimConfig::default(),
    };
    if let Some(models) = args.models {
        config.models = models;
    }
    if args.max_loaded_models.is_some() {
        config.max_loaded_models = args.max_loaded_models;
    }
    if let Some(api) = args.residency_api {
        config.residency_api = api;
    }
    config.auto_evict |= args.auto_evict;
    let default = &mut config.default;
    default.load_ms = args.load_ms.unwrap_or(default.load_ms);
    default.ttft_ms = args.ttft_ms.unwrap_or(default.ttft_ms);
    default.tokens = args.tokens.unwrap_or(default.tokens);
    default.token_interval_ms = args.token_interval_ms.unwrap_or(default.token_interval_ms);
    let host = SimHost::start_on(args.listen, config).await?;
    println!("listening on {}", host.url());
    tokio::signal::ctrl_c().await?;
    host.shutdown().await;
    Ok(())
}
