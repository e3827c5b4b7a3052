//! A real headless browser for tests: Debian's `chromium` driven through `chromedriver` over
//! the W3C WebDriver protocol (plain HTTP/JSON, spoken here with the `reqwest` client the crate
//! already has: no WebDriver crate and its dozens of dependencies to build).
//!
//! Reusable by any test that has a controller URL and its tokens (the fake-agent harness of
//! `tests/common`, or a real-lab evacuation later): [`Browser`] is the driver, [`FleetPage`]
//! reads and works the web view the way an operator would (clicks are real input events).
//!
//! Every process is killed by PID when the [`Browser`] is dropped, on every path (a panicking
//! assertion included): chromedriver runs in its own process group, and its descendants
//! (chromium and its helpers) are found in `/proc` and killed one by one, then the group.

#![allow(dead_code)]

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine;
use serde_json::{Value, json};

/// The W3C element reference key.
const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

/// Where Debian installs them (`scripts/install-prereqs.sh`).
pub const CHROMIUM: &str = "/usr/bin/chromium";
/// chromedriver of the `chromium-driver` package.
pub const CHROMEDRIVER: &str = "/usr/bin/chromedriver";

/// chromedriver and everything it started; killed by PID on drop.
struct DriverProcess {
    child: Child,
}

/// The PIDs of every descendant of `root` (from `/proc/*/stat`), deepest last.
fn descendants(root: u32) -> Vec<u32> {
    let mut parent_of: Vec<(u32, u32)> = Vec::new();
    if let Ok(dir) = std::fs::read_dir("/proc") {
        for e in dir.flatten() {
            let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
                continue;
            };
            let Ok(stat) = std::fs::read_to_string(e.path().join("stat")) else {
                continue;
            };
            // `pid (comm) state ppid ...`: comm may hold spaces and parentheses.
            let Some(after) = stat.rfind(')').map(|i| &stat[i + 1..]) else {
                continue;
            };
            if let Some(ppid) = after.split_whitespace().nth(1).and_then(|p| p.parse().ok()) {
                parent_of.push((pid, ppid));
            }
        }
    }
    let mut found = vec![root];
    let mut i = 0;
    while i < found.len() {
        let p = found[i];
        found.extend(parent_of.iter().filter(|(_, pp)| *pp == p).map(|(c, _)| *c));
        i += 1;
    }
    found.remove(0);
    found
}

impl Drop for DriverProcess {
    fn drop(&mut self) {
        let pid = self.child.id();
        for child in descendants(pid).into_iter().rev() {
            // SAFETY: kill(2) with a PID we found as a descendant of our own child.
            unsafe { libc::kill(child as i32, libc::SIGKILL) };
        }
        // SAFETY: the process group chromedriver leads (spawned with process_group(0)).
        unsafe { libc::kill(-(pid as i32), libc::SIGKILL) };
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A headless chromium session.
pub struct Browser {
    http: reqwest::Client,
    session: String,
    // Dropped after the processes are killed (fields drop in order).
    driver: DriverProcess,
    profile: tempfile::TempDir,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

impl Browser {
    /// Starts chromedriver and a headless chromium with a `width`×`height` window. Panics
    /// naming the missing package when they are not installed (no silent skip).
    pub async fn launch(width: u32, height: u32) -> Self {
        for bin in [CHROMIUM, CHROMEDRIVER] {
            assert!(
                Path::new(bin).exists(),
                "{bin} missing: run scripts/install-prereqs.sh (Debian packages chromium, chromium-driver)"
            );
        }
        let port = free_port();
        let profile = tempfile::tempdir().expect("profile dir");
        let log = std::fs::File::create(profile.path().join("chromedriver.log")).ok();
        let mut cmd = Command::new(CHROMEDRIVER);
        // Chromium's own temp dirs go into the profile dir, removed with it even after a kill.
        cmd.env("TMPDIR", profile.path())
            .arg(format!("--port={port}"))
            .arg("--allowed-ips=127.0.0.1")
            .stdin(Stdio::null())
            .stdout(Stdio::null());
        match log {
            Some(f) => cmd.stderr(f),
            None => cmd.stderr(Stdio::null()),
        };
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        let child = cmd.spawn().expect("start chromedriver");
        let driver = DriverProcess { child };
        let http = reqwest::Client::builder()
            .no_proxy()
            .timeout(Duration::from_secs(60))
            .build()
            .expect("http client");
        let base = format!("http://127.0.0.1:{port}");
        let start = Instant::now();
        loop {
            let ready = http.get(format!("{base}/status")).send().await;
            if let Ok(r) = ready {
                let v: Value = r.json().await.unwrap_or_default();
                if v["value"]["ready"] == true {
                    break;
                }
            }
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "chromedriver did not start"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let args = json!([
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            format!("--window-size={width},{height}"),
            "--force-device-scale-factor=1",
            format!(
                "--user-data-dir={}",
                profile.path().join("chromium").display()
            ),
            "--no-first-run",
            "--no-default-browser-check",
            "--disable-extensions",
            "--disable-background-networking",
            "--disable-sync",
            "--disable-component-update",
            "--disable-default-apps",
            "--hide-scrollbars",
            "--lang=en-US",
        ]);
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {"binary": CHROMIUM, "args": args},
        }}});
        let r: Value = http
            .post(format!("{base}/session"))
            .json(&caps)
            .send()
            .await
            .expect("new session")
            .json()
            .await
            .expect("new session answer");
        let id = r["value"]["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("chromedriver refused the session: {r}"))
            .to_string();
        Self {
            http,
            session: format!("{base}/session/{id}"),
            driver,
            profile,
        }
    }

    async fn call(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> Value {
        let mut req = self.http.request(method, format!("{}{path}", self.session));
        if let Some(b) = body {
            req = req.json(&b);
        }
        let r = req.send().await.expect("webdriver call");
        let status = r.status();
        let v: Value = r.json().await.expect("webdriver JSON");
        assert!(status.is_success(), "webdriver {path}: {status} {v}");
        v["value"].clone()
    }

    /// Ends the session (chromium exits by itself); the processes are then killed by PID
    /// anyway when `self` drops, as on every other path.
    pub async fn quit(self) {
        let _ = self.http.delete(&self.session).send().await;
    }

    /// Opens `url`.
    pub async fn goto(&self, url: &str) {
        self.call(reqwest::Method::POST, "/url", Some(json!({"url": url})))
            .await;
    }

    /// Runs `script` (a function body: `return ...`) in the page.
    pub async fn eval(&self, script: &str, args: Value) -> Value {
        self.call(
            reqwest::Method::POST,
            "/execute/sync",
            Some(json!({"script": script, "args": args})),
        )
        .await
    }

    /// Waits until `script` returns something other than null/false (checked every 20 ms).
    pub async fn wait_for(
        &self,
        what: &str,
        script: &str,
        args: Value,
        timeout: Duration,
    ) -> Value {
        let start = Instant::now();
        loop {
            let v = self.eval(script, args.clone()).await;
            if !v.is_null() && v != Value::Bool(false) {
                return v;
            }
            assert!(
                start.elapsed() < timeout,
                "timed out after {timeout:?} waiting for {what} in the browser"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Clicks the first element matching `css` with real input events (as a user would). A
    /// live page may replace the element between finding and clicking it (an event re-rendered
    /// its view): it is then found again, a few times.
    pub async fn click(&self, css: &str) {
        for _ in 0..5 {
            let e = self
                .call(
                    reqwest::Method::POST,
                    "/element",
                    Some(json!({"using": "css selector", "value": css})),
                )
                .await;
            let id = e[ELEMENT].as_str().expect("element reference").to_string();
            // Centred, clear of the page's sticky header.
            let _ = self
                .http
                .post(format!("{}/execute/sync", self.session))
                .json(
                    &json!({"script": "arguments[0].scrollIntoView({block: 'center'});",
                    "args": [{ELEMENT: id}]}),
                )
                .send()
                .await;
            let r = self
                .http
                .post(format!("{}/element/{id}/click", self.session))
                .json(&json!({}))
                .send()
                .await
                .expect("webdriver click");
            if r.status().is_success() {
                return;
            }
            let v: Value = r.json().await.unwrap_or_default();
            assert_eq!(
                v["value"]["error"], "stale element reference",
                "webdriver click on {css}: {v}"
            );
        }
        panic!("{css} kept being replaced: could not click it");
    }

    /// Saves a PNG of the window to `path`.
    pub async fn screenshot(&self, path: &Path) {
        let v = self.call(reqwest::Method::GET, "/screenshot", None).await;
        let png = base64::engine::general_purpose::STANDARD
            .decode(v.as_str().expect("screenshot data"))
            .expect("screenshot base64");
        std::fs::write(path, png).expect("write screenshot");
    }
}

/// The web view of a controller, as an operator works it.
pub struct FleetPage<'a> {
    /// The browser.
    pub browser: &'a Browser,
    /// The controller's base URL.
    pub url: String,
}

impl<'a> FleetPage<'a> {
    /// Logs in with `token` (lab mode) and waits for the live event stream.
    pub async fn login(browser: &'a Browser, url: &str, token: &str) -> Self {
        browser.goto(&format!("{url}/ui/login?token={token}")).await;
        let page = Self {
            browser,
            url: url.to_string(),
        };
        browser
            .wait_for(
                "the event stream to connect",
                "const l = document.getElementById('live'); return l && l.dataset.live === '1';",
                json!([]),
                Duration::from_secs(10),
            )
            .await;
        page
    }

    /// The role the page says it is logged in with.
    pub async fn role(&self) -> String {
        self.browser
            .eval("return document.body.dataset.role;", json!([]))
            .await
            .as_str()
            .unwrap_or_default()
            .to_string()
    }

    /// The host whose row lists `vm`, if any.
    pub async fn host_of(&self, vm: &str) -> Option<String> {
        let v = self
            .browser
            .eval(
                "const li = document.querySelector(`#hosts li.vm[data-vm=\"${arguments[0]}\"]`); \
                 return li ? li.closest('tr').id.replace(/^host-/, '') : null;",
                json!([vm]),
            )
            .await;
        v.as_str().map(str::to_string)
    }

    /// Waits until `vm` is listed on `host`; returns when the page applied it and for which
    /// event (`data-applied-ms`, `data-event-ms` of the hosts view, ms since the epoch).
    pub async fn wait_vm_on(&self, vm: &str, host: &str, timeout: Duration) -> (u64, u64) {
        let v = self
            .browser
            .wait_for(
                &format!("{vm} listed on {host}"),
                "const li = document.querySelector(`#host-${arguments[1]} li.vm[data-vm=\"${arguments[0]}\"]`); \
                 if (!li) return null; const b = document.querySelector('[data-fragment=hosts]'); \
                 return [Number(b.dataset.appliedMs || 0), Number(b.dataset.eventMs || 0)];",
                json!([vm, host]),
                timeout,
            )
            .await;
        (v[0].as_u64().unwrap_or(0), v[1].as_u64().unwrap_or(0))
    }

    /// The plan rows shown for evacuation `id`: (vm, label "vm → destination").
    pub async fn plan_rows(&self, id: &str) -> Vec<(String, String)> {
        let v = self
            .browser
            .eval(
                "const a = document.getElementById('evac-' + arguments[0]); if (!a) return []; \
                 return [...a.querySelectorAll('svg.timeline rect.pred')].map((r, i) => \
                   [r.dataset.vm, a.querySelectorAll('svg.timeline text.label')[i].textContent]);",
                json!([id]),
            )
            .await;
        v.as_array()
            .map(|rows| {
                rows.iter()
                    .map(|r| {
                        (
                            r[0].as_str().unwrap_or_default().to_string(),
                            r[1].as_str().unwrap_or_default().to_string(),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The width of `vm`'s real bar in evacuation `id`'s timeline (None: not started).
    pub async fn real_bar_width(&self, id: &str, vm: &str) -> Option<f64> {
        self.browser
            .eval(
                "const r = document.querySelector(`#evac-${arguments[0]} rect.real[data-vm=\"${arguments[1]}\"]`); \
                 return r ? Number(r.getAttribute('width')) : null;",
                json!([id, vm]),
            )
            .await
            .as_f64()
    }

    /// The predicted makespan (s) the page shows for evacuation `id`.
    pub async fn makespan_s(&self, id: &str) -> Option<f64> {
        self.browser
            .eval(
                "const a = document.getElementById('evac-' + arguments[0]); \
                 return a ? Number(a.dataset.makespanS) : null;",
                json!([id]),
            )
            .await
            .as_f64()
    }

    /// Clicks an operator button twice (arm, then confirm) and returns the notice shown.
    pub async fn act(&self, button_css: &str) -> String {
        let before = self
            .browser
            .eval(
                "return document.getElementById('notice').dataset.at || '';",
                json!([]),
            )
            .await;
        self.browser.click(button_css).await;
        self.browser.click(button_css).await;
        let v = self
            .browser
            .wait_for(
                "the API's answer shown",
                "const n = document.getElementById('notice'); \
                 return (n.dataset.at || '') !== arguments[0] ? n.className + ': ' + n.textContent : null;",
                json!([before]),
                Duration::from_secs(10),
            )
            .await;
        v.as_str().unwrap_or_default().to_string()
    }

    /// Saves a screenshot of the window scrolled to the element `css`.
    pub async fn screenshot_at(&self, css: &str, path: &Path) {
        self.browser
            .eval(
                "const e = document.querySelector(arguments[0]); if (e) e.scrollIntoView(); \
                 window.scrollBy(0, -50); return true;",
                json!([css]),
            )
            .await;
        self.browser.screenshot(path).await;
    }
}
