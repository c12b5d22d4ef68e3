//! Host ownership: exactly one daemon schedules a host.
//!
//! A daemon holds an exclusive `flock` on one file per host it schedules, in this user's
//! daemon directory, for as long as it schedules the host. The file names the owner (pid,
//! socket, configuration source), so a launch can find the daemon that owns its hosts and a
//! second daemon can say who is in its way. The kernel drops the lock when the process dies,
//! however it dies, so a lock is never stale; the file itself is removed on release.

use std::fs::File;
use std::io::{self, Read, Seek, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::daemon_dir::DaemonDir;

/// Who owns a host, as written in its lock file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Owner {
    pub pid: u32,
    /// The socket where launches reach that daemon.
    pub socket: PathBuf,
    /// Its configuration source, for messages ("/home/me/fleet.toml", "environment …").
    pub source: String,
    /// Started by a `stdio` launch (extends its fleet for later launches) rather than by hand.
    pub launched: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum OwnershipError {
    #[error("{host} is already scheduled by another prix-dispatch daemon ({})", describe(.owner))]
    Held { host: String, owner: Option<Owner> },
    #[error("cannot lock {path} (the lock of {host}): {error}")]
    Io {
        host: String,
        path: PathBuf,
        error: io::Error,
    },
}

fn describe(owner: &Option<Owner>) -> String {
    match owner {
        Some(o) if o.is_standalone() => format!(
            "pid {}, configuration {}, `prix-dispatch stdio --standalone`, which takes no launches",
            o.pid, o.source
        ),
        Some(o) => format!(
            "pid {}, configuration {}, socket {}",
            o.pid,
            o.source,
            o.socket.display()
        ),
        None => "it has not written its name yet".into(),
    }
}

impl Owner {
    /// A `stdio --standalone` process: it holds its hosts but has no socket.
    pub fn is_standalone(&self) -> bool {
        self.socket.as_os_str().is_empty()
    }
}

/// The command that stops the daemon at `socket`: `--socket` unless it is this user's
/// default one, which `prix-dispatch stop` reaches by itself.
pub fn stop_command(socket: &Path) -> String {
    if socket == crate::daemon_dir::default_socket() {
        "`prix-dispatch stop`".into()
    } else {
        format!("`prix-dispatch stop --socket {}`", socket.display())
    }
}

/// How to stop `owner`, for messages: its stop command, or for a `stdio --standalone`
/// (which no socket reaches) how to end that process.
pub fn stop_hint(owner: &Owner) -> String {
    if owner.is_standalone() {
        format!(
            "end that `prix-dispatch stdio --standalone`, pid {}: close the agent session that \
             runs it, or `kill {}`",
            owner.pid, owner.pid
        )
    } else {
        stop_command(&owner.socket)
    }
}

impl OwnershipError {
    /// How to stop the daemon in the way, for messages.
    pub fn stop_hint(&self) -> String {
        match self {
            OwnershipError::Held {
                owner: Some(owner), ..
            } => stop_hint(owner),
            _ => "`prix-dispatch stop`, or `prix-dispatch stop --socket PATH` for a daemon at \
                  another socket"
                .into(),
        }
    }
}

/// A held host lock; dropping it removes the file and releases the host.
#[derive(Debug)]
pub struct HostLock {
    file: File,
    path: PathBuf,
    identity: String,
}

impl HostLock {
    pub fn identity(&self) -> &str {
        &self.identity
    }
}

impl Drop for HostLock {
    fn drop(&mut self) {
        // Remove the file while still holding the lock, and only if it is still ours: a
        // daemon that opened the path meanwhile notices the unlink and opens it anew.
        if same_file(&self.file, &self.path) {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

fn same_file(file: &File, path: &Path) -> bool {
    match (file.metadata(), std::fs::metadata(path)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

/// Takes `identity` for `owner`, or says who holds it.
pub fn acquire(dir: &DaemonDir, identity: &str, owner: &Owner) -> Result<HostLock, OwnershipError> {
    let path = dir.host_lock(identity);
    let io_error = |error| OwnershipError::Io {
        host: identity.to_string(),
        path: path.clone(),
        error,
    };
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(io_error)?;
    }
    // A releasing daemon unlinks the file under its lock; if we locked that unlinked file,
    // open again. Bounded: each round means someone else holds or replaced it.
    for _ in 0..16 {
        let mut file = File::options()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(&path)
            .map_err(io_error)?;
        match file.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => match read_owner(&mut file) {
                // A live owner that names itself holds it.
                Some(owner) if process_exists(owner.pid) => {
                    return Err(OwnershipError::Held {
                        host: identity.to_string(),
                        owner: Some(owner),
                    });
                }
                // A nameless holder is an owner about to write its name; a name of a process
                // that is gone was left by a daemon that was killed, and the holder is a launch
                // looking it up ([`owner_of`]: a shared lock for microseconds). Either way the
                // lock is about to be free or named: look again shortly.
                _ => {
                    std::thread::sleep(std::time::Duration::from_millis(5));
                    continue;
                }
            },
            Err(std::fs::TryLockError::Error(error)) => return Err(io_error(error)),
        }
        if !same_file(&file, &path) {
            continue;
        }
        let text = serde_json::to_string(owner).map_err(|e| io_error(io::Error::other(e)))?;
        file.set_len(0).map_err(io_error)?;
        file.rewind().map_err(io_error)?;
        file.write_all(text.as_bytes()).map_err(io_error)?;
        return Ok(HostLock {
            file,
            path,
            identity: identity.to_string(),
        });
    }
    Err(OwnershipError::Held {
        host: identity.to_string(),
        owner: None,
    })
}

/// The daemon that holds `identity` now, if any.
pub fn owner_of(dir: &DaemonDir, identity: &str) -> Option<Owner> {
    let path = dir.host_lock(identity);
    let mut file = File::options().read(true).open(&path).ok()?;
    match file.try_lock_shared() {
        // Nobody holds it: a file left by a daemon that was killed.
        Ok(()) => None,
        Err(std::fs::TryLockError::WouldBlock) => read_owner(&mut file),
        Err(std::fs::TryLockError::Error(_)) => None,
    }
}

/// Whether process `pid` still exists (Linux: `/proc/<pid>`). A zombie — exited, not yet
/// reaped by its parent — counts as gone once its last thread is gone: its file descriptors,
/// and so its host locks, are closed by then.
pub fn process_exists(pid: u32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // "pid (comm) state …": comm may hold spaces and parentheses, so read after the last ')'.
    let state = stat
        .rfind(')')
        .and_then(|end| stat[end + 1..].trim_start().chars().next());
    match state {
        // The main thread of an exiting process turns zombie first, while its other threads
        // (which share its open files, and so its locks) are still being torn down.
        Some('Z' | 'X') => std::fs::read_dir(format!("/proc/{pid}/task"))
            .map(|tasks| tasks.count() > 1)
            .unwrap_or(false),
        Some(_) => true,
        None => false,
    }
}

fn read_owner(file: &mut File) -> Option<Owner> {
    let mut text = String::new();
    file.rewind().ok()?;
    file.read_to_string(&mut text).ok()?;
    serde_json::from_str(&text).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir(tag: &str) -> DaemonDir {
        let p = std::env::temp_dir().join(format!("prix-own-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        DaemonDir::at(p).unwrap()
    }

    fn owner(pid: u32) -> Owner {
        Owner {
            pid,
            socket: "/tmp/x.sock".into(),
            source: "fleet.toml".into(),
            launched: false,
        }
    }

    #[test]
    fn how_to_stop_an_owner_names_its_socket_unless_it_is_the_default() {
        assert_eq!(
            stop_command(&crate::daemon_dir::default_socket()),
            "`prix-dispatch stop`"
        );
        assert_eq!(
            stop_hint(&owner(7)),
            "`prix-dispatch stop --socket /tmp/x.sock`"
        );
        let standalone = Owner {
            socket: PathBuf::new(),
            ..owner(7)
        };
        let hint = stop_hint(&standalone);
        assert!(
            hint.contains("--standalone") && hint.contains("kill 7"),
            "{hint}"
        );
        let held = OwnershipError::Held {
            host: "http://gpu:1".into(),
            owner: Some(standalone),
        }
        .to_string();
        assert!(
            !held.contains("socket )") && held.contains("pid 7"),
            "{held}"
        );
    }

    #[test]
    fn a_process_exists_until_it_exits_even_unreaped() {
        assert!(process_exists(std::process::id()));
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        assert!(process_exists(child.id()));
        child.kill().unwrap();
        // Not reaped yet: a zombie, whose locks the kernel already dropped.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while process_exists(child.id()) && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        assert!(
            !process_exists(child.id()),
            "a killed, unreaped child is gone"
        );
        child.wait().unwrap();
        assert!(!process_exists(child.id()));
    }

    #[test]
    fn one_owner_at_a_time_and_the_second_learns_who() {
        let d = dir("one");
        let id = "http://127.0.0.1:1234";
        assert_eq!(owner_of(&d, id), None);
        let lock = acquire(&d, id, &owner(1)).unwrap();
        assert_eq!(owner_of(&d, id), Some(owner(1)));
        match acquire(&d, id, &owner(2)) {
            Err(OwnershipError::Held { owner: Some(o), .. }) => assert_eq!(o.pid, 1),
            other => panic!("expected Held, got {other:?}"),
        }
        let other_host = acquire(&d, "http://127.0.0.1:1235", &owner(2));
        assert!(other_host.is_ok(), "another host is free");
        drop(lock);
        assert!(!d.host_lock(id).exists(), "no lock file left behind");
        assert_eq!(owner_of(&d, id), None);
        let again = acquire(&d, id, &owner(2)).unwrap();
        assert_eq!(owner_of(&d, id).map(|o| o.pid), Some(2));
        drop(again);
        std::fs::remove_dir_all(d.path()).unwrap();
    }

    #[test]
    fn a_dead_owner_named_under_a_lookups_momentary_shared_lock_is_not_reported() {
        let d = dir("dead");
        let id = "http://gpu:4321";
        let path = d.host_lock(id);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        let mut gone = std::process::Command::new("true").spawn().unwrap();
        gone.wait().unwrap();
        std::fs::write(&path, serde_json::to_string(&owner(gone.id())).unwrap()).unwrap();
        // A launch's owner lookup holds a shared lock while a new daemon takes the host.
        let looker = File::open(&path).unwrap();
        looker.try_lock_shared().unwrap();
        let lookup = std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(30));
            drop(looker);
        });
        let lock = acquire(&d, id, &owner(std::process::id()))
            .expect("taken once the lookup is done, not refused naming a dead pid");
        lookup.join().unwrap();
        assert_eq!(owner_of(&d, id).map(|o| o.pid), Some(std::process::id()));
        drop(lock);
        std::fs::remove_dir_all(d.path()).unwrap();
    }

    #[test]
    fn a_file_left_by_a_killed_daemon_is_not_an_owner() {
        let d = dir("stale");
        let id = "http://gpu:1234";
        let path = d.host_lock(id);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, serde_json::to_string(&owner(9)).unwrap()).unwrap();
        assert_eq!(owner_of(&d, id), None, "nobody holds the lock");
        let lock = acquire(&d, id, &owner(3)).expect("taken over");
        assert_eq!(owner_of(&d, id).map(|o| o.pid), Some(3));
        drop(lock);
        std::fs::remove_dir_all(d.path()).unwrap();
    }
}
