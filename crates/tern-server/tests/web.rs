//! The web view in a real headless browser (Debian's chromium through chromedriver), against
//! a real controller with its SQLite file and the fake agents of `tests/common`: the page shows
//! the plan, the bars move, the plan is re-made on screen, a viewer's abort is refused while an
//! operator's works, the VM list changes host, and an update reaches the DOM within 1 s of the
//! server emitting its event (no polling: the page only listens to `/v1/events`).
//!
//! Screenshots at three moments are taken every run; with `TERN_UPDATE_SCREENSHOTS=1` they
//! replace `docs/web-*.png` (linked from the README).

mod common;
mod web_driver;

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::time::Duration;

use common::{Harness, wait_for};
use serde_json::{Value, json};
use web_driver::{Browser, FleetPage};

const T: Duration = Duration::from_secs(20);

/// Where a screenshot goes: `docs/` when asked to update them, else a temp dir of the run.
fn shot(dir: &tempfile::TempDir, name: &str) -> PathBuf {
    if std::env::var_os("TERN_UPDATE_SCREENSHOTS").is_some_and(|v| v == "1") {
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../../docs")
            .join(name)
    } else {
        dir.path().join(name)
    }
}

async fn evacuation(h: &Harness, id: &str) -> Value {
    h.get(&format!("/v1/evacuations/{id}")).await.1
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_web_view_follows_an_evacuation_live_and_enforces_roles() {
    let h = Harness::start(3, 30).await;
    let tokens = h.server.as_ref().unwrap().lab_tokens.clone().unwrap();
    h.agent.state.hold.store(true, Ordering::SeqCst);
    h.heartbeat("h1", 0, &[("web-a", 512), ("web-b", 256)])
        .await;
    h.heartbeat("h2", 4096, &[]).await;
    h.heartbeat("h3", 4096, &[]).await;
    // One migration at a time out of h1, so the second step waits and can be re-planned.
    let (s, _) = h
        .call("PATCH", "/v1/hosts/h1", Some(json!({"max_outbound": 1})))
        .await;
    assert_eq!(s, 200);

    let shots = tempfile::tempdir().unwrap();
    let browser = Browser::launch(1440, 1000).await;
    let viewer = FleetPage::login(&browser, &h.url, &tokens.viewer).await;
    assert_eq!(viewer.role().await, "viewer");
    assert_eq!(viewer.host_of("web-a").await.as_deref(), Some("h1"));

    // The plan appears as soon as the evacuation starts.
    let (s, v) = h
        .post("/v1/hosts/h1/evacuate", json!({"deadline": "45s"}))
        .await;
    assert_eq!(s, 200, "{v}");
    let id = v["id"].as_str().unwrap().to_string();
    let first_vm = v["plan"]["migrations"][0]["vm"]
        .as_str()
        .unwrap()
        .to_string();
    let second_vm = v["plan"]["migrations"][1]["vm"]
        .as_str()
        .unwrap()
        .to_string();
    let gone = v["plan"]["migrations"][1]["destination"]
        .as_str()
        .unwrap()
        .to_string();
    let other = if gone == "h2" { "h3" } else { "h2" };
    browser
        .wait_for(
            "the plan's two bars",
            "return document.querySelectorAll(`#evac-${arguments[0]} rect.pred`).length === 2;",
            json!([id]),
            T,
        )
        .await;
    let rows = viewer.plan_rows(&id).await;
    assert_eq!(rows[0].0, first_vm);
    assert_eq!(
        rows[1],
        (second_vm.clone(), format!("{second_vm} → {gone}"))
    );

    // The first VM's real bar appears and grows while it runs.
    let w1 = wait_for("a real bar", T, || async {
        viewer.real_bar_width(&id, &first_vm).await
    })
    .await;
    let w2 = wait_for("the bar to grow", T, || async {
        viewer
            .real_bar_width(&id, &first_vm)
            .await
            .filter(|w| *w > w1 + 1.0)
    })
    .await;
    assert!(w2 > w1, "{w1} → {w2}");
    // The agent's progress reports draw the remaining-bytes chart.
    browser
        .wait_for(
            "the remaining-bytes chart",
            "return !!document.querySelector('#migrations svg.chart polyline.remaining');",
            json!([]),
            T,
        )
        .await;
    let first_mig = evacuation(&h, &id).await["migrations"][0]["id"]
        .as_str()
        .unwrap()
        .to_string();

    // The plan is re-made on screen when the waiting step's destination goes away.
    let (s, _) = h
        .call(
            "PATCH",
            &format!("/v1/hosts/{gone}"),
            Some(json!({"drain": true})),
        )
        .await;
    assert_eq!(s, 200);
    let want = format!("{second_vm} → {other}");
    wait_for("the re-made plan on the page", T, || async {
        let rows = viewer.plan_rows(&id).await;
        (rows.get(1).map(|r| &r.1) == Some(&want)).then_some(())
    })
    .await;
    let api_makespan = evacuation(&h, &id).await["evacuation"]["plan"]["predicted_makespan_s"]
        .as_f64()
        .unwrap();
    let shown = viewer.makespan_s(&id).await.unwrap();
    assert!(
        (shown - api_makespan).abs() < 0.05,
        "page shows makespan {shown}, the plan says {api_makespan}"
    );
    viewer
        .screenshot_at("#evacuations", &shot(&shots, "web-evacuation-plan.png"))
        .await;

    // A viewer's abort is the API's own 403, shown on the page; nothing reaches the agent.
    let notice = viewer
        .act(&format!("#mig-{first_mig} button[data-action=abort]"))
        .await;
    assert!(
        notice.starts_with("bad") && notice.contains("403") && notice.contains("operator"),
        "{notice}"
    );
    assert_eq!(h.agent.starts()[0].state, "precopy");

    // An operator's abort goes through: the agent aborts, the decision shows with who asked.
    let operator = FleetPage::login(&browser, &h.url, &tokens.operator).await;
    assert_eq!(operator.role().await, "operator");
    let notice = operator
        .act(&format!("#mig-{first_mig} button[data-action=abort]"))
        .await;
    assert!(
        notice.starts_with("ok") && notice.contains("abort: done"),
        "{notice}"
    );
    assert_eq!(h.agent.starts()[0].state, "aborted");
    browser
        .wait_for(
            "the abort among the decisions",
            "const m = document.getElementById('mig-' + arguments[0]); \
             return !!m && m.textContent.includes('abort requested by token-operator');",
            json!([first_mig]),
            T,
        )
        .await;
    operator
        .screenshot_at("#migrations", &shot(&shots, "web-migrations-abort.png"))
        .await;

    // The operator pauses and resumes the evacuation from its card.
    let notice = operator
        .act(&format!("#evac-{id} button[data-action=pause]"))
        .await;
    assert!(notice.starts_with("ok"), "{notice}");
    assert_eq!(evacuation(&h, &id).await["evacuation"]["state"], "paused");
    browser
        .wait_for(
            "the card to offer resume",
            "return !!document.querySelector(`#evac-${arguments[0]}[data-state=paused] button[data-action=resume]`);",
            json!([id]),
            T,
        )
        .await;
    let notice = operator
        .act(&format!("#evac-{id} button[data-action=resume]"))
        .await;
    assert!(notice.starts_with("ok"), "{notice}");
    assert_eq!(evacuation(&h, &id).await["evacuation"]["state"], "running");

    // The evacuation must finish: the aborted step is retried; let every migration complete.
    h.agent.state.hold.store(false, Ordering::SeqCst);
    let done = wait_for("evacuation completed", Duration::from_secs(40), || async {
        let v = evacuation(&h, &id).await;
        (v["evacuation"]["state"] == "completed").then_some(v)
    })
    .await;
    let dest_of = |vm: &str| -> String {
        done["migrations"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["vm"] == vm)
            .and_then(|m| m["destination"].as_str())
            .unwrap()
            .to_string()
    };
    browser
        .wait_for(
            "the evacuation completed on the page",
            "const a = document.getElementById('evac-' + arguments[0]); \
             return !!a && a.dataset.state === 'completed' \
               && a.querySelectorAll('rect.real.state-completed').length === 2;",
            json!([id]),
            T,
        )
        .await;

    // The agents report the guests on their new hosts: the page moves each VM within 1 s of
    // the server's event.
    let (a_to, b_to) = (dest_of(&first_vm), dest_of(&second_vm));
    let mut on: std::collections::BTreeMap<String, Vec<(&str, u64)>> = Default::default();
    on.entry(a_to.clone()).or_default().push((&first_vm, 512));
    on.entry(b_to.clone()).or_default().push((&second_vm, 256));
    h.heartbeat("h1", 4096, &[]).await;
    for (host, vms) in &on {
        let sent = tern_server::model::now_ms();
        h.heartbeat(host, 2048, vms).await;
        let (vm, _) = vms[0];
        let (applied, _event) = operator.wait_vm_on(vm, host, T).await;
        // The server emits its event after `sent` (it handles the heartbeat first), so this
        // bounds the time from the event to the DOM change from above. (The change may even
        // come from an earlier event's redraw that read the new state: sooner still.)
        let latency = applied.saturating_sub(sent);
        println!("{vm} shown on {host} {latency} ms after the heartbeat that caused its event");
        assert!(
            latency < 1000,
            "{vm} on {host} shown {latency} ms after its heartbeat"
        );
    }
    assert_eq!(operator.host_of(&first_vm).await, Some(a_to));
    assert_eq!(operator.host_of(&second_vm).await, Some(b_to));
    operator
        .screenshot_at("body", &shot(&shots, "web-hosts-after.png"))
        .await;
    browser.quit().await;
}
