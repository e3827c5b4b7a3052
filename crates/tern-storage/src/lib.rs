//! Storage migration of local (non-shared) disks: QEMU's block mirror from the source to an
//! NBD export on the destination, the sequence libvirt uses for non-shared storage
//! (`qemuMigrationSrcNBDStorageCopy` and friends in libvirt's `src/qemu/qemu_migration.c`):
//!
//! 1. destination (started with `-incoming defer` from the same `VmSpec`, its disk images
//!    pre-created with the source's sizes): `nbd-server-start`, then `block-export-add`
//!    (`nbd`, writable) of each disk's format node — [`NbdExports::start`];
//! 2. source: `blockdev-add` of an NBD client node per disk, then `blockdev-mirror`
//!    (`sync=full`, `copy-mode=write-blocking` when post-copy may be used) —
//!    [`DiskMirrors::start`];
//! 3. wait until every mirror is `ready` *before* RAM migration starts
//!    ([`DiskMirrors::wait_ready`]); [`DiskMirrors::progress`] reports bytes per disk;
//! 4. at switchover, end each mirror with `block-job-cancel` *without* `force` — on a ready
//!    mirror that is QEMU's "complete without pivot": it drains, leaves the target a
//!    consistent copy and keeps the source on its own image ([`DiskMirrors::complete`]);
//!    then the destination's exports go and its server stops ([`NbdExports::stop`]).
//!    The switchover point is the migration's `pre-switchover` pause: the source runs with
//!    the `pause-before-switchover` capability, QEMU stops the guest and waits *before* it
//!    inactivates the source's block nodes and sends device state — for the end of
//!    pre-copy and for the switch to post-copy alike; the mirrors are completed there and
//!    `migrate-continue` resumes ([`StorageMigration::switchover`]). libvirt does the same:
//!    `qemuMigrationAnyCompleted` returns at `QEMU_MIGRATION_COMPLETED_PRE_SWITCHOVER` "so
//!    that it can finish all block jobs, resume migration, and wait again for the real end
//!    of the migration";
//! 5. on abort before the switch, `block-job-cancel` with `force` and the NBD client nodes
//!    are removed ([`DiskMirrors::abort`]); the source image was only ever read, so it is
//!    untouched; the destination's exports are removed ([`NbdExports::stop`]) and the
//!    destination QEMU and image are the caller's to delete.
//!
//! The two halves are separate because tern may reach the destination only through its
//! agent; [`StorageMigration`] joins them when both QMP clients are at hand.
//!
//! Mirrors are started with `auto-dismiss: false` (as libvirt does), so a job that fails
//! stays listed, with its error, until tern has seen it and dismissed it.

use std::time::Duration;

use tern_qemu::DiskSpec;
use tern_qmp::{
    BlockExportRemoveMode, BlockJobInfo, BlockdevMirrorArgs, InetAddr, JobStatus,
    MigrationCapability, MigrationStatus, MirrorCopyMode, MirrorSyncMode, QmpClient, QmpError,
};

/// The source capability storage migration needs: QEMU pauses in `pre-switchover` with the
/// guest stopped and its disks still active, where [`StorageMigration::switchover`] ends
/// the mirrors (see the crate documentation).
pub const SWITCHOVER_CAPABILITY: MigrationCapability = MigrationCapability::PauseBeforeSwitchover;

pub mod image;
mod progress;

pub use image::{
    ImageError, ImageInfo, check_format, check_free_space, create_image, free_space, image_info,
};
pub use progress::{DiskProgress, StorageProgress};

/// Period of `query-block-jobs` polls while waiting.
pub const POLL: Duration = Duration::from_millis(100);

/// What can go wrong migrating storage.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// A QMP command failed (QEMU refused it, or QEMU is gone).
    #[error("{step}: {source}")]
    Qmp {
        /// What tern was doing.
        step: String,
        /// The QMP error.
        #[source]
        source: QmpError,
    },
    /// A mirror job ended with an error or before it was ready.
    #[error("mirror of disk {disk:?} failed: {error}")]
    MirrorFailed {
        /// The disk id.
        disk: String,
        /// QEMU's error, or what happened.
        error: String,
    },
    /// Completion was asked while a mirror was not in sync; cancelling it without `force`
    /// would leave an inconsistent target.
    #[error(
        "mirror of disk {disk:?} is not ready ({offset} of {len} bytes copied): wait for \
             every mirror to be ready before the switchover"
    )]
    NotReady {
        /// The disk id.
        disk: String,
        /// Bytes copied.
        offset: u64,
        /// Bytes in total.
        len: u64,
    },
    /// A wait ran out of time.
    #[error("timed out after {waited:?} waiting for {what}; {progress}")]
    Timeout {
        /// What tern waited for.
        what: String,
        /// How long.
        waited: Duration,
        /// Progress at the time.
        progress: StorageProgress,
    },
    /// The list of disks is unusable.
    #[error("{0}")]
    Invalid(String),
}

/// Result alias.
pub type Result<T, E = StorageError> = std::result::Result<T, E>;

fn qmp(step: impl Into<String>) -> impl FnOnce(QmpError) -> StorageError {
    let step = step.into();
    move |source| StorageError::Qmp { step, source }
}

/// One disk copied by the migration, named as the `VmSpec` names it on both ends (both
/// QEMUs are started from the same spec, so the format node has the same name on both).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MirroredDisk {
    /// The disk id ([`DiskSpec::id`]).
    pub id: String,
    /// The format node on both ends ([`DiskSpec::node_name`]).
    pub node_name: String,
}

impl From<&DiskSpec> for MirroredDisk {
    fn from(d: &DiskSpec) -> Self {
        Self {
            id: d.id.clone(),
            node_name: d.node_name(),
        }
    }
}

impl MirroredDisk {
    /// The destination's export id.
    pub fn export_id(&self) -> String {
        format!("tern-export-{}", self.id)
    }

    /// The NBD export name (what the source's client asks for): the node name.
    pub fn export_name(&self) -> &str {
        &self.node_name
    }

    /// The source's mirror job id.
    pub fn job_id(&self) -> String {
        format!("tern-mirror-{}", self.id)
    }

    /// The mirror's filter node on the source, above the disk's format node: guest writes
    /// pass through it while the mirror runs.
    pub fn filter_node(&self) -> String {
        format!("tern-mirror-top-{}", self.id)
    }

    /// The source's NBD client node (the mirror target).
    pub fn nbd_node(&self) -> String {
        format!("tern-nbd-{}", self.id)
    }
}

fn check_disks(disks: &[MirroredDisk]) -> Result<()> {
    if disks.is_empty() {
        return Err(StorageError::Invalid(
            "no disks to migrate: give at least one local disk".into(),
        ));
    }
    for (i, d) in disks.iter().enumerate() {
        if disks[..i].iter().any(|o| o.id == d.id) {
            return Err(StorageError::Invalid(format!(
                "disk {:?} is listed twice: list each local disk once",
                d.id
            )));
        }
    }
    Ok(())
}

/// The destination half: the NBD server and one writable export per disk.
#[derive(Debug)]
pub struct NbdExports {
    listen: InetAddr,
    disks: Vec<MirroredDisk>,
}

impl NbdExports {
    /// `nbd-server-start` on `listen`, then `block-export-add` per disk. On failure, what
    /// was started is stopped again.
    pub async fn start(dst: &QmpClient, listen: InetAddr, disks: &[MirroredDisk]) -> Result<Self> {
        check_disks(disks)?;
        dst.nbd_server_start(&listen)
            .await
            .map_err(qmp(format!("starting the NBD server on {listen}")))?;
        let exports = Self {
            listen,
            disks: disks.to_vec(),
        };
        for d in disks {
            if let Err(e) = dst
                .block_export_add_nbd(&d.export_id(), &d.node_name, d.export_name(), true)
                .await
            {
                let _ = exports.stop(dst, Duration::from_secs(5)).await;
                return Err(qmp(format!("exporting disk {:?} ({})", d.id, d.node_name))(
                    e,
                ));
            }
        }
        tracing::info!(listen = %exports.listen, disks = disks.len(), "NBD exports ready");
        Ok(exports)
    }

    /// Where the server listens.
    pub fn listen(&self) -> &InetAddr {
        &self.listen
    }

    /// Removes the exports (`mode=hard`: a source still connected is cut off) and stops the
    /// server; waits up to `timeout` until the exports are gone. Best effort: goes through
    /// every step and returns the first error. Safe to call after a partial start.
    pub async fn stop(&self, dst: &QmpClient, timeout: Duration) -> Result<()> {
        let mut first: Option<StorageError> = None;
        let present: Vec<String> = match dst.query_block_exports().await {
            Ok(list) => list.into_iter().map(|e| e.id).collect(),
            Err(e) => {
                return Err(qmp("listing the destination's exports")(e));
            }
        };
        for d in &self.disks {
            let id = d.export_id();
            if !present.contains(&id) {
                continue;
            }
            if let Err(e) = dst.block_export_del(&id, BlockExportRemoveMode::Hard).await {
                first.get_or_insert(qmp(format!("removing export {id}"))(e));
            }
        }
        if let Err(e) = dst.nbd_server_stop().await {
            // "NBD server not running" is what a partial start leaves; nothing to stop.
            if e.command_class().is_none() {
                first.get_or_insert(qmp("stopping the NBD server")(e));
            }
        }
        let start = tokio::time::Instant::now();
        loop {
            let left: Vec<String> = match dst.query_block_exports().await {
                Ok(list) => list
                    .into_iter()
                    .map(|e| e.id)
                    .filter(|id| self.disks.iter().any(|d| d.export_id() == *id))
                    .collect(),
                Err(e) => return Err(first.unwrap_or(qmp("listing exports")(e))),
            };
            if left.is_empty() {
                break;
            }
            if start.elapsed() > timeout {
                first.get_or_insert(StorageError::Invalid(format!(
                    "exports {left:?} still present {timeout:?} after their removal"
                )));
                break;
            }
            tokio::time::sleep(POLL).await;
        }
        first.map_or(Ok(()), Err)
    }
}

/// How the source mirrors.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MirrorOptions {
    /// Background or write-blocking.
    pub copy_mode: MirrorCopyMode,
    /// Bandwidth limit in bytes per second per disk (`None`: unlimited).
    pub speed: Option<u64>,
}

impl MirrorOptions {
    /// The options for a migration that may switch to post-copy or not.
    ///
    /// With post-copy the source is paused at the switch and the guest runs on at once on
    /// the destination; a background mirror could still hold unsent dirty areas at that
    /// moment, which the destination guest would then read stale. Write-blocking mirroring
    /// keeps the target in step with every completed guest write, so the switch can happen
    /// at any time (libvirt offers the same, `VIR_MIGRATE_NON_SHARED_SYNCHRONOUS_WRITES`).
    /// Without post-copy the background mode is enough and costs the guest no write
    /// latency, *provided the destination's vCPUs stay stopped until
    /// [`DiskMirrors::complete`] returned*: the last dirty areas are drained only then.
    /// libvirt guarantees this by starting the destination with `-S` and resuming it in its
    /// Finish phase, after the source cancelled its mirrors (`qemuMigrationSrcRun` →
    /// `qemuMigrationSrcNBDCopyCancel`). A destination that resumes by itself at the end of
    /// the stream (QEMU's default) needs write-blocking.
    pub fn for_migration(postcopy_possible: bool) -> Self {
        Self {
            copy_mode: if postcopy_possible {
                MirrorCopyMode::WriteBlocking
            } else {
                MirrorCopyMode::Background
            },
            speed: None,
        }
    }
}

/// The source half: one mirror job per disk into an NBD client node.
#[derive(Debug)]
pub struct DiskMirrors {
    disks: Vec<MirroredDisk>,
}

impl DiskMirrors {
    /// For each disk, `blockdev-add` of an NBD client to `server` (the destination's NBD
    /// server as the source reaches it) and `blockdev-mirror` into it. On failure the
    /// mirrors and nodes already created are removed again.
    pub async fn start(
        src: &QmpClient,
        server: &InetAddr,
        disks: &[MirroredDisk],
        options: MirrorOptions,
    ) -> Result<Self> {
        check_disks(disks)?;
        let mut started = Self { disks: Vec::new() };
        for d in disks {
            let res = async {
                src.blockdev_add_nbd_client(&d.nbd_node(), server, d.export_name())
                    .await
                    .map_err(qmp(format!(
                        "connecting disk {:?} to the NBD export at {server}",
                        d.id
                    )))?;
                let args = BlockdevMirrorArgs {
                    job_id: d.job_id(),
                    device: d.node_name.clone(),
                    target: d.nbd_node(),
                    sync: MirrorSyncMode::Full,
                    copy_mode: Some(options.copy_mode.clone()),
                    speed: options.speed,
                    auto_dismiss: Some(false),
                    filter_node_name: Some(d.filter_node()),
                };
                if let Err(e) = src.blockdev_mirror(&args).await {
                    let _ = src.blockdev_del(&d.nbd_node()).await;
                    return Err(qmp(format!("starting the mirror of disk {:?}", d.id))(e));
                }
                Ok(())
            }
            .await;
            if let Err(e) = res {
                let _ = started.abort(src, Duration::from_secs(10)).await;
                return Err(e);
            }
            started.disks.push(d.clone());
        }
        tracing::info!(%server, disks = disks.len(), mode = %options.copy_mode, "mirrors started");
        Ok(started)
    }

    /// The disks being mirrored.
    pub fn disks(&self) -> &[MirroredDisk] {
        &self.disks
    }

    /// Bytes copied and to copy per disk (`query-block-jobs`).
    pub async fn progress(&self, src: &QmpClient) -> Result<StorageProgress> {
        let jobs = src
            .query_block_jobs()
            .await
            .map_err(qmp("querying the mirror jobs"))?;
        Ok(StorageProgress::from_jobs(&self.disks, &jobs))
    }

    /// Fails if a job concluded with an error, or vanished.
    fn check_failed(&self, jobs: &[BlockJobInfo]) -> Result<()> {
        for d in &self.disks {
            match jobs.iter().find(|j| j.device == d.job_id()) {
                None => {
                    return Err(StorageError::MirrorFailed {
                        disk: d.id.clone(),
                        error: format!("job {} is gone", d.job_id()),
                    });
                }
                Some(j) if j.status == JobStatus::Concluded || j.status == JobStatus::Aborting => {
                    return Err(StorageError::MirrorFailed {
                        disk: d.id.clone(),
                        error: j.error.clone().unwrap_or_else(|| {
                            format!("job ended ({}) before it was ready", j.status)
                        }),
                    });
                }
                Some(_) => {}
            }
        }
        Ok(())
    }

    /// Polls until every mirror is ready (in sync). RAM migration must not start before:
    /// otherwise the switchover would wait for a disk copy the policy did not plan for.
    pub async fn wait_ready(&self, src: &QmpClient, timeout: Duration) -> Result<StorageProgress> {
        let start = tokio::time::Instant::now();
        loop {
            let jobs = src
                .query_block_jobs()
                .await
                .map_err(qmp("querying the mirror jobs"))?;
            self.check_failed(&jobs)?;
            let progress = StorageProgress::from_jobs(&self.disks, &jobs);
            if progress.all_ready() {
                return Ok(progress);
            }
            if start.elapsed() > timeout {
                return Err(StorageError::Timeout {
                    what: "every disk mirror to be ready".into(),
                    waited: start.elapsed(),
                    progress,
                });
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// At switchover, with the source paused: ends every mirror gracefully
    /// (`block-job-cancel` without `force` on a ready job = drain, no pivot), waits for the
    /// jobs to conclude, checks none failed, dismisses them and removes the NBD client
    /// nodes. Returns the final progress (every byte copied). Refuses (changing nothing)
    /// while a mirror is not ready, so the caller can still wait or [`abort`](Self::abort).
    pub async fn complete(&self, src: &QmpClient, timeout: Duration) -> Result<StorageProgress> {
        let jobs = src
            .query_block_jobs()
            .await
            .map_err(qmp("querying the mirror jobs"))?;
        self.check_failed(&jobs)?;
        let before = StorageProgress::from_jobs(&self.disks, &jobs);
        if let Some(d) = before.disks.iter().find(|d| !d.ready) {
            return Err(StorageError::NotReady {
                disk: d.disk.clone(),
                offset: d.offset,
                len: d.len,
            });
        }
        for d in &self.disks {
            src.block_job_cancel(&d.job_id(), false)
                .await
                .map_err(qmp(format!("completing the mirror of disk {:?}", d.id)))?;
        }
        let concluded = self.wait_concluded(src, timeout).await?;
        let mut failed = None;
        for d in &self.disks {
            if let Some(j) = concluded.iter().find(|j| j.device == d.job_id())
                && let Some(error) = &j.error
            {
                failed.get_or_insert(StorageError::MirrorFailed {
                    disk: d.id.clone(),
                    error: error.clone(),
                });
            }
        }
        let progress = StorageProgress::from_jobs(&self.disks, &concluded);
        self.release(src).await?;
        match failed {
            Some(e) => Err(e),
            None => Ok(progress),
        }
    }

    /// Abandons every mirror (`block-job-cancel force=true`), waits for the jobs to end and
    /// removes the NBD client nodes. The source image is untouched: a mirror only reads it.
    /// Best effort; returns the first error.
    pub async fn abort(&self, src: &QmpClient, timeout: Duration) -> Result<()> {
        let mut first = None;
        for d in &self.disks {
            if let Err(e) = src.block_job_cancel(&d.job_id(), true).await {
                // A job that already concluded cannot be cancelled; anything but a refusal
                // (QEMU gone) is worth reporting.
                if e.command_class().is_none() {
                    first
                        .get_or_insert(qmp(format!("cancelling the mirror of disk {:?}", d.id))(e));
                }
            }
        }
        if first.is_none()
            && let Err(e) = self.wait_concluded(src, timeout).await
        {
            first = Some(e);
        }
        if let Err(e) = self.release(src).await {
            first.get_or_insert(e);
        }
        first.map_or(Ok(()), Err)
    }

    /// Waits until no job of ours is still running (concluded or gone); returns the last
    /// `query-block-jobs` entries of ours.
    async fn wait_concluded(
        &self,
        src: &QmpClient,
        timeout: Duration,
    ) -> Result<Vec<BlockJobInfo>> {
        let start = tokio::time::Instant::now();
        loop {
            let jobs: Vec<BlockJobInfo> = src
                .query_block_jobs()
                .await
                .map_err(qmp("querying the mirror jobs"))?
                .into_iter()
                .filter(|j| self.disks.iter().any(|d| d.job_id() == j.device))
                .collect();
            let running = jobs
                .iter()
                .any(|j| !matches!(j.status, JobStatus::Concluded | JobStatus::Null));
            if !running {
                return Ok(jobs);
            }
            if start.elapsed() > timeout {
                return Err(StorageError::Timeout {
                    what: "the mirror jobs to end".into(),
                    waited: start.elapsed(),
                    progress: StorageProgress::from_jobs(&self.disks, &jobs),
                });
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Dismisses concluded jobs and deletes the NBD client nodes that exist.
    async fn release(&self, src: &QmpClient) -> Result<()> {
        let mut first = None;
        let jobs = src
            .query_block_jobs()
            .await
            .map_err(qmp("querying the mirror jobs"))?;
        for d in &self.disks {
            if jobs
                .iter()
                .any(|j| j.device == d.job_id() && j.status == JobStatus::Concluded)
                && let Err(e) = src.job_dismiss(&d.job_id()).await
            {
                first.get_or_insert(qmp(format!("dismissing job {}", d.job_id()))(e));
            }
        }
        for d in &self.disks {
            if let Err(e) = remove_node(src, &d.nbd_node()).await {
                first.get_or_insert(e);
            }
        }
        first.map_or(Ok(()), Err)
    }
}

/// How long a node may stay busy after its job was dismissed.
const NODE_RELEASE_TIMEOUT: Duration = Duration::from_secs(5);

/// `blockdev-del` of `node` if it exists, retried while QEMU still reports it in use: a
/// dismissed job drops its references to the target from a bottom half, so right after
/// `job-dismiss` the node can still be busy for a moment (seen under load).
async fn remove_node(src: &QmpClient, node: &str) -> Result<()> {
    let start = tokio::time::Instant::now();
    loop {
        let nodes = src
            .named_block_nodes()
            .await
            .map_err(qmp("listing block nodes"))?;
        if !nodes.iter().any(|n| n == node) {
            return Ok(());
        }
        match src.blockdev_del(node).await {
            Ok(()) => return Ok(()),
            Err(e) if e.command_class().is_some() && start.elapsed() < NODE_RELEASE_TIMEOUT => {
                tracing::debug!(node, error = %e, "NBD node still busy; retrying");
                tokio::time::sleep(POLL).await;
            }
            Err(e) => return Err(qmp(format!("removing NBD node {node}"))(e)),
        }
    }
}

/// Both halves, for a caller that holds both QMP clients.
#[derive(Debug)]
pub struct StorageMigration {
    exports: NbdExports,
    mirrors: DiskMirrors,
}

impl StorageMigration {
    /// Starts the destination's exports on `listen` and the source's mirrors to `connect`
    /// (the same address unless NAT or a different interface sits in between). On failure
    /// both sides are cleaned up.
    pub async fn start(
        src: &QmpClient,
        dst: &QmpClient,
        listen: InetAddr,
        connect: &InetAddr,
        disks: &[MirroredDisk],
        options: MirrorOptions,
    ) -> Result<Self> {
        let exports = NbdExports::start(dst, listen, disks).await?;
        match DiskMirrors::start(src, connect, disks, options).await {
            Ok(mirrors) => Ok(Self { exports, mirrors }),
            Err(e) => {
                let _ = exports.stop(dst, Duration::from_secs(5)).await;
                Err(e)
            }
        }
    }

    /// Per-disk progress.
    pub async fn progress(&self, src: &QmpClient) -> Result<StorageProgress> {
        self.mirrors.progress(src).await
    }

    /// Waits until every mirror is ready.
    pub async fn wait_ready(&self, src: &QmpClient, timeout: Duration) -> Result<StorageProgress> {
        self.mirrors.wait_ready(src, timeout).await
    }

    /// Completes the mirrors at switchover and stops the destination's exports.
    pub async fn complete(
        &self,
        src: &QmpClient,
        dst: &QmpClient,
        timeout: Duration,
    ) -> Result<StorageProgress> {
        let progress = self.mirrors.complete(src, timeout).await;
        let stopped = self.exports.stop(dst, timeout).await;
        let progress = progress?;
        stopped?;
        Ok(progress)
    }

    /// The switchover step, called when the source's migration status is `pre-switchover`
    /// (source started with [`SWITCHOVER_CAPABILITY`]): completes the mirrors while the
    /// guest is stopped and its disks are still active, lets the migration continue
    /// (`migrate-continue`), then removes the destination's exports. If the mirrors cannot
    /// be completed the migration is *not* continued: the caller should cancel it
    /// (`migrate_cancel`) and [`abort`](Self::abort) — the guest then resumes on the source
    /// with its disk untouched.
    pub async fn switchover(
        &self,
        src: &QmpClient,
        dst: &QmpClient,
        timeout: Duration,
    ) -> Result<StorageProgress> {
        let progress = self.mirrors.complete(src, timeout).await?;
        src.migrate_continue(&MigrationStatus::PreSwitchover)
            .await
            .map_err(qmp("continuing the migration after the mirrors completed"))?;
        self.exports.stop(dst, timeout).await?;
        Ok(progress)
    }

    /// Aborts the mirrors and removes the destination's exports. Best effort on both sides.
    pub async fn abort(&self, src: &QmpClient, dst: &QmpClient, timeout: Duration) -> Result<()> {
        let a = self.mirrors.abort(src, timeout).await;
        let b = self.exports.stop(dst, timeout).await;
        a.and(b)
    }
}
