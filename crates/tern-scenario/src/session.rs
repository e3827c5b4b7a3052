//! Sessions: one guest, many migrations — the bench's hops, in-process (a killed agent or
//! QEMU would end the session's guest, so only link cuts are injected here).

use super::*;

/// A lab whose single guest is migrated back and forth between `h1` and `h2`, one hop per
/// call of [`ScenarioSession::migrate_once`].
///
/// Booting a TCG guest costs 6–11 s, more than many migrations take; a benchmark that compares
/// nine policies with several repeats cannot afford one boot per run. A session boots once and
/// judges each hop from that hop's own serial logs (every incoming QEMU writes a new log; the
/// old source's log ends at the switchover), so hops are as independent as separate scenarios
/// except for the guest's age.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SessionSpec {
    /// Lab name (unique per concurrently running session).
    pub lab_name: String,
    /// Link rate between the hosts; `None` = unshaped.
    pub link_rate: Option<LinkRate>,
    /// Guest RAM in MiB.
    pub memory_mib: u64,
    /// What the guest's workload does.
    pub workload: WorkloadParams,
    /// The VM's own downtime cap.
    pub vm_max_downtime_ms: Option<u64>,
    /// The VM's SLA class.
    pub sla_class: String,
    /// Memory each lab host offers to guests (MiB).
    pub host_memory_mib: u64,
    /// How long to let the guest run after each hop before judging it (and before the next).
    pub settle: Duration,
    /// Encrypt every hop's migration stream with lab certificates.
    #[serde(default)]
    pub migration_tls: bool,
}

impl Default for SessionSpec {
    fn default() -> Self {
        let s = ScenarioSpec::default();
        Self {
            lab_name: "session".into(),
            link_rate: s.link_rate,
            memory_mib: s.memory_mib,
            workload: s.workload,
            vm_max_downtime_ms: None,
            sla_class: s.sla_class,
            host_memory_mib: s.host_memory_mib,
            settle: Duration::from_secs(2),
            migration_tls: false,
        }
    }
}

/// What one hop of a session asks for.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HopSpec {
    /// Why the VM moves.
    pub context: MigrationContext,
    /// Policy name.
    pub policy: String,
    /// The VM's post-copy permission for this hop. `Forbidden` keeps the `postcopy-ram`
    /// capability off whatever the policy wants, which is how the benchmark measures the cost
    /// of merely *enabling* post-copy (the capability on, never switched) against a run without it.
    pub post_copy: PostCopyPermission,
    /// Deadline for must-finish contexts (ms from the start).
    pub deadline_ms: Option<u64>,
    /// Seconds of dirty-rate probing before the migration.
    pub probe_seconds: u64,
    /// Hard cap: when the migration has not ended after this long, the session asks the
    /// engine to abort it (refused after the switch to post-copy, which always finishes) and
    /// marks the hop as timed out. Policies that never give up (QEMU's defaults, Proxmox)
    /// would otherwise run forever on a guest that out-dirties the link.
    pub time_cap: Option<Duration>,
    /// Faults injected during this hop. Only link cuts: a killed QEMU would end the session's
    /// guest, and an agent kill needs agent processes ([`ScenarioSession::migrate_once`]
    /// refuses both).
    #[serde(default)]
    pub faults: Vec<faults::FaultPlan>,
}

impl Default for HopSpec {
    fn default() -> Self {
        Self {
            context: MigrationContext::Manual,
            policy: tern_policy::DEFAULT_POLICY.to_string(),
            post_copy: PostCopyPermission::Allowed,
            deadline_ms: None,
            probe_seconds: 0,
            time_cap: Some(Duration::from_secs(90)),
            faults: Vec::new(),
        }
    }
}

/// Everything one hop measured: the judged summary plus the raw material a benchmark needs
/// (progress series, both serial logs, host-clock anchors).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HopRecord {
    /// The judged summary (same fields as `tern demo`'s).
    pub summary: MigrationSummary,
    /// The hop's time cap expired before the migration ended.
    pub timed_out: bool,
    /// Every distinct live-progress value the engine published, in order.
    pub progress: Vec<MigrationProgress>,
    /// Host CLOCK_MONOTONIC (ns) when the hop was requested (before the destination QEMU
    /// started).
    pub requested_mono_ns: u64,
    /// Host CLOCK_MONOTONIC (ns) when the migration reached its terminal state; the engine's
    /// `at_ms` values map to host time as `ended_mono_ns - (total_time_ms - at_ms) * 1e6`.
    pub ended_mono_ns: u64,
    /// Source host name.
    pub source_host: String,
    /// Destination host name.
    pub destination_host: String,
    /// The source's host serial log, as read after the settle time.
    pub source_log: HostSerialLog,
    /// The destination's host serial log, when the guest ran there.
    pub destination_log: Option<HostSerialLog>,
}

impl HopRecord {
    /// Host monotonic time (ns) of an engine timestamp (`at_ms` since `migrate`).
    pub fn mono_ns_at(&self, at_ms: u64) -> u64 {
        let total_ms = (self.summary.total_time_s * 1000.0).round() as u64;
        self.ended_mono_ns
            .saturating_sub(total_ms.saturating_sub(at_ms) * 1_000_000)
    }
}

/// A running session: a lab, two host runtimes and one guest.
pub struct ScenarioSession {
    env: LabEnvironment,
    spec: SessionSpec,
    hosts: [HostRuntime; 2],
    /// Index into `hosts` of where the guest runs now.
    location: usize,
    // Declared after `hosts` so the QEMUs are killed before the namespaces go.
    _runtime: tempfile::TempDir,
    lab: Option<tern_lab::LabGuard>,
}

/// The VM name used inside a session.
const SESSION_VM: &str = "guest";

impl ScenarioSession {
    /// Brings the lab up and boots the guest on `h1`, waiting for its first verify pass.
    /// On error everything started so far is torn down.
    pub async fn start(env: &LabEnvironment, spec: &SessionSpec) -> Result<Self, ScenarioError> {
        let lab = Lab::up_guarded(&LabSpec {
            name: spec.lab_name.clone(),
            hosts: 2,
            link_rate: spec.link_rate,
            link_delay: None,
        })?;
        let runtime = tempfile::Builder::new()
            .prefix("tern-session-")
            .tempdir()
            .map_err(|e| ScenarioError::Io(format!("temp dir: {e}")))?;
        let make = |name: &str| -> Result<HostRuntime, ScenarioError> {
            let h = lab.host(name)?;
            Ok(HostRuntime::new(
                HostIdentity {
                    name: name.to_string(),
                    netns: Some(h.netns().to_string()),
                    migration_address: h.address().into(),
                    memory_mib: spec.host_memory_mib,
                },
                HostMigrationConfig::default(),
                env.qemu.clone(),
                runtime.path().join(name),
            ))
        };
        let hosts = crate::with_lab_migration_tls(
            vec![make("h1")?, make("h2")?],
            &runtime.path().join("tls"),
            spec.migration_tls,
        )?;
        let [h1, h2]: [HostRuntime; 2] = hosts
            .try_into()
            .map_err(|_| ScenarioError::Io("a session has two hosts".into()))?;
        let hosts = [h1, h2];
        let session = Self {
            env: env.clone(),
            spec: spec.clone(),
            hosts,
            location: 0,
            _runtime: runtime,
            lab: Some(lab),
        };
        let vm = VmSpec {
            name: SESSION_VM.into(),
            memory_mib: spec.memory_mib,
            vcpus: 1,
            kernel: env.image.kernel.clone(),
            initrd: env.image.initrd.clone(),
            cmdline: env.image.cmdline(&spec.workload),
            accelerator: env.accelerator.accelerator,
            devices: Default::default(),
            migration: VmMigrationSettings {
                post_copy: PostCopyPermission::Allowed,
                max_downtime_ms: spec.vm_max_downtime_ms,
                sla_class: spec.sla_class.clone(),
            },
        };
        let booted = async {
            let info = session.hosts[0].create_vm(vm).await?;
            wait_guest_ready(&info.serial_log, 1, GUEST_READY_TIMEOUT).await
        }
        .await;
        match booted {
            Ok(()) => Ok(session),
            Err(e) => {
                session.finish().await;
                Err(e)
            }
        }
    }

    /// Name of the host the guest runs on now (`None` once it was lost).
    pub fn location(&self) -> Option<&str> {
        self.hosts
            .get(self.location)
            .map(|h| h.identity().name.as_str())
    }

    /// The session's settings.
    pub fn spec(&self) -> &SessionSpec {
        &self.spec
    }

    /// The guest's current host serial log path.
    pub async fn current_serial_log(&self) -> Result<PathBuf, ScenarioError> {
        let host = self
            .hosts
            .get(self.location)
            .ok_or_else(|| ScenarioError::Guest2("the session's guest was lost".into()))?;
        Ok(host.show(SESSION_VM).await?.serial_log)
    }

    /// Migrates the guest to the other host once, lets it settle, and judges the hop.
    ///
    /// After a completed hop the guest lives on the other host; after an abort or failure it
    /// stays where it was, so the next hop starts from there. A lost guest ends the session
    /// (later calls fail).
    pub async fn migrate_once(
        &mut self,
        hop: &HopSpec,
        progress: Option<mpsc::UnboundedSender<ScenarioProgress>>,
    ) -> Result<HopRecord, ScenarioError> {
        if self.location > 1 {
            return Err(ScenarioError::Guest2(
                "the session's guest was lost in an earlier hop".into(),
            ));
        }
        if let Some(f) = hop
            .faults
            .iter()
            .find(|f| !matches!(f.action, faults::FaultAction::LinkCut { .. }))
        {
            return Err(ScenarioError::Unsupported(format!(
                "fault {f} in a session: a session keeps one guest across hops, so only link \
                 cuts (link-cut-precopy, link-cut-postcopy, link-cut-recovery) can be injected"
            )));
        }
        let lab = self
            .lab
            .as_ref()
            .map(|l| Lab::clone(l))
            .ok_or_else(|| ScenarioError::Io("the session's lab is gone".into()))?;
        let (src_i, dst_i) = (self.location, 1 - self.location);
        let source = self.hosts[src_i].clone();
        let destination = self.hosts[dst_i].clone();
        let requested_mono_ns = tern_qemu::host_monotonic_ns();
        let order = MigrationOrder {
            vm: SESSION_VM.into(),
            context: hop.context,
            policy: hop
                .policy
                .parse()
                .map_err(|e: tern_policy::UnknownPolicy| {
                    tern_agent::AgentError::Invalid(e.to_string())
                })?,
            link_bytes_per_s: self.spec.link_rate.map(|r| r.bytes_per_sec()),
            deadline_ms: hop.deadline_ms,
            probe_seconds: hop.probe_seconds,
        };
        let (ctl_tx, ctl_rx) = mpsc::channel(8);
        let timed_out = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (prog_tx, prog_rx) =
            oneshot::channel::<tokio::sync::watch::Receiver<MigrationProgress>>();
        // The cap starts when the stream starts (the progress receiver arrives then).
        let (started_tx, started_rx) = oneshot::channel::<()>();
        let cap_timer = hop.time_cap.map(|cap| {
            let tx = ctl_tx.clone();
            let flag = timed_out.clone();
            tokio::spawn(async move {
                if started_rx.await.is_err() {
                    return;
                }
                tokio::time::sleep(cap).await;
                flag.store(true, std::sync::atomic::Ordering::SeqCst);
                let (reply_tx, reply_rx) = oneshot::channel();
                if tx
                    .send(OperatorRequest {
                        command: OperatorCommand::Abort,
                        reply: reply_tx,
                    })
                    .await
                    .is_ok()
                {
                    let _ = reply_rx.await;
                }
            })
        });
        drop(ctl_tx);
        let fault_plans = hop.faults.clone();
        let (fault_src, fault_dst) = (source.clone(), destination.clone());
        let collector = tokio::spawn(async move {
            let mut series = Vec::new();
            let Ok(mut rx) = prog_rx.await else {
                return (series, Vec::new());
            };
            let _ = started_tx.send(());
            let started = Instant::now();
            let injectors = faults::spawn_injectors(
                fault_plans,
                &lab,
                &faults::FaultHosts::InProcess {
                    source: fault_src,
                    destination: fault_dst,
                },
                SESSION_VM,
                &rx,
                started,
            );
            while rx.changed().await.is_ok() {
                let v = rx.borrow().clone();
                if series.last() != Some(&v) {
                    if let Some(p) = &progress {
                        let _ = p.send(ScenarioProgress::Migration(v.clone()));
                    }
                    series.push(v);
                }
            }
            (series, faults::collect(injectors).await)
        });
        let post_copy = hop.post_copy;
        let outcome = tern_agent::migration::migrate_with(
            &source,
            &destination,
            order,
            &SlaCatalog::builtin(),
            ctl_rx,
            Some(prog_tx),
            None,
            move |input| {
                if post_copy == PostCopyPermission::Forbidden {
                    input.vm.post_copy = tern_policy::PostCopyPermission::Forbidden;
                }
            },
        )
        .await
        .map_err(ScenarioError::from);
        let ended_mono_ns = tern_qemu::host_monotonic_ns();
        if let Some(t) = cap_timer {
            t.abort();
        }
        let (series, faults_injected) = collector.await.unwrap_or_default();
        let outcome = outcome?;
        let timed_out = timed_out.load(std::sync::atomic::Ordering::SeqCst);
        tokio::time::sleep(self.spec.settle).await;
        let report = &outcome.report;
        self.location = match outcome.guest_location.as_deref() {
            Some(h) if h == destination.identity().name => dst_i,
            Some(_) => src_i,
            None => usize::MAX,
        };
        let mut summary = summary_from(
            &self.env,
            &outcome,
            hop.context,
            self.spec.link_rate,
            &self.spec.workload,
            self.spec.memory_mib,
            Vec::new(),
        );
        summary.record_faults(faults_injected);
        let source_log = HostSerialLog::read(&outcome.source_serial_log)?;
        let destination_log =
            if report.state == MigrationState::Completed || report.state.is_after_switch() {
                match &outcome.destination_serial_log {
                    Some(p) => Some(HostSerialLog::read(p)?),
                    None => None,
                }
            } else {
                None
            };
        judge_logs(&mut summary, &source_log, destination_log.as_ref());
        Ok(HopRecord {
            summary,
            timed_out,
            progress: series,
            requested_mono_ns,
            ended_mono_ns,
            source_host: source.identity().name.clone(),
            destination_host: destination.identity().name.clone(),
            source_log,
            destination_log,
        })
    }

    /// Stops every QEMU and takes the lab down.
    pub async fn finish(mut self) {
        for h in &self.hosts {
            h.stop_all().await;
        }
        drop(self.lab.take());
        keep_logs_for_post_mortem(self._runtime.path(), &self.spec.lab_name);
    }
}
