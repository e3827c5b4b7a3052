//! Building the guest image: Debian's stock kernel plus a tiny initramfs that runs
//! `tern-load` (or a custom command).
//!
//! Why this shape: a migration test needs a guest whose memory behaviour we control and
//! whose integrity we can check, that boots fast under TCG, and that needs no disk, no
//! network and no root filesystem. An initramfs with a static busybox and one static C
//! program is all of that. The kernel is Debian's packaged one (`linux-image-amd64`'s
//! dependency), unpacked with `dpkg -x` into the cache — never installed into `/boot`.
//!
//! Images are cached under `<cache>/guest/<hash>/`, where the hash covers every input
//! (kernel package and version, busybox, gcc, the `tern-load` source, the init script,
//! extra files, the builder version), so an image is rebuilt exactly when something it is
//! made of changed. Builds happen in a temporary directory next to the final one and are
//! renamed into place, so concurrent builders never expose (or corrupt) a half-built image:
//! the first rename wins and the others use its result.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::cpio::CpioWriter;
use crate::modules::{KernelModule, debian_virtio_modules};
use crate::params::WorkloadParams;

/// The workload's C source, embedded so the library (and any binary using it) can build
/// the image without the source tree.
pub const TERN_LOAD_SOURCE: &str = include_str!("../../../guest/tern-load.c");

/// Bumped whenever the builder's output changes for the same inputs (init script, layout,
/// compiler flags), so old cached images are not reused.
const BUILDER_VERSION: &str = "tern-guest-image-3";

/// The metapackage whose dependency names the current Debian kernel package.
const KERNEL_METAPACKAGE: &str = "linux-image-amd64";

/// Where busybox-static installs its binary.
const BUSYBOX_PATH: &str = "/bin/busybox";

/// What to build.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestImageSpec {
    /// Files copied from the host into the initramfs: `(host path, absolute guest path)`.
    /// Permission bits are kept, so executables stay executable.
    pub extra_files: Vec<(PathBuf, String)>,
    /// A shell command `/init` runs instead of `/bin/tern-load` (busybox `sh`, with all
    /// busybox applets on `PATH`). `None` runs the workload.
    pub command: Option<String>,
    /// A kernel image to use instead of Debian's packaged one (e.g. a minimal kernel built
    /// from `linux-source`). `None` downloads `linux-image-amd64`'s dependency with apt.
    pub kernel: Option<PathBuf>,
}

/// A built image, ready for `qemu-system-x86_64 -kernel … -initrd … -append …`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestImage {
    /// The kernel image: for Debian's kernel the uncompressed `vmlinux` with its PVH
    /// entry note (QEMU's `-kernel` boots it directly, ~8 s faster under TCG than the
    /// bzImage), or the bzImage when no PVH image could be extracted.
    pub kernel: PathBuf,
    /// The initramfs (gzip-compressed newc cpio).
    pub initrd: PathBuf,
    /// The kernel release, e.g. `6.1.0-56-amd64 (6.1.192-2)`, or `custom:<sha256 prefix>`.
    pub kernel_version: String,
    /// The input hash naming the image's cache directory.
    pub id: String,
}

impl GuestImage {
    /// The kernel command line for this image running `params`.
    ///
    /// Chosen for a fast, quiet boot under TCG (where every instruction of the boot is
    /// emulated):
    /// - `console=ttyS0`: the built-in 8250 UART is the only channel out of the guest;
    /// - `quiet`: kernel messages would cost time on an emulated UART and would interleave
    ///   with the protocol lines;
    /// - `mitigations=off`: the guest is a test workload, speculative-execution hardening
    ///   only slows the emulated CPU;
    /// - `panic=-1`: a guest whose init dies reboots at once instead of hanging; run QEMU
    ///   with `-no-reboot` to make that an exit;
    /// - `tsc=reliable`: no clocksource watchdog. Under a loaded host (or across a
    ///   migration's pause) the watchdog can judge the emulated TSC unstable and switch to
    ///   HPET, after which every `clock_gettime` of `tern-load` is a system call plus an
    ///   emulated MMIO read — the workload's speed would change in the middle of a test;
    /// - `init_on_alloc=0`: Debian turns page zeroing on allocation on by default; the
    ///   workload writes every page itself, so zeroing only doubles the emulated work of
    ///   touching the working set at start;
    /// - `nowatchdog rcupdate.rcu_cpu_stall_suppress=1`: a post-copy link cut freezes the
    ///   vCPU for as long as the cut lasts (30 s in the fault matrix), after which the soft
    ///   lockup detector (`watchdog: BUG: soft lockup - CPU#0 stuck for 29s!`, printed at
    ///   `KERN_EMERG`, so `quiet` does not hide it) and the RCU stall detector (`KERN_ERR`,
    ///   after 21 s on Debian's kernel) write to the console. Kernel console writes bypass the
    ///   tty, so such a line can land in the middle of a heartbeat line the workload is
    ///   writing, the heartbeat no longer parses, and the verifier reports a sequence gap
    ///   that the migration did not cause (seen once in CI on the 30 s cut). A stall is what
    ///   tern measures (`max_dest_gap_ms`); the guest need not report it as well.
    pub fn cmdline(&self, params: &WorkloadParams) -> String {
        format!(
            "console=ttyS0 quiet mitigations=off panic=-1 tsc=reliable init_on_alloc=0 \
             nowatchdog rcupdate.rcu_cpu_stall_suppress=1 {}",
            params.kernel_args()
        )
    }

    /// Reads an image from its cache directory (written by [`build`]).
    fn load(dir: &Path) -> Option<GuestImage> {
        let text = fs::read_to_string(dir.join("image.json")).ok()?;
        let mut img: GuestImage = serde_json::from_str(&text).ok()?;
        // Stored relative to the directory so a cache can be moved.
        img.kernel = dir.join(&img.kernel);
        img.initrd = dir.join(&img.initrd);
        (img.kernel.is_file() && img.initrd.is_file()).then_some(img)
    }
}

/// Why an image could not be built.
#[derive(Debug, thiserror::Error)]
pub enum GuestError {
    /// A host tool or package the builder needs is missing.
    #[error("{what} not found: {hint}")]
    Missing {
        /// What is missing (a program, a package, a file).
        what: String,
        /// What to install or run to fix it.
        hint: String,
    },
    /// A command ran but failed.
    #[error("`{command}` failed ({status}): {stderr}")]
    Command {
        /// The command line.
        command: String,
        /// Its exit status.
        status: String,
        /// The end of its standard error.
        stderr: String,
    },
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// An extra file's guest path is unusable.
    #[error("extra file {host}: guest path {guest:?} is invalid: {reason}")]
    BadGuestPath {
        /// The host file.
        host: PathBuf,
        /// The guest path given.
        guest: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A serial log could not be read.
    #[error("serial log {path}: {source}")]
    SerialLog {
        /// The log file.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> GuestError + '_ {
    move |source| GuestError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The cache directory: `$TERN_CACHE_DIR`, or `/var/cache/tern`.
pub fn default_cache_dir() -> PathBuf {
    std::env::var_os("TERN_CACHE_DIR")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/cache/tern"))
}

/// Builds (or finds in the cache) the image for `spec`. `progress` receives one short
/// human-readable line per step that takes time (download, unpack, compile).
pub fn build(
    spec: &GuestImageSpec,
    cache_dir: &Path,
    progress: impl Fn(&str),
) -> Result<GuestImage, GuestError> {
    fs::create_dir_all(cache_dir).map_err(io_err(cache_dir))?;

    let kernel = match &spec.kernel {
        Some(path) => custom_kernel(path)?,
        None => debian_kernel(cache_dir, &progress)?,
    };
    // A custom kernel brings its own drivers (built in); Debian's has virtio as modules.
    let modules = match (&spec.kernel, kernel.path.parent()) {
        (None, Some(dir)) => debian_virtio_modules(dir)?,
        _ => Vec::new(),
    };
    let busybox = busybox()?;
    let gcc = gcc_version()?;
    let init = init_script(spec.command.as_deref(), &modules);
    let extras = read_extra_files(&spec.extra_files)?;

    // Every input of the image, labelled so that moving bytes between fields changes the hash.
    let mut h = Sha256::new();
    let mut feed = |label: &str, bytes: &[u8]| {
        h.update(label.as_bytes());
        h.update((bytes.len() as u64).to_le_bytes());
        h.update(bytes);
    };
    feed("builder", BUILDER_VERSION.as_bytes());
    feed("kernel", kernel.identity.as_bytes());
    feed("busybox", busybox.identity.as_bytes());
    feed("gcc", gcc.as_bytes());
    feed("tern-load.c", TERN_LOAD_SOURCE.as_bytes());
    feed("init", init.as_bytes());
    for m in &modules {
        feed("module-name", m.name.as_bytes());
        feed("module-data", &m.data);
    }
    for e in &extras {
        feed("extra-path", e.guest.as_bytes());
        feed("extra-mode", &e.mode.to_le_bytes());
        feed("extra-data", &e.data);
    }
    let id = hex::encode(&h.finalize()[..12]);

    let guest_root = cache_dir.join("guest");
    let final_dir = guest_root.join(&id);
    if let Some(img) = GuestImage::load(&final_dir) {
        return Ok(img);
    }
    fs::create_dir_all(&guest_root).map_err(io_err(&guest_root))?;
    remove_abandoned_builds(&guest_root, ".build-");
    progress(&format!("building guest image {id}"));

    let tmp = tempfile::Builder::new()
        .prefix(&format!(".build-{id}-"))
        .tempdir_in(&guest_root)
        .map_err(io_err(&guest_root))?;
    let dir = tmp.path();

    progress("compiling tern-load (gcc -static -O2)");
    let tern_load = compile_tern_load(dir)?;

    progress("writing initramfs");
    let initrd = dir.join("initrd.img");
    write_initramfs(&initrd, &busybox, &tern_load, &init, &extras, &modules)?;

    // `vmlinux` (PVH ELF) or `vmlinuz` (bzImage), so the name says which it is.
    let kernel_name = match file_name(&kernel.path).as_str() {
        "vmlinux" => "vmlinux",
        _ => "vmlinuz",
    };
    let kernel_dst = dir.join(kernel_name);
    if fs::hard_link(&kernel.path, &kernel_dst).is_err() {
        fs::copy(&kernel.path, &kernel_dst).map_err(io_err(&kernel_dst))?;
    }
    let meta = GuestImage {
        kernel: PathBuf::from(kernel_name),
        initrd: PathBuf::from("initrd.img"),
        kernel_version: kernel.version.clone(),
        id: id.clone(),
    };
    let meta_path = dir.join("image.json");
    let json = serde_json::to_string_pretty(&meta).map_err(|e| GuestError::Io {
        path: meta_path.clone(),
        source: std::io::Error::other(e),
    })?;
    fs::write(&meta_path, json).map_err(io_err(&meta_path))?;

    // Publish atomically. If another builder got there first its image has the same
    // inputs, so ours is dropped (the TempDir guard removes it) and theirs is used.
    let staged = tmp.keep();
    match fs::rename(&staged, &final_dir) {
        Ok(()) => {}
        Err(e) => {
            let _ = fs::remove_dir_all(&staged);
            if GuestImage::load(&final_dir).is_none() {
                return Err(GuestError::Io {
                    path: final_dir,
                    source: e,
                });
            }
        }
    }
    GuestImage::load(&final_dir).ok_or_else(|| GuestError::Io {
        path: final_dir.join("image.json"),
        source: std::io::Error::other("image vanished right after it was built"),
    })
}

/// Removes temporary build directories (`prefix*`) left by builders that were killed,
/// once they are an hour old: far longer than any build, so a live build is never touched.
fn remove_abandoned_builds(dir: &Path, prefix: &str) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for e in entries.filter_map(Result::ok) {
        let old = e
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|age| age > std::time::Duration::from_secs(3600));
        if old && file_name(&e.path()).starts_with(prefix) {
            let _ = fs::remove_dir_all(e.path());
        }
    }
}

/// A kernel image and what identifies it for the cache hash.
struct KernelFile {
    path: PathBuf,
    version: String,
    identity: String,
}

fn custom_kernel(path: &Path) -> Result<KernelFile, GuestError> {
    let data = fs::read(path).map_err(io_err(path))?;
    let sum = hex::encode(&Sha256::digest(&data)[..8]);
    Ok(KernelFile {
        path: path.to_path_buf(),
        version: format!("custom:{sum}"),
        identity: format!("custom:{}", hex::encode(Sha256::digest(&data))),
    })
}

/// Finds Debian's kernel package through apt, downloads and unpacks it once per
/// package version into `<cache>/kernel/<package>_<version>/`.
fn debian_kernel(cache: &Path, progress: &impl Fn(&str)) -> Result<KernelFile, GuestError> {
    let kernel_root = cache.join("kernel");
    let resolved = resolve_kernel_package(&kernel_root);
    let (package, version) = match resolved {
        Ok(pv) => pv,
        Err(e) => {
            // Offline or no apt lists: a kernel unpacked earlier is as good as any.
            if let Some(k) = newest_cached_kernel(&kernel_root) {
                progress(&format!(
                    "apt could not resolve {KERNEL_METAPACKAGE} ({e}); using cached {}",
                    k.version
                ));
                return Ok(k);
            }
            return Err(e);
        }
    };
    let dir = kernel_root.join(format!("{package}_{version}"));
    if cached_kernel(&dir).is_some() {
        // Entries cached before PVH extraction existed get their vmlinux now.
        ensure_pvh_vmlinux(&dir, progress)?;
        if let Some(k) = cached_kernel(&dir) {
            return Ok(k);
        }
    }
    fs::create_dir_all(&kernel_root).map_err(io_err(&kernel_root))?;
    remove_abandoned_builds(&kernel_root, ".download-");
    let tmp = tempfile::Builder::new()
        .prefix(".download-")
        .tempdir_in(&kernel_root)
        .map_err(io_err(&kernel_root))?;
    progress(&format!(
        "downloading {package} {version} with apt-get download"
    ));
    // `_apt` cannot write into a root-only temp dir; apt then downloads as root with a
    // warning, which is fine.
    run(Command::new("apt-get")
        .arg("download")
        .arg(format!("{package}={version}"))
        .current_dir(tmp.path()))
    .map_err(|e| match e {
        GuestError::Missing { .. } => missing_apt(),
        other => other,
    })?;
    let deb = fs::read_dir(tmp.path())
        .map_err(io_err(tmp.path()))?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "deb"))
        .ok_or_else(|| GuestError::Missing {
            what: format!("downloaded {package} .deb"),
            hint: format!("`apt-get download {package}={version}` produced no .deb file"),
        })?;
    progress(&format!("unpacking {} (dpkg -x)", file_name(&deb)));
    let unpack = tmp.path().join("root");
    run(Command::new("dpkg").arg("-x").arg(&deb).arg(&unpack))?;
    let boot = unpack.join("boot");
    let vmlinuz = fs::read_dir(&boot)
        .map_err(io_err(&boot))?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| file_name(p).starts_with("vmlinuz-"))
        .ok_or_else(|| GuestError::Missing {
            what: format!("boot/vmlinuz-* in {package}"),
            hint: "the package has no kernel image; is it a linux-image package?".into(),
        })?;
    let release = file_name(&vmlinuz)
        .trim_start_matches("vmlinuz-")
        .to_string();
    let stage = tmp.path().join("kernel");
    fs::create_dir(&stage).map_err(io_err(&stage))?;
    fs::rename(&vmlinuz, stage.join("vmlinuz")).map_err(io_err(&vmlinuz))?;
    // Keep the .deb: it is the cache of the download ("cached separately by version").
    fs::rename(&deb, stage.join(file_name(&deb))).map_err(io_err(&deb))?;
    fs::write(stage.join("version"), format!("{release} ({version})")).map_err(io_err(&stage))?;
    ensure_pvh_vmlinux(&stage, progress)?;
    if fs::rename(&stage, &dir).is_err() && cached_kernel(&dir).is_none() {
        return Err(GuestError::Io {
            path: dir,
            source: std::io::Error::other("could not move the unpacked kernel into the cache"),
        });
    }
    cached_kernel(&dir).ok_or_else(|| GuestError::Missing {
        what: format!("{}/vmlinuz", dir.display()),
        hint: "the kernel cache entry is incomplete; delete it and retry".into(),
    })
}

/// A kernel unpacked earlier: the PVH `vmlinux` when there is one, else the bzImage.
fn cached_kernel(dir: &Path) -> Option<KernelFile> {
    let version = fs::read_to_string(dir.join("version")).ok()?;
    let vmlinux = dir.join("vmlinux");
    let (path, format) = if vmlinux.is_file() {
        (vmlinux, "pvh-elf")
    } else {
        (dir.join("vmlinuz"), "bzimage")
    };
    path.is_file().then(|| KernelFile {
        identity: format!("debian:{}:{format}", file_name(dir)),
        path,
        version: version.trim().to_string(),
    })
}

/// Adds `vmlinux` (PVH-bootable) next to `vmlinuz` in a kernel cache entry, or a `no-pvh`
/// marker saying why not, so the attempt is made once. Written to a temporary file and
/// renamed, so a concurrent reader sees either no `vmlinux` or a complete one.
fn ensure_pvh_vmlinux(dir: &Path, progress: &impl Fn(&str)) -> Result<(), GuestError> {
    let target = dir.join("vmlinux");
    let marker = dir.join("no-pvh");
    if target.is_file() || marker.is_file() {
        return Ok(());
    }
    progress("extracting the uncompressed vmlinux for PVH boot (xz -d)");
    match extract_pvh_vmlinux(&dir.join("vmlinuz")) {
        Ok(elf) => {
            let mut tmp = tempfile::NamedTempFile::new_in(dir).map_err(io_err(dir))?;
            tmp.write_all(&elf).map_err(io_err(&target))?;
            let readable = std::os::unix::fs::PermissionsExt::from_mode(0o644);
            fs::set_permissions(tmp.path(), readable).map_err(io_err(&target))?;
            tmp.persist(&target).map_err(|e| GuestError::Io {
                path: target.clone(),
                source: e.error,
            })?;
        }
        Err(why) => {
            progress(&format!(
                "no PVH vmlinux ({why}); the bzImage will be booted"
            ));
            fs::write(&marker, why).map_err(io_err(&marker))?;
        }
    }
    Ok(())
}

/// Whether an ELF image carries the note that makes it bootable with QEMU's `-kernel`
/// through PVH: `XEN_ELFNOTE_PHYS32_ENTRY` (type 18), owner "Xen" (namesz 4). The
/// descriptor is 4 or 8 bytes depending on the kernel version, so descsz is not compared.
fn has_pvh_note(elf: &[u8]) -> bool {
    const NAMESZ: [u8; 4] = [4, 0, 0, 0];
    const TYPE_AND_NAME: [u8; 8] = [18, 0, 0, 0, b'X', b'e', b'n', 0];
    elf.windows(16)
        .any(|w| w[..4] == NAMESZ && w[8..] == TYPE_AND_NAME)
}

/// Why: under TCG the bzImage's own xz decompressor runs emulated and costs ~8 s of a
/// ~14 s boot (measured); QEMU boots an uncompressed ELF `vmlinux` carrying a PVH entry
/// note directly (Debian builds with `CONFIG_PVH=y`), skipping both the decompressor and
/// the BIOS real-mode boot path. The payload is found like the kernel's own
/// `scripts/extract-vmlinux` does: at the xz stream magic.
fn extract_pvh_vmlinux(bzimage: &Path) -> Result<Vec<u8>, String> {
    const XZ_MAGIC: &[u8] = b"\xfd7zXZ\x00";
    let data = fs::read(bzimage).map_err(|e| format!("{}: {e}", bzimage.display()))?;
    let start = data
        .windows(XZ_MAGIC.len())
        .position(|w| w == XZ_MAGIC)
        .ok_or("the bzImage has no xz payload")?;
    let mut child = Command::new("xz")
        .args(["-dc", "--single-stream"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .map_err(|e| format!("cannot run xz (install xz-utils): {e}"))?;
    let mut stdin = child.stdin.take().ok_or("xz has no stdin")?;
    let payload = data[start..].to_vec();
    // Feed from a thread: xz's output pipe would otherwise fill while we still write.
    let feeder = std::thread::spawn(move || {
        let _ = stdin.write_all(&payload);
    });
    let out = child.wait_with_output().map_err(|e| format!("xz: {e}"))?;
    let _ = feeder.join();
    if !out.status.success() {
        return Err(format!("xz -d failed ({})", out.status));
    }
    let elf = out.stdout;
    if !elf.starts_with(b"\x7fELF") {
        return Err("the payload is not an ELF image".into());
    }
    if !has_pvh_note(&elf) {
        return Err("the kernel has no PVH entry note (CONFIG_PVH is off)".into());
    }
    Ok(elf)
}

fn newest_cached_kernel(root: &Path) -> Option<KernelFile> {
    let mut dirs: Vec<PathBuf> = fs::read_dir(root)
        .ok()?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| !file_name(p).starts_with('.'))
        .collect();
    dirs.sort();
    dirs.iter().rev().find_map(|d| cached_kernel(d))
}

/// `linux-image-amd64` → (`linux-image-6.1.0-56-amd64`, `6.1.192-2`): the metapackage's
/// candidate depends on exactly one versioned kernel package, pinned with `(= version)`.
///
/// `apt-cache` takes ~3 s here, so the answer is remembered in `<cache>/kernel/resolved`
/// together with the modification time of apt's package lists; it is asked again only
/// after `apt-get update` changed them.
fn resolve_kernel_package(kernel_root: &Path) -> Result<(String, String), GuestError> {
    let lists_stamp = fs::metadata("/var/lib/apt/lists")
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map(|d| d.as_nanos().to_string());
    let memo = kernel_root.join("resolved");
    if let (Some(stamp), Ok(text)) = (&lists_stamp, fs::read_to_string(&memo)) {
        let mut parts = text.split_whitespace();
        if let (Some(s), Some(p), Some(v)) = (parts.next(), parts.next(), parts.next()) {
            if s == stamp {
                return Ok((p.to_string(), v.to_string()));
            }
        }
    }
    let out =
        run(Command::new("apt-cache").args(["show", "--no-all-versions", KERNEL_METAPACKAGE]))
            .map_err(|e| match e {
                GuestError::Missing { .. } => missing_apt(),
                GuestError::Command { .. } => GuestError::Missing {
                    what: format!("package {KERNEL_METAPACKAGE} in apt's lists"),
                    hint: "run `apt-get update` (apt has no package lists yet)".into(),
                },
                other => other,
            })?;
    let show = String::from_utf8_lossy(&out.stdout);
    let (package, version) = parse_kernel_dependency(&show).ok_or_else(|| GuestError::Missing {
        what: format!("a `linux-image-* (= version)` dependency of {KERNEL_METAPACKAGE}"),
        hint: "run `apt-get update` (apt has no package lists yet)".into(),
    })?;
    if let Some(stamp) = lists_stamp {
        // Best effort: a failed write only costs the next build another apt-cache call.
        let _ = fs::create_dir_all(kernel_root)
            .and_then(|()| fs::write(&memo, format!("{stamp} {package} {version}\n")));
    }
    Ok((package, version))
}

/// The `Depends: linux-image-X (= V)` of `apt-cache show linux-image-amd64`.
fn parse_kernel_dependency(show: &str) -> Option<(String, String)> {
    show.lines().find_map(|l| {
        let deps = l.strip_prefix("Depends:")?;
        deps.split(',').find_map(|d| {
            let d = d.trim();
            let (name, rest) = d.split_once(' ')?;
            let version = rest.trim().strip_prefix("(=")?.strip_suffix(')')?.trim();
            (name.starts_with("linux-image-") && !version.is_empty())
                .then(|| (name.to_string(), version.to_string()))
        })
    })
}

fn missing_apt() -> GuestError {
    GuestError::Missing {
        what: "apt-get/apt-cache".into(),
        hint: "the Debian kernel is fetched with apt; on a non-Debian host give \
               GuestImageSpec::kernel a kernel image"
            .into(),
    }
}

/// The static busybox and what identifies it.
struct Busybox {
    data: Vec<u8>,
    applets: Vec<String>,
    identity: String,
}

fn busybox() -> Result<Busybox, GuestError> {
    let missing = || GuestError::Missing {
        what: "busybox-static (/bin/busybox)".into(),
        hint: "run scripts/install-prereqs.sh (or `apt-get install busybox-static`)".into(),
    };
    let version = dpkg_version("busybox-static").ok_or_else(missing)?;
    let data = fs::read(BUSYBOX_PATH).map_err(|_| missing())?;
    let out = run(Command::new(BUSYBOX_PATH).arg("--list"))?;
    let applets = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::trim)
        .filter(|a| !a.is_empty() && *a != "busybox" && !a.contains('/'))
        .map(str::to_string)
        .collect();
    let identity = format!(
        "busybox-static {version} {}",
        hex::encode(Sha256::digest(&data))
    );
    Ok(Busybox {
        data,
        applets,
        identity,
    })
}

fn dpkg_version(package: &str) -> Option<String> {
    let out = Command::new("dpkg-query")
        .args(["-W", "-f=${Status}\t${Version}", package])
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let (status, version) = text.split_once('\t')?;
    status
        .ends_with("installed")
        .then(|| version.trim().to_string())
}

fn gcc_version() -> Result<String, GuestError> {
    let out = run(Command::new("gcc").arg("--version")).map_err(|e| match e {
        GuestError::Missing { .. } => missing_gcc(),
        other => other,
    })?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .next()
        .unwrap_or("gcc")
        .to_string())
}

fn missing_gcc() -> GuestError {
    GuestError::Missing {
        what: "gcc with static glibc (gcc, libc6-dev)".into(),
        hint: "run scripts/install-prereqs.sh (or `apt-get install gcc libc6-dev`)".into(),
    }
}

/// Compiles the embedded `tern-load.c` into a static binary inside `dir`.
fn compile_tern_load(dir: &Path) -> Result<Vec<u8>, GuestError> {
    let src = dir.join("tern-load.c");
    fs::write(&src, TERN_LOAD_SOURCE).map_err(io_err(&src))?;
    let bin = dir.join("tern-load");
    run(Command::new("gcc")
        .args(["-static", "-O2", "-Wall", "-o"])
        .arg(&bin)
        .arg(&src))
    .map_err(|e| match e {
        GuestError::Missing { .. } => missing_gcc(),
        GuestError::Command { stderr, .. } if stderr.contains("cannot find -lc") => missing_gcc(),
        other => other,
    })?;
    let data = fs::read(&bin).map_err(io_err(&bin))?;
    let _ = fs::remove_file(&src);
    let _ = fs::remove_file(&bin);
    Ok(data)
}

/// `/init`: mount the pseudo filesystems the workload and busybox expect, run the
/// workload (or the custom command), and power off when it ends, so a finished guest
/// makes QEMU exit instead of panicking ("attempted to kill init").
fn init_script(command: Option<&str>, modules: &[KernelModule]) -> String {
    let run = command.unwrap_or("/bin/tern-load");
    let modules = crate::modules::init_lines(modules);
    let network = crate::modules::network_init_lines();
    format!(
        "#!/bin/sh\n\
         # Generated by tern-guest ({BUILDER_VERSION}).\n\
         export PATH=/bin:/sbin:/usr/bin:/usr/sbin\n\
         mount -t proc proc /proc\n\
         mount -t sysfs sysfs /sys\n\
         mount -t devtmpfs devtmpfs /dev\n\
         mkdir -p /tmp /run\n\
         {modules}\
         {network}\
         {run}\n\
         echo \"tern-init: command exited with status $?, powering off\"\n\
         poweroff -f\n"
    )
}

struct ExtraFile {
    guest: String,
    mode: u32,
    data: Vec<u8>,
}

fn read_extra_files(files: &[(PathBuf, String)]) -> Result<Vec<ExtraFile>, GuestError> {
    use std::os::unix::fs::PermissionsExt;
    files
        .iter()
        .map(|(host, guest)| {
            let bad = |reason| GuestError::BadGuestPath {
                host: host.clone(),
                guest: guest.clone(),
                reason,
            };
            if !guest.starts_with('/') {
                return Err(bad("must be absolute, e.g. /bin/mytool"));
            }
            if guest.split('/').any(|c| c == ".." || c == ".") {
                return Err(bad("must not contain `.` or `..` components"));
            }
            if guest.ends_with('/') || guest == "/init" {
                return Err(bad("must name a file other than /init"));
            }
            let meta = fs::metadata(host).map_err(io_err(host))?;
            let data = fs::read(host).map_err(io_err(host))?;
            Ok(ExtraFile {
                guest: guest.clone(),
                mode: meta.permissions().mode() & 0o7777,
                data,
            })
        })
        .collect()
}

fn write_initramfs(
    path: &Path,
    busybox: &Busybox,
    tern_load: &[u8],
    init: &str,
    extras: &[ExtraFile],
    modules: &[KernelModule],
) -> Result<(), GuestError> {
    let file = fs::File::create(path).map_err(io_err(path))?;
    let gz =
        flate2::write::GzEncoder::new(std::io::BufWriter::new(file), flate2::Compression::fast());
    let write = || -> std::io::Result<()> {
        let mut w = CpioWriter::new(gz);
        for d in [
            "bin", "sbin", "usr/bin", "usr/sbin", "proc", "sys", "dev", "tmp", "run",
        ] {
            w.dir(d, 0o755)?;
        }
        // Without /dev/console the kernel opens no stdin/stdout/stderr for init.
        w.char_device("dev/console", 0o600, 5, 1)?;
        w.char_device("dev/null", 0o666, 1, 3)?;
        w.file("bin/busybox", 0o755, &busybox.data)?;
        for a in &busybox.applets {
            w.symlink(&format!("bin/{a}"), "busybox")?;
        }
        w.file("bin/tern-load", 0o755, tern_load)?;
        if !modules.is_empty() {
            w.dir("lib", 0o755)?;
            w.dir("lib/modules", 0o755)?;
            for m in modules {
                w.file(&format!("lib/modules/{}.ko", m.name), 0o644, &m.data)?;
            }
        }
        w.file("init", 0o755, init.as_bytes())?;
        for e in extras {
            w.file(&e.guest, e.mode, &e.data)?;
        }
        let gz = w.finish()?;
        let mut buf = gz.finish()?;
        buf.flush()
    };
    write().map_err(io_err(path))
}

/// Runs a command, turning "not found" into [`GuestError::Missing`] and a failure into
/// [`GuestError::Command`] with the end of its stderr.
fn run(cmd: &mut Command) -> Result<Output, GuestError> {
    let line = format!(
        "{} {}",
        cmd.get_program().to_string_lossy(),
        cmd.get_args()
            .map(|a| a.to_string_lossy())
            .collect::<Vec<_>>()
            .join(" ")
    );
    let out = cmd.output().map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            GuestError::Missing {
                what: cmd.get_program().to_string_lossy().into_owned(),
                hint: "run scripts/install-prereqs.sh".into(),
            }
        } else {
            GuestError::Command {
                command: line.clone(),
                status: "could not start".into(),
                stderr: e.to_string(),
            }
        }
    })?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let tail: Vec<&str> = stderr.lines().rev().take(8).collect();
        return Err(GuestError::Command {
            command: line,
            status: out.status.to_string(),
            stderr: tail.into_iter().rev().collect::<Vec<_>>().join("\n"),
        });
    }
    Ok(out)
}

fn file_name(p: &Path) -> String {
    p.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_dependency_is_found_in_apt_cache_show_output() {
        let out = "Package: linux-image-amd64\nVersion: 6.1.192-2\n\
                   Depends: linux-image-6.1.0-56-amd64 (= 6.1.192-2)\nDescription: x\n";
        assert_eq!(
            parse_kernel_dependency(out),
            Some(("linux-image-6.1.0-56-amd64".into(), "6.1.192-2".into()))
        );
        let two = "Depends: foo (>= 1), linux-image-6.12.9-amd64 (= 6.12.9-1~bpo12+1)\n";
        assert_eq!(
            parse_kernel_dependency(two),
            Some(("linux-image-6.12.9-amd64".into(), "6.12.9-1~bpo12+1".into()))
        );
        assert_eq!(
            parse_kernel_dependency("Depends: linux-image-x (>= 1)\n"),
            None
        );
        assert_eq!(
            parse_kernel_dependency("Package: linux-image-amd64\n"),
            None
        );
    }

    #[test]
    fn init_runs_the_workload_or_the_custom_command_then_powers_off() {
        let default = init_script(None, &[]);
        assert!(default.starts_with("#!/bin/sh\n"));
        assert!(default.contains("\n/bin/tern-load\n"));
        assert!(default.contains("mount -t devtmpfs"));
        assert!(default.trim_end().ends_with("poweroff -f"));
        let custom = init_script(Some("echo hello"), &[]);
        assert!(custom.contains("\necho hello\n"));
        assert!(!custom.contains("tern-load"));
    }

    #[test]
    fn extra_file_guest_paths_are_validated() {
        let host = PathBuf::from("/etc/hostname");
        for (guest, why) in [
            ("bin/x", "absolute"),
            ("/a/../b", ".."),
            ("/init", "/init"),
            ("/dir/", "file"),
        ] {
            let err = read_extra_files(&[(host.clone(), guest.into())])
                .err()
                .unwrap_or_else(|| panic!("{guest} accepted"));
            let msg = err.to_string();
            assert!(msg.contains(guest) && msg.contains(why), "{msg}");
        }
    }

    #[test]
    fn missing_extra_file_names_the_path() {
        let err = read_extra_files(&[(PathBuf::from("/nonexistent/tern"), "/bin/x".into())])
            .err()
            .unwrap();
        assert!(err.to_string().contains("/nonexistent/tern"), "{err}");
    }

    #[test]
    fn cmdline_carries_console_and_params() {
        let img = GuestImage {
            kernel: "k".into(),
            initrd: "i".into(),
            kernel_version: "v".into(),
            id: "x".into(),
        };
        let c = img.cmdline(&WorkloadParams::default());
        assert!(c.starts_with("console=ttyS0 "));
        // A post-copy stall must not make the kernel write into the heartbeat stream.
        assert!(
            c.contains(" nowatchdog rcupdate.rcu_cpu_stall_suppress=1 "),
            "{c}"
        );
        assert!(c.ends_with("tern_ws_mib=64 tern_rate=max tern_pattern=seq tern_verify=1"));
    }

    #[test]
    fn pvh_note_is_recognised_with_4_or_8_byte_descriptors() {
        let note = |descsz: u8, ty: u8| {
            let mut v = vec![0xAAu8; 5];
            v.extend_from_slice(&[4, 0, 0, 0, descsz, 0, 0, 0, ty, 0, 0, 0]);
            v.extend_from_slice(b"Xen\0\x50\x08\0\x01");
            v
        };
        assert!(has_pvh_note(&note(4, 18)));
        assert!(has_pvh_note(&note(8, 18)));
        assert!(!has_pvh_note(&note(8, 17)));
    }

    #[test]
    fn custom_kernel_is_identified_by_its_content() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        fs::write(&a, b"kernel one").unwrap();
        fs::write(&b, b"kernel two").unwrap();
        let (ka, kb) = (custom_kernel(&a).unwrap(), custom_kernel(&b).unwrap());
        assert!(ka.version.starts_with("custom:"));
        assert_ne!(ka.identity, kb.identity);
        assert_eq!(ka.path, a);
        let missing = custom_kernel(&dir.path().join("nope")).err().unwrap();
        assert!(missing.to_string().contains("nope"), "{missing}");
    }

    #[test]
    fn abandoned_build_dirs_are_removed_only_when_old() {
        let dir = tempfile::tempdir().unwrap();
        let fresh = dir.path().join(".build-fresh");
        let keep = dir.path().join("0123abcd");
        fs::create_dir(&fresh).unwrap();
        fs::create_dir(&keep).unwrap();
        remove_abandoned_builds(dir.path(), ".build-");
        assert!(fresh.exists() && keep.exists());
        let old = dir.path().join(".build-old");
        fs::create_dir(&old).unwrap();
        let two_hours_ago = std::time::SystemTime::now() - std::time::Duration::from_secs(7200);
        fs::File::open(&old)
            .unwrap()
            .set_modified(two_hours_ago)
            .unwrap();
        remove_abandoned_builds(dir.path(), ".build-");
        assert!(!old.exists());
        assert!(fresh.exists() && keep.exists());
    }

    #[test]
    fn embedded_source_is_the_workload() {
        assert!(TERN_LOAD_SOURCE.contains("CTLMISMATCH stack="));
        assert!(TERN_LOAD_SOURCE.contains("\"HB %llu %llu\""));
    }
}
