SELECT pg_advisory_xact_lock(7812739800484506732)
-- statement --
DELETE FROM llm_tracker_usage_rollup WHERE grain = 2976 AND user_key < 2147483648 AND NOT EXISTS (SELECT 1 FROM llm_tracker_usage_rollup_full_month f WHERE f.user_key = llm_tracker_usage_rollup.user_key AND f.slot = llm_tracker_usage_rollup.slot)
-- statement --
ANALYZE llm_tracker_usage_rollup
