//! Storing usage rows so that none is ever lost, without ever making the caller wait on the
//! database for longer than a fixed bound.
//!
//! A row goes to the writer tasks, which group-commit it with the rows of concurrent callers.
//! A caller waits for that commit at most [`StoreOptions::commit_deadline`]; past it, or when
//! the database refuses, the row is appended to a local spool file (JSON lines, fsynced,
//! group-committed too) and the caller goes on. While the database is unhealthy (down, locked,
//! slow, pool exhausted) callers skip the writers and go straight to the spool. A background
//! worker replays the spool with backoff and, once a replay succeeds, sends callers back to
//! the database. So from the provider's reply to a durable row (committed, or fsynced in the
//! spool) there is at most `commit_deadline` plus one spool write, whatever the database does.
//!
//! Every row's id is made before its first attempt and every insert is
//! `ON CONFLICT (id) DO NOTHING`, so a row that both committed late and was spooled is still
//! stored once.
//!
//! The spool is safe to share between processes: appends and the replay's claim of the file
//! take an exclusive `flock` on `<spool>.lock`; a replay renames the spool to a claim file of
//! its own (`<spool>.replay-<pid>-<n>`, `flock`ed while it is replayed), so appends never
//! wait for the database. A claim left by a process that died is picked up by the next replay.

use std::io::{BufRead, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use sea_orm::{DatabaseConnection, DbErr, SqlErr};
use tokio::sync::{Mutex, Notify, mpsc, oneshot};
use tokio::task::JoinHandle;

use crate::db::entities::usage;

/// How the store behaves.
#[derive(Debug, Clone)]
pub struct StoreOptions {
    /// The spool file (`USAGE_SPOOL_PATH`).
    pub spool_path: PathBuf,
    /// How long a caller waits for its row's commit before the row is spooled instead. A row
    /// is durable at most this plus one spool write after the provider's reply.
    pub commit_deadline: Duration,
    /// The longest one insert statement (direct or replay) may run before it is abandoned.
    /// Callers never wait for it; it only bounds how long a stuck statement keeps a writer.
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
    /// Apply pending migrations before the first write, retrying until the database answers
    /// (trackers that started while the database was unreachable). Until then rows are
    /// spooled.
    pub migrate: bool,
    /// How long [`UsageStore::shutdown`] spends at most on its last replay and its last fold;
    /// whatever is not stored by then stays in the spool for the next start.
    pub shutdown_timeout: Duration,
}

pub use crate::config::WriteMode;

impl StoreOptions {
    /// Defaults: 10 ms commit deadline, 30 s per insert statement, replays every 100 ms
    /// doubling up to 1 s, folds every second, 2 s for the last attempts at shutdown.
    pub fn new(spool_path: impl Into<PathBuf>) -> Self {
        Self {
            spool_path: spool_path.into(),
            commit_deadline: Duration::from_millis(10),
            insert_timeout: Duration::from_secs(30),
            retry_min: Duration::from_millis(100),
            retry_max: Duration::from_secs(1),
            write_mode: WriteMode::Committed,
            fold_interval: Some(Duration::from_secs(1)),
            migrate: false,
            shutdown_timeout: Duration::from_secs(2),
        }
    }
}

/// Where a recorded row ended up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stored {
    /// In the database.
    Inserted,
    /// In the spool (fsynced; or, if even the spool failed, in memory), waiting for the
    /// database.
    Deferred,
    /// Handed to the store ([`WriteMode::Queued`]); committed or spooled shortly (within
    /// a second at most).
    Queued,
}

/// Where a batch ended up ([`UsageStore::record_batch`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BatchStored {
    /// Committed; the ids inserted (the others were already stored).
    Inserted(Vec<uuid::Uuid>),
    /// In the spool, whole, waiting for the database (ids already stored are skipped then).
    Deferred,
}

struct Inner {
    db: DatabaseConnection,
    opts: StoreOptions,
    /// The writers' queue, for the replay on SQLite: every insert goes through the one writer,
    /// so that the replay never contends with it for the write lock. Weak, so that the writers
    /// end when the store does.
    jobs: mpsc::WeakSender<Job>,
    spool: Spool,
    /// Rows that could not even be spooled (disk full): retried from memory.
    in_memory: Mutex<Vec<usage::Model>>,
    /// One replay at a time in this process.
    replaying: Mutex<()>,
    wake: Notify,
    stop: AtomicBool,
    /// Callers try the database only while this is set; cleared when the database fails or
    /// stalls, set again by a successful replay.
    healthy: AtomicBool,
    /// Taken by the writer for each insert and by the folder for each fold on SQLite, so that
    /// they take turns here instead of at the file's write lock (where SQLite's busy handler
    /// sleeps milliseconds between tries, and callers missed their deadline at every fold).
    write_gate: Mutex<()>,
    /// Whether the schema is known to be in place (always, unless `opts.migrate`).
    migrated: Arc<AtomicBool>,
    /// When a writer last finished a batch, in µs since `epoch`.
    progress: AtomicU64,
    epoch: Instant,
    /// Queued rows not yet committed or spooled, and a signal when that count drops.
    in_flight: AtomicUsize,
    settled: Notify,
    /// When this store's folder last looked for new dense users: its own, so that stores of
    /// different databases in one process each look once a minute.
    promotion: migration::rollup::PromotionClock,
}

/// A row on its way to a writer, where to say how it went, and who has it: [`WAITING`] in the
/// queue, [`TAKEN`] by a writer, or [`WITHDRAWN`] by its caller (past the deadline, spooled).
type Job = (
    usage::Model,
    oneshot::Sender<Result<(), DbErr>>,
    Arc<AtomicU8>,
);

const WAITING: u8 = 0;
const TAKEN: u8 = 1;
const WITHDRAWN: u8 = 2;

/// How long a queued row ([`WriteMode::Queued`]) may wait for queue space and its commit before
/// it is spooled. Nobody waits for it, so it is longer than the commit deadline: a saturated
/// database then slows the writers down instead of sending rows through the spool twice.
const QUEUED_DEADLINE: Duration = Duration::from_secs(1);

/// Most rows one multi-row insert carries.
const MAX_BATCH: usize = 256;

/// How long the replay waits for the database to answer a ping before it tries again later.
const PING_TIMEOUT: Duration = Duration::from_secs(2);

/// The write side of `llm_tracker_usage`, with the spool and its replay worker.
///
/// Direct inserts are group-committed: callers hand their row to a few writer tasks and wait
/// for its commit (at most the commit deadline); rows that arrive together go in one multi-row
/// `INSERT`, so many concurrent callers cost few round trips.
pub struct UsageStore {
    inner: Arc<Inner>,
    jobs: mpsc::Sender<Job>,
    worker: std::sync::Mutex<Option<JoinHandle<()>>>,
    /// The rollup folder, and how to stop it.
    folder: std::sync::Mutex<Option<JoinHandle<()>>>,
    stop_folding: Arc<Notify>,
}

impl UsageStore {
    /// Opens the store and starts its workers; rows an earlier run left in the spool are
    /// replayed in the background as soon as the database answers. Never waits for the
    /// database. Must be called inside a Tokio runtime.
    pub async fn open(db: DatabaseConnection, opts: StoreOptions) -> Self {
        let migrate = opts.migrate;
        let writers = crate::db::Dialect::of(db.get_database_backend()).writers();
        let (jobs, queue) = mpsc::channel::<Job>(MAX_BATCH * writers * 4);
        let inner = Arc::new(Inner {
            spool: Spool::open(opts.spool_path.clone()),
            jobs: jobs.downgrade(),
            db,
            opts,
            in_memory: Mutex::new(Vec::new()),
            replaying: Mutex::new(()),
            write_gate: Mutex::new(()),
            wake: Notify::new(),
            stop: AtomicBool::new(false),
            healthy: AtomicBool::new(!migrate),
            migrated: Arc::new(AtomicBool::new(!migrate)),
            progress: AtomicU64::new(0),
            epoch: Instant::now(),
            in_flight: AtomicUsize::new(0),
            settled: Notify::new(),
            promotion: migration::rollup::PromotionClock::new(),
        });
        let worker = tokio::spawn(worker(inner.clone()));
        let queue = Arc::new(Mutex::new(queue));
        for _ in 0..writers {
            tokio::spawn(writer(inner.clone(), queue.clone()));
        }
        let stop_folding = Arc::new(Notify::new());
        let folder = inner.opts.fold_interval.map(|interval| {
            tokio::spawn(fold_every(inner.clone(), interval, stop_folding.clone()))
        });
        Self {
            inner,
            jobs,
            worker: std::sync::Mutex::new(Some(worker)),
            folder: std::sync::Mutex::new(folder),
            stop_folding,
        }
    }

    /// Stores one row: directly, or through the spool when the database does not take it
    /// within the commit deadline. With [`WriteMode::Queued`] it returns once the row is
    /// handed over.
    pub async fn record(&self, row: usage::Model) -> Stored {
        crate::metrics::metrics().observe_call(&row);
        if self.inner.opts.write_mode == WriteMode::Queued {
            self.inner.in_flight.fetch_add(1, Ordering::SeqCst);
            let (jobs, inner) = (self.jobs.clone(), self.inner.clone());
            let deadline = inner.opts.commit_deadline.max(QUEUED_DEADLINE);
            tokio::spawn(async move {
                store_or_spool(&jobs, &inner, row, deadline).await;
                inner.in_flight.fetch_sub(1, Ordering::SeqCst);
                inner.settled.notify_waiters();
            });
            return Stored::Queued;
        }
        store_or_spool(
            &self.jobs,
            &self.inner,
            row,
            self.inner.opts.commit_deadline,
        )
        .await
    }

    /// Stores a batch durably before returning, whatever the write mode: one transaction of
    /// multi-row inserts (`ON CONFLICT (id) DO NOTHING`, so ids already stored are skipped),
    /// or, when the database refuses it or does not commit it within `deadline`, the whole
    /// batch appended to the spool (one fsync) for the replay. For writers that hand over many
    /// rows at once and answer only once they are safe (the ingest API); a batch of 1,000 rows
    /// as 1,000 tracked rows would wait for 1,000 group-commit slots.
    pub async fn record_batch(&self, rows: Vec<usage::Model>, deadline: Duration) -> BatchStored {
        if rows.is_empty() {
            return BatchStored::Inserted(Vec::new());
        }
        if self.inner.healthy.load(Ordering::SeqCst) {
            let inner = &self.inner;
            let attempt = async {
                use sea_orm::TransactionTrait;
                // On SQLite the writers' turn, so that this never contends for the lock.
                let _turn = inner.sqlite_turn().await;
                let txn = inner.db.begin().await?;
                let mut inserted = Vec::with_capacity(rows.len());
                // PostgreSQL takes the rows as one JSON parameter, any number of them; SQLite
                // binds 15 values a row, within its 32,766.
                let per_statement = match inner.db.get_database_backend() {
                    sea_orm::DbBackend::Postgres => rows.len(),
                    _ => 500,
                };
                for chunk in rows.chunks(per_statement) {
                    inserted.extend(usage::insert_rows_returning(&txn, chunk).await?);
                }
                txn.commit().await.map(|()| inserted)
            };
            match tokio::time::timeout(deadline, attempt).await {
                Ok(Ok(inserted)) => {
                    // Calls counted once: the rows stored now, not those already there.
                    let m = crate::metrics::metrics();
                    let new: std::collections::HashSet<uuid::Uuid> =
                        inserted.iter().copied().collect();
                    for row in rows.iter().filter(|r| new.contains(&r.id.0)) {
                        m.observe_call(row);
                    }
                    m.rows_committed.inc_by(inserted.len() as u64);
                    return BatchStored::Inserted(inserted);
                }
                Ok(Err(e)) => {
                    tracing::warn!(rows = rows.len(), error = %e, "storing a batch of usage rows failed; spooling it");
                    if e.sql_err().is_none() {
                        inner.set_unhealthy();
                    }
                }
                Err(_) => {
                    tracing::warn!(
                        rows = rows.len(),
                        "a batch of usage rows was not committed in time; spooling it"
                    );
                }
            }
        }
        // Which of them are already stored is known only at the replay: counted as calls now.
        for row in &rows {
            crate::metrics::metrics().observe_call(row);
        }
        self.inner.defer(rows).await;
        BatchStored::Deferred
    }

    /// Rows waiting for the database (spool, claims being replayed, memory).
    pub async fn pending(&self) -> usize {
        let spool = self.inner.spool.clone();
        let spooled = tokio::task::spawn_blocking(move || spool.count_rows())
            .await
            .unwrap_or(0);
        spooled + self.inner.in_memory.lock().await.len()
    }

    /// Rows waiting in the spool files and in memory, and the spool files' bytes: for the
    /// metrics, cheaply (lines counted, not parsed; a torn last line counts as a row).
    pub async fn spool_depth(&self) -> (usize, u64) {
        let spool = self.inner.spool.clone();
        let (rows, bytes) = tokio::task::spawn_blocking(move || {
            std::iter::once(spool.path.clone())
                .chain(spool.claim_files())
                .map(|p| count_lines(&p))
                .fold((0, 0), |(r, b), (r2, b2)| (r + r2, b + b2))
        })
        .await
        .unwrap_or((0, 0));
        (rows + self.inner.in_memory.lock().await.len(), bytes)
    }

    /// Set once the schema is known to be in place: at once, or (with
    /// [`StoreOptions::migrate`]) when this store has migrated. `serve` reports readiness by it.
    pub fn schema_ready(&self) -> Arc<AtomicBool> {
        self.inner.migrated.clone()
    }

    /// Whether callers currently write to the database (else straight to the spool).
    pub fn is_healthy(&self) -> bool {
        self.inner.healthy.load(Ordering::SeqCst)
    }

    /// Tries to store everything pending now; returns how many rows went in.
    pub async fn flush(&self) -> Result<usize, DbErr> {
        self.inner.replay().await
    }

    /// Waits for queued rows to settle, makes a last attempt (within
    /// [`StoreOptions::shutdown_timeout`]) to store what is pending and to fold the rollup,
    /// and stops the workers; whatever the database still refuses stays in the spool for the
    /// next start. Safe to call more than once.
    pub async fn shutdown(&self) {
        // Queued rows first settle (each within the commit deadline plus a spool write).
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
        // A last fold, after the last rows (bounded by the folder itself).
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

/// Hands the row to the writers and waits for its commit up to `deadline` (queue space
/// included); on failure, past the deadline, or while the database is unhealthy, spools it.
async fn store_or_spool(
    jobs: &mpsc::Sender<Job>,
    inner: &Inner,
    row: usage::Model,
    deadline: Duration,
) -> Stored {
    if inner.healthy.load(Ordering::SeqCst) {
        let (done, committed) = oneshot::channel();
        let claim = Arc::new(AtomicU8::new(WAITING));
        let asked = Instant::now();
        let stored = async {
            jobs.send((row.clone(), done, claim.clone()))
                .await
                .map_err(|_| DbErr::Custom("usage writers stopped".into()))?;
            committed
                .await
                .map_err(|_| DbErr::Custom("usage writer went away".into()))?
        };
        match tokio::time::timeout(deadline, stored).await {
            Ok(Ok(())) => {
                crate::metrics::metrics().rows_committed.inc();
                return Stored::Inserted;
            }
            Ok(Err(e)) => {
                tracing::warn!(row_id = %row.id, error = %e, "storing usage row failed; spooling it");
                inner.set_unhealthy();
            }
            Err(_) => {
                // Past the deadline. A row no writer has taken yet is withdrawn, so that only
                // the spool's replay inserts it (a taken one may commit too: stored once).
                let _ =
                    claim.compare_exchange(WAITING, WITHDRAWN, Ordering::SeqCst, Ordering::SeqCst);
                // Busy writers that still finish batches are only slow for this row; writers
                // that finished nothing since it was asked are stuck.
                if inner.stalled_since(asked) {
                    tracing::warn!(row_id = %row.id, "the database stalls; spooling usage rows until it answers");
                    inner.set_unhealthy();
                }
            }
        }
    }
    inner.defer(vec![row]).await;
    Stored::Deferred
}

impl Inner {
    /// On SQLite, this process's turn to write (see `write_gate`); nothing elsewhere.
    async fn sqlite_turn(&self) -> Option<tokio::sync::MutexGuard<'_, ()>> {
        if crate::db::Dialect::of(self.db.get_database_backend()).single_writer() {
            Some(self.write_gate.lock().await)
        } else {
            None
        }
    }

    fn now_us(&self) -> u64 {
        self.epoch.elapsed().as_micros() as u64
    }

    /// No writer finished a batch since `asked`: the writers are stuck, not only busy.
    fn stalled_since(&self, asked: Instant) -> bool {
        let asked_us = asked.duration_since(self.epoch).as_micros() as u64;
        self.progress.load(Ordering::SeqCst) < asked_us
    }

    fn set_unhealthy(&self) {
        if self.healthy.swap(false, Ordering::SeqCst) {
            self.wake.notify_one();
        }
    }

    /// Appends rows to the spool (fsynced); if that fails too, keeps them in memory.
    async fn defer(&self, rows: Vec<usage::Model>) {
        crate::metrics::metrics()
            .rows_spooled
            .inc_by(rows.len() as u64);
        if let Err(e) = self.spool.append(rows.clone()).await {
            tracing::error!(path = %self.spool.path.display(), error = %e, rows = rows.len(), "spool append failed; keeping rows in memory");
            self.in_memory.lock().await.extend(rows);
        }
        self.wake.notify_one();
    }

    /// Inserts replayed rows. On SQLite through the writer (batched with live rows): two
    /// connections writing would take turns at the file's one write lock, and SQLite's busy
    /// handler sleeps milliseconds between tries. On PostgreSQL on a connection of its own,
    /// so that live rows do not queue behind a long replay. Directly once the store is gone.
    async fn insert_replayed(&self, rows: &[usage::Model]) -> Result<(), DbErr> {
        let through_writer = crate::db::Dialect::of(self.db.get_database_backend()).single_writer();
        let Some(jobs) = self.jobs.upgrade().filter(|_| through_writer) else {
            return insert_rows(&self.db, rows, self.opts.insert_timeout).await;
        };
        let gone = || DbErr::Custom("usage writers stopped".into());
        let mut acks = Vec::with_capacity(rows.len());
        for row in rows {
            let (done, ack) = oneshot::channel();
            jobs.send((row.clone(), done, Arc::new(AtomicU8::new(WAITING))))
                .await
                .map_err(|_| gone())?;
            acks.push(ack);
        }
        drop(jobs);
        for ack in acks {
            ack.await.map_err(|_| gone())??;
        }
        Ok(())
    }

    /// Migrates if that is still to do, then re-inserts everything pending: rows in memory,
    /// the spool (claimed first, so that appends go on meanwhile) and claims that an earlier
    /// attempt or a dead process left. A claim file goes only once all of it is stored.
    async fn replay(&self) -> Result<usize, DbErr> {
        let _one = self.replaying.lock().await;
        let timeout = self.opts.insert_timeout;
        let timed_out = |what: &str| DbErr::Custom(format!("{what} timed out"));
        // Fail fast while the database is away, instead of waiting out the pool's acquire
        // timeout (5 s): the next try comes sooner, and so does the recovery.
        tokio::time::timeout(timeout.min(PING_TIMEOUT), self.db.ping())
            .await
            .map_err(|_| timed_out("database ping"))??;
        if !self.migrated.load(Ordering::SeqCst) {
            tokio::time::timeout(timeout, crate::db::migrate(&self.db))
                .await
                .map_err(|_| timed_out("migrating"))??;
            self.migrated.store(true, Ordering::SeqCst);
            tracing::info!("database reachable: migrations applied");
        }
        let mut stored = 0;
        let memory: Vec<usage::Model> = std::mem::take(&mut *self.in_memory.lock().await);
        if !memory.is_empty() {
            if let Err(e) = self.insert_replayed(&memory).await {
                self.in_memory.lock().await.extend(memory);
                return Err(e);
            }
            crate::metrics::metrics()
                .rows_replayed
                .inc_by(memory.len() as u64);
            stored += memory.len();
        }
        let spool = self.spool.clone();
        let claims = tokio::task::spawn_blocking(move || spool.claim())
            .await
            .map_err(|e| DbErr::Custom(format!("claiming the spool: {e}")))?
            .map_err(|e| DbErr::Custom(format!("claiming the spool: {e}")))?;
        for claim in claims {
            // Parsing a long spool is CPU work: off the runtime, which callers share.
            let (claim, parsed) = tokio::task::spawn_blocking(move || {
                let parsed = claim.read();
                (claim, parsed)
            })
            .await
            .map_err(|e| DbErr::Custom(format!("reading spool: {e}")))?;
            let (rows, rejected) =
                parsed.map_err(|e| DbErr::Custom(format!("reading spool: {e}")))?;
            if !rejected.is_empty() {
                let aside = self.spool.rejected_path();
                tracing::error!(path = %aside.display(), lines = rejected.len(), "unreadable spool lines moved aside");
                crate::metrics::metrics()
                    .rows_rejected
                    .with_label_values(&["spool"])
                    .inc_by(rejected.len() as u64);
                let _ = append_lines(&aside, &rejected);
            }
            self.insert_replayed(&rows).await?;
            claim.remove();
            crate::metrics::metrics()
                .rows_replayed
                .inc_by(rows.len() as u64);
            stored += rows.len();
        }
        Ok(stored)
    }
}

/// Replays whenever rows are deferred, with backoff while that fails; a success marks the
/// database healthy again. At stop, one last attempt within the shutdown timeout.
async fn worker(inner: Arc<Inner>) {
    let mut delay = inner.opts.retry_min;
    // The first round runs at once: an earlier run may have left rows (or the schema).
    let mut failing = false;
    let mut first = true;
    loop {
        if !first {
            if failing {
                // While storage fails, new rows do not hasten the next try: only time does.
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = wait_for_stop(&inner) => {}
                }
            } else {
                inner.wake.notified().await;
            }
        }
        first = false;
        let stopping = inner.stop.load(Ordering::SeqCst);
        let attempt = if stopping {
            tokio::time::timeout(inner.opts.shutdown_timeout, inner.replay())
                .await
                .unwrap_or_else(|_| Err(DbErr::Custom("last replay timed out".into())))
        } else {
            inner.replay().await
        };
        match attempt {
            Ok(n) => {
                if n > 0 {
                    tracing::info!(rows = n, "stored usage rows from the spool");
                }
                if !inner.healthy.swap(true, Ordering::SeqCst) {
                    inner.progress.store(inner.now_us(), Ordering::SeqCst);
                    tracing::info!("the database answers again; usage rows go to it directly");
                }
                failing = false;
                delay = inner.opts.retry_min;
            }
            Err(e) => {
                if !failing || delay >= inner.opts.retry_max {
                    tracing::warn!(error = %e, retry_in_ms = delay.as_millis() as u64, "spool replay failed");
                }
                inner.healthy.store(false, Ordering::SeqCst);
                failing = true;
                delay = (delay * 2).min(inner.opts.retry_max);
            }
        }
        if stopping {
            // Rows only in memory get one last chance to reach the spool.
            let memory: Vec<usage::Model> = std::mem::take(&mut *inner.in_memory.lock().await);
            if !memory.is_empty()
                && let Err(e) = inner.spool.append(memory.clone()).await
            {
                tracing::error!(error = %e, rows = memory.len(), "usage rows lost at shutdown: neither database nor spool took them");
            }
            return;
        }
    }
}

/// Takes whatever rows are waiting (at least one, at most `MAX_BATCH`), inserts them in one
/// statement, and tells each caller. Ends when the store is dropped.
async fn writer(inner: Arc<Inner>, queue: Arc<Mutex<mpsc::Receiver<Job>>>) {
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
        // Rows their callers withdrew (past the deadline, spooled) are left to the replay.
        // One that a caller gives up on after this is inserted here and by the replay: stored
        // once (ON CONFLICT DO NOTHING).
        batch.retain(|(_, _, claim)| {
            claim
                .compare_exchange(WAITING, TAKEN, Ordering::SeqCst, Ordering::SeqCst)
                .is_ok()
        });
        if batch.is_empty() {
            continue;
        }
        let rows: Vec<usage::Model> = batch.iter().map(|(row, _, _)| row.clone()).collect();
        let result = {
            let _turn = inner.sqlite_turn().await;
            insert_rows(&inner.db, &rows, inner.opts.insert_timeout).await
        };
        if result.is_ok() {
            inner.progress.store(inner.now_us(), Ordering::SeqCst);
        }
        for (_, done, _) in batch {
            let _ = done.send(result.clone());
        }
    }
}

/// Folds the usage rollup every `interval` until `stop` is notified, then once more within the
/// shutdown timeout (a fold that cannot finish by then is left to the next process: reads are
/// exact anyway). Folds never wait on the insert path and never make it wait: see
/// `migration::rollup::fold` (PostgreSQL) and `write_gate` (SQLite).
async fn fold_every(inner: Arc<Inner>, interval: Duration, stop: Arc<Notify>) {
    let mut failing = false;
    loop {
        let stopping = tokio::select! {
            _ = tokio::time::sleep(interval) => false,
            _ = stop.notified() => true,
        };
        let fold = async {
            let _turn = inner.sqlite_turn().await;
            let started = Instant::now();
            let folded = migration::rollup::fold_with(&inner.db, &inner.promotion).await;
            if let Ok(true) = folded {
                crate::metrics::metrics()
                    .fold_duration
                    .observe(started.elapsed().as_secs_f64());
            }
            folded
        };
        let folded = if stopping {
            tokio::time::timeout(inner.opts.shutdown_timeout, fold)
                .await
                .unwrap_or_else(|_| Err(DbErr::Custom("the last fold timed out".into())))
        } else {
            fold.await
        };
        match folded {
            Ok(_) => failing = false,
            // Once per failing spell: the database is away, the spool has the rows' story.
            Err(e) if !failing => {
                tracing::warn!(error = %e, "folding the usage rollup failed; will retry");
                failing = true;
            }
            Err(_) => {}
        }
        if stopping {
            return;
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
    let timed_out = || DbErr::Custom("storing usage rows timed out".into());
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

/// Rows to append, and where to say whether they are on disk.
type Append = (Vec<usage::Model>, oneshot::Sender<std::io::Result<()>>);

/// The spool file and the thread that appends to it: appends that arrive together share one
/// write and one fsync.
#[derive(Clone)]
struct Spool {
    path: PathBuf,
    appends: std::sync::mpsc::Sender<Append>,
}

impl Spool {
    fn open(path: PathBuf) -> Self {
        let (appends, queue) = std::sync::mpsc::channel::<Append>();
        let thread_path = path.clone();
        std::thread::Builder::new()
            .name("usage-spool".into())
            .spawn(move || spool_appender(&thread_path, queue))
            .expect("spawning the spool thread");
        Self { path, appends }
    }

    /// Appends and fsyncs `rows`; returns once they are on disk.
    async fn append(&self, rows: Vec<usage::Model>) -> std::io::Result<()> {
        let (done, written) = oneshot::channel();
        self.appends
            .send((rows, done))
            .map_err(|_| std::io::Error::other("spool thread stopped"))?;
        written
            .await
            .map_err(|_| std::io::Error::other("spool thread stopped"))?
    }

    fn lock_path(&self) -> PathBuf {
        sibling(&self.path, ".lock")
    }

    /// Where lines that are not rows (a write cut short by a crash) are moved:
    /// `<spool>.rejected`.
    fn rejected_path(&self) -> PathBuf {
        sibling(&self.path, ".rejected")
    }

    /// The claim files of this spool: `<spool>.replay-*`.
    fn claim_files(&self) -> Vec<PathBuf> {
        let Some(name) = self.path.file_name().and_then(|n| n.to_str()) else {
            return Vec::new();
        };
        let prefix = format!("{name}.replay-");
        let dir = match self.path.parent().filter(|d| !d.as_os_str().is_empty()) {
            Some(d) => d.to_path_buf(),
            None => PathBuf::from("."),
        };
        let Ok(entries) = std::fs::read_dir(&dir) else {
            return Vec::new();
        };
        let mut files: Vec<PathBuf> = entries
            .filter_map(|e| e.ok())
            .filter(|e| {
                e.file_name()
                    .to_str()
                    .is_some_and(|n| n.starts_with(&prefix))
            })
            .map(|e| e.path())
            .collect();
        files.sort();
        files
    }

    /// Takes the spool for replay: renames it to a claim file of this process (under the
    /// spool lock, so no append is cut in two), then locks every claim file nobody else holds
    /// (this one, and those of earlier failed attempts or of processes that died).
    fn claim(&self) -> std::io::Result<Vec<Claim>> {
        static SEQ: AtomicU64 = AtomicU64::new(0);
        if self.path.exists() {
            let _lock = lock_exclusive(&self.lock_path())?;
            if self.path.exists() {
                let n = SEQ.fetch_add(1, Ordering::SeqCst);
                let nanos = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_nanos())
                    .unwrap_or(0);
                let claim = sibling(
                    &self.path,
                    &format!(".replay-{nanos:024}-{}-{n}", std::process::id()),
                );
                std::fs::rename(&self.path, &claim)?;
            }
        }
        let mut claims = Vec::new();
        for path in self.claim_files() {
            let Ok(file) = std::fs::File::open(&path) else {
                continue;
            };
            if file.try_lock().is_ok() {
                claims.push(Claim { path, file });
            }
        }
        Ok(claims)
    }

    /// Rows in the spool and in every claim file.
    fn count_rows(&self) -> usize {
        std::iter::once(self.path.clone())
            .chain(self.claim_files())
            .map(|p| read_rows(&p).map(|r| r.0.len()).unwrap_or(0))
            .sum()
    }
}

/// Lines (rows) and bytes of a spool file; nothing when it is missing.
fn count_lines(path: &Path) -> (usize, u64) {
    let Ok(mut file) = std::fs::File::open(path) else {
        return (0, 0);
    };
    let mut buf = vec![0u8; 64 * 1024];
    let (mut lines, mut bytes, mut last) = (0usize, 0u64, b'\n');
    while let Ok(n) = file.read(&mut buf) {
        if n == 0 {
            break;
        }
        lines += buf[..n].iter().filter(|&&b| b == b'\n').count();
        bytes += n as u64;
        last = buf[n - 1];
    }
    (lines + usize::from(last != b'\n'), bytes)
}

/// A spool file taken for replay, locked until it is removed or dropped.
struct Claim {
    path: PathBuf,
    file: std::fs::File,
}

impl Claim {
    fn read(&self) -> std::io::Result<(Vec<usage::Model>, Vec<String>)> {
        parse_rows(std::io::BufReader::new(&self.file))
    }

    /// Every row is stored: the file goes (then its lock).
    fn remove(self) {
        if let Err(e) = std::fs::remove_file(&self.path)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            tracing::warn!(path = %self.path.display(), error = %e, "removing a replayed spool file failed; its rows will be replayed again (stored once)");
        }
    }
}

/// `path` with `suffix` appended to its file name.
fn sibling(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(suffix);
    PathBuf::from(name)
}

fn lock_exclusive(path: &Path) -> std::io::Result<std::fs::File> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)?;
    file.lock()?;
    Ok(file)
}

/// The spool thread: takes every append waiting, writes them under the spool lock with one
/// fsync, and answers each. Ends when the store is gone.
fn spool_appender(path: &Path, queue: std::sync::mpsc::Receiver<Append>) {
    let lock_path = sibling(path, ".lock");
    while let Ok(first) = queue.recv() {
        let mut batch = vec![first];
        while let Ok(more) = queue.try_recv() {
            batch.push(more);
        }
        let lines: std::io::Result<Vec<String>> = batch
            .iter()
            .flat_map(|(rows, _)| rows.iter())
            .map(|r| serde_json::to_string(r).map_err(std::io::Error::other))
            .collect();
        let written = lines.and_then(|lines| {
            let _lock = lock_exclusive(&lock_path)?;
            append_lines(path, &lines)
        });
        for (_, done) in batch {
            let _ = done.send(match &written {
                Ok(()) => Ok(()),
                Err(e) => Err(std::io::Error::new(e.kind(), e.to_string())),
            });
        }
    }
}

/// Appends lines and fsyncs. A file whose last line was cut short by a crash first gets its
/// line ended, so that the torn line stays alone (and is moved aside at replay).
fn append_lines(path: &Path, lines: &[String]) -> std::io::Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .read(true)
        .append(true)
        .open(path)?;
    let mut buf = String::new();
    let len = file.metadata()?.len();
    if len > 0 {
        let mut last = [0u8; 1];
        file.seek(SeekFrom::Start(len - 1))?;
        file.read_exact(&mut last)?;
        if last[0] != b'\n' {
            buf.push('\n');
        }
    }
    for line in lines {
        buf.push_str(line);
        buf.push('\n');
    }
    file.write_all(buf.as_bytes())?;
    file.sync_data()
}

/// The rows of a spool file, and the lines that are not rows.
fn read_rows(path: &Path) -> std::io::Result<(Vec<usage::Model>, Vec<String>)> {
    match std::fs::File::open(path) {
        Ok(f) => parse_rows(std::io::BufReader::new(f)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok((Vec::new(), Vec::new())),
        Err(e) => Err(e),
    }
}

fn parse_rows(reader: impl BufRead) -> std::io::Result<(Vec<usage::Model>, Vec<String>)> {
    let (mut rows, mut rejected) = (Vec::new(), Vec::new());
    for line in reader.lines() {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn side_files_append_to_the_spool_name() {
        let spool = PathBuf::from("/var/lib/x.db.usage-spool.jsonl");
        assert_eq!(
            sibling(&spool, ".rejected"),
            PathBuf::from("/var/lib/x.db.usage-spool.jsonl.rejected")
        );
        assert_eq!(
            sibling(&spool, ".lock"),
            PathBuf::from("/var/lib/x.db.usage-spool.jsonl.lock")
        );
    }

    #[test]
    fn a_torn_last_line_stays_alone_when_more_is_appended() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("spool.jsonl");
        std::fs::write(&path, "{\"id\": \"torn").unwrap();
        append_lines(&path, &["{\"a\":1}".into(), "{\"b\":2}".into()]).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text, "{\"id\": \"torn\n{\"a\":1}\n{\"b\":2}\n");
    }
}
