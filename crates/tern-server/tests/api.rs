//! The controller's API over real HTTP on 127.0.0.1, with a real SQLite file and a fake agent.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::sync::atomic::Ordering;
use std::time::Duration;

use common::{Harness, heartbeat_body, wait_for};
use serde_json::{Value, json};

const T: Duration = Duration::from_secs(15);

fn mode(p: &std::path::Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_call_needs_the_token_and_mutations_are_audited() {
    let h = Harness::start(2, 30).await;
    let state = h.dir.path().join("state");
    assert_eq!(mode(&state), 0o700);
    assert_eq!(mode(&state.join("controller.db")), 0o600);
    assert_eq!(mode(&state.join("controller.token")), 0o600);
    for f in std::fs::read_dir(&state).unwrap() {
        let f = f.unwrap().path();
        assert_eq!(mode(&f) & 0o077, 0, "{} readable by others", f.display());
    }

    for path in ["/v1/hosts", "/metrics", "/openapi.json", "/v1/nowhere"] {
        let resp = h.http.get(format!("{}{path}", h.url)).send().await.unwrap();
        assert_eq!(resp.status().as_u16(), 401, "{path}");
        let v: Value = resp.json().await.unwrap();
        assert!(
            v["error"]
                .as_str()
                .unwrap()
                .contains("missing Authorization"),
            "{v}"
        );
    }
    let resp = h
        .http
        .get(format!("{}/v1/hosts", h.url))
        .bearer_auth("not-the-token")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 401);
    let v: Value = resp.json().await.unwrap();
    assert!(v["error"].as_str().unwrap().contains("wrong bearer token"));

    assert_eq!(h.heartbeat("h1", 4096, &[]).await.0, 200);
    let (s, _) = h
        .call("PATCH", "/v1/hosts/h1", Some(json!({"max_inbound": 1})))
        .await;
    assert_eq!(s, 200);
    let log = h.controller().store.audit_log(100).await.unwrap();
    let patch = log
        .iter()
        .find(|(_, e)| e.method == "PATCH")
        .expect("PATCH audited");
    assert_eq!(patch.1.path, "/v1/hosts/h1");
    assert!(
        patch.1.actor.starts_with("token@127.0.0.1"),
        "{:?}",
        patch.1
    );
    assert_eq!(patch.1.status, 200);
    assert!(
        log.iter().all(|(_, e)| e.method != "GET"),
        "reads are not audited"
    );

    // The token survives a restart (read back, not re-created).
    let mut h = h;
    let before = h.token.clone();
    h.restart().await;
    assert_eq!(h.token, before);
    assert_eq!(h.get("/v1/hosts").await.0, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_register_and_hosts_list_by_page() {
    let h = Harness::start(5, 30).await;
    for i in [3, 1, 5, 2, 4] {
        let (s, v) = h
            .heartbeat(&format!("h{i}"), 4096, &[(&format!("vm{i}"), 256)])
            .await;
        assert_eq!(s, 200, "{v}");
        assert_eq!(v["state"], "up");
    }
    let mut names = Vec::new();
    let mut path = "/v1/hosts?limit=2".to_string();
    let mut pages = 0;
    loop {
        let (s, v) = h.get(&path).await;
        assert_eq!(s, 200, "{v}");
        pages += 1;
        for host in v["hosts"].as_array().unwrap() {
            names.push(host["name"].as_str().unwrap().to_string());
        }
        match v["next_page"].as_str() {
            Some(t) => path = format!("/v1/hosts?limit=2&after={t}"),
            None => break,
        }
    }
    assert_eq!(names, ["h1", "h2", "h3", "h4", "h5"]);
    assert_eq!(pages, 3);

    let (s, v) = h.get("/v1/hosts?after=garbage!").await;
    assert_eq!(s, 400);
    assert!(v["error"].as_str().unwrap().contains("\"garbage!\""), "{v}");
    let (s, v) = h.get("/v1/hosts?limit=0").await;
    assert_eq!(s, 400);
    assert!(v["error"].as_str().unwrap().contains("limit=0"), "{v}");
    let (s, v) = h.get("/v1/hosts?page=2").await;
    assert_eq!(s, 400);
    assert!(v["error"].as_str().unwrap().contains("page"), "{v}");

    let (s, v) = h.get("/v1/hosts/h2").await;
    assert_eq!(s, 200);
    assert_eq!(v["facts"]["qemu_version"], "10.0.0");
    let (s, v) = h.get("/v1/hosts/h9").await;
    assert_eq!(s, 404);
    assert!(v["error"].as_str().unwrap().contains("\"h9\""), "{v}");
    let (s, v) = h.get("/v1/vms?host=h3").await;
    assert_eq!(s, 200);
    assert_eq!(v[0]["name"], "vm3");

    let (s, v) = h.heartbeat("intruder", 4096, &[]).await;
    assert_eq!(s, 400);
    assert!(v["error"].as_str().unwrap().contains("\"intruder\""), "{v}");
    let mut bad = heartbeat_body("h1", 1, "10.0.0", &[]);
    bad["facts"]["colour"] = json!("blue");
    let (s, v) = h.post("/v1/agents/heartbeat", bad).await;
    assert_eq!(s, 400);
    assert!(v["error"].as_str().unwrap().contains("colour"), "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_that_stops_heartbeating_is_unreachable_and_lists_go_on() {
    let h = Harness::start(2, 1).await;
    h.heartbeat("h1", 4096, &[("a", 256)]).await;
    h.heartbeat("h2", 4096, &[]).await;
    let hosts = wait_for("h1 unreachable", T, || async {
        h.heartbeat("h2", 4096, &[]).await;
        let (_, v) = h.get("/v1/hosts").await;
        (v["hosts"][0]["state"] == "unreachable").then_some(v)
    })
    .await;
    assert_eq!(hosts["hosts"][1]["name"], "h2");
    assert_eq!(hosts["hosts"][1]["state"], "up");
    // Nothing is placed on it, and its VMs cannot move until it answers.
    let (s, v) = h.post("/v1/migrations", json!({"vm": "a"})).await;
    assert_eq!(s, 409, "{v}");
    assert!(v["error"].as_str().unwrap().contains("unreachable"));
    h.heartbeat("h1", 4096, &[("a", 256)]).await;
    assert_eq!(h.get("/v1/hosts/h1").await.1["state"], "up");

    // A migration whose source stops heartbeating is `unknown` until the agent is back.
    h.agent.state.hold.store(true, Ordering::SeqCst);
    let (s, v) = h
        .post("/v1/migrations", json!({"vm": "a", "to": "h2"}))
        .await;
    assert_eq!(s, 200, "{v}");
    let id = v["migration"]["id"].as_str().unwrap().to_string();
    wait_for("running", T, || async {
        h.heartbeat("h1", 4096, &[("a", 256)]).await;
        let (_, v) = h.get(&format!("/v1/migrations/{id}")).await;
        (v["migration"]["state"] == "running").then_some(())
    })
    .await;
    wait_for("unknown shown and recorded", T, || async {
        h.heartbeat("h2", 4096, &[]).await;
        let (_, list) = h.get("/v1/migrations").await;
        let (_, v) = h.get(&format!("/v1/migrations/{id}")).await;
        let recorded = v["events"].to_string().contains("unknown: the source host");
        (list[0]["state"] == "unknown" && recorded).then_some(())
    })
    .await;
    h.agent.state.hold.store(false, Ordering::SeqCst);
    let v = wait_for("completed once h1 is back", T, || async {
        h.heartbeat("h1", 4096, &[]).await;
        let (_, v) = h.get(&format!("/v1/migrations/{id}")).await;
        (v["migration"]["state"] == "completed").then_some(v)
    })
    .await;
    let text = v["events"].to_string();
    let unknown = text
        .find("unknown: the source host")
        .expect("unknown recorded");
    let completed = text.find("completed on h2").expect("completion recorded");
    assert!(unknown < completed, "{text}");
    assert_eq!(h.agent.starts().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_settings_are_applied_and_bad_ones_named() {
    let h = Harness::start(2, 30).await;
    h.heartbeat("h1", 4096, &[]).await;
    let (s, v) = h
        .call(
            "PATCH",
            "/v1/hosts/h1",
            Some(json!({"post_copy": "deny", "max_outbound": 1, "max_inbound": 3, "drain": true})),
        )
        .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["state"], "draining");
    assert_eq!(v["post_copy"], "deny");
    assert_eq!(v["max_outbound"], 1);
    assert_eq!(h.get("/v1/hosts/h1").await.1["max_inbound"], 3);
    let (s, v) = h
        .call("PATCH", "/v1/hosts/h1", Some(json!({"drain": false})))
        .await;
    assert_eq!((s, v["state"].as_str()), (200, Some("up")));
    let (s, v) = h
        .call("PATCH", "/v1/hosts/h1", Some(json!({"max_outbound": 0})))
        .await;
    assert_eq!(s, 400);
    assert!(
        v["error"].as_str().unwrap().contains("max_outbound = 0"),
        "{v}"
    );
    let (s, v) = h
        .call("PATCH", "/v1/hosts/h1", Some(json!({"post_copy": "maybe"})))
        .await;
    assert_eq!(s, 400);
    assert!(v["error"].as_str().unwrap().contains("maybe"), "{v}");
    let (s, v) = h
        .call("PATCH", "/v1/hosts/h1", Some(json!({"speed": 1})))
        .await;
    assert_eq!(s, 400);
    assert!(v["error"].as_str().unwrap().contains("speed"), "{v}");
    assert_eq!(
        h.call("PATCH", "/v1/hosts/h7", Some(json!({}))).await.0,
        404
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_without_destination_lets_the_controller_choose_and_say_why() {
    let h = Harness::start(3, 30).await;
    h.heartbeat("h1", 1024, &[("a", 512)]).await;
    h.heartbeat("h2", 256, &[]).await;
    h.heartbeat("h3", 4096, &[]).await;
    let (s, v) = h
        .post(
            "/v1/migrations",
            json!({"vm": "a", "context": "maintenance"}),
        )
        .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["migration"]["destination"], "h3");
    let reason = v["reason"].as_str().unwrap();
    assert!(
        reason.contains("h3: 4096 MiB free (VM needs 512)"),
        "{reason}"
    );
    let id = v["migration"]["id"].as_str().unwrap().to_string();
    let done = wait_for("completed", T, || async {
        let (_, v) = h.get(&format!("/v1/migrations/{id}")).await;
        (v["migration"]["state"] == "completed").then_some(v)
    })
    .await;
    let kinds: Vec<&str> = done["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["kind"].as_str().unwrap())
        .collect();
    assert_eq!(kinds.first(), Some(&"state"));
    assert!(kinds.contains(&"attempt"), "{kinds:?}");
    let starts = h.agent.starts();
    assert_eq!(starts.len(), 1, "started exactly once");
    assert_eq!(starts[0].destination, "h3");
    assert_eq!(starts[0].key.as_deref(), Some(format!("{id}-a1").as_str()));
    let (_, list) = h.get("/v1/migrations").await;
    assert_eq!(list[0]["id"], id.as_str());

    let (s, v) = h.post("/v1/migrations", json!({"vm": "ghost"})).await;
    assert_eq!(s, 404);
    assert!(v["error"].as_str().unwrap().contains("\"ghost\""));
    let (s, v) = h
        .post("/v1/migrations", json!({"vm": "a", "to": "h9"}))
        .await;
    assert_eq!(s, 404, "{v}");
    let (s, v) = h
        .post("/v1/migrations", json!({"vm": "a", "to": "h2"}))
        .await;
    assert_eq!(s, 422, "{v}");
    assert!(v["error"].as_str().unwrap().contains("256 MiB free"), "{v}");
    let (s, v) = h
        .post("/v1/migrations", json!({"vm": "a", "context": "urgent"}))
        .await;
    assert_eq!(s, 400);
    assert!(v["error"].as_str().unwrap().contains("urgent"), "{v}");

    let (_, metrics) = h.get("/metrics").await;
    let metrics = metrics.as_str().unwrap().to_string();
    assert!(
        metrics.contains("tern_controller_migration_attempts_total 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("tern_controller_migrations{phase=\"completed\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("tern_controller_migration_duration_seconds_count 1"),
        "{metrics}"
    );
}

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
    assert_eq!(steps[0]["vm"], "b", "largest first");
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
    let (s, v) = h
        .post("/v1/hosts/h1/evacuate", json!({"deadline": "10m"}))
        .await;
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
    let vms: Vec<&str> = starts.iter().map(|m| m.vm.as_str()).collect();
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
    h.heartbeat("h3", 2048, &[]).await;
    let (s, v) = h
        .post("/v1/hosts/h1/evacuate", json!({"deadline": "10m"}))
        .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["plan"]["migrations"][1]["destination"], "h2");
    let id = v["id"].as_str().unwrap().to_string();
    wait_for("first running", T, || async {
        let (_, v) = h.get(&format!("/v1/evacuations/{id}")).await;
        (v["migrations"][0]["state"] == "running").then_some(())
    })
    .await;
    let (s, _) = h
        .call("PATCH", "/v1/hosts/h2", Some(json!({"drain": true})))
        .await;
    assert_eq!(s, 200);
    h.agent.state.hold.store(false, Ordering::SeqCst);
    let done = wait_for("evacuation completed", T, || async {
        let (_, v) = h.get(&format!("/v1/evacuations/{id}")).await;
        (v["evacuation"]["state"] == "completed").then_some(v)
    })
    .await;
    let b = &done["migrations"][1];
    assert_eq!(b["vm"], "b");
    assert_eq!(b["destination"], "h3");
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
    assert!(d.contains("h2 draining") && d.contains("now h3"), "{d}");
    assert_eq!(h.agent.starts()[1].destination, "h3");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn evacuations_pause_resume_and_cancel() {
    let h = Harness::start(2, 30).await;
    h.agent.state.hold.store(true, Ordering::SeqCst);
    h.heartbeat("h1", 0, &[("a", 512), ("b", 256)]).await;
    h.heartbeat("h2", 4096, &[]).await;
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openapi_describes_the_routes_and_unknown_routes_are_json_404() {
    let h = Harness::start(1, 30).await;
    let (s, doc) = h.get("/openapi.json").await;
    assert_eq!(s, 200);
    for p in [
        "/v1/agents/heartbeat",
        "/v1/hosts",
        "/v1/hosts/{name}",
        "/v1/hosts/{name}/evacuate",
        "/v1/migrations",
        "/v1/migrations/{id}",
        "/v1/evacuations/{id}/cancel",
        "/v1/events",
    ] {
        assert!(doc["paths"][p].is_object(), "{p} missing");
    }
    assert!(doc["paths"]["/v1/hosts/{name}"]["patch"].is_object());
    for schema in [
        "HostRecord",
        "Heartbeat",
        "EvacuationPlan",
        "MigrationRecord",
        "ErrorBody",
    ] {
        assert!(
            doc["components"]["schemas"][schema].is_object(),
            "{schema} missing"
        );
    }
    assert!(doc["components"]["securitySchemes"]["bearer"].is_object());
    let (s, v) = h.get("/v2/hosts").await;
    assert_eq!(s, 404);
    assert!(v["error"].as_str().unwrap().contains("/openapi.json"));
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
        while !text.contains("deadline at risk") {
            match sse.chunk().await.unwrap() {
                Some(c) => text.push_str(&String::from_utf8_lossy(&c)),
                None => break,
            }
        }
    })
    .await
    .expect("a deadline-at-risk event");
    assert!(text.contains("event: evacuation"), "{text}");
    let id = v["id"].as_str().unwrap();
    assert_eq!(
        h.post(&format!("/v1/evacuations/{id}/cancel"), json!({}))
            .await
            .0,
        200
    );
}
