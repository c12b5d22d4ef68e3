//! Where this user's daemon lives: one directory per user per machine, the same for every
//! launch whatever its environment.
//!
//! Agent hosts launch MCP servers with different environments (the TypeScript MCP SDK passes
//! only HOME, LOGNAME, PATH, SHELL, TERM and USER by default), so a location derived from
//! `XDG_RUNTIME_DIR`, `TMPDIR` or the working directory splits one user's launches across
//! several daemons. The directory is `/tmp/prix-dispatch-<uid>`: fixed, keyed by the uid
//! (which no launcher changes), created 0700 and refused if another user owns it or it is
//! open to others (`/tmp` is shared, so someone could have created it first).

use std::io;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Errors finding or creating the daemon directory.
#[derive(Debug, thiserror::Error)]
pub enum DaemonDirError {
    #[error("cannot create the prix-dispatch directory {path}: {error}")]
    Create { path: PathBuf, error: io::Error },
    #[error(
        "{path} is owned by uid {owner}, not by this user (uid {uid}); someone else created it. \
         Remove it (or ask its owner to), then launch again"
    )]
    NotOwned { path: PathBuf, owner: u32, uid: u32 },
    #[error(
        "{path} is open to other users (mode {mode:o}); prix-dispatch keeps its socket and host \
         locks there. Run `chmod 700 {path}` and launch again"
    )]
    TooOpen { path: PathBuf, mode: u32 },
    #[error("{path} exists but is not a directory; remove it and launch again")]
    NotADirectory { path: PathBuf },
}

/// This user's daemon directory: the default socket, the host locks, the daemon's log.
#[derive(Debug, Clone)]
pub struct DaemonDir {
    path: PathBuf,
}

impl DaemonDir {
    /// `/tmp/prix-dispatch-<uid>`, created if missing. Reads no environment variable.
    pub fn for_this_user() -> Result<DaemonDir, DaemonDirError> {
        Self::at(this_users_path())
    }

    /// A daemon directory at `path` (tests use their own), created 0700 if missing; refused
    /// when another user owns it or others may enter it.
    pub fn at(path: PathBuf) -> Result<DaemonDir, DaemonDirError> {
        match std::fs::create_dir(&path) {
            Ok(()) => {
                std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o700)).map_err(
                    |error| DaemonDirError::Create {
                        path: path.clone(),
                        error,
                    },
                )?;
            }
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(error) => return Err(DaemonDirError::Create { path, error }),
        }
        // symlink_metadata: a symlink planted in /tmp must not redirect us elsewhere.
        let meta = std::fs::symlink_metadata(&path).map_err(|error| DaemonDirError::Create {
            path: path.clone(),
            error,
        })?;
        if !meta.is_dir() {
            return Err(DaemonDirError::NotADirectory { path });
        }
        let uid = current_uid();
        if meta.uid() != uid {
            return Err(DaemonDirError::NotOwned {
                path,
                owner: meta.uid(),
                uid,
            });
        }
        let mode = meta.mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(DaemonDirError::TooOpen { path, mode });
        }
        Ok(DaemonDir { path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The default socket where launches find the daemon (`[server] socket` overrides it).
    pub fn socket(&self) -> PathBuf {
        self.path.join("daemon.sock")
    }

    /// The lock file of a host, by identity ([`crate::config::host_identity`]).
    pub fn host_lock(&self, identity: &str) -> PathBuf {
        self.path
            .join("hosts")
            .join(format!("{:016x}.lock", fnv1a(identity.as_bytes())))
    }

    /// Where a daemon started by a launch writes its log.
    pub fn log(&self) -> PathBuf {
        self.path.join("daemon.log")
    }
}

/// `/tmp/prix-dispatch-<uid>`, without creating it.
fn this_users_path() -> PathBuf {
    Path::new("/tmp").join(format!("prix-dispatch-{}", current_uid()))
}

/// This user's default daemon socket, without creating its directory: what
/// `prix-dispatch stop` and `status` reach without `--socket`.
pub fn default_socket() -> PathBuf {
    this_users_path().join("daemon.sock")
}

/// The real uid of this process (Linux: the owner of `/proc/self`).
pub fn current_uid() -> u32 {
    std::fs::metadata("/proc/self")
        .map(|m| m.uid())
        .unwrap_or(u32::MAX)
}

/// FNV-1a: stable across builds and platforms, unlike std's hasher.
pub(crate) fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, b| {
        (hash ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(tag: &str) -> PathBuf {
        let p = std::env::temp_dir().join(format!("prix-dir-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        p
    }

    #[test]
    fn created_private_and_found_again() {
        let p = scratch("new");
        let dir = DaemonDir::at(p.clone()).unwrap();
        let mode = std::fs::metadata(&p).unwrap().mode() & 0o777;
        assert_eq!(mode, 0o700);
        assert_eq!(dir.socket(), p.join("daemon.sock"));
        DaemonDir::at(p.clone()).expect("an existing private directory is fine");
        std::fs::remove_dir_all(p).unwrap();
    }

    #[test]
    fn a_directory_open_to_others_is_refused_with_the_fix() {
        let p = scratch("open");
        std::fs::create_dir(&p).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o777)).unwrap();
        let err = DaemonDir::at(p.clone()).unwrap_err().to_string();
        assert!(err.contains("chmod 700"), "{err}");
        std::fs::remove_dir_all(p).unwrap();
    }

    #[test]
    fn a_file_or_symlink_in_its_place_is_refused() {
        let p = scratch("link");
        std::os::unix::fs::symlink("/", &p).unwrap();
        assert!(matches!(
            DaemonDir::at(p.clone()),
            Err(DaemonDirError::NotADirectory { .. })
        ));
        std::fs::remove_file(p).unwrap();
    }

    #[test]
    fn the_default_ignores_the_environment() {
        // No variable is read: the path is fixed by the uid alone.
        let dir = DaemonDir::for_this_user().unwrap();
        assert_eq!(
            dir.path(),
            Path::new(&format!("/tmp/prix-dispatch-{}", current_uid()))
        );
    }
}
