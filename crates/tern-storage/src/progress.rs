//! Progress of a storage migration, per disk, from `query-block-jobs`.

use std::fmt;

use tern_qmp::{BlockJobInfo, JobStatus};

use crate::MirroredDisk;

/// One disk's mirror.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskProgress {
    /// The disk id.
    pub disk: String,
    /// Bytes copied.
    pub offset: u64,
    /// Bytes to copy in total; grows while the guest writes areas already copied, which is
    /// the disk's dirty rate as the policy's model needs it.
    pub len: u64,
    /// In sync.
    pub ready: bool,
    /// The job's state; `None` if the job is not (or no longer) listed.
    pub status: Option<JobStatus>,
}

/// Every disk's mirror.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct StorageProgress {
    /// In the order the disks were given.
    pub disks: Vec<DiskProgress>,
}

impl StorageProgress {
    /// Matches jobs to disks by job id.
    pub fn from_jobs(disks: &[MirroredDisk], jobs: &[BlockJobInfo]) -> Self {
        Self {
            disks: disks
                .iter()
                .map(|d| {
                    let job_id = d.job_id();
                    match jobs.iter().find(|j| j.device == job_id) {
                        Some(j) => DiskProgress {
                            disk: d.id.clone(),
                            offset: j.offset,
                            len: j.len,
                            ready: j.ready,
                            status: Some(j.status.clone()),
                        },
                        None => DiskProgress {
                            disk: d.id.clone(),
                            offset: 0,
                            len: 0,
                            ready: false,
                            status: None,
                        },
                    }
                })
                .collect(),
        }
    }

    /// Bytes copied over all disks.
    pub fn bytes_mirrored(&self) -> u64 {
        self.disks.iter().map(|d| d.offset).sum()
    }

    /// Bytes to copy over all disks.
    pub fn bytes_total(&self) -> u64 {
        self.disks.iter().map(|d| d.len).sum()
    }

    /// True if there is at least one disk and every mirror is ready.
    pub fn all_ready(&self) -> bool {
        !self.disks.is_empty() && self.disks.iter().all(|d| d.ready)
    }
}

impl fmt::Display for StorageProgress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let parts: Vec<String> = self
            .disks
            .iter()
            .map(|d| {
                let status = d
                    .status
                    .as_ref()
                    .map_or("no job".to_string(), |s| s.to_string());
                format!("{}: {}/{} bytes, {status}", d.disk, d.offset, d.len)
            })
            .collect();
        write!(f, "mirrors [{}]", parts.join("; "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(id: &str, offset: u64, len: u64, ready: bool) -> BlockJobInfo {
        serde_json::from_value(serde_json::json!({
            "type": "mirror", "device": id, "offset": offset, "len": len, "ready": ready,
            "status": if ready { "ready" } else { "running" }
        }))
        .unwrap()
    }

    #[test]
    fn progress_matches_jobs_to_disks_and_sums() {
        let disks = [
            MirroredDisk {
                id: "a".into(),
                node_name: "tern-a".into(),
            },
            MirroredDisk {
                id: "b".into(),
                node_name: "tern-b".into(),
            },
        ];
        let jobs = [
            job("tern-mirror-b", 10, 20, false),
            job("other", 1, 1, true),
            job("tern-mirror-a", 5, 5, true),
        ];
        let p = StorageProgress::from_jobs(&disks, &jobs);
        assert_eq!(p.disks[0].disk, "a");
        assert_eq!((p.bytes_mirrored(), p.bytes_total()), (15, 25));
        assert!(!p.all_ready());
        assert!(p.to_string().contains("b: 10/20 bytes, running"));
        let p = StorageProgress::from_jobs(&disks[..1], &jobs);
        assert!(p.all_ready());
        let p = StorageProgress::from_jobs(&disks, &[]);
        assert!(!p.all_ready() && p.disks[1].status.is_none());
        assert!(!StorageProgress::default().all_ready());
    }
}
