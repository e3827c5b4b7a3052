//! What the CLI's lab tests share.

use std::fs::File;
use std::os::fd::AsRawFd;

/// Serialises guest-booting tests across test processes (`flock` on
/// `/run/tern/agent-tests.lock`, released when dropped): each test binary runs its tests one
/// at a time, but cargo runs several binaries, and two labs of guests on 2 cores would make
/// every timing meaningless.
pub struct GuestLock(#[allow(dead_code)] File);

impl GuestLock {
    /// Blocks until no other guest-booting test holds the lock.
    pub fn take() -> Self {
        std::fs::create_dir_all("/run/tern").expect("create /run/tern");
        let f = File::create("/run/tern/agent-tests.lock").expect("lock file");
        // SAFETY: flock on a valid, open file descriptor.
        let rc = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) };
        assert_eq!(rc, 0, "flock failed");
        GuestLock(f)
    }
}
