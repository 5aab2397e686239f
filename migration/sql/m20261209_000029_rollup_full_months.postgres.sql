SELECT pg_advisory_xact_lock(7812739800484506732)
-- statement --
CREATE TABLE IF NOT EXISTS llm_tracker_usage_rollup_full_month (
    user_key bigint NOT NULL,
    slot bigint NOT NULL,
    PRIMARY KEY (user_key, slot)
)
-- statement --
INSERT INTO llm_tracker_usage_rollup_full_month (user_key, slot) SELECT t.user_key, t.slot FROM llm_tracker_usage_rollup_total t LEFT JOIN llm_tracker_usage_retention h ON h.id = 1 WHERE t.grain = 2976 AND t.user_key < 2147483648 AND (t.calls >= 10 OR t.slot < h.horizon_slot)
-- statement --
DELETE FROM llm_tracker_usage_latency_user WHERE grain = 2976 AND NOT EXISTS (SELECT 1 FROM llm_tracker_usage_rollup_full_month f WHERE f.user_key = llm_tracker_usage_latency_user.user_key AND f.slot = llm_tracker_usage_latency_user.slot)
-- statement --
ANALYZE llm_tracker_usage_rollup_full_month, llm_tracker_usage_latency_user
