//! Commands from operators: force-complete, abort (refused after the switch), bandwidth.

use tern_policy::{Action, ActionKind, Decision};
use tern_qmp::MigrationParameters;

use super::{MigrationRunner, OperatorCommand, OperatorRequest};
use crate::state::{MigrationEventKind, MigrationState};

impl MigrationRunner {
    pub(super) async fn operator(&mut self, req: OperatorRequest) {
        let OperatorRequest { command, reply } = req;
        let answer = match command {
            OperatorCommand::Abort => {
                if self.state.is_after_switch() {
                    Err(format!(
                        "cannot abort: the migration is in {} and the destination holds the only \
                         current copy of the guest; it can only complete (or be recovered)",
                        self.state
                    ))
                } else if self.state.is_terminal() {
                    Err(format!("the migration already ended ({})", self.state))
                } else {
                    self.take_action(ActionKind::Abort, None, "operator requested abort");
                    match self.source.migrate_cancel().await {
                        Ok(()) => {
                            self.abort_requested = true;
                            Ok("abort requested; the guest stays on the source".to_string())
                        }
                        Err(e) => Err(format!("QEMU refused migrate_cancel: {e}")),
                    }
                }
            }
            OperatorCommand::ForceComplete => match self.state {
                MigrationState::Precopy => {
                    let post = self
                        .plan
                        .as_ref()
                        .is_some_and(|p| p.may_switch_to_postcopy());
                    if post {
                        self.switch_to_postcopy(
                            "operator requested force-complete; post-copy is permitted",
                        )
                        .await
                        .map(|()| "switching to post-copy".to_string())
                    } else {
                        let why = self
                            .plan
                            .as_ref()
                            .map(|p| p.post_copy.reason.clone())
                            .unwrap_or_default();
                        let reason = format!(
                            "operator requested force-complete; post-copy not permitted ({why}): \
                             pausing the guest until the copy finishes"
                        );
                        self.execute(Decision::new(Action::PauseGuest, reason), true)
                            .await;
                        Ok("guest paused; the copy will finish and the guest resumes on the destination".to_string())
                    }
                }
                s => Err(format!(
                    "force-complete applies during pre-copy; the migration is {s}"
                )),
            },
            OperatorCommand::SetBandwidth { bytes_per_s } => {
                if self.state.is_terminal() {
                    Err(format!("the migration already ended ({})", self.state))
                } else {
                    self.take_action(
                        ActionKind::SetBandwidth,
                        Some(format!("{bytes_per_s} B/s")),
                        "operator changed the bandwidth",
                    );
                    let params = MigrationParameters {
                        max_bandwidth: Some(bytes_per_s),
                        max_postcopy_bandwidth: if self.state.is_after_switch() {
                            Some(bytes_per_s)
                        } else {
                            None
                        },
                        ..Default::default()
                    };
                    match self.source.set_parameters(&params).await {
                        Ok(()) => Ok(format!("bandwidth set to {bytes_per_s} B/s")),
                        Err(e) => Err(format!("QEMU refused the bandwidth: {e}")),
                    }
                }
            }
        };
        self.record(MigrationEventKind::Operator {
            command: serde_json::to_string(&command).unwrap_or_default(),
            result: match &answer {
                Ok(s) => format!("accepted: {s}"),
                Err(s) => format!("refused: {s}"),
            },
        });
        let _ = reply.send(answer);
    }
}
