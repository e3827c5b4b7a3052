//! A scripted in-memory QEMU pair for runner tests: one model of a migration between a
//! source and a destination QEMU, exposed as [`FakeSource`] (a [`SourceEndpoint`]) and
//! [`FakeDestination`] (a [`DestinationEndpoint`]).
//!
//! The model advances in tokio time (tests run with paused time, so a minute of migration
//! takes milliseconds): RAM is sent at the link rate, the guest dirties pages at its rate,
//! a pass ends when its pages are sent, and QEMU completes when what is left fits the
//! downtime. Faults are scheduled relative to the start or to the switch to post-copy.

#![allow(dead_code)]

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex, MutexGuard};

use async_trait::async_trait;
use tern_engine::{DestinationEndpoint, EndpointFacts, EngineError, SourceEndpoint};
use tern_qmp::{
    MigrationCapability, MigrationCapabilityStatus, MigrationInfo, MigrationParameters,
    MigrationStats, MigrationStatus, QmpError, QmpEvent, QmpEvents, RunState, StatusInfo,
};
use tokio::sync::broadcast;
use tokio::time::Instant;

/// When a fault happens.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum When {
    /// Milliseconds after `migrate`.
    AfterStart(u64),
    /// Milliseconds after the switch to post-copy.
    AfterSwitch(u64),
    /// Once the source reports `completed`.
    AtCompletion,
}

/// What happens.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Fault {
    /// The link goes down; `noticed`: sockets error out (QEMU pauses post-copy itself),
    /// otherwise packets vanish silently.
    CutLink { noticed: bool },
    /// The link is back.
    RestoreLink,
    /// The destination's agent stops answering (its QEMU keeps running).
    DestinationAgentDown,
    /// The destination's agent answers again.
    DestinationAgentUp,
    /// The destination QEMU exits.
    KillDestinationQemu,
    /// The source QEMU exits.
    KillSourceQemu,
}

pub struct Model {
    pub status: MigrationStatus,
    pub dest_status: MigrationStatus,
    pub source_running: bool,
    pub source_postmigrate: bool,
    pub dest_run: RunState,
    pub ram_total: u64,
    pub transferred: u64,
    pub pass: u64,
    pass_left: u64,
    dirty_acc: u64,
    pub link_bytes_per_s: u64,
    pub dirty_bytes_per_s: u64,
    /// Completion when what is left can be sent in this many ms.
    pub downtime_ms: u64,
    pub link_up: bool,
    link_noticed: bool,
    pub dest_agent_up: bool,
    pub dest_qemu_alive: bool,
    pub source_alive: bool,
    dest_listening_for_recovery: bool,
    started: Option<Instant>,
    switched_at: Option<Instant>,
    last: Option<Instant>,
    faults: Vec<(When, Fault)>,
    /// Every command, in order, prefixed `src:` or `dst:`.
    pub calls: Vec<String>,
    pub postcopy_capability: bool,
    /// Destination calls a `migrate-pause` takes to land (QEMU's listen thread pauses
    /// asynchronously); 0: at once.
    pub dest_pause_lag_calls: u32,
    /// A destination pause is under way: calls left before `postcopy-paused`.
    dest_pausing: Option<u32>,
    events: broadcast::Sender<QmpEvent>,
}

impl Model {
    fn new(ram_total: u64, link: u64, dirty: u64) -> Self {
        Self {
            status: MigrationStatus::None,
            dest_status: MigrationStatus::None,
            source_running: true,
            source_postmigrate: false,
            dest_run: RunState::InMigrate,
            ram_total,
            transferred: 0,
            pass: 0,
            pass_left: 0,
            dirty_acc: 0,
            link_bytes_per_s: link,
            dirty_bytes_per_s: dirty,
            downtime_ms: 300,
            link_up: true,
            link_noticed: true,
            dest_agent_up: true,
            dest_qemu_alive: true,
            source_alive: true,
            dest_listening_for_recovery: false,
            started: None,
            switched_at: None,
            last: None,
            faults: Vec::new(),
            calls: Vec::new(),
            postcopy_capability: false,
            dest_pause_lag_calls: 0,
            dest_pausing: None,
            events: broadcast::channel(16).0,
        }
    }

    fn remaining(&self) -> u64 {
        match self.status {
            MigrationStatus::Completed => 0,
            _ => self.pass_left + self.dirty_acc,
        }
    }

    fn apply_faults(&mut self, now: Instant) {
        let mut due = Vec::new();
        self.faults.retain(|(when, fault)| {
            let hit = match when {
                When::AfterStart(ms) => self
                    .started
                    .is_some_and(|t| now >= t + std::time::Duration::from_millis(*ms)),
                When::AfterSwitch(ms) => self
                    .switched_at
                    .is_some_and(|t| now >= t + std::time::Duration::from_millis(*ms)),
                When::AtCompletion => self.status == MigrationStatus::Completed,
            };
            if hit {
                due.push(*fault);
            }
            !hit
        });
        for f in due {
            match f {
                Fault::CutLink { noticed } => {
                    self.link_up = false;
                    self.link_noticed = noticed;
                }
                Fault::RestoreLink => self.link_up = true,
                Fault::DestinationAgentDown => self.dest_agent_up = false,
                Fault::DestinationAgentUp => self.dest_agent_up = true,
                Fault::KillDestinationQemu => self.dest_qemu_alive = false,
                Fault::KillSourceQemu => self.source_alive = false,
            }
        }
    }

    /// Moves the model to `now`.
    fn advance(&mut self) {
        let now = Instant::now();
        let last = self.last.replace(now).unwrap_or(now);
        self.apply_faults(now);
        let dt_ms = now.saturating_duration_since(last).as_millis() as u64;
        let link = if self.link_up {
            self.link_bytes_per_s
        } else {
            0
        };
        let sent = link * dt_ms / 1000;
        if !self.dest_qemu_alive {
            // The stream's peer is gone: the socket closes.
            match self.status {
                MigrationStatus::Active => self.status = MigrationStatus::Failed,
                MigrationStatus::PostcopyActive
                | MigrationStatus::PostcopyRecover
                | MigrationStatus::PostcopyRecoverSetup => {
                    self.status = MigrationStatus::PostcopyPaused
                }
                _ => {}
            }
            return;
        }
        match self.status {
            MigrationStatus::Active => {
                if !self.link_up && self.link_noticed {
                    self.status = MigrationStatus::Failed;
                    return;
                }
                if self.source_running {
                    self.dirty_acc = (self.dirty_acc + self.dirty_bytes_per_s * dt_ms / 1000)
                        .min(self.ram_total);
                }
                let s = sent.min(self.pass_left);
                self.pass_left -= s;
                self.transferred += s;
                if self.pass_left == 0 && sent > 0 {
                    let pending = self.dirty_acc;
                    if pending <= self.link_bytes_per_s * self.downtime_ms / 1000 {
                        self.transferred += pending;
                        self.dirty_acc = 0;
                        self.finish();
                    } else {
                        self.pass += 1;
                        self.pass_left = pending;
                        self.dirty_acc = 0;
                    }
                }
            }
            MigrationStatus::PostcopyActive => {
                if !self.link_up {
                    if self.link_noticed {
                        self.status = MigrationStatus::PostcopyPaused;
                        self.dest_status = MigrationStatus::PostcopyPaused;
                    }
                    return;
                }
                let left = self.remaining();
                let s = sent.min(left);
                self.transferred += s;
                let from_pass = s.min(self.pass_left);
                self.pass_left -= from_pass;
                self.dirty_acc -= s - from_pass;
                if self.remaining() == 0 && sent > 0 {
                    self.finish();
                }
            }
            MigrationStatus::PostcopyRecoverSetup | MigrationStatus::PostcopyRecover => {
                if self.link_up && self.dest_listening_for_recovery {
                    self.status = MigrationStatus::PostcopyActive;
                    self.dest_status = MigrationStatus::PostcopyActive;
                    self.dest_listening_for_recovery = false;
                } else if !self.link_up && self.link_noticed {
                    self.status = MigrationStatus::PostcopyPaused;
                }
            }
            _ => {}
        }
    }

    fn finish(&mut self) {
        self.status = MigrationStatus::Completed;
        self.source_postmigrate = true;
        self.dest_status = MigrationStatus::Completed;
        // QEMU's global-state section: the destination takes the source's run state.
        self.dest_run = if self.source_running || self.switched_at.is_some() {
            RunState::Running
        } else {
            RunState::Paused
        };
        let now = Instant::now();
        self.apply_faults(now);
    }
}

/// A handle on the shared model, for tests to script and inspect.
#[derive(Clone)]
pub struct FakePair {
    model: Arc<Mutex<Model>>,
}

impl FakePair {
    /// A guest of `ram` bytes dirtying `dirty` bytes/s over a link of `link` bytes/s.
    pub fn new(ram: u64, link: u64, dirty: u64) -> Self {
        Self {
            model: Arc::new(Mutex::new(Model::new(ram, link, dirty))),
        }
    }

    pub fn model(&self) -> MutexGuard<'_, Model> {
        self.model.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Schedules a fault.
    pub fn at(&self, when: When, fault: Fault) -> &Self {
        self.model().faults.push((when, fault));
        self
    }

    pub fn source(&self) -> FakeSource {
        FakeSource(self.clone())
    }

    pub fn destination(&self) -> Box<FakeDestination> {
        Box::new(FakeDestination(self.clone()))
    }

    pub fn calls(&self) -> Vec<String> {
        self.model().calls.clone()
    }

    /// Index of the switch among the calls, if it happened.
    pub fn switch_call(&self) -> Option<usize> {
        self.calls()
            .iter()
            .position(|c| c == "src:migrate-start-postcopy")
    }

    /// Puts the model into a state as if a previous runner had got it there (adoption).
    pub fn put_in(&self, status: MigrationStatus) {
        let mut m = self.model();
        let now = Instant::now();
        m.started = Some(now);
        m.last = Some(now);
        m.pass = 3;
        m.pass_left = m.ram_total / 4;
        m.transferred = m.ram_total;
        m.postcopy_capability = true;
        if status.as_str().starts_with("postcopy") {
            m.switched_at = Some(now);
            m.dest_run = RunState::Running;
            m.dest_status = match status {
                MigrationStatus::PostcopyPaused => MigrationStatus::PostcopyPaused,
                _ => MigrationStatus::PostcopyActive,
            };
        }
        if status == MigrationStatus::Completed {
            m.finish();
        }
        m.status = status;
    }
}

fn facts() -> EndpointFacts {
    use MigrationCapability::*;
    EndpointFacts {
        capabilities: [
            PostcopyRam,
            PostcopyPreempt,
            Multifd,
            AutoConverge,
            Events,
            Xbzrle,
        ]
        .into_iter()
        .collect(),
        commands: ["migrate-pause", "migrate-recover", "calc-dirty-rate"]
            .into_iter()
            .map(str::to_string)
            .collect::<BTreeSet<_>>(),
        version: (10, 0),
    }
}

fn closed() -> EngineError {
    EngineError::Qmp(QmpError::Closed {
        reason: "end of stream".into(),
    })
}

/// The source QEMU of the pair.
pub struct FakeSource(FakePair);

impl FakeSource {
    fn call(&self, name: &str) -> Result<MutexGuard<'_, Model>, EngineError> {
        let mut m = self.0.model();
        m.advance();
        m.calls.push(format!("src:{name}"));
        if !m.source_alive {
            return Err(closed());
        }
        Ok(m)
    }
}

fn refused(what: &str, status: &MigrationStatus) -> EngineError {
    EngineError::Qmp(QmpError::Command {
        command: what.into(),
        class: "GenericError".into(),
        desc: format!("not allowed in state {}", status.as_str()),
    })
}

#[async_trait]
impl SourceEndpoint for FakeSource {
    async fn facts(&self) -> Result<EndpointFacts, EngineError> {
        drop(self.call("facts")?);
        Ok(facts())
    }
    async fn capability_accepted(&self, _cap: MigrationCapability) -> bool {
        false
    }
    async fn set_capabilities(
        &self,
        caps: &[MigrationCapabilityStatus],
    ) -> Result<(), EngineError> {
        let mut m = self.call("migrate-set-capabilities")?;
        if let Some(c) = caps
            .iter()
            .find(|c| c.capability == MigrationCapability::PostcopyRam)
        {
            m.postcopy_capability = c.state;
        }
        Ok(())
    }
    async fn set_parameters(&self, _params: &MigrationParameters) -> Result<(), EngineError> {
        drop(self.call("migrate-set-parameters")?);
        Ok(())
    }
    async fn set_dirty_limit(&self, _mb_per_s: u64) -> Result<(), EngineError> {
        drop(self.call("set-dirty-limit")?);
        Ok(())
    }
    async fn run_state(&self) -> Result<StatusInfo, EngineError> {
        let m = self.call("query-status")?;
        let status = if m.source_postmigrate || m.switched_at.is_some() {
            RunState::Postmigrate
        } else if m.source_running {
            RunState::Running
        } else {
            RunState::Paused
        };
        Ok(StatusInfo {
            running: status == RunState::Running,
            status,
        })
    }
    async fn vfio_devices(&self) -> Result<Vec<String>, EngineError> {
        drop(self.call("qom-list")?);
        Ok(Vec::new())
    }
    async fn migrate(&self, _uri: &str) -> Result<(), EngineError> {
        let mut m = self.call("migrate")?;
        let now = Instant::now();
        m.started = Some(now);
        m.status = MigrationStatus::Active;
        m.dest_status = MigrationStatus::Active;
        m.pass = 1;
        m.pass_left = m.ram_total;
        Ok(())
    }
    async fn migrate_resume(&self, _uri: &str) -> Result<(), EngineError> {
        let mut m = self.call("migrate-resume")?;
        if m.status != MigrationStatus::PostcopyPaused {
            return Err(refused("migrate", &m.status));
        }
        m.status = MigrationStatus::PostcopyRecoverSetup;
        Ok(())
    }
    async fn migrate_cancel(&self) -> Result<(), EngineError> {
        let mut m = self.call("migrate_cancel")?;
        if m.status == MigrationStatus::Active {
            m.status = MigrationStatus::Cancelled;
            m.dest_status = MigrationStatus::Failed;
        }
        Ok(())
    }
    async fn migrate_pause(&self) -> Result<(), EngineError> {
        let mut m = self.call("migrate-pause")?;
        match m.status {
            MigrationStatus::PostcopyActive
            | MigrationStatus::PostcopyRecover
            | MigrationStatus::PostcopyRecoverSetup => {
                m.status = MigrationStatus::PostcopyPaused;
                Ok(())
            }
            ref s => Err(refused("migrate-pause", s)),
        }
    }
    async fn migrate_start_postcopy(&self) -> Result<(), EngineError> {
        let mut m = self.call("migrate-start-postcopy")?;
        if m.status != MigrationStatus::Active || !m.postcopy_capability {
            return Err(refused("migrate-start-postcopy", &m.status));
        }
        m.status = MigrationStatus::PostcopyActive;
        m.dest_status = MigrationStatus::PostcopyActive;
        m.dest_run = RunState::Running;
        m.switched_at = Some(Instant::now());
        Ok(())
    }
    async fn stop(&self) -> Result<(), EngineError> {
        self.call("stop")?.source_running = false;
        Ok(())
    }
    async fn cont(&self) -> Result<(), EngineError> {
        self.call("cont")?.source_running = true;
        Ok(())
    }
    async fn migration_info(&self) -> Result<MigrationInfo, EngineError> {
        let m = self.call("query-migrate")?;
        Ok(MigrationInfo {
            status: Some(m.status.clone()),
            ram: Some(MigrationStats {
                transferred: Some(m.transferred),
                remaining: Some(m.remaining()),
                total: Some(m.ram_total),
                dirty_sync_count: Some(m.pass),
                page_size: Some(4096),
                mbps: Some(m.link_bytes_per_s as f64 * 8.0 / 1e6),
                dirty_pages_rate: Some(if m.source_running {
                    m.dirty_bytes_per_s / 4096
                } else {
                    0
                }),
                ..Default::default()
            }),
            ..Default::default()
        })
    }
    async fn start_dirty_rate_probe(&self, _seconds: u64) -> Result<(), EngineError> {
        drop(self.call("calc-dirty-rate")?);
        Ok(())
    }
    async fn measured_dirty_rate(&self) -> Result<Option<u64>, EngineError> {
        let m = self.call("query-dirty-rate")?;
        Ok(Some(m.dirty_bytes_per_s >> 20))
    }
    fn subscribe_events(&self) -> QmpEvents {
        self.0.model().events.subscribe()
    }
}

/// The destination QEMU of the pair, behind its (fake) agent.
pub struct FakeDestination(FakePair);

impl FakeDestination {
    fn call(&self, name: &str) -> Result<MutexGuard<'_, Model>, EngineError> {
        let mut m = self.0.model();
        m.advance();
        m.calls.push(format!("dst:{name}"));
        m.dest_pausing = match m.dest_pausing {
            Some(0) => {
                if m.dest_status == MigrationStatus::PostcopyActive {
                    m.dest_status = MigrationStatus::PostcopyPaused;
                }
                None
            }
            left => left.map(|n| n - 1),
        };
        if !m.dest_agent_up {
            return Err(EngineError::PeerUnreachable(
                "agent http://dest is unreachable: connection refused".into(),
            ));
        }
        if !m.dest_qemu_alive {
            return Err(EngineError::Remote(
                "the incoming QEMU of vm exited (QMP connection closed)".into(),
            ));
        }
        Ok(m)
    }
}

#[async_trait]
impl DestinationEndpoint for FakeDestination {
    async fn facts(&self) -> Result<EndpointFacts, EngineError> {
        drop(self.call("facts")?);
        Ok(facts())
    }
    async fn set_capabilities(
        &self,
        _caps: &[MigrationCapabilityStatus],
    ) -> Result<(), EngineError> {
        drop(self.call("migrate-set-capabilities")?);
        Ok(())
    }
    async fn set_parameters(&self, _params: &MigrationParameters) -> Result<(), EngineError> {
        drop(self.call("migrate-set-parameters")?);
        Ok(())
    }
    async fn migrate_incoming(&self, _uri: &str) -> Result<(), EngineError> {
        drop(self.call("migrate-incoming")?);
        Ok(())
    }
    async fn run_state(&self) -> Result<StatusInfo, EngineError> {
        let m = self.call("query-status")?;
        Ok(StatusInfo {
            running: m.dest_run == RunState::Running,
            status: m.dest_run.clone(),
        })
    }
    async fn migration_info(&self) -> Result<MigrationInfo, EngineError> {
        let m = self.call("query-migrate")?;
        Ok(MigrationInfo {
            status: Some(m.dest_status.clone()),
            ..Default::default()
        })
    }
    async fn cont(&self) -> Result<(), EngineError> {
        self.call("cont")?.dest_run = RunState::Running;
        Ok(())
    }
    async fn migrate_recover(&self, _uri: &str) -> Result<(), EngineError> {
        let mut m = self.call("migrate-recover")?;
        if m.dest_status != MigrationStatus::PostcopyPaused {
            return Err(refused("migrate-recover", &m.dest_status));
        }
        m.dest_listening_for_recovery = true;
        m.dest_status = MigrationStatus::PostcopyRecover;
        Ok(())
    }
    /// As QEMU 10.0 does: the destination's `qmp_migrate_pause` shuts down
    /// `mis->from_src_file` without a lock or a NULL check, while the listen thread's
    /// `postcopy_pause_incoming` (started by the first pause) closes it and sets it NULL —
    /// a second pause in that window crashes the destination QEMU (SIGSEGV, seen in the lab).
    async fn migrate_pause(&self) -> Result<(), EngineError> {
        let mut m = self.call("migrate-pause")?;
        if m.dest_pausing.is_some() {
            m.dest_qemu_alive = false;
            return Err(EngineError::Remote(
                "the incoming QEMU of vm exited: signal 11 (SIGSEGV)".into(),
            ));
        }
        if m.dest_status == MigrationStatus::PostcopyActive {
            match m.dest_pause_lag_calls {
                0 => m.dest_status = MigrationStatus::PostcopyPaused,
                n => m.dest_pausing = Some(n),
            }
        }
        Ok(())
    }
}
