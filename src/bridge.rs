//! `prix-dispatch stdio` as a thin bridge to the machine's one daemon.
//!
//! Agent hosts launch MCP servers as child processes; if each launch ran its own scheduler,
//! two of them would send work to the same GPU at once. So a launch finds the daemon that owns
//! its hosts (their lock files name its socket), else this user's daemon socket, starting a
//! daemon if none answers — detached, as sccache or gpg-agent do, with a lock file so that
//! simultaneous launches start exactly one — and then relays MCP lines both ways. It holds no queue. If the daemon goes away mid-session, the
//! calls in flight get a clear error, and the next call starts a new daemon, replaying the
//! client's handshake so the session goes on.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::net::unix::OwnedWriteHalf;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::daemon_dir::DaemonDir;
use crate::fleet::SourceFleet;
use crate::local::{Hello, Op, PROTOCOL, Welcome};
use crate::ownership;
use crate::reload::DaemonInfo;

#[derive(Debug, thiserror::Error)]
pub enum BridgeError {
    #[error("{0}")]
    Refused(String),
    #[error("could not start the prix-dispatch daemon for {socket}: {why}; see its log at {log}")]
    Start {
        socket: PathBuf,
        log: PathBuf,
        why: String,
    },
    #[error(
        "this launch's hosts are scheduled by two prix-dispatch daemons ({0}); a launch joins \
         one. Stop one of them and launch again"
    )]
    Split(String),
    #[error(
        "could not start the prix-dispatch daemon for {socket}: cannot create {path}: {error}. \
         Make its directory writable by you, or set [server] socket to a path in one that is"
    )]
    Prepare {
        socket: PathBuf,
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("stdin/stdout failed: {0}")]
    Io(#[from] std::io::Error),
}

/// How to find or start the daemon.
#[derive(Debug, Clone)]
pub struct DaemonSpec {
    /// Where to start a daemon (and look for one) when no daemon owns this launch's hosts.
    pub socket: PathBuf,
    /// This user's daemon directory (host locks).
    pub dir: DaemonDir,
    /// The launch's hosts, sent in the hello.
    pub fleet: SourceFleet,
    /// The `--config` the daemon should be started with, if the launch had one.
    pub config: Option<PathBuf>,
    /// The program started as the daemon (given `serve --idle-exit --socket <socket>`);
    /// `None`: this executable.
    pub program: Option<PathBuf>,
}

impl DaemonSpec {
    /// The socket of the daemon that owns this launch's hosts, if one does; else the default.
    /// A host held by a `stdio --standalone` process (which takes no launches) is an error.
    fn target(&self) -> Result<PathBuf, BridgeError> {
        let mut owners: Vec<ownership::Owner> = Vec::new();
        for host in &self.fleet.hosts {
            if let Some(owner) = ownership::owner_of(&self.dir, &host.identity())
                && !owners.iter().any(|o| o.socket == owner.socket)
            {
                owners.push(owner);
            }
        }
        if let Some(o) = owners.iter().find(|o| o.is_standalone()) {
            return Err(BridgeError::Refused(format!(
                "a host of this launch is scheduled by `prix-dispatch stdio --standalone` (pid \
                 {}, configuration {}), which serves only its own client; stop it, or launch \
                 it without --standalone so that launches can share it",
                o.pid, o.source
            )));
        }
        match owners.len() {
            0 => Ok(self.socket.clone()),
            1 => Ok(owners.remove(0).socket),
            _ => Err(BridgeError::Split(
                owners
                    .iter()
                    .map(|o| {
                        format!(
                            "pid {} at {}, stopped by {}",
                            o.pid,
                            o.socket.display(),
                            ownership::stop_hint(o)
                        )
                    })
                    .collect::<Vec<_>>()
                    .join(", "),
            )),
        }
    }
}

/// Requests in flight, and the replayed handshake answers to drop, shared by both directions.
#[derive(Default)]
struct Pending {
    in_flight: HashMap<String, Value>,
    swallow: HashSet<String>,
}

struct Connection {
    write: OwnedWriteHalf,
    /// Fired when the daemon's side ends.
    lost: CancellationToken,
}

/// Relays stdin/stdout to the daemon until the client closes stdin.
pub async fn run(spec: DaemonSpec) -> Result<(), BridgeError> {
    let (out_tx, mut out_rx) = mpsc::unbounded_channel::<String>();
    let writer = tokio::spawn(async move {
        let mut stdout = crate::stdio::stdout();
        while let Some(mut line) = out_rx.recv().await {
            line.push('\n');
            if stdout.write_all(line.as_bytes()).await.is_err() || stdout.flush().await.is_err() {
                break;
            }
        }
    });
    let pending = Arc::new(Mutex::new(Pending::default()));
    // The client's handshake (initialize and its id, then notifications/initialized).
    let mut handshake: Vec<(String, Option<Value>)> = Vec::new();
    let mut connection: Option<Connection> = None;
    let mut lines = BufReader::new(crate::stdio::stdin()).lines();
    let result = loop {
        let lost = connection.as_ref().map(|c| c.lost.clone());
        let line = tokio::select! {
            line = lines.next_line() => line,
            _ = wait(lost) => {
                connection = None;
                fail_in_flight(&pending, &out_tx, "the prix-dispatch daemon went away while this call ran (connection lost); the next call starts a new daemon, retry");
                continue;
            }
        };
        let line = match line {
            Ok(Some(line)) => line,
            Ok(None) => break Ok(()),
            Err(e) => break Err(BridgeError::Io(e)),
        };
        if line.trim().is_empty() {
            continue;
        }
        let message: Option<Value> = serde_json::from_str(&line).ok();
        let method = message
            .as_ref()
            .and_then(|m| m.get("method"))
            .and_then(Value::as_str);
        let id = message
            .as_ref()
            .and_then(|m| m.get("id"))
            .filter(|_| method.is_some())
            .cloned();
        match method {
            Some("initialize") => handshake = vec![(line.clone(), id.clone())],
            Some("notifications/initialized") => handshake.push((line.clone(), None)),
            _ => {}
        }
        if let Some(id) = &id {
            lock(&pending).in_flight.insert(id.to_string(), id.clone());
        }
        if connection.is_none() {
            match connect_or_start(&spec).await {
                Ok(stream) => {
                    let (read, mut write) = stream.into_split();
                    let lost = spawn_reader(read, pending.clone(), out_tx.clone());
                    // A new daemon knows nothing of this session: replay its handshake first,
                    // unless this line is the handshake itself.
                    if method != Some("initialize") {
                        for (replayed, replayed_id) in &handshake {
                            if let Some(rid) = replayed_id {
                                lock(&pending).swallow.insert(rid.to_string());
                            }
                            let _ = send(&mut write, replayed).await;
                        }
                    }
                    connection = Some(Connection { write, lost });
                }
                Err(e) => {
                    tracing::error!(error = %e, "no daemon to bridge to");
                    if let Some(id) = id {
                        lock(&pending).in_flight.remove(&id.to_string());
                        let _ = out_tx.send(error_line(&id, &e.to_string()));
                    }
                    if matches!(e, BridgeError::Refused(_) | BridgeError::Split(_)) {
                        break Err(e);
                    }
                    continue;
                }
            }
        }
        let c = connection.as_mut().expect("connected above");
        if send(&mut c.write, &line).await.is_err() {
            connection = None;
            fail_in_flight(
                &pending,
                &out_tx,
                "the prix-dispatch daemon went away before this call reached it; the next call starts a new daemon, retry",
            );
        }
    };
    // Closing our side tells the daemon this client is gone: its tasks stop.
    drop(connection);
    drop(out_tx);
    let _ = writer.await;
    result
}

/// Forwards the daemon's lines to stdout, settling requests in flight; the token fires when
/// the daemon's side ends.
fn spawn_reader(
    read: tokio::net::unix::OwnedReadHalf,
    pending: Arc<Mutex<Pending>>,
    out: mpsc::UnboundedSender<String>,
) -> CancellationToken {
    let lost = CancellationToken::new();
    let guard = lost.clone().drop_guard();
    tokio::spawn(async move {
        let _guard = guard;
        let mut lines = BufReader::new(read).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            let message: Option<Value> = serde_json::from_str(&line).ok();
            let is_response = message.as_ref().is_some_and(|m| {
                m.get("method").is_none() && (m.get("result").is_some() || m.get("error").is_some())
            });
            if is_response && let Some(id) = message.as_ref().and_then(|m| m.get("id")) {
                let key = id.to_string();
                let mut pending = lock(&pending);
                if pending.swallow.remove(&key) {
                    continue;
                }
                pending.in_flight.remove(&key);
            }
            if out.send(line).is_err() {
                break;
            }
        }
    });
    lost
}

fn lock(pending: &Mutex<Pending>) -> std::sync::MutexGuard<'_, Pending> {
    pending.lock().unwrap_or_else(PoisonError::into_inner)
}

async fn wait(lost: Option<CancellationToken>) {
    match lost {
        Some(token) => token.cancelled().await,
        None => std::future::pending().await,
    }
}

async fn send(write: &mut OwnedWriteHalf, line: &str) -> std::io::Result<()> {
    write.write_all(line.as_bytes()).await?;
    write.write_all(b"\n").await
}

fn error_line(id: &Value, message: &str) -> String {
    json!({"jsonrpc": "2.0", "id": id, "error": {"code": -32603, "message": message}}).to_string()
}

fn fail_in_flight(pending: &Mutex<Pending>, out: &mpsc::UnboundedSender<String>, message: &str) {
    let mut pending = lock(pending);
    for (_, id) in pending.in_flight.drain() {
        let _ = out.send(error_line(&id, message));
    }
    pending.swallow.clear();
}

/// How many times a launch looks for its hosts' owner again after the daemon it started
/// exited at once.
const START_RACES: usize = 3;

/// The daemon's socket, after the hello; starts the daemon if none answers.
///
/// The daemon a launch starts can lose a host's lock to a daemon at another socket that
/// started at the same moment (another launch with another `[server] socket`, a `serve`):
/// it exits at once, and the winner is the daemon to join. So when the started daemon fails,
/// the launch looks for the owner again, and joins it if there is one now.
pub async fn connect_or_start(spec: &DaemonSpec) -> Result<UnixStream, BridgeError> {
    let mut races = 0;
    loop {
        let error = match connect_or_start_once(spec).await {
            Err(error @ BridgeError::Start { .. }) => error,
            done => return done,
        };
        match spec.target()? {
            owner if owner != spec.socket && races < START_RACES => {
                races += 1;
                tracing::info!(owner = %owner.display(), "the daemon this launch started exited; another daemon owns its hosts now: joining it");
            }
            _ => return Err(error),
        }
    }
}

async fn connect_or_start_once(spec: &DaemonSpec) -> Result<UnixStream, BridgeError> {
    let mut target = spec.target()?;
    // The owner of a host may go away between the look and the connect: look again, a few
    // times (each round means a daemon stopped).
    for _ in 0..3 {
        if let Some(stream) = connect(&target, spec).await? {
            return Ok(stream);
        }
        if target == spec.socket {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        target = spec.target()?;
    }
    if target != spec.socket {
        return Err(BridgeError::Refused(format!(
            "the prix-dispatch daemon that owns this launch's hosts holds their locks but does \
             not answer at {}; if it is stuck, stop it ({}) or kill it, and launch again",
            target.display(),
            ownership::stop_command(&target)
        )));
    }
    // Not stdin/stdout: say which path could not be made, for which socket.
    let prepare = |path: &Path| {
        let socket = spec.socket.clone();
        let path = path.to_path_buf();
        move |error| BridgeError::Prepare {
            socket,
            path,
            error,
        }
    };
    if let Some(dir) = spec.socket.parent() {
        std::fs::create_dir_all(dir).map_err(prepare(dir))?;
    }
    // One launch starts the daemon; the others wait on the lock, then find it running.
    let lock_path = spec.socket.with_extension("lock");
    let locking = lock_path.clone();
    let lock_file = tokio::task::spawn_blocking(move || -> std::io::Result<File> {
        let file = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&locking)?;
        file.lock()?;
        Ok(file)
    })
    .await
    .map_err(std::io::Error::other)
    .and_then(|locked| locked)
    .map_err(prepare(&lock_path))?;
    if let Some(stream) = connect(&spec.socket, spec).await? {
        return Ok(stream);
    }
    let log = spec.socket.with_extension("log");
    let mut child = start_daemon(spec, &log).map_err(|e| BridgeError::Start {
        socket: spec.socket.clone(),
        log: log.clone(),
        why: e.to_string(),
    })?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(stream) = connect(&spec.socket, spec).await? {
            drop(lock_file);
            reap_later(child);
            return Ok(stream);
        }
        if let Ok(Some(exit)) = child.try_wait() {
            // It could not start (another daemon owns a host, a port, a bad file): its log
            // says why, and so do we.
            return Err(BridgeError::Start {
                socket: spec.socket.clone(),
                why: format!("it exited ({exit}): {}", last_error_line(&log)),
                log,
            });
        }
        if tokio::time::Instant::now() > deadline {
            reap_later(child);
            return Err(BridgeError::Start {
                socket: spec.socket.clone(),
                log,
                why: "it did not answer within 20 s".into(),
            });
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Connects to `socket` and asks to join with the launch's hosts; `None` when no daemon
/// answers there.
async fn connect(socket: &Path, spec: &DaemonSpec) -> Result<Option<UnixStream>, BridgeError> {
    let hello = Hello {
        prix_dispatch_bridge: PROTOCOL,
        pid: std::process::id(),
        op: Op::Join,
        fleet: Some(spec.fleet.clone()),
    };
    Ok(say_hello(socket, &hello).await?.map(|(stream, _)| stream))
}

/// Asks the daemon at `socket` for its status, or to stop (`prix-dispatch status`, `stop`).
/// `None` when no daemon answers there.
pub async fn ask(socket: &Path, op: Op) -> Result<Option<DaemonInfo>, BridgeError> {
    let hello = Hello {
        prix_dispatch_bridge: PROTOCOL,
        pid: std::process::id(),
        op,
        fleet: None,
    };
    Ok(say_hello(socket, &hello)
        .await?
        .and_then(|(_, welcome)| welcome.info))
}

/// The longest answer a daemon's socket gives to a hello (16 MiB: a status with thousands of
/// clients and hosts).
const WELCOME_LIMIT: usize = 16 << 20;

fn too_long(socket: &Path) -> BridgeError {
    BridgeError::Refused(format!(
        "the daemon at {} answered with more than {} MiB; this prix-dispatch and the daemon \
         may be different versions: stop the daemon and launch again",
        socket.display(),
        WELCOME_LIMIT >> 20
    ))
}

/// Sends `hello`, reads the welcome; the stream stays open for what follows.
async fn say_hello(
    socket: &Path,
    hello: &Hello,
) -> Result<Option<(UnixStream, Welcome)>, BridgeError> {
    let Ok(mut stream) = UnixStream::connect(socket).await else {
        return Ok(None);
    };
    let mut line = serde_json::to_string(hello).map_err(std::io::Error::other)?;
    line.push('\n');
    if stream.write_all(line.as_bytes()).await.is_err() {
        return Ok(None);
    }
    let mut answer = Vec::new();
    if hello.op == Op::Join {
        // Byte by byte: what follows the welcome belongs to the MCP session.
        let mut byte = [0u8; 1];
        loop {
            use tokio::io::AsyncReadExt;
            match tokio::time::timeout(Duration::from_secs(5), stream.read(&mut byte)).await {
                Ok(Ok(1)) if byte[0] == b'\n' => break,
                Ok(Ok(1)) if answer.len() < WELCOME_LIMIT => answer.push(byte[0]),
                Ok(Ok(1)) => return Err(too_long(socket)),
                _ => return Ok(None),
            }
        }
    } else {
        // Status and stop: the answer is the last line (it carries the fleet's status, which
        // grows with the clients it served: a daemon that had served a few dozen distinct
        // users answered past the old 8 KiB limit and was reported as not running).
        use tokio::io::{AsyncBufReadExt, AsyncReadExt};
        let mut reader = tokio::io::BufReader::new((&mut stream).take(WELCOME_LIMIT as u64 + 1));
        match tokio::time::timeout(
            Duration::from_secs(10),
            reader.read_until(b'\n', &mut answer),
        )
        .await
        {
            Ok(Ok(_)) if answer.last() == Some(&b'\n') => {
                answer.pop();
            }
            Ok(Ok(_)) if answer.len() > WELCOME_LIMIT => return Err(too_long(socket)),
            _ => return Ok(None),
        }
    }
    let welcome: Welcome = serde_json::from_slice(&answer).map_err(std::io::Error::other)?;
    if welcome.ok {
        Ok(Some((stream, welcome)))
    } else {
        Err(BridgeError::Refused(
            welcome
                .error
                .unwrap_or_else(|| "refused by the daemon".into()),
        ))
    }
}

/// `prix-dispatch serve --idle-exit`, detached: its own process group (a Ctrl-C meant for
/// the agent host does not reach it), no terminal, output to a log file next to the socket.
fn start_daemon(spec: &DaemonSpec, log: &Path) -> std::io::Result<std::process::Child> {
    use std::os::unix::process::CommandExt;
    let exe = match &spec.program {
        Some(program) => program.clone(),
        None => std::env::current_exe()?,
    };
    let log_file = File::options().create(true).append(true).open(log)?;
    let mut command = std::process::Command::new(exe);
    command
        .arg("serve")
        .arg("--idle-exit")
        .arg("--socket")
        .arg(&spec.socket);
    if let Some(config) = &spec.config {
        command.arg("--config").arg(config);
    }
    command
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(log_file)
        .process_group(0);
    let child = command.spawn()?;
    tracing::info!(pid = child.id(), socket = %spec.socket.display(), "started the prix-dispatch daemon");
    Ok(child)
}

/// Reaps the daemon if it exits while this launch still runs (no zombie); it outlives us
/// otherwise.
fn reap_later(mut child: std::process::Child) {
    std::thread::spawn(move || child.wait());
}

/// The last error or warning a daemon logged, for the launch's message.
fn last_error_line(log: &Path) -> String {
    std::fs::read_to_string(log)
        .ok()
        .and_then(|text| {
            text.lines()
                .rev()
                .find(|l| l.contains("ERROR") || l.contains("Error:"))
                .map(|l| l.trim().to_string())
        })
        .unwrap_or_else(|| "no error in its log".into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fleet::SourceHost;

    fn scratch(tag: &str) -> PathBuf {
        let p = std::env::temp_dir().join(format!("prix-bridge-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        p
    }

    #[tokio::test]
    async fn a_long_status_answer_is_read_whole() {
        // A daemon that served many distinct clients answers `status` with a long line.
        use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
        let dir = scratch("long-status");
        let socket = dir.join("d.sock");
        let listener = tokio::net::UnixListener::bind(&socket).unwrap();
        let long = "x".repeat(300_000);
        let answer = serde_json::to_string(&Welcome {
            ok: false,
            error: Some(long.clone()),
            info: None,
        })
        .unwrap();
        tokio::spawn(async move {
            let (stream, _) = listener.accept().await.unwrap();
            let (read, mut write) = stream.into_split();
            let mut hello = String::new();
            tokio::io::BufReader::new(read)
                .read_line(&mut hello)
                .await
                .unwrap();
            write.write_all(answer.as_bytes()).await.unwrap();
            write.write_all(b"\n").await.unwrap();
        });
        let hello = Hello {
            prix_dispatch_bridge: PROTOCOL,
            pid: std::process::id(),
            op: Op::Status,
            fleet: None,
        };
        match say_hello(&socket, &hello).await {
            Err(BridgeError::Refused(message)) => assert_eq!(message.len(), long.len()),
            Err(e) => panic!("{e}"),
            Ok(other) => panic!("the answer was not read: {:?}", other.map(|(_, w)| w.ok)),
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    fn spec(at: &Path, socket: PathBuf) -> DaemonSpec {
        DaemonSpec {
            socket,
            dir: DaemonDir::at(at.join("dir")).unwrap(),
            fleet: SourceFleet {
                key: "environment:x".into(),
                source: "environment".into(),
                file: None,
                hosts: vec![SourceHost {
                    name: "gpu".into(),
                    base_url: "http://127.0.0.1:9".into(),
                    slots: 1,
                    api_key: None,
                    max_loaded_models: 1,
                    load_seconds: 1.0,
                }],
                env: Default::default(),
            },
            config: None,
            program: None,
        }
    }

    #[tokio::test]
    async fn a_socket_directory_that_cannot_be_made_is_a_start_error_naming_it() {
        let at = scratch("nodir");
        let file = at.join("a-file");
        std::fs::write(&file, "").unwrap();
        let socket = file.join("sub").join("daemon.sock");
        let error = connect_or_start(&spec(&at, socket.clone()))
            .await
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("could not start the prix-dispatch daemon")
                && error.contains(&file.join("sub").display().to_string())
                && !error.contains("stdin/stdout"),
            "{error}"
        );
        std::fs::remove_dir_all(at).unwrap();
    }

    #[tokio::test]
    async fn a_launch_whose_daemon_lost_the_race_for_a_host_joins_the_winner() {
        let at = scratch("race");
        let mut spec = spec(&at, at.join("launch.sock"));
        // The daemon it starts exits as one that lost a host's lock does, once the lock is
        // taken (a daemon exits only after another holds the lock; a program that exits at
        // once raced the taker below, and lost under load).
        let program = at.join("loser.sh");
        let lost = at.join("loser.sh.lost");
        std::fs::write(
            &program,
            "#!/bin/sh\nfor _ in $(seq 2000); do [ -e \"$0.lost\" ] && break; sleep 0.01; done\n\
             echo 'ERROR another daemon holds the host' >&2\nexit 1\n",
        )
        .unwrap();
        std::fs::set_permissions(
            &program,
            std::os::unix::fs::PermissionsExt::from_mode(0o755),
        )
        .unwrap();
        spec.program = Some(program);
        // The winner: a daemon at another socket that welcomes any launch.
        let winner_socket = at.join("winner.sock");
        let winner = tokio::net::UnixListener::bind(&winner_socket).unwrap();
        let welcomed = tokio::spawn(async move {
            let (stream, _) = winner.accept().await.unwrap();
            let (read, mut write) = stream.into_split();
            let mut hello = String::new();
            BufReader::new(read).read_line(&mut hello).await.unwrap();
            write.write_all(b"{\"ok\":true}\n").await.unwrap();
            hello
        });
        // It takes the host just as the launch starts its own daemon (whose log file appears
        // then), and only then lets that daemon exit.
        let (dir, log) = (spec.dir.clone(), spec.socket.with_extension("log"));
        let identity = spec.fleet.hosts[0].identity();
        let owner = ownership::Owner {
            pid: std::process::id(),
            socket: winner_socket.clone(),
            source: "winner.toml".into(),
            launched: true,
        };
        let taker = std::thread::spawn(move || {
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            while !log.exists() && std::time::Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(1));
            }
            let lock = ownership::acquire(&dir, &identity, &owner).unwrap();
            std::fs::write(lost, "").unwrap();
            lock
        });
        let joined = tokio::time::timeout(Duration::from_secs(20), connect_or_start(&spec))
            .await
            .expect("bounded");
        let lock = taker.join().unwrap();
        joined.expect("joined the daemon that won the host");
        assert!(welcomed.await.unwrap().contains("\"op\":\"join\""));
        drop(lock);
        std::fs::remove_dir_all(at).unwrap();
    }
}
