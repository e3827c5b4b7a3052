//! Running `ip` and `tc`, and entering namespaces from a dedicated thread.

use std::fs::File;
use std::process::Command;

use nix::sched::{CloneFlags, setns, unshare};

use crate::error::LabError;

/// Runs `program args…`, returning stdout; a non-zero exit becomes [`LabError::CommandFailed`]
/// carrying stderr, so the caller sees exactly what `ip`/`tc` complained about.
pub(crate) fn run(program: &str, args: &[&str]) -> Result<String, LabError> {
    let command = format!("{program} {}", args.join(" "));
    tracing::debug!(%command, "lab command");
    let out = Command::new(program)
        .args(args)
        .output()
        .map_err(|source| LabError::Spawn {
            command: command.clone(),
            source,
        })?;
    if !out.status.success() {
        return Err(LabError::CommandFailed {
            command,
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `ip -n <netns> args…`.
pub(crate) fn ip_in(netns: &str, args: &[&str]) -> Result<String, LabError> {
    let mut all = vec!["-n", netns];
    all.extend_from_slice(args);
    run("ip", &all)
}

/// `tc -n <netns> args…`.
pub(crate) fn tc_in(netns: &str, args: &[&str]) -> Result<String, LabError> {
    let mut all = vec!["-n", netns];
    all.extend_from_slice(args);
    run("tc", &all)
}

/// Path of a named network namespace as `ip netns` keeps it.
pub(crate) fn netns_file(netns: &str) -> std::path::PathBuf {
    std::path::Path::new("/run/netns").join(netns)
}

/// Runs `f` on a fresh thread that has joined network namespace `netns`.
///
/// Namespaces are per thread in Linux, so a dedicated thread can `setns(2)` without moving the rest
/// of the process; every socket that `f` creates belongs to `netns` for its whole life and may be
/// used from any thread afterwards. Children spawned by `f` start inside `netns` too.
pub(crate) fn in_netns<T: Send>(netns: &str, f: impl FnOnce() -> T + Send) -> Result<T, LabError> {
    let path = netns_file(netns);
    let file = File::open(&path).map_err(|e| LabError::Sys {
        what: format!("open namespace {}", path.display()),
        source: nix::Error::from_raw(e.raw_os_error().unwrap_or(libc_enoent())),
    })?;
    std::thread::scope(|scope| {
        scope
            .spawn(move || {
                setns(&file, CloneFlags::CLONE_NEWNET).map_err(|source| LabError::Sys {
                    what: format!("setns into {netns}"),
                    source,
                })?;
                Ok(f())
            })
            .join()
            .map_err(|_| LabError::NetnsThreadPanicked {
                netns: netns.to_string(),
            })?
    })
}

/// Runs `f` on a fresh thread inside a brand-new, anonymous network namespace, which vanishes when
/// the thread and the children it spawned are gone: probing kernel features this way can never
/// leave anything behind, not even after a crash.
pub(crate) fn in_throwaway_netns<T: Send>(f: impl FnOnce() -> T + Send) -> Result<T, LabError> {
    std::thread::scope(|scope| {
        scope
            .spawn(move || {
                unshare(CloneFlags::CLONE_NEWNET).map_err(|source| LabError::Sys {
                    what: "unshare a throwaway network namespace".to_string(),
                    source,
                })?;
                Ok(f())
            })
            .join()
            .map_err(|_| LabError::NetnsThreadPanicked {
                netns: "(throwaway)".to_string(),
            })?
    })
}

fn libc_enoent() -> i32 {
    nix::errno::Errno::ENOENT as i32
}
