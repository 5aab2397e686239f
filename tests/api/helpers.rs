//! Test harness: a fresh database per test on SQLite (temp file) or PostgreSQL (a new database
//! on the server named by `TEST_DATABASE_URL`), always built by the real migrator.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::time::Duration;

use llm_tracker::config::DatabaseUrl;
use sea_orm::{ConnectionTrait, Database, DatabaseConnection, DbBackend, Statement};

/// Which database a test runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// A database for one test; a PostgreSQL database is dropped when this is dropped.
pub struct TestDb {
    pub db: DatabaseConnection,
    pub backend: Backend,
    pub url: DatabaseUrl,
    _dir: Option<tempfile::TempDir>,
    pg_database: Option<String>,
}

/// The PostgreSQL server for tests. Missing is a failure, never a skip.
pub fn pg_admin_url() -> String {
    std::env::var("TEST_DATABASE_URL").unwrap_or_else(|_| {
        panic!(
            "TEST_DATABASE_URL is not set: PostgreSQL tests need a server. \
             Run ./scripts/test.sh, which starts a throwaway one."
        )
    })
}

/// The URL of `database` on the test server.
pub fn pg_url_for(database: &str) -> String {
    let mut url = url::Url::parse(&pg_admin_url()).expect("TEST_DATABASE_URL is a URL");
    url.set_path(&format!("/{database}"));
    url.to_string()
}

impl TestDb {
    /// A fresh, empty database with no tables.
    pub async fn empty(backend: Backend) -> Self {
        match backend {
            Backend::Sqlite => {
                let dir = tempfile::tempdir().expect("temp dir");
                let path = dir.path().join("test.db");
                let url = DatabaseUrl::parse(
                    "DATABASE_URL",
                    &format!("sqlite://{}?mode=rwc", path.display()),
                )
                .expect("sqlite url");
                let db = llm_tracker::db::connect(&url)
                    .await
                    .expect("connect sqlite");
                Self {
                    db,
                    backend,
                    url,
                    _dir: Some(dir),
                    pg_database: None,
                }
            }
            Backend::Postgres => {
                let name = format!("llmt_{}", uuid::Uuid::new_v4().simple());
                let admin = Database::connect(pg_admin_url())
                    .await
                    .expect("connect to TEST_DATABASE_URL");
                admin
                    .execute_unprepared(&format!("CREATE DATABASE {name}"))
                    .await
                    .expect("create test database");
                admin.close().await.ok();
                let url = DatabaseUrl::parse("DATABASE_URL", &pg_url_for(&name)).expect("pg url");
                let db = llm_tracker::db::connect(&url)
                    .await
                    .expect("connect postgres");
                Self {
                    db,
                    backend,
                    url,
                    _dir: None,
                    pg_database: Some(name),
                }
            }
        }
    }

    /// A fresh database with every migration applied.
    pub async fn migrated(backend: Backend) -> Self {
        let t = Self::empty(backend).await;
        llm_tracker::db::migrate(&t.db).await.expect("migrate");
        t
    }

    /// The sea-orm backend.
    pub fn db_backend(&self) -> DbBackend {
        self.db.get_database_backend()
    }

    /// Runs a query and returns the first column of the first row as i64.
    pub async fn scalar_i64(&self, sql: &str) -> i64 {
        self.scalar(sql).await
    }

    /// The one text value `sql` returns.
    pub async fn scalar_string(&self, sql: &str) -> String {
        self.scalar(sql).await
    }

    async fn scalar<T: sea_orm::TryGetable>(&self, sql: &str) -> T {
        let row = self
            .db
            .query_one_raw(Statement::from_string(self.db_backend(), sql.to_owned()))
            .await
            .expect("query")
            .expect("one row");
        row.try_get_by_index::<T>(0)
            .unwrap_or_else(|e| panic!("{sql}: {e}"))
    }

    /// Table names in the database (excluding SQLite's internal ones).
    pub async fn tables(&self) -> Vec<String> {
        let sql = match self.backend {
            Backend::Sqlite => {
                "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%' ORDER BY name"
            }
            Backend::Postgres => {
                "SELECT table_name::text AS name FROM information_schema.tables WHERE table_schema = 'public' ORDER BY 1"
            }
        };
        let rows = self
            .db
            .query_all_raw(Statement::from_string(self.db_backend(), sql.to_owned()))
            .await
            .expect("list tables");
        rows.iter()
            .map(|r| r.try_get_by_index::<String>(0).expect("name"))
            .collect()
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let Some(name) = self.pg_database.take() else {
            return;
        };
        // Dropping needs async I/O; do it on a runtime of its own so it also runs on panic.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .ok()?;
            rt.block_on(async {
                let admin = Database::connect(pg_admin_url()).await.ok()?;
                admin
                    .execute_unprepared(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                    .await
                    .ok();
                admin.close().await.ok()
            })
        })
        .join();
    }
}

/// Runs a test body once on SQLite and once on PostgreSQL, as `<name>::sqlite` and
/// `<name>::postgres`.
#[macro_export]
macro_rules! db_test {
    (async fn $name:ident($backend:ident : Backend $(,)?) $body:block) => {
        mod $name {
            #[allow(unused_imports)]
            use super::*;

            async fn test_body($backend: $crate::helpers::Backend) $body

            #[actix_web::test]
            async fn sqlite() {
                test_body($crate::helpers::Backend::Sqlite).await
            }

            #[actix_web::test]
            async fn postgres() {
                test_body($crate::helpers::Backend::Postgres).await
            }
        }
    };
}

/// A file under `tests/fixtures/`.
pub fn fixture(path: &str) -> String {
    let full: PathBuf = [env!("CARGO_MANIFEST_DIR"), "tests", "fixtures", path]
        .iter()
        .collect();
    std::fs::read_to_string(&full).unwrap_or_else(|e| panic!("fixture {}: {e}", full.display()))
}

/// A loopback port nobody listens on right now, below the kernel's ephemeral range
/// (32768–60999 on Linux): a port from that range (what binding port 0 gives) can be taken by
/// any outgoing connection before a server started later, or restarted, binds it.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
        ^ u64::from(std::process::id()).rotate_left(32);
    for _ in 0..500 {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        // splitmix64 over seed + counter: spread, and distinct within this process
        let mut z = seed.wrapping_add(n.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        let port = 20_000 + (z % 12_000) as u16;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// A plain HTTP/1.1 GET; returns the status code and the body.
pub fn http_get(port: u16, path: &str) -> std::io::Result<(u16, String)> {
    let mut stream = TcpStream::connect(("127.0.0.1", port))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )?;
    let mut raw = String::new();
    stream.read_to_string(&mut raw)?;
    let status = raw
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = raw
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    Ok((status, body))
}

/// A TCP forwarder in front of the test PostgreSQL server that a test can switch off
/// (existing connections cut, new ones closed at once) to simulate the database going away.
pub struct ToggleProxy {
    pub port: u16,
    up: std::sync::Arc<std::sync::atomic::AtomicBool>,
    /// Added before each chunk is forwarded, in ms (a slow database or network).
    delay_ms: std::sync::Arc<std::sync::atomic::AtomicU64>,
    links: std::sync::Arc<std::sync::Mutex<Vec<tokio::task::JoinHandle<()>>>>,
    accept: tokio::task::JoinHandle<()>,
}

impl ToggleProxy {
    /// Starts forwarding 127.0.0.1:<port> to `target` (host:port).
    pub async fn start(target: String) -> Self {
        use std::sync::atomic::Ordering;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind proxy");
        let port = listener.local_addr().unwrap().port();
        let up = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
        let delay_ms = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let links = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let (up2, links2, delay2) = (up.clone(), links.clone(), delay_ms.clone());
        let accept = tokio::spawn(async move {
            while let Ok((inbound, _)) = listener.accept().await {
                if !up2.load(Ordering::SeqCst) {
                    drop(inbound);
                    continue;
                }
                let target = target.clone();
                let delay = delay2.clone();
                let link = tokio::spawn(async move {
                    if let Ok(outbound) = tokio::net::TcpStream::connect(&target).await {
                        let (a_read, a_write) = inbound.into_split();
                        let (b_read, b_write) = outbound.into_split();
                        tokio::select! {
                            _ = pump(a_read, b_write, delay.clone()) => {}
                            _ = pump(b_read, a_write, delay) => {}
                        }
                    }
                });
                links2.lock().unwrap().push(link);
            }
        });
        Self {
            port,
            up,
            delay_ms,
            links,
            accept,
        }
    }

    /// Delays every chunk forwarded either way by `delay` (zero: none).
    pub fn set_delay(&self, delay: Duration) {
        self.delay_ms.store(
            delay.as_millis() as u64,
            std::sync::atomic::Ordering::SeqCst,
        );
    }

    /// Up: forward. Down: cut every open connection and refuse new ones.
    pub fn set_up(&self, up: bool) {
        self.up.store(up, std::sync::atomic::Ordering::SeqCst);
        if !up {
            for link in self.links.lock().unwrap().drain(..) {
                link.abort();
            }
        }
    }

    /// `url` with its host and port replaced by the proxy's.
    /// A proxy in front of the test PostgreSQL server and a pool on `t`'s database through it.
    pub async fn in_front_of(t: &TestDb) -> (Self, sea_orm::DatabaseConnection) {
        let proxy = Self::start(host_port(&pg_admin_url())).await;
        let url = llm_tracker::config::DatabaseUrl::parse(
            "DATABASE_URL",
            &proxy.url_through(t.url.expose()),
        )
        .unwrap();
        let db = llm_tracker::db::connect(&url).await.unwrap();
        (proxy, db)
    }

    pub fn url_through(&self, url: &str) -> String {
        let mut u = url::Url::parse(url).expect("url");
        u.set_host(Some("127.0.0.1")).unwrap();
        u.set_port(Some(self.port)).unwrap();
        u.to_string()
    }
}

impl Drop for ToggleProxy {
    fn drop(&mut self) {
        self.accept.abort();
        self.set_up(false);
    }
}

/// Copies one direction of a proxied connection, sleeping the current delay before each chunk.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    delay_ms: std::sync::Arc<std::sync::atomic::AtomicU64>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        let ms = delay_ms.load(std::sync::atomic::Ordering::SeqCst);
        if ms > 0 {
            tokio::time::sleep(Duration::from_millis(ms)).await;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

/// `host:port` of a postgres URL.
pub fn host_port(url: &str) -> String {
    let u = url::Url::parse(url).expect("url");
    format!(
        "{}:{}",
        u.host_str().unwrap_or("127.0.0.1"),
        u.port().unwrap_or(5432)
    )
}

/// The PostgreSQL server binaries (`initdb`, `pg_ctl`): `PG_BINDIR` (set by `scripts/test.sh`),
/// else the newest `/usr/lib/postgresql/*/bin`. Missing is a failure, never a skip.
pub fn pg_bindir() -> PathBuf {
    if let Some(dir) = std::env::var_os("PG_BINDIR") {
        return PathBuf::from(dir);
    }
    let mut found: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok())
        .map(|e| e.path().join("bin"))
        .filter(|b| b.join("initdb").exists() && b.join("pg_ctl").exists())
        .collect();
    found.sort_by_key(|p| {
        p.parent()
            .and_then(|v| v.file_name())
            .and_then(|v| v.to_str())
            .and_then(|v| v.parse::<u32>().ok())
            .unwrap_or(0)
    });
    found.pop().unwrap_or_else(|| {
        panic!(
            "PostgreSQL server binaries not found (set PG_BINDIR or install postgresql): \
             tests that stop and start a server of their own need them"
        )
    })
}

/// A PostgreSQL server of one test's own, which the test can crash (`pg_ctl stop -m
/// immediate`) and start again. Runs as the `postgres` user when the tests run as root
/// (`initdb` refuses root), on a free loopback port, in a temporary directory; stopped when
/// dropped.
pub struct PrivatePg {
    pub port: u16,
    dir: tempfile::TempDir,
    bindir: PathBuf,
    as_root: bool,
}

impl PrivatePg {
    /// initdb and start.
    pub fn start() -> Self {
        let bindir = pg_bindir();
        let dir = tempfile::tempdir().expect("temp dir");
        let as_root = std::process::Command::new("id")
            .arg("-u")
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
            .unwrap_or(false);
        if as_root {
            let owned = std::process::Command::new("chown")
                .args(["postgres:", &dir.path().display().to_string()])
                .status()
                .expect("chown");
            assert!(
                owned.success(),
                "the postgres user must exist (scripts/test.sh adds it)"
            );
        }
        let pg = Self {
            port: free_port(),
            dir,
            bindir,
            as_root,
        };
        let data = pg.data_dir();
        let out = pg
            .command("initdb")
            .args(["-D", &data, "-U", "postgres", "-A", "trust", "-E", "UTF8"])
            .args(["--locale=C", "--no-sync"])
            .output()
            .expect("run initdb");
        assert!(
            out.status.success(),
            "initdb: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        pg.start_again();
        pg
    }

    fn data_dir(&self) -> String {
        self.dir.path().join("data").display().to_string()
    }

    fn command(&self, tool: &str) -> std::process::Command {
        let path = self.bindir.join(tool);
        if self.as_root {
            let mut c = std::process::Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(path);
            c
        } else {
            std::process::Command::new(path)
        }
    }

    /// Starts the server (again), waiting until it accepts connections.
    pub fn start_again(&self) {
        let opts = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200",
            self.port,
            self.dir.path().display()
        );
        let log = self.dir.path().join("server.log").display().to_string();
        let status = self
            .command("pg_ctl")
            .args([
                "-D",
                &self.data_dir(),
                "-l",
                &log,
                "-w",
                "-t",
                "60",
                "-o",
                &opts,
                "start",
            ])
            .stdout(std::process::Stdio::null())
            .status()
            .expect("run pg_ctl start");
        assert!(
            status.success(),
            "pg_ctl start: {}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
    }

    /// Crashes the server: every connection is cut, nothing is shut down cleanly.
    pub fn stop_immediate(&self) {
        let status = self
            .command("pg_ctl")
            .args(["-D", &self.data_dir(), "-m", "immediate", "-w", "stop"])
            .stdout(std::process::Stdio::null())
            .status()
            .expect("run pg_ctl stop");
        assert!(status.success(), "pg_ctl stop failed");
    }

    /// `postgres://postgres@127.0.0.1:<port>/postgres`.
    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }
}

impl Drop for PrivatePg {
    fn drop(&mut self) {
        let _ = self
            .command("pg_ctl")
            .args(["-D", &self.data_dir(), "-m", "immediate", "stop"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status();
    }
}

/// A TCP listener that accepts connections and never answers: a database that hangs.
pub struct Blackhole {
    pub port: u16,
    _accept: std::thread::JoinHandle<()>,
}

impl Blackhole {
    pub fn start() -> Self {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().unwrap().port();
        let accept = std::thread::spawn(move || {
            let mut held = Vec::new();
            for stream in listener.incoming().flatten() {
                held.push(stream);
            }
        });
        Self {
            port,
            _accept: accept,
        }
    }
}

/// A connection of its own holding SQLite's write lock on the test database (`BEGIN
/// EXCLUSIVE`) until it commits or is dropped: storage that is there but cannot be written.
pub async fn sqlite_write_lock(t: &TestDb) -> sea_orm::sqlx::SqliteConnection {
    use sea_orm::sqlx::Connection;
    let url = t.url.expose().replace("?mode=rwc", "");
    let mut conn = sea_orm::sqlx::SqliteConnection::connect(&url)
        .await
        .unwrap();
    sea_orm::sqlx::query("BEGIN EXCLUSIVE")
        .execute(&mut conn)
        .await
        .unwrap();
    conn
}

/// Rolls back the migration whose name starts with `name` (e.g. `m20261126_000011`) and every
/// one applied after it, so that a test of one migration's `down` does not depend on how many
/// came later.
pub async fn down_through(db: &sea_orm::DatabaseConnection, name: &str) {
    use migration::MigratorTrait;
    let all = migration::Migrator::migrations();
    let at = all
        .iter()
        .position(|m| m.name().starts_with(name))
        .unwrap_or_else(|| panic!("no migration {name}"));
    // The applied migrations from that one on (the database may be below the newest already).
    let applied: Vec<String> = migration::Migrator::get_applied_migrations(db)
        .await
        .unwrap()
        .iter()
        .map(|m| m.name().to_owned())
        .collect();
    let steps = all[at..]
        .iter()
        .filter(|m| applied.iter().any(|a| a == m.name()))
        .count();
    migration::Migrator::down(db, Some(u32::try_from(steps).unwrap()))
        .await
        .unwrap();
}
