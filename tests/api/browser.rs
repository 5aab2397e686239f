//! Issue 9: the admin pages in a real browser. `llm-tracker serve --demo` (SQLite, demo rows)
//! and headless Chromium driven over WebDriver (Debian's `chromium` + `chromium-driver`, which
//! `scripts/test.sh` installs when missing): sign in, read the overview and check its figures
//! equal the API's, change the granularity, filter the listing, open a row, and save
//! screenshots at 1440 px and 375 px (`target/screenshots/`; with `UPDATE_SCREENSHOTS=1` also
//! `docs/screenshots/`, which the README shows).
//!
//! A missing browser is a failure, not a skip.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine;
use serde_json::{Value, json};

use crate::helpers::free_port;

const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

fn find_program(names: &[&str]) -> Option<PathBuf> {
    let path = std::env::var("PATH").unwrap_or_default();
    names.iter().find_map(|name| {
        std::env::split_paths(&path)
            .chain([
                PathBuf::from("/usr/bin"),
                PathBuf::from("/usr/lib/chromium"),
            ])
            .map(|dir| dir.join(name))
            .find(|p| p.is_file())
    })
}

/// Kills the child when dropped.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A minimal W3C WebDriver client.
struct Browser {
    http: reqwest::Client,
    base: String,
}

impl Browser {
    async fn call(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> Value {
        let url = format!("{}{path}", self.base);
        let mut req = self.http.request(method.clone(), &url);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let res = req
            .send()
            .await
            .unwrap_or_else(|e| panic!("{method} {path}: {e}"));
        let status = res.status();
        let v: Value = res.json().await.unwrap();
        assert!(status.is_success(), "{method} {path}: {status} {v}");
        v["value"].clone()
    }

    async fn go(&self, url: &str) {
        self.call(reqwest::Method::POST, "/url", Some(json!({ "url": url })))
            .await;
    }

    async fn url(&self) -> String {
        self.call(reqwest::Method::GET, "/url", None)
            .await
            .as_str()
            .unwrap()
            .to_owned()
    }

    async fn find(&self, css: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let res = self
                .http
                .post(format!("{}/element", self.base))
                .json(&json!({"using": "css selector", "value": css}))
                .send()
                .await
                .unwrap();
            if res.status().is_success() {
                let v: Value = res.json().await.unwrap();
                return v["value"][ELEMENT].as_str().unwrap().to_owned();
            }
            assert!(Instant::now() < deadline, "no element {css}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn text(&self, css: &str) -> String {
        let id = self.find(css).await;
        self.call(reqwest::Method::GET, &format!("/element/{id}/text"), None)
            .await
            .as_str()
            .unwrap()
            .to_owned()
    }

    async fn click(&self, css: &str) {
        let id = self.find(css).await;
        self.call(
            reqwest::Method::POST,
            &format!("/element/{id}/click"),
            Some(json!({})),
        )
        .await;
    }

    async fn type_into(&self, css: &str, text: &str) {
        let id = self.find(css).await;
        self.call(
            reqwest::Method::POST,
            &format!("/element/{id}/clear"),
            Some(json!({})),
        )
        .await;
        self.call(
            reqwest::Method::POST,
            &format!("/element/{id}/value"),
            Some(json!({ "text": text })),
        )
        .await;
    }

    async fn size(&self, width: u32, height: u32) {
        self.call(
            reqwest::Method::POST,
            "/window/rect",
            Some(json!({"width": width, "height": height})),
        )
        .await;
    }

    async fn screenshot(&self, name: &str) {
        self.save_screenshot("/screenshot", name).await;
    }

    /// A screenshot of one element (scrolled into view), e.g. a section below the fold.
    async fn element_screenshot(&self, css: &str, name: &str) {
        let id = self.find(css).await;
        self.save_screenshot(&format!("/element/{id}/screenshot"), name)
            .await;
    }

    async fn save_screenshot(&self, path: &str, name: &str) {
        let b64 = self.call(reqwest::Method::GET, path, None).await;
        let png = base64::engine::general_purpose::STANDARD
            .decode(b64.as_str().unwrap())
            .unwrap();
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let dir = root.join("target/screenshots");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(name), &png).unwrap();
        if std::env::var("UPDATE_SCREENSHOTS").as_deref() == Ok("1") {
            let docs = root.join("docs/screenshots");
            std::fs::create_dir_all(&docs).unwrap();
            std::fs::write(docs.join(name), &png).unwrap();
        }
    }

    /// Waits until the page's URL contains `part`.
    async fn wait_url(&self, part: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let url = self.url().await;
            if url.contains(part) {
                return url;
            }
            assert!(
                Instant::now() < deadline,
                "url {url} never contained {part}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// `serve --demo` on a fresh SQLite file: its base URL, admin password and token.
fn serve_demo(dir: &Path) -> (Running, String, String, String) {
    let port = free_port();
    let mut child = Command::new(env!("CARGO_BIN_EXE_llm-tracker"))
        .args(["serve", "--demo"])
        .current_dir(dir)
        .env_clear()
        .env(
            "DATABASE_URL",
            format!("sqlite://{}?mode=rwc", dir.join("demo.db").display()),
        )
        .env("BIND_ADDR", format!("127.0.0.1:{port}"))
        .env("JWT_SECRET", "browser-test-secret-0123456789abcdef")
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start llm-tracker serve --demo");
    let stdout = child.stdout.take().unwrap();
    let running = Running(child);
    // Read on a thread of its own until the process ends: a closed pipe would make the
    // server's next print fail.
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let (mut password, mut token, mut token_next) = (None, None, false);
    while password.is_none() || token.is_none() {
        let line = rx
            .recv_timeout(Duration::from_secs(120))
            .expect("serve --demo printed its admin user and token");
        let line = line.trim();
        if token_next {
            token = Some(line.to_owned());
            token_next = false;
        }
        if let Some(rest) = line.strip_prefix("admin user:") {
            password = rest.split(" / ").nth(1).map(|p| p.trim().to_owned());
        }
        // The token is printed alone on the line after its heading.
        token_next |= line.starts_with("admin token");
    }
    let base = format!("http://127.0.0.1:{port}");
    (
        running,
        base,
        password.expect("demo admin password printed"),
        token.expect("demo admin token printed"),
    )
}

#[actix_web::test]
async fn the_admin_pages_work_in_a_real_browser() {
    let (Some(chromium), Some(driver)) = (
        find_program(&["chromium", "chromium-browser", "google-chrome"]),
        find_program(&["chromedriver", "chromium-driver"]),
    ) else {
        panic!(
            "Chromium and its WebDriver are needed (Debian: apt-get install chromium chromium-driver); \
             ./scripts/test.sh installs them"
        );
    };
    let _ = rustls::crypto::ring::default_provider().install_default();
    let dir = tempfile::tempdir().unwrap();
    let (_server, base, password, token) = serve_demo(dir.path());
    let http = reqwest::Client::new();
    let api = |path: String| {
        let http = http.clone();
        let token = token.clone();
        let base = base.clone();
        async move {
            http.get(format!("{base}{path}"))
                .bearer_auth(token)
                .send()
                .await
                .unwrap()
                .json::<Value>()
                .await
                .unwrap()
        }
    };
    // Wait for the server.
    let deadline = Instant::now() + Duration::from_secs(60);
    while http.get(format!("{base}/readyz")).send().await.is_err() {
        assert!(Instant::now() < deadline, "serve --demo never answered");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    let driver_port = free_port();
    let _driver = Running(
        Command::new(driver)
            .arg(format!("--port={driver_port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start chromedriver"),
    );
    let driver_url = format!("http://127.0.0.1:{driver_port}");
    let deadline = Instant::now() + Duration::from_secs(30);
    while http
        .get(format!("{driver_url}/status"))
        .send()
        .await
        .is_err()
    {
        assert!(Instant::now() < deadline, "chromedriver never answered");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let session: Value = http
        .post(format!("{driver_url}/session"))
        .json(&json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": chromium.to_string_lossy(),
                "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                         "--window-size=1440,1100", "--hide-scrollbars"]
            }
        }}}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let id = session["value"]["sessionId"]
        .as_str()
        .unwrap_or_else(|| panic!("no WebDriver session: {session}"));
    let b = Browser {
        http: http.clone(),
        base: format!("{driver_url}/session/{id}"),
    };

    // Sign in (the overview sends us to the sign-in page and back).
    b.go(&format!("{base}/admin/")).await;
    b.wait_url("/admin/login/").await;
    b.type_into("#id_username", "admin").await;
    b.type_into("#id_password", &password).await;
    b.click("#login-submit").await;
    b.wait_url("/admin/").await;

    // The overview's figures are the API's, formatted (issue 21).
    use llm_tracker::http::pages::format::thousands;
    let stats = api("/api/v1/admin/token-stats/?include=by_user".into()).await;
    let count = |v: &Value| thousands(v.as_i64().unwrap());
    let calls = b.text("#total-calls").await;
    assert_eq!(calls, count(&stats["summary"]["total_calls"]));
    assert_eq!(
        b.text("#total-tokens").await,
        count(&stats["summary"]["total_tokens"])
    );
    assert!(b.text("#total-tokens").await.contains(','));
    assert!(b.text("#total-cost").await.starts_with('$'));
    assert!(
        b.text("#by-model")
            .await
            .contains(stats["by_model"][0]["model"].as_str().unwrap())
    );
    // Top users: the API's first, with its calls.
    let top = &stats["by_user"][0];
    let top_users = b.text("#top-users").await;
    assert!(
        top_users.contains(top["username"].as_str().unwrap_or("no user")),
        "{top_users}"
    );
    assert!(
        top_users.contains(&count(&top["total_calls"])),
        "{top_users}"
    );
    // The main chart is stacked by model: its legend names the largest.
    let legend = b.text("#legend").await;
    assert!(
        legend.contains(stats["by_model"][0]["model"].as_str().unwrap()),
        "{legend}"
    );
    // Top error messages: the demo's failures, grouped.
    let errors = b.text("#top-errors").await;
    assert!(!errors.contains("No failed calls"), "{errors}");
    // The charts are drawn (axis labels are text in the SVG).
    for chart in [
        "#chart",
        "#outcome-chart",
        "#failure-chart",
        "#latency-chart",
        "#ttft-chart",
    ] {
        assert!(!b.text(chart).await.trim().is_empty(), "{chart}");
    }
    // Latency percentiles: the largest model's p95 in the table is the API's, formatted.
    let with_latency = api("/api/v1/admin/token-stats/?include=latency".into()).await;
    let first = &with_latency["by_model"][0];
    let p95 =
        llm_tracker::http::pages::format::duration(first["latency_p95_sec"].as_f64().unwrap());
    let table = b.text("#by-model").await;
    assert!(table.contains(&p95), "{p95} not in {table}");
    assert!(
        b.text("#latency-chart")
            .await
            .contains(first["model"].as_str().unwrap()),
        "the latency chart names the models"
    );
    b.screenshot("overview.png").await;
    b.element_screenshot("#charts", "overview-charts.png").await;
    b.element_screenshot("#tables", "overview-tables.png").await;
    b.element_screenshot("#latency-charts", "overview-latency.png")
        .await;
    b.size(375, 900).await;
    b.screenshot("overview-375.png").await;
    b.element_screenshot("#charts", "overview-charts-375.png")
        .await;
    b.size(1440, 1100).await;

    // The main chart's toggle: cost, in dollars on its axis; the choice survives Apply.
    b.click("#metric-cost").await;
    b.wait_url("metric=cost").await;
    assert!(b.text("#chart").await.contains('$'));
    // Another granularity: the charts are by hour.
    b.click("#granularity option[value=day]").await;
    b.click("#apply").await;
    b.wait_url("granularity=day").await;
    assert!(b.url().await.contains("metric=cost"));
    assert!(b.text("main").await.contains("By hour"));

    // The listing, filtered by model, equals the API's total; open a row.
    b.go(&format!("{base}/admin/llm-usage/")).await;
    b.type_into("#model", "gemini").await;
    b.click("#filter").await;
    b.wait_url("model=gemini").await;
    let listed = api("/api/v1/admin/llm-usage/?model=gemini".into()).await;
    assert_eq!(b.text("#total").await, count(&listed["total"]));
    b.screenshot("usage-list.png").await;
    b.size(375, 900).await;
    b.screenshot("usage-list-375.png").await;
    b.size(1440, 1100).await;
    b.click(".row-link").await;
    b.wait_url("/admin/llm-usage/").await;
    assert!(b.text("#metadata").await.contains("node_name"));
    let first = &listed["results"][0];
    assert!(
        b.text("#detail")
            .await
            .contains(first["model"].as_str().unwrap())
    );

    let _ = http.delete(&b.base).send().await;
}
