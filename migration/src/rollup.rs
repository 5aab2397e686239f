//! The SQL of the usage rollup (`llm_tracker_usage_rollup`), shared by its migration, the
//! database triggers that keep it exact, and `llm-tracker rollup rebuild|verify`.
//!
//! One row per cell: `grain` (which kind of cell, see [`GRAINS`] and [`Calendar`]) × `slot`
//! (the cell's first 15-minute UTC slot, `floor(epoch seconds / 900)`) × `user_key` × `model`
//! × `success`, holding the call count and every sum the statistics need (tokens, cost in
//! micro-dollars, latency and time to first token in microseconds, and how many calls are
//! priced and timed).
//!
//! **Layout (migration 000011).** The cells for all users together ([`ALL_USERS`]) exist at
//! every fixed grain: 15-minute slots, UTC hours, hours starting at :15 and :30, UTC days. The
//! cells of one user exist only where they compress that user's rows: UTC days in both tables,
//! and UTC calendar months and years in the totals table ([`per_user`]). A user with one call a
//! day has one cell a day instead of one per grain; the finer statistics of one user come from
//! the usage table's `(user_id, created_at)` index. See `docs/architecture.md` for the sizes.
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
//!
//! Writers do not touch the cells. Triggers append each written row's signed contribution to
//! [`DELTA_TABLE`] (insert-only: no lookups, no locks shared between writers), and a fold
//! ([`fold_sql`]) moves the pending contributions into the cells in one transaction, every
//! second or so. Readers add the pending contributions to the cells they read, in the same
//! snapshot, so a read is exact whether or not the fold has run. (Migration 000005 kept the
//! cells by direct upserts in the triggers, frozen in its SQL files; 000006 moved to the delta
//! table, because each write then contended for the same hot cells and paid for twelve
//! upserts.)

use sea_orm_migration::sea_orm::DbBackend;

/// The rollup table (per model and outcome).
pub const TABLE: &str = "llm_tracker_usage_rollup";

/// The rollup over all models and outcomes.
pub const TOTALS_TABLE: &str = "llm_tracker_usage_rollup_total";

/// The retention state (migration 000018): one row (`id` 1) holding the horizon — the first
/// 15-minute slot (always a UTC midnight) from which the usage table still has every row; the
/// cells before it keep the statistics of rows retention deleted — and `deleting`, true only
/// inside a retention transaction, where it tells the delete trigger to leave the cells alone
/// (set and cleared in the same transaction, so no other transaction ever sees it true).
pub const RETENTION_TABLE: &str = "llm_tracker_usage_retention";

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

/// A kind of cell: its code in the `grain` column, its length in slots, and its phase (the
/// remainder of its first slot divided by its length).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Grain {
    pub code: i64,
    pub len: i64,
    pub phase: i64,
}

impl Grain {
    const fn new(code: i64, len: i64, phase: i64) -> Self {
        Self { code, len, phase }
    }
}

/// The 15-minute slot, the UTC hour, the UTC day, and the hours that start at :15 and :30 past
/// a UTC hour (migration 000007): the hours of zones whose offset is not a whole number of
/// hours — :45 (Nepal, Chatham, Eucla) and :30 (India, Iran, Newfoundland, central Australia…)
/// — so that an hourly series there reads one cell per hour, not four. (No zone in use has an
/// offset of :15, whose hours would start at :45.)
pub const GRAINS: [Grain; 5] = [
    Grain::new(1, 1, 0),
    Grain::new(4, 4, 0),
    Grain::new(96, 96, 0),
    Grain::new(5, 4, 1),
    Grain::new(6, 4, 2),
];

/// The grains added by migration 000007.
pub const PHASED_HOURS: [Grain; 2] = [GRAINS[3], GRAINS[4]];

/// The grain of the hour cell whose first slot is `slot`, if there is one.
pub fn hour_grain(slot: i64) -> Option<Grain> {
    GRAINS
        .iter()
        .copied()
        .find(|g| g.len == 4 && slot.rem_euclid(4) == g.phase)
}

/// The calendar cells: a UTC month or a UTC year, keyed by the slot it starts at (migration
/// 000011; per user, in the totals table only). A range of whole months or years (a report, or
/// "all time", whose open ends may be widened to whole years because no row lies outside the
/// rollup's extent) reads one cell per user and month or year.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Calendar {
    Month,
    Year,
}

impl Calendar {
    pub const ALL: [Calendar; 2] = [Calendar::Month, Calendar::Year];

    /// Its code in the `grain` column (distinct from every [`GRAINS`] code).
    pub const fn code(self) -> i64 {
        match self {
            Self::Month => 2976,
            Self::Year => 35040,
        }
    }

    /// SQL: the first slot of the next month or year after the one that starts at slot `slot`.
    pub fn next_sql(self, backend: DbBackend, slot: &str) -> String {
        let unit = match self {
            Self::Month => "month",
            Self::Year => "year",
        };
        match backend {
            DbBackend::Postgres => format!(
                "CAST(extract(epoch FROM (to_timestamp(({slot}) * 900) AT TIME ZONE 'UTC') + interval '1 {unit}') / 900 AS BIGINT)"
            ),
            _ => format!(
                "(CAST(strftime('%s', ({slot}) * 900, 'unixepoch', '+1 {unit}') AS INTEGER) / 900)"
            ),
        }
    }

    /// SQL: the first slot of the month or year holding slot `slot` (an integer expression).
    pub fn start_sql(self, backend: DbBackend, slot: &str) -> String {
        let unit = match self {
            Self::Month => "month",
            Self::Year => "year",
        };
        match backend {
            DbBackend::Postgres => format!(
                "CAST(extract(epoch FROM date_trunc('{unit}', to_timestamp(({slot}) * 900) AT TIME ZONE 'UTC')) / 900 AS BIGINT)"
            ),
            _ => format!(
                "(CAST(strftime('%s', ({slot}) * 900, 'unixepoch', 'start of {unit}') AS INTEGER) / 900)"
            ),
        }
    }
}

/// Which cells a row is counted in besides those of all users: its user's cells, by table.
/// The fixed grains of [`GRAINS`] that a user has, and the calendar grains: in the totals table
/// UTC days, months and years (migration 000011); per model and outcome UTC months only
/// (migration 000021 — a user's day per model and outcome held one call in four cells of five
/// at 10,000 users, as large as the rows it summed; see `docs/architecture.md`).
pub fn per_user(level: Level) -> (&'static [i64], &'static [Calendar]) {
    match level {
        Level::ByModel => (&[], &[Calendar::Month]),
        Level::Total => (&[DAY], &Calendar::ALL),
    }
}

/// The calendar cells of all users together, in both tables (migration 000022): UTC months, so
/// that sums over months (all time, a year's monthly series, a report) read a dozen cells per
/// model and outcome instead of hundreds of days.
pub const ALL_USERS_CALENDAR: [Calendar; 1] = [Calendar::Month];

/// The grain code of a day cell.
pub const DAY: i64 = 96;

/// `user_key` of the cells that count every user's calls together.
pub const ALL_USERS: i64 = 1 << 31;

/// `user_key` of the cells that count the calls made for no user (`user_id` null).
pub const NO_USER: i64 = (1 << 31) + 1;

/// Seconds in a slot.
pub const SLOT_SECONDS: i64 = 900;

/// The sum columns, in order.
pub const SUM_COLUMNS: [&str; 12] = [
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
    "ttft_us",
    "ttft_calls",
];

/// Pending contributions of written rows, not yet folded into the cells: one row per written
/// usage row (two for an update: the old values out, the new in), shaped like a cell of the
/// finest grain for one user.
pub const DELTA_TABLE: &str = "llm_tracker_usage_rollup_delta";

/// The key columns of a delta row. `latency_bucket` (migration 000020) is the row's latency
/// bucket ([`latency_bucket_sql`]), NULL for a row without a latency — and for the
/// contributions written before 000020, whose rows its backfill counted into the histograms.
pub const DELTA_KEY: [&str; 5] = ["slot", "user_key", "model", "success", "latency_bucket"];

/// The sum columns of a delta row (those of [`TOTALS_TABLE`]), signed.
pub fn delta_sums() -> Vec<&'static str> {
    Level::Total.sums()
}

/// `SELECT` of the delta rows of `from` summed per delta key; with `nonzero`, only the keys
/// whose sums are not all zero.
fn delta_per_key(from: &str, nonzero: bool) -> String {
    let key = DELTA_KEY.join(", ");
    let sums: Vec<String> = delta_sums()
        .iter()
        .map(|c| format!("SUM({c}) AS {c}"))
        .collect();
    let having = if nonzero {
        let any: Vec<String> = delta_sums()
            .iter()
            .map(|c| format!("SUM({c}) <> 0"))
            .collect();
        format!(" HAVING {}", any.join(" OR "))
    } else {
        String::new()
    };
    format!(
        "SELECT {key}, {} FROM {from} GROUP BY {key}{having}",
        sums.join(", ")
    )
}

/// The first slot of the cell of `len` slots and `phase` that holds `slot` (SQL expressions).
fn cell_start_sql(slot: &str, len: &str, phase: &str) -> String {
    format!("{slot} - ((({slot} - {phase}) % {len}) + {len}) % {len}")
}

/// Every column of a delta row, comma-separated: the key, then the sums.
fn delta_columns() -> String {
    let mut columns: Vec<&str> = DELTA_KEY.to_vec();
    columns.extend(delta_sums());
    columns.join(", ")
}

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
        // (GREATEST skips a NULL: without the CASE a row without `started_at` would read 0.)
        DbBackend::Postgres => format!(
            "CASE WHEN {started_at} IS NULL THEN NULL ELSE \
             CAST(EXTRACT(EPOCH FROM GREATEST({created_at} - {started_at}, INTERVAL '0')) * 1000000 AS BIGINT) END"
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

/// The contribution of the `prefix`-qualified row (`NEW.`, `OLD.` or ``) with `sign` (+1
/// counts the row in, -1 out), as a select list of the delta columns.
fn delta_values(backend: DbBackend, sign: i32, prefix: &str) -> String {
    delta_values_with(backend, sign, prefix, None)
}

/// [`delta_values`], with the row's latency read from `latency` (an expression already
/// computed, e.g. a subquery's column) instead of computed twice (its sum and its bucket).
fn delta_values_with(backend: DbBackend, sign: i32, prefix: &str, latency: Option<&str>) -> String {
    let col = |c: &str| format!("{prefix}{c}");
    let row_latency = latency
        .map(str::to_owned)
        .unwrap_or_else(|| latency_us_sql(backend, &col("created_at"), &col("started_at")));
    let signed = |expr: String| {
        if sign == 1 {
            expr
        } else {
            format!("{sign} * {expr}")
        }
    };
    let counted = |nullable: &str| format!("CASE WHEN {nullable} IS NULL THEN 0 ELSE {sign} END");
    format!(
        "{slot} AS slot, COALESCE({user}, {NO_USER}) AS user_key, {model} AS model, {success} AS success, \
         {bucket} AS latency_bucket, {sign} AS calls, {p} AS prompt_tokens, {c} AS completion_tokens, {t} AS total_tokens, \
         {ca} AS cached_tokens, {r} AS reasoning_tokens, COALESCE({cost}, 0) AS cost_micros, \
         {priced} AS priced_calls, COALESCE({latency}, 0) AS latency_us, {timed} AS latency_calls, \
         COALESCE({ttft}, 0) AS ttft_us, \
         CASE WHEN {first} IS NULL OR {started} IS NULL THEN 0 ELSE {sign} END AS ttft_calls, \
         CASE WHEN {success} THEN {sign} ELSE 0 END AS successful_calls",
        slot = slot_sql(backend, &col("created_at")),
        user = col("user_id"),
        model = col("model"),
        success = col("success"),
        bucket = latency_bucket_sql(backend, &row_latency),
        p = signed(col("prompt_tokens")),
        c = signed(col("completion_tokens")),
        t = signed(col("total_tokens")),
        ca = signed(col("cached_tokens")),
        r = signed(col("reasoning_tokens")),
        cost = signed(cost_micros_sql(backend, &col("cost"))),
        priced = counted(&col("cost")),
        latency = signed(row_latency.clone()),
        timed = counted(&col("started_at")),
        ttft = signed(latency_us_sql(
            backend,
            &col("first_chunk_at"),
            &col("started_at")
        )),
        first = col("first_chunk_at"),
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
    /// Contributions already in the delta shape: [`DELTA_TABLE`], or a CTE of its rows.
    Delta(&'a str),
}

/// The delta-shaped rows of `sources`, as one `UNION ALL`.
fn contributions(backend: DbBackend, sources: &[Source<'_>]) -> String {
    let parts: Vec<String> = sources
        .iter()
        .flat_map(|s| match s {
            Source::Table {
                name,
                sign,
                where_sql,
            } => vec![format!(
                "SELECT {} FROM {name}{}",
                delta_values(backend, *sign, ""),
                where_sql.map(|w| format!(" WHERE {w}")).unwrap_or_default()
            )],
            // One row of a row trigger: its latency computed once (on SQLite a parse of two
            // timestamps' text), for its sum and its bucket.
            Source::Rows(rows) => rows
                .iter()
                .map(|(prefix, sign)| {
                    format!(
                        "SELECT {} FROM (SELECT {} AS latency) l",
                        delta_values_with(backend, *sign, prefix, Some("l.latency")),
                        latency_us_sql(
                            backend,
                            &format!("{prefix}created_at"),
                            &format!("{prefix}started_at")
                        )
                    )
                })
                .collect(),
            // Summed per delta key first: a second of writes is thousands of rows but a few
            // keys, and each key then fans out to six cells.
            Source::Delta(name) => vec![delta_per_key(name, false)],
        })
        .collect();
    parts.join(" UNION ALL ")
}

/// `SELECT` of the `level` cells of `sources` (key and sums, grouped), without the insert.
pub fn cells_select(backend: DbBackend, sources: &[Source<'_>], level: Level) -> String {
    cells_select_of(backend, sources, level, Whose::Both)
}

/// Whose cells a select computes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Whose {
    Both,
    AllUsers,
    PerUser,
    /// A user's UTC days per model and outcome: the cells that keep what retention deleted
    /// (see [`retained_days_upsert_sql`]).
    RetainedDays,
    /// A dense user's UTC hours in the totals table, from the user's `since` on (see
    /// [`DENSE_TABLE`]); other users' contributions and earlier ones are left out.
    DenseHours,
    /// A dense user's UTC days per model and outcome ([`DENSE_MODEL_DAY`]), in the same window.
    DenseModelDays,
}

/// `INSERT … ON CONFLICT DO UPDATE` adding the contributions of `sources` to each user's UTC
/// day cells per model and outcome (grain [`DAY`] in [`TABLE`]). Since migration 000021 a user
/// has month cells per model and outcome, and day cells only for the rows that retention
/// deleted: a retention batch adds its rows here before deleting them, so a user's per-model
/// sums over part of a month before the retention horizon are those cells plus the rows left
/// (see `src/retention.rs`).
pub fn retained_days_upsert_sql(backend: DbBackend, sources: &[Source<'_>]) -> String {
    upsert_sql_of(backend, sources, Level::ByModel, Whose::RetainedDays)
}

/// The same for each user's day cells in the totals table, in light months only (migration
/// 000031: a full month's day cells keep its rows already, a light month has day cells only
/// for the rows that retention deleted).
pub fn retained_light_days_upsert_sql(backend: DbBackend, sources: &[Source<'_>]) -> String {
    let select = cells_select_of(backend, sources, Level::Total, Whose::RetainedDays);
    upsert_cells_sql(
        Level::Total,
        &format!(
            "SELECT * FROM ({select}) m WHERE m.user_key < {ALL_USERS} AND NOT EXISTS \
             (SELECT 1 FROM {FULL_MONTH_TABLE} f WHERE f.user_key = m.user_key AND f.slot = {})",
            Calendar::Month.start_sql(backend, "m.slot"),
        ),
    )
}

/// The same for each user's latency histograms: the rows of `sources` added to their users'
/// UTC day cells in [`USER_LATENCY_TABLE`] (a user's percentiles over whole UTC days before
/// the horizon, where a month is read in part).
pub fn retained_latency_days_upsert_sql(backend: DbBackend, sources: &[Source<'_>]) -> String {
    user_latency_upsert_sql(backend, &latency_rows(backend, sources), DAY)
}

fn cells_select_of(
    backend: DbBackend,
    sources: &[Source<'_>],
    level: Level,
    whose: Whose,
) -> String {
    // (grain, len, phase, per user): every fixed grain for all users; the user's own cells
    // where the layout has them (calendar grains start where their month or year does).
    let (user_fixed, all_calendar) = match whose {
        Whose::RetainedDays => (&[DAY][..], &[][..]),
        Whose::DenseHours => (&DENSE_GRAIN_CODES[..], &[][..]),
        Whose::DenseModelDays => (&[][..], &[][..]),
        _ => per_user(level),
    };
    // Only a dense user's contributions from the user's `since` on (and before `until`).
    let dense_model_days = whose == Whose::DenseModelDays;
    let only = match whose {
        Whose::DenseHours | Whose::DenseModelDays => format!(
            " AND EXISTS (SELECT 1 FROM {DENSE_TABLE} x WHERE x.user_key = d.user_key AND d.slot >= x.since \
             AND (x.until IS NULL OR d.slot < x.until))"
        ),
        _ => String::new(),
    };
    let whose = match whose {
        Whose::RetainedDays | Whose::DenseHours | Whose::DenseModelDays => Whose::PerUser,
        w => w,
    };
    let user_calendar = if whose == Whose::AllUsers {
        &[][..]
    } else {
        all_calendar
    };
    let everyone_calendar = if whose == Whose::PerUser {
        &[][..]
    } else {
        &ALL_USERS_CALENDAR[..]
    };
    let mut grains: Vec<String> = Vec::new();
    for g in GRAINS {
        if whose != Whose::PerUser {
            grains.push(format!(
                "SELECT {} AS grain, {} AS len, {} AS phase, 0 AS per_user",
                g.code, g.len, g.phase
            ));
        }
        if whose != Whose::AllUsers && user_fixed.contains(&g.code) {
            grains.push(format!(
                "SELECT {} AS grain, {} AS len, {} AS phase, 1 AS per_user",
                g.code, g.len, g.phase
            ));
        }
    }
    if dense_model_days {
        let g = DENSE_MODEL_DAY;
        grains.push(format!(
            "SELECT {} AS grain, {} AS len, {} AS phase, 1 AS per_user",
            g.code, g.len, g.phase
        ));
    }
    for (calendars, per_user) in [(everyone_calendar, 0), (user_calendar, 1)] {
        for c in calendars {
            grains.push(format!(
                "SELECT {} AS grain, 1 AS len, 0 AS phase, {per_user} AS per_user",
                c.code()
            ));
        }
    }
    let fixed = cell_start_sql("d.slot", "g.len", "g.phase");
    let calendars: Vec<Calendar> = Calendar::ALL
        .into_iter()
        .filter(|c| everyone_calendar.contains(c) || user_calendar.contains(c))
        .collect();
    let slot = if calendars.is_empty() {
        fixed
    } else {
        let whens: String = calendars
            .iter()
            .map(|c| format!("WHEN {} THEN {} ", c.code(), c.start_sql(backend, "d.slot")))
            .collect();
        format!("CASE g.grain {whens}ELSE {fixed} END")
    };
    let (dims, group) = match level {
        Level::ByModel => ("d.model AS model, d.success AS success, ", "1, 2, 3, 4, 5"),
        Level::Total => ("", "1, 2, 3"),
    };
    let sums: Vec<String> = level
        .sums()
        .iter()
        .map(|c| format!("COALESCE(SUM(d.{c}), 0) AS {c}"))
        .collect();
    format!(
        "SELECT g.grain AS grain, \
         CASE WHEN g.per_user = 1 THEN d.user_key ELSE {ALL_USERS} END AS user_key, \
         {slot} AS slot, {dims}{sums} \
         FROM ({rows}) d CROSS JOIN ({grains}) g \
         WHERE 1 = 1{only} \
         GROUP BY {group}",
        sums = sums.join(", "),
        rows = contributions(backend, sources),
        grains = grains.join(" UNION ALL "),
    )
}

/// `INSERT … ON CONFLICT DO UPDATE` adding the cells of `sources` to the `level` table. Cells
/// whose sums are all zero (an update that changed nothing counted) are skipped; keys are
/// inserted in key order, so concurrent writers lock shared cells in the same order.
pub fn upsert_sql(backend: DbBackend, sources: &[Source<'_>], level: Level) -> String {
    upsert_sql_of(backend, sources, level, Whose::Both)
}

fn upsert_sql_of(backend: DbBackend, sources: &[Source<'_>], level: Level, whose: Whose) -> String {
    upsert_cells_sql(level, &cells_select_of(backend, sources, level, whose))
}

/// [`upsert_sql`] where a user's month cells per model and outcome (migration 000030) and day
/// cells in the totals table (migration 000031) are added for full months only
/// ([`FULL_MONTH_TABLE`]): what the fold runs. All users' cells, the cells of calls made for no
/// user, and a user's months and years in the totals table are added as by [`upsert_sql`].
pub fn upsert_full_months_sql(backend: DbBackend, sources: &[Source<'_>], level: Level) -> String {
    upsert_full_months_of(backend, sources, level, Whose::Both)
}

fn upsert_full_months_of(
    backend: DbBackend,
    sources: &[Source<'_>],
    level: Level,
    whose: Whose,
) -> String {
    let select = cells_select_of(backend, sources, level, whose);
    match level {
        Level::ByModel => upsert_cells_sql(level, &model_cells_of_full_months(&select)),
        Level::Total => upsert_cells_sql(level, &totals_cells_of_full_months(backend, &select)),
    }
}

/// The cells of `select` (per model and outcome, [`TABLE`]'s key) less a user's month cells
/// of light months ([`FULL_MONTH_TABLE`]).
pub fn model_cells_of_full_months(select: &str) -> String {
    format!(
        "SELECT * FROM ({select}) m WHERE NOT (m.grain = {month} AND m.user_key < {ALL_USERS}) \
         OR EXISTS (SELECT 1 FROM {FULL_MONTH_TABLE} f WHERE f.user_key = m.user_key AND f.slot = m.slot)",
        month = Calendar::Month.code(),
    )
}

/// The cells of `select` ([`TOTALS_TABLE`]'s key) less a user's day cells of light months
/// ([`FULL_MONTH_TABLE`], migration 000031) and a user's month cells of light years
/// ([`FULL_YEAR_TABLE`], migration 000032).
pub fn totals_cells_of_full_months(backend: DbBackend, select: &str) -> String {
    totals_cells_kept(backend, select, true)
}

/// [`totals_cells_of_full_months`], with the light years' month cells (`years`) or without
/// (a database before migration 000032 keeps them).
pub fn totals_cells_kept(backend: DbBackend, select: &str, years: bool) -> String {
    let days = format!(
        "(NOT (m.grain = {DAY} AND m.user_key < {ALL_USERS}) \
         OR EXISTS (SELECT 1 FROM {FULL_MONTH_TABLE} f WHERE f.user_key = m.user_key AND f.slot = {}))",
        Calendar::Month.start_sql(backend, "m.slot"),
    );
    match years {
        false => format!("SELECT * FROM ({select}) m WHERE {days}"),
        true => format!(
            "SELECT * FROM ({select}) m WHERE {days} AND (NOT (m.grain = {month} AND m.user_key < {ALL_USERS}) \
             OR EXISTS (SELECT 1 FROM {FULL_YEAR_TABLE} y WHERE y.user_key = m.user_key AND y.slot = {}))",
            Calendar::Year.start_sql(backend, "m.slot"),
            month = Calendar::Month.code(),
        ),
    }
}

/// `INSERT … ON CONFLICT DO UPDATE` adding the cells `select` returns (the key of `level`,
/// then its sums) to `level`'s table, cells whose sums are all zero left out.
fn upsert_cells_sql(level: Level, select: &str) -> String {
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
        any = any_change.join(" OR "),
        updates = updates.join(", "),
    )
}

/// The users whose hours are kept in the totals table (migration 000025), with the first slot
/// (a UTC midnight) from which they are: a dense user's hour cells (the grains of
/// [`DENSE_GRAINS`], the user's key) hold every row of that user from `since` on, as the day
/// cells do.
///
/// **Why.** A user's finest cells are UTC days (see [`per_user`]): an hourly series, or a daily
/// series in New York or India, reads that user's rows. For most users those are a few
/// thousand rows; for the heaviest they are hundreds of thousands (the heaviest user of the
/// 10,000-user benchmark, 677,035 rows: 5.6 s for an hourly series over all time, 2.2 s in
/// India). Hour cells for every user would outgrow the usage table (4.8M cells at 10,000
/// users); for the users who call often they are 24 cells a day that replace thousands of
/// rows, and few users call that often (22 of 10,000 Zipf users have a day of 150 calls).
/// A user becomes dense when one of the user's UTC days holds [`DENSE_DAY_CALLS`] calls
/// ([`promote_dense_sql`], looked for by the fold once a minute at most), stops after
/// [`DENSE_IDLE_DAYS`] quiet days (`until`: the hours kept so far stay, none are added past it)
/// and starts again on the next busy day.
pub const DENSE_TABLE: &str = "llm_tracker_usage_rollup_dense_user";

/// A dense user's cells: UTC hours, and hours that start at :30 past a UTC hour (the hours of
/// India, Iran, Sri Lanka, Newfoundland, central Australia…). Not the :45 hours (Nepal,
/// Chatham): their users read rows, as every user's do where no cell fits.
pub const DENSE_GRAINS: [Grain; 2] = [GRAINS[1], GRAINS[4]];

/// The codes of [`DENSE_GRAINS`].
const DENSE_GRAIN_CODES: [i64; 2] = [DENSE_GRAINS[0].code, DENSE_GRAINS[1].code];

/// The calls in one UTC day that make a user dense (about six an hour): with both grains, at
/// the benchmark's shape (10M rows, 10,000 Zipf users) 22 users and 0.39M cells, 0.03× the
/// usage table; on a day of that many calls at most 2 × 24 cells for 150 rows (a user who stays
/// dense but calls rarely can have two cells a call).
pub const DENSE_DAY_CALLS: i64 = 150;

/// Deletes the dense users' cells — hours and days per model — before slot `horizon` (a
/// retention horizon): no read uses them (reads and `rollup verify` start at the horizon, and
/// a rebuild cannot refill them from rows that are gone).
pub fn delete_dense_cells_before_sql(horizon: i64) -> [String; 2] {
    delete_dense_cells_sql(&format!("user_key < {ALL_USERS} AND slot < {horizon}"))
}

/// Deletes the dense users' hour cells and day cells per model that `condition` selects.
fn delete_dense_cells_sql(condition: &str) -> [String; 2] {
    [
        format!(
            "DELETE FROM {TOTALS_TABLE} WHERE grain IN ({}, {}) AND {condition}",
            DENSE_GRAIN_CODES[0], DENSE_GRAIN_CODES[1]
        ),
        format!(
            "DELETE FROM {TABLE} WHERE grain = {} AND {condition}",
            DENSE_MODEL_DAY.code
        ),
    ]
}

/// A dense user's UTC days per model and outcome, in [`TABLE`] under a code of their own (not
/// [`DAY`], whose per-user cells there keep what retention deleted): in the same window as the
/// user's hours ([`DENSE_TABLE`], migration 000035).
///
/// **Why.** A user's cells per model and outcome are UTC months (migration 000021), so the
/// user's per-model sums over part of a month (the last 7 days) read the user's rows of those
/// days: for the heaviest user of the 10,000-user benchmark 14,186 rows, ~12 ms of the
/// database. A dense user's day holds 150 calls or more over a few dozen models and outcomes,
/// so its cells are a fraction of its rows (209,549 cells for the 22 dense users there, 44.5
/// MB); a light user's day would hold about one call per cell, as it did before 000021.
pub const DENSE_MODEL_DAY: Grain = Grain::new(97, 96, 0);

/// `INSERT … ON CONFLICT DO UPDATE` adding the contributions of `sources` to the day cells per
/// model and outcome of the dense users (from each one's `since` on, before its `until`).
pub fn dense_model_days_upsert_sql(backend: DbBackend, sources: &[Source<'_>]) -> String {
    upsert_sql_of(backend, sources, Level::ByModel, Whose::DenseModelDays)
}

/// `SELECT` of the dense users' day cells per model of `sources` (what `rollup verify`
/// compares).
pub fn dense_model_days_select(backend: DbBackend, sources: &[Source<'_>]) -> String {
    cells_select_of(backend, sources, Level::ByModel, Whose::DenseModelDays)
}

/// The day cells per model of the dense users that `keys` selects, filled from their rows
/// less their pending contributions (as [`dense_backfill_sql`] fills their hours).
pub fn dense_model_days_backfill_sql(backend: DbBackend, keys: &str) -> String {
    dense_fill_sql(backend, keys, None, 1, dense_model_days_upsert_sql)
}

/// The table of dense users.
pub fn create_dense_table_sql(backend: DbBackend) -> String {
    let int = match backend {
        DbBackend::Postgres => "bigint",
        _ => "integer",
    };
    format!(
        "CREATE TABLE IF NOT EXISTS {DENSE_TABLE} (\n    user_key {int} NOT NULL PRIMARY KEY,\n    since {int} NOT NULL,\n    until {int} NULL\n)"
    )
}

/// `INSERT … ON CONFLICT DO UPDATE` adding the contributions of `sources` to the hour cells of
/// the dense users (from each one's `since` on; every other contribution is left out).
pub fn dense_hours_upsert_sql(backend: DbBackend, sources: &[Source<'_>]) -> String {
    upsert_sql_of(backend, sources, Level::Total, Whose::DenseHours)
}

/// `SELECT` of the dense users' hour cells of `sources` (what `rollup verify` compares).
pub fn dense_hours_select(backend: DbBackend, sources: &[Source<'_>]) -> String {
    cells_select_of(backend, sources, Level::Total, Whose::DenseHours)
}

/// The hour cells of the dense users that `keys` selects (an SQL list or subquery of user
/// keys) filled from their rows, less their contributions still pending (which the fold adds
/// later): exact whenever it runs, as one statement, while no fold runs (under the folders'
/// lock on PostgreSQL, in a write transaction on SQLite). For users who have no hour cells yet.
pub fn dense_backfill_sql(backend: DbBackend, keys: &str) -> String {
    dense_fill_sql(backend, keys, None, 1, dense_hours_upsert_sql)
}

/// The hour cells and day cells per model of the dense users `keys` (an SQL list) from slot
/// `from` on, filled from their rows less their pending contributions (`sign` 1), or emptied of
/// them (`sign` -1): exact as [`dense_backfill_sql`], for a window that the fold starts (a
/// promotion) or stops (a demotion) keeping. Run while the window includes `from`.
pub fn dense_backfill_from_sql(
    backend: DbBackend,
    keys: &str,
    from: i64,
    sign: i32,
) -> [String; 2] {
    [
        dense_fill_sql(backend, keys, Some(from), sign, dense_hours_upsert_sql),
        dense_fill_sql(backend, keys, Some(from), sign, dense_model_days_upsert_sql),
    ]
}

/// [`dense_backfill_sql`] and [`dense_backfill_from_sql`]: the rows of `keys` (from slot
/// `from`) with `sign`, and their pending contributions with the opposite sign, added by
/// `upsert` (the hours' or the days' per model).
fn dense_fill_sql(
    backend: DbBackend,
    keys: &str,
    from: Option<i64>,
    sign: i32,
    upsert: fn(DbBackend, &[Source<'_>]) -> String,
) -> String {
    let (rows_from, pending_from) = match from {
        Some(from) => (
            format!(" AND {} >= {from}", slot_sql(backend, "created_at")),
            format!(" AND slot >= {from}"),
        ),
        None => (String::new(), String::new()),
    };
    let rows_of = format!("user_id IN ({keys}){rows_from}");
    let pending_sign = if sign > 0 { "-" } else { "" };
    let pending_sums: Vec<String> = delta_sums()
        .iter()
        .map(|c| format!("{pending_sign}{c} AS {c}"))
        .collect();
    let pending = format!(
        "(SELECT {key}, {sums} FROM {DELTA_TABLE} WHERE user_key IN ({keys}){pending_from}) p",
        key = DELTA_KEY.join(", "),
        sums = pending_sums.join(", "),
    );
    upsert(
        backend,
        &[
            Source::Table {
                name: "llm_tracker_usage",
                sign,
                where_sql: Some(&rows_of),
            },
            Source::Delta(&pending),
        ],
    )
}

/// A user stops being dense when none of the user's UTC days of the last
/// [`DENSE_IDLE_DAYS`] held half of [`DENSE_DAY_CALLS`] (and the user has been dense that
/// long): a user who called much once and then little would otherwise keep two cells of
/// hours for each call. The hours kept so far stay (`until` ends the window); a later heavy
/// day makes the user dense again and fills the hours since `until`.
pub const DENSE_IDLE_DAYS: i64 = 28;

/// The dense users to demote as of the UTC day `today` (see [`DENSE_IDLE_DAYS`]).
pub fn idle_dense_sql(today: i64) -> String {
    let first = today - DENSE_IDLE_DAYS * DAY;
    format!(
        "SELECT x.user_key FROM {DENSE_TABLE} x WHERE x.until IS NULL AND x.since <= {first} \
         AND NOT EXISTS (SELECT 1 FROM {TOTALS_TABLE} t WHERE t.grain = {DAY} AND t.user_key = x.user_key \
         AND t.slot >= {first} AND t.calls >= {half}) ORDER BY x.user_key",
        half = DENSE_DAY_CALLS / 2,
    )
}

/// The demoted users whose UTC day cell from slot `day` on reached [`DENSE_DAY_CALLS`] again,
/// with the end of their window.
pub fn busy_again_sql(day: i64) -> String {
    format!(
        "SELECT x.user_key, x.until FROM {DENSE_TABLE} x WHERE x.until IS NOT NULL \
         AND EXISTS (SELECT 1 FROM {TOTALS_TABLE} t WHERE t.grain = {DAY} AND t.user_key = x.user_key \
         AND t.slot >= {day} AND t.calls >= {DENSE_DAY_CALLS}) ORDER BY x.user_key"
    )
}

/// The users who become dense: a UTC day cell of theirs from slot `day` on holds
/// [`DENSE_DAY_CALLS`] calls or more. Each is dense from the UTC day after `today` (a UTC
/// midnight slot), so that no hour the reads use was half counted; its hour cells from there
/// are filled by [`dense_backfill_from_sql`] in the same transaction (rows written ahead of
/// time).
/// Returns the new users' keys.
pub fn promote_dense_sql(day: i64, today: i64) -> String {
    format!(
        "INSERT INTO {DENSE_TABLE} (user_key, since) \
         SELECT user_key, {since} FROM {TOTALS_TABLE} t \
         WHERE grain = {DAY} AND slot >= {day} AND user_key < {ALL_USERS} AND calls >= {DENSE_DAY_CALLS} \
         AND NOT EXISTS (SELECT 1 FROM {DENSE_TABLE} x WHERE x.user_key = t.user_key) \
         GROUP BY user_key ORDER BY user_key \
         RETURNING user_key",
        since = today + DAY,
    )
}

/// Key of the PostgreSQL advisory lock held by a fold (and by a rebuild): one at a time.
pub const FOLD_LOCK: i64 = 0x6c6c_6d74_726f_6c6c;

/// The statements that recreate the rollup from every row (run in one transaction; on
/// PostgreSQL writers wait for it, they are not refused). The pending contributions go too
/// (the rows count them again).
///
/// With a retention `horizon` (the slot from which every row is still there, see
/// [`RETENTION_TABLE`]), only the rows from the horizon on are recounted; before it the finest
/// cells kept (all users' 15-minute slots per model and outcome, each user's UTC days) and the
/// contributions pending there stand in for the rows retention deleted, and every coarser cell
/// is summed from them as from rows. A user's months per model and outcome are summed from
/// every row there is and the day cells that keep what retention deleted, which stay.
///
/// The transaction first runs [`rebuild_lock_sql`], then reads the horizon, then these.
pub fn rebuild_sql(backend: DbBackend, horizon: Option<i64>) -> Vec<String> {
    let mut out = Vec::new();
    let from_horizon = horizon.map(|h| format!("{} >= {h}", slot_sql(backend, "created_at")));
    // The latency histograms: days and quarter days recounted from the rows from the horizon
    // on (each lies on one side of it, a UTC midnight); before it they stay, plus what is
    // pending there. Months, which can straddle the horizon, are summed from the days after.
    out.push(format!(
        "DELETE FROM {LATENCY_TABLE}{}",
        horizon
            .map(|h| format!(" WHERE slot >= {h} OR grain = {}", Calendar::Month.code()))
            .unwrap_or_default()
    ));
    let pending_before =
        horizon.map(|h| format!("(SELECT * FROM {DELTA_TABLE} WHERE slot < {h}) p"));
    let mut sources = vec![Source::Table {
        name: "llm_tracker_usage",
        sign: 1,
        where_sql: from_horizon.as_deref(),
    }];
    if let Some(p) = &pending_before {
        sources.push(Source::Delta(p));
    }
    out.push(latency_upsert_sql_of(backend, &sources, false));
    out.push(latency_months_from_days_sql(backend));
    if horizon.is_none() {
        // Pending contributions are recounted from the rows (with a horizon, those before it
        // are read below).
        out.push(format!("DELETE FROM {DELTA_TABLE}"));
    }
    // Two passes over the rows, each one aggregate: per 15-minute slot, model and outcome for
    // all users; per user, UTC day, model and outcome. Every cell is then summed from those
    // (a few million rows), not from the rows fanned out to every cell (one pass of 14 cells
    // per row took over 5 minutes at 10M rows).
    let rows = contributions(
        backend,
        &[Source::Table {
            name: "llm_tracker_usage",
            sign: 1,
            where_sql: from_horizon.as_deref(),
        }],
    );
    // The cells of `table` that `condition` selects, as delta rows.
    let cells_as_delta = |table: &str, condition: &str| {
        let sums: Vec<String> = delta_sums()
            .iter()
            .map(|c| match (*c, table == TABLE) {
                ("successful_calls", true) => {
                    "CASE WHEN success THEN calls ELSE 0 END AS successful_calls".to_owned()
                }
                (c, _) => c.to_owned(),
            })
            .collect();
        // The totals table has no model or outcome: its cells come back as one model's
        // successes (only sums over all models read them).
        let (model, success) = if table == TABLE {
            ("model", "success")
        } else {
            ("'' AS model", "(1 = 1) AS success")
        };
        format!(
            "SELECT slot, user_key, {model}, {success}, CAST(NULL AS INTEGER) AS latency_bucket, \
             {sums} FROM {table} WHERE {condition}",
            sums = sums.join(", "),
        )
    };
    // Before slot `before`: the kept cells of `table` that `whose` selects and the pending
    // contributions, as delta rows.
    let retained = |table: &str, whose: &str, before: &str| {
        format!(
            " UNION ALL {} UNION ALL SELECT {columns} FROM {DELTA_TABLE} WHERE slot < {before}",
            cells_as_delta(table, &format!("{whose} AND slot < {before}")),
            columns = delta_columns(),
        )
    };
    let sums: Vec<String> = delta_sums()
        .iter()
        .map(|c| format!("SUM({c}) AS {c}"))
        .collect();
    let sums = format!(
        "{}, CAST(NULL AS INTEGER) AS latency_bucket",
        sums.join(", ")
    );
    let day = cell_start_sql("slot", "96", "0");
    for table in [REBUILD_ALL, REBUILD_USERS, REBUILD_USER_MONTHS] {
        out.push(format!("DROP TABLE IF EXISTS {table}"));
    }
    let kept = |table: &str, whose: &str| match horizon {
        None => String::new(),
        Some(h) => retained(table, whose, &h.to_string()),
    };
    out.push(format!(
        "CREATE TEMP TABLE {REBUILD_ALL} AS SELECT slot, {ALL_USERS} AS user_key, model, success, {sums} \
         FROM ({rows}{}) c GROUP BY slot, model, success",
        kept(TABLE, &format!("grain = 1 AND user_key = {ALL_USERS}")),
    ));
    // Each user's days: what the totals table's day, month and year cells are summed from
    // (before the horizon, its day cells stand in for the rows). A light month's day cells
    // (migration 000031) hold only what retention deleted; before the horizon its rows still
    // there (a retention run under way) are read instead of its pending contributions, which
    // they hold.
    let light = |user: &str, slot: &str| {
        format!(
            "{user} < {ALL_USERS} AND NOT EXISTS (SELECT 1 FROM {FULL_MONTH_TABLE} f \
             WHERE f.user_key = {user} AND f.slot = {})",
            Calendar::Month.start_sql(backend, slot)
        )
    };
    // The rows before the horizon in light months (there while a retention run is under way).
    let light_rows = horizon.map(|h| {
        let slot = slot_sql(backend, "created_at");
        format!(
            "{slot} < {h} AND user_id IS NOT NULL AND {}",
            light("user_id", &slot)
        )
    });
    let users_before = match (horizon, &light_rows) {
        (Some(h), Some(light_rows)) => {
            format!(
                " UNION ALL {} UNION ALL SELECT {columns} FROM {DELTA_TABLE} d WHERE d.slot < {h} \
                 AND NOT ({}) UNION ALL {}",
                cells_as_delta(
                    TOTALS_TABLE,
                    &format!("grain = {DAY} AND user_key <> {ALL_USERS} AND slot < {h}")
                ),
                light("d.user_key", "d.slot"),
                contributions(
                    backend,
                    &[Source::Table {
                        name: "llm_tracker_usage",
                        sign: 1,
                        where_sql: Some(light_rows),
                    }]
                ),
                columns = delta_columns(),
            )
        }
        _ => String::new(),
    };
    out.push(format!(
        "CREATE TEMP TABLE {REBUILD_USERS} AS SELECT {day} AS slot, user_key, model, success, {sums} \
         FROM ({rows}{users_before}) c GROUP BY {day}, user_key, model, success",
    ));
    // A user's months per model and outcome: without a horizon, from the same days; with one,
    // from every row there is (those before the horizon were written since with an old date)
    // and the day cells that keep the rows retention deleted (which, as those rows, hold no
    // pending contribution: a row deleted while pending was counted in its day cell).
    let user_months = match horizon {
        None => REBUILD_USERS,
        Some(h) => {
            let columns = delta_columns();
            let before = format!("{} < {h}", slot_sql(backend, "created_at"));
            out.push(format!(
                "CREATE TEMP TABLE {REBUILD_USER_MONTHS} AS SELECT {columns} FROM {REBUILD_USERS} \
                 WHERE slot >= {h} \
                 UNION ALL SELECT {columns} FROM ({old_rows}) o UNION ALL {deleted}",
                old_rows = contributions(
                    backend,
                    &[Source::Table {
                        name: "llm_tracker_usage",
                        sign: 1,
                        where_sql: Some(&before),
                    }]
                ),
                deleted = cells_as_delta(
                    TABLE,
                    &format!("grain = {DAY} AND user_key <> {ALL_USERS} AND slot < {h}")
                ),
            ));
            REBUILD_USER_MONTHS
        }
    };
    if horizon.is_some() {
        out.push(format!("DELETE FROM {DELTA_TABLE}"));
    }
    // The totals first: the months their month cells take to FULL_MONTH_CALLS calls become
    // full before the cells per model, kept for full months only, are summed.
    for level in [Level::Total, Level::ByModel] {
        // (A user's day cells per model before the horizon keep what retention deleted.)
        out.push(match (level, horizon) {
            (Level::ByModel, Some(h)) => format!(
                "DELETE FROM {TABLE} WHERE NOT (grain = {DAY} AND user_key <> {ALL_USERS} AND slot < {h})"
            ),
            _ => format!("DELETE FROM {}", level.table()),
        });
        out.push(upsert_sql_of(
            backend,
            &[Source::Delta(REBUILD_ALL)],
            level,
            Whose::AllUsers,
        ));
        let users = match level {
            Level::ByModel => user_months,
            Level::Total => REBUILD_USERS,
        };
        // (Per model, full months only; the totals' days of light months are deleted below,
        // once the full months are known.)
        out.push(match level {
            Level::ByModel => {
                upsert_full_months_of(backend, &[Source::Delta(users)], level, Whose::PerUser)
            }
            Level::Total => upsert_sql_of(backend, &[Source::Delta(users)], level, Whose::PerUser),
        });
        if level == Level::Total {
            // The user months that are full: those that were, and those of FULL_MONTH_CALLS
            // calls (the totals' month cells, just summed from every row and the cells kept
            // before the horizon).
            out.push(format!(
                "INSERT INTO {FULL_MONTH_TABLE} (user_key, slot) SELECT t.user_key, t.slot FROM {TOTALS_TABLE} t \
                 WHERE t.grain = {} AND t.user_key < {ALL_USERS} AND t.calls >= {FULL_MONTH_CALLS} \
                 AND NOT EXISTS (SELECT 1 FROM {FULL_MONTH_TABLE} f WHERE f.user_key = t.user_key AND f.slot = t.slot)",
                Calendar::Month.code()
            ));
            // A light month's day cells hold only what retention deleted (before the horizon,
            // those kept above): the days summed from the rows go again — from the horizon on
            // all of them, before it the rows still there (taken out, then the cells left
            // empty deleted).
            if let Some(light_rows) = &light_rows {
                let select = cells_select_of(
                    backend,
                    &[Source::Table {
                        name: "llm_tracker_usage",
                        sign: -1,
                        where_sql: Some(light_rows),
                    }],
                    Level::Total,
                    Whose::PerUser,
                );
                out.push(upsert_cells_sql(
                    Level::Total,
                    &format!("SELECT * FROM ({select}) c WHERE c.grain = {DAY}"),
                ));
            }
            let empty: Vec<String> = Level::Total
                .sums()
                .iter()
                .map(|c| format!("{c} = 0"))
                .collect();
            out.push(format!(
                "DELETE FROM {TOTALS_TABLE} WHERE grain = {DAY} AND {light}{from}",
                light = light(
                    &format!("{TOTALS_TABLE}.user_key"),
                    &format!("{TOTALS_TABLE}.slot")
                ),
                from = horizon
                    .map(|h| format!(" AND (slot >= {h} OR ({}))", empty.join(" AND ")))
                    .unwrap_or_default(),
            ));
            // The user years that are full (migration 000032): those that were, and those of
            // FULL_YEAR_CALLS calls, holding a full month or starting before the horizon; the
            // other years' month cells go.
            out.extend(full_years_sql(
                backend,
                horizon.map(|h| h.to_string()).as_deref(),
            ));
        }
    }
    // Users whose rows hold a UTC day of `DENSE_DAY_CALLS` calls and who are not dense (rows
    // written for past days: a bulk load, an import; the fold's promotion looks at yesterday
    // and today only): dense from their first day, as migration 000025 made every such user.
    // Users dense already, or demoted, keep their window.
    out.push(format!(
        "INSERT INTO {DENSE_TABLE} (user_key, since) \
         SELECT user_key, MIN(slot) FROM {TOTALS_TABLE} t \
         WHERE grain = {DAY} AND user_key < {ALL_USERS} \
         AND NOT EXISTS (SELECT 1 FROM {DENSE_TABLE} x WHERE x.user_key = t.user_key) \
         GROUP BY user_key HAVING MAX(calls) >= {DENSE_DAY_CALLS}"
    ));
    // The dense users' hours, deleted with the totals table: from the rows (nothing is pending
    // now), from the horizon on (before it rows are gone; reads do not use hours there).
    if let Some(h) = horizon {
        out.push(format!(
            "UPDATE {DENSE_TABLE} SET since = {h} WHERE since < {h}"
        ));
    }
    let dense_rows = format!("user_id IN (SELECT user_key FROM {DENSE_TABLE})");
    let dense_sources = [Source::Table {
        name: "llm_tracker_usage",
        sign: 1,
        where_sql: Some(&dense_rows),
    }];
    out.push(dense_hours_upsert_sql(backend, &dense_sources));
    // Their days per model likewise (deleted with the per-model table's cells after the
    // horizon).
    out.push(dense_model_days_upsert_sql(backend, &dense_sources));
    // Each user's histograms, full months only: from every row there is and, before the horizon, the day
    // cells that keep what retention deleted (those stay).
    let every_row = latency_rows(
        backend,
        &[Source::Table {
            name: "llm_tracker_usage",
            sign: 1,
            where_sql: None,
        }],
    );
    let user_rows = match horizon {
        None => {
            out.push(format!("DELETE FROM {USER_LATENCY_TABLE}"));
            every_row
        }
        Some(h) => {
            out.push(format!(
                "DELETE FROM {USER_LATENCY_TABLE} WHERE NOT (grain = {DAY} AND slot < {h})"
            ));
            format!(
                "{every_row} UNION ALL SELECT r.slot, r.user_key, r.model, r.success, r.bucket AS latency_bucket, \
                 r.calls AS latency_calls FROM {} WHERE r.grain = {DAY} AND r.slot < {h}",
                user_latency_stored_sql(backend, "r")
            )
        }
    };
    out.push(user_latency_full_months_upsert_sql(backend, &user_rows));
    for table in [REBUILD_ALL, REBUILD_USERS, REBUILD_USER_MONTHS] {
        out.push(format!("DROP TABLE IF EXISTS {table}"));
    }
    out
}

/// What a rebuild's transaction runs first, before it reads the retention horizon: on
/// PostgreSQL the usage table locked against writers and the fold's lock; on both, the
/// retention row written (SQLite: the write lock from the first statement; no retention batch
/// runs meanwhile, and the horizon read next is the one the rows match).
pub fn rebuild_lock_sql(backend: DbBackend) -> Vec<String> {
    let mut out = Vec::new();
    if backend == DbBackend::Postgres {
        out.push("LOCK TABLE llm_tracker_usage IN SHARE MODE".to_owned());
        out.push(format!("SELECT pg_advisory_xact_lock({FOLD_LOCK})"));
    }
    out.push(format!(
        "UPDATE {RETENTION_TABLE} SET deleting = deleting WHERE id = 1"
    ));
    out
}

/// The rebuild's temporary tables (see [`rebuild_sql`]).
const REBUILD_ALL: &str = "llm_tracker_rebuild_all";
const REBUILD_USERS: &str = "llm_tracker_rebuild_users";
const REBUILD_USER_MONTHS: &str = "llm_tracker_rebuild_user_months";

/// The delta table. No index: it is appended to, read whole by the fold and by the reads, and
/// kept a few pages long (the fold deletes what it folds and vacuums it on PostgreSQL, which
/// also gives the emptied pages back).
pub fn create_delta_table_sql(backend: DbBackend) -> String {
    let (int, boolean) = match backend {
        DbBackend::Postgres => ("bigint", "boolean"),
        _ => ("integer", "bool"),
    };
    let mut columns = vec![
        format!("    slot {int} NOT NULL"),
        format!("    user_key {int} NOT NULL"),
        "    model varchar(255) NOT NULL".to_owned(),
        format!("    success {boolean} NOT NULL"),
        "    latency_bucket integer NULL".to_owned(),
    ];
    columns.extend(
        delta_sums()
            .iter()
            .map(|c| format!("    {c} {int} NOT NULL")),
    );
    format!(
        "CREATE TABLE IF NOT EXISTS {DELTA_TABLE} (\n{}\n)",
        columns.join(",\n")
    )
}

/// `INSERT INTO` [`DELTA_TABLE`] of the contributions of `sources`. With `net`, the
/// contributions are summed per delta key and keys whose sums are all zero are left out: an
/// update that changes nothing counted (the metadata, say) appends nothing.
fn delta_insert_sql(backend: DbBackend, sources: &[Source<'_>], net: bool) -> String {
    let rows = contributions(backend, sources);
    let select = if net {
        delta_per_key(&format!("({rows}) c"), true)
    } else {
        rows
    };
    format!("INSERT INTO {DELTA_TABLE} ({}) {select}", delta_columns())
}

/// The statements that fold the pending contributions into the cells, to run in one
/// transaction (on PostgreSQL after taking [`FOLD_LOCK`]): `run`, then the query
/// `candidates`, then `then`. Rows written meanwhile stay for the next fold: on PostgreSQL the
/// `DELETE … RETURNING` takes exactly the rows it folds; on SQLite the transaction holds the
/// only write lock.
///
/// `candidates` returns `(kind, user_key, slot)`: with kind 0 the user months whose totals
/// month cell the fold changed, that now hold [`FULL_MONTH_CALLS`] calls (or start before the
/// retention horizon) and are not full yet; with kind 1 the user years whose year cell it
/// changed that now hold [`FULL_YEAR_CALLS`] calls (or start before the horizon) and are not
/// full yet. The fold then makes them full ([`promote_years_in`], [`promote_months_in`]) after
/// `then`, once the folded contributions have left the delta (their cells come from the rows,
/// which hold those contributions).
pub struct FoldSql {
    pub run: Vec<String>,
    pub candidates: String,
    pub then: Vec<String>,
}

/// See [`FoldSql`].
pub fn fold_sql(backend: DbBackend) -> FoldSql {
    let horizon = format!("(SELECT h.horizon_slot FROM {RETENTION_TABLE} h WHERE h.id = 1)");
    let not_full = format!(
        "t.grain = {month} AND t.user_key < {ALL_USERS} AND (t.calls >= {FULL_MONTH_CALLS} \
         OR t.slot < {horizon}) \
         AND NOT EXISTS (SELECT 1 FROM {FULL_MONTH_TABLE} f WHERE f.user_key = t.user_key AND f.slot = t.slot)",
        month = Calendar::Month.code(),
    );
    let not_full_year = format!(
        "t.grain = {year} AND t.user_key < {ALL_USERS} AND (t.calls >= {FULL_YEAR_CALLS} \
         OR t.slot < {horizon}) \
         AND NOT EXISTS (SELECT 1 FROM {FULL_YEAR_TABLE} y WHERE y.user_key = t.user_key AND y.slot = t.slot)",
        year = Calendar::Year.code(),
    );
    match backend {
        DbBackend::Postgres => {
            let columns = delta_columns();
            FoldSql {
                run: Vec::new(),
                candidates: format!(
                    "WITH moved AS (DELETE FROM {DELTA_TABLE} RETURNING {columns}), \
                     by_model AS ({}), dense_hours AS ({}), dense_days AS ({}), latency AS ({}), user_latency AS ({}), \
                     totals AS ({} RETURNING grain, user_key, slot, calls) \
                     SELECT 0 AS kind, t.user_key, t.slot FROM totals t WHERE {not_full} \
                     UNION ALL SELECT 1, t.user_key, t.slot FROM totals t WHERE {not_full_year} ORDER BY 1, 2, 3",
                    upsert_full_months_sql(backend, &[Source::Delta("moved")], Level::ByModel),
                    dense_hours_upsert_sql(backend, &[Source::Delta("moved")]),
                    dense_model_days_upsert_sql(backend, &[Source::Delta("moved")]),
                    latency_upsert_sql(backend, &[Source::Delta("moved")]),
                    user_latency_full_months_upsert_sql(
                        backend,
                        &latency_rows(backend, &[Source::Delta("moved")]),
                    ),
                    upsert_full_months_sql(backend, &[Source::Delta("moved")], Level::Total),
                ),
                then: Vec::new(),
            }
        }
        _ => FoldSql {
            run: vec![
                upsert_full_months_sql(backend, &[Source::Delta(DELTA_TABLE)], Level::ByModel),
                upsert_full_months_sql(backend, &[Source::Delta(DELTA_TABLE)], Level::Total),
                dense_hours_upsert_sql(backend, &[Source::Delta(DELTA_TABLE)]),
                dense_model_days_upsert_sql(backend, &[Source::Delta(DELTA_TABLE)]),
                latency_upsert_sql(backend, &[Source::Delta(DELTA_TABLE)]),
                user_latency_full_months_upsert_sql(
                    backend,
                    &latency_rows(backend, &[Source::Delta(DELTA_TABLE)]),
                ),
            ],
            candidates: format!(
                "SELECT 0 AS kind, t.user_key, t.slot FROM {TOTALS_TABLE} t \
                 JOIN (SELECT DISTINCT user_key, {month_start} AS m FROM {DELTA_TABLE}) d \
                 ON t.user_key = d.user_key AND t.slot = d.m WHERE {not_full} \
                 UNION ALL SELECT 1, t.user_key, t.slot FROM {TOTALS_TABLE} t \
                 JOIN (SELECT DISTINCT user_key, {year_start} AS y FROM {DELTA_TABLE}) d \
                 ON t.user_key = d.user_key AND t.slot = d.y WHERE {not_full_year} ORDER BY 1, 2, 3",
                month_start = Calendar::Month.start_sql(backend, "slot"),
                year_start = Calendar::Year.start_sql(backend, "slot"),
            ),
            then: vec![format!("DELETE FROM {DELTA_TABLE}")],
        },
    }
}

/// The latency histograms (migration 000020): per cell of all users' calls, model, outcome and
/// latency bucket, how many calls took that long. They answer latency percentiles for any range
/// and filter without reading the rows (see `src/usage/latency.rs`).
///
/// Cells are UTC calendar months, UTC days and UTC quarter days (six hours) only, for all users
/// together (a long range reads a few months, not hundreds of days): a cell
/// holds one row per bucket its calls fell in (dozens), so finer cells, or a user's, would make
/// the histograms outgrow the usage table (measured at 10M rows from 10,000 users: 0.29M day
/// rows, 0.9M quarter-day rows, 3.2M hour rows). The rest of a range — under six hours at each
/// end — and one user's calls are counted from the rows.
pub const LATENCY_TABLE: &str = "llm_tracker_usage_latency";

/// SQLite: the lower bound of each latency bucket, for the triggers' lookup (PostgreSQL has
/// `width_bucket` over an array).
pub const LATENCY_BOUNDS_TABLE: &str = "llm_tracker_latency_bucket";

/// The histogram cells: UTC days and UTC quarter days.
pub const LATENCY_GRAINS: [Grain; 2] = [Grain::new(96, 96, 0), Grain::new(24, 24, 0)];

/// Growth of a bucket's lower bound over the previous one, in thousandths: each bucket
/// `[lo, hi]` (whole microseconds) has `hi ≤ 1.105 lo`, so a value reported as
/// `2·lo·hi / (lo + hi)` is within `(hi − lo) / (hi + lo) ≤ 0.105 / 2.105 < 5 %` of every
/// latency in the bucket.
pub const LATENCY_GROWTH_PER_MILLE: i64 = 105;

/// The first lower bound past which buckets stop (about 27.8 hours): the last bucket holds
/// everything from there up.
pub const LATENCY_LAST_BOUND: i64 = 100_000_000_000;

/// The lower bounds of the latency buckets 1, 2, … in microseconds: 1, 2, 3, …, each the
/// previous plus 10.5 % (rounded down) plus 1, up to the first past [`LATENCY_LAST_BOUND`].
/// Bucket 0 is a latency of 0; bucket `k` holds `[bounds[k-1], bounds[k])`.
pub fn latency_bounds() -> Vec<i64> {
    let mut out = vec![1];
    while out[out.len() - 1] <= LATENCY_LAST_BOUND {
        let lo = out[out.len() - 1];
        out.push(lo + lo * LATENCY_GROWTH_PER_MILLE / 1000 + 1);
    }
    out
}

/// The bucket of a latency in whole microseconds (an SQL expression, NULL when NULL): the
/// number of bounds at or below it.
pub fn latency_bucket_sql(backend: DbBackend, latency_us: &str) -> String {
    match backend {
        DbBackend::Postgres => {
            let bounds: Vec<String> = latency_bounds().iter().map(i64::to_string).collect();
            format!(
                "width_bucket({latency_us}, ARRAY[{}]::bigint[])",
                bounds.join(",")
            )
        }
        _ => format!(
            "(SELECT bucket FROM {LATENCY_BOUNDS_TABLE} WHERE lower_us <= {latency_us} ORDER BY lower_us DESC LIMIT 1)"
        ),
    }
}

/// The histogram table (and on SQLite the bounds table, filled). The primary key serves every
/// read: a grain, a slot range.
pub fn create_latency_tables_sql(backend: DbBackend) -> Vec<String> {
    let (int, boolean) = match backend {
        DbBackend::Postgres => ("bigint", "boolean"),
        _ => ("integer", "bool"),
    };
    let mut out = vec![format!(
        "CREATE TABLE IF NOT EXISTS {LATENCY_TABLE} (\n    grain {int} NOT NULL,\n    slot {int} NOT NULL,\n    \
         model varchar(255) NOT NULL,\n    success {boolean} NOT NULL,\n    bucket integer NOT NULL,\n    \
         calls {int} NOT NULL DEFAULT 0,\n    PRIMARY KEY (grain, slot, model, success, bucket)\n)"
    )];
    if backend != DbBackend::Postgres {
        out.push(format!(
            "CREATE TABLE IF NOT EXISTS {LATENCY_BOUNDS_TABLE} (bucket integer PRIMARY KEY NOT NULL, lower_us integer NOT NULL UNIQUE)"
        ));
        let rows: Vec<String> = std::iter::once(0)
            .chain(latency_bounds())
            .enumerate()
            .map(|(k, lo)| format!("({k}, {lo})"))
            .collect();
        out.push(format!(
            "INSERT OR IGNORE INTO {LATENCY_BOUNDS_TABLE} (bucket, lower_us) VALUES {}",
            rows.join(", ")
        ));
    }
    out
}

/// `SELECT` of the histogram cells (`grain, slot, model, success, bucket, calls`) of the
/// latency counts of `sources`: summed per slot, model, outcome and bucket first, then fanned
/// out to the grains ([`LATENCY_GRAINS`] and, with `months`, UTC calendar months).
pub fn latency_cells_select(backend: DbBackend, sources: &[Source<'_>], months: bool) -> String {
    let mut grains: Vec<String> = LATENCY_GRAINS
        .iter()
        .map(|g| format!("SELECT {} AS grain, {} AS len", g.code, g.len))
        .collect();
    if months {
        grains.push(format!(
            "SELECT {} AS grain, 1 AS len",
            Calendar::Month.code()
        ));
    }
    format!(
        "SELECT g.grain AS grain, {slot} AS slot, d.model AS model, d.success AS success, \
         d.latency_bucket AS bucket, SUM(d.latency_calls) AS calls \
         FROM (SELECT slot, model, success, latency_bucket, SUM(latency_calls) AS latency_calls \
         FROM ({rows}) c WHERE latency_bucket IS NOT NULL GROUP BY slot, model, success, latency_bucket) d \
         CROSS JOIN ({grains}) g GROUP BY 1, 2, 3, 4, 5",
        slot = if months {
            format!(
                "CASE g.grain WHEN {} THEN {} ELSE {} END",
                Calendar::Month.code(),
                Calendar::Month.start_sql(backend, "d.slot"),
                cell_start_sql("d.slot", "g.len", "0")
            )
        } else {
            cell_start_sql("d.slot", "g.len", "0")
        },
        rows = contributions(backend, sources),
        grains = grains.join(" UNION ALL "),
    )
}

/// The month cells of the histograms summed from their day cells (what a rebuild writes: a
/// month can straddle the retention horizon, its days cannot).
pub fn latency_months_from_days_sql(backend: DbBackend) -> String {
    let key = LATENCY_KEY.join(", ");
    format!(
        "INSERT INTO {LATENCY_TABLE} ({key}, calls) \
         SELECT {month} AS grain, {start} AS slot, model, success, bucket, SUM(calls) AS calls \
         FROM {LATENCY_TABLE} WHERE grain = {DAY} GROUP BY 2, 3, 4, 5 HAVING SUM(calls) <> 0",
        month = Calendar::Month.code(),
        start = Calendar::Month.start_sql(backend, "slot"),
    )
}

/// The key columns of a histogram cell.
pub const LATENCY_KEY: [&str; 5] = ["grain", "slot", "model", "success", "bucket"];

/// `INSERT … ON CONFLICT DO UPDATE` adding the latency counts of `sources` to the histogram
/// cells ([`latency_cells_select`]).
pub fn latency_upsert_sql(backend: DbBackend, sources: &[Source<'_>]) -> String {
    latency_upsert_sql_of(backend, sources, true)
}

fn latency_upsert_sql_of(backend: DbBackend, sources: &[Source<'_>], months: bool) -> String {
    calls_upsert_sql(
        LATENCY_TABLE,
        &LATENCY_KEY,
        &latency_cells_select(backend, sources, months),
    )
}

/// `INSERT … ON CONFLICT DO UPDATE` adding the histogram cells of `select` (`key` columns, then
/// `calls`) to `table`, in key order, cells with no calls left out.
fn calls_upsert_sql(table: &str, key: &[&str], select: &str) -> String {
    let key = key.join(", ");
    format!(
        "INSERT INTO {table} ({key}, calls) \
         SELECT * FROM ({select}) cells WHERE calls <> 0 ORDER BY {key} \
         ON CONFLICT ({key}) DO UPDATE SET calls = {table}.calls + excluded.calls"
    )
}

/// Each user's latency histograms (migration 000023): per user, UTC calendar month, model,
/// outcome and latency bucket, how many of that user's calls took that long — what a `user_id`
/// filter's percentiles read for its whole months (the rest of the range, the rows). Calls for
/// no user ([`NO_USER`]) have none: no filter selects them alone.
///
/// Grain [`DAY`] holds only what retention deleted (before its horizon), as a user's day cells
/// per model do in [`TABLE`] (see [`retained_days_upsert_sql`]): a retention batch adds its
/// rows there, so a user's percentiles over the whole UTC days of a part of a month before the
/// horizon stay exact.
///
/// **Layout.** Most users' month cells hold one or two calls, so a row per bucket would cost
/// as much as the rows it counts (4.0M such rows, 555 MB, for the 9M calls with a user of the
/// 10,000-user benchmark). On PostgreSQL a row is therefore one user, grain, slot, model and
/// outcome, and its buckets are one `bigint[]` (`counts`), each element
/// `bucket · 2³² + calls` ([`user_latency_bucket_sql`], [`user_latency_calls_sql`]); an upsert
/// merges the arrays. SQLite, which has no arrays, keeps a row per bucket (`bucket`, `calls`).
/// Either way the cells read as ([`USER_LATENCY_KEY`], `calls`) through
/// [`user_latency_stored_sql`].
pub const USER_LATENCY_TABLE: &str = "llm_tracker_usage_latency_user";

/// The key of a user's histogram cell, one bucket (how the cells are compared and read).
pub const USER_LATENCY_KEY: [&str; 6] = ["user_key", "grain", "slot", "model", "success", "bucket"];

/// The primary key: a user's cells of a grain over a slot range are one index range. On
/// PostgreSQL without `bucket` (the buckets are the row's array).
fn user_latency_primary_key(backend: DbBackend) -> &'static [&'static str] {
    match backend {
        DbBackend::Postgres => &USER_LATENCY_KEY[..5],
        _ => &USER_LATENCY_KEY,
    }
}

/// The per-user histogram table.
pub fn create_user_latency_table_sql(backend: DbBackend) -> String {
    let columns = match backend {
        DbBackend::Postgres => {
            "    user_key integer NOT NULL,\n    grain integer NOT NULL,\n    slot integer NOT NULL,\n    \
             model varchar(255) NOT NULL,\n    success boolean NOT NULL,\n    counts bigint[] NOT NULL"
        }
        _ => {
            "    user_key integer NOT NULL,\n    grain integer NOT NULL,\n    slot integer NOT NULL,\n    \
             model varchar(255) NOT NULL,\n    success bool NOT NULL,\n    bucket integer NOT NULL,\n    \
             calls integer NOT NULL DEFAULT 0"
        }
    };
    format!(
        "CREATE TABLE IF NOT EXISTS {USER_LATENCY_TABLE} (\n{columns},\n    PRIMARY KEY ({})\n)",
        user_latency_primary_key(backend).join(", ")
    )
}

/// PostgreSQL: the bucket of an element `v` of `counts` (`bucket · 2³² + calls`, calls
/// between −2³¹ and 2³¹: the shift rounds down).
pub fn user_latency_bucket_sql(v: &str) -> String {
    format!("(({v} + 2147483648) >> 32)")
}

/// PostgreSQL: the calls of an element `v` of `counts`.
pub fn user_latency_calls_sql(v: &str) -> String {
    format!("({v} - ({} << 32))", user_latency_bucket_sql(v))
}

/// The stored cells of each user's histograms as rows of ([`USER_LATENCY_KEY`], `calls`), a
/// `FROM` item aliased `alias` (PostgreSQL: the arrays unnested; conditions on the key columns
/// other than `bucket` still reach the primary key).
pub fn user_latency_stored_sql(backend: DbBackend, alias: &str) -> String {
    match backend {
        DbBackend::Postgres => format!(
            "(SELECT u.user_key, u.grain, u.slot, u.model, u.success, {bucket} AS bucket, {calls} AS calls \
             FROM {USER_LATENCY_TABLE} u CROSS JOIN LATERAL unnest(u.counts) AS e(v)) {alias}",
            bucket = user_latency_bucket_sql("e.v"),
            calls = user_latency_calls_sql("e.v"),
        ),
        _ => format!("{USER_LATENCY_TABLE} {alias}"),
    }
}

/// The latency counts of `sources` as rows of `slot, user_key, model, success, latency_bucket,
/// latency_calls` (for [`user_latency_cells_select`]).
pub fn latency_rows(backend: DbBackend, sources: &[Source<'_>]) -> String {
    format!(
        "SELECT slot, user_key, model, success, latency_bucket, latency_calls FROM ({}) c",
        contributions(backend, sources)
    )
}

/// `SELECT` of a user's histogram cells ([`USER_LATENCY_KEY`], then `calls`) at `grain`
/// (`Calendar::Month.code()`, or [`DAY`] for the days retention deleted) from `rows` (the
/// shape of [`latency_rows`]; several such selects may be joined with `UNION ALL`).
pub fn user_latency_cells_select(backend: DbBackend, rows: &str, grain: i64) -> String {
    let start = if grain == DAY {
        cell_start_sql("d.slot", "96", "0")
    } else {
        Calendar::Month.start_sql(backend, "d.slot")
    };
    format!(
        "SELECT d.user_key AS user_key, {grain} AS grain, {start} AS slot, d.model AS model, \
         d.success AS success, d.latency_bucket AS bucket, SUM(d.latency_calls) AS calls \
         FROM ({rows}) d WHERE d.latency_bucket IS NOT NULL AND d.user_key <> {NO_USER} \
         GROUP BY d.user_key, {start}, d.model, d.success, d.latency_bucket"
    )
}

/// `INSERT … ON CONFLICT DO UPDATE` adding the cells of `rows` at `grain` to each user's
/// histograms ([`user_latency_cells_select`]), in key order. PostgreSQL: one array per user,
/// grain, slot, model and outcome, merged with the stored one bucket by bucket (buckets whose
/// calls come to 0 leave the array).
pub fn user_latency_upsert_sql(backend: DbBackend, rows: &str, grain: i64) -> String {
    user_latency_upsert_of(backend, user_latency_cells_select(backend, rows, grain))
}

/// [`user_latency_upsert_sql`] at the month grain for the cells of full months only
/// ([`FULL_MONTH_TABLE`]): what the fold and a rebuild add (a light month has no cells).
pub fn user_latency_full_months_upsert_sql(backend: DbBackend, rows: &str) -> String {
    let select = user_latency_cells_select(backend, rows, Calendar::Month.code());
    user_latency_upsert_of(backend, full_months_only(&select))
}

/// The month cells of `select` (a user's cells: `user_key` and `slot` columns, month cells
/// only) that lie in full months ([`FULL_MONTH_TABLE`]).
pub fn full_months_only(select: &str) -> String {
    format!(
        "SELECT * FROM ({select}) m WHERE EXISTS (SELECT 1 FROM {FULL_MONTH_TABLE} f \
         WHERE f.user_key = m.user_key AND f.slot = m.slot)"
    )
}

/// The upsert of [`user_latency_upsert_sql`] for the cells `select` returns.
fn user_latency_upsert_of(backend: DbBackend, select: String) -> String {
    match backend {
        DbBackend::Postgres => {
            let key = user_latency_primary_key(backend).join(", ");
            let (bucket, calls) = (
                user_latency_bucket_sql("m.v"),
                user_latency_calls_sql("m.v"),
            );
            format!(
                "INSERT INTO {USER_LATENCY_TABLE} ({key}, counts) \
                 SELECT {key}, array_agg(CAST(bucket AS bigint) * 4294967296 + CAST(calls AS bigint) ORDER BY bucket) \
                 FROM ({select}) cells WHERE calls <> 0 GROUP BY {key} ORDER BY {key} \
                 ON CONFLICT ({key}) DO UPDATE SET counts = (SELECT COALESCE(array_agg(k * 4294967296 + n ORDER BY k), '{{}}') \
                 FROM (SELECT {bucket} AS k, CAST(SUM({calls}) AS bigint) AS n \
                 FROM unnest({USER_LATENCY_TABLE}.counts || excluded.counts) AS m(v) GROUP BY 1) b WHERE n <> 0)"
            )
        }
        _ => calls_upsert_sql(USER_LATENCY_TABLE, &USER_LATENCY_KEY, &select),
    }
}

/// Each user's UTC months that keep all of their cells (migration 000029): `(user_key,
/// slot)`, the month's first slot. A user's month with fewer than [`FULL_MONTH_CALLS`] calls
/// is **light**: of that user's latency histograms it keeps no month cell, and reads count the
/// month's rows instead (a few, through the `(user_id, created_at)` index). At 100,000 Zipf
/// users and 10M rows a year most user-months hold a handful of calls, and their cells held
/// about one call each: as large as the rows they summed.
///
/// A month becomes full, never light again, when a fold takes its totals cell to
/// [`FULL_MONTH_CALLS`] calls ([`FoldSql::candidates`], [`promote_months_in`]), when
/// `rollup rebuild` finds it so, or when it started before the retention horizon at migration
/// 000029 (its deleted rows may be in no day cell). Its cells are filled from its rows in the
/// same transaction ([`full_months_fill_sql`]). Calls for no user, and all users' cells, are
/// not concerned.
pub const FULL_MONTH_TABLE: &str = "llm_tracker_usage_rollup_full_month";

/// The calls in a user's UTC month that make it full ([`FULL_MONTH_TABLE`]).
pub const FULL_MONTH_CALLS: i64 = 10;

/// The table of full months.
pub fn create_full_month_table_sql(backend: DbBackend) -> String {
    let int = match backend {
        DbBackend::Postgres => "bigint",
        _ => "integer",
    };
    format!(
        "CREATE TABLE IF NOT EXISTS {FULL_MONTH_TABLE} (\n    user_key {int} NOT NULL,\n    slot {int} NOT NULL,\n    PRIMARY KEY (user_key, slot)\n)"
    )
}

/// A user's UTC years that are **full** (migration 000032): `(user_key, slot)`, the year's
/// first slot. A user's year with fewer than [`FULL_YEAR_CALLS`] calls is **light**: it keeps
/// its year cell in [`TOTALS_TABLE`] but no month cell there (none of its months is full either,
/// [`FULL_YEAR_CALLS`] being [`FULL_MONTH_CALLS`]), and reads count its months from its rows,
/// which are all there: a year is made full before retention deletes any of its rows. At 10M
/// rows a year from a million Zipf users most users call a few times a year, and their month
/// cells (2.2M) cost more than half of the rollup's share of the usage table.
///
/// A year becomes full, never light again, when a fold takes its year cell to
/// [`FULL_YEAR_CALLS`] calls or changes a year cell that starts before the retention horizon
/// ([`FoldSql::candidates`], [`promote_years_in`]), when a retention run moves the horizon past
/// its start ([`promote_years_before_sql`]), when `rollup rebuild` finds it so, or at migration
/// 000032 when it holds a full month or starts before the horizon. Its month cells are filled
/// from its rows in the same transaction ([`full_years_month_fill_sql`]).
pub const FULL_YEAR_TABLE: &str = "llm_tracker_usage_rollup_full_year";

/// The calls in a user's UTC year that make it full ([`FULL_YEAR_TABLE`]): those of a full
/// month, so that a light year holds no full month.
pub const FULL_YEAR_CALLS: i64 = FULL_MONTH_CALLS;

/// The table of full years.
pub fn create_full_year_table_sql(backend: DbBackend) -> String {
    create_full_month_table_sql(backend).replace(FULL_MONTH_TABLE, FULL_YEAR_TABLE)
}

/// The index of the year cells of fewer than [`FULL_YEAR_CALLS`] calls by tokens (every light
/// year's, migration 000032): the most tokens a light year holds, one index probe
/// (`by_user`'s bound on what a light year's missing month cells would add).
pub const LIGHT_YEAR_INDEX: &str = "llm_tracker_usage_rollup_total_light_year_idx";

/// Creates [`LIGHT_YEAR_INDEX`].
pub fn create_light_year_index_sql() -> String {
    format!(
        "CREATE INDEX IF NOT EXISTS {LIGHT_YEAR_INDEX} ON {TOTALS_TABLE} (slot, total_tokens DESC) \
         WHERE grain = {} AND user_key < {ALL_USERS} AND calls < {FULL_YEAR_CALLS}",
        Calendar::Year.code()
    )
}

/// The month cells in [`TOTALS_TABLE`] of the light years `keys` (an SQL query of `fu`, a user
/// key, and `fy`, a year's first slot; years without month cells) filled from their rows and
/// the day cells that keep what retention deleted there, less their contributions still
/// pending: exact whenever it runs, while no fold runs (under the folders' lock on PostgreSQL,
/// in a write transaction on SQLite). (A light year's rows are normally all there: retention
/// makes full the years it deletes from first; but rows it deleted while they were pending
/// reach their year's cell only at the next fold.)
pub fn full_years_month_fill_sql(backend: DbBackend, keys: &str) -> String {
    let next = Calendar::Year.next_sql(backend, "k.fy");
    let rows = format!(
        "({keys}) k JOIN llm_tracker_usage ON user_id = k.fu AND created_at >= {} AND created_at < {}",
        slot_instant_sql(backend, "k.fy"),
        slot_instant_sql(backend, &next),
    );
    let negated: Vec<String> = delta_sums()
        .iter()
        .map(|c| format!("-{c} AS {c}"))
        .collect();
    let pending = format!(
        "SELECT {key}, {sums} FROM {DELTA_TABLE} d WHERE EXISTS (SELECT 1 FROM ({keys}) k \
         WHERE k.fu = d.user_key AND d.slot >= k.fy AND d.slot < {next})",
        key = DELTA_KEY.join(", "),
        sums = negated.join(", "),
    );
    // The day cells of a light year: only what retention deleted there, rows pending then
    // included (retention keeps every row it deletes in its day cell; migration 000031).
    let retained = format!(
        "SELECT slot, user_key, '' AS model, (1 = 1) AS success, CAST(NULL AS INTEGER) AS latency_bucket, \
         {sums} FROM {TOTALS_TABLE} r WHERE r.grain = {DAY} AND EXISTS (SELECT 1 FROM ({keys}) k \
         WHERE k.fu = r.user_key AND r.slot >= k.fy AND r.slot < {next})",
        sums = delta_sums().join(", "),
    );
    let select = cells_select_of(
        backend,
        &[
            Source::Table {
                name: &rows,
                sign: 1,
                where_sql: None,
            },
            Source::Delta(&format!("({retained}) rd")),
            Source::Delta(&format!("({pending}) pd")),
        ],
        Level::Total,
        Whose::PerUser,
    );
    upsert_cells_sql(
        Level::Total,
        &format!(
            "SELECT * FROM ({select}) c WHERE c.grain = {}",
            Calendar::Month.code()
        ),
    )
}

/// The light years that start before the retention horizon, as `keys` for
/// [`full_years_month_fill_sql`] (`fu`, `fy`): what a retention run makes full before it
/// deletes rows, and migration 000032 at once.
pub fn light_years_before_horizon_sql() -> String {
    format!(
        "SELECT t.user_key AS fu, t.slot AS fy FROM {TOTALS_TABLE} t JOIN {RETENTION_TABLE} h ON h.id = 1 \
         WHERE t.grain = {} AND t.user_key < {ALL_USERS} AND t.slot < h.horizon_slot \
         AND NOT EXISTS (SELECT 1 FROM {FULL_YEAR_TABLE} y WHERE y.user_key = t.user_key AND y.slot = t.slot)",
        Calendar::Year.code()
    )
}

/// `(user_key, slot)` of each light year of [`light_years_before_horizon_sql`].
pub fn promote_years_before_sql() -> String {
    format!(
        "SELECT k.fu, k.fy FROM ({}) k ORDER BY 1, 2",
        light_years_before_horizon_sql()
    )
}

/// Makes full the user years `years` (not full yet) and fills their month cells
/// ([`full_years_month_fill_sql`]), then makes full their months that hold
/// [`FULL_MONTH_CALLS`] calls or start before the retention horizon ([`promote_months_in`]).
/// In `txn`, which must hold the folders' lock (PostgreSQL) or write (SQLite), once the years'
/// folded contributions have left the delta.
pub async fn promote_years_in<C: sea_orm_migration::sea_orm::ConnectionTrait>(
    txn: &C,
    years: &[(i64, i64)],
) -> Result<(), sea_orm_migration::sea_orm::DbErr> {
    use sea_orm_migration::sea_orm::Statement;
    if years.is_empty() {
        return Ok(());
    }
    let backend = txn.get_database_backend();
    let rows: Vec<String> = years.iter().map(|(u, y)| format!("({u}, {y})")).collect();
    let keys = format!(
        "SELECT column1 AS fu, column2 AS fy FROM (VALUES {}) v",
        rows.join(", ")
    );
    txn.execute_unprepared(&format!(
        "INSERT INTO {FULL_YEAR_TABLE} (user_key, slot) SELECT k.fu, k.fy FROM ({keys}) k"
    ))
    .await?;
    txn.execute_unprepared(&full_years_month_fill_sql(backend, &keys))
        .await?;
    let months = user_months_of(
        txn.query_all_raw(Statement::from_string(
            backend,
            format!(
                "SELECT t.user_key, t.slot FROM ({keys}) k JOIN {TOTALS_TABLE} t ON t.grain = {month} \
                 AND t.user_key = k.fu AND t.slot >= k.fy AND t.slot < {next} \
                 WHERE (t.calls >= {FULL_MONTH_CALLS} OR t.slot < (SELECT h.horizon_slot FROM {RETENTION_TABLE} h WHERE h.id = 1)) \
                 AND NOT EXISTS (SELECT 1 FROM {FULL_MONTH_TABLE} f WHERE f.user_key = t.user_key AND f.slot = t.slot) \
                 ORDER BY 1, 2",
                month = Calendar::Month.code(),
                next = Calendar::Year.next_sql(backend, "k.fy"),
            ),
        ))
        .await?,
    )?;
    promote_months_in(txn, &months).await
}

/// The instant of a slot expression as the usage table's `created_at` compares with it
/// (PostgreSQL `timestamptz`; SQLite the text Django writes, which sorts as time).
fn slot_instant_sql(backend: DbBackend, slot: &str) -> String {
    match backend {
        DbBackend::Postgres => format!("to_timestamp(({slot}) * 900)"),
        _ => format!("strftime('%Y-%m-%d %H:%M:%S', ({slot}) * 900, 'unixepoch')"),
    }
}

/// The cells of the light months `keys` (an SQL query of `fu`, a user key, and `fm`, a month's
/// first slot; months without cells) filled from their rows, the day cells that keep what
/// retention deleted there, less their contributions still pending (which the fold adds once
/// the month is full): exact whenever it runs, while no fold runs (under the folders' lock on
/// PostgreSQL, in a write transaction on SQLite).
pub fn full_months_fill_sql(backend: DbBackend, keys: &str) -> Vec<String> {
    vec![
        full_months_latency_fill_sql(backend, keys),
        full_months_model_fill_sql(backend, keys),
        full_months_day_fill_sql(backend, keys),
    ]
}

/// The statement of [`full_months_fill_sql`] that fills the months' latency histograms
/// (what migration 000029's `down` runs).
pub fn full_months_latency_fill_sql(backend: DbBackend, keys: &str) -> String {
    let next = Calendar::Month.next_sql(backend, "k.fm");
    let in_month = |user: &str, slot: &str| {
        format!(
            "EXISTS (SELECT 1 FROM ({keys}) k WHERE k.fu = {user} AND {slot} >= k.fm AND {slot} < {next})"
        )
    };
    let joined = format!(
        "({keys}) k JOIN llm_tracker_usage ON user_id = k.fu AND created_at >= {} AND created_at < {}",
        slot_instant_sql(backend, "k.fm"),
        slot_instant_sql(backend, &next),
    );
    let rows = latency_rows(
        backend,
        &[Source::Table {
            name: &joined,
            sign: 1,
            where_sql: None,
        }],
    );
    let retained = match backend {
        DbBackend::Postgres => format!(
            "SELECT u.slot AS slot, u.user_key AS user_key, u.model AS model, u.success AS success, \
             {bucket} AS latency_bucket, {calls} AS latency_calls \
             FROM {USER_LATENCY_TABLE} u CROSS JOIN LATERAL unnest(u.counts) AS e(v) \
             WHERE u.grain = {DAY} AND {within}",
            bucket = user_latency_bucket_sql("e.v"),
            calls = user_latency_calls_sql("e.v"),
            within = in_month("u.user_key", "u.slot"),
        ),
        _ => format!(
            "SELECT u.slot AS slot, u.user_key AS user_key, u.model AS model, u.success AS success, \
             u.bucket AS latency_bucket, u.calls AS latency_calls FROM {USER_LATENCY_TABLE} u \
             WHERE u.grain = {DAY} AND {}",
            in_month("u.user_key", "u.slot"),
        ),
    };
    let pending = format!(
        "SELECT d.slot AS slot, d.user_key AS user_key, d.model AS model, d.success AS success, \
         d.latency_bucket AS latency_bucket, -d.latency_calls AS latency_calls FROM {DELTA_TABLE} d \
         WHERE d.latency_bucket IS NOT NULL AND {}",
        in_month("d.user_key", "d.slot"),
    );
    user_latency_upsert_sql(
        backend,
        &format!("{rows} UNION ALL {retained} UNION ALL {pending}"),
        Calendar::Month.code(),
    )
}

/// The statement of [`full_months_fill_sql`] that fills the months' cells per model and
/// outcome (what migration 000030's `down` runs).
pub fn full_months_model_fill_sql(backend: DbBackend, keys: &str) -> String {
    let fill = MonthFill::of(backend, keys);
    // The month cells per model and outcome: the rows, the day cells per model that keep what
    // retention deleted, less what is pending (all sums, as delta rows).
    let retained_days = format!(
        "SELECT slot, user_key, model, success, CAST(NULL AS INTEGER) AS latency_bucket, {sums} \
         FROM {TABLE} r WHERE r.grain = {DAY} AND {within}",
        sums = delta_sums()
            .iter()
            .map(|c| match *c {
                "successful_calls" => {
                    "CASE WHEN success THEN calls ELSE 0 END AS successful_calls".to_owned()
                }
                c => c.to_owned(),
            })
            .collect::<Vec<_>>()
            .join(", "),
        within = fill.in_month("r.user_key", "r.slot"),
    );
    upsert_sql_of(
        backend,
        &[
            Source::Table {
                name: &fill.rows,
                sign: 1,
                where_sql: None,
            },
            Source::Delta(&format!("({retained_days}) rd")),
            Source::Delta(&format!("({}) pd", fill.pending)),
        ],
        Level::ByModel,
        Whose::PerUser,
    )
}

/// The statement of [`full_months_fill_sql`] that fills the months' day cells in the totals
/// table (migration 000031; what its `down` runs): their rows less what is pending, added to
/// the day cells that keep what retention deleted there (the only day cells a light month has).
pub fn full_months_day_fill_sql(backend: DbBackend, keys: &str) -> String {
    let fill = MonthFill::of(backend, keys);
    let select = cells_select_of(
        backend,
        &[
            Source::Table {
                name: &fill.rows,
                sign: 1,
                where_sql: None,
            },
            Source::Delta(&format!("({}) pd", fill.pending)),
        ],
        Level::Total,
        Whose::PerUser,
    );
    upsert_cells_sql(
        Level::Total,
        &format!("SELECT * FROM ({select}) c WHERE c.grain = {DAY}"),
    )
}

/// What filling the user months `keys` (`fu`, `fm`) reads: their rows, and their pending
/// contributions negated (as delta rows).
struct MonthFill {
    next: String,
    keys: String,
    rows: String,
    pending: String,
}

impl MonthFill {
    fn of(backend: DbBackend, keys: &str) -> Self {
        let next = Calendar::Month.next_sql(backend, "k.fm");
        let rows = format!(
            "({keys}) k JOIN llm_tracker_usage ON user_id = k.fu AND created_at >= {} AND created_at < {}",
            slot_instant_sql(backend, "k.fm"),
            slot_instant_sql(backend, &next),
        );
        let mut fill = MonthFill {
            next,
            keys: keys.to_owned(),
            rows,
            pending: String::new(),
        };
        let negated: Vec<String> = delta_sums()
            .iter()
            .map(|c| format!("-{c} AS {c}"))
            .collect();
        fill.pending = format!(
            "SELECT {key}, {sums} FROM {DELTA_TABLE} d WHERE {within}",
            key = DELTA_KEY.join(", "),
            sums = negated.join(", "),
            within = fill.in_month("d.user_key", "d.slot"),
        );
        fill
    }

    /// Whether `user` and `slot` (SQL) lie in one of the months.
    fn in_month(&self, user: &str, slot: &str) -> String {
        format!(
            "EXISTS (SELECT 1 FROM ({keys}) k WHERE k.fu = {user} AND {slot} >= k.fm AND {slot} < {next})",
            keys = self.keys,
            next = self.next,
        )
    }
}

/// `keys` for [`full_months_fill_sql`] from a list of `(user_key, month slot)`.
fn full_months_keys(months: &[(i64, i64)]) -> String {
    let rows: Vec<String> = months.iter().map(|(u, m)| format!("({u}, {m})")).collect();
    format!(
        "SELECT column1 AS fu, column2 AS fm FROM (VALUES {}) v",
        rows.join(", ")
    )
}

/// `(user_key, slot)` of each row.
fn user_months_of(
    rows: Vec<sea_orm_migration::sea_orm::QueryResult>,
) -> Result<Vec<(i64, i64)>, sea_orm_migration::sea_orm::DbErr> {
    rows.iter()
        .map(|r| Ok((r.try_get_by_index::<i64>(0)?, r.try_get_by_index::<i64>(1)?)))
        .collect()
}

/// Makes full the user months `months` (not full yet) and fills their cells
/// ([`full_months_fill_sql`]): what a fold does for the months it took to
/// [`FULL_MONTH_CALLS`]. In `txn`, which must hold the folders' lock (PostgreSQL) or write
/// (SQLite), once the months' folded contributions have left the delta.
pub async fn promote_months_in<C: sea_orm_migration::sea_orm::ConnectionTrait>(
    txn: &C,
    months: &[(i64, i64)],
) -> Result<(), sea_orm_migration::sea_orm::DbErr> {
    if months.is_empty() {
        return Ok(());
    }
    let keys = full_months_keys(months);
    txn.execute_unprepared(&format!(
        "INSERT INTO {FULL_MONTH_TABLE} (user_key, slot) SELECT k.fu, k.fm FROM ({keys}) k"
    ))
    .await?;
    let backend = txn.get_database_backend();
    for sql in full_months_fill_sql(backend, &keys) {
        txn.execute_unprepared(&sql).await?;
    }
    Ok(())
}

/// The statements that make full the user years of [`FULL_YEAR_CALLS`] calls in their year
/// cells, those holding a full month and (with a retention horizon) those starting before it,
/// then delete the month cells of the other (light) years: what `rollup rebuild` runs once the
/// totals and the full months are known, and migration 000032 (`horizon`, an SQL expression,
/// then read from the retention table).
pub fn full_years_sql(backend: DbBackend, horizon: Option<&str>) -> Vec<String> {
    let year = Calendar::Year.code();
    let month = Calendar::Month.code();
    let before = match horizon {
        Some(h) => format!(" OR t.slot < {h}"),
        None => String::new(),
    };
    vec![
        format!(
            "INSERT INTO {FULL_YEAR_TABLE} (user_key, slot) SELECT t.user_key, t.slot FROM {TOTALS_TABLE} t \
             WHERE t.grain = {year} AND t.user_key < {ALL_USERS} AND (t.calls >= {FULL_YEAR_CALLS}{before} \
             OR EXISTS (SELECT 1 FROM {FULL_MONTH_TABLE} f WHERE f.user_key = t.user_key AND f.slot >= t.slot \
             AND f.slot < {next})) \
             AND NOT EXISTS (SELECT 1 FROM {FULL_YEAR_TABLE} y WHERE y.user_key = t.user_key AND y.slot = t.slot)",
            next = Calendar::Year.next_sql(backend, "t.slot"),
        ),
        format!(
            "DELETE FROM {TOTALS_TABLE} WHERE grain = {month} AND user_key < {ALL_USERS} AND NOT EXISTS \
             (SELECT 1 FROM {FULL_YEAR_TABLE} y WHERE y.user_key = {TOTALS_TABLE}.user_key AND y.slot = {})",
            Calendar::Year.start_sql(backend, &format!("{TOTALS_TABLE}.slot")),
        ),
    ]
}

/// Trigger names, for `down` and for checks.
pub const TRIGGERS: [&str; 4] = [
    "llm_tracker_usage_rollup_insert",
    "llm_tracker_usage_rollup_delete",
    "llm_tracker_usage_rollup_update",
    "llm_tracker_usage_rollup_truncate",
];

/// The statements creating the triggers that keep the rollup exact, whoever writes the rows
/// (existing triggers of the same names are replaced).
///
/// PostgreSQL: statement-level triggers with transition tables, so a multi-row insert (the
/// tracker's group commit, a batch of the ingest API) runs one statement, whose contributions
/// are summed per delta key before they are appended; TRUNCATE empties the rollup. SQLite: row-level
/// triggers (it has no statement-level ones).
pub fn create_triggers_sql(backend: DbBackend) -> Vec<String> {
    // The statement a trigger runs for its sources; `net` for updates (see delta_insert_sql).
    let body = |sources: &[Source<'_>], net: bool| delta_insert_sql(backend, sources, net);
    // PostgreSQL: the contributions of a transition table, summed per key when it holds more
    // than one row (the `IF` of the function's body; its `;` and `END IF` close around the
    // caller's).
    let summed_if_many = |name: &'static str, sign: i32| {
        let source = [Source::Table {
            name,
            sign,
            where_sql: None,
        }];
        format!(
            "IF EXISTS (SELECT 1 FROM {name} OFFSET 1) THEN\n{};\nELSE\n{};\nEND IF",
            body(&source, true),
            body(&source, false)
        )
    };
    let mut out = drop_triggers_sql(backend);
    match backend {
        DbBackend::Postgres => {
            let table = |name: &'static str, sign: i32| Source::Table {
                name,
                sign,
                where_sql: None,
            };
            let function = |name: &str, body: String| {
                format!(
                    "CREATE FUNCTION {name}() RETURNS trigger LANGUAGE plpgsql AS $fn$\nBEGIN\n{body};\nRETURN NULL;\nEND\n$fn$"
                )
            };
            let trigger = |name: &str, event: &str, referencing: &str| {
                format!(
                    "CREATE TRIGGER {name} AFTER {event} ON llm_tracker_usage {referencing} FOR EACH STATEMENT EXECUTE FUNCTION {name}()"
                )
            };
            let truncate = format!(
                "DELETE FROM {TABLE}; DELETE FROM {TOTALS_TABLE}; DELETE FROM {DELTA_TABLE}; DELETE FROM {LATENCY_TABLE}; \
                 DELETE FROM {USER_LATENCY_TABLE}"
            );
            out.extend([
                // A multi-row insert or delete appends one delta row per slot, user, model and
                // outcome, not one per row (migration 000015); a one-row statement, the
                // tracker's usual, skips the grouping, which cost it a quarter more time in the
                // database (migration 000017).
                function(TRIGGERS[0], summed_if_many("new_rows", 1)),
                // Rows deleted by retention leave their contributions in the cells (migration
                // 000018): its transaction marks itself in the retention table first.
                function(
                    TRIGGERS[1],
                    format!(
                        "IF EXISTS (SELECT 1 FROM {RETENTION_TABLE} WHERE deleting) THEN\nRETURN NULL;\nEND IF;\n{}",
                        summed_if_many("old_rows", -1)
                    ),
                ),
                function(
                    TRIGGERS[2],
                    body(&[table("old_rows", -1), table("new_rows", 1)], true),
                ),
                function(TRIGGERS[3], truncate),
                trigger(TRIGGERS[0], "INSERT", "REFERENCING NEW TABLE AS new_rows"),
                trigger(TRIGGERS[1], "DELETE", "REFERENCING OLD TABLE AS old_rows"),
                trigger(
                    TRIGGERS[2],
                    "UPDATE",
                    "REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows",
                ),
                trigger(TRIGGERS[3], "TRUNCATE", ""),
            ]);
        }
        _ => {
            let trigger = |name: &str, event: &str, when: &str, rows: &[(&str, i32)], net: bool| {
                format!(
                    "CREATE TRIGGER {name} AFTER {event} ON llm_tracker_usage FOR EACH ROW{when} BEGIN {}; END",
                    body(&[Source::Rows(rows)], net)
                )
            };
            // See the PostgreSQL delete function: retention's deletes keep the cells.
            let unless_retention =
                format!(" WHEN NOT EXISTS (SELECT 1 FROM {RETENTION_TABLE} WHERE deleting)");
            out.extend([
                trigger(TRIGGERS[0], "INSERT", "", &[("NEW.", 1)], false),
                trigger(
                    TRIGGERS[1],
                    "DELETE",
                    &unless_retention,
                    &[("OLD.", -1)],
                    false,
                ),
                trigger(
                    TRIGGERS[2],
                    "UPDATE",
                    "",
                    &[("OLD.", -1), ("NEW.", 1)],
                    true,
                ),
            ]);
        }
    }
    out
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

/// Folds the contributions written since the last fold into the cells, in one transaction.
/// Returns `false` when there was nothing to fold or another fold was running (PostgreSQL:
/// one at a time, by an advisory lock; the others skip their turn). Reads are exact either
/// way: they add what is pending. Looks for new dense users on this process's
/// [`PromotionClock`] (see [`fold_with`]).
pub async fn fold(
    db: &sea_orm_migration::sea_orm::DatabaseConnection,
) -> Result<bool, sea_orm_migration::sea_orm::DbErr> {
    fold_with(db, &PROCESS_CLOCK).await
}

/// When a folder last looked for new dense users, so that it looks at most once a minute
/// ([`promote_dense_in`] reads two days of day cells: ~8 ms on 10,000 users). One per folder
/// of a database: a clock shared by the folders of two databases lets one database's folds
/// take every turn, and the other's users never become dense.
#[derive(Debug, Default)]
pub struct PromotionClock(std::sync::atomic::AtomicI64);

impl PromotionClock {
    pub const fn new() -> Self {
        Self(std::sync::atomic::AtomicI64::new(0))
    }

    /// Whether a look is due at `now` (seconds since the epoch); if so, the next is a minute
    /// later. One caller wins when several ask at once.
    pub fn due(&self, now: i64) -> bool {
        use std::sync::atomic::Ordering::Relaxed;
        let last = self.0.load(Relaxed);
        now - last >= 60 && self.0.compare_exchange(last, now, Relaxed, Relaxed).is_ok()
    }
}

/// The clock of [`fold`]: the CLI's and tests' folds, one database per process.
static PROCESS_CLOCK: PromotionClock = PromotionClock::new();

/// [`fold`], looking for new dense users when `clock` says so.
pub async fn fold_with(
    db: &sea_orm_migration::sea_orm::DatabaseConnection,
    clock: &PromotionClock,
) -> Result<bool, sea_orm_migration::sea_orm::DbErr> {
    use sea_orm_migration::sea_orm::{ConnectionTrait, Statement, TransactionTrait};
    let backend = db.get_database_backend();
    let pending = db
        .query_one_raw(Statement::from_string(
            backend,
            format!("SELECT 1 FROM {DELTA_TABLE} LIMIT 1"),
        ))
        .await?;
    if pending.is_none() {
        return Ok(false);
    }
    let txn = db.begin().await?;
    if backend == DbBackend::Postgres {
        let locked = txn
            .query_one_raw(Statement::from_string(
                backend,
                format!("SELECT pg_try_advisory_xact_lock({})", FOLD_LOCK),
            ))
            .await?
            .map(|r| r.try_get_by_index::<bool>(0))
            .transpose()?
            .unwrap_or(false);
        if !locked {
            txn.rollback().await?;
            return Ok(false);
        }
        // The delta's statistics are always stale (it empties every second), so the estimate
        // can pass jit_above_cost, and compiling the fold then takes 60 ms of a 70 ms fold
        // (measured); the fold is a few small aggregates.
        txn.execute_unprepared("SET LOCAL jit = off").await?;
    }
    let fold = fold_sql(backend);
    for sql in &fold.run {
        txn.execute_unprepared(sql).await?;
    }
    let mut months = Vec::new();
    let mut years = Vec::new();
    for r in txn
        .query_all_raw(Statement::from_string(backend, fold.candidates))
        .await?
    {
        let key = (r.try_get_by_index::<i64>(1)?, r.try_get_by_index::<i64>(2)?);
        match r.try_get_by_index::<i32>(0)? {
            0 => months.push(key),
            _ => years.push(key),
        }
    }
    for sql in &fold.then {
        txn.execute_unprepared(sql).await?;
    }
    // The user years and months the fold took to FULL_YEAR_CALLS and FULL_MONTH_CALLS: full
    // from now on, their cells filled (a year's months that are full with it among them).
    promote_years_in(&txn, &years).await?;
    promote_months_in(&txn, &months).await?;
    // At most once a minute per clock: the users whose day just reached the dense threshold.
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    if clock.due(now) {
        promote_dense_in(&txn, now).await?;
    }
    txn.commit().await?;
    // No VACUUM here: the folded rows are dead tuples, but vacuuming from this loop (every
    // second, in every process) queued behind other sessions' locks, and its truncation of the
    // emptied pages takes a lock that every insert's trigger waits for. Migration 000008 has
    // autovacuum look after the delta table instead, never truncating it.
    Ok(true)
}

/// Makes dense the users whose UTC day, yesterday or today (of `now`, seconds since the
/// epoch), reached [`DENSE_DAY_CALLS`] ([`promote_dense_sql`]) and fills their hour cells from
/// tomorrow on ([`dense_backfill_from_sql`]); reopens the window of demoted users busy again
/// ([`busy_again_sql`]); closes it for idle ones ([`idle_dense_sql`]). In `txn`, which must
/// hold the folders' lock (PostgreSQL) or write (SQLite). Returns the new dense users' keys.
pub async fn promote_dense_in<C: sea_orm_migration::sea_orm::ConnectionTrait>(
    txn: &C,
    now: i64,
) -> Result<Vec<i64>, sea_orm_migration::sea_orm::DbErr> {
    use sea_orm_migration::sea_orm::Statement;
    let backend = txn.get_database_backend();
    let today = now.div_euclid(SLOT_SECONDS * DAY) * DAY;
    let keys: Vec<i64> = txn
        .query_all_raw(Statement::from_string(
            backend,
            promote_dense_sql(today - DAY, today),
        ))
        .await?
        .iter()
        .map(|r| r.try_get_by_index::<i64>(0))
        .collect::<Result<_, _>>()?;
    let tomorrow = today + DAY;
    if !keys.is_empty() {
        let list: Vec<String> = keys.iter().map(i64::to_string).collect();
        for sql in dense_backfill_from_sql(backend, &list.join(", "), tomorrow, 1) {
            txn.execute_unprepared(&sql).await?;
        }
    }
    // Demoted users busy again: the window reopens, its hours since `until` filled.
    let again = txn
        .query_all_raw(Statement::from_string(backend, busy_again_sql(today - DAY)))
        .await?;
    for r in again {
        let (key, until): (i64, i64) = (r.try_get_by_index(0)?, r.try_get_by_index(1)?);
        txn.execute_unprepared(&format!(
            "UPDATE {DENSE_TABLE} SET until = NULL WHERE user_key = {key}"
        ))
        .await?;
        for sql in dense_backfill_from_sql(backend, &key.to_string(), until, 1) {
            txn.execute_unprepared(&sql).await?;
        }
    }
    // Users idle for [`DENSE_IDLE_DAYS`]: the window closes tomorrow. What was counted from
    // then on (rows written ahead of time) is taken out of the hours first, while the window
    // still holds it, and the emptied cells go.
    let idle: Vec<i64> = txn
        .query_all_raw(Statement::from_string(backend, idle_dense_sql(today)))
        .await?
        .iter()
        .map(|r| r.try_get_by_index::<i64>(0))
        .collect::<Result<_, _>>()?;
    if !idle.is_empty() {
        let list = idle
            .iter()
            .map(i64::to_string)
            .collect::<Vec<_>>()
            .join(", ");
        for sql in dense_backfill_from_sql(backend, &list, tomorrow, -1) {
            txn.execute_unprepared(&sql).await?;
        }
        txn.execute_unprepared(&format!(
            "UPDATE {DENSE_TABLE} SET until = {tomorrow} WHERE user_key IN ({list})"
        ))
        .await?;
        for sql in delete_dense_cells_sql(&format!("user_key IN ({list}) AND slot >= {tomorrow}")) {
            txn.execute_unprepared(&sql).await?;
        }
    }
    Ok(keys)
}

/// [`promote_dense_in`] in a transaction of its own, under the folders' lock (waiting for a
/// fold that runs): what `llm-tracker rollup fold` and the tests call.
pub async fn promote_dense(
    db: &sea_orm_migration::sea_orm::DatabaseConnection,
    now: i64,
) -> Result<Vec<i64>, sea_orm_migration::sea_orm::DbErr> {
    use sea_orm_migration::sea_orm::{ConnectionTrait, TransactionTrait};
    let backend = db.get_database_backend();
    let txn = db.begin().await?;
    if backend == DbBackend::Postgres {
        txn.execute_unprepared(&format!("SELECT pg_advisory_xact_lock({FOLD_LOCK})"))
            .await?;
    }
    let keys = promote_dense_in(&txn, now).await?;
    txn.commit().await?;
    Ok(keys)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::m20251215_000006_rollup_delta as m6;

    /// Migration 000025's SQL (the dense users' table and their hour cells from the rows, less
    /// what is pending) is fixed text; while it is the newest to fill cells, the code must still
    /// generate it (the fold and promotion use the same generators). `UPDATE_FROZEN_SQL=1`
    /// writes the files (for a new migration only).
    #[test]
    fn the_dense_hours_backfill_is_what_the_code_generates() {
        use crate::m20261205_000025_rollup_dense_user_hours as m25;
        for (name, backend) in [
            ("postgres", DbBackend::Postgres),
            ("sqlite", DbBackend::Sqlite),
        ] {
            let generated = m25::generated(backend);
            if std::env::var_os("UPDATE_FROZEN_SQL").is_some() {
                let path = format!(
                    "{}/sql/m20261205_000025_rollup_dense_user_hours.{name}.sql",
                    env!("CARGO_MANIFEST_DIR")
                );
                std::fs::write(path, generated.join(m6::SEPARATOR) + "\n").unwrap();
                continue;
            }
            let frozen = m25::frozen(backend);
            assert_eq!(frozen.len(), generated.len(), "{name}");
            for (f, g) in frozen.iter().zip(&generated) {
                assert_eq!(
                    *f,
                    g.trim(),
                    "{name}: the dense hours' generated SQL changed"
                );
            }
        }
    }

    /// The frozen `up` and `down` SQL of the migration whose files start with `stem`
    /// (`frozen(backend, down)`) against what today's code generates for it
    /// (`generated(backend, down)`); `UPDATE_FROZEN_SQL=1` writes the files instead (for a new
    /// migration only).
    fn assert_frozen_up_and_down(
        stem: &str,
        what: &str,
        frozen: fn(DbBackend, bool) -> Vec<&'static str>,
        generated: fn(DbBackend, bool) -> Vec<String>,
    ) {
        for (name, backend) in [
            ("postgres", DbBackend::Postgres),
            ("sqlite", DbBackend::Sqlite),
        ] {
            for (down, part) in [(false, ""), (true, "down.")] {
                let generated = generated(backend, down);
                if std::env::var_os("UPDATE_FROZEN_SQL").is_some() {
                    let path =
                        format!("{}/sql/{stem}.{part}{name}.sql", env!("CARGO_MANIFEST_DIR"));
                    std::fs::write(path, generated.join(m6::SEPARATOR) + "\n").unwrap();
                    continue;
                }
                let frozen = frozen(backend, down);
                assert_eq!(frozen.len(), generated.len(), "{name} {part}");
                for (f, g) in frozen.iter().zip(&generated) {
                    assert_eq!(*f, g.trim(), "{name} {part}: {what}' generated SQL changed");
                }
            }
        }
    }

    /// Migration 000029's SQL (the full months, the light months' histogram cells deleted;
    /// `down`: filled again from the rows) is fixed text; while it is the newest to fill those
    /// cells, the code must still generate it (the fold's promotion uses the same fill).
    #[test]
    fn the_full_months_sql_is_what_the_code_generates() {
        use crate::m20261209_000029_rollup_full_months as m29;
        assert_frozen_up_and_down(
            "m20261209_000029_rollup_full_months",
            "the full months",
            m29::frozen,
            m29::generated,
        );
    }

    /// Migration 000030's SQL (the light months' cells per model deleted; `down`: filled
    /// again), likewise.
    #[test]
    fn the_full_months_by_model_sql_is_what_the_code_generates() {
        use crate::m20261210_000030_rollup_full_months_by_model as m30;
        assert_frozen_up_and_down(
            "m20261210_000030_rollup_full_months_by_model",
            "the per-model full months",
            m30::frozen,
            m30::generated,
        );
    }

    /// Migration 000031's SQL (the light months' day cells deleted; `down`: filled again),
    /// likewise.
    #[test]
    fn the_light_days_sql_is_what_the_code_generates() {
        use crate::m20261211_000031_rollup_light_days as m31;
        assert_frozen_up_and_down(
            "m20261211_000031_rollup_light_days",
            "the light days",
            m31::frozen,
            m31::generated,
        );
    }

    /// Migration 000032's SQL (the full years, the light years' month cells deleted, their
    /// index by tokens; `down`: filled again), likewise.
    #[test]
    fn the_light_years_sql_is_what_the_code_generates() {
        use crate::m20261212_000032_rollup_light_years as m32;
        assert_frozen_up_and_down(
            "m20261212_000032_rollup_light_years",
            "the light years",
            m32::frozen,
            m32::generated,
        );
    }

    /// Migration 000035's SQL (the dense users' day cells per model from the rows, less what
    /// is pending; `down`: deleted), likewise.
    #[test]
    fn the_dense_model_days_sql_is_what_the_code_generates() {
        use crate::m20261215_000035_rollup_dense_model_days as m35;
        assert_frozen_up_and_down(
            "m20261215_000035_rollup_dense_model_days",
            "the dense users' days per model",
            m35::frozen,
            m35::generated,
        );
    }

    /// What the newest migration that installs triggers (000023: each user's latency
    /// histograms, whose table the `TRUNCATE` trigger empties too) runs is fixed text; the generator must still write exactly
    /// that text, or the databases migrated so far run other triggers than the code believes.
    /// When this fails: write a migration that installs the new triggers, freeze its SQL, and
    /// compare with that. `UPDATE_FROZEN_SQL=1` writes the files (for a new migration only:
    /// never rewrite a landed one).
    #[test]
    fn the_installed_triggers_are_what_the_code_generates() {
        use crate::m20261203_000023_user_latency_histograms as m23;
        let newest = [
            (
                "postgres",
                "m20261203_000023_user_latency_histograms.postgres.sql",
                m23::frozen(DbBackend::Postgres),
                m23::generated(DbBackend::Postgres),
            ),
            (
                "sqlite",
                "m20261203_000023_user_latency_histograms.sqlite.sql",
                m23::frozen(DbBackend::Sqlite),
                m23::generated(DbBackend::Sqlite),
            ),
        ];
        for (name, file, frozen, generated) in newest {
            if std::env::var_os("UPDATE_FROZEN_SQL").is_some() {
                let path = format!("{}/sql/{file}", env!("CARGO_MANIFEST_DIR"));
                std::fs::write(path, generated.join(m6::SEPARATOR) + "\n").unwrap();
                continue;
            }
            assert_eq!(frozen.len(), generated.len(), "{name}");
            for (f, g) in frozen.iter().zip(&generated) {
                assert_eq!(*f, g.trim(), "{name}: the rollup's generated SQL changed");
            }
        }
    }

    /// 000006's PostgreSQL triggers appended one delta row per written row; 000015's sum them
    /// per key. Both files stay as they landed.
    #[test]
    fn migration_000015_changes_only_the_insert_and_delete_functions() {
        use crate::m20261129_000015_rollup_summed_delta as m15;
        let old = m6::frozen(DbBackend::Postgres);
        let new = m15::frozen();
        // 000006 also created the delta table, first.
        assert_eq!(old.len(), new.len() + 1);
        let changed: Vec<&str> = old[1..]
            .iter()
            .zip(&new)
            .filter(|(o, n)| o != n)
            .map(|(_, n)| *n)
            .collect();
        assert_eq!(changed.len(), 2, "{changed:#?}");
        assert!(changed[0].starts_with("CREATE FUNCTION llm_tracker_usage_rollup_insert()"));
        assert!(changed[1].starts_with("CREATE FUNCTION llm_tracker_usage_rollup_delete()"));
        for f in changed {
            assert!(
                f.contains(" GROUP BY slot, user_key, model, success"),
                "{f}"
            );
        }
    }

    /// The statements of two frozen files of the same length that differ, `(old, new)`.
    fn changed_statements<'a>(
        old: &[&'a str],
        new: &[&'a str],
        backend: DbBackend,
    ) -> Vec<(&'a str, &'a str)> {
        assert_eq!(old.len(), new.len(), "{backend:?}");
        old.iter()
            .zip(new)
            .filter(|(o, n)| o != n)
            .map(|(o, n)| (*o, *n))
            .collect()
    }

    /// 000018 changes the delete trigger alone, by one guard at its start: the rest stays as
    /// 000017 (PostgreSQL) and 000016 (SQLite) installed it.
    #[test]
    fn migration_000018_guards_only_the_delete_trigger() {
        use crate::m20261129_000016_usage_streaming_ttft as m16;
        use crate::m20261129_000017_rollup_one_row_statements as m17;
        use crate::m20261130_000018_usage_retention as m18;
        for (backend, old) in [
            (DbBackend::Postgres, m17::frozen()),
            (
                DbBackend::Sqlite,
                crate::util::trigger_statements(m16::frozen(DbBackend::Sqlite)),
            ),
        ] {
            let new = m18::frozen(backend);
            let changed = changed_statements(&old, &new, backend);
            assert_eq!(changed.len(), 1, "{backend:?}: {changed:#?}");
            let (o, n) = changed[0];
            assert!(n.contains("llm_tracker_usage_rollup_delete"), "{n}");
            assert!(
                n.contains("FROM llm_tracker_usage_retention WHERE deleting"),
                "{n}"
            );
            let guard = match backend {
                DbBackend::Postgres => {
                    "IF EXISTS (SELECT 1 FROM llm_tracker_usage_retention WHERE deleting) THEN\nRETURN NULL;\nEND IF;\n"
                }
                _ => " WHEN NOT EXISTS (SELECT 1 FROM llm_tracker_usage_retention WHERE deleting)",
            };
            assert_eq!(n.replacen(guard, "", 1), o, "{backend:?}");
        }
    }

    /// 000023 installs 000020's triggers again with one change: PostgreSQL's `TRUNCATE`
    /// function also empties each user's histograms (SQLite has no `TRUNCATE`: its row
    /// triggers count the deleted rows out).
    #[test]
    fn migration_000023_changes_only_the_truncate_function() {
        use crate::m20261201_000020_latency_histograms as m20;
        use crate::m20261203_000023_user_latency_histograms as m23;
        for backend in [DbBackend::Postgres, DbBackend::Sqlite] {
            let old = crate::util::trigger_statements(m20::frozen(backend));
            let new = crate::util::trigger_statements(m23::frozen(backend));
            let changed = changed_statements(&old, &new, backend);
            if backend == DbBackend::Sqlite {
                assert!(changed.is_empty(), "{changed:#?}");
                continue;
            }
            assert_eq!(changed.len(), 1, "{changed:#?}");
            let (o, n) = changed[0];
            assert!(n.starts_with("CREATE FUNCTION llm_tracker_usage_rollup_truncate()"));
            assert_eq!(
                n.replacen("; DELETE FROM llm_tracker_usage_latency_user", "", 1),
                o
            );
        }
    }

    #[test]
    fn migration_000011_takes_the_folders_lock() {
        assert_eq!(
            FOLD_LOCK,
            crate::m20261126_000011_rollup_per_user_days::FOLDERS_LOCK
        );
    }
}
