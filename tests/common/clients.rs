//! Running MCP and OpenAI clients nobody on this project wrote (Node with the TypeScript SDK,
//! the cached Python venv) against a daemon in this process, and reading their reports.

use std::path::PathBuf;
use std::process::Command;

use prix_dispatch::sim::SimHost;
use serde_json::Value;

/// The path of the client script `name` in `tests/clients/`.
pub fn script(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/clients")
        .join(name)
}

/// The TypeScript SDK package (`@modelcontextprotocol/sdk`) inside the MCP Inspector's
/// install that `.ci/run` caches; fails with what to run when the Inspector is missing.
pub fn ts_sdk_dir() -> PathBuf {
    let inspector = super::installed(
        "PRIX_INSPECTOR",
        "inspector/node_modules/.bin/mcp-inspector",
        "MCP Inspector CLI (it bundles the TypeScript SDK)",
    );
    let node_modules = inspector
        .parent()
        .and_then(|bin| bin.parent())
        .expect("the Inspector's bin is inside node_modules/.bin");
    node_modules.join("@modelcontextprotocol/sdk")
}

/// The cached venv's Python (`$PRIX_PYTHON` when set); `what` says which packages it must
/// have, in the message that tells how to install it when it is missing.
pub fn python(what: &str) -> PathBuf {
    super::installed("PRIX_PYTHON", "venv/bin/python", what)
}

/// Runs `program args` to completion off the runtime (the daemon in this process keeps
/// serving meanwhile). Asserts that it could be started (`"{name} runs"`) and that it exited
/// successfully, with its stdout and stderr in the message; returns its stdout and stderr.
pub async fn run(name: &str, program: PathBuf, args: Vec<String>) -> (String, String) {
    let output = tokio::task::spawn_blocking(move || Command::new(program).args(&args).output())
        .await
        .unwrap()
        .unwrap_or_else(|e| panic!("{name} runs: {e}"));
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert!(
        output.status.success(),
        "client failed:\n{stdout}\n{stderr}"
    );
    (stdout, stderr)
}

/// [`run`], then parses the client's stdout as one JSON report and returns it; fails with
/// the parse error, stdout and stderr when it is not JSON.
pub async fn run_for_report(name: &str, program: PathBuf, args: Vec<String>) -> Value {
    let (stdout, stderr) = run(name, program, args).await;
    serde_json::from_str(stdout.trim())
        .unwrap_or_else(|e| panic!("not JSON ({e}):\n{stdout}\n{stderr}"))
}

/// Runs `node script sdk args...` (the script in `tests/clients/`, the TypeScript SDK from
/// [`ts_sdk_dir`] as its first argument) like [`run_for_report`]; returns its JSON report.
pub async fn node_report(script_name: &str, args: impl IntoIterator<Item = String>) -> Value {
    let mut all = vec![
        script(script_name).display().to_string(),
        ts_sdk_dir().display().to_string(),
    ];
    all.extend(args);
    run_for_report("node", PathBuf::from("node"), all).await
}

/// A fleet file with one host `gpu0` at `sim`, in a file of its own under the temp dir
/// (unique per process and launch, so tests running at once never share one); the file is
/// removed when this is dropped.
pub struct TempConfig(pub PathBuf);

impl TempConfig {
    /// Writes `[[host]] name = "gpu0", url = "<sim>/v1"` to a new file named after `tag`.
    pub fn one_host(sim: &SimHost, tag: &str) -> TempConfig {
        static LAUNCHES: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let path = std::env::temp_dir().join(format!(
            "prix-dispatch-test-{}-{tag}-{}.toml",
            std::process::id(),
            LAUNCHES.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        ));
        std::fs::write(
            &path,
            format!("[[host]]\nname = \"gpu0\"\nurl = \"{}/v1\"\n", sim.url()),
        )
        .unwrap();
        TempConfig(path)
    }
}

impl Drop for TempConfig {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}
