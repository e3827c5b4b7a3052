//! Lab hosts for live-migration experiments: Linux network namespaces wired to a bridge, with `tc`
//! rate limits and fault injection.
//!
//! A lab named `x` is a switch namespace `tern-x-sw` holding bridge `br0`, and hosts `h1`…`hN`,
//! each a namespace `tern-x-hN` whose `eth0` (198.18.0.N/24, RFC 2544 benchmarking space) is one
//! end of a veth pair whose other end `pN` is a bridge port. Nothing is created in the root
//! namespace. Rate limits are `tbf` on both ends of each veth, so both directions are shaped.
//! State lives in `/run/tern/labs/<name>.json` so other processes (the `tern` CLI, agents) find
//! the lab; [`Lab::down`] works from that file or, after a crash, from leftover namespaces alone.
//!
//! Unlike KubeVirt's or Nova's migration tests, which need real multi-node clusters, this gives a
//! single machine several "hosts" whose links can be throttled and cut on demand, which is what
//! post-copy recovery and convergence experiments need.

//! ```no_run
//! use std::time::Duration;
//! use tern_lab::{FaultMode, Lab, LabSpec};
//!
//! # fn main() -> Result<(), tern_lab::LabError> {
//! let mut lab = Lab::up_guarded(&LabSpec {
//!     name: "demo".into(),
//!     hosts: 2,
//!     link_rate: Some("1gbit".parse()?),
//!     ..LabSpec::default()
//! })?; // taken down when `lab` is dropped
//! let dst = lab.host("h2")?;
//! let qemu = dst.command("qemu-system-x86_64").args(["-incoming", "defer"]).spawn();
//! lab.set_link_rate("h1", Some("300mbit".parse()?))?;
//! lab.fault_for("h1", FaultMode::Blackhole, Duration::from_secs(2))?;
//! println!("{}", lab.status()?);
//! # drop(qemu);
//! # Ok(()) }
//! ```

pub mod agents;
mod cmd;
mod error;
mod lab;
mod rate;
mod shaping;

pub use error::LabError;
pub use lab::{
    BRIDGE, DownReport, FaultMode, HOST_IFACE, HostStatus, Lab, LabGuard, LabHost, LabSpec,
    LabStatus, LinkState, MAX_HOSTS, MAX_LAB_NAME_LEN, MIN_HOSTS, NETNS_PREFIX, NetnsProcess,
    PREFIX_LEN, STATE_DIR, down_all, host_netns_name, kill_process, lab_of_netns, netem_available,
    state_path, switch_netns_name, validate_lab_name,
};
pub use nix::sys::signal::Signal;
pub use rate::{
    LINK_RATE_EXAMPLES, LinkRate, LinkRateError, MAX_LINK_RATE_BITS, MIN_LINK_RATE_BITS,
};
