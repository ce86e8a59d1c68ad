//! A device's task file outlives the code that wrote it: a `tasks.db` written the way
//! the sqlx-based SQLite backend wrote it (its pool settings, its migrator and
//! `_sqlx_migrations` rows, its statements) is opened by a real cocoon on today's
//! backend, and every task, field and log line reads back through the hub.

use std::collections::HashMap;
use std::path::Path;

use adi_storage::pool;
use anyhow::{bail, ensure, Context, Result};
use serde_json::{json, Value};
use sqlx::sqlite::{SqliteConnectOptions, SqlitePool, SqliteSynchronous};

use crate::harness::{Api, Cocoon, Hub};

/// Tasks in the old file: several pages of the device listing.
const TASKS: usize = 240;
/// The page size the test reads with.
const PAGE: usize = 100;

/// One task as the old backend stored it, and as it must read back.
struct OldTask {
    id: String,
    title: String,
    description: String,
    status: &'static str,
    command: Option<Value>,
    requirements: Value,
    input: Option<Value>,
    output: Option<Value>,
    exit_code: Option<i32>,
    error: Option<String>,
    created_at: i64,
    updated_at: i64,
    logs: Vec<(&'static str, String)>,
}

fn old_tasks() -> Vec<OldTask> {
    let base = 1_700_000_000_000_000_i64;
    (0..TASKS)
        .map(|i| {
            let status = ["pending", "completed", "failed", "cancelled"][i % 4];
            let done = status != "pending";
            OldTask {
                id: uuid::Uuid::new_v4().to_string(),
                title: format!("old task {i} ünïcode"),
                description: if i % 3 == 0 {
                    String::new()
                } else {
                    format!("written by the earlier backend, number {i}")
                },
                status,
                command: done.then(|| json!(["sh", "-c", format!("echo {i}")])),
                requirements: if i % 5 == 0 {
                    json!(["gpu"])
                } else {
                    json!([])
                },
                input: (i % 2 == 0).then(|| json!({ "n": i, "nested": [1, 2, { "x": null }] })),
                output: (status == "completed").then(|| json!({ "ok": true, "n": i })),
                exit_code: match status {
                    "completed" => Some(0),
                    "failed" => Some(2),
                    _ => None,
                },
                error: (status == "failed").then(|| format!("failed on purpose {i}")),
                // Some share an instant, so the id decides their order.
                created_at: base + (i as i64 / 2) * 1000,
                updated_at: base + (i as i64 / 2) * 1000 + 7,
                logs: if done {
                    vec![
                        ("stdout", format!("{i}")),
                        ("stderr", format!("warning {i}")),
                        ("system", "exited".to_owned()),
                    ]
                } else {
                    Vec::new()
                },
            }
        })
        .collect()
}

/// Writes `tasks.db` in `data_dir` as the sqlx-based backend did: its pool, its
/// migrator (which records `_sqlx_migrations`), its insert statements.
async fn write_old_file(data_dir: &Path, tasks: &[OldTask]) -> Result<()> {
    std::fs::create_dir_all(data_dir)?;
    let pool = pool::sqlite(
        SqliteConnectOptions::new()
            .filename(data_dir.join("tasks.db"))
            .create_if_missing(true)
            .synchronous(SqliteSynchronous::Normal),
    )
    .await?;
    sqlx::migrate!("./task-store/migrations/sqlite")
        .run(&pool)
        .await?;
    for t in tasks {
        let json = |v: &Option<Value>| v.as_ref().map(Value::to_string);
        sqlx::query(
            "INSERT INTO tasks (id, title, description, status, command, requirements, input, \
             output, exit_code, error, created_at, updated_at) \
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(&t.id)
        .bind(&t.title)
        .bind(&t.description)
        .bind(t.status)
        .bind(json(&t.command))
        .bind(t.requirements.to_string())
        .bind(json(&t.input))
        .bind(json(&t.output))
        .bind(t.exit_code)
        .bind(&t.error)
        .bind(t.created_at)
        .bind(t.updated_at)
        .execute(&pool)
        .await?;
        for (at, (stream, text)) in t.logs.iter().enumerate() {
            sqlx::query(
                "INSERT INTO task_logs (task_id, seq, stream, at, text) \
                 SELECT ?, COALESCE(MAX(seq), 0) + 1, ?, ?, ? FROM task_logs WHERE task_id = ?",
            )
            .bind(&t.id)
            .bind(*stream)
            .bind(t.created_at + at as i64)
            .bind(text)
            .bind(&t.id)
            .execute(&pool)
            .await?;
        }
    }
    pool.close().await;
    Ok(())
}

/// The `_sqlx_migrations` rows: version, description, success, checksum.
async fn migrations(file: &Path) -> Result<Vec<(i64, String, bool, Vec<u8>)>> {
    let pool = SqlitePool::connect_with(SqliteConnectOptions::new().filename(file)).await?;
    let rows = sqlx::query_as(
        "SELECT version, description, success, checksum FROM _sqlx_migrations ORDER BY version",
    )
    .fetch_all(&pool)
    .await?;
    pool.close().await;
    Ok(rows)
}

#[tokio::test]
async fn a_task_file_written_by_the_sqlx_backend_reads_back_whole() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let data_dir = dir.path().join("cocoon");
    let tasks = old_tasks();
    write_old_file(&data_dir, &tasks).await?;
    let file = data_dir.join("tasks.db");
    let recorded = migrations(&file).await?;
    ensure!(
        !recorded.is_empty(),
        "the old migrator recorded its migrations"
    );

    let hub = Hub::start().await?;
    let alice = Api::login(&hub.url, &hub.add_user("alice")?).await?;
    let mut cocoon = Cocoon::start_in(
        &hub.url,
        "old-file",
        Some(&alice.setup_token(60).await?),
        &data_dir,
        &[],
    )?;
    let device = cocoon.device_id().await?;

    // Every task, page by page, newest first, every field as stored.
    let mut read = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let mut path = format!("/api/cocoons/{device}/tasks?limit={PAGE}");
        if let Some(c) = &cursor {
            path.push_str(&format!("&cursor={c}"));
        }
        let (status, page) = alice.get(&path).await?;
        ensure!(status == 200, "listing: {status} {page}");
        read.extend(page["tasks"].as_array().cloned().unwrap_or_default());
        match page["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_owned()),
            None => break,
        }
        ensure!(read.len() <= TASKS, "more tasks than were written");
    }
    let mut want: Vec<&OldTask> = tasks.iter().collect();
    want.sort_by(|a, b| (b.created_at, &b.id).cmp(&(a.created_at, &a.id)));
    let read_ids: Vec<&str> = read.iter().filter_map(|t| t["id"].as_str()).collect();
    let want_ids: Vec<&str> = want.iter().map(|t| t.id.as_str()).collect();
    ensure!(read_ids == want_ids, "every task once, newest first");
    let by_id: HashMap<&str, &Value> = read_ids.iter().copied().zip(read.iter()).collect();
    for t in &tasks {
        let got = by_id.get(t.id.as_str()).context("task missing")?;
        let opt = |v: &Option<Value>| v.clone().unwrap_or(Value::Null);
        let expected = [
            ("title", json!(t.title)),
            ("description", json!(t.description)),
            ("status", json!(t.status)),
            ("command", opt(&t.command)),
            // An empty list is left out of the JSON.
            (
                "requirements",
                Some(t.requirements.clone())
                    .filter(|r| r != &json!([]))
                    .unwrap_or(Value::Null),
            ),
            ("input", opt(&t.input)),
            ("output", opt(&t.output)),
            ("exit_code", json!(t.exit_code)),
            ("error", json!(t.error)),
            ("created_at", json!(t.created_at)),
            ("updated_at", json!(t.updated_at)),
        ];
        for (field, value) in expected {
            if got.get(field).cloned().unwrap_or(Value::Null) != value {
                bail!("task {} field {field}: {} != {value}", t.id, got[field]);
            }
        }
    }

    // Every log line of a few tasks, in order.
    for t in tasks.iter().filter(|t| !t.logs.is_empty()).take(5) {
        let (status, logs) = alice
            .get(&format!("/api/cocoons/{device}/tasks/{}/logs", t.id))
            .await?;
        ensure!(status == 200, "logs: {status} {logs}");
        let lines: Vec<(String, String, u64)> = logs["lines"]
            .as_array()
            .cloned()
            .unwrap_or_default()
            .iter()
            .map(|l| {
                (
                    l["stream"].as_str().unwrap_or_default().to_owned(),
                    l["text"].as_str().unwrap_or_default().to_owned(),
                    l["seq"].as_u64().unwrap_or_default(),
                )
            })
            .collect();
        let want: Vec<(String, String, u64)> = t
            .logs
            .iter()
            .zip(1..)
            .map(|((s, text), seq)| ((*s).to_owned(), text.clone(), seq))
            .collect();
        ensure!(lines == want, "logs of {}: {lines:?}", t.id);
    }

    // The file goes on: a new task is newest, and the migrations are as recorded.
    let (status, created) = alice
        .post(
            &format!("/api/cocoons/{device}/tasks"),
            json!({ "title": "written by today's backend" }),
        )
        .await?;
    ensure!(status == 201, "create: {status} {created}");
    let (_, first) = alice
        .get(&format!("/api/cocoons/{device}/tasks?limit=1"))
        .await?;
    ensure!(
        first["tasks"][0]["id"] == created["id"],
        "the new task is listed first: {first}"
    );
    cocoon.proc.terminate().await?;
    ensure!(
        migrations(&file).await? == recorded,
        "_sqlx_migrations is left as the old backend wrote it"
    );
    Ok(())
}
