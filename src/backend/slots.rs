//! llama.cpp's `/slots`: which of a server's slots are processing a request now, whoever
//! sent it. A host busy with requests this daemon did not send (another dispatcher, a person
//! using the server directly) must count those slots as taken, or the daemon would put a
//! second request on a one-slot GPU.
//!
//! `llama-server` serves `GET /slots` by default (`--no-slots` turns it off; then it answers
//! 501): a JSON array with one object per slot, each with a boolean `is_processing` (llama.cpp
//! `tools/server/README.md`, "GET /slots"). A router (`--models-dir`) answers only per model
//! (`?model=`), LM Studio, Ollama and vLLM not at all: for those hosts nothing changes.

use std::sync::atomic::Ordering;
use std::time::Duration;

use serde_json::Value;

use super::HostClient;

/// How long a `/slots` read may take before the daemon goes on without it.
const SLOTS_TIMEOUT: Duration = Duration::from_secs(2);

const SUPPORTED: u8 = 1;
const UNSUPPORTED: u8 = 2;

/// A host's slots as its `/slots` shows them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SlotsBusy {
    /// Slots processing a request now (ours included).
    pub processing: usize,
    /// Slots the server has.
    pub total: usize,
}

/// Reads a `/slots` body: `None` unless it is an array of slots that each say `is_processing`.
pub fn parse_slots(body: &Value) -> Option<SlotsBusy> {
    let slots = body.as_array().filter(|s| !s.is_empty())?;
    let mut processing = 0;
    for slot in slots {
        if slot.get("is_processing")?.as_bool()? {
            processing += 1;
        }
    }
    Some(SlotsBusy {
        processing,
        total: slots.len(),
    })
}

impl HostClient {
    /// The host's busy slots, or `None` when it does not show them (not llama.cpp, or `/slots`
    /// off) or the read failed. A host that answered once without slots is not asked again.
    pub async fn read_slots(&self) -> Option<SlotsBusy> {
        if self.slots_support.load(Ordering::Relaxed) == UNSUPPORTED {
            return None;
        }
        let response = self
            .get("/slots")
            .timeout(SLOTS_TIMEOUT)
            .send()
            .await
            .ok()?;
        let status = response.status();
        // Only a host that says it has no such endpoint (404; llama-server `--no-slots`: 501)
        // or answers with something that is not slots lacks them. A 5xx (503 while loading a
        // model) or a broken read says nothing: ask again next time.
        if matches!(status.as_u16(), 404 | 501) {
            self.slots_support.store(UNSUPPORTED, Ordering::Relaxed);
            return None;
        }
        if !status.is_success() {
            return None;
        }
        let body = response.json::<Value>().await.ok()?;
        let busy = parse_slots(&body);
        let support = if busy.is_some() {
            SUPPORTED
        } else {
            UNSUPPORTED
        };
        self.slots_support.store(support, Ordering::Relaxed);
        busy
    }

    /// Whether a `/slots` read is worth making before each request.
    pub fn may_show_slots(&self) -> bool {
        self.slots_support.load(Ordering::Relaxed) != UNSUPPORTED
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn counts_processing_slots_and_refuses_other_shapes() {
        let body = json!([{"id": 0, "is_processing": true}, {"id": 1, "is_processing": false}]);
        assert_eq!(
            parse_slots(&body),
            Some(SlotsBusy {
                processing: 1,
                total: 2
            })
        );
        assert_eq!(parse_slots(&json!({"error": "not supported"})), None);
        assert_eq!(parse_slots(&json!([{"id": 0}])), None);
        assert_eq!(
            parse_slots(&json!([])),
            None,
            "a server has at least one slot"
        );
    }
}
