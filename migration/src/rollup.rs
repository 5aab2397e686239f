//! The SQL of the usage rollup (`llm_tracker_usage_rollup`), shared by its migration, the
//! database triggers that keep it exact, and `llm-tracker rollup rebuild|verify`.
//!
//! One row per cell: `grain` (the cell's length in 15-minute UTC slots: 1 = 15 minutes,
//! 4 = an hour, 96 = a UTC day) × `slot` (the cell's first slot, `floor(epoch seconds / 900)`)
//! × `user_key` × `model` × `success`, holding the call count and every sum the statistics
//! need (tokens, cost in micro-dollars, latency in microseconds, and how many calls are priced
//! and timed). Each row of `llm_tracker_usage` is counted in six cells: one per grain per user,
//! and one per grain for all users together ([`ALL_USERS`]). The finest grain is the issue's
//! 15-minute table; the coarser ones let a query over months read a few thousand rows.
//!
//! `user_key` is the user's id, [`NO_USER`] for calls made for no user, or [`ALL_USERS`]: both
//! outside the range of `auth_user.id` (a 32-bit integer), so no real id can collide with them.
//!
//! A second table, [`TOTALS_TABLE`], holds the same cells without the model and success
//! dimensions (with `successful_calls` as a sum): a series over all models reads one row per
//! cell there instead of one per model and outcome.
//!
//! The per-row values are computed by the same expressions the raw-row statistics use
//! ([`slot_sql`], [`latency_us_sql`], [`cost_micros_sql`]), so the two agree exactly.

use sea_orm_migration::sea_orm::DbBackend;

/// The rollup table (per model and outcome).
pub const TABLE: &str = "llm_tracker_usage_rollup";

/// The rollup over all models and outcomes.
pub const TOTALS_TABLE: &str = "llm_tracker_usage_rollup_total";

/// The two rollup tables.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    /// [`TABLE`]: cells per model and success.
    ByModel,
    /// [`TOTALS_TABLE`]: cells over all models and outcomes.
    Total,
}

impl Level {
    pub const ALL: [Level; 2] = [Level::ByModel, Level::Total];

    pub fn table(self) -> &'static str {
        match self {
            Self::ByModel => TABLE,
            Self::Total => TOTALS_TABLE,
        }
    }

    /// The key columns, in key order.
    pub fn key(self) -> &'static [&'static str] {
        match self {
            Self::ByModel => &["grain", "user_key", "slot", "model", "success"],
            Self::Total => &["grain", "user_key", "slot"],
        }
    }

    /// The sum columns.
    pub fn sums(self) -> Vec<&'static str> {
        let mut out = SUM_COLUMNS.to_vec();
        if self == Self::Total {
            out.push("successful_calls");
        }
        out
    }
}

/// Cell lengths in 15-minute slots, finest first.
pub const GRAINS: [i64; 3] = [1, 4, 96];

/// `user_key` of the cells that count every user's calls together.
pub const ALL_USERS: i64 = 1 << 31;

/// `user_key` of the cells that count the calls made for no user (`user_id` null).
pub const NO_USER: i64 = (1 << 31) + 1;

/// Seconds in a slot.
pub const SLOT_SECONDS: i64 = 900;

/// The sum columns, in order.
pub const SUM_COLUMNS: [&str; 10] = [
    "calls",
    "prompt_tokens",
    "completion_tokens",
    "total_tokens",
    "cached_tokens",
    "reasoning_tokens",
    "cost_micros",
    "priced_calls",
    "latency_us",
    "latency_calls",
];

/// The 15-minute UTC slot of `created_at` (a column expression), rounded down.
///
/// PostgreSQL: exact epoch arithmetic. SQLite stores `created_at` as UTC text
/// (`YYYY-MM-DDTHH:MM:SS[.ffffff]+00:00`, or Django's `YYYY-MM-DD HH:MM:SS[.ffffff]`): the
/// slot comes from its first 19 characters, whole seconds, so a fraction never rounds into the
/// next second and the slot agrees with comparisons of the text. Only functions every SQLite
/// version has (`strftime`), because the triggers run inside whichever program writes a row —
/// the Django app's Python `sqlite3` too.
pub fn slot_sql(backend: DbBackend, created_at: &str) -> String {
    match backend {
        DbBackend::Postgres => {
            format!("CAST(floor(extract(epoch FROM {created_at}) / 900) AS BIGINT)")
        }
        _ => {
            let secs = format!("CAST(strftime('%s', substr({created_at}, 1, 19)) AS INTEGER)");
            format!("(({secs} - (({secs} % 900) + 900) % 900) / 900)")
        }
    }
}

/// SQLite: the instant stored in `col` as whole microseconds since the epoch, in integer
/// arithmetic on the text (`YYYY-MM-DDTHH:MM:SS[.f…]+00:00`, or Django's naive
/// `YYYY-MM-DD HH:MM:SS[.ffffff]`): whole seconds by `strftime` on the first 19 characters, the
/// fraction's digits read as text. SQLite's own fraction parsing works in floating point and
/// rounds differently from version to version; this does not, so the trigger (run by whichever
/// program writes the row) and the raw-row statistics agree to the microsecond.
fn sqlite_epoch_micros(col: &str) -> String {
    let rest = format!("substr({col}, 21)");
    let digits = format!(
        "substr({rest}, 1, CASE WHEN instr({rest}, '+') > 0 THEN instr({rest}, '+') - 1 \
         WHEN instr({rest}, '-') > 0 THEN instr({rest}, '-') - 1 \
         WHEN instr({rest}, 'Z') > 0 THEN instr({rest}, 'Z') - 1 ELSE 6 END)"
    );
    format!(
        "(CAST(strftime('%s', substr({col}, 1, 19)) AS INTEGER) * 1000000 + \
         CASE WHEN substr({col}, 20, 1) = '.' THEN CAST(substr({digits} || '000000', 1, 6) AS INTEGER) ELSE 0 END)"
    )
}

/// One row's latency (`created_at − started_at`, negative clock skew as 0) in whole
/// microseconds; NULL when `started_at` is NULL.
pub fn latency_us_sql(backend: DbBackend, created_at: &str, started_at: &str) -> String {
    match backend {
        DbBackend::Postgres => format!(
            "CAST(EXTRACT(EPOCH FROM GREATEST({created_at} - {started_at}, INTERVAL '0')) * 1000000 AS BIGINT)"
        ),
        _ => format!(
            "CASE WHEN {started_at} IS NULL THEN NULL ELSE MAX(0, {} - {}) END",
            sqlite_epoch_micros(created_at),
            sqlite_epoch_micros(started_at)
        ),
    }
}

/// One row's cost in micro-dollars (PostgreSQL `numeric(12,6)` USD; SQLite stores
/// micro-dollars); NULL when unpriced.
pub fn cost_micros_sql(backend: DbBackend, cost: &str) -> String {
    match backend {
        DbBackend::Postgres => format!("CAST({cost} * 1000000 AS BIGINT)"),
        _ => format!("CAST({cost} AS INTEGER)"),
    }
}

/// A rollup table. The primary key serves every read: a grain, one user key (or all), a slot
/// range.
pub fn create_table_sql(backend: DbBackend, level: Level) -> String {
    let (int, boolean) = match backend {
        DbBackend::Postgres => ("bigint", "boolean"),
        _ => ("integer", "bool"),
    };
    let mut columns = vec![
        format!("    grain {int} NOT NULL"),
        format!("    user_key {int} NOT NULL"),
        format!("    slot {int} NOT NULL"),
    ];
    if level == Level::ByModel {
        columns.push("    model varchar(255) NOT NULL".to_owned());
        columns.push(format!("    success {boolean} NOT NULL"));
    }
    columns.extend(
        level
            .sums()
            .iter()
            .map(|c| format!("    {c} {int} NOT NULL DEFAULT 0")),
    );
    format!(
        "CREATE TABLE IF NOT EXISTS {} (\n{},\n    PRIMARY KEY ({})\n)",
        level.table(),
        columns.join(",\n"),
        level.key().join(", ")
    )
}

/// The per-row values of `prefix`-qualified columns (`NEW.`, `OLD.` or ``), with `sign` (+1
/// counts a row in, -1 out), as the select list of a derived table.
fn row_values(backend: DbBackend, sign: i32, prefix: &str) -> String {
    let col = |c: &str| format!("{prefix}{c}");
    format!(
        "{sign} AS sign, {user} AS user_id, {slot} AS slot, {model} AS model, {success} AS success, \
         {p} AS prompt_tokens, {c} AS completion_tokens, {t} AS total_tokens, {ca} AS cached_tokens, \
         {r} AS reasoning_tokens, {cost} AS cost_micros, \
         CASE WHEN {raw_cost} IS NULL THEN 0 ELSE 1 END AS priced, {latency} AS latency_us, \
         CASE WHEN {started} IS NULL THEN 0 ELSE 1 END AS timed, \
         CASE WHEN {success} THEN 1 ELSE 0 END AS ok",
        user = col("user_id"),
        slot = slot_sql(backend, &col("created_at")),
        model = col("model"),
        success = col("success"),
        p = col("prompt_tokens"),
        c = col("completion_tokens"),
        t = col("total_tokens"),
        ca = col("cached_tokens"),
        r = col("reasoning_tokens"),
        cost = cost_micros_sql(backend, &col("cost")),
        raw_cost = col("cost"),
        latency = latency_us_sql(backend, &col("created_at"), &col("started_at")),
        started = col("started_at"),
    )
}

/// Where the counted rows come from.
pub enum Source<'a> {
    /// A table or transition table (`new_rows`), each row counted with `sign`; `where_sql`
    /// optionally restricts it.
    Table {
        name: &'a str,
        sign: i32,
        where_sql: Option<&'a str>,
    },
    /// The rows of a SQLite row trigger: `(prefix, sign)` pairs such as `("NEW.", 1)`.
    Rows(&'a [(&'a str, i32)]),
}

/// `SELECT` of the `level` cells of `sources` (key and sums, grouped), without the insert.
pub fn cells_select(backend: DbBackend, sources: &[Source<'_>], level: Level) -> String {
    let parts: Vec<String> = sources
        .iter()
        .flat_map(|s| match s {
            Source::Table {
                name,
                sign,
                where_sql,
            } => vec![format!(
                "SELECT {} FROM {name}{}",
                row_values(backend, *sign, ""),
                where_sql.map(|w| format!(" WHERE {w}")).unwrap_or_default()
            )],
            Source::Rows(rows) => rows
                .iter()
                .map(|(prefix, sign)| format!("SELECT {}", row_values(backend, *sign, prefix)))
                .collect(),
        })
        .collect();
    let grains: Vec<String> = GRAINS
        .iter()
        .flat_map(|g| [(g, 1), (g, 0)])
        .map(|(g, per_user)| format!("SELECT {g} AS grain, {per_user} AS per_user"))
        .collect();
    let sum = |expr: &str| format!("COALESCE(SUM(d.sign * {expr}), 0)");
    let (dims, group, ok) = match level {
        Level::ByModel => (
            "d.model AS model, d.success AS success, ",
            "1, 2, 3, 4, 5",
            String::new(),
        ),
        Level::Total => (
            "",
            "1, 2, 3",
            format!(", {} AS successful_calls", sum("d.ok")),
        ),
    };
    format!(
        "SELECT g.grain AS grain, \
         CASE WHEN g.per_user = 1 THEN COALESCE(d.user_id, {NO_USER}) ELSE {ALL_USERS} END AS user_key, \
         d.slot - ((d.slot % g.grain) + g.grain) % g.grain AS slot, {dims}\
         {calls} AS calls, {p} AS prompt_tokens, {c} AS completion_tokens, {t} AS total_tokens, \
         {ca} AS cached_tokens, {r} AS reasoning_tokens, {cost} AS cost_micros, {priced} AS priced_calls, \
         {lat} AS latency_us, {timed} AS latency_calls{ok} \
         FROM ({rows}) d CROSS JOIN ({grains}) g \
         WHERE 1 = 1 \
         GROUP BY {group}",
        calls = sum("1"),
        p = sum("d.prompt_tokens"),
        c = sum("d.completion_tokens"),
        t = sum("d.total_tokens"),
        ca = sum("d.cached_tokens"),
        r = sum("d.reasoning_tokens"),
        cost = sum("d.cost_micros"),
        priced = sum("d.priced"),
        lat = sum("d.latency_us"),
        timed = sum("d.timed"),
        rows = parts.join(" UNION ALL "),
        grains = grains.join(" UNION ALL "),
    )
}

/// `INSERT … ON CONFLICT DO UPDATE` adding the cells of `sources` to the `level` table. Cells
/// whose sums are all zero (an update that changed nothing counted) are skipped; keys are
/// inserted in key order, so concurrent writers lock shared cells in the same order.
pub fn upsert_sql(backend: DbBackend, sources: &[Source<'_>], level: Level) -> String {
    let table = level.table();
    let key = level.key().join(", ");
    let sums = level.sums();
    let any_change: Vec<String> = sums.iter().map(|c| format!("{c} <> 0")).collect();
    let updates: Vec<String> = sums
        .iter()
        .map(|c| format!("{c} = {table}.{c} + excluded.{c}"))
        .collect();
    format!(
        "INSERT INTO {table} ({key}, {columns}) \
         SELECT * FROM ({select}) cells WHERE {any} ORDER BY {key} \
         ON CONFLICT ({key}) DO UPDATE SET {updates}",
        columns = sums.join(", "),
        select = cells_select(backend, sources, level),
        any = any_change.join(" OR "),
        updates = updates.join(", "),
    )
}

/// The upserts of both tables, `;`-separated (a trigger body).
fn upserts(backend: DbBackend, sources: &[Source<'_>]) -> String {
    Level::ALL
        .iter()
        .map(|level| upsert_sql(backend, sources, *level))
        .collect::<Vec<_>>()
        .join(";\n")
}

/// The statements that recreate the rollup from every row (run in one transaction; on
/// PostgreSQL writers wait for it, they are not refused).
pub fn rebuild_sql(backend: DbBackend) -> Vec<String> {
    let mut out = Vec::new();
    if backend == DbBackend::Postgres {
        out.push("LOCK TABLE llm_tracker_usage IN SHARE MODE".to_owned());
    }
    for level in Level::ALL {
        out.push(format!("DELETE FROM {}", level.table()));
        out.push(upsert_sql(
            backend,
            &[Source::Table {
                name: "llm_tracker_usage",
                sign: 1,
                where_sql: None,
            }],
            level,
        ));
    }
    out
}

/// Trigger names, for `down` and for checks.
pub const TRIGGERS: [&str; 4] = [
    "llm_tracker_usage_rollup_insert",
    "llm_tracker_usage_rollup_delete",
    "llm_tracker_usage_rollup_update",
    "llm_tracker_usage_rollup_truncate",
];

/// The statements creating the triggers that keep the rollup exact, whoever writes the rows.
///
/// PostgreSQL: statement-level triggers with transition tables, so a multi-row insert (the
/// tracker's group commit) updates each cell once with the batch's sums; TRUNCATE empties the
/// rollup. SQLite: row-level triggers (it has no statement-level ones).
pub fn create_triggers_sql(backend: DbBackend) -> Vec<String> {
    match backend {
        DbBackend::Postgres => {
            let table = |name: &'static str, sign: i32| Source::Table {
                name,
                sign,
                where_sql: None,
            };
            let function = |name: &str, body: String| {
                format!(
                    "CREATE OR REPLACE FUNCTION {name}() RETURNS trigger LANGUAGE plpgsql AS $fn$\nBEGIN\n{body};\nRETURN NULL;\nEND\n$fn$"
                )
            };
            let trigger = |name: &str, event: &str, referencing: &str| {
                [
                    format!("DROP TRIGGER IF EXISTS {name} ON llm_tracker_usage"),
                    format!(
                        "CREATE TRIGGER {name} AFTER {event} ON llm_tracker_usage {referencing} FOR EACH STATEMENT EXECUTE FUNCTION {name}()"
                    ),
                ]
            };
            let mut out = vec![
                function(TRIGGERS[0], upserts(backend, &[table("new_rows", 1)])),
                function(TRIGGERS[1], upserts(backend, &[table("old_rows", -1)])),
                function(
                    TRIGGERS[2],
                    upserts(backend, &[table("old_rows", -1), table("new_rows", 1)]),
                ),
                function(
                    TRIGGERS[3],
                    format!("DELETE FROM {TABLE}; DELETE FROM {TOTALS_TABLE}"),
                ),
            ];
            out.extend(trigger(
                TRIGGERS[0],
                "INSERT",
                "REFERENCING NEW TABLE AS new_rows",
            ));
            out.extend(trigger(
                TRIGGERS[1],
                "DELETE",
                "REFERENCING OLD TABLE AS old_rows",
            ));
            out.extend(trigger(
                TRIGGERS[2],
                "UPDATE",
                "REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows",
            ));
            out.extend(trigger(TRIGGERS[3], "TRUNCATE", ""));
            out
        }
        _ => {
            let trigger = |name: &str, event: &str, rows: &[(&str, i32)]| {
                format!(
                    "CREATE TRIGGER IF NOT EXISTS {name} AFTER {event} ON llm_tracker_usage FOR EACH ROW BEGIN {}; END",
                    upserts(backend, &[Source::Rows(rows)])
                )
            };
            vec![
                trigger(TRIGGERS[0], "INSERT", &[("NEW.", 1)]),
                trigger(TRIGGERS[1], "DELETE", &[("OLD.", -1)]),
                trigger(TRIGGERS[2], "UPDATE", &[("OLD.", -1), ("NEW.", 1)]),
            ]
        }
    }
}

/// The statements dropping the triggers (and on PostgreSQL their functions).
pub fn drop_triggers_sql(backend: DbBackend) -> Vec<String> {
    let mut out = Vec::new();
    for name in TRIGGERS {
        match backend {
            DbBackend::Postgres => {
                out.push(format!(
                    "DROP TRIGGER IF EXISTS {name} ON llm_tracker_usage"
                ));
                out.push(format!("DROP FUNCTION IF EXISTS {name}()"));
            }
            _ => out.push(format!("DROP TRIGGER IF EXISTS {name}")),
        }
    }
    out
}
