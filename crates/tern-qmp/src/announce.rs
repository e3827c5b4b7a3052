//! `announce-self`: make the guest's NICs announce themselves after a move.
//!
//! After a migration the tenant network's switches still send the guest's traffic to the
//! source host's port until they see a frame from its MAC on the new one. QEMU sends
//! gratuitous RARPs from every NIC at the end of an incoming migration (parameters
//! `announce-*` of `migrate-set-parameters`); `announce-self` (QAPI `qapi/net.json`, QEMU
//! ≥ 4.0) sends another round on demand, e.g. once the destination runs, or after a
//! post-copy recovery, so a client's traffic follows the guest without waiting for a
//! MAC-table timeout.

use serde::Serialize;

use crate::client::QmpClient;
use crate::error::Result;

/// Arguments of `announce-self` (QAPI `AnnounceParameters`): `rounds` announcements, the
/// first after `initial` ms, each next gap `step` ms longer, capped at `max` ms.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AnnounceParameters {
    /// Delay before the first announcement, ms.
    pub initial: u64,
    /// Longest delay between announcements, ms.
    pub max: u64,
    /// Number of announcements.
    pub rounds: u64,
    /// Increase of the delay per round, ms.
    pub step: u64,
}

impl Default for AnnounceParameters {
    /// QEMU's own defaults for the end of a migration (50 ms, 550 ms, 5 rounds, +100 ms).
    fn default() -> Self {
        Self {
            initial: 50,
            max: 550,
            rounds: 5,
            step: 100,
        }
    }
}

impl QmpClient {
    /// `announce-self`: gratuitous RARPs from every NIC of the guest.
    pub async fn announce_self(&self, params: &AnnounceParameters) -> Result<()> {
        self.execute_unit("announce-self", params).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arguments_have_qapi_names() {
        let v = serde_json::to_value(AnnounceParameters::default()).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"initial": 50, "max": 550, "rounds": 5, "step": 100})
        );
    }
}
