//! Issue 8: `call_and_track_stream` over each provider's streaming wire format, served by a
//! small local server-sent-events server that writes one event per HTTP chunk with a delay
//! (so a consumer can stop mid-stream) and can cut the connection; exactly one row per
//! stream, whatever happens.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt;
use llm_tracker::db::entities::usage;
use llm_tracker::{LlmTracker, Settings, TrackerError};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use crate::db_test;
use crate::helpers::{TestDb, fixture};
use crate::tracker::{hello, new_tracker, only_row, rows, settings, tokens};

/// What the server does with every request.
#[derive(Clone)]
struct Script {
    /// The SSE events' `data`, in order.
    events: Vec<String>,
    /// Pause before each event.
    delay: Duration,
    /// Drop the connection (no end of body) before event `n`.
    cut_before: Option<usize>,
}

/// A local SSE server; remembers each request line and JSON body.
struct SseServer {
    base: String,
    seen: Arc<Mutex<Vec<(String, Value)>>>,
}

impl SseServer {
    async fn start(script: Script) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = seen.clone();
        tokio::spawn(async move {
            while let Ok((socket, _)) = listener.accept().await {
                tokio::spawn(serve(socket, script.clone(), log.clone()));
            }
        });
        Self { base, seen }
    }

    fn requests(&self) -> Vec<(String, Value)> {
        self.seen.lock().unwrap().clone()
    }
}

async fn serve(
    mut socket: tokio::net::TcpStream,
    script: Script,
    log: Arc<Mutex<Vec<(String, Value)>>>,
) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let header_end = loop {
        let n = match socket.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        buf.extend_from_slice(&chunk[..n]);
        if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break p + 4;
        }
    };
    let head = String::from_utf8_lossy(&buf[..header_end]).to_string();
    let length: usize = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse().ok())?
        })
        .unwrap_or(0);
    while buf.len() < header_end + length {
        match socket.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
    let body = serde_json::from_slice(&buf[header_end..header_end + length]).unwrap_or(Value::Null);
    let line = head.lines().next().unwrap_or_default().to_owned();
    log.lock().unwrap().push((line, body));
    let start = "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n";
    if socket.write_all(start.as_bytes()).await.is_err() {
        return;
    }
    for (i, data) in script.events.iter().enumerate() {
        tokio::time::sleep(script.delay).await;
        if script.cut_before == Some(i) {
            return; // dropped: the body never ends
        }
        let event = format!("data: {data}\r\n\r\n");
        let framed = format!("{:x}\r\n{event}\r\n", event.len());
        if socket.write_all(framed.as_bytes()).await.is_err() {
            return;
        }
    }
    let _ = socket.write_all(b"0\r\n\r\n").await;
}

/// The events of `tests/fixtures/providers/openai_stream.sse`.
fn openai_stream() -> Vec<String> {
    fixture("providers/openai_stream.sse")
        .lines()
        .filter_map(|l| l.strip_prefix("data: ").map(str::to_owned))
        .collect()
}

fn openai_settings(base: &str) -> Settings {
    settings(&[
        ("LLM_PROVIDER", "openai".into()),
        ("OPENAI_BASE_URL", format!("{base}/v1")),
    ])
}

async fn drain(tracker: &LlmTracker) -> (String, llm_tracker::tracker::StreamRecord) {
    let (mut deltas, handle) = tracker.call_and_track_stream(hello()).unwrap();
    let mut text = String::new();
    while let Some(d) = deltas.next().await {
        if let Ok(t) = d {
            text.push_str(&t);
        }
    }
    (text, handle.await.unwrap())
}

db_test!(
    async fn an_openai_stream_gives_its_text_and_one_success_row(backend: Backend) {
        let t = TestDb::migrated(backend).await;
        let server = SseServer::start(Script {
            events: openai_stream(),
            delay: Duration::from_millis(5),
            cut_before: None,
        })
        .await;
        let (tracker, _dir) = new_tracker(&t.db, &openai_settings(&server.base)).await;
        let (text, record) = drain(&tracker).await;
        assert_eq!(text, "Hello! How can I help?");
        assert_eq!(record.result.as_deref().unwrap(), "Hello! How can I help?");
        assert!(record.usage_complete);
        assert_eq!(
            (
                record.usage.prompt_tokens,
                record.usage.completion_tokens,
                record.usage.total_tokens
            ),
            (19, 10, 29)
        );
        let row = only_row(&t.db).await;
        assert_eq!(row.id, record.row_id);
        assert!(row.success, "{row:?}");
        assert_eq!(tokens(&row), (19, 10, 29, 0, 0));
        assert_eq!(row.model, "gpt-4o-mini-2024-07-18");
        assert_eq!(row.metadata["stream"], json!(true));
        assert!(row.metadata.get("usage_incomplete").is_none());
        // What was asked: a stream, with usage at its end.
        let requests = server.requests();
        assert_eq!(requests.len(), 1);
        assert!(
            requests[0].0.starts_with("POST /v1/chat/completions "),
            "{}",
            requests[0].0
        );
        assert_eq!(requests[0].1["stream"], json!(true));
        assert_eq!(
            requests[0].1["stream_options"]["include_usage"],
            json!(true)
        );
    }
);

db_test!(
    async fn an_azure_stream_with_filter_chunks_is_read_whole(backend: Backend) {
        let t = TestDb::migrated(backend).await;
        let edge: Vec<String> = fixture("providers/edge_cases.jsonl")
            .lines()
            .map(str::to_owned)
            .collect();
        // Azure: the prompt-filter chunk first, an annotation chunk without `delta` between
        // the content chunks, then the finish, the usage and [DONE].
        let chunk = |content: &str| {
            json!({"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "gpt-4o-2024-11-20",
                   "choices": [{"index": 0, "delta": {"content": content}, "finish_reason": null,
                                "content_filter_results": {}}]})
            .to_string()
        };
        let events = vec![
            edge[2].clone(),
            chunk("Ghost"),
            edge[3].clone(),
            chunk("busters"),
            json!({"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "gpt-4o-2024-11-20",
                   "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
            .to_string(),
            json!({"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "gpt-4o-2024-11-20",
                   "choices": [], "usage": {"prompt_tokens": 1320, "completion_tokens": 14, "total_tokens": 1334,
                   "prompt_tokens_details": {"cached_tokens": 1024}, "completion_tokens_details": {"reasoning_tokens": 0}}})
            .to_string(),
            "[DONE]".to_owned(),
        ];
        let server = SseServer::start(Script {
            events,
            delay: Duration::from_millis(2),
            cut_before: None,
        })
        .await;
        let s = settings(&[
            ("LLM_PROVIDER", "azure_openai".into()),
            ("AZURE_OPENAI_API_BASE", server.base.clone()),
            ("AZURE_OPENAI_DEPLOYMENT", "gpt-4o-prod".into()),
        ]);
        let (tracker, _dir) = new_tracker(&t.db, &s).await;
        let (text, record) = drain(&tracker).await;
        assert_eq!(text, "Ghostbusters");
        assert!(record.result.is_ok());
        let row = only_row(&t.db).await;
        assert!(row.success);
        assert_eq!(tokens(&row), (1320, 14, 1334, 1024, 0));
        assert_eq!(row.model, "gpt-4o-2024-11-20");
        assert_eq!(row.metadata["provider"], json!("azure_openai"));
        let line = &server.requests()[0].0;
        assert!(
            line.starts_with("POST /openai/deployments/gpt-4o-prod/chat/completions?api-version="),
            "{line}"
        );
    }
);

db_test!(
    async fn a_gemini_stream_with_thinking_tokens(backend: Backend) {
        let t = TestDb::migrated(backend).await;
        let chunk = |text: &str, candidates: u32, finish: Option<&str>| {
            let mut c = json!({"candidates": [{"content": {"parts": [{"text": text}], "role": "model"}, "index": 0}],
                "usageMetadata": {"promptTokenCount": 12, "candidatesTokenCount": candidates,
                                  "totalTokenCount": 12 + candidates + 384, "thoughtsTokenCount": 384},
                "modelVersion": "gemini-2.5-flash", "responseId": "r1"});
            if let Some(f) = finish {
                c["candidates"][0]["finishReason"] = json!(f);
            }
            c.to_string()
        };
        let server = SseServer::start(Script {
            events: vec![
                chunk("Bonjour", 2, None),
                chunk(" le monde", 5, Some("STOP")),
            ],
            delay: Duration::from_millis(2),
            cut_before: None,
        })
        .await;
        let s = settings(&[
            ("LLM_PROVIDER", "gemini".into()),
            ("GEMINI_BASE_URL", server.base.clone()),
        ]);
        let (tracker, _dir) = new_tracker(&t.db, &s).await;
        let (text, record) = drain(&tracker).await;
        assert_eq!(text, "Bonjour le monde");
        assert!(record.usage_complete);
        let row = only_row(&t.db).await;
        assert!(row.success);
        // completion = candidates (5) + thoughts (384); the last chunk's usage.
        assert_eq!(tokens(&row), (12, 389, 401, 0, 384));
        let line = &server.requests()[0].0;
        assert!(
            line.starts_with("POST /v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse "),
            "{line}"
        );
    }
);

db_test!(
    async fn dropping_the_stream_after_the_first_delta_records_a_failure(backend: Backend) {
        let t = TestDb::migrated(backend).await;
        let server = SseServer::start(Script {
            events: openai_stream(),
            delay: Duration::from_millis(80),
            cut_before: None,
        })
        .await;
        let (tracker, _dir) = new_tracker(&t.db, &openai_settings(&server.base)).await;
        let (mut deltas, handle) = tracker.call_and_track_stream(hello()).unwrap();
        let first = deltas.next().await.unwrap().unwrap();
        assert_eq!(first, "Hello");
        drop(deltas);
        let record = handle.await.unwrap();
        assert!(!record.usage_complete);
        match &record.result {
            Err(TrackerError::StreamInterrupted(m)) => assert!(m.contains("dropped"), "{m}"),
            other => panic!("{other:?}"),
        }
        let row = only_row(&t.db).await;
        assert!(!row.success);
        assert!(
            row.error
                .as_deref()
                .unwrap()
                .contains("dropped by the consumer")
        );
        assert_eq!(row.metadata["usage_incomplete"], json!(true));
        assert_eq!(tokens(&row), (0, 0, 0, 0, 0));
        assert_eq!(row.model, "gpt-4o-mini-2024-07-18");
    }
);

db_test!(
    async fn a_connection_cut_mid_stream_records_a_failure(backend: Backend) {
        let t = TestDb::migrated(backend).await;
        let server = SseServer::start(Script {
            events: openai_stream(),
            delay: Duration::from_millis(2),
            cut_before: Some(3),
        })
        .await;
        let (tracker, _dir) = new_tracker(&t.db, &openai_settings(&server.base)).await;
        let (mut deltas, handle) = tracker.call_and_track_stream(hello()).unwrap();
        let mut items = Vec::new();
        while let Some(d) = deltas.next().await {
            items.push(d);
        }
        // The text that arrived, then the error.
        assert_eq!(items[0].as_deref().unwrap(), "Hello");
        assert!(items.last().unwrap().is_err(), "{items:?}");
        let record = handle.await.unwrap();
        assert!(record.result.is_err());
        let row = only_row(&t.db).await;
        assert!(!row.success);
        assert_eq!(row.metadata["usage_incomplete"], json!(true));
        assert!(row.error.is_some());
    }
);

db_test!(
    async fn the_timeout_ends_a_stalled_stream_with_a_failure_row(backend: Backend) {
        let t = TestDb::migrated(backend).await;
        let server = SseServer::start(Script {
            events: openai_stream(),
            delay: Duration::from_millis(700),
            cut_before: None,
        })
        .await;
        let s = settings(&[
            ("LLM_PROVIDER", "openai".into()),
            ("OPENAI_BASE_URL", format!("{}/v1", server.base)),
            ("LLM_TIMEOUT_SECS", "1".into()),
        ]);
        let (tracker, _dir) = new_tracker(&t.db, &s).await;
        let (text, record) = drain(&tracker).await;
        assert_eq!(text, "");
        match &record.result {
            Err(TrackerError::Provider(e)) => {
                assert_eq!(e.kind, llm_tracker::ProviderErrorKind::Timeout)
            }
            other => panic!("{other:?}"),
        }
        let row = only_row(&t.db).await;
        assert!(!row.success);
        assert!(row.error.as_deref().unwrap().contains("timed out"));
        assert_eq!(row.metadata["usage_incomplete"], json!(true));
    }
);

db_test!(
    async fn a_hundred_streams_half_dropped_give_exactly_a_hundred_rows(backend: Backend) {
        let t = TestDb::migrated(backend).await;
        let server = SseServer::start(Script {
            events: openai_stream(),
            delay: Duration::from_millis(30),
            cut_before: None,
        })
        .await;
        let (tracker, _dir) = new_tracker(&t.db, &openai_settings(&server.base)).await;
        let tracker = Arc::new(tracker);
        let mut tasks = Vec::new();
        for i in 0..100 {
            let tracker = tracker.clone();
            tasks.push(tokio::spawn(async move {
                let (mut deltas, handle) = tracker.call_and_track_stream(hello()).unwrap();
                if i % 2 == 0 {
                    let _ = deltas.next().await;
                    drop(deltas);
                    drop(handle); // nobody waits: the row is written anyway
                    None
                } else {
                    while deltas.next().await.is_some() {}
                    Some(handle.await.unwrap().row_id)
                }
            }));
        }
        let mut completed = 0;
        for task in tasks {
            if task.await.unwrap().is_some() {
                completed += 1;
            }
        }
        assert_eq!(completed, 50);
        let mut all = Vec::new();
        for _ in 0..100 {
            all = rows(&t.db).await;
            if all.len() >= 100 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(all.len(), 100);
        let ok = all.iter().filter(|r| r.success).count();
        assert_eq!(ok, 50);
        assert!(
            all.iter()
                .filter(|r| !r.success)
                .all(|r| r.metadata["usage_incomplete"] == json!(true))
        );
        assert!(
            all.iter()
                .filter(|r| r.success)
                .all(|r| r.total_tokens == 29)
        );
        // No more rows come later.
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(rows(&t.db).await.len(), 100);
        let _: Vec<usage::Model> = all;
    }
);

db_test!(
    async fn call_stream_prints_the_reply_then_the_usage(backend: Backend) {
        use wiremock::matchers::{body_partial_json, method, path};
        use wiremock::{Mock, MockServer, ResponseTemplate};
        let t = TestDb::migrated(backend).await;
        // The CLI runs as a child process while this test waits: wiremock serves from its
        // own threads.
        let server = MockServer::start().await;
        Mock::given(method("POST"))
            .and(path("/v1/chat/completions"))
            .and(body_partial_json(
                json!({"stream": true, "stream_options": {"include_usage": true}}),
            ))
            .respond_with(
                ResponseTemplate::new(200)
                    .set_body_raw(fixture("providers/openai_stream.sse"), "text/event-stream"),
            )
            .expect(1)
            .mount(&server)
            .await;
        let base = format!("{}/v1", server.uri());
        let spool_dir = tempfile::tempdir().unwrap();
        let spool = spool_dir.path().join("s.jsonl");
        let env = [
            ("OPENAI_API_KEY", "sk-test-cli-0123456789"),
            ("OPENAI_BASE_URL", base.as_str()),
            ("USAGE_SPOOL_PATH", spool.to_str().unwrap()),
        ];
        let out = crate::cli::cmd(&t, &["call", "--stream", "hello"], &env);
        assert!(out.status.success(), "{}", crate::cli::stderr(&out));
        let text = crate::cli::stdout(&out);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "Hello! How can I help?");
        let usage: Value = serde_json::from_str(lines[1]).unwrap();
        assert_eq!(usage["total_tokens"], 29);
        let row = only_row(&t.db).await;
        assert_eq!(lines[2], format!("row_id: {}", row.id));
        assert!(row.success);
        assert_eq!(row.metadata["stream"], json!(true));
    }
);

db_test!(
    async fn shutdown_ends_running_streams_and_waits_for_their_rows(backend: Backend) {
        let t = TestDb::migrated(backend).await;
        let server = SseServer::start(Script {
            events: openai_stream(),
            delay: Duration::from_millis(300),
            cut_before: None,
        })
        .await;
        let (tracker, _dir) = new_tracker(&t.db, &openai_settings(&server.base)).await;
        // One stream read up to its first delta and then left unread, two never read at all.
        let (mut read, read_handle) = tracker.call_and_track_stream(hello()).unwrap();
        assert_eq!(read.next().await.unwrap().unwrap(), "Hello");
        let others: Vec<_> = (0..2)
            .map(|_| tracker.call_and_track_stream(hello()).unwrap())
            .collect();
        tracker.shutdown().await;
        // Every row is there when shutdown returns.
        let all = rows(&t.db).await;
        assert_eq!(all.len(), 3);
        for r in &all {
            assert!(!r.success);
            assert!(r.error.as_deref().unwrap().contains("shut down"), "{r:?}");
            assert_eq!(r.metadata["usage_incomplete"], json!(true));
        }
        let record = read_handle.await.unwrap();
        assert!(matches!(
            record.result,
            Err(TrackerError::StreamInterrupted(_))
        ));
        drop(others);
        drop(read);
    }
);

db_test!(
    async fn a_streamed_call_records_its_first_chunk_and_time_to_first_token(backend: Backend) {
        // Issue 20 item 3: `is_streaming` and `first_chunk_at` (the successor's columns), the
        // listing's and CSV's `ttft_sec`, and `avg_ttft_sec` per model from the rollup (cells
        // and pending rows alike), on both databases.
        use chrono::{Duration as D, TimeZone, Utc};
        use llm_tracker::usage::UsageFilter;
        use llm_tracker::usage::list::list_usage;
        use llm_tracker::usage::stats::stats_by_model;
        let t = TestDb::migrated(backend).await;
        let server = SseServer::start(Script {
            events: openai_stream(),
            delay: Duration::from_millis(40),
            cut_before: None,
        })
        .await;
        let (tracker, _dir) = new_tracker(&t.db, &openai_settings(&server.base)).await;
        let (text, record) = drain(&tracker).await;
        assert_eq!(text, "Hello! How can I help?");
        let row = only_row(&t.db).await;
        assert_eq!(row.id, record.row_id);
        assert!(row.is_streaming);
        assert_eq!(row.metadata["stream"], json!(true), "kept for old readers");
        let started = row.started_at.unwrap();
        let first = row.first_chunk_at.expect("first_chunk_at");
        assert!(started <= first && first <= row.created_at, "{row:?}");
        // The first text arrives after at least the first event's pause.
        assert!(first - started >= D::milliseconds(35), "{row:?}");
        let streamed_ttft = (first - started).num_microseconds().unwrap();
        tracker.shutdown().await;

        // Two more rows of the same model: one streamed with a known ttft, one not streamed.
        let at = Utc.with_ymd_and_hms(2026, 1, 5, 10, 0, 0).unwrap();
        let mut known = crate::usage_read::row(900, None, &row.model, (1, 1, 0, 0), true, at);
        known.started_at = Some(at - D::seconds(3));
        known.is_streaming = true;
        known.first_chunk_at = Some(at - D::milliseconds(2500));
        let mut plain = crate::usage_read::row(901, None, &row.model, (1, 1, 0, 0), true, at);
        plain.started_at = Some(at - D::seconds(9));
        crate::usage_read::insert(&t.db, &[known, plain]).await;

        let page = list_usage(&t.db, &UsageFilter::default(), 1, 10)
            .await
            .unwrap();
        let listed = |id: uuid::Uuid| page.results.iter().find(|r| r.id == id).unwrap();
        let tracked = listed(row.id.0);
        assert!(tracked.is_streaming);
        assert_eq!(tracked.ttft_sec, Some(streamed_ttft as f64 / 1e6));
        assert!(tracked.first_chunk_at.is_some());
        let k = listed(uuid::Uuid::from_u128(900));
        assert_eq!(
            (k.is_streaming, k.ttft_sec, k.first_chunk_at.as_deref()),
            (true, Some(0.5), Some("2026-01-05T09:59:57.500000+00:00"))
        );
        let p = listed(uuid::Uuid::from_u128(901));
        assert_eq!(
            (p.is_streaming, p.ttft_sec, p.latency_sec),
            (false, None, Some(9.0))
        );
        // The CSV's last three columns.
        let mut csv = String::new();
        llm_tracker::usage::export::row(&mut csv, k);
        assert!(
            csv.trim_end()
                .ends_with(",true,2026-01-05T09:59:57.500000+00:00,0.5"),
            "{csv}"
        );

        // avg_ttft_sec over the two streamed rows only, before and after the fold.
        let want = ((streamed_ttft + 500_000) as f64 / 2.0).round() / 1e6;
        for _ in 0..2 {
            let by_model = stats_by_model(&t.db, &UsageFilter::default())
                .await
                .unwrap();
            assert_eq!(by_model.len(), 1);
            assert_eq!(by_model[0].avg_ttft_sec, Some(want));
            assert_eq!(by_model[0].total_calls, 3);
            llm_tracker::usage::rollup::fold(&t.db).await.unwrap();
        }
        crate::rollup::assert_verified(&t.db).await;
    }
);
