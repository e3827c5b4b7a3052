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
    assert!(
        log.iter().all(|(_, e)| !e.path.contains("heartbeat")),
        "accepted heartbeats are reports, not audited actions"
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
        "/v1/migrations/{id}/abort",
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
