//! One user's rows one by one through `COPY … TO STDOUT (FORMAT binary)` (PostgreSQL): the
//! rows of a light user's hourly series ([`super::rollup::Plan::gaps_by_row`]) read on spare
//! connections of the pool that share the request's snapshot.
//!
//! Read as a statement's rows, each of a typical user's year of rows (9,758) went through
//! sqlx's row decoding and sea-orm's stream layers, ~1 µs a row of the server's one thread:
//! the server, not the database, was what the request waited for. `COPY` sends each row as a
//! few length-prefixed fields that are read here in place.

use sea_orm::DbErr;
use sea_orm::sqlx::postgres::PgConnection;
use sea_orm::sqlx::{Acquire, Executor};

use super::sums::{Sum, TokenSums};

/// One row: the start of its 15-minute slot (UTC epoch seconds), its counts and cost in
/// micro-dollars (the calls: 1), and its outcome.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CopiedRow {
    pub slot_start: i64,
    pub sums: TokenSums,
    pub success: bool,
}

/// The 11 bytes that begin binary `COPY` output.
const SIGNATURE: &[u8; 11] = b"PGCOPY\n\xff\r\n\0";

/// Seconds from the Unix epoch to PostgreSQL's (2000-01-01), where binary timestamps count from.
const PG_EPOCH_SECONDS: i64 = 946_684_800;

/// The rows of each of `selects` (each a `SELECT` of the columns [`super::stats`]'s rows one
/// by one have: `created_at`, the row's value of each sum in [`row_sums`], `success`, with
/// every value written in), read by `COPY` on `conn` in a read-only transaction that sees
/// snapshot `snapshot` (exported by the request's transaction, which stays open meanwhile)
/// under the planner settings `settings`. The transaction is rolled back if anything fails
/// (sqlx's transaction guard), so the connection goes back to the pool clean.
pub async fn copy_rows(
    conn: &mut PgConnection,
    snapshot: &str,
    settings: &str,
    selects: &[String],
) -> Result<Vec<CopiedRow>, DbErr> {
    use futures_util::TryStreamExt;
    let bad = |what: &str, e: sea_orm::sqlx::Error| DbErr::Custom(format!("{what}: {e}"));
    let snapshot = crate::db::snapshot_name(snapshot)?;
    let mut txn = conn.begin().await.map_err(|e| bad("beginning a copy", e))?;
    let setup = format!(
        "SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY; \
         SET TRANSACTION SNAPSHOT '{snapshot}'; {settings}"
    );
    txn.execute(sea_orm::sqlx::raw_sql(sea_orm::sqlx::AssertSqlSafe(setup)))
        .await
        .map_err(|e| bad("importing a snapshot", e))?;
    let mut out = Vec::new();
    for select in selects {
        let statement = format!("COPY ({select}) TO STDOUT (FORMAT binary)");
        let mut chunks = txn
            .copy_out_raw(&statement)
            .await
            .map_err(|e| bad("a copy of rows", e))?;
        let mut reader = CopyReader::default();
        while let Some(chunk) = chunks
            .try_next()
            .await
            .map_err(|e| bad("a copy of rows", e))?
        {
            reader.push(&chunk, &mut out)?;
        }
        reader.finish()?;
    }
    txn.commit().await.map_err(|e| bad("ending a copy", e))?;
    Ok(out)
}

/// The sums a row one by one carries a value of ([`row_value_sql`]), with their place in
/// [`TokenSums::COLUMNS`], in the order of its columns after `created_at`.
pub(crate) fn row_sums() -> impl Iterator<Item = (usize, Sum)> {
    TokenSums::COLUMNS
        .iter()
        .enumerate()
        .filter(|(_, (sum, _))| row_value_sql(*sum).is_some())
        .map(|(k, (sum, _))| (k, *sum))
}

/// One row's value of `sum` (`None` for the calls: one per row). A row's cost in
/// micro-dollars is exact: `cost` is `numeric(12, 6)`, so each row's micro-dollars are whole
/// and their sum is the sum's.
pub(crate) fn row_value_sql(sum: Sum) -> Option<&'static str> {
    Some(match sum {
        Sum::Calls => return None,
        Sum::CostMicros => "CAST(COALESCE(cost, 0) * 1000000 AS BIGINT)",
        Sum::Prompt => "prompt_tokens",
        Sum::Completion => "completion_tokens",
        Sum::Total => "total_tokens",
        Sum::Cached => "cached_tokens",
        Sum::Reasoning => "reasoning_tokens",
    })
}

/// The start of the 15-minute slot holding the instant `seconds` (UTC epoch seconds), in the
/// same seconds; before 1970 too (`div_euclid`).
pub(crate) fn slot_start(seconds: i64) -> i64 {
    let slot = migration::rollup::SLOT_SECONDS;
    seconds.div_euclid(slot) * slot
}

/// Where a binary copy's reader is.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum Stage {
    #[default]
    Header,
    Tuples,
    Done,
}

/// A reader of binary `COPY` output in chunks of any size: whole tuples are read where they
/// lie, a tuple cut across chunks waits for the rest in `pending`.
#[derive(Debug, Default)]
struct CopyReader {
    stage: Stage,
    pending: Vec<u8>,
}

impl CopyReader {
    fn push(&mut self, chunk: &[u8], out: &mut Vec<CopiedRow>) -> Result<(), DbErr> {
        if self.pending.is_empty() {
            let used = read_tuples(chunk, &mut self.stage, out)?;
            self.pending.extend_from_slice(&chunk[used..]);
        } else {
            self.pending.extend_from_slice(chunk);
            let used = read_tuples(&self.pending, &mut self.stage, out)?;
            self.pending.drain(..used);
        }
        Ok(())
    }

    /// Whether the output ended where it should: after its trailer, nothing left over.
    fn finish(&self) -> Result<(), DbErr> {
        match (self.stage, self.pending.is_empty()) {
            (Stage::Done, true) => Ok(()),
            _ => Err(DbErr::Custom(
                "a copy of rows ended before its trailer".into(),
            )),
        }
    }
}

/// Reads the whole tuples at the start of `buf` (after the header, while `stage` is at it) into
/// `out`; returns how many bytes they took.
fn read_tuples(buf: &[u8], stage: &mut Stage, out: &mut Vec<CopiedRow>) -> Result<usize, DbErr> {
    let bad = |what: &str| DbErr::Custom(format!("a copy of rows: {what}"));
    let fields = 2 + row_sums().count();
    let mut at = 0;
    loop {
        let rest = &buf[at..];
        match *stage {
            Stage::Header => {
                // signature, flags (int32), header extension length (int32), extension
                if rest.len() < 19 {
                    return Ok(at);
                }
                if &rest[..11] != SIGNATURE {
                    return Err(bad("not binary copy output"));
                }
                let extension = be_i32(&rest[15..19]);
                let Ok(extension) = usize::try_from(extension) else {
                    return Err(bad("a negative header extension"));
                };
                if rest.len() < 19 + extension {
                    return Ok(at);
                }
                at += 19 + extension;
                *stage = Stage::Tuples;
            }
            Stage::Tuples => {
                if rest.len() < 2 {
                    return Ok(at);
                }
                let count = i16::from_be_bytes([rest[0], rest[1]]);
                if count == -1 {
                    *stage = Stage::Done;
                    return Ok(at + 2);
                }
                if usize::try_from(count).ok() != Some(fields) {
                    return Err(bad(&format!("a tuple of {count} fields, not {fields}")));
                }
                let mut p = 2;
                let mut values = [0i64; 16];
                for value in values.iter_mut().take(fields) {
                    if rest.len() < p + 4 {
                        return Ok(at);
                    }
                    let len = be_i32(&rest[p..p + 4]);
                    p += 4;
                    let len = match len {
                        1 | 4 | 8 => len as usize,
                        -1 => return Err(bad("a null value")),
                        _ => return Err(bad(&format!("a value of {len} bytes"))),
                    };
                    if rest.len() < p + len {
                        return Ok(at);
                    }
                    let bytes = &rest[p..p + len];
                    *value = match len {
                        1 => i64::from(bytes[0]),
                        4 => i64::from(be_i32(bytes)),
                        _ => i64::from_be_bytes(bytes.try_into().expect("8 bytes")),
                    };
                    p += len;
                }
                out.push(row_of(&values[..fields])?);
                at += p;
            }
            Stage::Done => {
                return match rest.is_empty() {
                    true => Ok(at),
                    false => Err(bad("data after the trailer")),
                };
            }
        }
    }
}

fn be_i32(b: &[u8]) -> i32 {
    i32::from_be_bytes([b[0], b[1], b[2], b[3]])
}

/// A row from its values: `created_at` in microseconds since 2000-01-01 UTC, each sum of
/// [`row_sums`], `success` (0 or 1).
fn row_of(values: &[i64]) -> Result<CopiedRow, DbErr> {
    let micros = values[0];
    let seconds = micros.div_euclid(1_000_000) + PG_EPOCH_SECONDS;
    let mut by_column = [1i64; TokenSums::COLUMNS.len()];
    for (i, (k, _)) in row_sums().enumerate() {
        by_column[k] = values[1 + i];
    }
    let sums = TokenSums::try_from_fn(|k| Ok::<_, DbErr>(by_column[k]))?;
    let success = match values[values.len() - 1] {
        0 => false,
        1 => true,
        other => {
            return Err(DbErr::Custom(format!(
                "a copy of rows: an outcome of {other}"
            )));
        }
    };
    Ok(CopiedRow {
        slot_start: slot_start(seconds),
        sums,
        success,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Binary copy output of `rows` as PostgreSQL writes it: `(created_at µs since 2000, the
    /// sums' values in [`row_sums`] order, success)`, the cost as `int8`, counts as `int4`.
    fn copy_output(rows: &[(i64, Vec<i64>, bool)]) -> Vec<u8> {
        let mut b = SIGNATURE.to_vec();
        b.extend(0i32.to_be_bytes());
        b.extend(4i32.to_be_bytes()); // a header extension of 4 bytes, skipped
        b.extend([9, 9, 9, 9]);
        for (at, values, success) in rows {
            b.extend(u16::try_from(2 + values.len()).unwrap().to_be_bytes());
            b.extend(8i32.to_be_bytes());
            b.extend(at.to_be_bytes());
            for ((_, sum), v) in row_sums().zip(values) {
                if sum == Sum::CostMicros {
                    b.extend(8i32.to_be_bytes());
                    b.extend(v.to_be_bytes());
                } else {
                    b.extend(4i32.to_be_bytes());
                    b.extend(i32::try_from(*v).unwrap().to_be_bytes());
                }
            }
            b.extend(1i32.to_be_bytes());
            b.push(u8::from(*success));
        }
        b.extend((-1i16).to_be_bytes());
        b
    }

    fn values(seed: i64) -> Vec<i64> {
        row_sums()
            .map(|(_, sum)| match sum {
                Sum::CostMicros => 1_234_567_891 * seed,
                _ => 1_000 * seed + 7,
            })
            .collect()
    }

    fn expected(seed: i64, success: bool, slot_start: i64) -> CopiedRow {
        let token = 1_000 * seed + 7;
        let sums = TokenSums {
            total_calls: 1,
            total_prompt_tokens: token,
            total_completion_tokens: token,
            total_tokens: token,
            total_cached_tokens: token,
            total_reasoning_tokens: token,
            cost_micros: 1_234_567_891 * seed,
        };
        CopiedRow {
            slot_start,
            sums,
            success,
        }
    }

    #[test]
    fn rows_are_read_whatever_the_chunks_and_land_in_their_slots() {
        // PostgreSQL's epoch is 2000-01-01 (946,684,800 s after Unix's). A slot is 900 s.
        let rows = [
            // 2000-01-01 00:00:00 exactly: slot 946,684,800
            (0, values(1), true),
            // a microsecond before: the slot before, 1999-12-31 23:45
            (-1, values(2), false),
            // 1969-12-31 23:59:59.999999 (before Unix's epoch): slot -900
            (-PG_EPOCH_SECONDS * 1_000_000 - 1, values(3), true),
            // 2026-11-27 21:44:59.999999 and 21:45:00
            (
                (1_795_815_900 - PG_EPOCH_SECONDS) * 1_000_000 - 1,
                values(4),
                true,
            ),
            (
                (1_795_815_900 - PG_EPOCH_SECONDS) * 1_000_000,
                values(0),
                false,
            ),
        ];
        let want = vec![
            expected(1, true, 946_684_800),
            expected(2, false, 946_683_900),
            expected(3, true, -900),
            expected(4, true, 1_795_815_000),
            expected(0, false, 1_795_815_900),
        ];
        let output = copy_output(&rows);
        // Whole, byte by byte, and cut at every place into two and into three chunks.
        let mut cuts: Vec<Vec<usize>> = vec![vec![], (1..output.len()).collect()];
        for i in 1..output.len() {
            cuts.push(vec![i]);
            cuts.push(vec![i / 2, i]);
        }
        for cut in cuts {
            let mut reader = CopyReader::default();
            let mut out = Vec::new();
            let mut from = 0;
            for &to in cut.iter().chain([output.len()].iter()) {
                if to > from {
                    reader.push(&output[from..to], &mut out).unwrap();
                    from = to;
                }
            }
            reader.finish().unwrap();
            assert_eq!(out, want, "cut at {cut:?}");
        }
    }

    #[test]
    fn broken_output_is_an_error_not_rows() {
        let output = copy_output(&[(0, values(1), true)]);
        let read = |bytes: &[u8]| {
            let mut reader = CopyReader::default();
            let mut out = Vec::new();
            reader.push(bytes, &mut out).and_then(|_| reader.finish())
        };
        assert!(read(&output).is_ok());
        // cut short: no trailer
        assert!(read(&output[..output.len() - 2]).is_err());
        assert!(read(&output[..10]).is_err());
        // something after the trailer
        assert!(read(&[output.as_slice(), &[0]].concat()).is_err());
        // not binary copy output
        assert!(read(b"1\t2\t3\n\\.\n").is_err());
        // (the header: 11 bytes of signature, flags, the extension's length, 4 bytes of it)
        assert_eq!(
            &output[23..25],
            &8i16.to_be_bytes(),
            "the tuple's field count"
        );
        // a null value: the first field's length -1
        let mut null = output.clone();
        null[25..29].copy_from_slice(&(-1i32).to_be_bytes());
        assert!(read(&null).is_err());
        // a tuple of another width
        let mut narrow = output.clone();
        narrow[23..25].copy_from_slice(&3i16.to_be_bytes());
        assert!(read(&narrow).is_err());
        // an outcome that is not a boolean
        let mut outcome = output.clone();
        let last = outcome.len() - 3;
        outcome[last] = 2;
        assert!(read(&outcome).is_err());
    }
}
