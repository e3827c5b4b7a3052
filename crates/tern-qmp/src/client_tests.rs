//! Client tests against an in-process fake QMP server over a `UnixStream` pair.

use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::broadcast::error::RecvError;

use crate::*;

const GREETING: &str = r#"{"QMP": {"version": {"qemu": {"micro": 2, "minor": 0, "major": 10}, "package": "Debian 1:10.0.2+ds-2"}, "capabilities": ["oob"]}}"#;

/// The server side of the pair, speaking QMP line by line.
struct FakeQemu {
    reader: BufReader<OwnedReadHalf>,
    writer: OwnedWriteHalf,
}

impl FakeQemu {
    fn new(stream: UnixStream) -> Self {
        let (r, w) = stream.into_split();
        FakeQemu {
            reader: BufReader::new(r),
            writer: w,
        }
    }

    async fn send_line(&mut self, line: &str) {
        self.writer.write_all(line.as_bytes()).await.unwrap();
        self.writer.write_all(b"\n").await.unwrap();
    }

    async fn send(&mut self, value: Value) {
        self.send_line(&value.to_string()).await;
    }

    /// Reads the next command; returns (name, arguments or null, id).
    async fn recv_command(&mut self) -> (String, Value, Value) {
        let mut line = String::new();
        let n = tokio::time::timeout(Duration::from_secs(5), self.reader.read_line(&mut line))
            .await
            .expect("client sent nothing within 5 s")
            .unwrap();
        assert!(n > 0, "client closed the connection");
        let v: Value = serde_json::from_str(&line).unwrap();
        (
            v.get("execute")
                .or_else(|| v.get("exec-oob"))
                .and_then(Value::as_str)
                .expect("a command")
                .to_owned(),
            v.get("arguments").cloned().unwrap_or(Value::Null),
            v["id"].clone(),
        )
    }

    /// Reads the next line as JSON, whatever it is.
    async fn recv_raw(&mut self) -> Value {
        let mut line = String::new();
        tokio::time::timeout(Duration::from_secs(5), self.reader.read_line(&mut line))
            .await
            .expect("client sent nothing within 5 s")
            .unwrap();
        serde_json::from_str(&line).unwrap()
    }

    async fn expect(&mut self, command: &str) -> (Value, Value) {
        let (name, args, id) = self.recv_command().await;
        assert_eq!(name, command);
        (args, id)
    }

    async fn reply(&mut self, id: &Value, ret: Value) {
        self.send(json!({"return": ret, "id": id})).await;
    }

    async fn event(&mut self, name: &str, data: Value) {
        self.send(json!({"timestamp": {"seconds": 1700000000, "microseconds": 5}, "event": name, "data": data}))
            .await;
    }
}

async fn connected() -> (QmpClient, QmpEvents, FakeQemu) {
    let (client_side, server_side) = UnixStream::pair().unwrap();
    let server = tokio::spawn(async move {
        let mut fake = FakeQemu::new(server_side);
        fake.send_line(GREETING).await;
        let (args, id) = fake.expect("qmp_capabilities").await;
        assert_eq!(args, json!({"enable": ["oob"]}), "oob, offered, is enabled");
        fake.reply(&id, json!({})).await;
        fake
    });
    let (client, events) = QmpClient::from_stream(client_side).await.unwrap();
    (client, events, server.await.unwrap())
}

/// Runs `client_call` while the fake server answers with `serve`.
macro_rules! with_server {
    ($fake:ident, $serve:block, $call:expr) => {{
        let server = tokio::spawn(async move {
            $serve;
            $fake
        });
        let result = $call;
        let fake = server.await.unwrap();
        (result, fake)
    }};
}

#[tokio::test]
async fn handshake_keeps_greeting_version() {
    let (client, _events, _fake) = connected().await;
    let v = client.qemu_version();
    assert_eq!((v.major, v.minor, v.micro), (10, 0, 2));
    assert_eq!(v.package, "Debian 1:10.0.2+ds-2");
    assert_eq!(client.greeting().capabilities, vec!["oob".to_string()]);
    assert!(!client.is_closed());
}

#[tokio::test]
async fn first_line_must_be_a_greeting() {
    let (client_side, server_side) = UnixStream::pair().unwrap();
    let mut fake = FakeQemu::new(server_side);
    fake.send_line(r#"{"return": {}}"#).await;
    let err = QmpClient::from_stream(client_side).await.unwrap_err();
    assert!(
        matches!(err, QmpError::Protocol(ref m) if m.contains("greeting")),
        "{err}"
    );
}

#[tokio::test]
async fn typed_reply_tolerates_extra_fields_and_unknown_values() {
    let (client, _events, mut fake) = connected().await;
    let (status, _fake) = with_server!(
        fake,
        {
            let (_, id) = fake.expect("query-status").await;
            fake.reply(
                &id,
                json!({"status": "hibernating-in-space", "running": false, "singlestep": false}),
            )
            .await;
        },
        client.query_status().await.unwrap()
    );
    assert!(!status.running);
    assert_eq!(
        status.status,
        RunState::Unknown("hibernating-in-space".into())
    );
}

#[tokio::test]
async fn concurrent_commands_are_demultiplexed_by_id_with_events_between() {
    let (client, mut events, mut fake) = connected().await;
    let server = tokio::spawn(async move {
        let mut ids = std::collections::HashMap::new();
        for _ in 0..2 {
            let (name, _, id) = fake.recv_command().await;
            ids.insert(name, id);
        }
        // Reply in the opposite order of any plausible send order, with an event between.
        fake.reply(
            &ids["query-migrate"],
            json!({"status": "active", "total-time": 42}),
        )
        .await;
        fake.event("MIGRATION_PASS", json!({"pass": 3})).await;
        fake.reply(
            &ids["query-status"],
            json!({"status": "running", "running": true}),
        )
        .await;
        fake
    });
    let c1 = client.clone();
    let c2 = client.clone();
    let (status, info) = tokio::join!(
        tokio::spawn(async move { c1.query_status().await }),
        tokio::spawn(async move { c2.query_migrate().await }),
    );
    let status = status.unwrap().unwrap();
    let info = info.unwrap().unwrap();
    server.await.unwrap();
    assert_eq!(status.status, RunState::Running);
    assert_eq!(info.status, Some(MigrationStatus::Active));
    assert_eq!(info.total_time, Some(42));
    let event = events.recv().await.unwrap();
    assert_eq!(event.kind, QmpEventKind::MigrationPass { pass: 3 });
    assert_eq!(event.timestamp.seconds, 1700000000);
}

#[tokio::test]
async fn error_reply_carries_command_class_and_desc() {
    let (client, _events, mut fake) = connected().await;
    let (err, _fake) = with_server!(
        fake,
        {
            let (args, id) = fake.expect("migrate").await;
            assert_eq!(args, json!({"uri": "tcp:10.0.0.2:4444"}));
            fake.send(
                json!({"id": id, "error": {"class": "GenericError", "desc": "Failed to connect"}}),
            )
            .await;
        },
        client.migrate("tcp:10.0.0.2:4444").await.unwrap_err()
    );
    match &err {
        QmpError::Command {
            command,
            class,
            desc,
        } => {
            assert_eq!(command, "migrate");
            assert_eq!(class, "GenericError");
            assert_eq!(desc, "Failed to connect");
        }
        other => panic!("expected Command error, got {other:?}"),
    }
    assert_eq!(err.command_class(), Some("GenericError"));
    assert!(!err.is_closed());
}

#[tokio::test]
async fn supported_capabilities_include_unknown_ones() {
    let (client, _events, mut fake) = connected().await;
    let (caps, _fake) = with_server!(
        fake,
        {
            let (_, id) = fake.expect("query-migrate-capabilities").await;
            fake.reply(
                &id,
                json!([
                    {"state": false, "capability": "xbzrle"},
                    {"state": true, "capability": "postcopy-ram"},
                    {"state": false, "capability": "quantum-teleport"}
                ]),
            )
            .await;
        },
        client.supported_capabilities().await.unwrap()
    );
    assert!(caps.contains(&MigrationCapability::Xbzrle));
    assert!(caps.contains(&MigrationCapability::PostcopyRam));
    assert!(caps.contains(&MigrationCapability::Unknown("quantum-teleport".into())));
    assert!(!caps.contains(&MigrationCapability::Multifd));
    assert_eq!(caps.len(), 3);
}

#[tokio::test]
async fn vfio_devices_are_found_under_both_peripheral_containers() {
    let (client, _events, mut fake) = connected().await;
    let (devs, _fake) = with_server!(
        fake,
        {
            let (args, id) = fake.expect("qom-list").await;
            assert_eq!(args["path"], "/machine/peripheral");
            fake.reply(
                &id,
                json!([
                    {"name": "type", "type": "string"},
                    {"name": "net0", "type": "child<virtio-net-pci>"},
                    {"name": "gpu0", "type": "child<vfio-pci>"}
                ]),
            )
            .await;
            let (args, id) = fake.expect("qom-list").await;
            assert_eq!(args["path"], "/machine/peripheral-anon");
            fake.reply(
                &id,
                json!([
                    {"name": "device[0]", "type": "child<vfio-ap>"},
                    {"name": "device[1]", "type": "child<isa-serial>"},
                    {"name": "device[2]", "type": "link<vfio-pci>"}
                ]),
            )
            .await;
        },
        client.vfio_devices().await.unwrap()
    );
    assert_eq!(
        devs,
        vec![
            "/machine/peripheral/gpu0 (child<vfio-pci>)".to_string(),
            "/machine/peripheral-anon/device[0] (child<vfio-ap>)".to_string(),
        ]
    );
}

#[tokio::test]
async fn missing_optional_fields_and_empty_query_migrate() {
    let (client, _events, mut fake) = connected().await;
    let (info, _fake) = with_server!(
        fake,
        {
            let (_, id) = fake.expect("query-migrate").await;
            fake.reply(&id, json!({})).await;
        },
        client.query_migrate().await.unwrap()
    );
    assert_eq!(info, MigrationInfo::default());
    assert_eq!(info.status_or_none(), MigrationStatus::None);
}

#[tokio::test]
async fn undecodable_reply_reports_the_json() {
    let (client, _events, mut fake) = connected().await;
    let (err, _fake) = with_server!(
        fake,
        {
            let (_, id) = fake.expect("query-status").await;
            fake.reply(&id, json!({"running": "perhaps", "status": "running"}))
                .await;
        },
        client.query_status().await.unwrap_err()
    );
    match &err {
        QmpError::Decode { what, json, .. } => {
            assert!(what.contains("query-status"), "{what}");
            assert!(json.contains("perhaps"), "{json}");
        }
        other => panic!("expected Decode, got {other:?}"),
    }
}

#[tokio::test]
async fn wire_format_of_argument_commands() {
    let (client, _events, mut fake) = connected().await;
    let params = MigrationParameters {
        max_bandwidth: Some(1 << 30),
        downtime_limit: Some(250),
        ..Default::default()
    };
    let (result, _fake) = with_server!(
        fake,
        {
            let (args, id) = fake.expect("migrate-set-capabilities").await;
            assert_eq!(
                args,
                json!({"capabilities": [
                    {"capability": "postcopy-ram", "state": true},
                    {"capability": "some-new-cap", "state": false}
                ]})
            );
            fake.reply(&id, json!({})).await;
            let (args, id) = fake.expect("migrate-set-parameters").await;
            assert_eq!(
                args,
                json!({"max-bandwidth": 1u64 << 30, "downtime-limit": 250})
            );
            fake.reply(&id, json!({})).await;
            let (args, id) = fake.expect("migrate").await;
            assert_eq!(args, json!({"uri": "tcp:h:1", "resume": true}));
            fake.reply(&id, json!({})).await;
            let (args, id) = fake.expect("migrate-recover").await;
            assert_eq!(args, json!({"uri": "tcp:0:2"}));
            fake.reply(&id, json!({})).await;
            let (args, id) = fake.expect("migrate-incoming").await;
            assert_eq!(args, json!({"uri": "tcp:0:3"}));
            fake.reply(&id, json!({})).await;
            let (args, id) = fake.expect("calc-dirty-rate").await;
            assert_eq!(args, json!({"calc-time": 1, "mode": "page-sampling"}));
            fake.reply(&id, json!({})).await;
            let (args, id) = fake.expect("migrate_cancel").await;
            assert_eq!(args, Value::Null);
            fake.reply(&id, json!({})).await;
        },
        async {
            client
                .migrate_set_capabilities(&[
                    MigrationCapabilityStatus::new(MigrationCapability::PostcopyRam, true),
                    MigrationCapabilityStatus::new("some-new-cap".into(), false),
                ])
                .await?;
            client.migrate_set_parameters(&params).await?;
            client.migrate_resume("tcp:h:1").await?;
            client.migrate_recover("tcp:0:2").await?;
            client.migrate_incoming("tcp:0:3").await?;
            client
                .calc_dirty_rate(&CalcDirtyRateArgs {
                    mode: Some(DirtyRateMeasureMode::PageSampling),
                    ..CalcDirtyRateArgs::seconds(1)
                })
                .await?;
            client.migrate_cancel().await
        }
        .await
    );
    result.unwrap();
}

#[tokio::test]
async fn closed_connection_fails_pending_and_later_commands_and_ends_events() {
    let (client, mut events, mut fake) = connected().await;
    let server = tokio::spawn(async move {
        let _ = fake.expect("query-migrate").await;
        drop(fake); // QEMU dies without replying
    });
    let err = client.query_migrate().await.unwrap_err();
    server.await.unwrap();
    assert!(err.is_closed(), "{err:?}");
    assert!(client.is_closed());
    let err = client.query_status().await.unwrap_err();
    assert!(err.is_closed(), "{err:?}");
    assert!(matches!(events.recv().await, Err(RecvError::Closed)));
    assert!(matches!(
        client.subscribe_events().recv().await,
        Err(RecvError::Closed)
    ));
    // quit on a dead QEMU is not an error: it is already gone.
    client.quit().await.unwrap();
}

#[tokio::test]
async fn reply_without_id_goes_to_oldest_pending_command() {
    let (client, _events, mut fake) = connected().await;
    let (status, _fake) = with_server!(
        fake,
        {
            let _ = fake.expect("query-status").await;
            fake.send(json!({"return": {"status": "paused", "running": false}}))
                .await;
        },
        client.query_status().await.unwrap()
    );
    assert_eq!(status.status, RunState::Paused);
}

#[tokio::test]
async fn cancelled_call_does_not_disturb_later_ones() {
    let (client, _events, mut fake) = connected().await;
    let timed_out = tokio::time::timeout(Duration::from_millis(50), client.query_migrate()).await;
    assert!(timed_out.is_err());
    let (status, _fake) = with_server!(
        fake,
        {
            let (_, late_id) = fake.expect("query-migrate").await;
            let (_, id) = fake.expect("query-status").await;
            // The late reply to the abandoned call must be discarded, not misrouted.
            fake.reply(&late_id, json!({"status": "failed"})).await;
            fake.reply(&id, json!({"status": "running", "running": true}))
                .await;
        },
        client.query_status().await.unwrap()
    );
    assert_eq!(status.status, RunState::Running);
}

#[tokio::test]
async fn wait_for_status_wakes_on_event() {
    let (client, _events, mut fake) = connected().await;
    let (status, _fake) = with_server!(
        fake,
        {
            let (_, id) = fake.expect("query-migrate").await;
            fake.reply(&id, json!({"status": "active"})).await;
            fake.event("MIGRATION", json!({"status": "device"})).await;
            fake.event("MIGRATION", json!({"status": "completed"}))
                .await;
        },
        client
            .wait_for_migration_status_polling(
                |s| s.is_terminal(),
                Duration::from_secs(5),
                Duration::from_secs(3600),
            )
            .await
            .unwrap()
    );
    assert_eq!(status, MigrationStatus::Completed);
}

#[tokio::test]
async fn wait_for_status_polls_without_events_and_times_out_with_last_status() {
    let (client, _events, mut fake) = connected().await;
    let (status, mut fake) = with_server!(
        fake,
        {
            for status in ["setup", "active", "postcopy-active"] {
                let (_, id) = fake.expect("query-migrate").await;
                fake.reply(&id, json!({"status": status})).await;
            }
        },
        client
            .wait_for_migration_status_polling(
                MigrationStatus::is_postcopy,
                Duration::from_secs(5),
                Duration::from_millis(5),
            )
            .await
            .unwrap()
    );
    assert_eq!(status, MigrationStatus::PostcopyActive);

    let server = tokio::spawn(async move {
        loop {
            let (_, id) = fake.expect("query-migrate").await;
            fake.reply(&id, json!({"status": "active"})).await;
        }
    });
    let err = client
        .wait_for_migration_status_polling(
            |s| *s == MigrationStatus::Completed,
            Duration::from_millis(60),
            Duration::from_millis(10),
        )
        .await
        .unwrap_err();
    server.abort();
    assert!(
        matches!(
            err,
            QmpError::WaitTimeout {
                last_status: MigrationStatus::Active,
                ..
            }
        ),
        "{err:?}"
    );
}

#[tokio::test]
async fn connect_with_retry_times_out_on_missing_socket() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("absent.sock");
    let err = QmpClient::connect_with_retry(&path, Duration::from_millis(50))
        .await
        .unwrap_err();
    assert!(
        matches!(err, QmpError::ConnectTimeout { ref path, .. } if path.ends_with("absent.sock")),
        "{err:?}"
    );
}

#[tokio::test]
async fn connect_with_retry_waits_for_socket_to_appear() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("late.sock");
    let listen_path = path.clone();
    let server = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(80)).await;
        let listener = tokio::net::UnixListener::bind(&listen_path).unwrap();
        let (stream, _) = listener.accept().await.unwrap();
        let mut fake = FakeQemu::new(stream);
        fake.send_line(GREETING).await;
        let (_, id) = fake.expect("qmp_capabilities").await;
        fake.reply(&id, json!({})).await;
        let (_, id) = fake.expect("quit").await;
        fake.event(
            "SHUTDOWN",
            json!({"guest": false, "reason": "host-qmp-quit"}),
        )
        .await;
        fake.reply(&id, json!({})).await;
    });
    let (client, mut events) = QmpClient::connect_with_retry(&path, Duration::from_secs(5))
        .await
        .unwrap();
    client.quit().await.unwrap();
    server.await.unwrap();
    let event = events.recv().await.unwrap();
    assert_eq!(
        event.kind,
        QmpEventKind::Shutdown {
            guest: Some(false),
            reason: Some(ShutdownCause::HostQmpQuit)
        }
    );
}

#[tokio::test]
async fn garbage_line_is_skipped_without_closing_the_connection() {
    let (client, _events, mut fake) = connected().await;
    let (status, _fake) = with_server!(
        fake,
        {
            let (_, id) = fake.expect("query-status").await;
            fake.writer.write_all(b"\xff\xfe not json\n").await.unwrap();
            fake.reply(&id, json!({"status": "running", "running": true}))
                .await;
        },
        client.query_status().await.unwrap()
    );
    assert_eq!(status.status, RunState::Running);
    assert!(!client.is_closed());
}

#[tokio::test]
async fn recovery_commands_go_out_of_band_when_negotiated() {
    let (client, _events, mut fake) = connected().await;
    assert!(client.oob_enabled());
    let (result, _fake) = with_server!(
        fake,
        {
            for name in ["migrate-pause", "migrate-recover", "query-migrate"] {
                let v = fake.recv_raw().await;
                let verb = if name == "query-migrate" {
                    "execute"
                } else {
                    "exec-oob"
                };
                assert_eq!(v[verb], name, "{v}");
                let ret = if name == "query-migrate" {
                    json!({"status": "postcopy-recover"})
                } else {
                    json!({})
                };
                fake.reply(&v["id"], ret).await;
            }
        },
        async {
            client.migrate_pause().await?;
            client.migrate_recover("tcp:0:2").await?;
            client.query_migrate().await
        }
        .await
    );
    result.unwrap();
}

#[tokio::test]
async fn without_oob_offered_everything_is_in_band() {
    let (client_side, server_side) = UnixStream::pair().unwrap();
    let server = tokio::spawn(async move {
        let mut fake = FakeQemu::new(server_side);
        fake.send_line(&GREETING.replace(r#""oob""#, "")).await;
        let (args, id) = fake.expect("qmp_capabilities").await;
        assert_eq!(args, Value::Null);
        fake.reply(&id, json!({})).await;
        let v = fake.recv_raw().await;
        assert_eq!(v["execute"], "migrate-recover", "{v}");
        fake.reply(&v["id"], json!({})).await;
        fake
    });
    let (client, _events) = QmpClient::from_stream(client_side).await.unwrap();
    assert!(!client.oob_enabled());
    client.migrate_recover("tcp:0:2").await.unwrap();
    server.await.unwrap();
}
