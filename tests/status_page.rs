//! The live status page in a real headless browser (Debian's chromium; `.ci/run` installs
//! it): against a daemon whose hosts are running tasks, the DOM the page builds shows every
//! host as a lane, the running task and its model in a slot, and the queue by model; and the
//! timeline: a lane per GPU with a row per slot, a bar per task coloured by model, model loads
//! marked, idle gaps, utilisation, the queue over time and the clients, at 1400×900 and at a
//! phone's 390 px (screenshots of both are kept in `$CARGO_TARGET_TMPDIR/status_page/`).

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
    headless(url, budget_ms, None, &["--dump-dom"])
}

/// Chromium run headless on `url` for `budget_ms` of virtual time, in a `width`×`height`
/// window if given; its standard output.
fn headless(url: &str, budget_ms: u32, window: Option<(u32, u32)>, what: &[&str]) -> String {
    static RUN: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let run = RUN.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let profile = std::env::temp_dir().join(format!(
        "prix-dispatch-chromium-{}-{run}",
        std::process::id()
    ));
    let mut command = Command::new(chromium());
    if let Some((width, height)) = window {
        command.arg(format!("--window-size={width},{height}"));
    }
    let output = command
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
        .args(what)
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

/// Every start tag in `dom` whose text contains `marker` (crude, but the page's own markup).
fn tags<'a>(dom: &'a str, marker: &str) -> Vec<&'a str> {
    dom.split('<')
        .filter(|t| t.contains(marker))
        .map(|t| t.split('>').next().unwrap_or(t))
        .collect()
}

/// The value of `name="…"` in a start tag.
fn attr<'a>(tag: &'a str, name: &str) -> Option<&'a str> {
    let start = tag.find(&format!(" {name}=\""))? + name.len() + 3;
    tag[start..].split('"').next()
}

/// The part of the DOM from the timeline lane of `host` to the next lane (or the end).
fn lane<'a>(dom: &'a str, host: &str) -> &'a str {
    let start = dom
        .find(&format!("data-tl-host=\"{host}\""))
        .unwrap_or_else(|| panic!("no timeline lane for {host}:\n{dom}"));
    let rest = &dom[start + 1..];
    let end = rest.find("data-tl-host=").map_or(rest.len(), |i| i + 1);
    &dom[start..start + end]
}

/// Serves, on loopback, a page framing `url` at `width`×`height` that writes the layout the
/// framed page reports (over http: chromium delivers no message from the frame to a file page).
async fn framed(url: &str, width: u32, height: u32) -> String {
    let page = format!(
        "<!doctype html><body style=margin:0><pre id=layout></pre>\
         <iframe src='{url}' width={width} height={height} style=border:0></iframe><script>\
         addEventListener('message', e => {{ if (e.data.type === 'prix-dispatch-layout') \
         document.getElementById('layout').textContent = JSON.stringify(e.data); }});</script>"
    );
    let app = axum::Router::new().route(
        "/",
        axum::routing::get(move || async move { axum::response::Html(page) }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    format!("http://{addr}/")
}

fn screenshots() -> std::path::PathBuf {
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("status_page");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_timeline_shows_lanes_bars_per_model_loads_and_idle_gaps() {
    use prix_dispatch::sim::Behaviour;
    // gpu0 holds one model at a time and takes 400 ms to load one: a, b, a are three loads.
    // gpu1 has two slots, one model.
    let fleet = Fleet::start(vec![
        host(&["a", "b"])
            .sim(|c| c.max_loaded_models = Some(1))
            .behaviour(Behaviour {
                load_ms: 400,
                ..quick(6, 50)
            }),
        host(&["c"]).slots(2).behaviour(quick(6, 50)),
    ])
    .await;
    let front = HttpFront::start(&fleet.dispatcher, None, 1 << 20).await;
    let d = &fleet.dispatcher;
    let run = |model: &'static str| d.run(common::spec(model, "hi", json!({})), |_| {});
    let (a, c1, c2) = tokio::join!(run("a"), run("c"), run("c"));
    for result in [a, c1, c2] {
        result.unwrap();
    }
    run("b").await.unwrap();
    // gpu0 idles a second, then loads a again.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    run("a").await.unwrap();
    // One task still running on gpu1 when the page looks: an open bar.
    let long = common::spec(
        "c",
        &prix_dispatch::sim::sim_directive(json!({"tokens": 200, "token_interval_ms": 50})),
        json!({}),
    );
    let mut running = d.submit(long).unwrap();
    while !matches!(running.next().await, Some(TaskEvent::Started { .. })) {}

    let url = format!("{}/", front.base);
    let dir = screenshots();
    let frame = framed(&url, 390, 844).await;
    let (wide, phone) = tokio::task::spawn_blocking(move || {
        for (w, h) in [(1400, 900), (390, 844)] {
            let shot = dir.join(format!("timeline-{w}x{h}.png"));
            headless(
                &url,
                3000,
                Some((w, h)),
                &[&format!("--screenshot={}", shot.display())],
            );
            assert!(shot.exists(), "no screenshot at {}", shot.display());
        }
        (
            headless(&url, 3000, Some((1400, 900)), &["--dump-dom"]),
            headless(&frame, 3000, None, &["--dump-dom"]),
        )
    })
    .await
    .unwrap();

    let gpu0 = lane(&wide, "gpu0");
    let gpu1 = lane(&wide, "gpu1");
    // A bar per task, coloured by model: a twice and b once on gpu0, c three times on gpu1.
    fn bars<'a>(lane: &'a str, model: &str) -> Vec<&'a str> {
        tags(lane, &format!("data-bar-model=\"{model}\""))
    }
    assert_eq!(bars(gpu0, "a").len(), 2, "{gpu0}");
    assert_eq!(bars(gpu0, "b").len(), 1, "{gpu0}");
    assert_eq!(bars(gpu1, "c").len(), 3, "{gpu1}");
    let fill = |lane: &str, model: &str| attr(bars(lane, model)[0], "fill").unwrap().to_string();
    assert_ne!(
        fill(gpu0, "a"),
        fill(gpu0, "b"),
        "models have their own colours"
    );
    assert_eq!(
        fill(gpu0, "a"),
        attr(bars(gpu0, "a")[1], "fill").unwrap(),
        "a model keeps its colour"
    );
    assert!(
        bars(gpu1, "c")
            .iter()
            .any(|t| t.contains("class=\"bar running\"")),
        "the task still running is an open bar: {gpu1}"
    );
    // Loads: every start on gpu0 loaded its model; gpu1 loaded c once.
    assert_eq!(tags(gpu0, "class=\"load-mark\"").len(), 3, "{gpu0}");
    assert_eq!(tags(gpu0, "class=\"load\"").len(), 3, "{gpu0}");
    assert!(!tags(gpu1, "class=\"load-mark\"").is_empty(), "{gpu1}");
    // The idle second on gpu0 is a gap.
    let gaps: Vec<u64> = tags(gpu0, "class=\"gap\"")
        .iter()
        .filter_map(|t| attr(t, "data-ms")?.parse().ok())
        .collect();
    assert!(
        gaps.iter().any(|ms| (900..3000).contains(ms)),
        "no idle gap of about a second on gpu0: {gaps:?}\n{gpu0}"
    );
    // A row per slot.
    assert_eq!(tags(gpu0, "class=\"slot-row\"").len(), 1, "{gpu0}");
    assert_eq!(tags(gpu1, "class=\"slot-row\"").len(), 2, "{gpu1}");
    let slots: Vec<&str> = bars(gpu1, "c")
        .iter()
        .filter_map(|t| attr(t, "data-slot"))
        .collect();
    assert!(slots.contains(&"0") && slots.contains(&"1"), "{slots:?}");
    // Utilisation per GPU, the queue over time, the clients and their counts.
    for lane in [gpu0, gpu1] {
        let util: u32 = attr(tags(lane, "data-utilisation")[0], "data-utilisation")
            .unwrap()
            .parse()
            .unwrap();
        assert!((1..=100).contains(&util), "{lane}");
    }
    let chart = tags(&wide, "id=\"queue-chart\"")[0];
    assert!(attr(chart, "data-points").unwrap().parse::<u32>().unwrap() >= 1);
    let anonymous = wide
        .split("data-client=\"anonymous\"")
        .nth(1)
        .expect("the anonymous client has a row");
    assert!(
        anonymous.starts_with(
            "><td class=\"client\">anonymous</td><td class=\"n\">0</td><td class=\"n\">1</td><td class=\"n\">5</td>"
        ),
        "queued 0, running 1, served 5: {anonymous}"
    );

    // Fits the wide window: nothing scrolls sideways.
    let body = tags(&wide, "data-scroll-width")[0];
    let px = |name| -> u32 { attr(body, name).unwrap().parse().unwrap() };
    let (scroll, viewport) = (px("data-scroll-width"), px("data-viewport-width"));
    assert!(
        scroll <= viewport && viewport <= 1400,
        "{scroll} px of content in a {viewport} px viewport"
    );
    // And a phone: headless chromium lays out no narrower than 500 px, so the page is framed
    // 390 px wide and reports its layout to the frame's host (the embedding message).
    let phone: serde_json::Value = serde_json::from_str(
        phone
            .split("<pre id=\"layout\">")
            .nth(1)
            .and_then(|rest| rest.split("</pre>").next())
            .unwrap_or_else(|| panic!("the framed page reported no layout:\n{phone}")),
    )
    .unwrap();
    // 390 px less a scroll bar.
    let viewport = phone["viewportWidth"].as_u64().unwrap();
    assert!((360..=390).contains(&viewport), "{phone}");
    assert!(
        phone["scrollWidth"].as_u64().unwrap() <= viewport,
        "sideways scroll on a phone: {phone}"
    );
    let drawn = phone["laneWidth"].as_u64().unwrap();
    assert!(
        (200..390).contains(&drawn),
        "lanes drawn {drawn} px wide: {phone}"
    );
    assert_eq!(phone["bars"], 6, "every bar drawn on a phone too: {phone}");

    drop(running);
    drop(front);
    tokio::time::sleep(Duration::from_millis(10)).await;
    fleet.shutdown().await;
}
