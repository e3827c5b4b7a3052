//! Builds the guest image into the cache and prints what QEMU needs as JSON:
//!
//! ```text
//! cargo run -p tern-guest --example build-image -- [ws_mib] [rate] [pattern]
//! ```
//!
//! Progress goes to stderr, the JSON (kernel, initrd, cmdline, …) to stdout.

use anyhow::Context;
use tern_guest::{GuestImageSpec, WorkloadParams, build, default_cache_dir};

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut params = WorkloadParams::default();
    if let Some(ws) = args.first() {
        params.working_set_mib = ws
            .parse()
            .with_context(|| format!("working set {ws:?}: expected MiB, e.g. 64"))?;
    }
    if let Some(rate) = args.get(1) {
        params.rate = rate.parse()?;
    }
    if let Some(pattern) = args.get(2) {
        params.pattern = pattern.parse()?;
    }
    let cache = default_cache_dir();
    let image = build(&GuestImageSpec::default(), &cache, |msg| {
        eprintln!("[build-image] {msg}")
    })?;
    let json = serde_json::json!({
        "kernel": image.kernel,
        "initrd": image.initrd,
        "kernel_version": image.kernel_version,
        "id": image.id,
        "cmdline": image.cmdline(&params),
        "memory_mib": params.recommended_memory_mib(),
    });
    println!("{}", serde_json::to_string_pretty(&json)?);
    Ok(())
}
