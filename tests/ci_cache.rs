//! One cache variable, honoured everywhere: `.ci/run`, `scripts/real-backend.sh` and the tests
//! find what `.ci/run` installed by the same rule (`$PRIX_CACHE`, else
//! `~/.cache/prix-dispatch`), so after `PRIX_CACHE=/x bash .ci/run`, `PRIX_CACHE=/x cargo test`
//! alone (no PRIX_PYTHON, PRIX_INSPECTOR, PRIX_LLAMA_SERVER, PRIX_SMOLLM_GGUF) finds it all.

mod common;

use std::ffi::OsString;
use std::path::{Path, PathBuf};

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// What the script's own `cache=` line gives, run by bash with exactly these two variables.
fn script_cache(script: &str, prix_cache: Option<&str>, home: &str) -> PathBuf {
    let text = std::fs::read_to_string(root().join(script)).unwrap();
    let line = text
        .lines()
        .find(|l| l.starts_with("cache="))
        .unwrap_or_else(|| panic!("{script} sets its cache with a `cache=` line"));
    let mut bash = std::process::Command::new("bash");
    bash.arg("-c")
        .arg(format!("{line}; printf %s \"$cache\""))
        .env_clear()
        .env("HOME", home);
    if let Some(cache) = prix_cache {
        bash.env("PRIX_CACHE", cache);
    }
    let out = bash.output().unwrap();
    assert!(out.status.success());
    PathBuf::from(String::from_utf8(out.stdout).unwrap())
}

#[test]
fn the_scripts_and_the_tests_agree_on_the_cache() {
    for script in [".ci/run", "scripts/real-backend.sh"] {
        for prix_cache in [None, Some(""), Some("/tmp/custom-prix-cache")] {
            assert_eq!(
                script_cache(script, prix_cache, "/home/u"),
                common::cache_dir_from(prix_cache.map(OsString::from), Some("/home/u".into())),
                "{script} with PRIX_CACHE={prix_cache:?}"
            );
        }
    }
}

/// The places under the cache the tests look at are where the scripts install.
#[test]
fn the_tests_look_where_the_scripts_install() {
    let ci = std::fs::read_to_string(root().join(".ci/run")).unwrap();
    for line in [
        r#"venv="$cache/venv""#,
        r#"export PRIX_PYTHON="$venv/bin/python""#, // tests: venv/bin/python
        r#"inspector="$cache/inspector""#,
        r#"export PRIX_INSPECTOR="$inspector/node_modules/.bin/mcp-inspector""#,
    ] {
        assert!(ci.contains(line), ".ci/run: {line}");
    }
    let backend = std::fs::read_to_string(root().join("scripts/real-backend.sh")).unwrap();
    for line in [
        r#"mkdir -p "$cache/llama""#,
        r#"server="$dir/llama-server""#, // tests: llama/llama-server
        "SMOLLM_FILE=SmolLM2-135M-Instruct.Q4_1.gguf",
        r#"gguf="$dir/$SMOLLM_FILE""#,
    ] {
        assert!(backend.contains(line), "scripts/real-backend.sh: {line}");
    }
}
