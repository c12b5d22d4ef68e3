//! `prix-dispatch` as a user starts it: which configuration it used, said once (issue 14), the
//! exit status of a configuration it cannot use, and `check-config --probe` as a health check.

use std::path::{Path, PathBuf};
use std::process::Output;

use prix_dispatch::sim::{SimConfig, SimHost};

/// Runs the binary in `cwd` with only `vars` (plus PATH) in its environment; the user's
/// configuration directory is `xdg` (so the machine's own ~/.config never leaks in).
async fn prix(args: &[&str], vars: &[(&str, &str)], xdg: &Path, cwd: &Path) -> Output {
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_prix-dispatch"));
    command
        .args(args)
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("HOME", xdg)
        .env("XDG_CONFIG_HOME", xdg)
        .env("RUST_LOG", "prix_dispatch=info")
        .current_dir(cwd);
    for (k, v) in vars {
        command.env(k, v);
    }
    command.output().await.unwrap()
}

/// Runs the binary in `/` expecting a configuration it cannot use (exit 78): its stderr.
async fn refused(args: &[&str], vars: &[(&str, &str)], xdg: &Path) -> String {
    let out = prix(args, vars, xdg, Path::new("/")).await;
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(78), "{args:?}: {stderr}");
    stderr
}

fn scratch(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("prix-cfgsrc-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// The first case: in the repository root (which holds config/prix-dispatch.toml),
/// the variables are used, the gap is named, and the source is logged in one line and printed
/// first.
#[tokio::test]
async fn check_config_in_the_repository_root_uses_the_variables_and_says_so_once() {
    let xdg = scratch("root");
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    assert!(root.join("config/prix-dispatch.toml").exists());
    let out = prix(
        &["check-config"],
        &[
            ("LOCAL_INFERENCE_SERVER_1", "http://127.0.0.1:31234"),
            ("LOCAL_INFERENCE_SERVER_3", "http://127.0.0.1:31236"),
        ],
        &xdg,
        root,
    )
    .await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    let first = stdout.lines().next().unwrap();
    assert!(
        first.starts_with("configuration: environment variables LOCAL_INFERENCE_SERVER_1; ignored: LOCAL_INFERENCE_SERVER_3 (LOCAL_INFERENCE_SERVER_2 is not set"),
        "{stdout}"
    );
    assert!(
        stdout.contains("1 host:") && stdout.contains("http://127.0.0.1:31234"),
        "{stdout}"
    );
    let stderr = text(&out.stderr);
    let logged: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("configuration:"))
        .collect();
    assert_eq!(logged.len(), 1, "one source line: {stderr}");
    assert!(
        logged[0].contains("WARN") && logged[0].contains("LOCAL_INFERENCE_SERVER_3"),
        "{stderr}"
    );

    // The default file, from any working directory, logs its path and where it came from.
    let default = xdg.join("prix-dispatch/config.toml");
    std::fs::create_dir_all(default.parent().unwrap()).unwrap();
    std::fs::write(
        &default,
        "[[host]]\nname = \"gpu0\"\nurl = \"http://127.0.0.1:31235\"\n",
    )
    .unwrap();
    let out = prix(&["check-config"], &[], &xdg, Path::new("/")).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let first = text(&out.stdout).lines().next().unwrap().to_string();
    assert_eq!(
        first,
        format!(
            "configuration: {} (from the default location); nothing else ignored",
            default.display()
        )
    );
    let stderr = text(&out.stderr);
    assert_eq!(
        stderr
            .lines()
            .filter(|l| l.contains("configuration:"))
            .count(),
        1,
        "{stderr}"
    );
    let _ = std::fs::remove_dir_all(&xdg);
}

/// A named file that is missing is an error with its own exit status, printed as the message
/// alone even under RUST_BACKTRACE=1; so is having no configuration at all.
#[tokio::test]
async fn configuration_errors_exit_78_with_the_message_alone() {
    let xdg = scratch("errors");
    let stderr = refused(
        &["check-config"],
        &[
            ("PRIX_DISPATCH_CONFIG", "/tmp/prix-nope/nope.toml"),
            ("LOCAL_INFERENCE_SERVER_1", "http://127.0.0.1:31234"),
            ("RUST_BACKTRACE", "1"),
        ],
        &xdg,
    )
    .await;
    assert!(
        stderr.contains("/tmp/prix-nope/nope.toml (named by PRIX_DISPATCH_CONFIG) does not exist"),
        "{stderr}"
    );
    assert!(
        !stderr.contains("backtrace") && !stderr.contains("Caused by"),
        "{stderr}"
    );
    assert_eq!(stderr.lines().count(), 1, "{stderr}");

    let stderr = refused(&["serve"], &[("RUST_BACKTRACE", "1")], &xdg).await;
    let expected = xdg.join("prix-dispatch/config.toml");
    assert!(
        stderr.contains(&format!("{} does not exist", expected.display()))
            && stderr.contains("LOCAL_INFERENCE_SERVER_1=http://HOST:1234"),
        "{stderr}"
    );
    let _ = std::fs::remove_dir_all(&xdg);
}

/// `--probe` is a health check: 0 when every host answers, 1 when any fails, with what to
/// check next to each failure.
#[tokio::test]
async fn probe_exits_non_zero_when_any_host_fails() {
    let xdg = scratch("probe");
    let sim = SimHost::start(SimConfig {
        models: vec!["m".into()],
        ..SimConfig::default()
    })
    .await
    .unwrap();
    let dead = format!("http://127.0.0.1:{}", free_port());
    let file = xdg.join("fleet.toml");
    let write = |hosts: &[&str]| {
        let text: String = hosts
            .iter()
            .enumerate()
            .map(|(i, url)| format!("[[host]]\nname = \"gpu{i}\"\nurl = \"{url}\"\n"))
            .collect();
        std::fs::write(&file, text).unwrap();
    };
    let check = [
        "check-config",
        "--probe",
        "--config",
        file.to_str().unwrap(),
    ];

    write(&[&sim.url()]);
    let out = prix(&check, &[], &xdg, Path::new("/")).await;
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}");
    assert!(stdout.contains("gpu0: ok, 1 model: m"), "{stdout}");

    write(&[&sim.url(), &dead]);
    let out = prix(&check, &[], &xdg, Path::new("/")).await;
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(stdout.contains("gpu1: FAILED"), "{stdout}");
    assert!(
        stdout.contains(&format!(
            "check: is the server running and listening at {dead}?"
        )),
        "{stdout}"
    );
    assert!(stdout.contains("1 of 2 hosts failed the probe"), "{stdout}");

    write(&[&dead]);
    let out = prix(&check, &[], &xdg, Path::new("/")).await;
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stdout));
    let _ = std::fs::remove_dir_all(&xdg);
}

/// A host URL that is an endpoint is refused at check-config with the form that works.
#[tokio::test]
async fn an_endpoint_url_is_refused_with_the_base_url() {
    let xdg = scratch("endpoint");
    let stderr = refused(
        &["check-config"],
        &[(
            "LOCAL_INFERENCE_SERVER_1",
            "http://127.0.0.1:1234/v1/chat/completions",
        )],
        &xdg,
    )
    .await;
    assert!(
        stderr.contains(
            "LOCAL_INFERENCE_SERVER_1: \"http://127.0.0.1:1234/v1/chat/completions\" is an endpoint"
        ),
        "{stderr}"
    );
    assert!(
        stderr.contains("write \"http://127.0.0.1:1234\""),
        "{stderr}"
    );
    let _ = std::fs::remove_dir_all(&xdg);
}

/// Two entries for one server, however its URL is written, would each get their own slots:
/// the server would be sent two requests at once. Refused at once (exit 78), naming both.
#[tokio::test]
async fn two_entries_for_one_server_are_refused_naming_both() {
    let xdg = scratch("twice");
    let file = xdg.join("twice.toml");
    std::fs::write(
        &file,
        "[[host]]\nname = \"x\"\nurl = \"http://127.0.0.1:18101\"\n\
         [[host]]\nname = \"y\"\nurl = \"http://localhost:18101/v1/\"\n",
    )
    .unwrap();
    let path = file.to_str().unwrap();
    for args in [
        vec!["check-config", "--config", path],
        vec!["serve", "--config", path],
    ] {
        let stderr = refused(&args, &[], &xdg).await;
        assert!(
            stderr.contains("[[host]] #1 (\"x\") and [[host]] #2 (\"y\") are one server (http://127.0.0.1:18101)")
                && stderr.contains("slots = N"),
            "{args:?}: {stderr}"
        );
    }
    let stderr = refused(
        &["check-config"],
        &[
            ("LOCAL_INFERENCE_SERVER_1", "http://[::1]:18102"),
            ("LOCAL_INFERENCE_SERVER_2", "http://127.0.0.1:18102/v1"),
        ],
        &xdg,
    )
    .await;
    assert!(
        stderr.contains("LOCAL_INFERENCE_SERVER_1 and LOCAL_INFERENCE_SERVER_2 are one server")
            && stderr.contains("use a configuration file with one [[host]] for it and slots = N"),
        "{stderr}"
    );
    let _ = std::fs::remove_dir_all(&xdg);
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}
