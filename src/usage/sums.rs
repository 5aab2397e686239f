//! The sums every statistic adds up — calls, the five token counts and the cost — in one type:
//! summary, by_model, series items, by_user and the admin pages all fold [`TokenSums`], and
//! every aggregate that feeds them (the raw rows' and the rollup's) names its columns through
//! [`TokenSums::select`], so the SQL aliases cannot drift from the fields that read them.

use std::ops::{AddAssign, Neg};

use sea_orm::FromQueryResult;

/// The column aliases of a [`Group`](super::stats::Group) (besides its [`TokenSums`]) and of a user key: the names
/// of the fields that read them, written once for the raw aggregate and the rollup statements
/// (the unit test `a_group_reads_back_the_columns_named_here` reads a group from them).
pub(crate) mod col {
    pub const MODEL: &str = "model";
    pub const BUCKET: &str = "bucket";
    pub const SUCCESSFUL: &str = "successful_calls";
    pub const UNPRICED: &str = "unpriced_calls";
    pub const LATENCY_US: &str = "latency_us";
    pub const LATENCY_N: &str = "latency_n";
    pub const TTFT_US: &str = "ttft_us";
    pub const TTFT_N: &str = "ttft_n";
    pub const USER_KEY: &str = "user_key";
}

/// One of the sums, as the SQL that computes it needs to know.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sum {
    Calls,
    Prompt,
    Completion,
    Total,
    Cached,
    Reasoning,
    /// USD in micro-dollars, over the priced calls.
    CostMicros,
}

/// Calls, token sums and cost of a group of calls.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, FromQueryResult)]
pub struct TokenSums {
    pub total_calls: i64,
    pub total_prompt_tokens: i64,
    pub total_completion_tokens: i64,
    pub total_tokens: i64,
    pub total_cached_tokens: i64,
    pub total_reasoning_tokens: i64,
    /// USD in micro-dollars.
    pub cost_micros: i64,
}

impl TokenSums {
    /// Each sum with the column alias [`TokenSums`] reads it from (its field's name).
    pub const COLUMNS: [(Sum, &'static str); 7] = [
        (Sum::Calls, "total_calls"),
        (Sum::Prompt, "total_prompt_tokens"),
        (Sum::Completion, "total_completion_tokens"),
        (Sum::Total, "total_tokens"),
        (Sum::Cached, "total_cached_tokens"),
        (Sum::Reasoning, "total_reasoning_tokens"),
        (Sum::CostMicros, "cost_micros"),
    ];

    /// `<expr> AS total_calls, <expr> AS total_prompt_tokens, …`: the select list of every
    /// sum, `expr` giving each one's SQL.
    pub fn select(expr: impl Fn(Sum) -> String) -> String {
        Self::COLUMNS
            .iter()
            .map(|(sum, alias)| format!("{} AS {alias}", expr(*sum)))
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// The sums from a reader of the `k`-th of [`TokenSums::COLUMNS`].
    pub fn try_from_fn<E>(mut get: impl FnMut(usize) -> Result<i64, E>) -> Result<Self, E> {
        Ok(Self {
            total_calls: get(0)?,
            total_prompt_tokens: get(1)?,
            total_completion_tokens: get(2)?,
            total_tokens: get(3)?,
            total_cached_tokens: get(4)?,
            total_reasoning_tokens: get(5)?,
            cost_micros: get(6)?,
        })
    }

    /// The column alias of `sum`.
    pub fn alias(sum: Sum) -> &'static str {
        Self::COLUMNS
            .iter()
            .find(|(s, _)| *s == sum)
            .map(|(_, alias)| *alias)
            .unwrap_or_default()
    }
}

impl AddAssign for TokenSums {
    fn add_assign(&mut self, o: Self) {
        self.total_calls += o.total_calls;
        self.total_prompt_tokens += o.total_prompt_tokens;
        self.total_completion_tokens += o.total_completion_tokens;
        self.total_tokens += o.total_tokens;
        self.total_cached_tokens += o.total_cached_tokens;
        self.total_reasoning_tokens += o.total_reasoning_tokens;
        self.cost_micros += o.cost_micros;
    }
}

/// Every sum negated: rows taken away (a day's cell less the rows of the day outside a range).
impl Neg for TokenSums {
    type Output = Self;

    fn neg(self) -> Self {
        Self {
            total_calls: -self.total_calls,
            total_prompt_tokens: -self.total_prompt_tokens,
            total_completion_tokens: -self.total_completion_tokens,
            total_tokens: -self.total_tokens,
            total_cached_tokens: -self.total_cached_tokens,
            total_reasoning_tokens: -self.total_reasoning_tokens,
            cost_micros: -self.cost_micros,
        }
    }
}

#[cfg(test)]
mod tests {
    use sea_orm::{ConnectionTrait, Database, DbBackend, Statement};

    use super::*;

    /// The sum's value.
    fn get(sums: &TokenSums, sum: Sum) -> i64 {
        match sum {
            Sum::Calls => sums.total_calls,
            Sum::Prompt => sums.total_prompt_tokens,
            Sum::Completion => sums.total_completion_tokens,
            Sum::Total => sums.total_tokens,
            Sum::Cached => sums.total_cached_tokens,
            Sum::Reasoning => sums.total_reasoning_tokens,
            Sum::CostMicros => sums.cost_micros,
        }
    }

    /// Every alias `select` writes is read back into its own field: a select list written
    /// with a distinct number per sum comes back as those numbers, field by field.
    #[tokio::test]
    async fn the_select_list_reads_back_into_its_own_fields() {
        let db = Database::connect("sqlite::memory:").await.unwrap();
        let value = |s: Sum| {
            1 + TokenSums::COLUMNS
                .iter()
                .position(|(c, _)| *c == s)
                .unwrap() as i64
        };
        let sql = format!("SELECT {}", TokenSums::select(|s| value(s).to_string()));
        let row = db
            .query_one_raw(Statement::from_string(DbBackend::Sqlite, sql))
            .await
            .unwrap()
            .unwrap();
        let sums = TokenSums::from_query_result(&row, "").unwrap();
        for (sum, _) in TokenSums::COLUMNS {
            assert_eq!(get(&sums, sum), value(sum), "{sum:?}");
        }
        let mut twice = sums;
        twice += sums;
        for (sum, _) in TokenSums::COLUMNS {
            assert_eq!(get(&twice, sum), 2 * value(sum), "{sum:?}");
        }
        let mut none = twice;
        none += -sums;
        none += -sums;
        assert_eq!(none, TokenSums::default());
    }
}
