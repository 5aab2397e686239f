SELECT pg_advisory_xact_lock(7812739800484506732)
-- statement --
DELETE FROM llm_tracker_usage_rollup WHERE grain = 97
