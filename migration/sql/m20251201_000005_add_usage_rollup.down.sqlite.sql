DROP TRIGGER IF EXISTS llm_tracker_usage_rollup_insert
-- statement --
DROP TRIGGER IF EXISTS llm_tracker_usage_rollup_delete
-- statement --
DROP TRIGGER IF EXISTS llm_tracker_usage_rollup_update
-- statement --
DROP TRIGGER IF EXISTS llm_tracker_usage_rollup_truncate
-- statement --
DROP TABLE IF EXISTS llm_tracker_usage_rollup
-- statement --
DROP TABLE IF EXISTS llm_tracker_usage_rollup_total
