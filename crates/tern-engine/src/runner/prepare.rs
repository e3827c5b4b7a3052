//! Preparing a migration: features from both QEMUs, the safety gates, the plan, capabilities
//! and parameters on both ends, `migrate-incoming` and `migrate`.

use tern_qmp::{MigrationCapability, MigrationCapabilityStatus, MigrationParameters};
use tokio::time::Instant;

use super::{MigrationRunner, probe_dirty_rate};
use crate::EngineError;
use crate::features::{QemuPlanInput, plan_input_from_qemus};
use crate::state::{MigrationEventKind, MigrationState};

impl MigrationRunner {
    pub(super) async fn prepare(&mut self) -> Result<(), EngineError> {
        let QemuPlanInput {
            mut input,
            facts,
            refusals,
        } = plan_input_from_qemus(
            self.source.as_ref(),
            self.destination.facts().await?,
            self.setup.plan_input.clone(),
        )
        .await?;
        let features = input.features;
        let src_supported = facts.source.capabilities;
        let dst_supported = facts.destination.capabilities;
        for text in &refusals {
            self.note(text.clone());
        }
        if self.setup.probe_seconds > 0 && features.calc_dirty_rate {
            match probe_dirty_rate(self.source.as_ref(), self.setup.probe_seconds).await {
                Ok(p) => input.probe = Some(p),
                Err(e) => self.record(MigrationEventKind::Note {
                    text: format!("dirty-rate probe failed, planning without it: {e}"),
                }),
            }
        }
        let mut plan = self.policy.plan(&input);
        plan.reasons.extend(refusals);
        self.record(MigrationEventKind::Note {
            text: format!(
                "plan by {}: post-copy {} ({}); {}",
                plan.policy,
                if plan.may_switch_to_postcopy() {
                    "permitted"
                } else {
                    "not permitted"
                },
                plan.post_copy.reason,
                plan.reasons.join("; ")
            ),
        });
        // Capabilities: the post-copy family and multifd on both ends, the rest source-only.
        let caps = &plan.capabilities;
        let both_sides = [
            (MigrationCapability::PostcopyRam, caps.postcopy_ram),
            (MigrationCapability::PostcopyPreempt, caps.postcopy_preempt),
            (MigrationCapability::Multifd, caps.multifd),
        ];
        let source_only = [
            (MigrationCapability::Events, true),
            (MigrationCapability::AutoConverge, caps.auto_converge),
            (MigrationCapability::DirtyLimit, caps.dirty_limit),
            (MigrationCapability::Xbzrle, caps.xbzrle),
        ];
        // Every capability tern manages is set explicitly, off as well as on: a QEMU that
        // arrived by an earlier migration still carries that migration's capabilities, and a
        // mismatch between the two ends fails the stream ("Sibling indicated error").
        let src_caps: Vec<MigrationCapabilityStatus> = both_sides
            .iter()
            .chain(source_only.iter())
            .filter(|(c, on)| *on || src_supported.contains(c))
            .map(|(c, on)| MigrationCapabilityStatus::new(c.clone(), *on))
            .collect();
        let dst_caps: Vec<MigrationCapabilityStatus> = both_sides
            .iter()
            .chain([(MigrationCapability::Events, true)].iter())
            .filter(|(c, on)| *on || dst_supported.contains(c))
            .map(|(c, on)| MigrationCapabilityStatus::new(c.clone(), *on))
            .collect();
        self.source.set_capabilities(&src_caps).await?;
        self.destination.set_capabilities(&dst_caps).await?;
        let used: Vec<String> = src_caps
            .iter()
            .filter(|c| c.state)
            .map(|c| c.capability.as_str().to_string())
            .collect();
        self.record(MigrationEventKind::Note {
            text: format!("capabilities enabled: {}", used.join(", ")),
        });

        let p = &plan.parameters;
        let mut src_params = MigrationParameters {
            downtime_limit: Some(p.downtime_limit_ms),
            max_bandwidth: Some(p.max_bandwidth_bytes_per_s),
            ..Default::default()
        };
        if caps.auto_converge {
            src_params.cpu_throttle_initial = Some(p.cpu_throttle_initial_pct as u64);
            src_params.cpu_throttle_increment = Some(p.cpu_throttle_increment_pct as u64);
            src_params.max_cpu_throttle = Some(p.max_cpu_throttle_pct as u64);
        }
        if caps.xbzrle {
            if let Some(c) = p.xbzrle_cache_bytes {
                src_params.xbzrle_cache_size = Some(c);
            }
        }
        if p.max_postcopy_bandwidth_bytes_per_s > 0 {
            src_params.max_postcopy_bandwidth = Some(p.max_postcopy_bandwidth_bytes_per_s);
        }
        if caps.multifd {
            src_params.multifd_channels = Some(p.multifd_channels as u64);
            let dst_params = MigrationParameters {
                multifd_channels: Some(p.multifd_channels as u64),
                ..Default::default()
            };
            self.destination.set_parameters(&dst_params).await?;
        }
        // TLS is set explicitly, on as well as off: a source QEMU that arrived here by an
        // encrypted migration still carries its destination-side TLS parameters.
        match &self.setup.tls {
            Some(tls) => {
                src_params.tls_creds = Some(tls.creds_id.clone());
                src_params.tls_hostname = Some(tls.destination_host.clone());
            }
            None => {
                src_params.tls_creds = Some(String::new());
                src_params.tls_hostname = Some(String::new());
            }
        }
        self.source.set_parameters(&src_params).await?;
        self.note(match &self.setup.tls {
            Some(tls) => format!(
                "stream encrypted (TLS, destination certificate must name {})",
                tls.destination_host
            ),
            None => "stream not encrypted (migration TLS is off)".to_string(),
        });
        self.plan = Some(plan);

        self.destination.migrate_incoming(&self.setup.uri).await?;
        self.started = Instant::now();
        self.source.migrate(&self.setup.uri).await?;
        self.transition(
            MigrationState::Precopy,
            format!("migration stream started to {}", self.setup.uri),
        );
        Ok(())
    }
}
