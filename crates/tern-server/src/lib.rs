//! `tern server`: the cluster controller (issue 11).
//!
//! One API over every host: agents register and heartbeat, operators list hosts and VMs,
//! migrate a VM (the controller chooses the destination when none is given and says why),
//! and evacuate a host to a deadline with a plan and a predicted makespan.
//!
//! - [`model`]: typed values (host, migration and evacuation states, records);
//! - [`store`]: [`store::ControllerStore`] and its SQLite/PostgreSQL implementation (sqlx);
//! - [`placement`] (pure): which host may take a VM, and why; [`planner`] (pure): the seam
//!   to the evacuation planner (a serial planner until `tern-planner` lands);
//! - [`controller`] and [`evacuation`]: the operations behind the API;
//! - [`runner`]: the executor, durable through the store (restart-safe, never starts an
//!   attempt twice);
//! - [`lease`] (pure) and [`leader`]: leader election among controllers on one PostgreSQL,
//!   fencing epochs for agent calls, standbys refusing writes (issue 12);
//! - [`agent_client`]: the one module that talks to agents;
//! - [`api`]: axum routes, auth, audit, OpenAPI; [`metrics`], [`events`]: Prometheus and
//!   server-sent events; [`config`], [`server`]: `server.toml` and start-up;
//! - [`operator`]: an operator's abort / force-complete / bandwidth on one migration;
//! - [`web`]: the live web view at `/` (server-rendered HTML, one small script, issue 15);
//!   [`progress`]: running migrations' progress reports, in memory, for its charts.

pub mod agent_client;
pub mod agent_reports;
pub mod api;
pub mod config;
pub mod controller;
pub mod evacuation;
pub mod events;
pub mod leader;
pub mod lease;
pub mod metrics;
pub mod model;
pub mod operator;
pub mod placement;
pub mod planner;
pub mod progress;
pub mod runner;
pub mod server;
pub mod store;
pub mod web;

pub use config::ServerConfig;
pub use controller::{Controller, ControllerError};
pub use server::{RunningServer, ServerError};
