//! The guest side of tern's migration tests.
//!
//! - [`image`]: builds a bootable guest (Debian's stock kernel + a tiny initramfs running
//!   the `tern-load` workload from `guest/tern-load.c`), cached by a hash of its inputs.
//! - [`params`]: the workload's parameters and how they travel on the kernel command line.
//! - [`serial`]: parsers for the guest serial protocol and the host serial log.
//! - [`integrity`]: boot health and per-migration verdicts (blackout, heartbeat continuity,
//!   corrupt pages, control-state mismatches, post-copy stalls).
//!
//! The formats are specified in `docs/CONVENTIONS.md` ("Shared formats").

pub mod cpio;
pub mod image;
pub mod integrity;
pub mod modules;
pub mod netprobe;
pub mod params;
pub mod serial;

pub use image::{
    GuestError, GuestImage, GuestImageSpec, TERN_LOAD_SOURCE, build, default_cache_dir,
};
pub use integrity::{
    GuestHealth, LogSide, MigrationIntegrity, SequenceAnomaly, analyze_boot, analyze_migration,
};
pub use netprobe::{NetProbeReport, UdpProbe, analyze_probe};
pub use params::{DiskWorkload, PageRate, ParamError, WorkloadParams, WritePattern};
pub use serial::{
    DiskReadyInfo, DiskStatus, GuestLine, GuestStatus, HostLine, HostSerialLog, LineKind,
    ReadyInfo, parse_guest_line,
};
