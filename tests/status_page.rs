//! The live status page in a real headless browser (Debian's chromium; `.ci/run` installs
//! it): against a daemon whose hosts are running tasks, the DOM the page builds shows every
//! host as a lane, the running task and its model in a slot, and the queue by model.

mod common;

use std::process::Command;
use std::time::Duration;

use common::{Fleet, HttpFront, host, quick};
use prix_dispatch::task::TaskEvent;
use serde_json::json;

fn chromium() -> String {
    let path = std::env::var("PRIX_CHROMIUM").unwrap_or_else(|_| "chromium".into());
    let found = Command::new(&path)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        found,
        "no headless browser: run `bash .ci/run` (it installs Debian's chromium) or set PRIX_CHROMIUM"
    );
    path
}

/// The DOM after the page's script ran for `budget_ms` of virtual time.
fn dump_dom(url: &str, budget_ms: u32) -> String {
    let profile =
        std::env::temp_dir().join(format!("prix-dispatch-chromium-{}", std::process::id()));
    let output = Command::new(chromium())
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .arg(format!("--virtual-time-budget={budget_ms}"))
        .arg("--dump-dom")
        .arg(url)
        .output()
        .expect("chromium runs");
    let _ = std::fs::remove_dir_all(profile);
    assert!(
        output.status.success(),
        "chromium failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_shows_hosts_running_tasks_and_the_queue() {
    let fleet = Fleet::start(vec![
        host(&["qwen-7b"]).behaviour(quick(400, 20)),
        host(&["llama-8b", "qwen-7b"]).behaviour(quick(400, 20)),
    ])
    .await;
    let front = HttpFront::start(&fleet.dispatcher, Some("page-token"), 1 << 20).await;
    let base = front.base.clone();

    // One task on each GPU, and one more waiting.
    let mut handles = Vec::new();
    for model in ["qwen-7b", "llama-8b", "llama-8b"] {
        handles.push(
            fleet
                .dispatcher
                .submit(common::spec(model, "hi", json!({})))
                .unwrap(),
        );
    }
    for handle in handles.iter_mut().take(2) {
        while !matches!(handle.next().await, Some(TaskEvent::Started { .. })) {}
    }
    let url = format!("{base}/?token=page-token");
    let dom = tokio::task::spawn_blocking(move || dump_dom(&url, 3000))
        .await
        .unwrap();

    for host in ["gpu0", "gpu1"] {
        assert!(
            dom.contains(&format!("data-host=\"{host}\"")),
            "no lane for {host}:\n{dom}"
        );
    }
    let busy = dom.matches("class=\"slot busy\"").count();
    assert_eq!(busy, 2, "both GPUs show a running task:\n{dom}");
    assert!(dom.contains("<div class=\"model\">qwen-7b</div>"), "{dom}");
    assert!(dom.contains("<div class=\"model\">llama-8b</div>"), "{dom}");
    assert!(
        dom.contains("data-model=\"llama-8b\""),
        "the waiting task shows in the queue:\n{dom}"
    );
    assert!(dom.contains("2/2 slots busy · 1 waiting"), "{dom}");
    assert!(
        dom.contains("busy · 1 model<") && dom.contains("busy · 2 models<"),
        "counted in the right number:\n{dom}"
    );

    // Without the token the page is refused.
    let r = reqwest::get(format!("{base}/")).await.unwrap();
    assert_eq!(r.status(), 401);
    drop(handles);
    drop(front);
    tokio::time::sleep(Duration::from_millis(10)).await;
    fleet.shutdown().await;
}
