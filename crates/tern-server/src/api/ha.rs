//! `GET /v1/leader` and the standby's refusal of writes (issue 12).

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;

use super::{ApiError, AppState, ErrorBody};
use crate::leader::LeaderStatus;

/// Who leads: this controller's role, the leader and its lease epoch.
#[utoipa::path(get, path = "/v1/leader", responses((status = 200, body = LeaderStatus)))]
pub(super) async fn leader(State(st): State<AppState>) -> Json<LeaderStatus> {
    Json(st.ctl.leadership.status())
}

/// The 503 a standby answers to a write: it names the leader to send it to. Agents'
/// heartbeats are accepted by every controller (they only record facts).
pub(super) fn refuse_on_standby(
    st: &AppState,
    method: &axum::http::Method,
    path: &str,
) -> Option<ApiError> {
    let write = !(method == axum::http::Method::GET || method == axum::http::Method::HEAD);
    if !write || path.starts_with("/v1/agents/heartbeat") {
        return None;
    }
    st.ctl.leadership.standby_refusal().map(|error| ApiError {
        status: StatusCode::SERVICE_UNAVAILABLE,
        body: ErrorBody {
            error,
            details: Some(serde_json::to_value(st.ctl.leadership.status()).unwrap_or_default()),
        },
    })
}
