//! Policy names as a closed set, parsed once at the edge (CLI flag, API request, bench file).

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::{MigrationPolicy, POLICY_NAMES, UnknownPolicy};

/// A selectable policy: ours (`tern`, the default) or a baseline. Serialized as its name in
/// [`POLICY_NAMES`] (`"nova-2016"`), so JSON and TOML keep the strings they always had.
#[derive(
    Debug,
    Clone,
    Copy,
    Default,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    Serialize,
    Deserialize,
    utoipa::ToSchema,
)]
#[serde(rename_all = "kebab-case")]
pub enum PolicyName {
    /// tern's own policy.
    #[default]
    Tern,
    /// OpenStack Nova (current), `live_migration_timeout_action = abort`.
    Nova,
    /// OpenStack Nova with `live_migration_timeout_action = force_complete` (host drains).
    NovaForceComplete,
    /// OpenStack Nova as of 2016.
    #[serde(rename = "nova-2016")]
    Nova2016,
    /// KubeVirt (progress timeout).
    Kubevirt,
    /// KubeVirt with its stall detection.
    KubevirtStall,
    /// oVirt's post-copy policy.
    OvirtPostcopy,
    /// oVirt's "Minimal downtime" policy (for hosts where post-copy is denied).
    OvirtMinimalDowntime,
    /// Proxmox VE.
    Proxmox,
    /// libvirt: post-copy after one pre-copy pass.
    LibvirtPostcopyAfterPrecopy,
    /// QEMU's defaults, no policy.
    QemuDefault,
}

impl PolicyName {
    /// Every policy, in [`POLICY_NAMES`] order.
    pub const ALL: [PolicyName; 11] = [
        Self::Tern,
        Self::Nova,
        Self::NovaForceComplete,
        Self::Nova2016,
        Self::Kubevirt,
        Self::KubevirtStall,
        Self::OvirtPostcopy,
        Self::OvirtMinimalDowntime,
        Self::Proxmox,
        Self::LibvirtPostcopyAfterPrecopy,
        Self::QemuDefault,
    ];

    /// The policy's name (`"kubevirt-stall"`).
    pub fn as_str(self) -> &'static str {
        POLICY_NAMES[Self::ALL.iter().position(|p| *p == self).unwrap_or(0)]
    }

    /// A fresh instance, wrapped in the [`crate::PermissionGuard`].
    pub fn build(self) -> Box<dyn MigrationPolicy> {
        match crate::policy_by_name(self.as_str()) {
            Ok(p) => p,
            // Unreachable: every name in ALL resolves (tested); fall back to ours.
            Err(_) => Box::new(crate::PermissionGuard::new(Box::new(
                crate::TernPolicy::new(),
            ))),
        }
    }
}

impl fmt::Display for PolicyName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for PolicyName {
    type Err = UnknownPolicy;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|p| p.as_str() == s.trim())
            .ok_or_else(|| UnknownPolicy {
                given: s.to_string(),
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_through_text_and_serde() {
        assert_eq!(PolicyName::ALL.len(), POLICY_NAMES.len());
        for (p, name) in PolicyName::ALL.iter().zip(POLICY_NAMES) {
            assert_eq!(p.as_str(), *name);
            assert_eq!(name.parse::<PolicyName>().unwrap(), *p);
            assert_eq!(serde_json::to_string(p).unwrap(), format!("\"{name}\""));
            assert_eq!(p.build().name(), *name);
        }
        let e = "vmware".parse::<PolicyName>().unwrap_err().to_string();
        assert!(e.contains("vmware") && e.contains("nova-2016"), "{e}");
        assert!(serde_json::from_str::<PolicyName>("\"vmware\"").is_err());
    }
}
