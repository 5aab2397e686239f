DELETE FROM llm_tracker_usage_rollup WHERE grain = 97
