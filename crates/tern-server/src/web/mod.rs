//! The live web view (issue 15), served by `tern server` itself at `/` and `/ui/...`.
//!
//! Server-rendered HTML ([`render`], [`svg`]) from the same controller calls as the API, one
//! small hand-written script and a stylesheet embedded in the binary (`include_str!`): no
//! build step, no CDN, no node. The script listens to `/v1/events` (EventSource) and, on each
//! event, re-fetches the HTML fragment of the views it touches (`/ui/fragment/{name}`): no
//! polling. Buttons call the API's own routes (`POST /v1/migrations/{id}/abort`,
//! `/v1/evacuations/{id}/pause|resume|cancel`) and show its answer, refusals (403) included.
//!
//! Authentication and roles are the API's (the same guard, [`crate::api::required_role`]):
//! with mutual TLS the browser presents its client certificate; in the loopback lab mode,
//! `/ui/login?token=TOKEN` puts the token in an `HttpOnly`, `SameSite=Strict` cookie that the
//! guard accepts like a bearer header, so a viewer token can look and an operator token act.

pub mod format;
pub mod render;
pub mod svg;

use axum::Router;
use axum::extract::{Path, State};
use axum::http::{HeaderValue, StatusCode, Uri, header};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::get;
use tern_pki::Identity;

use crate::api::{ApiAuth, ApiError, AppState, TOKEN_COOKIE};
use crate::controller::{Controller, ControllerError, MAX_PAGE};
use crate::model::{MigrationRecord, now_ms};
use render::{FleetSnapshot, MigrationDetail};

const APP_JS: &str = include_str!("app.js");
const APP_CSS: &str = include_str!("app.css");

/// Finished migrations listed under the running ones.
const FINISHED_SHOWN: usize = 15;
/// Finished evacuations shown under the unfinished ones.
const FINISHED_EVACUATIONS_SHOWN: usize = 3;

/// The web view's routes (authenticated by the API's guard, like every route).
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/", get(page))
        .route("/ui", get(page))
        .route("/ui/", get(page))
        .route("/ui/app.js", get(app_js))
        .route("/ui/app.css", get(app_css))
        .route("/ui/fragment/{name}", get(fragment))
        .route("/ui/logout", get(logout))
}

/// Headers of every page: no caching, no framing, only our own script and style.
fn secure(mut resp: Response) -> Response {
    let h = resp.headers_mut();
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; \
             img-src 'self'; frame-ancestors 'none'; form-action 'self'; base-uri 'none'",
        ),
    );
    resp
}

fn html(status: StatusCode, body: String) -> Response {
    secure(
        (
            status,
            [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
            body,
        )
            .into_response(),
    )
}

async fn app_js() -> Response {
    secure(
        (
            [(header::CONTENT_TYPE, "text/javascript; charset=utf-8")],
            APP_JS,
        )
            .into_response(),
    )
}

async fn app_css() -> Response {
    secure(([(header::CONTENT_TYPE, "text/css; charset=utf-8")], APP_CSS).into_response())
}

/// The three views, rendered now.
async fn page(State(st): State<AppState>, who: Identity) -> Result<Response, ApiError> {
    let now = now_ms();
    let hosts = hosts_html(&st.ctl, now).await?;
    let migrations = migrations_html(&st.ctl, now).await?;
    let evacuations = evacuations_html(&st.ctl, now).await?;
    let lab = matches!(st.auth, ApiAuth::Token(_));
    Ok(html(
        StatusCode::OK,
        render::page(&who, [&hosts, &migrations, &evacuations], lab),
    ))
}

/// One view's HTML, for the script to swap in after an event.
async fn fragment(
    State(st): State<AppState>,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    let now = now_ms();
    let body = match name.as_str() {
        "hosts" => hosts_html(&st.ctl, now).await?,
        "migrations" => migrations_html(&st.ctl, now).await?,
        "evacuations" => evacuations_html(&st.ctl, now).await?,
        other => {
            return Err(ApiError {
                status: StatusCode::NOT_FOUND,
                body: crate::api::ErrorBody {
                    error: format!(
                        "no view {other:?}: the views are hosts, migrations and evacuations"
                    ),
                    details: None,
                },
            });
        }
    };
    Ok(html(StatusCode::OK, body))
}

async fn hosts_html(ctl: &Controller, now: u64) -> Result<String, ControllerError> {
    let hosts = ctl.hosts_page(Some(MAX_PAGE), None).await?.hosts;
    let vms = ctl.vms(None).await?;
    let migrations = ctl.migrations().await?;
    Ok(render::hosts(
        &FleetSnapshot {
            hosts: &hosts,
            vms: &vms,
            migrations: &migrations,
        },
        now,
    ))
}

async fn migrations_html(ctl: &Controller, now: u64) -> Result<String, ControllerError> {
    let all = ctl.migrations().await?;
    let hosts = ctl.hosts_page(Some(MAX_PAGE), None).await?.hosts;
    let vms = ctl.vms(None).await?;
    let evacuations = ctl.evacuations().await?;
    let (live, finished): (Vec<MigrationRecord>, Vec<MigrationRecord>) =
        all.into_iter().partition(|m| !m.state.is_terminal());
    let mut gathered = Vec::with_capacity(live.len());
    for m in &live {
        let events = ctl.migration(&m.id).await?.events;
        let planned_end_ms = m.evacuation_id.as_ref().and_then(|eid| {
            let e = evacuations.iter().find(|e| &e.id == eid)?;
            let row = e.plan.migrations.iter().find(|p| p.vm == m.vm)?;
            let t0 = if e.plan.made_ms == 0 {
                e.created_ms
            } else {
                e.plan.made_ms
            };
            Some(t0 + (row.end_s.max(0.0) * 1000.0) as u64)
        });
        gathered.push((
            events,
            ctl.progress.remaining(&m.id),
            ctl.progress.last(&m.id),
            planned_end_ms,
        ));
    }
    let details: Vec<MigrationDetail<'_>> = live
        .iter()
        .zip(&gathered)
        .map(
            |(m, (events, samples, last, planned_end_ms))| MigrationDetail {
                migration: m,
                events,
                samples,
                progress: last.as_ref(),
                vm: vms.iter().find(|v| v.name == m.vm),
                link_bytes_per_s: hosts
                    .iter()
                    .find(|h| h.name == m.source)
                    .and_then(|h| h.facts.link_bytes_per_s),
                planned_end_ms: *planned_end_ms,
            },
        )
        .collect();
    let finished: Vec<_> = finished.into_iter().take(FINISHED_SHOWN).collect();
    Ok(render::migrations(&details, &finished, now))
}

async fn evacuations_html(ctl: &Controller, now: u64) -> Result<String, ControllerError> {
    let all = ctl.evacuations().await?;
    let (live, done): (Vec<_>, Vec<_>) = all.into_iter().partition(|e| !e.state.is_terminal());
    let mut views = Vec::new();
    for e in live
        .iter()
        .chain(done.iter().take(FINISHED_EVACUATIONS_SHOWN))
    {
        views.push(ctl.evacuation(&e.id).await?);
    }
    Ok(render::evacuations(&views, now))
}

/// Whether `path` is the web login (its query holds a token: never logged nor audited).
pub fn is_login(path: &str) -> bool {
    path == "/ui/login"
}

/// `/ui/login?token=TOKEN` (lab mode): the token in an `HttpOnly`, `SameSite=Strict` cookie,
/// then the page. A wrong token is a 401 page; with mutual TLS there is nothing to log into.
pub async fn login(st: &AppState, uri: &Uri) -> Response {
    let ApiAuth::Token(tokens) = &st.auth else {
        return Redirect::to("/").into_response();
    };
    let given = uri
        .query()
        .unwrap_or_default()
        .split('&')
        .find_map(|kv| kv.strip_prefix("token=").map(|t| t.trim().to_string()));
    let Some(who) = given.as_deref().and_then(|t| tokens.identify(t)) else {
        tracing::warn!(target: "tern_server::http", "web login refused: wrong or missing token");
        return html(
            StatusCode::UNAUTHORIZED,
            login_page("That token is not one of this controller's tokens."),
        );
    };
    tracing::info!(target: "tern_server::http", identity = %who, "web login");
    let token = given.unwrap_or_default();
    let cookie = format!("{TOKEN_COOKIE}={token}; Path=/; HttpOnly; SameSite=Strict");
    let mut resp = Redirect::to("/").into_response();
    if let Ok(v) = HeaderValue::from_str(&cookie) {
        resp.headers_mut().insert(header::SET_COOKIE, v);
    }
    secure(resp)
}

async fn logout() -> Response {
    let mut resp = Redirect::to("/").into_response();
    resp.headers_mut().insert(
        header::SET_COOKIE,
        HeaderValue::from_static("tern_token=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0"),
    );
    secure(resp)
}

fn login_page(problem: &str) -> String {
    format!(
        r#"<!doctype html><html lang="en"><head><meta charset="utf-8"><title>tern — log in</title><link rel="stylesheet" href="/ui/app.css"></head><body class="login"><h1>tern</h1><p class="error">{}</p><p>In the loopback lab mode, open <code>/ui/login?token=TOKEN</code> with one of the controller's tokens: the <code>token_file</code> of <code>server.toml</code> (admin), or <code>.operator</code> / <code>.viewer</code> beside it. With <code>[tls]</code>, the browser presents a client certificate of <code>tern pki</code> instead.</p></body></html>"#,
        format::esc(problem)
    )
}

/// A refused request to a page (no or wrong credentials) is shown as a page saying how to
/// log in; API paths keep their JSON answer.
pub fn unauthenticated(path: &str, resp: Response) -> Response {
    if path == "/" || path == "/ui" || path.starts_with("/ui/") {
        html(
            StatusCode::UNAUTHORIZED,
            login_page("You are not logged in (or your token changed)."),
        )
    } else {
        resp
    }
}
