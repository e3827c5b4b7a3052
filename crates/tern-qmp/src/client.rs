//! The connection: handshake, background reader/writer tasks, reply demultiplexing.
//!
//! Design: one reader task parses every line QEMU sends and routes replies (matched by the
//! numeric `id` we put on every command) to the waiting caller through a oneshot channel,
//! and events to a `tokio::sync::broadcast` channel. One writer task owns the socket's write
//! half and writes whole lines taken from an mpsc queue, so a caller whose future is dropped
//! (e.g. by `tokio::time::timeout`) can never leave half a command on the wire. This is the
//! same split libvirt's `qemuMonitor` and the Python `qemu.qmp` library use: commands and
//! events share one socket, and events may arrive between a command and its reply.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::sync::{broadcast, mpsc, oneshot};
use tokio::task::AbortHandle;

use crate::codec::{Outcome, ServerMessage, parse_server_line};
use crate::error::{QmpError, Result};
use crate::event::QmpEvent;
use crate::types::{QemuVersion, QmpGreeting};

/// Receiver of QMP events. Ends (`RecvError::Closed`) when the connection closes; returns
/// `RecvError::Lagged` if the receiver fell more than [`EVENT_CAPACITY`] events behind.
pub type QmpEvents = broadcast::Receiver<QmpEvent>;

/// Events buffered per subscriber. Migration events come at most a few per second
/// (`MIGRATION_PASS` once per pass), so this is ample for any sane consumer.
pub const EVENT_CAPACITY: usize = 1024;

/// How long to wait for QEMU's greeting once connected. QEMU sends it at once; a silent
/// socket means something else is listening, or QEMU is wedged.
pub const GREETING_TIMEOUT: Duration = Duration::from_secs(10);

/// An async QMP connection. Cheap to clone; all clones share the one socket, and every
/// method takes `&self`, so several tasks may issue commands concurrently.
///
/// Dropping the last clone stops the background tasks and closes the socket.
#[derive(Clone)]
pub struct QmpClient {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for QmpClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QmpClient")
            .field("qemu", &self.inner.greeting.version.to_string())
            .field("closed", &self.inner.shared.lock().closed)
            .finish()
    }
}

struct Inner {
    shared: Arc<Shared>,
    outgoing: mpsc::UnboundedSender<String>,
    greeting: QmpGreeting,
    next_id: AtomicU64,
    tasks: Vec<AbortHandle>,
    /// Out-of-band execution was negotiated (QEMU offered `oob` in its greeting).
    oob: bool,
}

impl Drop for Inner {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// State shared between callers and the reader/writer tasks.
struct Shared {
    state: Mutex<SharedState>,
}

struct SharedState {
    /// Commands awaiting a reply, by id. Ordered so that an id-less reply (QEMU could not
    /// parse our id) goes to the oldest command: QEMU runs in-band commands in order.
    pending: BTreeMap<u64, Pending>,
    /// Set once the connection is gone; the reason is reported to every later caller.
    closed: Option<String>,
    /// `None` once closed, so subscribers see `Closed` after the buffered events.
    events: Option<broadcast::Sender<QmpEvent>>,
}

struct Pending {
    command: String,
    reply: oneshot::Sender<Result<Value>>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, SharedState> {
        // A poisoned lock only means another thread panicked while holding it; the state is
        // still consistent (every mutation is a single map/option operation).
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Marks the connection closed and fails every pending command with the reason.
    fn close(&self, reason: String) {
        let (pending, reason) = {
            let mut state = self.lock();
            let reason = state
                .closed
                .get_or_insert_with(|| {
                    tracing::debug!(%reason, "QMP connection closed");
                    reason
                })
                .clone();
            state.events = None;
            (std::mem::take(&mut state.pending), reason)
        };
        for (_, p) in pending {
            let _ = p.reply.send(Err(QmpError::Closed {
                reason: reason.clone(),
            }));
        }
    }

    fn closed_error(&self) -> QmpError {
        QmpError::Closed {
            reason: self
                .lock()
                .closed
                .clone()
                .unwrap_or_else(|| "background reader stopped".to_owned()),
        }
    }

    fn dispatch(&self, message: ServerMessage) {
        match message {
            ServerMessage::Event(event) => {
                tracing::trace!(event = event.kind.name(), "QMP event");
                if let Some(tx) = &self.lock().events {
                    // No subscriber is fine: nobody is interested right now.
                    let _ = tx.send(event);
                }
            }
            ServerMessage::Reply { id, outcome } => {
                let pending = {
                    let mut state = self.lock();
                    match &id {
                        Some(id) => match id.as_u64() {
                            Some(n) => state.pending.remove(&n),
                            None => None,
                        },
                        None => state.pending.pop_first().map(|(_, p)| p),
                    }
                };
                let Some(pending) = pending else {
                    tracing::warn!(?id, "QMP reply for no pending command; ignored");
                    return;
                };
                let result = match outcome {
                    Outcome::Return(value) => Ok(value),
                    Outcome::Error { class, desc } => Err(QmpError::Command {
                        command: pending.command,
                        class,
                        desc,
                    }),
                };
                // The caller may have given up (timeout); that is not an error here.
                let _ = pending.reply.send(result);
            }
            ServerMessage::Greeting(_) => {
                tracing::warn!("unexpected second QMP greeting; ignored");
            }
        }
    }
}

/// Removes a pending entry if the caller's future is dropped before the reply arrives.
struct PendingGuard<'a> {
    shared: &'a Shared,
    id: u64,
}

impl Drop for PendingGuard<'_> {
    fn drop(&mut self) {
        self.shared.lock().pending.remove(&self.id);
    }
}

impl QmpClient {
    /// Connects to a QMP unix socket, reads the greeting and leaves capability-negotiation
    /// mode (`qmp_capabilities`, no optional features such as `oob` enabled).
    ///
    /// Returns the client and an event receiver subscribed *before* negotiation, so no event
    /// emitted after the handshake can be missed.
    pub async fn connect(path: impl AsRef<Path>) -> Result<(QmpClient, QmpEvents)> {
        let path = path.as_ref();
        let stream = UnixStream::connect(path)
            .await
            .map_err(|source| QmpError::Connect {
                path: path.to_owned(),
                source,
            })?;
        Self::from_stream(stream).await
    }

    /// Like [`QmpClient::connect`], but retries while the socket does not exist yet or
    /// refuses connections: QEMU creates it shortly after being spawned.
    pub async fn connect_with_retry(
        path: impl AsRef<Path>,
        timeout: Duration,
    ) -> Result<(QmpClient, QmpEvents)> {
        let path = path.as_ref();
        let start = tokio::time::Instant::now();
        let deadline = start + timeout;
        let mut delay = Duration::from_millis(10);
        loop {
            match UnixStream::connect(path).await {
                Ok(stream) => return Self::from_stream(stream).await,
                Err(e) => {
                    let retryable = matches!(
                        e.kind(),
                        std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
                    );
                    if !retryable {
                        return Err(QmpError::Connect {
                            path: path.to_owned(),
                            source: e,
                        });
                    }
                    let now = tokio::time::Instant::now();
                    if now >= deadline {
                        return Err(QmpError::ConnectTimeout {
                            path: path.to_owned(),
                            waited: now - start,
                            last_error: e,
                        });
                    }
                    tokio::time::sleep(delay.min(deadline - now)).await;
                    delay = (delay * 2).min(Duration::from_millis(100));
                }
            }
        }
    }

    /// Runs the QMP handshake over an already connected stream (any `AsyncRead + AsyncWrite`,
    /// e.g. a `UnixStream` from a socket pair in tests, or an fd passed by a supervisor).
    pub async fn from_stream<S>(stream: S) -> Result<(QmpClient, QmpEvents)>
    where
        S: AsyncRead + AsyncWrite + Send + 'static,
    {
        let (read_half, mut write_half) = tokio::io::split(stream);
        let mut reader = BufReader::new(read_half);
        let mut line = String::new();
        let n = tokio::time::timeout(GREETING_TIMEOUT, reader.read_line(&mut line))
            .await
            .map_err(|_| QmpError::Timeout {
                what: "the QMP greeting".into(),
                waited: GREETING_TIMEOUT,
            })?
            .map_err(|source| QmpError::Io {
                context: "reading the QMP greeting".into(),
                source,
            })?;
        if n == 0 {
            return Err(QmpError::Closed {
                reason: "end of stream before the QMP greeting".into(),
            });
        }
        let greeting = match parse_server_line(line.trim_end(), Instant::now())? {
            ServerMessage::Greeting(g) => g,
            other => {
                return Err(QmpError::Protocol(format!(
                    "expected the QMP greeting, got {other:?}"
                )));
            }
        };
        tracing::debug!(qemu = %greeting.version, "QMP greeting");

        let (events_tx, events_rx) = broadcast::channel(EVENT_CAPACITY);
        let shared = Arc::new(Shared {
            state: Mutex::new(SharedState {
                pending: BTreeMap::new(),
                closed: None,
                events: Some(events_tx),
            }),
        });
        let (outgoing, mut outgoing_rx) = mpsc::unbounded_channel::<String>();

        let reader_shared = Arc::clone(&shared);
        let reader_task = tokio::spawn(async move {
            // Bytes, not `read_line`: a stray invalid UTF-8 byte must cost one message,
            // not the whole connection.
            let mut line = Vec::new();
            loop {
                line.clear();
                match reader.read_until(b'\n', &mut line).await {
                    Ok(0) => {
                        reader_shared
                            .close("end of stream (QEMU exited or closed the monitor)".into());
                        return;
                    }
                    Ok(_) => {
                        let text = String::from_utf8_lossy(&line);
                        let text = text.trim_end();
                        if text.is_empty() {
                            continue;
                        }
                        match parse_server_line(text, Instant::now()) {
                            Ok(message) => reader_shared.dispatch(message),
                            Err(e) => tracing::warn!(error = %e, "ignoring undecodable QMP line"),
                        }
                    }
                    Err(e) => {
                        reader_shared.close(format!("read error: {e}"));
                        return;
                    }
                }
            }
        });

        let writer_shared = Arc::clone(&shared);
        let writer_task = tokio::spawn(async move {
            while let Some(text) = outgoing_rx.recv().await {
                let result = async {
                    write_half.write_all(text.as_bytes()).await?;
                    write_half.flush().await
                }
                .await;
                if let Err(e) = result {
                    writer_shared.close(format!("write error: {e}"));
                    return;
                }
            }
            // All clients dropped: close our side so QEMU sees the monitor go away.
            let _ = write_half.shutdown().await;
        });

        // Out-of-band execution is enabled whenever QEMU offers it: `migrate-recover` and
        // `migrate-pause` are `allow-oob` (qapi/migration.json) precisely so that a post-copy
        // can be recovered while the main loop is blocked on a page that will only arrive
        // once it is — under TCG a vCPU faulting inside interrupt delivery holds the big lock
        // (docs/devel/qapi-code-gen.rst, "Out-of-band command execution"). Enabling it
        // changes nothing else: in-band commands still run one at a time, replies matched
        // by id.
        let oob = greeting.capabilities.iter().any(|c| c == "oob");
        let client = QmpClient {
            inner: Arc::new(Inner {
                shared,
                outgoing,
                greeting,
                next_id: AtomicU64::new(1),
                tasks: vec![reader_task.abort_handle(), writer_task.abort_handle()],
                oob,
            }),
        };
        let enable = if oob {
            serde_json::json!({ "enable": ["oob"] })
        } else {
            Value::Null
        };
        client.execute_raw("qmp_capabilities", enable).await?;
        Ok((client, events_rx))
    }

    /// The greeting QEMU sent.
    pub fn greeting(&self) -> &QmpGreeting {
        &self.inner.greeting
    }

    /// QEMU's version, from the greeting.
    pub fn qemu_version(&self) -> &QemuVersion {
        &self.inner.greeting.version
    }

    /// A new event receiver. Only events received after this call are delivered. If the
    /// connection is already closed, the receiver reports `Closed` at once.
    pub fn subscribe_events(&self) -> QmpEvents {
        match &self.inner.shared.lock().events {
            Some(tx) => tx.subscribe(),
            None => broadcast::channel(1).1,
        }
    }

    /// True once the connection is closed (QEMU exited or the socket failed).
    pub fn is_closed(&self) -> bool {
        self.inner.shared.lock().closed.is_some()
    }

    /// Sends a command with JSON arguments (`Value::Null` for none) and returns the raw
    /// `return` value. QEMU's error replies become [`QmpError::Command`].
    ///
    /// There is no built-in timeout: wrap in `tokio::time::timeout` if needed; that is safe
    /// (a dropped call never corrupts the stream, and its late reply is discarded).
    pub async fn execute_raw(&self, command: &str, arguments: Value) -> Result<Value> {
        self.send_command("execute", command, arguments).await
    }

    /// Whether out-of-band execution was negotiated.
    pub fn oob_enabled(&self) -> bool {
        self.inner.oob
    }

    /// Like [`execute_raw`](Self::execute_raw), but out of band (`exec-oob`) when the
    /// connection negotiated it: QEMU runs the command in the monitor's I/O thread, without
    /// the big lock, even while the main loop is blocked. Only commands QEMU marks
    /// `allow-oob` may be sent this way. Without `oob` it is an ordinary command.
    pub async fn execute_oob_raw(&self, command: &str, arguments: Value) -> Result<Value> {
        let verb = if self.inner.oob {
            "exec-oob"
        } else {
            "execute"
        };
        self.send_command(verb, command, arguments).await
    }

    async fn send_command(&self, verb: &str, command: &str, arguments: Value) -> Result<Value> {
        let shared = &*self.inner.shared;
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        let mut message = serde_json::Map::new();
        message.insert(verb.into(), Value::String(command.to_owned()));
        if !arguments.is_null() {
            message.insert("arguments".into(), arguments);
        }
        message.insert("id".into(), Value::from(id));
        let mut text = Value::Object(message).to_string();
        text.push('\n');

        let (tx, rx) = oneshot::channel();
        {
            let mut state = shared.lock();
            if let Some(reason) = &state.closed {
                return Err(QmpError::Closed {
                    reason: reason.clone(),
                });
            }
            state.pending.insert(
                id,
                Pending {
                    command: command.to_owned(),
                    reply: tx,
                },
            );
        }
        let _guard = PendingGuard { shared, id };
        tracing::debug!(command, id, "QMP execute");
        if self.inner.outgoing.send(text).is_err() {
            return Err(shared.closed_error());
        }
        match rx.await {
            Ok(result) => result,
            Err(_) => Err(shared.closed_error()),
        }
    }

    /// Sends a command with typed arguments (`()` for none) and decodes the reply into `R`.
    /// A reply that does not fit `R` gives [`QmpError::Decode`] with the offending JSON.
    pub async fn execute<R, A>(&self, command: &str, arguments: A) -> Result<R>
    where
        R: DeserializeOwned,
        A: Serialize,
    {
        let arguments = serde_json::to_value(arguments).map_err(|source| QmpError::Encode {
            command: command.to_owned(),
            source,
        })?;
        let value = self.execute_raw(command, arguments).await?;
        R::deserialize(&value).map_err(|e| {
            QmpError::decode(format!("the reply of '{command}'"), &value.to_string(), e)
        })
    }

    /// Sends a command whose reply carries no information (`{}`).
    pub async fn execute_unit<A: Serialize>(&self, command: &str, arguments: A) -> Result<()> {
        let arguments = serde_json::to_value(arguments).map_err(|source| QmpError::Encode {
            command: command.to_owned(),
            source,
        })?;
        self.execute_raw(command, arguments).await.map(|_| ())
    }

    /// [`execute_unit`](Self::execute_unit) out of band (see
    /// [`execute_oob_raw`](Self::execute_oob_raw)).
    pub async fn execute_unit_oob<A: Serialize>(&self, command: &str, arguments: A) -> Result<()> {
        let arguments = serde_json::to_value(arguments).map_err(|source| QmpError::Encode {
            command: command.to_owned(),
            source,
        })?;
        self.execute_oob_raw(command, arguments).await.map(|_| ())
    }
}
