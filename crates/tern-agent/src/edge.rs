//! Checks of client input that need the host's configuration: guest image paths inside the
//! configured image directories, and SLA classes the catalog knows. Run before anything is
//! started, by the API and by nothing else (in-process callers own their paths).

use std::path::{Path, PathBuf};

use tern_policy::SlaCatalog;
use tern_qemu::VmSpec;

use crate::AgentError;

/// `spec` with its kernel and initrd resolved (`..` and symlinks followed) and checked to lie
/// inside one of `image_dirs`; refuses anything else. QEMU runs as root: without this check a
/// client could make it read any file (`kernel: "/etc/shadow"`).
pub fn confine_images(mut spec: VmSpec, image_dirs: &[PathBuf]) -> Result<VmSpec, AgentError> {
    let roots: Vec<PathBuf> = image_dirs
        .iter()
        .filter_map(|d| d.canonicalize().ok())
        .collect();
    for (what, path) in [("kernel", &mut spec.kernel), ("initrd", &mut spec.initrd)] {
        *path = confine(what, path, &roots, image_dirs)?;
    }
    Ok(spec)
}

fn confine(
    what: &str,
    path: &Path,
    roots: &[PathBuf],
    image_dirs: &[PathBuf],
) -> Result<PathBuf, AgentError> {
    let dirs = image_dirs
        .iter()
        .map(|d| d.display().to_string())
        .collect::<Vec<_>>()
        .join(", ");
    let outside = || {
        AgentError::Invalid(format!(
            "{what} {} is outside the host's image directories ({dirs}): give a file inside \
             them (`image_dirs` in the agent configuration)",
            path.display()
        ))
    };
    if !path.is_absolute() {
        return Err(AgentError::Invalid(format!(
            "{what} {} is a relative path: give an absolute path inside {dirs}",
            path.display()
        )));
    }
    // Whether a missing file would have been inside: only then say it does not exist (no
    // oracle for the existence of files elsewhere).
    let lexically_inside = image_dirs.iter().any(|d| path.starts_with(d))
        && !path
            .components()
            .any(|c| c == std::path::Component::ParentDir);
    let real = path.canonicalize().map_err(|e| {
        if !lexically_inside {
            outside()
        } else {
            AgentError::Invalid(format!(
                "{what} {} does not exist ({e}): give a file inside {dirs} (build one with \
                 `tern guest build`)",
                path.display()
            ))
        }
    })?;
    if !roots.iter().any(|r| real.starts_with(r)) || !real.is_file() {
        return Err(outside());
    }
    Ok(real)
}

/// Refuses a VM whose SLA class the catalog does not know, at creation (not later, when a
/// migration would need it).
pub fn check_sla_class(spec: &VmSpec, catalog: &SlaCatalog) -> Result<(), AgentError> {
    catalog
        .get(&spec.migration.sla_class)
        .map(|_| ())
        .map_err(|e| AgentError::Invalid(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(kernel: &Path, initrd: &Path) -> VmSpec {
        VmSpec {
            name: "web".into(),
            memory_mib: 128,
            vcpus: 1,
            kernel: kernel.into(),
            initrd: initrd.into(),
            cmdline: String::new(),
            accelerator: tern_qemu::Accelerator::Tcg,
            migration: Default::default(),
            devices: Default::default(),
        }
    }

    #[test]
    fn images_must_stay_inside_the_image_directories() {
        let dir = tempfile::tempdir().unwrap();
        let images = dir.path().join("images");
        std::fs::create_dir(&images).unwrap();
        let (k, i) = (images.join("vmlinuz"), images.join("initrd"));
        std::fs::write(&k, b"k").unwrap();
        std::fs::write(&i, b"i").unwrap();
        let secret = dir.path().join("secret");
        std::fs::write(&secret, b"s").unwrap();
        std::os::unix::fs::symlink(&secret, images.join("link")).unwrap();
        let dirs = vec![images.clone()];

        let ok = confine_images(spec(&k, &i), &dirs).unwrap();
        assert_eq!(ok.kernel, k.canonicalize().unwrap());

        for bad in [
            PathBuf::from("/etc/shadow"),
            images.join("../secret"),
            images.join("link"),
            images.clone(),
        ] {
            let e = confine_images(spec(&bad, &i), &dirs)
                .unwrap_err()
                .to_string();
            assert!(
                e.contains(&bad.display().to_string()) && e.contains("image directories"),
                "{e}"
            );
        }
        let e = confine_images(spec(&k, Path::new("initrd")), &dirs)
            .unwrap_err()
            .to_string();
        assert!(e.contains("relative"), "{e}");
        let e = confine_images(spec(&images.join("nope"), &i), &dirs)
            .unwrap_err()
            .to_string();
        assert!(e.contains("does not exist"), "{e}");
    }

    #[test]
    fn unknown_sla_classes_are_refused_at_creation() {
        let mut s = spec(Path::new("/k"), Path::new("/i"));
        assert!(check_sla_class(&s, &SlaCatalog::builtin()).is_ok());
        s.migration.sla_class = "platinum-plus".into();
        let e = check_sla_class(&s, &SlaCatalog::builtin())
            .unwrap_err()
            .to_string();
        assert!(e.contains("platinum-plus"), "{e}");
    }
}
