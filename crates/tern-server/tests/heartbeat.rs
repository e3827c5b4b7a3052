//! The agent's side of the heartbeat against the real controller: the JSON the agent builds
//! is what `POST /v1/agents/heartbeat` accepts, and the agent's sender delivers it.

mod common;

use std::collections::BTreeMap;

use common::Harness;
use serde_json::json;
use tern_agent::daemon::heartbeat::{
    Heartbeat, HeartbeatError, HeartbeatSender, LinkState, heartbeat_body,
};
use tern_agent::{ControllerConfig, VmRole};

/// Host facts as the agent's `GET /v1/host` reports them.
fn agent_facts(host: &str) -> tern_agent::api::HostFacts {
    serde_json::from_value(json!({
        "host": host, "migration_address": "198.18.0.1", "netns": null,
        "memory_mib": 8192, "committed_memory_mib": 1536, "free_memory_mib": 6656,
        "machine_available_mib": 16000, "qemu_version": "10.0.2",
        "qemu_path": "/usr/bin/qemu-system-x86_64",
        "migration_capabilities": ["postcopy-ram", "multifd"], "qemu_commands": [],
        "accelerator": "tcg", "kvm_device": false,
        "migration": { "permit_post_copy": true, "max_outbound": 3, "max_inbound": 2,
            "bandwidth_mib_per_s": 0, "port_min": 49152, "port_max": 49215,
            "postcopy_recovery_window_s": 600 },
        "outbound_migrations": 0, "inbound_migrations": 0
    }))
    .unwrap()
}

fn agent_body(host: &str) -> Heartbeat {
    let spec = |name: &str, mib: u64, sla: &str, pc: &str| {
        serde_json::from_value(json!({
            "name": name, "memory_mib": mib, "vcpus": 1, "kernel": "/k", "initrd": "/i",
            "cmdline": "", "accelerator": "tcg",
            "migration": { "sla_class": sla, "post_copy": pc },
        }))
        .unwrap()
    };
    let vms = vec![
        (spec("web", 1024, "gold", "allowed"), VmRole::Running),
        (spec("db", 512, "bronze", "forbidden"), VmRole::Running),
        (spec("arriving", 256, "silver", "allowed"), VmRole::Incoming),
    ];
    heartbeat_body(
        &agent_facts(host),
        &vms,
        &BTreeMap::from([("web".to_string(), 2_000_000)]),
    )
}

/// Every field of the agent's type lands in the same field of the controller's, with
/// `Some`/`None` and both booleans; `deny_unknown_fields` on the controller's side makes an
/// extra or renamed field fail here.
#[test]
fn the_agents_heartbeat_json_is_the_controllers_heartbeat() {
    let mut ours = agent_body("h1");
    ours.facts.link_bytes_per_s = Some(125_000_000);
    let theirs: tern_server::model::Heartbeat =
        serde_json::from_value(serde_json::to_value(&ours).unwrap()).unwrap();
    assert_eq!(theirs.host, "h1");
    let f = &theirs.facts;
    assert_eq!((f.memory_mib, f.free_memory_mib), (8192, 6656));
    assert_eq!(f.qemu_version, "10.0.2");
    let mut caps = f.migration_capabilities.clone();
    caps.sort();
    assert_eq!(caps, ["multifd", "postcopy-ram"]);
    assert!(f.permit_post_copy);
    assert_eq!(f.link_bytes_per_s, Some(125_000_000));
    assert_eq!((f.max_outbound, f.max_inbound), (3, 2));
    assert_eq!((f.outbound_migrations, f.inbound_migrations), (0, 0));
    let vms: Vec<_> = theirs
        .vms
        .iter()
        .map(|v| {
            (
                v.name.as_str(),
                v.memory_mib,
                v.sla_class.as_str(),
                v.post_copy_allowed,
                v.dirty_bytes_per_s,
            )
        })
        .collect();
    assert_eq!(
        vms,
        [
            ("web", 1024, "gold", true, Some(2_000_000)),
            ("db", 512, "bronze", false, None),
        ]
    );

    // And back: the controller's JSON (its OpenAPI examples, its tests) reads as the agent's.
    let back: Heartbeat = serde_json::from_value(serde_json::to_value(&theirs).unwrap()).unwrap();
    assert_eq!(back, ours);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_controller_on_loopback_receives_the_agents_heartbeats() {
    let h = Harness::start(2, 30).await;
    let config = ControllerConfig {
        url: h.url.clone(),
        token_file: Some(h.config.token_file.clone()),
        interval_s: 5,
    };
    let mut sender = HeartbeatSender::from_config(&config, None).unwrap();
    assert_eq!(sender.tick(&agent_body("h1")).await, LinkState::Up);

    let (status, host) = h.get("/v1/hosts/h1").await;
    assert_eq!(status, 200, "{host}");
    assert_eq!(host["facts"]["memory_mib"], 8192);
    assert_eq!(host["facts"]["max_outbound"], 3);
    let (status, vms) = h.get("/v1/vms?host=h1").await;
    assert_eq!(status, 200, "{vms}");
    let mut names: Vec<&str> = vms
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["name"].as_str().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, ["db", "web"], "the incoming half is not reported");

    // A host the controller does not know is refused, and the sender says so (no panic).
    assert_eq!(sender.tick(&agent_body("h9")).await, LinkState::Down);
    assert!(matches!(
        sender.send(&agent_body("h9")).await,
        Err(HeartbeatError::Refused { .. })
    ));
    // It recovers on the next good tick.
    assert_eq!(sender.tick(&agent_body("h1")).await, LinkState::Up);

    // A wrong token is refused with 401.
    let wrong = HeartbeatSender::new(&h.url, "not-the-token".into()).unwrap();
    match wrong.send(&agent_body("h1")).await {
        Err(HeartbeatError::Refused { status, .. }) => {
            assert_eq!(status, 401)
        }
        other => panic!("expected a 401 refusal, got {other:?}"),
    }
}
