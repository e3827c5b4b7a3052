//! One place that turns what two QEMUs report into [`QemuFeatures`], for the real run and for
//! the dry-run (`POST /v1/migrations/plan`, `tern migrate --dry-run`), so the plan shown is
//! the plan that runs.
//!
//! Three kinds of facts go in: capabilities (`query-migrate-capabilities`), commands
//! (`query-commands`) and a run-time probe (`dirty-limit` is listed by every QEMU ≥ 8.1 but
//! refused at `migrate-set-capabilities` without KVM's dirty ring, so listing is not enough).

use std::collections::BTreeSet;

use tern_policy::{PlanInput, PostCopyPermission, QemuFeatures};
use tern_qmp::MigrationCapability;

use crate::EngineError;
use crate::endpoint::{EndpointFacts, SourceEndpoint};

/// Everything [`qemu_features`] needs, gathered from both sides.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FeatureFacts {
    /// The source QEMU.
    pub source: EndpointFacts,
    /// The destination QEMU (for a dry-run: the destination host's QEMU binary).
    pub destination: EndpointFacts,
    /// The source accepted `dirty-limit` when it was switched on (run-time probe).
    pub dirty_limit_accepted: bool,
}

/// The features a migration between these two QEMUs can use. Pure.
///
/// * post-copy family and multifd must be on both ends (QEMU fails the stream otherwise);
/// * post-copy recovery needs `migrate-pause` on the source and `migrate-recover` on the
///   destination (qapi/migration.json);
/// * multifd together with post-copy needs QEMU ≥ 10.1 on both ends;
/// * the rest is source-only.
pub fn qemu_features(facts: &FeatureFacts) -> QemuFeatures {
    let src = &facts.source.capabilities;
    let dst = &facts.destination.capabilities;
    let both = |c: MigrationCapability| src.contains(&c) && dst.contains(&c);
    let src_cmds = &facts.source.commands;
    QemuFeatures {
        postcopy_ram: both(MigrationCapability::PostcopyRam),
        postcopy_preempt: both(MigrationCapability::PostcopyPreempt),
        postcopy_recovery: src_cmds.contains("migrate-pause")
            && facts.destination.commands.contains("migrate-recover"),
        auto_converge: src.contains(&MigrationCapability::AutoConverge),
        dirty_limit: src.contains(&MigrationCapability::DirtyLimit)
            && src_cmds.contains("set-vcpu-dirty-limit")
            && facts.dirty_limit_accepted,
        multifd: both(MigrationCapability::Multifd),
        multifd_with_postcopy: facts.source.version >= (10, 1)
            && facts.destination.version >= (10, 1),
        xbzrle: src.contains(&MigrationCapability::Xbzrle),
        calc_dirty_rate: src_cmds.contains("calc-dirty-rate"),
    }
}

/// Gathers the source's facts (including the `dirty-limit` probe) and combines them with the
/// destination's. The probe switches the capability on and off again on the source, so it is
/// only run before `migrate`.
pub async fn detect_features(
    source: &dyn SourceEndpoint,
    destination: EndpointFacts,
) -> Result<FeatureFacts, EngineError> {
    let source_facts = source.facts().await?;
    let dirty_limit_accepted = source_facts
        .capabilities
        .contains(&MigrationCapability::DirtyLimit)
        && source_facts.commands.contains("set-vcpu-dirty-limit")
        && source
            .capability_accepted(MigrationCapability::DirtyLimit)
            .await;
    Ok(FeatureFacts {
        source: source_facts,
        destination,
        dirty_limit_accepted,
    })
}

/// What the two QEMUs contribute to a plan: features and the safety gates' verdict.
#[derive(Debug, Clone, PartialEq)]
pub struct QemuPlanInput {
    /// The caller's input with `features` set and post-copy forbidden where a gate failed.
    pub input: PlanInput,
    /// The facts the features came from.
    pub facts: FeatureFacts,
    /// Why post-copy was refused by a gate (for the log and the plan's reasons).
    pub refusals: Vec<String>,
}

/// The one path from two QEMUs to a plan input, for the real run and the dry-run alike:
/// [`detect_features`], [`qemu_features`], [`post_copy_safety_gates`]. The caller plans with
/// `policy.plan(&result.input)` and appends `result.refusals` to the plan's reasons.
pub async fn plan_input_from_qemus(
    source: &dyn SourceEndpoint,
    destination: EndpointFacts,
    mut input: PlanInput,
) -> Result<QemuPlanInput, EngineError> {
    let facts = detect_features(source, destination).await?;
    input.features = qemu_features(&facts);
    let refusals = post_copy_safety_gates(source, &mut input).await;
    Ok(QemuPlanInput {
        input,
        facts,
        refusals,
    })
}

/// The safety gates the source QEMU itself decides, applied to `input` (post-copy forbidden
/// for this migration when one fails); returns why, one line per refusal. The real run and
/// the dry-run both call this, so both plan with the same permission.
///
/// * A paused guest must not be migrated post-copy (Nova LP#1671011: the destination would
///   start a guest the operator stopped).
/// * No post-copy with a VFIO device (state in host hardware that cannot be fetched page by
///   page; Nova forbids post-copy with PCI passthrough too). A QEMU that cannot list its
///   devices is treated as having one.
pub async fn post_copy_safety_gates(
    source: &dyn SourceEndpoint,
    input: &mut PlanInput,
) -> Vec<String> {
    let mut refusals = Vec::new();
    if input.vm.post_copy != PostCopyPermission::Allowed {
        return refusals;
    }
    if let Ok(st) = source.run_state().await
        && !st.running
    {
        input.vm.post_copy = PostCopyPermission::Forbidden;
        refusals.push(format!(
            "the guest is {} on the source: post-copy refused for this migration",
            st.status.as_str()
        ));
        return refusals;
    }
    let refused = match source.vfio_devices().await {
        Ok(devs) if devs.is_empty() => None,
        Ok(devs) => Some(format!(
            "VFIO device(s) on the source: {}: post-copy refused for this migration",
            devs.join(", ")
        )),
        Err(e) => Some(format!(
            "cannot list the guest's devices to rule out VFIO ({e}): post-copy refused for \
             this migration"
        )),
    };
    if let Some(text) = refused {
        input.vm.post_copy = PostCopyPermission::Forbidden;
        refusals.push(text);
    }
    refusals
}

/// Destination facts from what a destination host advertises (capability and command names
/// of its QEMU binary, its version string), for a dry-run before any destination QEMU exists.
/// Names this tern does not know are kept (as `MigrationCapability::Unknown`), never dropped.
pub fn facts_from_names<'a>(
    capabilities: impl IntoIterator<Item = &'a str>,
    commands: impl IntoIterator<Item = &'a str>,
    version: (u64, u64),
) -> EndpointFacts {
    EndpointFacts {
        capabilities: capabilities
            .into_iter()
            .filter_map(|c| serde_json::from_value(serde_json::Value::String(c.into())).ok())
            .collect::<BTreeSet<MigrationCapability>>(),
        commands: commands.into_iter().map(str::to_string).collect(),
        version,
    }
}

/// Parses a version string such as `10.0.2` or `9.2.0 (Debian 1:9.2+ds-1)` into
/// `(major, minor)`; `(0, 0)` when it does not parse (features needing a version are off).
pub fn parse_version(text: &str) -> (u64, u64) {
    let mut parts = text
        .split(|c: char| !c.is_ascii_digit())
        .filter(|p| !p.is_empty())
        .map(|p| p.parse::<u64>().unwrap_or(0));
    (parts.next().unwrap_or(0), parts.next().unwrap_or(0))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn side(caps: &[&str], cmds: &[&str], v: (u64, u64)) -> EndpointFacts {
        facts_from_names(caps.iter().copied(), cmds.iter().copied(), v)
    }

    #[test]
    fn recovery_needs_pause_on_the_source_and_recover_on_the_destination() {
        let src = side(&["postcopy-ram"], &["migrate-pause"], (10, 0));
        let dst = side(&["postcopy-ram"], &["migrate-recover"], (10, 0));
        let f = qemu_features(&FeatureFacts {
            source: src.clone(),
            destination: dst,
            dirty_limit_accepted: false,
        });
        assert!(f.postcopy_ram && f.postcopy_recovery);
        let f = qemu_features(&FeatureFacts {
            source: src.clone(),
            destination: side(&["postcopy-ram"], &[], (10, 0)),
            dirty_limit_accepted: false,
        });
        assert!(!f.postcopy_recovery);
    }

    #[test]
    fn dirty_limit_needs_the_probe_and_multifd_with_postcopy_needs_10_1_on_both() {
        let src = side(
            &["dirty-limit", "multifd"],
            &["set-vcpu-dirty-limit"],
            (10, 1),
        );
        let dst = side(&["multifd"], &[], (10, 0));
        let facts = FeatureFacts {
            source: src,
            destination: dst,
            dirty_limit_accepted: false,
        };
        let f = qemu_features(&facts);
        assert!(!f.dirty_limit && f.multifd && !f.multifd_with_postcopy);
        let f = qemu_features(&FeatureFacts {
            dirty_limit_accepted: true,
            ..facts
        });
        assert!(f.dirty_limit);
    }

    #[test]
    fn versions_parse_from_agent_strings() {
        assert_eq!(parse_version("10.0.2"), (10, 0));
        assert_eq!(parse_version("9.2.0 (Debian 1:9.2+ds-1)"), (9, 2));
        assert_eq!(parse_version("garbage"), (0, 0));
    }
}
