//! `tern guest build`: the guest image for demos and tests.

use std::path::PathBuf;

use clap::{Args, Subcommand};
use tern_guest::GuestImageSpec;

use crate::Failure;
use crate::output::{OutputArgs, OutputFormat, print_json};

/// Guest commands.
#[derive(Debug, Subcommand)]
pub enum GuestCommand {
    /// Build (or reuse from the cache) a kernel + initramfs running tern-load or your command.
    Build(BuildArgs),
}

/// `guest build`.
#[derive(Debug, Args)]
pub struct BuildArgs {
    /// Extra file to put into the initramfs, as HOST_PATH:GUEST_PATH (repeatable); e.g. a
    /// static binary of your own workload.
    #[arg(long = "file", value_name = "HOST:GUEST")]
    files: Vec<String>,
    /// Shell command /init runs instead of tern-load (busybox sh).
    #[arg(long)]
    command: Option<String>,
    /// Use this kernel image instead of Debian's packaged one.
    #[arg(long)]
    kernel: Option<PathBuf>,
    /// Cache directory (default $TERN_CACHE_DIR or /var/cache/tern).
    #[arg(long)]
    cache_dir: Option<PathBuf>,
    #[command(flatten)]
    out: OutputArgs,
}

/// Runs a guest command.
pub fn run(cmd: GuestCommand) -> Result<(), Failure> {
    match cmd {
        GuestCommand::Build(a) => {
            let mut extra_files = Vec::new();
            for f in &a.files {
                let (host, guest) = f.split_once(':').ok_or_else(|| {
                    Failure::input(anyhow::anyhow!(
                        "--file {f:?} is invalid: use HOST_PATH:GUEST_PATH, e.g. ./load:/bin/load"
                    ))
                })?;
                extra_files.push((PathBuf::from(host), guest.to_string()));
            }
            let spec = GuestImageSpec {
                extra_files,
                command: a.command,
                kernel: a.kernel,
            };
            let cache = a.cache_dir.unwrap_or_else(tern_guest::default_cache_dir);
            let image = tern_guest::build(&spec, &cache, |s| eprintln!("guest: {s}"))
                .map_err(Failure::input)?;
            match a.out.output {
                OutputFormat::Json => print_json(&image)?,
                OutputFormat::Text => {
                    println!(
                        "kernel  {} ({})",
                        image.kernel.display(),
                        image.kernel_version
                    );
                    println!("initrd  {}", image.initrd.display());
                    println!("id      {}", image.id);
                }
            }
        }
    }
    Ok(())
}
