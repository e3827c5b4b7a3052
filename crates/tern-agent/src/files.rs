//! The agent's files: a private runtime directory (0700) and an exclusive lock on it, so two
//! agents never share one database (each would settle the other's migrations).

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::AgentError;

/// Holds `agent.lock` in the runtime directory (`flock`, exclusive) for as long as it lives;
/// the kernel releases it when the process dies, so a killed agent never blocks its restart.
#[derive(Debug)]
pub struct RuntimeLock {
    _file: File,
    path: PathBuf,
}

impl RuntimeLock {
    /// The lock file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Creates `dir` (and parents) and makes `dir` itself 0700: it holds the database, QMP
/// sockets and guest serial logs, none of which other users may read.
pub fn private_dir(dir: &Path) -> Result<(), AgentError> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .and_then(|_| std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)))
        .map_err(|e| {
            AgentError::Config(format!(
                "runtime_dir {}: cannot create it private (0700): {e}",
                dir.display()
            ))
        })
}

/// Takes the exclusive lock of runtime directory `dir`, writing this process's PID into it;
/// refuses, naming the holder's PID, when another agent holds it.
pub fn lock_runtime_dir(dir: &Path) -> Result<RuntimeLock, AgentError> {
    let path = dir.join("agent.lock");
    let io = |e: std::io::Error| AgentError::Internal(format!("{}: {e}", path.display()));
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(&path)
        .map_err(io)?;
    // SAFETY: flock on a file descriptor we own; no memory is shared with the kernel.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc != 0 {
        let mut text = String::new();
        let _ = file.read_to_string(&mut text);
        let holder = text.trim();
        return Err(AgentError::Conflict(format!(
            "the agent database in {} is held by another agent (pid {}): stop that agent, or \
             give this one another runtime_dir",
            dir.display(),
            if holder.is_empty() { "unknown" } else { holder }
        )));
    }
    file.set_len(0)
        .and_then(|_| file.seek(SeekFrom::Start(0)))
        .and_then(|_| writeln!(file, "{}", std::process::id()))
        .map_err(io)?;
    Ok(RuntimeLock { _file: file, path })
}

/// Creates the database file 0600 before SQLite opens it (SQLite gives its WAL and shared
/// memory files the database's mode), and tightens an existing one.
pub fn private_file(path: &Path) -> Result<(), AgentError> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(path)
        .and_then(|_| std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)))
        .map_err(|e| AgentError::Internal(format!("{}: {e}", path.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_runtime_dir_is_private_and_locked_once() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("a/b");
        private_dir(&dir).unwrap();
        let mode = std::fs::metadata(&dir).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700);
        let lock = lock_runtime_dir(&dir).unwrap();
        let text = std::fs::read_to_string(lock.path()).unwrap();
        assert_eq!(text.trim(), std::process::id().to_string());
        // A second holder (flock locks are per open file description) is refused with the PID.
        let e = lock_runtime_dir(&dir).unwrap_err();
        assert!(matches!(e, AgentError::Conflict(_)));
        let e = e.to_string();
        assert!(
            e.contains(&format!("pid {}", std::process::id())) && e.contains("another agent"),
            "{e}"
        );
        drop(lock);
        let again = lock_runtime_dir(&dir).unwrap();
        drop(again);
        let db = dir.join("agent.db");
        private_file(&db).unwrap();
        assert_eq!(
            std::fs::metadata(&db).unwrap().permissions().mode() & 0o777,
            0o600
        );
    }

    /// Kills `flock` and the holder it forked by PID on every path (a panicking assertion
    /// included).
    struct Child(std::process::Child, Option<u32>);
    impl Drop for Child {
        fn drop(&mut self) {
            if let Some(pid) = self.1 {
                // SAFETY: kill(2) on a PID this test started.
                unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
            }
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    /// Another process (util-linux `flock`, standing in for another agent) holds the lock
    /// and has written its PID: the refusal names that PID.
    #[test]
    fn a_lock_held_by_another_process_is_refused_naming_its_pid() {
        let dir = tempfile::tempdir().unwrap();
        let lock = dir.path().join("agent.lock");
        let child = std::process::Command::new("flock")
            .arg("-n")
            .arg(&lock)
            .args(["sh", "-c", "echo $$ > \"$0\"; exec sleep 30"])
            .arg(&lock)
            .spawn()
            .expect("util-linux flock is needed for this test");
        let mut child = Child(child, None);
        // flock(1) forks the holder, which writes its own PID.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        let pid: u32 = loop {
            if let Ok(p) = std::fs::read_to_string(&lock)
                .unwrap_or_default()
                .trim()
                .parse()
            {
                break p;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the other process never wrote its PID"
            );
            std::thread::sleep(std::time::Duration::from_millis(5));
        };
        child.1 = Some(pid);
        assert_ne!(pid, std::process::id());
        let e = lock_runtime_dir(dir.path()).unwrap_err().to_string();
        assert!(e.contains(&format!("pid {pid}")), "{e}");
        drop(child);
        // Released when the holder dies: this agent may start now.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while lock_runtime_dir(dir.path()).is_err() {
            assert!(
                std::time::Instant::now() < deadline,
                "the lock outlived its holder"
            );
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
    }
}
