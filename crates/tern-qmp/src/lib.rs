//! Async QMP client for the QEMU live-migration subset tern drives.
//!
//! QMP (the QEMU Machine Protocol) is line-delimited JSON over a unix socket: a greeting,
//! capability negotiation, then commands with replies matched by `id`, interleaved with
//! asynchronous events. This crate owns the socket and gives the engine:
//!
//! - [`QmpClient`]: `Clone`, `&self` methods, safe for concurrent use from several tasks;
//!   a background task demultiplexes replies and broadcasts events ([`QmpEvent`]).
//! - Typed commands and replies for migration ([`MigrationInfo`], [`MigrationParameters`],
//!   [`MigrationCapability`] …) following `qapi/migration.json` of QEMU 10.0, plus
//!   [`QmpClient::execute_raw`] for anything else.
//! - Enums that never fail on values from a newer QEMU (`Unknown(String)`), and replies that
//!   ignore unknown fields.
//! - Errors that separate "QEMU refused" ([`QmpError::Command`]) from "QEMU is gone"
//!   ([`QmpError::Closed`]).
//!
//! ```no_run
//! # async fn demo() -> Result<(), tern_qmp::QmpError> {
//! use std::time::Duration;
//! use tern_qmp::{MigrationCapability as Cap, MigrationCapabilityStatus, MigrationParameters, QmpClient};
//!
//! let (qmp, _events) = QmpClient::connect_with_retry("/run/tern/src.qmp", Duration::from_secs(5)).await?;
//! if qmp.supported_capabilities().await?.contains(&Cap::PostcopyRam) {
//!     qmp.migrate_set_capabilities(&[
//!         MigrationCapabilityStatus::new(Cap::Events, true),
//!         MigrationCapabilityStatus::new(Cap::PostcopyRam, true),
//!     ]).await?;
//! }
//! qmp.migrate_set_parameters(&MigrationParameters {
//!     max_bandwidth: Some(10 << 30),
//!     downtime_limit: Some(300),
//!     ..Default::default()
//! }).await?;
//! qmp.migrate("tcp:10.0.0.2:4444").await?;
//! let status = qmp.wait_for_migration_status(|s| s.is_terminal(), Duration::from_secs(600)).await?;
//! println!("migration ended: {status}");
//! # Ok(()) }
//! ```

mod announce;
mod block;
mod client;
mod codec;
mod commands;
mod enums;
mod error;
mod event;
mod types;

pub use announce::AnnounceParameters;
pub use block::{
    BlockExportInfo, BlockExportRemoveMode, BlockJobEvent, BlockJobInfo, BlockdevMirrorArgs,
    InetAddr, JobStatus, JobType, MirrorCopyMode, MirrorSyncMode,
};
pub use client::{EVENT_CAPACITY, GREETING_TIMEOUT, QmpClient, QmpEvents};
pub use commands::DEFAULT_STATUS_POLL;
pub use enums::{
    DirtyRateMeasureMode, DirtyRateStatus, MigMode, MigrationCapability, MigrationStatus,
    MultiFdCompression, RunState, ShutdownCause, TimeUnit, ZeroPageDetection,
};
pub use error::{QmpError, Result};
pub use event::{QmpEvent, QmpEventKind, QmpTimestamp};
pub use types::{
    CalcDirtyRateArgs, DirtyRateInfo, DirtyRateVcpu, MigrationCapabilityStatus, MigrationInfo,
    MigrationParameters, MigrationStats, QemuVersion, QmpGreeting, StatusInfo, VfioStats,
    XbzrleCacheStats,
};

#[cfg(test)]
mod client_tests;
