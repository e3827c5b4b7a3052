//! Typed block-layer commands for storage migration: the embedded NBD server, block exports,
//! block nodes, the mirror job and its control, and the block-job events.
//!
//! Names and arguments follow QEMU 10.0's `qapi/block-core.json` (`blockdev-add`,
//! `blockdev-mirror`, `query-block-jobs`, `block-job-cancel`, `job-complete`,
//! `job-dismiss`), `qapi/block-export.json` (`block-export-add`, `block-export-del`,
//! `query-block-exports`) and `qapi/block.json` (`nbd-server-start`, `nbd-server-stop`).
//! These are the commands libvirt issues for non-shared-storage migration
//! (`qemuMigrationDstStartNBDServer` and `qemuMigrationSrcNBDStorageCopyBlockdev` in
//! `src/qemu/qemu_migration.c`).

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::client::QmpClient;
use crate::enums::qapi_enum;
use crate::error::Result;
use crate::event::QmpEventKind;

use std::convert::Infallible;
use std::fmt;
use std::str::FromStr;

use serde::{Deserializer, Serializer};

qapi_enum! {
    /// Life-cycle state of a job (QAPI `JobStatus`).
    pub enum JobStatus {
        /// Erroneous state; never seen by clients.
        Undefined = "undefined",
        /// Created, not started yet.
        Created = "created",
        /// Working.
        Running = "running",
        /// Paused by the user or on an I/O error.
        Paused = "paused",
        /// A mirror reached synchronisation and is waiting to be completed or cancelled.
        Ready = "ready",
        /// A ready job that was paused.
        Standby = "standby",
        /// Waiting for other jobs of its transaction.
        Waiting = "waiting",
        /// Waiting for `job-finalize` (only with `auto-finalize: false`).
        Pending = "pending",
        /// Being cancelled or failing.
        Aborting = "aborting",
        /// Finished (successfully or not); stays listed until `job-dismiss` when started
        /// with `auto-dismiss: false`.
        Concluded = "concluded",
        /// Dismissed; about to disappear.
        Null = "null",
    }
}

qapi_enum! {
    /// Kind of a job (QAPI `JobType`).
    pub enum JobType {
        /// `block-commit`.
        Commit = "commit",
        /// `block-stream`.
        Stream = "stream",
        /// `blockdev-mirror` / `drive-mirror`.
        Mirror = "mirror",
        /// `blockdev-backup`.
        Backup = "backup",
        /// `blockdev-create`.
        Create = "create",
        /// `x-blockdev-amend`.
        Amend = "amend",
        /// `snapshot-load`.
        SnapshotLoad = "snapshot-load",
        /// `snapshot-save`.
        SnapshotSave = "snapshot-save",
        /// `snapshot-delete`.
        SnapshotDelete = "snapshot-delete",
    }
}

qapi_enum! {
    /// What a mirror copies (QAPI `MirrorSyncMode`).
    pub enum MirrorSyncMode {
        /// Only the top image of the chain.
        Top = "top",
        /// The whole disk, backing chain flattened: what storage migration needs.
        Full = "full",
        /// Only new writes.
        None = "none",
        /// Since a bitmap, clearing it.
        Incremental = "incremental",
        /// Since a bitmap.
        Bitmap = "bitmap",
    }
}

qapi_enum! {
    /// How a mirror treats guest writes while it copies (QAPI `MirrorCopyMode`).
    pub enum MirrorCopyMode {
        /// Writes complete on the source; the job copies dirty areas in the background.
        /// The target may lag behind the source.
        Background = "background",
        /// "Active mirroring": a guest write completes only once it reached the target too,
        /// so the target never lags once ready. Needed when the migration may switch to
        /// post-copy: the source is paused at the switch and whatever the target lacks
        /// then must still be copied while the guest already runs on the destination
        /// (libvirt's `VIR_MIGRATE_NON_SHARED_SYNCHRONOUS_WRITES`).
        WriteBlocking = "write-blocking",
    }
}

/// A TCP endpoint (QAPI `InetSocketAddress`, `host` + `port`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct InetAddr {
    /// Host name or IP address.
    pub host: String,
    /// TCP port.
    pub port: u16,
}

impl InetAddr {
    /// An endpoint from a host and a port.
    pub fn new(host: impl Into<String>, port: u16) -> Self {
        Self {
            host: host.into(),
            port,
        }
    }

    /// QAPI's flat `SocketAddress` (`{"type": "inet", "host", "port"}`), used by
    /// `blockdev-add` of an NBD node. QAPI carries ports as strings (they may be service
    /// names).
    pub fn to_socket_address(&self) -> Value {
        json!({ "type": "inet", "host": self.host, "port": self.port.to_string() })
    }

    /// QAPI's legacy `SocketAddressLegacy` (`{"type": "inet", "data": {…}}`), which
    /// `nbd-server-start` still takes.
    pub fn to_socket_address_legacy(&self) -> Value {
        json!({ "type": "inet", "data": { "host": self.host, "port": self.port.to_string() } })
    }
}

impl fmt::Display for InetAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

/// Arguments of `blockdev-mirror`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct BlockdevMirrorArgs {
    /// Job id, later given to `query-block-jobs`, `block-job-cancel`, `job-dismiss`.
    pub job_id: String,
    /// The source node (the disk's format node).
    pub device: String,
    /// The target node (an NBD client node for storage migration).
    pub target: String,
    /// What to copy.
    pub sync: MirrorSyncMode,
    /// Background or write-blocking.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub copy_mode: Option<MirrorCopyMode>,
    /// Bandwidth limit in bytes per second (`None`: unlimited).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub speed: Option<u64>,
    /// `false` keeps a finished job listed (status `concluded`, with its `error`) until
    /// `job-dismiss`, so a failure cannot slip by between two polls (libvirt starts its
    /// migration mirrors this way).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub auto_dismiss: Option<bool>,
    /// Name of the filter node the mirror inserts above `device` (every guest write
    /// passes through it); QEMU picks an internal name if `None`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub filter_node_name: Option<String>,
}

/// One job from `query-block-jobs` (QAPI `BlockJobInfo`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct BlockJobInfo {
    /// Kind of job.
    #[serde(rename = "type")]
    pub job_type: JobType,
    /// The job id (QEMU calls it `device` for historical reasons).
    pub device: String,
    /// Bytes the job expects to process in total. Grows while a mirror runs when the
    /// guest dirties areas already copied.
    #[serde(default)]
    pub len: u64,
    /// Bytes processed so far; `offset == len` with `ready` is "in sync".
    #[serde(default)]
    pub offset: u64,
    /// True while the job performs I/O.
    #[serde(default)]
    pub busy: bool,
    /// True if paused.
    #[serde(default)]
    pub paused: bool,
    /// Rate limit, bytes per second (0 = none).
    #[serde(default)]
    pub speed: u64,
    /// A mirror in sync, waiting for completion or cancellation.
    #[serde(default)]
    pub ready: bool,
    /// Life-cycle state.
    pub status: JobStatus,
    /// The error that ended the job, if it failed (only on concluded jobs).
    #[serde(default)]
    pub error: Option<String>,
}

/// Arguments of `block-export-del`'s `mode` (QAPI `BlockExportRemoveMode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockExportRemoveMode {
    /// Refuse while clients are connected.
    Safe,
    /// Disconnect clients and remove.
    Hard,
}

/// One export from `query-block-exports` (QAPI `BlockExportInfo`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct BlockExportInfo {
    /// Export id.
    pub id: String,
    /// Export type (`nbd`, `fuse`, `vhost-user-blk`, …).
    #[serde(rename = "type")]
    pub export_type: String,
    /// Exported node.
    pub node_name: String,
    /// True once removal was requested and clients are still being disconnected.
    #[serde(default)]
    pub shutting_down: bool,
}

/// A block-job event, interpreted from a [`QmpEventKind::Other`]: `BLOCK_JOB_READY`,
/// `BLOCK_JOB_COMPLETED`, `BLOCK_JOB_CANCELLED`, `BLOCK_JOB_ERROR`, `JOB_STATUS_CHANGE`.
///
/// Kept out of [`QmpEventKind`] so that code matching on it is not affected; polling
/// `query-block-jobs` stays the source of truth, events only wake a waiter early.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BlockJobEvent {
    /// A mirror is in sync.
    Ready {
        /// Job id.
        device: String,
        /// Bytes in total.
        len: u64,
        /// Bytes processed.
        offset: u64,
    },
    /// A job ended; `error` is set if it failed. A mirror cancelled after `ready` (without
    /// `force`) also ends with this event: that is its graceful completion.
    Completed {
        /// Job id.
        device: String,
        /// Bytes in total.
        len: u64,
        /// Bytes processed.
        offset: u64,
        /// Why it failed.
        error: Option<String>,
    },
    /// A job was cancelled before completing.
    Cancelled {
        /// Job id.
        device: String,
    },
    /// An I/O error hit a job (`action` says what QEMU did about it).
    Error {
        /// Job id.
        device: String,
        /// `read` or `write`.
        operation: String,
        /// `ignore`, `report` or `stop`.
        action: String,
    },
    /// A job changed state.
    StatusChange {
        /// Job id.
        id: String,
        /// New state.
        status: JobStatus,
    },
}

impl BlockJobEvent {
    /// Interprets an event; `None` if it is not a block-job event or is malformed.
    pub fn from_event(kind: &QmpEventKind) -> Option<Self> {
        let QmpEventKind::Other { name, data } = kind else {
            return None;
        };
        let s = |k: &str| data.get(k).and_then(Value::as_str).map(str::to_owned);
        let n = |k: &str| data.get(k).and_then(Value::as_u64).unwrap_or(0);
        match name.as_str() {
            "BLOCK_JOB_READY" => Some(Self::Ready {
                device: s("device")?,
                len: n("len"),
                offset: n("offset"),
            }),
            "BLOCK_JOB_COMPLETED" => Some(Self::Completed {
                device: s("device")?,
                len: n("len"),
                offset: n("offset"),
                error: s("error"),
            }),
            "BLOCK_JOB_CANCELLED" => Some(Self::Cancelled {
                device: s("device")?,
            }),
            "BLOCK_JOB_ERROR" => Some(Self::Error {
                device: s("device")?,
                operation: s("operation").unwrap_or_default(),
                action: s("action").unwrap_or_default(),
            }),
            "JOB_STATUS_CHANGE" => Some(Self::StatusChange {
                id: s("id")?,
                status: JobStatus::from_wire(&s("status")?),
            }),
            _ => None,
        }
    }
}

impl QmpClient {
    /// `nbd-server-start` on a TCP address: the destination's embedded NBD server that
    /// storage migration writes into. One server per QEMU; exports are added after.
    pub async fn nbd_server_start(&self, listen: &InetAddr) -> Result<()> {
        self.execute_unit(
            "nbd-server-start",
            json!({ "addr": listen.to_socket_address_legacy() }),
        )
        .await
    }

    /// `nbd-server-stop`: stops the server and removes every NBD export.
    pub async fn nbd_server_stop(&self) -> Result<()> {
        self.execute_unit("nbd-server-stop", ()).await
    }

    /// `block-export-add` of type `nbd`: exports `node_name` under the export name `name`.
    /// `writable` must be true for a migration target. QEMU activates an inactive node
    /// (a destination started with `-incoming`) for it (`blk_exp_add` in
    /// `block/export/export.c`).
    pub async fn block_export_add_nbd(
        &self,
        id: &str,
        node_name: &str,
        name: &str,
        writable: bool,
    ) -> Result<()> {
        self.execute_unit(
            "block-export-add",
            json!({
                "type": "nbd",
                "id": id,
                "node-name": node_name,
                "name": name,
                "writable": writable,
            }),
        )
        .await
    }

    /// `block-export-del`. Removal is asynchronous: the export may still be listed as
    /// `shutting-down` until its clients are gone (`BLOCK_EXPORT_DELETED`).
    pub async fn block_export_del(&self, id: &str, mode: BlockExportRemoveMode) -> Result<()> {
        let mode = match mode {
            BlockExportRemoveMode::Safe => "safe",
            BlockExportRemoveMode::Hard => "hard",
        };
        self.execute_unit("block-export-del", json!({ "id": id, "mode": mode }))
            .await
    }

    /// `query-block-exports`.
    pub async fn query_block_exports(&self) -> Result<Vec<BlockExportInfo>> {
        self.execute("query-block-exports", ()).await
    }

    /// `blockdev-add` with raw options (QAPI `BlockdevOptions`).
    pub async fn blockdev_add(&self, options: &Value) -> Result<()> {
        self.execute_unit("blockdev-add", options).await
    }

    /// `blockdev-add` of an NBD client node connected to `server`, export `export`: the
    /// mirror target on the source (libvirt's `migration-<disk>-storage` node).
    pub async fn blockdev_add_nbd_client(
        &self,
        node_name: &str,
        server: &InetAddr,
        export: &str,
    ) -> Result<()> {
        self.blockdev_add(&json!({
            "driver": "nbd",
            "node-name": node_name,
            "server": server.to_socket_address(),
            "export": export,
        }))
        .await
    }

    /// `blockdev-del`: removes a node nothing uses any more.
    pub async fn blockdev_del(&self, node_name: &str) -> Result<()> {
        self.execute_unit("blockdev-del", json!({ "node-name": node_name }))
            .await
    }

    /// Names of every named block node (`query-named-block-nodes` with `flat`).
    pub async fn named_block_nodes(&self) -> Result<Vec<String>> {
        #[derive(Deserialize)]
        #[serde(rename_all = "kebab-case")]
        struct Node {
            #[serde(default)]
            node_name: String,
        }
        let nodes: Vec<Node> = self
            .execute("query-named-block-nodes", json!({ "flat": true }))
            .await?;
        Ok(nodes
            .into_iter()
            .map(|n| n.node_name)
            .filter(|n| !n.is_empty())
            .collect())
    }

    /// `blockdev-mirror`: starts copying `device` to `target`.
    pub async fn blockdev_mirror(&self, args: &BlockdevMirrorArgs) -> Result<()> {
        self.execute_unit("blockdev-mirror", args).await
    }

    /// `query-block-jobs`: every block job, with progress.
    pub async fn query_block_jobs(&self) -> Result<Vec<BlockJobInfo>> {
        self.execute("query-block-jobs", ()).await
    }

    /// `job-complete`: finish a ready mirror by *pivoting* the guest's disk to the target.
    /// Storage migration must not use it (the source would then run on the NBD node); it
    /// ends its mirrors with [`QmpClient::block_job_cancel`] without `force` instead.
    pub async fn job_complete(&self, id: &str) -> Result<()> {
        self.execute_unit("job-complete", json!({ "id": id })).await
    }

    /// `job-dismiss`: removes a concluded job started with `auto-dismiss: false`.
    pub async fn job_dismiss(&self, id: &str) -> Result<()> {
        self.execute_unit("job-dismiss", json!({ "id": id })).await
    }

    /// `block-job-cancel`. On a *ready* mirror without `force` this is a graceful end: QEMU
    /// copies what is left, leaves the target a consistent copy and does not pivot (it
    /// concludes without error, event `BLOCK_JOB_COMPLETED`). With `force`, or before
    /// `ready`, the job is abandoned (`BLOCK_JOB_CANCELLED`). libvirt uses exactly this
    /// switch: `qemuMonitorBlockJobCancel(mon, job, abortMigration)` in
    /// `qemuMigrationSrcNBDCopyCancelOne`.
    pub async fn block_job_cancel(&self, device: &str, force: bool) -> Result<()> {
        self.execute_unit(
            "block-job-cancel",
            json!({ "device": device, "force": force }),
        )
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mirror_args_use_qemu_names_and_skip_unset_options() {
        let args = BlockdevMirrorArgs {
            job_id: "j".into(),
            device: "tern-data".into(),
            target: "tern-nbd-data".into(),
            sync: MirrorSyncMode::Full,
            copy_mode: Some(MirrorCopyMode::WriteBlocking),
            speed: None,
            auto_dismiss: Some(false),
            filter_node_name: None,
        };
        let v = serde_json::to_value(&args).unwrap();
        assert_eq!(
            v,
            json!({"job-id": "j", "device": "tern-data", "target": "tern-nbd-data",
                   "sync": "full", "copy-mode": "write-blocking", "auto-dismiss": false})
        );
    }

    #[test]
    fn block_job_info_parses_and_keeps_unknown_status() {
        let v = json!([{"type": "mirror", "device": "j", "len": 100, "offset": 40,
            "busy": true, "paused": false, "speed": 0, "ready": false, "status": "running",
            "io-status": "ok", "auto-finalize": true, "auto-dismiss": false},
            {"type": "brand-new", "device": "k", "status": "teleporting"}]);
        let jobs: Vec<BlockJobInfo> = serde_json::from_value(v).unwrap();
        assert_eq!(jobs[0].job_type, JobType::Mirror);
        assert_eq!((jobs[0].offset, jobs[0].len), (40, 100));
        assert_eq!(jobs[0].status, JobStatus::Running);
        assert_eq!(jobs[1].job_type, JobType::Unknown("brand-new".into()));
        assert_eq!(jobs[1].status, JobStatus::Unknown("teleporting".into()));
    }

    #[test]
    fn socket_addresses_have_qapi_shapes() {
        let a = InetAddr::new("127.0.0.1", 10809);
        assert_eq!(
            a.to_socket_address(),
            json!({"type": "inet", "host": "127.0.0.1", "port": "10809"})
        );
        assert_eq!(
            a.to_socket_address_legacy(),
            json!({"type": "inet", "data": {"host": "127.0.0.1", "port": "10809"}})
        );
        assert_eq!(a.to_string(), "127.0.0.1:10809");
        assert_eq!(InetAddr::new("::1", 1).to_string(), "[::1]:1");
    }

    #[test]
    fn block_job_events_are_interpreted() {
        let ev = |name: &str, data: Value| {
            BlockJobEvent::from_event(&QmpEventKind::from_parts(name, data))
        };
        assert_eq!(
            ev(
                "BLOCK_JOB_READY",
                json!({"type": "mirror", "device": "j", "len": 5, "offset": 5, "speed": 0})
            ),
            Some(BlockJobEvent::Ready {
                device: "j".into(),
                len: 5,
                offset: 5
            })
        );
        assert_eq!(
            ev(
                "BLOCK_JOB_COMPLETED",
                json!({"device": "j", "len": 5, "offset": 3, "error": "EIO"})
            ),
            Some(BlockJobEvent::Completed {
                device: "j".into(),
                len: 5,
                offset: 3,
                error: Some("EIO".into())
            })
        );
        assert_eq!(
            ev(
                "JOB_STATUS_CHANGE",
                json!({"id": "j", "status": "concluded"})
            ),
            Some(BlockJobEvent::StatusChange {
                id: "j".into(),
                status: JobStatus::Concluded
            })
        );
        assert_eq!(ev("BLOCK_JOB_READY", json!({})), None);
        assert_eq!(ev("RESET", json!({})), None);
    }
}
