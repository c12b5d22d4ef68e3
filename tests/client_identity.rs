//! Who the client is, for fair share: an OpenAI request's `user` field, an `X-Prix-Client`
//! header, a bearer token, else "anonymous"; MCP sessions by session. Shown in `/status` with
//! queued, running and served counts. `priority` is the daemon's and never reaches a host
//! (vLLM refuses it unless started with priority scheduling).

mod common;

use common::{Fleet, HttpFront, host};
use serde_json::{Value, json};

async fn chat(base: &str, body: Value, header: Option<(&str, &str)>) -> reqwest::Response {
    let mut request = reqwest::Client::new()
        .post(format!("{base}/v1/chat/completions"))
        .json(&body);
    if let Some((name, value)) = header {
        request = request.header(name, value);
    }
    request.send().await.unwrap()
}

#[tokio::test]
async fn openai_clients_are_told_apart_and_counted() {
    let fleet = Fleet::start(vec![host(&["m"])]).await;
    let front = HttpFront::start(&fleet.dispatcher, None, 1 << 20).await;
    let hi = json!([{"role": "user", "content": "hi"}]);
    let r = chat(
        &front.base,
        json!({"model": "m", "messages": hi, "user": "alice", "priority": -1}),
        None,
    )
    .await;
    assert!(r.status().is_success(), "{:?}", r.text().await);
    let r = chat(
        &front.base,
        json!({"model": "m", "messages": hi}),
        Some(("x-prix-client", "judge")),
    )
    .await;
    assert!(r.status().is_success());
    let r = chat(
        &front.base,
        json!({"model": "m", "messages": hi, "priority": null}),
        None,
    )
    .await;
    assert!(r.status().is_success());

    let status: Value = reqwest::get(format!("{}/status", front.base))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let share = status["fair_share"].as_array().expect("fair_share listed");
    let served = |client: &str| {
        share
            .iter()
            .find(|c| c["client"] == client)
            .map(|c| c["served"].as_u64().unwrap())
    };
    assert_eq!(served("user:alice"), Some(1), "{share:?}");
    assert_eq!(served("header:judge"), Some(1), "{share:?}");
    assert_eq!(served("anonymous"), Some(1), "{share:?}");

    // The host never saw `priority`, not even a null one; it did see `user` (an OpenAI field).
    let bodies: Vec<Value> = fleet.chat_records(0).into_iter().map(|r| r.body).collect();
    assert!(
        bodies.iter().all(|b| b.get("priority").is_none()),
        "{bodies:?}"
    );
    assert_eq!(bodies[0]["user"], "alice");
    drop(front);
    fleet.shutdown().await;
}

#[tokio::test]
async fn a_bad_priority_or_user_is_refused_with_what_to_send() {
    let fleet = Fleet::start(vec![host(&["m"])]).await;
    let front = HttpFront::start(&fleet.dispatcher, None, 1 << 20).await;
    let hi = json!([{"role": "user", "content": "hi"}]);
    for (field, value, says) in [
        ("priority", json!("high"), "must be an integer"),
        ("priority", json!(1.5), "must be an integer"),
        ("priority", json!(5_000_000), "from -1000000 to 1000000"),
        ("user", json!(7), "must be a string"),
    ] {
        let mut body = json!({"model": "m", "messages": hi});
        body[field] = value.clone();
        let r = chat(&front.base, body, None).await;
        assert_eq!(r.status(), 400, "{field} = {value}");
        let e: Value = r.json().await.unwrap();
        let message = e["error"]["message"].as_str().unwrap();
        assert!(message.contains(says), "{field} = {value}: {message}");
    }
    assert!(fleet.chat_records(0).is_empty(), "nothing reached the host");
    drop(front);
    fleet.shutdown().await;
}
