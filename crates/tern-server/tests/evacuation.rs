//! Evacuations through the controller's API over real HTTP on 127.0.0.1, with a real SQLite
//! file (or PostgreSQL, see the last test) and a fake agent.

mod common;

use std::sync::atomic::Ordering;
use std::time::Duration;

use common::{Harness, wait_for};
use serde_json::{Value, json};

const T: Duration = Duration::from_secs(15);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn evacuation_dry_run_plans_and_changes_nothing() {
    let h = Harness::start(3, 30).await;
    h.heartbeat("h1", 0, &[("a", 512), ("b", 1024), ("c", 256)])
        .await;
    h.heartbeat("h2", 1024, &[]).await;
    h.heartbeat("h3", 1024, &[]).await;
    let (s, v) = h
        .post(
            "/v1/hosts/h1/evacuate",
            json!({"deadline": "30m", "dry_run": true}),
        )
        .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["id"], Value::Null);
    let plan = &v["plan"];
    assert_eq!(plan["deadline_s"], 1800);
    assert_eq!(plan["fits_deadline"], true);
    let steps = plan["migrations"].as_array().unwrap();
    assert_eq!(steps.len(), 3);
    assert!(
        plan["planner"]
            .as_str()
            .unwrap()
            .starts_with("tern-planner")
    );
    assert_eq!(plan["deadline_verdict"], "met");
    assert!(plan["predicted_makespan_s"].as_f64().unwrap() > 0.0);
    for st in steps {
        assert!(["h2", "h3"].contains(&st["destination"].as_str().unwrap()));
        assert!(!st["reason"].as_str().unwrap().is_empty());
    }
    assert_eq!(h.get("/v1/hosts/h1").await.1["state"], "up");
    assert_eq!(h.get("/v1/migrations").await.1, json!([]));
    assert_eq!(h.get("/v1/evacuations").await.1, json!([]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn evacuation_bad_inputs_are_refused_and_change_nothing() {
    let h = Harness::start(3, 30).await;
    h.agent.state.hold.store(true, Ordering::SeqCst);
    h.heartbeat("h1", 0, &[("a", 512)]).await;
    h.heartbeat("h2", 4096, &[("b", 512)]).await;
    h.heartbeat("h3", 300, &[]).await;

    let (s, v) = h.post("/v1/hosts/nope/evacuate", json!({})).await;
    assert_eq!(s, 404);
    assert!(v["error"].as_str().unwrap().contains("\"nope\""));
    for bad in [
        json!("0"),
        json!("-5m"),
        json!("tomorrow"),
        json!(0),
        json!(-300),
    ] {
        let (s, v) = h
            .post("/v1/hosts/h1/evacuate", json!({"deadline": bad}))
            .await;
        assert_eq!(s, 400, "{bad}: {v}");
        let text = v["error"].as_str().unwrap();
        let shown = bad.as_str().map_or(bad.to_string(), str::to_string);
        assert!(text.contains(&format!("{shown:?}")), "{text}");
        assert!(text.contains("30m"), "{text}");
    }
    let (s, v) = h
        .post(
            "/v1/hosts/h1/evacuate",
            json!({"deadline": "1h", "force": true}),
        )
        .await;
    assert_eq!(s, 400);
    assert!(v["error"].as_str().unwrap().contains("force"), "{v}");

    // h2's VM has nowhere to go: h1 has no room, h3 too little. Per-VM, per-host reasons.
    let (s, v) = h
        .post("/v1/hosts/h2/evacuate", json!({"dry_run": true}))
        .await;
    assert_eq!(s, 422, "{v}");
    let rej = &v["details"]["vms"][0];
    assert_eq!(rej["vm"], "b");
    let why = rej["rejections"].to_string();
    assert!(why.contains("h1") && why.contains("0 MiB free"), "{why}");
    assert!(why.contains("h3") && why.contains("300 MiB free"), "{why}");

    let (s, v) = h
        .post("/v1/hosts/h1/evacuate", json!({"deadline": "1h"}))
        .await;
    assert_eq!(s, 200, "{v}");
    let id = v["id"].as_str().unwrap().to_string();
    assert_eq!(v["plan"]["migrations"][0]["destination"], "h2");
    assert_eq!(h.get("/v1/hosts/h1").await.1["state"], "draining");

    let (s, v) = h.post("/v1/hosts/h1/evacuate", json!({})).await;
    assert_eq!(s, 409);
    assert!(v["error"].as_str().unwrap().contains(&id), "{v}");
    let (s, v) = h
        .post("/v1/hosts/h2/evacuate", json!({"dry_run": true}))
        .await;
    assert_eq!(s, 409);
    let text = v["error"].as_str().unwrap();
    assert!(
        text.contains("destination of running evacuation") && text.contains(&id),
        "{text}"
    );
    assert_eq!(
        h.get("/v1/evacuations").await.1.as_array().unwrap().len(),
        1
    );
    let (s, _) = h
        .post(&format!("/v1/evacuations/{id}/cancel"), json!({}))
        .await;
    assert_eq!(s, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn evacuation_retries_a_failed_migration_and_completes_with_events() {
    let h = Harness::start(3, 30).await;
    h.heartbeat("h1", 0, &[("a", 512), ("b", 256)]).await;
    h.heartbeat("h2", 4096, &[]).await;
    h.heartbeat("h3", 4096, &[]).await;
    h.agent.state.fail_next.store(1, Ordering::SeqCst);
    let mut sse = h
        .http
        .get(format!("{}/v1/events", h.url))
        .bearer_auth(&h.token)
        .send()
        .await
        .unwrap();
    assert_eq!(sse.status().as_u16(), 200);

    let (s, v) = h
        .post("/v1/hosts/h1/evacuate", json!({"deadline": 600}))
        .await;
    assert_eq!(s, 200, "{v}");
    let id = v["id"].as_str().unwrap().to_string();
    let done = wait_for("evacuation completed", T, || async {
        let (_, v) = h.get(&format!("/v1/evacuations/{id}")).await;
        (v["evacuation"]["state"] == "completed").then_some(v)
    })
    .await;
    let steps = done["migrations"].as_array().unwrap();
    assert_eq!(steps[0]["vm"], "a");
    assert_eq!(
        steps[0]["attempts"], 2,
        "the failed first attempt was retried"
    );
    assert_eq!(steps[1]["attempts"], 1);
    assert!(done["evacuation"]["actual_makespan_s"].as_f64().unwrap() > 0.0);
    let mid = steps[0]["id"].as_str().unwrap();
    let (_, m) = h.get(&format!("/v1/migrations/{mid}")).await;
    let retry = m["events"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["kind"] == "retry")
        .expect("retry recorded");
    assert!(
        retry["detail"].as_str().unwrap().contains("network down"),
        "{retry}"
    );
    // The failure is a deviation: the rest was re-planned, and the step says so.
    let replan = m["events"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["kind"] == "replan")
        .expect("replan recorded after the failed attempt");
    let d = replan["detail"].as_str().unwrap();
    assert!(
        d.contains("attempt 1 of a failed before the switch") && d.contains("predicted makespan"),
        "{d}"
    );
    let starts = h.agent.starts();
    assert_eq!(starts.len(), 3, "2 VMs, one retried once");
    // While `a` waits for its retry, `b` goes (a backoff does not idle the evacuation).
    let keys_of_a: Vec<String> = starts
        .iter()
        .filter(|m| m.vm == "a")
        .filter_map(|m| m.key.clone())
        .collect();
    assert_eq!(keys_of_a, [format!("{mid}-a1"), format!("{mid}-a2")]);

    // Every state change was streamed, ending with the evacuation's completion.
    let mut text = String::new();
    tokio::time::timeout(T, async {
        while !text.contains("\"kind\":\"evacuation\",\"id\":\"") || !text.contains("completed") {
            match sse.chunk().await.unwrap() {
                Some(c) => text.push_str(&String::from_utf8_lossy(&c)),
                None => break,
            }
        }
    })
    .await
    .expect("SSE events");
    assert!(text.contains("event: migration"), "{text}");
    assert!(text.contains("event: evacuation"), "{text}");
    let (_, metrics) = h.get("/metrics").await;
    let metrics = metrics.as_str().unwrap();
    assert!(
        metrics.contains("tern_controller_migration_retries_total 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("tern_controller_evacuation_actual_makespan_seconds{host=\"h1\"}"),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn controller_restart_mid_evacuation_continues_without_starting_twice() {
    let mut h = Harness::start(3, 30).await;
    h.agent.state.hold.store(true, Ordering::SeqCst);
    h.heartbeat("h1", 0, &[("a", 512), ("b", 256)]).await;
    h.heartbeat("h2", 4096, &[]).await;
    h.heartbeat("h3", 4096, &[]).await;
    // One outgoing migration at a time: the second waits for the first (its trigger).
    let (s, _) = h
        .call("PATCH", "/v1/hosts/h1", Some(json!({"max_outbound": 1})))
        .await;
    assert_eq!(s, 200);
    let (s, v) = h
        .post("/v1/hosts/h1/evacuate", json!({"deadline": "10m"}))
        .await;
    assert_eq!(
        v["plan"]["migrations"][1]["trigger"]["kind"], "after-migration-of",
        "{v}"
    );
    assert_eq!(s, 200, "{v}");
    let id = v["id"].as_str().unwrap().to_string();
    wait_for("first migration running", T, || async {
        let (_, v) = h.get(&format!("/v1/evacuations/{id}")).await;
        (v["migrations"][0]["state"] == "running").then_some(())
    })
    .await;
    h.stop().await;
    assert_eq!(h.agent.starts().len(), 1);

    // The worst moment to die: the agent accepted the attempt but the controller had not yet
    // recorded it as running. The store then says `starting` with the attempt's key.
    let db = h.dir.path().join("state/controller.db");
    let store = tern_server::store::SqlStore::open_sqlite(&db)
        .await
        .unwrap();
    use tern_server::store::ControllerStore;
    let mut first = store.migrations(Some(&id)).await.unwrap().remove(0);
    first.state = tern_server::model::MigrationState::Starting;
    first.agent_migration_id = None;
    store.put_migration(&first).await.unwrap();
    store.close().await;

    h.start_again().await;
    h.heartbeat("h1", 0, &[("a", 512), ("b", 256)]).await;
    h.heartbeat("h2", 4096, &[]).await;
    h.heartbeat("h3", 4096, &[]).await;
    wait_for("first migration adopted", T, || async {
        let (_, v) = h.get(&format!("/v1/migrations/{}", first.id)).await;
        (v["migration"]["state"] == "running").then_some(())
    })
    .await;
    h.agent.state.hold.store(false, Ordering::SeqCst);
    let done = wait_for("evacuation completed", T, || async {
        let (_, v) = h.get(&format!("/v1/evacuations/{id}")).await;
        (v["evacuation"]["state"] == "completed").then_some(v)
    })
    .await;
    let starts = h.agent.starts();
    let mut vms: Vec<&str> = starts.iter().map(|m| m.vm.as_str()).collect();
    vms.sort();
    assert_eq!(vms, ["a", "b"], "each VM started exactly once");
    assert_eq!(done["migrations"][0]["attempts"], 1);
    let (_, m) = h.get(&format!("/v1/migrations/{}", first.id)).await;
    let adopted = m["events"].as_array().unwrap().iter().any(|e| {
        e["detail"]
            .as_str()
            .unwrap()
            .contains("adopted agent migration agent-1")
    });
    assert!(adopted, "{m}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_step_whose_destination_goes_away_is_replanned() {
    let h = Harness::start(3, 30).await;
    h.agent.state.hold.store(true, Ordering::SeqCst);
    h.heartbeat("h1", 0, &[("a", 512), ("b", 256)]).await;
    h.heartbeat("h2", 4096, &[]).await;
    h.heartbeat("h3", 4096, &[]).await;
    let (s, _) = h
        .call("PATCH", "/v1/hosts/h1", Some(json!({"max_outbound": 1})))
        .await;
    assert_eq!(s, 200);
    let (s, v) = h
        .post("/v1/hosts/h1/evacuate", json!({"deadline": "10m"}))
        .await;
    assert_eq!(s, 200, "{v}");
    let second = v["plan"]["migrations"][1].clone();
    let gone = second["destination"].as_str().unwrap().to_string();
    let other = if gone == "h2" { "h3" } else { "h2" };
    let id = v["id"].as_str().unwrap().to_string();
    wait_for("first running", T, || async {
        let (_, v) = h.get(&format!("/v1/evacuations/{id}")).await;
        (v["migrations"][0]["state"] == "running").then_some(())
    })
    .await;
    // The second step's destination goes away while the first still runs.
    let (s, _) = h
        .call(
            "PATCH",
            &format!("/v1/hosts/{gone}"),
            Some(json!({"drain": true})),
        )
        .await;
    assert_eq!(s, 200);
    let replanned = wait_for("re-plan recorded", T, || async {
        let (_, v) = h.get(&format!("/v1/evacuations/{id}")).await;
        let step = v["migrations"][1].clone();
        (step["destination"] == other).then_some(v)
    })
    .await;
    let new_plan = &replanned["evacuation"]["plan"];
    assert_eq!(new_plan["migrations"].as_array().unwrap().len(), 2);
    assert!(new_plan["predicted_makespan_s"].as_f64().unwrap() > 0.0);
    h.agent.state.hold.store(false, Ordering::SeqCst);
    let done = wait_for("evacuation completed", T, || async {
        let (_, v) = h.get(&format!("/v1/evacuations/{id}")).await;
        (v["evacuation"]["state"] == "completed").then_some(v)
    })
    .await;
    let b = &done["migrations"][1];
    assert_eq!(b["vm"], second["vm"]);
    assert_eq!(b["destination"], other);
    let (_, m) = h
        .get(&format!("/v1/migrations/{}", b["id"].as_str().unwrap()))
        .await;
    let replan = m["events"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["kind"] == "replan")
        .expect("replan recorded");
    let d = replan["detail"].as_str().unwrap();
    assert!(
        d.contains(&format!("destination {gone} draining"))
            && d.contains("predicted makespan")
            && d.contains(&format!("now to {other}")),
        "{d}"
    );
    let starts = h.agent.starts();
    assert_eq!(starts.len(), 2, "each VM started once");
    assert_eq!(starts[1].destination, other);
}

/// A VM dirtying far more than the plan assumed (reported by its agent mid-evacuation) makes
/// the runner re-plan; the waiting step records the deviation and the new makespan.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_observed_dirty_rate_far_from_the_assumption_triggers_a_replan() {
    let h = Harness::start(3, 30).await;
    h.agent.state.hold.store(true, Ordering::SeqCst);
    h.heartbeat("h1", 0, &[("a", 512), ("b", 512)]).await;
    h.heartbeat("h2", 4096, &[]).await;
    h.heartbeat("h3", 4096, &[]).await;
    let (s, _) = h
        .call("PATCH", "/v1/hosts/h1", Some(json!({"max_outbound": 1})))
        .await;
    assert_eq!(s, 200);
    let (s, v) = h
        .post("/v1/hosts/h1/evacuate", json!({"deadline": "1h"}))
        .await;
    assert_eq!(s, 200, "{v}");
    let id = v["id"].as_str().unwrap().to_string();
    let before = v["plan"]["predicted_makespan_s"].as_f64().unwrap();
    let waiting = v["plan"]["migrations"][1]["vm"]
        .as_str()
        .unwrap()
        .to_string();
    wait_for("first running", T, || async {
        let (_, v) = h.get(&format!("/v1/evacuations/{id}")).await;
        (v["migrations"][0]["state"] == "running").then_some(())
    })
    .await;
    // The waiting VM now dirties 100 MB/s instead of the 1 MB/s assumed.
    let mut b = common::heartbeat_body("h1", 0, "10.0.0", &[("a", 512), ("b", 512)]);
    for vm in b["vms"].as_array_mut().unwrap() {
        if vm["name"] == waiting.as_str() {
            vm["dirty_bytes_per_s"] = json!(100_000_000);
        }
    }
    assert_eq!(h.post("/v1/agents/heartbeat", b).await.0, 200);
    let v = wait_for("re-plan", T, || async {
        let (_, v) = h.get(&format!("/v1/evacuations/{id}")).await;
        let p = &v["evacuation"]["plan"];
        (!p["deviations"].as_array()?.is_empty()).then_some(v)
    })
    .await;
    let after = v["evacuation"]["plan"]["predicted_makespan_s"]
        .as_f64()
        .unwrap();
    assert!(after > 0.0 && after.is_finite(), "{before} -> {after}");
    let step = v["migrations"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["vm"] == waiting.as_str())
        .unwrap()
        .clone();
    let (_, m) = h
        .get(&format!("/v1/migrations/{}", step["id"].as_str().unwrap()))
        .await;
    let d = m["events"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["kind"] == "replan")
        .and_then(|e| e["detail"].as_str())
        .map(str::to_string)
        .expect("replan recorded on the waiting step");
    assert!(
        d.contains(&format!("{waiting} dirties 100000000 bytes/s"))
            && d.contains("predicted makespan"),
        "{d}"
    );
    assert_eq!(
        h.post(&format!("/v1/evacuations/{id}/cancel"), json!({}))
            .await
            .0,
        200
    );
}

/// A dry run over four hosts with mixed VMs: a destination and predicted times per VM, the
/// makespan at or above the lower bound; a VM nobody can take gets every host's refusal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dry_run_over_mixed_vms_predicts_and_explains_refusals() {
    let h = Harness::start(4, 30).await;
    let vm = |name: &str, mib: u64, dirty: u64, post_copy: bool| {
        json!({"name": name, "memory_mib": mib, "sla_class": "standard",
            "post_copy_allowed": post_copy, "dirty_bytes_per_s": dirty})
    };
    let mixed = vec![
        vm("db", 2048, 200_000_000, true),
        vm("nopc", 1024, 150_000_000, false),
        vm("web", 512, 1_000_000, true),
        vm("idle", 256, 0, true),
    ];
    let beat = |host: &str, free: u64, qemu: &str, vms: Vec<Value>| {
        let mut b = common::heartbeat_body(host, free, qemu, &[]);
        b["vms"] = Value::Array(vms);
        b
    };
    let send = |b: Value| async { h.post("/v1/agents/heartbeat", b).await };
    assert_eq!(send(beat("h1", 0, "10.0.0", mixed.clone())).await.0, 200);
    assert_eq!(send(beat("h2", 4096, "10.0.0", vec![])).await.0, 200);
    assert_eq!(send(beat("h3", 2048, "10.1.0", vec![])).await.0, 200);
    assert_eq!(send(beat("h4", 8192, "9.2.0", vec![])).await.0, 200);
    let (s, v) = h
        .post(
            "/v1/hosts/h1/evacuate",
            json!({"deadline": "1h", "dry_run": true}),
        )
        .await;
    assert_eq!(s, 200, "{v}");
    let plan = &v["plan"];
    let steps = plan["migrations"].as_array().unwrap();
    let mut names: Vec<&str> = steps.iter().map(|m| m["vm"].as_str().unwrap()).collect();
    names.sort();
    assert_eq!(names, ["db", "idle", "nopc", "web"]);
    for st in steps {
        let d = st["destination"].as_str().unwrap();
        assert!(["h2", "h3"].contains(&d), "h4 runs an older QEMU: {st}");
        let (start, end) = (
            st["start_s"].as_f64().unwrap(),
            st["end_s"].as_f64().unwrap(),
        );
        assert!(start >= 0.0 && end > start, "{st}");
        assert!(!st["reasons"].as_array().unwrap().is_empty(), "{st}");
        assert!(st["trigger"]["kind"].is_string(), "{st}");
    }
    let makespan = plan["predicted_makespan_s"].as_f64().unwrap();
    let lower = plan["lower_bound_s"].as_f64().unwrap();
    assert!(
        lower > 0.0 && makespan >= lower - 1e-6,
        "{makespan} < {lower}"
    );
    let last_end = steps
        .iter()
        .map(|m| m["end_s"].as_f64().unwrap())
        .fold(0.0, f64::max);
    assert!((last_end - makespan).abs() < 1e-6 * makespan.max(1.0) + 1e-6);
    assert_eq!(plan["deadline_verdict"], "met");
    assert!(plan["detail"]["migrations"].is_array());

    // One VM more that nobody can hold: 422, and every other host's refusal.
    let mut with_huge = mixed;
    with_huge.push(vm("huge", 16384, 0, true));
    assert_eq!(send(beat("h1", 0, "10.0.0", with_huge)).await.0, 200);
    let (s, v) = h
        .post("/v1/hosts/h1/evacuate", json!({"dry_run": true}))
        .await;
    assert_eq!(s, 422, "{v}");
    assert!(v["error"].as_str().unwrap().contains("huge"), "{v}");
    let vms = v["details"]["vms"].as_array().unwrap();
    assert_eq!(vms.len(), 1, "{v}");
    assert_eq!(vms[0]["vm"], "huge");
    let refusals = vms[0]["rejections"].as_array().unwrap();
    let why = |host: &str| {
        refusals
            .iter()
            .find(|r| r["host"] == host)
            .map(|r| r["why"].as_str().unwrap().to_string())
            .unwrap_or_else(|| panic!("no refusal from {host}: {v}"))
    };
    assert!(why("h2").contains("4096 MiB free"), "{}", why("h2"));
    assert!(why("h3").contains("2048 MiB free"), "{}", why("h3"));
    assert!(why("h4").contains("older"), "{}", why("h4"));
    assert_eq!(h.get("/v1/evacuations").await.1, json!([]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn evacuations_pause_resume_and_cancel() {
    let h = Harness::start(2, 30).await;
    h.agent.state.hold.store(true, Ordering::SeqCst);
    h.heartbeat("h1", 0, &[("a", 512), ("b", 256)]).await;
    h.heartbeat("h2", 4096, &[]).await;
    let (s, _) = h
        .call("PATCH", "/v1/hosts/h1", Some(json!({"max_outbound": 1})))
        .await;
    assert_eq!(s, 200);
    let (_, v) = h
        .post("/v1/hosts/h1/evacuate", json!({"deadline": "1h"}))
        .await;
    let id = v["id"].as_str().unwrap().to_string();
    wait_for("first running", T, || async {
        let (_, v) = h.get(&format!("/v1/evacuations/{id}")).await;
        (v["migrations"][0]["state"] == "running").then_some(())
    })
    .await;
    let (s, v) = h
        .post(&format!("/v1/evacuations/{id}/pause"), json!({}))
        .await;
    assert_eq!(
        (s, v["evacuation"]["state"].as_str()),
        (200, Some("paused"))
    );
    let (s, v) = h
        .post(&format!("/v1/evacuations/{id}/pause"), json!({}))
        .await;
    assert_eq!(s, 409);
    assert!(v["error"].as_str().unwrap().contains("paused"), "{v}");
    let (s, v) = h
        .post(&format!("/v1/evacuations/{id}/resume"), json!({}))
        .await;
    assert_eq!(
        (s, v["evacuation"]["state"].as_str()),
        (200, Some("running"))
    );
    let (s, v) = h
        .post(&format!("/v1/evacuations/{id}/cancel"), json!({}))
        .await;
    assert_eq!(
        (s, v["evacuation"]["state"].as_str()),
        (200, Some("cancelled"))
    );
    let v = wait_for("steps terminal", T, || async {
        let (_, v) = h.get(&format!("/v1/evacuations/{id}")).await;
        let states: Vec<String> = v["migrations"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["state"].as_str().unwrap().to_string())
            .collect();
        (states == ["aborted", "aborted"]).then_some(v)
    })
    .await;
    assert_eq!(v["evacuation"]["state"], "cancelled");
    assert_eq!(
        h.agent.starts().len(),
        1,
        "nothing new started after cancel"
    );
    assert_eq!(h.agent.starts()[0].state, "aborted");
    let (s, _) = h
        .post(&format!("/v1/evacuations/{id}/resume"), json!({}))
        .await;
    assert_eq!(s, 409);
    assert_eq!(
        h.post("/v1/evacuations/evac-0/cancel", json!({})).await.0,
        404
    );
}

/// The evacuation-with-restart scenario on PostgreSQL, in a fresh schema of the database at
/// `TERN_TEST_PG_URL`. Compiled in only when that variable is set at build time (`build.rs`),
/// so it never passes by skipping.
#[cfg(tern_test_pg)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn evacuation_survives_a_restart_on_postgres() {
    let base = std::env::var("TERN_TEST_PG_URL").expect("TERN_TEST_PG_URL was set at build time");
    sqlx::any::install_default_drivers();
    let admin = sqlx::AnyPool::connect(&base).await.unwrap();
    let schema = format!("tern_api_{:016x}", rand::random::<u64>());
    sqlx::query(&format!("CREATE SCHEMA {schema}"))
        .execute(&admin)
        .await
        .unwrap();
    let sep = if base.contains('?') { '&' } else { '?' };
    let url = format!("{base}{sep}options=-c%20search_path%3D{schema}");
    let outcome = tokio::spawn(async move {
        let mut h = Harness::start_on(3, 30, Some(url)).await;
        h.agent.state.hold.store(true, Ordering::SeqCst);
        h.heartbeat("h1", 0, &[("a", 512), ("b", 256)]).await;
        h.heartbeat("h2", 4096, &[]).await;
        h.heartbeat("h3", 4096, &[]).await;
        let (s, v) = h
            .post("/v1/hosts/h1/evacuate", json!({"deadline": "10m"}))
            .await;
        assert_eq!(s, 200, "{v}");
        let id = v["id"].as_str().unwrap().to_string();
        wait_for("first running", T, || async {
            let (_, v) = h.get(&format!("/v1/evacuations/{id}")).await;
            (v["migrations"][0]["state"] == "running").then_some(())
        })
        .await;
        h.restart().await;
        h.agent.state.hold.store(false, Ordering::SeqCst);
        wait_for("evacuation completed", T, || async {
            let (_, v) = h.get(&format!("/v1/evacuations/{id}")).await;
            (v["evacuation"]["state"] == "completed").then_some(())
        })
        .await;
        let vms: Vec<String> = h.agent.starts().into_iter().map(|m| m.vm).collect();
        assert_eq!(vms, ["a", "b"], "each VM started exactly once");
        let (s, page) = h.get("/v1/hosts?limit=2").await;
        assert_eq!(s, 200);
        assert!(page["next_page"].is_string());
        h.stop().await;
    })
    .await;
    sqlx::query(&format!("DROP SCHEMA {schema} CASCADE"))
        .execute(&admin)
        .await
        .unwrap();
    admin.close().await;
    if let Err(e) = outcome {
        std::panic::resume_unwind(e.into_panic());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deadline_at_risk_is_announced_early() {
    let h = Harness::start(2, 30).await;
    h.agent.state.hold.store(true, Ordering::SeqCst);
    h.heartbeat("h1", 0, &[("a", 2048)]).await;
    h.heartbeat("h2", 4096, &[]).await;
    let mut sse = h
        .http
        .get(format!("{}/v1/events", h.url))
        .bearer_auth(&h.token)
        .send()
        .await
        .unwrap();
    let (s, v) = h
        .post("/v1/hosts/h1/evacuate", json!({"deadline": "5s"}))
        .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["plan"]["fits_deadline"], false, "{v}");
    let mut text = String::new();
    tokio::time::timeout(T, async {
        while !text.contains("deadline at risk") || !text.contains("suggestions: ") {
            match sse.chunk().await.unwrap() {
                Some(c) => text.push_str(&String::from_utf8_lossy(&c)),
                None => break,
            }
        }
    })
    .await
    .expect("a deadline-at-risk event");
    assert!(text.contains("event: evacuation"), "{text}");
    // The planner's suggestions come with the warning.
    assert!(text.contains("suggestions: "), "{text}");
    assert_eq!(v["plan"]["deadline_verdict"], "at-risk", "{v}");
    assert!(
        !v["plan"]["suggestions"].as_array().unwrap().is_empty(),
        "{v}"
    );
    let id = v["id"].as_str().unwrap();
    assert_eq!(
        h.post(&format!("/v1/evacuations/{id}/cancel"), json!({}))
            .await
            .0,
        200
    );
}
