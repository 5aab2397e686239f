SELECT pg_advisory_xact_lock(7812739800484506732)
-- statement --
CREATE TABLE IF NOT EXISTS llm_tracker_usage_rollup_full_year (
    user_key bigint NOT NULL,
    slot bigint NOT NULL,
    PRIMARY KEY (user_key, slot)
)
-- statement --
INSERT INTO llm_tracker_usage_rollup_full_year (user_key, slot) SELECT t.user_key, t.slot FROM llm_tracker_usage_rollup_total t WHERE t.grain = 35040 AND t.user_key < 2147483648 AND (t.calls >= 10 OR t.slot < (SELECT h.horizon_slot FROM llm_tracker_usage_retention h WHERE h.id = 1) OR EXISTS (SELECT 1 FROM llm_tracker_usage_rollup_full_month f WHERE f.user_key = t.user_key AND f.slot >= t.slot AND f.slot < CAST(extract(epoch FROM (to_timestamp((t.slot) * 900) AT TIME ZONE 'UTC') + interval '1 year') / 900 AS BIGINT))) AND NOT EXISTS (SELECT 1 FROM llm_tracker_usage_rollup_full_year y WHERE y.user_key = t.user_key AND y.slot = t.slot)
-- statement --
DELETE FROM llm_tracker_usage_rollup_total WHERE grain = 2976 AND user_key < 2147483648 AND NOT EXISTS (SELECT 1 FROM llm_tracker_usage_rollup_full_year y WHERE y.user_key = llm_tracker_usage_rollup_total.user_key AND y.slot = CAST(extract(epoch FROM date_trunc('year', to_timestamp((llm_tracker_usage_rollup_total.slot) * 900) AT TIME ZONE 'UTC')) / 900 AS BIGINT))
-- statement --
CREATE INDEX IF NOT EXISTS llm_tracker_usage_rollup_total_light_year_idx ON llm_tracker_usage_rollup_total (slot, total_tokens DESC) WHERE grain = 35040 AND user_key < 2147483648 AND calls < 10
-- statement --
ANALYZE llm_tracker_usage_rollup_full_year, llm_tracker_usage_rollup_total
