DROP TRIGGER IF EXISTS llm_tracker_usage_rollup_insert ON llm_tracker_usage
-- statement --
DROP FUNCTION IF EXISTS llm_tracker_usage_rollup_insert()
-- statement --
DROP TRIGGER IF EXISTS llm_tracker_usage_rollup_delete ON llm_tracker_usage
-- statement --
DROP FUNCTION IF EXISTS llm_tracker_usage_rollup_delete()
-- statement --
DROP TRIGGER IF EXISTS llm_tracker_usage_rollup_update ON llm_tracker_usage
-- statement --
DROP FUNCTION IF EXISTS llm_tracker_usage_rollup_update()
-- statement --
DROP TRIGGER IF EXISTS llm_tracker_usage_rollup_truncate ON llm_tracker_usage
-- statement --
DROP FUNCTION IF EXISTS llm_tracker_usage_rollup_truncate()
-- statement --
CREATE FUNCTION llm_tracker_usage_rollup_insert() RETURNS trigger LANGUAGE plpgsql AS $fn$
BEGIN
IF EXISTS (SELECT 1 FROM new_rows OFFSET 1) THEN
INSERT INTO llm_tracker_usage_rollup_delta (slot, user_key, model, success, calls, prompt_tokens, completion_tokens, total_tokens, cached_tokens, reasoning_tokens, cost_micros, priced_calls, latency_us, latency_calls, ttft_us, ttft_calls, successful_calls) SELECT slot, user_key, model, success, SUM(calls) AS calls, SUM(prompt_tokens) AS prompt_tokens, SUM(completion_tokens) AS completion_tokens, SUM(total_tokens) AS total_tokens, SUM(cached_tokens) AS cached_tokens, SUM(reasoning_tokens) AS reasoning_tokens, SUM(cost_micros) AS cost_micros, SUM(priced_calls) AS priced_calls, SUM(latency_us) AS latency_us, SUM(latency_calls) AS latency_calls, SUM(ttft_us) AS ttft_us, SUM(ttft_calls) AS ttft_calls, SUM(successful_calls) AS successful_calls FROM (SELECT CAST(floor(extract(epoch FROM created_at) / 900) AS BIGINT) AS slot, COALESCE(user_id, 2147483649) AS user_key, model AS model, success AS success, 1 AS calls, prompt_tokens AS prompt_tokens, completion_tokens AS completion_tokens, total_tokens AS total_tokens, cached_tokens AS cached_tokens, reasoning_tokens AS reasoning_tokens, COALESCE(CAST(cost * 1000000 AS BIGINT), 0) AS cost_micros, CASE WHEN cost IS NULL THEN 0 ELSE 1 END AS priced_calls, COALESCE(CAST(EXTRACT(EPOCH FROM GREATEST(created_at - started_at, INTERVAL '0')) * 1000000 AS BIGINT), 0) AS latency_us, CASE WHEN started_at IS NULL THEN 0 ELSE 1 END AS latency_calls, COALESCE(CAST(EXTRACT(EPOCH FROM GREATEST(first_chunk_at - started_at, INTERVAL '0')) * 1000000 AS BIGINT), 0) AS ttft_us, CASE WHEN first_chunk_at IS NULL OR started_at IS NULL THEN 0 ELSE 1 END AS ttft_calls, CASE WHEN success THEN 1 ELSE 0 END AS successful_calls FROM new_rows) c GROUP BY slot, user_key, model, success HAVING SUM(calls) <> 0 OR SUM(prompt_tokens) <> 0 OR SUM(completion_tokens) <> 0 OR SUM(total_tokens) <> 0 OR SUM(cached_tokens) <> 0 OR SUM(reasoning_tokens) <> 0 OR SUM(cost_micros) <> 0 OR SUM(priced_calls) <> 0 OR SUM(latency_us) <> 0 OR SUM(latency_calls) <> 0 OR SUM(ttft_us) <> 0 OR SUM(ttft_calls) <> 0 OR SUM(successful_calls) <> 0;
ELSE
INSERT INTO llm_tracker_usage_rollup_delta (slot, user_key, model, success, calls, prompt_tokens, completion_tokens, total_tokens, cached_tokens, reasoning_tokens, cost_micros, priced_calls, latency_us, latency_calls, ttft_us, ttft_calls, successful_calls) SELECT CAST(floor(extract(epoch FROM created_at) / 900) AS BIGINT) AS slot, COALESCE(user_id, 2147483649) AS user_key, model AS model, success AS success, 1 AS calls, prompt_tokens AS prompt_tokens, completion_tokens AS completion_tokens, total_tokens AS total_tokens, cached_tokens AS cached_tokens, reasoning_tokens AS reasoning_tokens, COALESCE(CAST(cost * 1000000 AS BIGINT), 0) AS cost_micros, CASE WHEN cost IS NULL THEN 0 ELSE 1 END AS priced_calls, COALESCE(CAST(EXTRACT(EPOCH FROM GREATEST(created_at - started_at, INTERVAL '0')) * 1000000 AS BIGINT), 0) AS latency_us, CASE WHEN started_at IS NULL THEN 0 ELSE 1 END AS latency_calls, COALESCE(CAST(EXTRACT(EPOCH FROM GREATEST(first_chunk_at - started_at, INTERVAL '0')) * 1000000 AS BIGINT), 0) AS ttft_us, CASE WHEN first_chunk_at IS NULL OR started_at IS NULL THEN 0 ELSE 1 END AS ttft_calls, CASE WHEN success THEN 1 ELSE 0 END AS successful_calls FROM new_rows;
END IF;
RETURN NULL;
END
$fn$
-- statement --
CREATE FUNCTION llm_tracker_usage_rollup_delete() RETURNS trigger LANGUAGE plpgsql AS $fn$
BEGIN
IF EXISTS (SELECT 1 FROM llm_tracker_usage_retention WHERE deleting) THEN
RETURN NULL;
END IF;
IF EXISTS (SELECT 1 FROM old_rows OFFSET 1) THEN
INSERT INTO llm_tracker_usage_rollup_delta (slot, user_key, model, success, calls, prompt_tokens, completion_tokens, total_tokens, cached_tokens, reasoning_tokens, cost_micros, priced_calls, latency_us, latency_calls, ttft_us, ttft_calls, successful_calls) SELECT slot, user_key, model, success, SUM(calls) AS calls, SUM(prompt_tokens) AS prompt_tokens, SUM(completion_tokens) AS completion_tokens, SUM(total_tokens) AS total_tokens, SUM(cached_tokens) AS cached_tokens, SUM(reasoning_tokens) AS reasoning_tokens, SUM(cost_micros) AS cost_micros, SUM(priced_calls) AS priced_calls, SUM(latency_us) AS latency_us, SUM(latency_calls) AS latency_calls, SUM(ttft_us) AS ttft_us, SUM(ttft_calls) AS ttft_calls, SUM(successful_calls) AS successful_calls FROM (SELECT CAST(floor(extract(epoch FROM created_at) / 900) AS BIGINT) AS slot, COALESCE(user_id, 2147483649) AS user_key, model AS model, success AS success, -1 AS calls, -1 * prompt_tokens AS prompt_tokens, -1 * completion_tokens AS completion_tokens, -1 * total_tokens AS total_tokens, -1 * cached_tokens AS cached_tokens, -1 * reasoning_tokens AS reasoning_tokens, COALESCE(-1 * CAST(cost * 1000000 AS BIGINT), 0) AS cost_micros, CASE WHEN cost IS NULL THEN 0 ELSE -1 END AS priced_calls, COALESCE(-1 * CAST(EXTRACT(EPOCH FROM GREATEST(created_at - started_at, INTERVAL '0')) * 1000000 AS BIGINT), 0) AS latency_us, CASE WHEN started_at IS NULL THEN 0 ELSE -1 END AS latency_calls, COALESCE(-1 * CAST(EXTRACT(EPOCH FROM GREATEST(first_chunk_at - started_at, INTERVAL '0')) * 1000000 AS BIGINT), 0) AS ttft_us, CASE WHEN first_chunk_at IS NULL OR started_at IS NULL THEN 0 ELSE -1 END AS ttft_calls, CASE WHEN success THEN -1 ELSE 0 END AS successful_calls FROM old_rows) c GROUP BY slot, user_key, model, success HAVING SUM(calls) <> 0 OR SUM(prompt_tokens) <> 0 OR SUM(completion_tokens) <> 0 OR SUM(total_tokens) <> 0 OR SUM(cached_tokens) <> 0 OR SUM(reasoning_tokens) <> 0 OR SUM(cost_micros) <> 0 OR SUM(priced_calls) <> 0 OR SUM(latency_us) <> 0 OR SUM(latency_calls) <> 0 OR SUM(ttft_us) <> 0 OR SUM(ttft_calls) <> 0 OR SUM(successful_calls) <> 0;
ELSE
INSERT INTO llm_tracker_usage_rollup_delta (slot, user_key, model, success, calls, prompt_tokens, completion_tokens, total_tokens, cached_tokens, reasoning_tokens, cost_micros, priced_calls, latency_us, latency_calls, ttft_us, ttft_calls, successful_calls) SELECT CAST(floor(extract(epoch FROM created_at) / 900) AS BIGINT) AS slot, COALESCE(user_id, 2147483649) AS user_key, model AS model, success AS success, -1 AS calls, -1 * prompt_tokens AS prompt_tokens, -1 * completion_tokens AS completion_tokens, -1 * total_tokens AS total_tokens, -1 * cached_tokens AS cached_tokens, -1 * reasoning_tokens AS reasoning_tokens, COALESCE(-1 * CAST(cost * 1000000 AS BIGINT), 0) AS cost_micros, CASE WHEN cost IS NULL THEN 0 ELSE -1 END AS priced_calls, COALESCE(-1 * CAST(EXTRACT(EPOCH FROM GREATEST(created_at - started_at, INTERVAL '0')) * 1000000 AS BIGINT), 0) AS latency_us, CASE WHEN started_at IS NULL THEN 0 ELSE -1 END AS latency_calls, COALESCE(-1 * CAST(EXTRACT(EPOCH FROM GREATEST(first_chunk_at - started_at, INTERVAL '0')) * 1000000 AS BIGINT), 0) AS ttft_us, CASE WHEN first_chunk_at IS NULL OR started_at IS NULL THEN 0 ELSE -1 END AS ttft_calls, CASE WHEN success THEN -1 ELSE 0 END AS successful_calls FROM old_rows;
END IF;
RETURN NULL;
END
$fn$
-- statement --
CREATE FUNCTION llm_tracker_usage_rollup_update() RETURNS trigger LANGUAGE plpgsql AS $fn$
BEGIN
INSERT INTO llm_tracker_usage_rollup_delta (slot, user_key, model, success, calls, prompt_tokens, completion_tokens, total_tokens, cached_tokens, reasoning_tokens, cost_micros, priced_calls, latency_us, latency_calls, ttft_us, ttft_calls, successful_calls) SELECT slot, user_key, model, success, SUM(calls) AS calls, SUM(prompt_tokens) AS prompt_tokens, SUM(completion_tokens) AS completion_tokens, SUM(total_tokens) AS total_tokens, SUM(cached_tokens) AS cached_tokens, SUM(reasoning_tokens) AS reasoning_tokens, SUM(cost_micros) AS cost_micros, SUM(priced_calls) AS priced_calls, SUM(latency_us) AS latency_us, SUM(latency_calls) AS latency_calls, SUM(ttft_us) AS ttft_us, SUM(ttft_calls) AS ttft_calls, SUM(successful_calls) AS successful_calls FROM (SELECT CAST(floor(extract(epoch FROM created_at) / 900) AS BIGINT) AS slot, COALESCE(user_id, 2147483649) AS user_key, model AS model, success AS success, -1 AS calls, -1 * prompt_tokens AS prompt_tokens, -1 * completion_tokens AS completion_tokens, -1 * total_tokens AS total_tokens, -1 * cached_tokens AS cached_tokens, -1 * reasoning_tokens AS reasoning_tokens, COALESCE(-1 * CAST(cost * 1000000 AS BIGINT), 0) AS cost_micros, CASE WHEN cost IS NULL THEN 0 ELSE -1 END AS priced_calls, COALESCE(-1 * CAST(EXTRACT(EPOCH FROM GREATEST(created_at - started_at, INTERVAL '0')) * 1000000 AS BIGINT), 0) AS latency_us, CASE WHEN started_at IS NULL THEN 0 ELSE -1 END AS latency_calls, COALESCE(-1 * CAST(EXTRACT(EPOCH FROM GREATEST(first_chunk_at - started_at, INTERVAL '0')) * 1000000 AS BIGINT), 0) AS ttft_us, CASE WHEN first_chunk_at IS NULL OR started_at IS NULL THEN 0 ELSE -1 END AS ttft_calls, CASE WHEN success THEN -1 ELSE 0 END AS successful_calls FROM old_rows UNION ALL SELECT CAST(floor(extract(epoch FROM created_at) / 900) AS BIGINT) AS slot, COALESCE(user_id, 2147483649) AS user_key, model AS model, success AS success, 1 AS calls, prompt_tokens AS prompt_tokens, completion_tokens AS completion_tokens, total_tokens AS total_tokens, cached_tokens AS cached_tokens, reasoning_tokens AS reasoning_tokens, COALESCE(CAST(cost * 1000000 AS BIGINT), 0) AS cost_micros, CASE WHEN cost IS NULL THEN 0 ELSE 1 END AS priced_calls, COALESCE(CAST(EXTRACT(EPOCH FROM GREATEST(created_at - started_at, INTERVAL '0')) * 1000000 AS BIGINT), 0) AS latency_us, CASE WHEN started_at IS NULL THEN 0 ELSE 1 END AS latency_calls, COALESCE(CAST(EXTRACT(EPOCH FROM GREATEST(first_chunk_at - started_at, INTERVAL '0')) * 1000000 AS BIGINT), 0) AS ttft_us, CASE WHEN first_chunk_at IS NULL OR started_at IS NULL THEN 0 ELSE 1 END AS ttft_calls, CASE WHEN success THEN 1 ELSE 0 END AS successful_calls FROM new_rows) c GROUP BY slot, user_key, model, success HAVING SUM(calls) <> 0 OR SUM(prompt_tokens) <> 0 OR SUM(completion_tokens) <> 0 OR SUM(total_tokens) <> 0 OR SUM(cached_tokens) <> 0 OR SUM(reasoning_tokens) <> 0 OR SUM(cost_micros) <> 0 OR SUM(priced_calls) <> 0 OR SUM(latency_us) <> 0 OR SUM(latency_calls) <> 0 OR SUM(ttft_us) <> 0 OR SUM(ttft_calls) <> 0 OR SUM(successful_calls) <> 0;
RETURN NULL;
END
$fn$
-- statement --
CREATE FUNCTION llm_tracker_usage_rollup_truncate() RETURNS trigger LANGUAGE plpgsql AS $fn$
BEGIN
DELETE FROM llm_tracker_usage_rollup; DELETE FROM llm_tracker_usage_rollup_total; DELETE FROM llm_tracker_usage_rollup_delta;
RETURN NULL;
END
$fn$
-- statement --
CREATE TRIGGER llm_tracker_usage_rollup_insert AFTER INSERT ON llm_tracker_usage REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION llm_tracker_usage_rollup_insert()
-- statement --
CREATE TRIGGER llm_tracker_usage_rollup_delete AFTER DELETE ON llm_tracker_usage REFERENCING OLD TABLE AS old_rows FOR EACH STATEMENT EXECUTE FUNCTION llm_tracker_usage_rollup_delete()
-- statement --
CREATE TRIGGER llm_tracker_usage_rollup_update AFTER UPDATE ON llm_tracker_usage REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION llm_tracker_usage_rollup_update()
-- statement --
CREATE TRIGGER llm_tracker_usage_rollup_truncate AFTER TRUNCATE ON llm_tracker_usage  FOR EACH STATEMENT EXECUTE FUNCTION llm_tracker_usage_rollup_truncate()
