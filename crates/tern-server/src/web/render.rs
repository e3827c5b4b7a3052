//! The web view's HTML, server-rendered from the controller's own records (the same the API
//! returns). Pure: every function takes what it shows and the time, and returns markup; the
//! handlers in `mod.rs` gather the data. Element ids and `data-*` attributes are the page's
//! contract with `app.js` and the browser test (`#host-NAME [data-vm=VM]`, `#mig-ID`,
//! `#evac-ID`, `rect.real[data-vm]`).

use std::collections::HashMap;
use std::fmt::Write;

use super::format::{bytes, clock, duration, esc, rate};
use super::svg::{RemainingSample, evacuation_timeline, remaining_chart};
use crate::evacuation::EvacuationView;
use crate::model::{
    EvacuationState, HostRecord, HostState, MigrationEvent, MigrationRecord, PostCopySetting,
    VmRecord,
};

/// What the Hosts view shows.
pub struct FleetSnapshot<'a> {
    /// Hosts, by name.
    pub hosts: &'a [HostRecord],
    /// Every VM.
    pub vms: &'a [VmRecord],
    /// Every migration (unfinished ones count as in/out).
    pub migrations: &'a [MigrationRecord],
}

/// One migration as the Migrations view shows it.
pub struct MigrationDetail<'a> {
    /// The record.
    pub migration: &'a MigrationRecord,
    /// Its history: every decision with its reason.
    pub events: &'a [MigrationEvent],
    /// Remaining bytes over time, when the agent reports progress.
    pub samples: &'a [RemainingSample],
    /// The last progress figures (dirty rate, throughput, ETA).
    pub progress: Option<&'a crate::progress::ProgressFigures>,
    /// The VM (its last measured dirty rate), when known.
    pub vm: Option<&'a VmRecord>,
    /// The migration link of the source host (bytes/s), when known.
    pub link_bytes_per_s: Option<u64>,
    /// Predicted end from the evacuation plan (ms since the epoch), when planned.
    pub planned_end_ms: Option<u64>,
}

fn state_badge(class: &str, text: &str) -> String {
    format!(r#"<span class="badge {class}">{}</span>"#, esc(text))
}

/// The Hosts table.
pub fn hosts(f: &FleetSnapshot<'_>, now_ms: u64) -> String {
    if f.hosts.is_empty() {
        return r#"<p class="empty">No host has sent a heartbeat yet.</p>"#.into();
    }
    let mut out = String::from(
        r#"<table class="hosts"><thead><tr><th>Host</th><th>State</th><th>VMs</th><th>Free memory</th><th>Post-copy</th><th>Out</th><th>In</th><th>Heartbeat</th></tr></thead><tbody>"#,
    );
    for h in f.hosts {
        let name = esc(&h.name);
        let vms: String = f
            .vms
            .iter()
            .filter(|v| v.host == h.name)
            .map(|v| {
                format!(
                    r#"<li class="vm" data-vm="{n}">{n} <small>{m} MiB</small></li>"#,
                    n = esc(&v.name),
                    m = v.memory_mib
                )
            })
            .collect();
        let live = |m: &&MigrationRecord| !m.state.is_terminal();
        let list = |it: Vec<&MigrationRecord>, other: fn(&MigrationRecord) -> &str| {
            let items: Vec<String> = it
                .iter()
                .map(|m| format!("{} {} {}", esc(&m.vm), "⇄", esc(other(m))))
                .collect();
            format!(
                r#"<span class="count">{}</span> <small>{}</small>"#,
                items.len(),
                items.join(", ")
            )
        };
        let out_m: Vec<_> = f
            .migrations
            .iter()
            .filter(live)
            .filter(|m| m.source == h.name)
            .collect();
        let in_m: Vec<_> = f
            .migrations
            .iter()
            .filter(live)
            .filter(|m| m.destination == h.name)
            .collect();
        let post_copy = match (h.facts.permit_post_copy, h.post_copy) {
            (_, Some(PostCopySetting::Deny)) => "denied (operator)",
            (false, _) => "denied (agent)",
            (true, _) => "permitted",
        };
        let state_class = match h.state {
            HostState::Up => "ok",
            HostState::Draining => "warn",
            HostState::Unreachable => "bad",
        };
        let _ = write!(
            out,
            r#"<tr id="host-{name}" data-state="{st}"><th scope="row">{name}</th><td>{badge}</td><td><ul class="vms">{vms}</ul></td><td><meter min="0" max="{total}" value="{free}"></meter> {free} / {total} MiB</td><td>{post_copy}</td><td class="out">{o}</td><td class="in">{i}</td><td>{age} ago</td></tr>"#,
            st = h.state.as_str(),
            badge = state_badge(state_class, h.state.as_str()),
            total = h.facts.memory_mib,
            free = h.facts.free_memory_mib,
            o = list(out_m, |m| m.destination.as_str()),
            i = list(in_m, |m| m.source.as_str()),
            age = duration(now_ms.saturating_sub(h.last_heartbeat_ms) as f64 / 1000.0),
        );
    }
    out.push_str("</tbody></table>");
    out
}

fn migration_state_class(m: &MigrationRecord) -> &'static str {
    use crate::model::MigrationState as S;
    match m.state {
        S::Completed => "ok",
        S::Running | S::Starting | S::Planned => "busy",
        S::Unknown => "warn",
        S::Failed | S::Aborted | S::Lost => "bad",
    }
}

/// One unfinished migration: figures, chart, decisions and the operator's buttons.
pub fn migration_card(d: &MigrationDetail<'_>, now_ms: u64) -> String {
    let m = d.migration;
    let id = esc(&m.id);
    let mut figures = Vec::new();
    if m.switched_to_postcopy {
        figures.push("<b>post-copy</b> (guest runs on the destination)".to_string());
    }
    if let Some(p) = d.progress {
        figures.push(format!("QEMU <b>{}</b>", esc(&p.qemu_status)));
        figures.push(format!("remaining <b>{}</b>", bytes(p.remaining_bytes)));
        figures.push(format!("throughput {}", rate(p.throughput_bytes_per_s)));
    }
    let dirty = d
        .progress
        .map(|p| p.dirty_bytes_per_s)
        .or_else(|| d.vm.and_then(|v| v.dirty_bytes_per_s));
    match (dirty, d.link_bytes_per_s) {
        (Some(dr), Some(link)) if link > 0 => figures.push(format!(
            "dirty rate {} vs link {} ({:.0} %)",
            rate(dr),
            rate(link),
            dr as f64 * 100.0 / link as f64
        )),
        (Some(dr), _) => figures.push(format!("dirty rate {} (link unknown)", rate(dr))),
        _ => {}
    }
    let eta = d
        .progress
        .and_then(|p| p.eta_ms)
        .map(|e| format!("ETA {} (model)", duration(e as f64 / 1000.0)))
        .or_else(|| {
            d.planned_end_ms
                .map(|t| format!("planned end {} ({})", clock(t), eta_words(t, now_ms)))
        });
    figures.extend(eta);
    let chart = remaining_chart(d.samples, m.state).unwrap_or_else(|| {
        r#"<p class="empty chart-empty">No progress samples from the agent yet.</p>"#.into()
    });
    let decisions: String = d
        .events
        .iter()
        .rev()
        .take(12)
        .map(|e| {
            format!(
                r#"<li data-kind="{k}"><time>{t}</time> <b>{k}</b> {detail}</li>"#,
                t = clock(e.wall_ms),
                k = esc(&e.kind),
                detail = esc(&e.detail)
            )
        })
        .collect();
    let evac = m
        .evacuation_id
        .as_deref()
        .map(|e| format!(r##" · evacuation <a href="#evac-{0}">{0}</a>"##, esc(e)))
        .unwrap_or_default();
    format!(
        r#"<article class="migration" id="mig-{id}" data-vm="{vm}" data-state="{st}"><header><h3>{vm} <small>{src} → {dst}</small></h3>{badge} <small>{ctx} · attempt {att}{evac} · started {started}</small></header><p class="figures">{figures}</p><div class="detail">{chart}<ol class="decisions" reversed>{decisions}</ol></div><p class="reason">Destination: {reason}</p><p class="actions"><button type="button" data-action="abort" data-url="/v1/migrations/{id}/abort" data-confirm="Abort the migration of {vm}?">Abort</button> <button type="button" data-action="force-complete" data-url="/v1/migrations/{id}/force-complete" data-confirm="Force the migration of {vm} to complete now?">Force complete</button> <label>cap <input type="number" id="bw-{id}" min="0.008" step="any" placeholder="MB/s" aria-label="bandwidth cap of {vm} in MB/s"> MB/s</label> <button type="button" data-action="bandwidth" data-input="bw-{id}" data-url="/v1/migrations/{id}/bandwidth" data-confirm="Cap the bandwidth of {vm}?">Set bandwidth</button></p></article>"#,
        vm = esc(&m.vm),
        src = esc(&m.source),
        dst = esc(&m.destination),
        st = m.state.as_str(),
        badge = state_badge(migration_state_class(m), m.state.as_str()),
        ctx = m.context.as_str(),
        att = m.attempts,
        started = m.started_ms.map_or_else(|| "not yet".to_string(), clock),
        figures = if figures.is_empty() {
            "No figures yet.".to_string()
        } else {
            figures.join(" · ")
        },
        reason = esc(&m.reason),
    )
}

fn eta_words(t: u64, now_ms: u64) -> String {
    if t >= now_ms {
        format!("in {}", duration((t - now_ms) as f64 / 1000.0))
    } else {
        format!("{} late", duration((now_ms - t) as f64 / 1000.0))
    }
}

/// The Migrations view: unfinished ones as cards, then the latest finished ones.
pub fn migrations(
    live: &[MigrationDetail<'_>],
    finished: &[MigrationRecord],
    now_ms: u64,
) -> String {
    let mut out = String::new();
    if live.is_empty() {
        out.push_str(r#"<p class="empty">No migration is running.</p>"#);
    }
    for d in live {
        out.push_str(&migration_card(d, now_ms));
    }
    if !finished.is_empty() {
        out.push_str(r#"<table class="finished"><caption>Finished</caption><thead><tr><th>VM</th><th>From → to</th><th>State</th><th>Took</th><th>Ended</th><th>Why</th></tr></thead><tbody>"#);
        for m in finished {
            let took = match (m.started_ms, m.ended_ms) {
                (Some(s), Some(e)) => duration(e.saturating_sub(s) as f64 / 1000.0),
                _ => "—".into(),
            };
            let _ = write!(
                out,
                r#"<tr id="mig-{id}" data-vm="{vm}" data-state="{st}"><td>{vm}</td><td>{src} → {dst}</td><td>{badge}</td><td>{took}</td><td>{ended}</td><td>{why}</td></tr>"#,
                id = esc(&m.id),
                vm = esc(&m.vm),
                src = esc(&m.source),
                dst = esc(&m.destination),
                st = m.state.as_str(),
                badge = state_badge(migration_state_class(m), m.state.as_str()),
                ended = m.ended_ms.map_or_else(|| "—".into(), clock),
                why = esc(m.error.as_deref().unwrap_or(&m.reason)),
            );
        }
        out.push_str("</tbody></table>");
    }
    out
}

/// One evacuation: summary, plan timeline, what changed, and the operator's buttons.
pub fn evacuation_card(v: &EvacuationView, now_ms: u64) -> String {
    let e = &v.evacuation;
    let p = &e.plan;
    let id = esc(&e.id);
    let class = match e.state {
        EvacuationState::Completed => "ok",
        EvacuationState::Running => "busy",
        EvacuationState::Paused => "warn",
        EvacuationState::Failed | EvacuationState::Cancelled => "bad",
    };
    let mut counts: HashMap<&str, usize> = HashMap::new();
    for m in &v.migrations {
        *counts.entry(m.state.as_str()).or_default() += 1;
    }
    let mut counts: Vec<_> = counts.into_iter().collect();
    counts.sort();
    let counts: Vec<String> = counts.iter().map(|(s, n)| format!("{n} {s}")).collect();
    let elapsed = e.ended_ms.unwrap_or(now_ms).saturating_sub(e.created_ms) as f64 / 1000.0;
    let slack = p
        .deadline_slack_s
        .map(|s| {
            format!(
                " ({} {})",
                duration(s.abs()),
                if s >= 0.0 { "to spare" } else { "late" }
            )
        })
        .unwrap_or_default();
    let list = |items: &[String], class: &str| -> String {
        if items.is_empty() {
            return String::new();
        }
        let li: String = items
            .iter()
            .map(|s| format!("<li>{}</li>", esc(s)))
            .collect();
        format!(r#"<ul class="{class}">{li}</ul>"#)
    };
    let buttons = if e.state.is_terminal() {
        String::new()
    } else {
        let b = |action: &str, label: &str| {
            format!(
                r#"<button type="button" data-action="{action}" data-url="/v1/evacuations/{id}/{action}" data-confirm="{label} the evacuation of {host}?">{label}</button>"#,
                host = esc(&e.host)
            )
        };
        let toggle = if e.state == EvacuationState::Paused {
            b("resume", "Resume")
        } else {
            b("pause", "Pause")
        };
        format!(
            r#"<p class="actions">{toggle} {}</p>"#,
            b("cancel", "Cancel")
        )
    };
    format!(
        r#"<article class="evacuation" id="evac-{id}" data-state="{st}" data-makespan-s="{mk:.1}"><header><h3>Evacuation of {host} <small>{id}</small></h3>{badge} <small>{counts}</small></header><p class="figures">deadline <b>{dl}</b> · predicted makespan <b class="makespan">{mks}</b>{slack} (first plan {first}) · elapsed {el} · planner {planner}, verdict {verdict}{actual}</p>{timeline}{deviations}{suggestions}{error}{buttons}</article>"#,
        st = enum_name(e.state),
        mk = p.predicted_makespan_s,
        host = esc(&e.host),
        badge = state_badge(class, &enum_name(e.state)),
        counts = counts.join(", "),
        dl = clock(e.deadline_ms),
        mks = duration(p.predicted_makespan_s),
        first = duration(e.predicted_makespan_s),
        el = duration(elapsed),
        planner = esc(&p.planner),
        verdict = esc(&p.deadline_verdict),
        actual = e
            .actual_makespan_s
            .map(|a| format!(" · actual makespan <b>{}</b>", duration(a)))
            .unwrap_or_default(),
        timeline = evacuation_timeline(v, now_ms),
        deviations = list(&p.deviations, "deviations"),
        suggestions = list(&p.suggestions, "suggestions"),
        error = e
            .error
            .as_deref()
            .map(|x| format!(r#"<p class="error">{}</p>"#, esc(x)))
            .unwrap_or_default(),
    )
}

fn enum_name(s: EvacuationState) -> String {
    crate::model::enum_str(&s)
}

/// The Evacuations view.
pub fn evacuations(views: &[EvacuationView], now_ms: u64) -> String {
    if views.is_empty() {
        return r#"<p class="empty">No evacuation yet.</p>"#.into();
    }
    views.iter().map(|v| evacuation_card(v, now_ms)).collect()
}

/// The whole page around the three views.
pub fn page(who: &tern_pki::Identity, sections: [&str; 3], lab_mode: bool) -> String {
    let [hosts, migrations, evacuations] = sections;
    let logout = if lab_mode {
        r#" · <a href="/ui/logout">log out</a>"#
    } else {
        ""
    };
    format!(
        r##"<!doctype html><html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1"><title>tern — fleet</title><link rel="stylesheet" href="/ui/app.css"><script src="/ui/app.js" defer></script></head><body data-role="{role}"><header class="top"><h1>tern</h1><nav><a href="#hosts">Hosts</a> <a href="#migrations">Migrations</a> <a href="#evacuations">Evacuations</a></nav><p class="who">{name} <span class="badge">{role}</span>{logout} · <span id="live" data-live="0">connecting…</span></p></header><div id="notice" role="status" aria-live="polite"></div><main><section id="hosts"><h2>Hosts</h2><div class="body" data-fragment="hosts">{hosts}</div></section><section id="migrations"><h2>Migrations</h2><div class="body" data-fragment="migrations">{migrations}</div></section><section id="evacuations"><h2>Evacuations</h2><div class="body" data-fragment="evacuations">{evacuations}</div></section><section id="log"><h2>Events</h2><ol id="events" reversed></ol></section></main></body></html>"##,
        role = who.role,
        name = esc(&who.name),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{
        EvacuationPlan, EvacuationRecord, HostFacts, MigrationContext, MigrationState,
        PlannedMigration,
    };

    const T0: u64 = 1_700_000_000_000;

    fn host(name: &str, state: HostState) -> HostRecord {
        HostRecord {
            name: name.into(),
            state,
            facts: HostFacts {
                memory_mib: 8192,
                free_memory_mib: 4096,
                qemu_version: "10.0.2".into(),
                migration_capabilities: vec![],
                permit_post_copy: true,
                link_bytes_per_s: Some(125_000_000),
                max_outbound: 2,
                max_inbound: 2,
                outbound_migrations: 0,
                inbound_migrations: 0,
            },
            post_copy: None,
            max_outbound: None,
            max_inbound: None,
            last_heartbeat_ms: T0,
        }
    }

    fn vm(name: &str, host: &str) -> VmRecord {
        VmRecord {
            name: name.into(),
            host: host.into(),
            memory_mib: 512,
            sla_class: "silver".into(),
            post_copy_allowed: true,
            dirty_bytes_per_s: Some(2_500_000),
        }
    }

    fn migration(vm: &str, state: MigrationState, started: Option<u64>) -> MigrationRecord {
        MigrationRecord {
            id: format!("mig-{vm}"),
            vm: vm.into(),
            source: "h1".into(),
            destination: "h2".into(),
            context: MigrationContext::Evacuate,
            state,
            attempts: 1,
            evacuation_id: Some("evac-1".into()),
            plan_index: None,
            reason: "least loaded <ingress>".into(),
            idempotency_key: None,
            agent_migration_id: None,
            error: None,
            created_ms: T0,
            started_ms: started,
            ended_ms: None,
            next_attempt_ms: None,
            updated_ms: T0,
            switched_to_postcopy: false,
        }
    }

    fn evacuation(deadline_s: u64, migrations: Vec<MigrationRecord>) -> EvacuationView {
        let row = |vm: &str, start: f64, end: f64| PlannedMigration {
            vm: vm.into(),
            destination: "h2".into(),
            start_s: start,
            duration_s: end - start,
            end_s: end,
            ..Default::default()
        };
        EvacuationView {
            evacuation: EvacuationRecord {
                id: "evac-1".into(),
                host: "h1".into(),
                state: EvacuationState::Running,
                deadline_ms: T0 + deadline_s * 1000,
                plan: EvacuationPlan {
                    host: "h1".into(),
                    planner: "tern-planner".into(),
                    migrations: vec![row("a", 0.0, 10.0), row("b", 10.0, 20.0)],
                    predicted_makespan_s: 20.0,
                    deadline_s,
                    made_ms: T0,
                    ..Default::default()
                },
                predicted_makespan_s: 20.0,
                actual_makespan_s: None,
                created_ms: T0,
                ended_ms: None,
                error: None,
                updated_ms: T0,
            },
            migrations,
        }
    }

    #[test]
    fn hosts_list_their_vms_and_migrations_in_and_out_with_names_escaped() {
        let hs = [host("h1", HostState::Draining), host("h2", HostState::Up)];
        let vms = [vm("a", "h1"), vm("<b>", "h2")];
        let ms = [migration("a", MigrationState::Running, Some(T0))];
        let html = hosts(
            &FleetSnapshot {
                hosts: &hs,
                vms: &vms,
                migrations: &ms,
            },
            T0 + 2000,
        );
        let h1 = &html[html.find("id=\"host-h1\"").unwrap()..html.find("id=\"host-h2\"").unwrap()];
        assert!(
            h1.contains(r#"data-vm="a""#) && h1.contains("draining"),
            "{h1}"
        );
        assert!(
            h1.contains(r#"<td class="out"><span class="count">1</span>"#),
            "{h1}"
        );
        let h2 = &html[html.find("id=\"host-h2\"").unwrap()..];
        assert!(
            h2.contains(r#"data-vm="&lt;b&gt;""#) && !h2.contains("<b>"),
            "{h2}"
        );
        assert!(
            h2.contains(r#"<td class="in"><span class="count">1</span>"#),
            "{h2}"
        );
    }

    #[test]
    fn a_running_migration_shows_its_figures_decisions_and_abort_button() {
        let m = migration("a", MigrationState::Running, Some(T0));
        let events = [MigrationEvent {
            seq: 1,
            wall_ms: T0,
            kind: "replan".into(),
            detail: "destination h3 <draining>".into(),
        }];
        let v = vm("a", "h1");
        let html = migration_card(
            &MigrationDetail {
                migration: &m,
                events: &events,
                samples: &[],
                progress: None,
                vm: Some(&v),
                link_bytes_per_s: Some(125_000_000),
                planned_end_ms: Some(T0 + 10_000),
            },
            T0 + 4000,
        );
        assert!(
            html.contains("dirty rate 2.5 MB/s vs link 125.0 MB/s (2 %)"),
            "{html}"
        );
        assert!(html.contains("in 6.0 s"), "{html}");
        assert!(html.contains("destination h3 &lt;draining&gt;"), "{html}");
        assert!(
            html.contains(r#"data-url="/v1/migrations/mig-a/abort""#),
            "{html}"
        );
        assert!(html.contains("least loaded &lt;ingress&gt;"), "{html}");
    }

    #[test]
    fn the_timeline_draws_the_plan_the_running_bar_and_the_deadline_on_or_off_scale() {
        let running = migration("a", MigrationState::Running, Some(T0 + 1000));
        let near = evacuation_card(&evacuation(60, vec![running.clone()]), T0 + 5000);
        assert_eq!(near.matches(r#"<rect class="pred""#).count(), 2, "{near}");
        assert!(near.contains(r#"data-makespan-s="20.0""#));
        assert!(near.contains(&format!(
            r#"data-running="1" data-start-ms="{}""#,
            T0 + 1000
        )));
        assert!(near.contains(r#"<line class="deadline""#), "{near}");
        assert!(near.contains(r#"data-url="/v1/evacuations/evac-1/pause""#));
        let far = evacuation_card(&evacuation(3600, vec![running]), T0 + 5000);
        assert!(!far.contains(r#"<line class="deadline""#), "{far}");
        assert!(far.contains("deadline-off-scale"), "{far}");
        let waiting = evacuation_card(
            &evacuation(60, vec![migration("a", MigrationState::Planned, None)]),
            T0,
        );
        assert!(!waiting.contains(r#"<rect class="real"#), "{waiting}");
    }
}
