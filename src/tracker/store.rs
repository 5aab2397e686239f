//! Storing usage rows so that none is ever lost.
//!
//! A row is inserted directly; when that fails (database down, locked, slow) it is appended
//! to a local spool file (JSON lines, fsynced) and a background worker re-inserts the spool
//! with backoff once storage answers again, and on the next start. Every row's id is made
//! before its first attempt and every insert is `ON CONFLICT (id) DO NOTHING`, so a row that
//! was stored by an attempt that looked failed (a timeout after commit) is still stored once.

use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use sea_orm::{DatabaseConnection, DbErr, SqlErr};
use tokio::sync::{Mutex, Notify, mpsc, oneshot};
use tokio::task::JoinHandle;

use crate::db::entities::usage;

/// How the store behaves.
#[derive(Debug, Clone)]
pub struct StoreOptions {
    /// The spool file (`USAGE_SPOOL_PATH`).
    pub spool_path: PathBuf,
    /// How long one direct insert may take before the row goes to the spool instead.
    pub insert_timeout: Duration,
    /// First and longest wait between replays while storage is failing.
    pub retry_min: Duration,
    pub retry_max: Duration,
    /// Whether a caller waits for its row's commit (`USAGE_WRITE_MODE`).
    pub write_mode: WriteMode,
    /// How often the rows written since the last time are folded into the usage rollup's
    /// cells (reads are exact before that too; this keeps what they add up small). `None`:
    /// never, by this store.
    pub fold_interval: Option<Duration>,
}

/// When `record` returns to the caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WriteMode {
    /// After the row is committed (or spooled): a row is readable once the call returns.
    #[default]
    Committed,
    /// As soon as the row is handed to the writers; the commit (or, failing it, the spool)
    /// follows within milliseconds. Saves the caller the commit's wait; a process killed
    /// outright (SIGKILL, power loss) loses the rows still in flight, a graceful stop
    /// (`shutdown`) does not.
    Queued,
}

impl StoreOptions {
    /// Defaults: 2 s per insert, replays every 100 ms doubling up to 5 s, folds every second.
    pub fn new(spool_path: impl Into<PathBuf>) -> Self {
        Self {
            spool_path: spool_path.into(),
            insert_timeout: Duration::from_secs(2),
            retry_min: Duration::from_millis(100),
            retry_max: Duration::from_secs(5),
            write_mode: WriteMode::Committed,
            fold_interval: Some(Duration::from_secs(1)),
        }
    }
}

/// Where a recorded row ended up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stored {
    /// In the database.
    Inserted,
    /// Waiting in the spool (or, if even the spool failed, in memory) for the database.
    Deferred,
    /// Handed to the writers ([`WriteMode::Queued`]); committed or spooled shortly.
    Queued,
}

struct Inner {
    db: DatabaseConnection,
    opts: StoreOptions,
    /// Serialises spool appends and replays.
    spool_lock: Mutex<()>,
    /// Rows that could not even be spooled (disk full): retried from memory.
    in_memory: Mutex<Vec<usage::Model>>,
    wake: Notify,
    stop: AtomicBool,
    /// Queued rows not yet committed or spooled, and a signal when that count drops.
    in_flight: std::sync::atomic::AtomicUsize,
    settled: Notify,
}

/// A row on its way to a writer, and where to say how it went.
type Job = (usage::Model, oneshot::Sender<Result<(), DbErr>>);

/// Most rows one multi-row insert carries.
const MAX_BATCH: usize = 256;

/// The write side of `llm_tracker_usage`, with the spool and its replay worker.
///
/// Direct inserts are group-committed: callers hand their row to a few writer tasks and wait
/// for its commit; rows that arrive together go in one multi-row `INSERT`, so many concurrent
/// callers cost few round trips while each still returns only once its row is stored.
pub struct UsageStore {
    inner: Arc<Inner>,
    jobs: mpsc::Sender<Job>,
    worker: std::sync::Mutex<Option<JoinHandle<()>>>,
    /// The rollup folder, and how to stop it.
    folder: std::sync::Mutex<Option<JoinHandle<()>>>,
    stop_folding: Arc<Notify>,
}

impl UsageStore {
    /// Opens the store, replays what an earlier run left in the spool (if the database
    /// answers), and starts the replay worker. Must be called inside a Tokio runtime.
    pub async fn open(db: DatabaseConnection, opts: StoreOptions) -> Self {
        let inner = Arc::new(Inner {
            db,
            opts,
            spool_lock: Mutex::new(()),
            in_memory: Mutex::new(Vec::new()),
            wake: Notify::new(),
            stop: AtomicBool::new(false),
            in_flight: std::sync::atomic::AtomicUsize::new(0),
            settled: Notify::new(),
        });
        let failing = match inner.replay().await {
            Ok(0) => false,
            Ok(n) => {
                tracing::info!(rows = n, "replayed usage rows from the spool");
                false
            }
            Err(e) => {
                tracing::warn!(error = %e, "spool replay at start failed; will retry");
                true
            }
        };
        let worker = tokio::spawn(worker(inner.clone(), failing));
        // SQLite has one writer at a time; PostgreSQL takes a few in parallel.
        let writers = match inner.db.get_database_backend() {
            sea_orm::DbBackend::Sqlite => 1,
            _ => 4,
        };
        let (jobs, queue) = mpsc::channel::<Job>(MAX_BATCH * writers * 4);
        let queue = Arc::new(Mutex::new(queue));
        for _ in 0..writers {
            tokio::spawn(writer(
                inner.db.clone(),
                queue.clone(),
                inner.opts.insert_timeout,
            ));
        }
        let stop_folding = Arc::new(Notify::new());
        let folder = inner.opts.fold_interval.map(|interval| {
            tokio::spawn(crate::usage::rollup::fold_every(
                inner.db.clone(),
                interval,
                stop_folding.clone(),
            ))
        });
        Self {
            inner,
            jobs,
            worker: std::sync::Mutex::new(Some(worker)),
            folder: std::sync::Mutex::new(folder),
            stop_folding,
        }
    }

    /// Stores one row: directly, or through the spool when the database does not take it.
    /// With [`WriteMode::Queued`] it returns once the row is handed over.
    pub async fn record(&self, row: usage::Model) -> Stored {
        if self.inner.opts.write_mode == WriteMode::Queued {
            self.inner.in_flight.fetch_add(1, Ordering::SeqCst);
            let (jobs, inner) = (self.jobs.clone(), self.inner.clone());
            tokio::spawn(async move {
                store_or_spool(&jobs, &inner, row).await;
                inner.in_flight.fetch_sub(1, Ordering::SeqCst);
                inner.settled.notify_waiters();
            });
            return Stored::Queued;
        }
        store_or_spool(&self.jobs, &self.inner, row).await
    }

    /// Rows waiting for the database (spool plus memory).
    pub async fn pending(&self) -> usize {
        let _guard = self.inner.spool_lock.lock().await;
        let spooled = read_spool(&self.inner.opts.spool_path)
            .map(|r| r.0.len())
            .unwrap_or(0);
        spooled + self.inner.in_memory.lock().await.len()
    }

    /// Tries to store everything pending now; returns how many rows went in.
    pub async fn flush(&self) -> Result<usize, DbErr> {
        self.inner.replay().await
    }

    /// Stops the worker after a last attempt to store what is pending; whatever the database
    /// still refuses stays in the spool for the next start. Safe to call more than once.
    pub async fn shutdown(&self) {
        // Queued rows first settle (each within the insert timeout plus a spool write).
        while self.inner.in_flight.load(Ordering::SeqCst) > 0 {
            let settled = self.inner.settled.notified();
            if self.inner.in_flight.load(Ordering::SeqCst) == 0 {
                break;
            }
            let _ = tokio::time::timeout(Duration::from_millis(50), settled).await;
        }
        self.inner.stop.store(true, Ordering::SeqCst);
        self.inner.wake.notify_one();
        let handle = self.worker.lock().ok().and_then(|mut w| w.take());
        if let Some(handle) = handle {
            let _ = handle.await;
        }
        // A last fold, after the last rows.
        self.stop_folding.notify_one();
        let folder = self.folder.lock().ok().and_then(|mut f| f.take());
        if let Some(folder) = folder {
            let _ = folder.await;
        }
    }
}

impl Drop for UsageStore {
    fn drop(&mut self) {
        // Without an orderly shutdown the spool (fsynced) still holds every deferred row.
        self.inner.stop.store(true, Ordering::SeqCst);
        self.inner.wake.notify_one();
        self.stop_folding.notify_one();
    }
}

/// Hands the row to the writers and waits for its commit; on failure or after the insert
/// timeout, spools it.
async fn store_or_spool(jobs: &mpsc::Sender<Job>, inner: &Inner, row: usage::Model) -> Stored {
    let (done, committed) = oneshot::channel();
    let stored = async {
        jobs.send((row.clone(), done))
            .await
            .map_err(|_| DbErr::Custom("usage writers stopped".into()))?;
        committed
            .await
            .map_err(|_| DbErr::Custom("usage writer went away".into()))?
    };
    match tokio::time::timeout(inner.opts.insert_timeout, stored).await {
        Ok(Ok(())) => return Stored::Inserted,
        Ok(Err(e)) => {
            tracing::warn!(row_id = %row.id, error = %e, "storing usage row failed; spooling it")
        }
        Err(_) => tracing::warn!(row_id = %row.id, "storing usage row timed out; spooling it"),
    }
    inner.defer(vec![row]).await;
    Stored::Deferred
}

impl Inner {
    /// Appends rows to the spool; if that fails too, keeps them in memory.
    async fn defer(&self, rows: Vec<usage::Model>) {
        let appended = {
            let _guard = self.spool_lock.lock().await;
            append_spool(&self.opts.spool_path, &rows)
        };
        if let Err(e) = appended {
            tracing::error!(path = %self.opts.spool_path.display(), error = %e, rows = rows.len(), "spool append failed; keeping rows in memory");
            self.in_memory.lock().await.extend(rows);
        }
        self.wake.notify_one();
    }

    /// Re-inserts everything pending; the spool file goes only once all of it is stored.
    async fn replay(&self) -> Result<usize, DbErr> {
        // Fail fast while the database is away, instead of waiting out the pool's timeouts.
        match tokio::time::timeout(self.opts.insert_timeout, self.db.ping()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(e),
            Err(_) => return Err(DbErr::Custom("database did not answer a ping".into())),
        }
        let mut stored = 0;
        let memory: Vec<usage::Model> = std::mem::take(&mut *self.in_memory.lock().await);
        if !memory.is_empty() {
            if let Err(e) = insert_rows(&self.db, &memory, self.opts.insert_timeout).await {
                self.in_memory.lock().await.extend(memory);
                return Err(e);
            }
            stored += memory.len();
        }
        let _guard = self.spool_lock.lock().await;
        let path = &self.opts.spool_path;
        let (rows, rejected) =
            read_spool(path).map_err(|e| DbErr::Custom(format!("reading spool: {e}")))?;
        if !rejected.is_empty() {
            tracing::error!(path = %path.display(), lines = rejected.len(), "unreadable spool lines moved aside");
            let _ = append_lines(&path.with_extension("rejected"), &rejected);
        }
        if rows.is_empty() {
            if !rejected.is_empty() {
                let _ = std::fs::remove_file(path);
            }
            return Ok(stored);
        }
        insert_rows(&self.db, &rows, self.opts.insert_timeout).await?;
        std::fs::remove_file(path).map_err(|e| DbErr::Custom(format!("removing spool: {e}")))?;
        Ok(stored + rows.len())
    }
}

async fn worker(inner: Arc<Inner>, mut failing: bool) {
    let mut delay = inner.opts.retry_min;
    loop {
        if failing {
            // While storage fails, new rows do not hasten the next try: only time does.
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = wait_for_stop(&inner) => {}
            }
        } else {
            inner.wake.notified().await;
        }
        let stopping = inner.stop.load(Ordering::SeqCst);
        match inner.replay().await {
            Ok(n) => {
                if n > 0 {
                    tracing::info!(rows = n, "stored usage rows from the spool");
                }
                failing = false;
                delay = inner.opts.retry_min;
            }
            Err(e) => {
                tracing::warn!(error = %e, retry_in_ms = delay.as_millis() as u64, "spool replay failed");
                failing = true;
                delay = (delay * 2).min(inner.opts.retry_max);
            }
        }
        if stopping {
            // Rows only in memory get one last chance to reach the spool.
            let memory: Vec<usage::Model> = std::mem::take(&mut *inner.in_memory.lock().await);
            if !memory.is_empty() {
                let _guard = inner.spool_lock.lock().await;
                if let Err(e) = append_spool(&inner.opts.spool_path, &memory) {
                    tracing::error!(error = %e, rows = memory.len(), "usage rows lost at shutdown: neither database nor spool took them");
                }
            }
            return;
        }
    }
}

/// Takes whatever rows are waiting (at least one, at most `MAX_BATCH`), inserts them in one
/// statement, and tells each caller. Ends when the store is dropped.
async fn writer(db: DatabaseConnection, queue: Arc<Mutex<mpsc::Receiver<Job>>>, timeout: Duration) {
    loop {
        let mut batch: Vec<Job> = Vec::new();
        {
            let mut queue = queue.lock().await;
            match queue.recv().await {
                Some(job) => batch.push(job),
                None => return,
            }
            while batch.len() < MAX_BATCH {
                match queue.try_recv() {
                    Ok(job) => batch.push(job),
                    Err(_) => break,
                }
            }
        }
        // A caller that already gave up (timed out and spooled its row) still gets its row
        // inserted here at most once: the spool replay is ON CONFLICT DO NOTHING.
        let rows: Vec<usage::Model> = batch.iter().map(|(row, _)| row.clone()).collect();
        let result = insert_rows(&db, &rows, timeout).await;
        for (_, done) in batch {
            let _ = done.send(result.clone());
        }
    }
}

async fn wait_for_stop(inner: &Inner) {
    while !inner.stop.load(Ordering::SeqCst) {
        inner.wake.notified().await;
    }
}

/// Inserts one row, idempotently. A row naming a user that does not exist is stored without
/// it (the id kept in `metadata.unknown_user_id`) rather than refused: the call happened.
pub(crate) async fn insert_one(db: &DatabaseConnection, row: usage::Model) -> Result<(), DbErr> {
    let attempt = usage::insert_rows(db, std::slice::from_ref(&row)).await;
    match attempt {
        Ok(_) => Ok(()),
        Err(e)
            if matches!(e.sql_err(), Some(SqlErr::ForeignKeyConstraintViolation(_)))
                && row.user_id.is_some() =>
        {
            let mut row = row;
            if let Some(map) = row.metadata.as_object_mut() {
                map.insert("unknown_user_id".into(), row.user_id.into());
            }
            row.user_id = None;
            usage::insert_rows(db, &[row]).await
        }
        Err(e) => Err(e),
    }
}

/// Inserts many rows in chunks, each bounded by `timeout`. A chunk refused for a row's own
/// sake (a constraint) is retried row by row; any other failure stops the replay, leaving the
/// spool in place for the next try.
async fn insert_rows(
    db: &DatabaseConnection,
    rows: &[usage::Model],
    timeout: Duration,
) -> Result<(), DbErr> {
    let timed_out = || DbErr::Custom("storing spooled rows timed out".into());
    for chunk in rows.chunks(200) {
        let batch = usage::insert_rows(db, chunk);
        match tokio::time::timeout(timeout, batch).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) if e.sql_err().is_some() => {
                for row in chunk {
                    tokio::time::timeout(timeout, insert_one(db, row.clone()))
                        .await
                        .map_err(|_| timed_out())??;
                }
            }
            Ok(Err(e)) => return Err(e),
            Err(_) => return Err(timed_out()),
        }
    }
    Ok(())
}

fn append_spool(path: &Path, rows: &[usage::Model]) -> std::io::Result<()> {
    let lines: Vec<String> = rows
        .iter()
        .map(|r| serde_json::to_string(r).map_err(std::io::Error::other))
        .collect::<Result<_, _>>()?;
    append_lines(path, &lines)
}

fn append_lines(path: &Path, lines: &[String]) -> std::io::Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)?;
    let mut buf = String::new();
    for line in lines {
        buf.push_str(line);
        buf.push('\n');
    }
    file.write_all(buf.as_bytes())?;
    file.sync_data()
}

/// The spool's rows, and the lines that are not rows (a write cut short by a crash).
fn read_spool(path: &Path) -> std::io::Result<(Vec<usage::Model>, Vec<String>)> {
    let file = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((Vec::new(), Vec::new())),
        Err(e) => return Err(e),
    };
    let (mut rows, mut rejected) = (Vec::new(), Vec::new());
    for line in std::io::BufReader::new(file).lines() {
        let line = line?;
        if line.trim().is_empty() {
            continue;
        }
        match serde_json::from_str::<usage::Model>(&line) {
            Ok(row) => rows.push(row),
            Err(_) => rejected.push(line),
        }
    }
    Ok((rows, rejected))
}
