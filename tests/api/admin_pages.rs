//! Issue 9 / SPEC §8: the admin pages over HTTP (the whole application, middleware included)
//! on both databases: sign-in with Django password hashes, who may sign in, CSRF, the signed
//! session and its expiry, the sign-in rate limit, HTML escaping, and figures equal to the
//! API's.

use std::collections::HashMap;

use actix_web::test;
use llm_tracker::Settings;
use llm_tracker::auth::password::make_password_with;
use llm_tracker::db::entities::usage;
use llm_tracker::http::pages::session::{Session, Signer};
use llm_tracker::http::{AppState, app};
use llm_tracker::usage::UsageFilter;
use llm_tracker::usage::stats::{SeriesOptions, token_stats_in};
use llm_tracker::users::{NewUser, create_user};
use sea_orm::ConnectionTrait;

use crate::db_test;
use crate::helpers::TestDb;
use crate::usage_read::{at, insert, row};

const SECRET: &str = "admin-pages-test-secret-0123456789";

fn state(t: &TestDb) -> AppState {
    let vars = HashMap::from([
        ("DATABASE_URL".to_owned(), t.url.expose().to_owned()),
        ("JWT_SECRET".to_owned(), SECRET.to_owned()),
    ]);
    AppState::new(t.db.clone(), Settings::from_map(&vars).unwrap())
}

/// A user whose password is `pw` hashed as Django does (with few iterations, to keep the
/// tests fast; the count is part of the hash).
async fn user(t: &TestDb, name: &str, staff: bool, superuser: bool, active: bool) -> i32 {
    let u = create_user(
        &t.db,
        NewUser {
            username: name.into(),
            is_staff: staff,
            is_superuser: superuser,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let hash = make_password_with("correct horse", "saltsaltsalt", 1000);
    t.db.execute_unprepared(&format!(
        "UPDATE auth_user SET password = '{hash}', is_active = {} WHERE id = {}",
        if active { "TRUE" } else { "FALSE" },
        u.id
    ))
    .await
    .unwrap();
    u.id
}

#[derive(Debug)]
struct Answer {
    status: u16,
    location: Option<String>,
    cookies: Vec<String>,
    body: String,
}

fn cookie_value(set_cookies: &[String], name: &str) -> Option<String> {
    set_cookies.iter().find_map(|c| {
        let first = c.split(';').next()?;
        let (k, v) = first.split_once('=')?;
        (k.trim() == name).then(|| v.to_owned())
    })
}

macro_rules! send {
    ($app:expr, $req:expr) => {{
        let res = test::call_service(&$app, $req.to_request()).await;
        let status = res.status().as_u16();
        let location = res
            .headers()
            .get("location")
            .map(|v| v.to_str().unwrap().to_owned());
        let cookies: Vec<String> = res
            .headers()
            .get_all("set-cookie")
            .map(|v| v.to_str().unwrap().to_owned())
            .collect();
        let body = String::from_utf8(test::read_body(res).await.to_vec()).unwrap();
        Answer {
            status,
            location,
            cookies,
            body,
        }
    }};
}

/// The hidden CSRF field of a page.
fn csrf_field(body: &str) -> String {
    let at = body
        .find("name=\"csrfmiddlewaretoken\" value=\"")
        .expect("csrf field");
    let rest = &body[at + 34..];
    rest[..rest.find('"').unwrap()].to_owned()
}

fn form(pairs: &[(&str, &str)]) -> String {
    pairs
        .iter()
        .map(|(k, v)| format!("{k}={}", llm_tracker::http::pages::urlencode(v)))
        .collect::<Vec<_>>()
        .join("&")
}

/// Signs in through the form; returns the session cookie value, or the answer when refused.
macro_rules! sign_in {
    ($app:expr, $user:expr, $password:expr) => {{
        let page = send!($app, test::TestRequest::get().uri("/admin/login/"));
        assert_eq!(page.status, 200);
        let csrf_cookie = cookie_value(&page.cookies, "llmt_csrf").expect("csrf cookie");
        let token = csrf_field(&page.body);
        assert_eq!(token, csrf_cookie);
        let ans = send!(
            $app,
            test::TestRequest::post()
                .uri("/admin/login/")
                .insert_header(("content-type", "application/x-www-form-urlencoded"))
                .insert_header(("cookie", format!("llmt_csrf={csrf_cookie}")))
                .set_payload(form(&[
                    ("username", $user),
                    ("password", $password),
                    ("csrfmiddlewaretoken", &token),
                    ("next", "/admin/llm-usage/")
                ]))
        );
        match cookie_value(&ans.cookies, "llmt_session") {
            Some(s) if !s.is_empty() => Ok((s, ans)),
            _ => Err(ans),
        }
    }};
}

fn with_session(uri: &str, session: &str) -> test::TestRequest {
    test::TestRequest::get()
        .uri(uri)
        .insert_header(("cookie", format!("llmt_session={session}")))
}

db_test!(
    async fn staff_sign_in_with_a_django_password_and_read_every_page(backend: Backend) {
        let t = TestDb::migrated(backend).await;
        let staff = user(&t, "staffer", true, false, true).await;
        let rows: Vec<usage::Model> = (1..=30u128)
            .map(|n| {
                let mut r = row(
                    n,
                    Some(staff),
                    if n % 3 == 0 {
                        "gemini-2.5-flash"
                    } else {
                        "gpt-4o"
                    },
                    (100 + n as i32, 20, 0, 0),
                    n % 7 != 0,
                    at("2025-03-01T10:00:00Z") + chrono::Duration::hours(n as i64 * 5),
                );
                // Every other call timed (latency n × 100 ms).
                if n % 2 == 0 {
                    r.started_at =
                        Some(r.created_at - chrono::Duration::milliseconds(n as i64 * 100));
                }
                r
            })
            .collect();
        insert(&t.db, &rows).await;
        let app = test::init_service(app(state(&t))).await;

        // Not signed in: to the sign-in page, then back.
        let ans = send!(app, test::TestRequest::get().uri("/admin/"));
        assert_eq!(ans.status, 302);
        assert_eq!(
            ans.location.as_deref(),
            Some("/admin/login/?next=%2Fadmin%2F")
        );

        let (session, ans) =
            sign_in!(app, "staffer", "correct horse").unwrap_or_else(|a| panic!("{}", a.body));
        assert_eq!(ans.status, 302);
        assert_eq!(ans.location.as_deref(), Some("/admin/llm-usage/"));
        let set = ans
            .cookies
            .iter()
            .find(|c| c.starts_with("llmt_session="))
            .unwrap();
        assert!(
            set.contains("HttpOnly") && set.contains("SameSite=Lax") && set.contains("Max-Age="),
            "{set}"
        );
        // Sign-in is recorded as Django records it.
        assert_eq!(
            t.scalar_i64(&format!(
                "SELECT COUNT(*) FROM auth_user WHERE id = {staff} AND last_login IS NOT NULL"
            ))
            .await,
            1
        );

        // The overview shows the API's figures.
        let page = send!(app, with_session("/admin/?granularity=month", &session));
        assert_eq!(page.status, 200, "{}", page.body);
        let data = token_stats_in(
            &t.db,
            &UsageFilter::default(),
            None,
            SeriesOptions::default(),
        )
        .await
        .unwrap();
        // Issue 21: counts with thousands separators, money as dollars.
        use llm_tracker::http::pages::format::{money, money_decimals, thousands};
        assert!(page.body.contains(&format!(
            "id=\"total-calls\">{}<",
            thousands(data.summary.total_calls)
        )));
        assert!(page.body.contains(&format!(
            "id=\"total-tokens\">{}<",
            thousands(data.summary.total_tokens)
        )));
        assert!(data.summary.total_tokens >= 1000, "a separator to see");
        assert!(page.body.contains(&format!(
            "id=\"failed-calls\">{}<",
            thousands(data.summary.failed_calls)
        )));
        let cost = data.summary.total_cost.0;
        assert!(page.body.contains(&format!(
            "id=\"total-cost\">{}<",
            money(cost, money_decimals(&[cost]))
        )));
        assert!(page.body.contains("<svg class=\"chart\""));
        // The charts: the chosen metric, calls by outcome, failure rate; bars carry their
        // exact values.
        for id in [
            "id=\"chart\"",
            "id=\"outcome-chart\"",
            "id=\"failure-chart\"",
            "id=\"top-users\"",
        ] {
            assert!(page.body.contains(id), "{id}");
        }
        assert!(page.body.contains("Total tokens by day"));
        // Stacked by model, with a legend naming the models; a user filter unstacks.
        assert!(page.body.contains("class=\"m0\""));
        let legend = &page.body[page.body.find("id=\"legend\"").unwrap()..];
        let legend = &legend[..legend.find("</figcaption>").unwrap()];
        assert!(legend.contains("gemini-2.5-flash"), "{legend}");
        assert!(page.body.contains("Calls by outcome by day"));
        assert!(page.body.contains("Failure rate by day"));
        assert!(page.body.contains("<circle"), "failure-rate points");
        assert!(page.body.contains("class=\"failed\""), "failed segments");
        assert!(
            page.body
                .contains("granularity=month&amp;metric=cost\" id=\"metric-cost\"")
                || page
                    .body
                    .contains("granularity=month&#38;metric=cost\" id=\"metric-cost\""),
            "the toggle keeps the page's parameters"
        );
        let by_cost = send!(
            app,
            with_session("/admin/?granularity=month&metric=cost", &session)
        );
        assert_eq!(by_cost.status, 200);
        assert!(by_cost.body.contains("Cost (USD) by day"));
        assert!(
            by_cost
                .body
                .contains("id=\"metric-cost\" aria-current=\"true\"")
        );
        let by_calls = send!(
            app,
            with_session("/admin/?granularity=month&metric=CALLS", &session)
        );
        assert!(by_calls.body.contains("Calls by day"));
        // By model with its share of the cost; top users with theirs of the tokens.
        assert!(page.body.contains("Share of cost"));
        assert!(page.body.contains("Share of tokens"));
        // Top error messages, with the way to the failed calls.
        assert!(page.body.contains("id=\"top-errors\""));
        assert!(
            page.body
                .contains("success=false\" id=\"failed-calls-link\"")
        );
        if data.summary.failed_calls > 0 {
            assert!(!page.body.contains("No failed calls in this range."));
        }
        assert!(page.body.contains(">gemini-2.5-flash</a>"));
        // Latency by model and time to first token (issue 21): the demo's calls are timed.
        assert!(page.body.contains("id=\"latency-chart\""));
        assert!(page.body.contains("Latency by model (p50, p95)"));
        assert!(page.body.contains("p95 latency"));
        assert!(
            !page
                .body
                .contains("No timed calls: latency needs started_at")
        );
        // A range without calls: the charts say so.
        let empty = send!(
            app,
            with_session(
                "/admin/?start_date=2001-01-01&end_date=2001-01-31",
                &session
            )
        );
        assert_eq!(empty.status, 200);
        assert!(
            empty
                .body
                .contains("No timed calls: latency needs started_at")
        );
        assert!(empty.body.contains("No streamed calls in this range"));
        // No external resource on the page.
        assert!(
            page.body.matches("http://").count()
                == page.body.matches("http://www.w3.org/2000/svg").count(),
            "only the SVG namespace"
        );
        assert!(!page.body.contains("https://"));

        // The listing, newest first by default, oldest first on request; a filter; the detail.
        let list = send!(app, with_session("/admin/llm-usage/", &session));
        assert_eq!(list.status, 200);
        assert!(list.body.contains("id=\"total\">30<"));
        // Times in the page's zone (UTC by default), the exact instant in a tooltip.
        let first_new = list.body.find(">2025-03-07 16:00:00<").unwrap();
        assert!(list.body.contains("title=\"2025-03-07T16:00:00.000000Z\""));
        let berlin = send!(
            app,
            with_session("/admin/llm-usage/?tz=Europe/Berlin", &session)
        );
        assert!(berlin.body.contains(">2025-03-07 17:00:00<"));
        assert!(berlin.body.contains("Date (Europe/Berlin)"));
        let old = send!(
            app,
            with_session("/admin/llm-usage/?sort=created_at", &session)
        );
        assert!(old.body.contains(">2025-03-01 15:00:00<"));
        assert!(
            !old.body.contains(">2025-03-07 16:00:00<"),
            "oldest 25 rows only"
        );
        assert!(first_new > 0);
        let gem = send!(
            app,
            with_session("/admin/llm-usage/?model=GEMINI", &session)
        );
        assert!(gem.body.contains("id=\"total\">10<"));
        assert!(
            gem.body
                .contains("/admin/llm-usage/export.csv?model=GEMINI")
        );
        let id = uuid::Uuid::from_u128(7);
        let detail = send!(
            app,
            with_session(&format!("/admin/llm-usage/{id}/"), &session)
        );
        assert_eq!(detail.status, 200);
        assert!(
            detail
                .body
                .contains("&quot;node_name&quot;: &quot;n7&quot;")
                || detail.body.contains("&#34;node_name&#34;: &#34;n7&#34;"),
            "{}",
            detail.body
        );
        assert!(detail.body.contains(">boom<"), "the error of a failed row");
        let missing = send!(
            app,
            with_session(
                &format!("/admin/llm-usage/{}/", uuid::Uuid::from_u128(999)),
                &session
            )
        );
        assert_eq!(missing.status, 404);
        let bad = send!(app, with_session("/admin/llm-usage/not-a-uuid/", &session));
        assert_eq!(bad.status, 404);

        // The CSV export with the page's filters, on the session.
        let csv = send!(
            app,
            with_session("/admin/llm-usage/export.csv?model=gemini", &session)
        );
        assert_eq!(csv.status, 200);
        assert_eq!(csv.body.lines().count(), 11);

        // Bad filters: a 400 page naming the problem, nothing else.
        let bad = send!(app, with_session("/admin/?start_date=2025-02-30", &session));
        assert_eq!(bad.status, 400);
        assert!(bad.body.contains("start_date"));
        let bad = send!(app, with_session("/admin/?tz=Mars/Base", &session));
        assert_eq!(bad.status, 400);

        // Log out: needs the session's CSRF token; then the session is gone.
        let no_token = send!(
            app,
            with_session("/admin/logout/", &session)
                .method(actix_web::http::Method::POST)
                .insert_header(("content-type", "application/x-www-form-urlencoded"))
                .set_payload("csrfmiddlewaretoken=wrong")
        );
        assert_eq!(no_token.status, 403);
        let csrf = csrf_field(&page.body);
        let out = send!(
            app,
            with_session("/admin/logout/", &session)
                .method(actix_web::http::Method::POST)
                .insert_header(("content-type", "application/x-www-form-urlencoded"))
                .set_payload(format!("csrfmiddlewaretoken={csrf}"))
        );
        assert_eq!(out.status, 302);
        assert!(
            out.cookies.iter().any(|c| c.starts_with("llmt_session=;")
                || c.starts_with("llmt_session=\"\"")
                || c.contains("Max-Age=0")),
            "{:?}",
            out.cookies
        );
    }
);

db_test!(
    async fn only_active_staff_and_superusers_may_sign_in(backend: Backend) {
        let t = TestDb::migrated(backend).await;
        user(&t, "root", false, true, true).await;
        user(&t, "alice", false, false, true).await;
        user(&t, "gone", true, false, false).await;
        let app = test::init_service(app(state(&t))).await;
        assert!(sign_in!(app, "root", "correct horse").is_ok());
        for (name, password) in [
            ("alice", "correct horse"),
            ("gone", "correct horse"),
            ("root", "wrong"),
            ("nobody", "correct horse"),
            ("ROOT", "correct horse"),
        ] {
            let refused = sign_in!(app, name, password).map(|_| ()).unwrap_err();
            assert_eq!(refused.status, 200, "{name}");
            assert!(
                refused.body.contains(
                    "Please enter the correct username and password for a staff account."
                ),
                "{name}: {}",
                refused.body
            );
        }
    }
);

db_test!(
    async fn sign_in_without_the_csrf_token_is_refused(backend: Backend) {
        let t = TestDb::migrated(backend).await;
        user(&t, "staffer", true, false, true).await;
        let app = test::init_service(app(state(&t))).await;
        let post = |cookie: Option<&str>, token: &str| {
            let mut req = test::TestRequest::post()
                .uri("/admin/login/")
                .insert_header(("content-type", "application/x-www-form-urlencoded"))
                .set_payload(form(&[
                    ("username", "staffer"),
                    ("password", "correct horse"),
                    ("csrfmiddlewaretoken", token),
                ]));
            if let Some(c) = cookie {
                req = req.insert_header(("cookie", format!("llmt_csrf={c}")));
            }
            req
        };
        let none = send!(app, post(None, ""));
        assert_eq!(none.status, 403);
        assert!(none.body.contains("CSRF verification failed"));
        let mismatch = send!(app, post(Some("a".repeat(43).as_str()), &"b".repeat(43)));
        assert_eq!(mismatch.status, 403);
        assert!(cookie_value(&mismatch.cookies, "llmt_session").is_none());
    }
);

db_test!(
    async fn sessions_expire_and_cannot_be_forged(backend: Backend) {
        let t = TestDb::migrated(backend).await;
        let id = user(&t, "staffer", true, false, true).await;
        let app = test::init_service(app(state(&t))).await;
        let signer = Signer::new(SECRET);
        let hash = t
            .scalar_string(&format!("SELECT password FROM auth_user WHERE id = {id}"))
            .await;
        let now = chrono::Utc::now().timestamp();
        let make = |expires: i64, tag: String| {
            signer.encode(&Session {
                user_id: id,
                expires,
                csrf: "x".repeat(43),
                password_tag: tag,
            })
        };
        // A session opens pages only while its server-side record is there (sign-in writes it).
        let record = |expires: i64| {
            let key = signer.record_key(&Session {
                user_id: id,
                expires,
                csrf: "x".repeat(43),
                password_tag: String::new(),
            });
            let db = t.db.clone();
            async move {
                llm_tracker::http::pages::session::records::open(&db, &key, id, expires, now)
                    .await
                    .unwrap()
            }
        };
        let valid = make(now + 60, signer.password_tag(&hash));
        assert_eq!(
            send!(app, with_session("/admin/", &valid)).status,
            302,
            "no record"
        );
        record(now + 60).await;
        assert_eq!(send!(app, with_session("/admin/", &valid)).status, 200);
        // Expired.
        let expired = make(now - 1, signer.password_tag(&hash));
        assert_eq!(send!(app, with_session("/admin/", &expired)).status, 302);
        // Signed with another key.
        let other = Signer::new("another-secret-0123456789").encode(&Session {
            user_id: id,
            expires: now + 60,
            csrf: "x".into(),
            password_tag: signer.password_tag(&hash),
        });
        assert_eq!(send!(app, with_session("/admin/", &other)).status, 302);
        // The password changed since: the session ends (as Django's session auth hash).
        t.db.execute_unprepared(&format!(
            "UPDATE auth_user SET password = '{}' WHERE id = {id}",
            make_password_with("new password", "othersalt", 1000)
        ))
        .await
        .unwrap();
        assert_eq!(send!(app, with_session("/admin/", &valid)).status, 302);
        // Staff status removed: the session no longer opens the pages.
        let fresh = make(
            now + 60,
            signer.password_tag(
                &t.scalar_string(&format!("SELECT password FROM auth_user WHERE id = {id}"))
                    .await,
            ),
        );
        assert_eq!(send!(app, with_session("/admin/", &fresh)).status, 200);
        t.db.execute_unprepared(&format!(
            "UPDATE auth_user SET is_staff = FALSE WHERE id = {id}"
        ))
        .await
        .unwrap();
        assert_eq!(send!(app, with_session("/admin/", &fresh)).status, 302);
    }
);

db_test!(
    async fn failed_sign_ins_are_rate_limited(backend: Backend) {
        let t = TestDb::migrated(backend).await;
        user(&t, "staffer", true, false, true).await;
        let app = test::init_service(app(state(&t))).await;
        for _ in 0..10 {
            let refused = sign_in!(app, "staffer", "wrong").map(|_| ()).unwrap_err();
            assert_eq!(refused.status, 200);
        }
        // The 11th try within 5 minutes is refused before the password is even checked.
        let limited = sign_in!(app, "staffer", "correct horse")
            .map(|_| ())
            .unwrap_err();
        assert_eq!(limited.status, 429);
        assert!(limited.body.contains("Too many failed sign-ins"));
    }
);

db_test!(
    async fn stored_html_is_escaped_everywhere(backend: Backend) {
        let t = TestDb::migrated(backend).await;
        user(&t, "staffer", true, false, true).await;
        let evil = "<script>alert(1)</script>";
        let mut r = row(
            1,
            None,
            evil,
            (10, 5, 0, 0),
            false,
            at("2025-03-01T10:00:00Z"),
        );
        r.error = Some("<img src=x onerror=alert(2)>".into());
        r.metadata = serde_json::json!({"node_name": "</pre><script>alert(3)</script>"});
        insert(&t.db, &[r]).await;
        let app = test::init_service(app(state(&t))).await;
        let (session, _) =
            sign_in!(app, "staffer", "correct horse").unwrap_or_else(|a| panic!("{}", a.body));
        for uri in [
            "/admin/".to_owned(),
            "/admin/llm-usage/".to_owned(),
            format!("/admin/llm-usage/{}/", uuid::Uuid::from_u128(1)),
            format!(
                "/admin/llm-usage/?model={}",
                llm_tracker::http::pages::urlencode(evil)
            ),
        ] {
            let page = send!(app, with_session(&uri, &session));
            assert_eq!(page.status, 200, "{uri}");
            assert!(!page.body.contains("<script>"), "{uri}: {}", page.body);
            assert!(!page.body.contains("<img src=x"), "{uri}");
            assert!(
                page.body.contains("&lt;script&gt;") || page.body.contains("&#60;script&#62;"),
                "{uri}"
            );
        }
    }
);

// Issue 17, item 2: a `next` that would break the Location header (CR, LF, NUL, DEL) falls
// back to /admin/ instead of a 500; a non-ASCII one is percent-encoded.
db_test!(
    async fn sign_in_redirects_only_to_a_clean_local_next(backend: Backend) {
        let t = TestDb::migrated(backend).await;
        user(&t, "root", false, true, true).await;
        let app = test::init_service(app(state(&t))).await;
        for (next, want) in [
            ("/admin/\r\nX: 1", "/admin/"),
            ("/admin/\nX: 1", "/admin/"),
            ("/admin/\u{0}", "/admin/"),
            ("/admin/\u{7f}", "/admin/"),
            ("https://evil.example/admin/", "/admin/"),
            ("/admin/é", "/admin/%C3%A9"),
            ("/admin/llm-usage/?model=gpt", "/admin/llm-usage/?model=gpt"),
        ] {
            let page = send!(app, test::TestRequest::get().uri("/admin/login/"));
            let csrf_cookie = cookie_value(&page.cookies, "llmt_csrf").expect("csrf cookie");
            let token = csrf_field(&page.body);
            let ans = send!(
                app,
                test::TestRequest::post()
                    .uri("/admin/login/")
                    .insert_header(("content-type", "application/x-www-form-urlencoded"))
                    .insert_header(("cookie", format!("llmt_csrf={csrf_cookie}")))
                    .set_payload(form(&[
                        ("username", "root"),
                        ("password", "correct horse"),
                        ("csrfmiddlewaretoken", &token),
                        ("next", next),
                    ]))
            );
            assert_eq!(ans.status, 302, "{next:?}: {}", ans.body);
            assert_eq!(ans.location.as_deref(), Some(want), "{next:?}");
        }
    }
);

// Issue 17, item 4: a CSRF token the attacker chose (planted in the cookie and repeated in the
// form) does not sign in; nor does a POST from another origin, even with a good token.
db_test!(
    async fn sign_in_refuses_planted_csrf_tokens_and_foreign_origins(backend: Backend) {
        let t = TestDb::migrated(backend).await;
        user(&t, "root", false, true, true).await;
        let app = test::init_service(app(state(&t))).await;
        let post = |cookie: &str, token: &str| {
            test::TestRequest::post()
                .uri("/admin/login/")
                .insert_header(("content-type", "application/x-www-form-urlencoded"))
                .insert_header(("cookie", format!("llmt_csrf={cookie}")))
                .set_payload(form(&[
                    ("username", "root"),
                    ("password", "correct horse"),
                    ("csrfmiddlewaretoken", token),
                    ("next", "/admin/"),
                ]))
        };
        for planted in ["attacker", &"A".repeat(43)] {
            let ans = send!(app, post(planted, planted));
            assert_eq!(ans.status, 403, "{planted}: {}", ans.body);
            assert!(cookie_value(&ans.cookies, "llmt_session").is_none());
        }
        let page = send!(app, test::TestRequest::get().uri("/admin/login/"));
        let good = cookie_value(&page.cookies, "llmt_csrf").expect("csrf cookie");
        assert_eq!(csrf_field(&page.body), good);
        for (name, value) in [
            ("origin", "https://evil.example"),
            ("referer", "https://evil.example/phish"),
        ] {
            let ans = send!(app, post(&good, &good).insert_header((name, value)));
            assert_eq!(ans.status, 403, "{name}: {}", ans.body);
        }
        // The same token from this site signs in (the test client's host is localhost:8080).
        let ans = send!(
            app,
            post(&good, &good).insert_header(("origin", "http://localhost:8080"))
        );
        assert_eq!(ans.status, 302, "{}", ans.body);
        assert!(cookie_value(&ans.cookies, "llmt_session").is_some_and(|s| !s.is_empty()));
    }
);

// Issue 17, item 3: logging out ends the session on the server (its cookie, saved before,
// no longer opens a page); "sign out everywhere" ends every session of the user.
db_test!(
    async fn logout_ends_the_session_and_sign_out_everywhere_ends_them_all(backend: Backend) {
        let t = TestDb::migrated(backend).await;
        user(&t, "root", false, true, true).await;
        let app = test::init_service(app(state(&t))).await;
        let logout = |session: &str, csrf: &str, everywhere: bool| {
            let mut pairs = vec![("csrfmiddlewaretoken", csrf.to_owned())];
            if everywhere {
                pairs.push(("everywhere", "1".to_owned()));
            }
            test::TestRequest::post()
                .uri("/admin/logout/")
                .insert_header(("content-type", "application/x-www-form-urlencoded"))
                .insert_header(("cookie", format!("llmt_session={session}")))
                .set_payload(
                    pairs
                        .iter()
                        .map(|(k, v)| format!("{k}={v}"))
                        .collect::<Vec<_>>()
                        .join("&"),
                )
        };
        let csrf_of = |session: &str| {
            Signer::new(SECRET)
                .decode(session, chrono::Utc::now().timestamp())
                .unwrap()
                .csrf
        };
        let (one, _) = sign_in!(app, "root", "correct horse").unwrap();
        assert_eq!(send!(app, with_session("/admin/", &one)).status, 200);
        let ans = send!(app, logout(&one, &csrf_of(&one), false));
        assert_eq!(ans.status, 302);
        assert_eq!(
            send!(app, with_session("/admin/", &one)).status,
            302,
            "replayed cookie"
        );

        let (a, _) = sign_in!(app, "root", "correct horse").unwrap();
        let (b, _) = sign_in!(app, "root", "correct horse").unwrap();
        assert_eq!(send!(app, with_session("/admin/", &a)).status, 200);
        assert_eq!(send!(app, with_session("/admin/", &b)).status, 200);
        let ans = send!(app, logout(&a, &csrf_of(&a), true));
        assert_eq!(ans.status, 302);
        assert_eq!(send!(app, with_session("/admin/", &a)).status, 302);
        assert_eq!(
            send!(app, with_session("/admin/", &b)).status,
            302,
            "other device too"
        );
        let page = send!(app, test::TestRequest::get().uri("/admin/login/"));
        assert_eq!(page.status, 200);
    }
);

// Issue 17, item 9: failures for a username from new browsers stop new browsers only; the
// owner's browser (its device cookie from an earlier sign-in) still signs in, and each address
// keeps its own limit.
db_test!(
    async fn a_username_under_attack_still_signs_in_from_its_own_browser(backend: Backend) {
        let t = TestDb::migrated(backend).await;
        user(&t, "staffer", true, false, true).await;
        let app = test::init_service(app(state(&t))).await;
        // One attempt from `addr` with `device` (a cookie value, or none).
        macro_rules! attempt {
            ($addr:expr, $device:expr, $password:expr) => {{
                let page = send!(app, test::TestRequest::get().uri("/admin/login/"));
                let csrf = cookie_value(&page.cookies, "llmt_csrf").expect("csrf cookie");
                let mut cookies = format!("llmt_csrf={csrf}");
                if let Some(d) = $device {
                    cookies.push_str(&format!("; llmt_device={d}"));
                }
                send!(
                    app,
                    test::TestRequest::post()
                        .uri("/admin/login/")
                        .peer_addr($addr.parse().unwrap())
                        .insert_header(("content-type", "application/x-www-form-urlencoded"))
                        .insert_header(("cookie", cookies))
                        .set_payload(form(&[
                            ("username", "staffer"),
                            ("password", $password),
                            ("csrfmiddlewaretoken", &csrf),
                            ("next", "/admin/"),
                        ]))
                )
            }};
        }
        let owner = "192.0.2.10:5000";
        let first = attempt!(owner, None::<String>, "correct horse");
        assert_eq!(first.status, 302);
        let device = cookie_value(&first.cookies, "llmt_device").expect("device cookie");
        // An attacker spreads wrong passwords over addresses (5 each, under the per-address 10).
        for i in 0..12 {
            let addr = format!("198.51.100.{}:4000", i / 5 + 1);
            let ans = attempt!(addr.as_str(), None::<String>, "wrong");
            assert!(ans.status == 200 || ans.status == 429, "{}", ans.status);
        }
        // New browsers are held now, even with the right password...
        let new_browser = attempt!("203.0.113.7:4000", None::<String>, "correct horse");
        assert_eq!(new_browser.status, 429);
        // ...the owner's is not.
        let again = attempt!(owner, Some(device.clone()), "correct horse");
        assert_eq!(again.status, 302, "{}", again.body);
        // A device cookie is for its username only, and forged ones are worthless.
        assert!(Signer::new(SECRET).device_is_for(
            &device,
            "STAFFER",
            chrono::Utc::now().timestamp()
        ));
        assert!(!Signer::new(SECRET).device_is_for(
            &device,
            "root",
            chrono::Utc::now().timestamp()
        ));
        let forged = attempt!(
            "203.0.113.8:4000",
            Some("ZGV2aWNlfHN0YWZmZXJ8OTk5OTk5OTk5OQ.AAAA".to_owned()),
            "correct horse"
        );
        assert_eq!(forged.status, 429);
        // Each address keeps its own limit, device cookie or not.
        for _ in 0..10 {
            attempt!("192.0.2.99:5000", Some(device.clone()), "wrong");
        }
        let limited = attempt!("192.0.2.99:5000", Some(device.clone()), "correct horse");
        assert_eq!(limited.status, 429);
    }
);

/// Issue 18: the pages on a SQLite file that the Django app and we write (Django's rows by
/// plain SQL in its formats), and sign-in's `last_login` written in Django's text.
#[actix_web::test]
async fn pages_read_a_sqlite_file_shared_with_django() {
    use crate::sqlite_django::{django_file, our_rows};
    let t = TestDb::empty(crate::helpers::Backend::Sqlite).await;
    django_file(&t).await;
    <migration::Migrator as migration::MigratorTrait>::up(&t.db, None)
        .await
        .unwrap();
    our_rows(&t).await;
    let staff = user(&t, "staffer", true, false, true).await;
    let app = test::init_service(app(state(&t))).await;
    let (session, _) = sign_in!(app, "staffer", "correct horse").expect("signed in");
    let login = t
        .scalar_string(&format!(
            "SELECT last_login FROM auth_user WHERE id = {staff}"
        ))
        .await;
    assert!(
        regex::Regex::new(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d(\.\d{6})?$")
            .unwrap()
            .is_match(&login),
        "{login}"
    );

    let list = send!(
        app,
        with_session(
            "/admin/llm-usage/?start_date=2026-11-26T05:50:00&end_date=2026-11-26T07:00:00",
            &session
        )
    );
    assert_eq!(list.status, 200, "{}", list.body);
    assert!(list.body.contains("id=\"total\">3<"), "{}", list.body);
    let ours = list.body.find(">2026-11-26 06:30:00<").expect("ours");
    let theirs = list.body.find(">2026-11-26 06:00:00<").expect("Django's");
    assert!(ours < theirs, "newest first");
    let detail = send!(
        app,
        with_session(
            "/admin/llm-usage/d0000000-0000-4000-8000-000000000001/",
            &session
        )
    );
    assert_eq!(detail.status, 200, "{}", detail.body);
    assert!(detail.body.contains("alice"));
    let overview = send!(
        app,
        with_session(
            "/admin/?granularity=day&start_date=2026-11-26&end_date=2026-11-26",
            &session
        )
    );
    assert_eq!(overview.status, 200);
    assert!(
        overview.body.contains("id=\"total-calls\">5<"),
        "{}",
        overview.body
    );
}

// Issue 19 item 1: the API keys page lists keys (never a key), creates one and shows it once,
// revokes; every POST needs the session's CSRF token.
db_test!(
    async fn the_api_keys_page_creates_shows_once_and_revokes(backend: Backend) {
        let t = TestDb::migrated(backend).await;
        user(&t, "root", true, false, true).await;
        user(&t, "svc", false, false, true).await;
        let app = test::init_service(app(state(&t))).await;
        let (session, _) = sign_in!(app, "root", "correct horse").unwrap();
        let post = |uri: &str, body: String| {
            test::TestRequest::post()
                .uri(uri)
                .insert_header(("content-type", "application/x-www-form-urlencoded"))
                .insert_header(("cookie", format!("llmt_session={session}")))
                .set_payload(body)
        };
        let page = send!(app, with_session("/admin/api-keys/", &session));
        assert_eq!(page.status, 200);
        assert!(page.body.contains("No keys yet."));
        assert!(page.body.contains("href=\"/admin/api-keys/\""), "nav link");
        let csrf = csrf_field(&page.body);

        // Without the token: refused, nothing created.
        let ans = send!(
            app,
            post(
                "/admin/api-keys/",
                form(&[("username", "svc"), ("scope_gateway", "1")])
            )
        );
        assert_eq!(ans.status, 403);
        // Bad input: 400 with the message, the form kept, nothing created.
        for (pairs, says) in [
            (
                vec![("username", "nobody"), ("scope_gateway", "1")],
                "There is no user",
            ),
            (vec![("username", "svc")], "at least one scope"),
            (
                vec![
                    ("username", "svc"),
                    ("scope_ingest", "1"),
                    ("expires_in_days", "0"),
                ],
                "Expires in days",
            ),
        ] {
            let mut pairs = pairs;
            pairs.push(("csrfmiddlewaretoken", &csrf));
            let ans = send!(app, post("/admin/api-keys/", form(&pairs)));
            assert_eq!(ans.status, 400, "{pairs:?}");
            assert!(ans.body.contains(says), "{says}: {}", ans.body);
        }
        assert!(
            llm_tracker::api_keys::list(&t.db, None)
                .await
                .unwrap()
                .is_empty()
        );

        // Created: the key on this page only, with no-store.
        let res = test::call_service(
            &app,
            post(
                "/admin/api-keys/",
                form(&[
                    ("csrfmiddlewaretoken", &csrf),
                    ("username", "svc"),
                    ("name", "<etl>"),
                    ("scope_ingest", "1"),
                    ("expires_in_days", "30"),
                ]),
            )
            .to_request(),
        )
        .await;
        assert_eq!(res.status().as_u16(), 200);
        assert_eq!(res.headers().get("cache-control").unwrap(), "no-store");
        let body = String::from_utf8(test::read_body(res).await.to_vec()).unwrap();
        let at = body.find("<pre id=\"new-key\">").expect("key shown") + 18;
        let key = body[at..at + 45].to_owned();
        assert!(key.starts_with("ltk_"), "{key}");
        assert!(
            !body.contains("<etl>")
                && (body.contains("&lt;etl&gt;") || body.contains("&#60;etl&#62;")),
            "escaped name"
        );
        let who = llm_tracker::api_keys::authenticate(
            &t.db,
            Some(&key),
            llm_tracker::api_keys::Scope::Ingest,
        )
        .await
        .unwrap()
        .unwrap();
        // Listed afterwards, but never the key again.
        let page = send!(app, with_session("/admin/api-keys/", &session));
        assert!(page.body.contains(&key[..12]) && !page.body.contains(&key[13..]));
        assert!(page.body.contains("active"));

        // Revoke: token needed; then the key is refused.
        let uri = format!("/admin/api-keys/{}/revoke/", who.key_id);
        assert_eq!(send!(app, post(&uri, String::new())).status, 403);
        let ans = send!(app, post(&uri, form(&[("csrfmiddlewaretoken", &csrf)])));
        assert_eq!(
            (ans.status, ans.location.as_deref()),
            (303, Some("/admin/api-keys/"))
        );
        assert_eq!(
            llm_tracker::api_keys::authenticate(
                &t.db,
                Some(&key),
                llm_tracker::api_keys::Scope::Ingest
            )
            .await
            .unwrap(),
            Err(llm_tracker::api_keys::Refused::Revoked)
        );
        let page = send!(app, with_session("/admin/api-keys/", &session));
        assert!(page.body.contains("revoked"));
        assert_eq!(
            send!(
                app,
                post(
                    "/admin/api-keys/99999/revoke/",
                    form(&[("csrfmiddlewaretoken", &csrf)])
                )
            )
            .status,
            404
        );
        // Signed out: the sign-in page, not the list.
        assert_eq!(
            send!(app, test::TestRequest::get().uri("/admin/api-keys/")).status,
            302
        );
    }
);
