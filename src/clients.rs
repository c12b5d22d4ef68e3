//! Who is connected: MCP sessions (stdio, bridged stdio, HTTP) by client name and pid, so
//! status pages can say which client has which tasks queued and running.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};

use schemars::JsonSchema;
use serde::Serialize;

/// One connected client and the tasks it has in the daemon.
#[derive(Debug, Clone, Serialize, JsonSchema)]
pub struct ClientStatus {
    pub id: u64,
    /// The name from the MCP handshake (`clientInfo.name`), once known.
    pub name: Option<String>,
    /// The process id of a bridged `stdio` launch.
    pub pid: Option<u32>,
    /// "stdio", "bridge" or "http".
    pub transport: String,
    pub queued: usize,
    pub running: usize,
}

#[derive(Debug, Clone)]
struct Entry {
    name: Option<String>,
    pid: Option<u32>,
    transport: &'static str,
}

#[derive(Clone, Default)]
pub struct Clients {
    inner: Arc<Mutex<(u64, BTreeMap<u64, Entry>)>>,
}

impl Clients {
    /// Registers a client until the returned guard is dropped.
    pub fn connect(&self, transport: &'static str, pid: Option<u32>) -> ClientGuard {
        let mut inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        inner.0 += 1;
        let id = inner.0;
        inner.1.insert(
            id,
            Entry {
                name: None,
                pid,
                transport,
            },
        );
        ClientGuard {
            id,
            clients: self.clone(),
        }
    }

    pub fn len(&self) -> usize {
        self.inner
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .1
            .len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Every connected client, with its task counts from `tasks` (id → (queued, running)).
    pub fn list(&self, tasks: &BTreeMap<u64, (usize, usize)>) -> Vec<ClientStatus> {
        let inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        inner
            .1
            .iter()
            .map(|(id, e)| {
                let (queued, running) = tasks.get(id).copied().unwrap_or_default();
                ClientStatus {
                    id: *id,
                    name: e.name.clone(),
                    pid: e.pid,
                    transport: e.transport.to_string(),
                    queued,
                    running,
                }
            })
            .collect()
    }
}

/// A connected client; dropping it disconnects it.
pub struct ClientGuard {
    id: u64,
    clients: Clients,
}

impl ClientGuard {
    pub fn id(&self) -> u64 {
        self.id
    }

    pub fn set_name(&self, name: &str) {
        let mut inner = self
            .clients
            .inner
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(entry) = inner.1.get_mut(&self.id)
            && entry.name.as_deref() != Some(name)
        {
            entry.name = Some(name.to_string());
        }
    }
}

impl Drop for ClientGuard {
    fn drop(&mut self) {
        let mut inner = self
            .clients
            .inner
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        inner.1.remove(&self.id);
    }
}
