//! The task store conformance suite: every [`TaskStore`] behaviour the cocoon and the
//! hub rely on, written once against `Arc<dyn TaskStore>` and run against both backends.
//!
//! SQLite runs on a real file in a temporary directory, PostgreSQL on a fresh database
//! per test, both from `adi_storage::test_database`, which also says what happens when
//! the PostgreSQL server is unreachable (a failure in CI, a loud skip elsewhere).

use std::collections::HashSet;
use std::future::Future;
use std::sync::Arc;

use adi_protocol::tasks::{LogStream, NewTask, Position, Task, TaskFilter, TaskId, TaskStatus};
use adi_storage::conformance::run_then_close;
use adi_storage::test_database::{read_only_write_error, with_postgres, TestSqlite};
use serde_json::json;

use crate::{
    PgTaskStore, SqliteTaskStore, StoreError, TaskStore, TaskUpdate, MAX_LOG_PAGE, MAX_PAGE,
};

/// The suite's name in the line that says a PostgreSQL test was skipped.
const SUITE: &str = "task store";

/// The reason `fail_interrupted` records.
const INTERRUPTED: &str = "interrupted: the device restarted while it ran";

// ---------------------------------------------------------------------------------------
// Harnesses
// ---------------------------------------------------------------------------------------

/// Runs `test` against a fresh SQLite task file.
async fn on_sqlite<F, Fut>(test: F)
where
    F: FnOnce(Arc<dyn TaskStore>) -> Fut,
    Fut: Future<Output = ()>,
{
    // A nested path, so `open` has to create the parent directories.
    let file = TestSqlite::new("data/tasks.db");
    let store = SqliteTaskStore::open(file.path())
        .await
        .expect("open SQLite task store");
    run_then_close(
        Arc::new(store),
        |s| test(s),
        |s| async move { s.close().await },
    )
    .await;
}

/// Runs `test` against a PostgreSQL task store in a fresh database, then drops it.
async fn on_postgres<F, Fut>(test: F)
where
    F: FnOnce(Arc<dyn TaskStore>) -> Fut,
    Fut: Future<Output = ()>,
{
    with_postgres(SUITE, |options| async move {
        let store = PgTaskStore::connect_with(options)
            .await
            .expect("connect PostgreSQL task store");
        run_then_close(
            Arc::new(store),
            |s| test(s),
            |s| async move { s.close().await },
        )
        .await;
    })
    .await;
}

adi_storage::conformance_tests!(
    create_and_get_round_trip_every_field,
    minimal_task_round_trips,
    create_trims_and_validates_title,
    get_unknown_is_none,
    list_is_newest_first,
    list_limit_is_validated_and_capped,
    pagination_visits_every_task_once_in_order,
    pagination_is_stable_while_tasks_are_added,
    position_compares_id_within_one_instant,
    filter_by_status,
    filter_by_text_matches_title_or_description_ignoring_case,
    filter_by_creation_window,
    filters_combine_and_paginate,
    like_wildcards_in_search_text_are_literal,
    stats_count_every_status,
    legal_transitions_are_applied,
    final_tasks_refuse_every_update,
    illegal_transitions_leave_the_task_unchanged,
    update_records_fields_and_bumps_updated_at,
    update_with_bad_title_is_invalid,
    unknown_task_is_not_found,
    delete_removes_task_and_logs,
    append_log_numbers_lines_from_one,
    concurrent_appends_get_distinct_gapless_sequence,
    read_logs_pages_by_sequence,
    log_text_round_trips_and_nul_is_replaced,
    fail_interrupted_fails_running_tasks_once,
    created_at_strictly_increases_over_rapid_creates,
    created_at_is_unique_under_concurrent_creates,
);

// ---------------------------------------------------------------------------------------
// Fixtures
// ---------------------------------------------------------------------------------------

fn titled(title: &str) -> NewTask {
    NewTask {
        title: title.to_owned(),
        ..NewTask::default()
    }
}

async fn create(s: &dyn TaskStore, title: &str) -> Task {
    s.create(titled(title)).await.expect("create task")
}

async fn create_described(s: &dyn TaskStore, title: &str, description: &str) -> Task {
    s.create(NewTask {
        title: title.to_owned(),
        description: description.to_owned(),
        ..NewTask::default()
    })
    .await
    .expect("create task")
}

async fn get(s: &dyn TaskStore, id: TaskId) -> Task {
    s.get(id).await.expect("get").expect("the task exists")
}

async fn set_status(s: &dyn TaskStore, id: TaskId, status: TaskStatus) -> Task {
    s.update(
        id,
        TaskUpdate {
            status: Some(status),
            ..TaskUpdate::default()
        },
    )
    .await
    .unwrap_or_else(|e| panic!("set {id} to {status}: {e}"))
}

fn status_update(status: TaskStatus) -> TaskUpdate {
    TaskUpdate {
        status: Some(status),
        ..TaskUpdate::default()
    }
}

fn position(t: &Task) -> Position {
    Position {
        created_at: t.created_at,
        id: t.id,
    }
}

/// Every task matching `filter`, page by page with `limit`, in the order listed.
async fn list_all(s: &dyn TaskStore, filter: &TaskFilter, limit: u32) -> Vec<Task> {
    let mut all = Vec::new();
    let mut after = None;
    loop {
        let page = s.list(filter, after, limit).await.expect("list");
        assert!(page.tasks.len() <= limit as usize, "page over its limit");
        if page.next.is_some() {
            assert_eq!(page.tasks.len(), limit as usize, "next only on full pages");
            assert_eq!(page.next, page.tasks.last().map(position));
        }
        all.extend(page.tasks);
        match page.next {
            Some(next) => after = Some(next),
            None => return all,
        }
    }
}

fn ids(tasks: &[Task]) -> Vec<TaskId> {
    tasks.iter().map(|t| t.id).collect()
}

/// `ids` newest first.
fn newest_first(tasks: &[Task]) -> Vec<TaskId> {
    tasks.iter().rev().map(|t| t.id).collect()
}

fn micros_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock after 1970")
        .as_micros()
        .try_into()
        .expect("microseconds fit i64")
}

fn text_filter(text: &str) -> TaskFilter {
    TaskFilter {
        text: Some(text.to_owned()),
        ..TaskFilter::default()
    }
}

async fn titles_matching(s: &dyn TaskStore, filter: &TaskFilter) -> Vec<String> {
    let mut titles: Vec<String> = list_all(s, filter, 100)
        .await
        .into_iter()
        .map(|t| t.title)
        .collect();
    titles.sort();
    titles
}

// ---------------------------------------------------------------------------------------
// The suite: create and get
// ---------------------------------------------------------------------------------------

async fn create_and_get_round_trip_every_field(s: Arc<dyn TaskStore>) {
    let new = NewTask {
        title: "Train the model".into(),
        description: "Épochs: 3 — with \"quotes\", 'apostrophes' and\nnewlines 🚀".into(),
        command: Some(vec![
            "python3".into(),
            "train.py".into(),
            "--lr=0.001".into(),
            "a b c".into(),
            String::new(),
        ]),
        requirements: vec!["gpu".into(), "disk:20G".into()],
        input: Some(json!({
            "dataset": "s3://bucket/path",
            "epochs": 3,
            "ratio": 0.25,
            "big": 9_007_199_254_740_993_i64,
            "nested": {"list": [1, "two", null, true, {"x": []}]},
            "unicode": "日本語 \u{0000} nul inside JSON is fine",
        })),
    };
    let before = micros_now();
    let created = s.create(new.clone()).await.expect("create");
    let after = micros_now();

    assert_eq!(created.title, new.title);
    assert_eq!(created.description, new.description);
    assert_eq!(created.status, TaskStatus::Pending);
    assert_eq!(created.command, new.command);
    assert_eq!(created.requirements, new.requirements);
    assert_eq!(created.input, new.input);
    assert_eq!(created.output, None);
    assert_eq!(created.exit_code, None);
    assert_eq!(created.error, None);
    assert_eq!(created.device_id, None, "the cocoon sets the device id");
    assert_eq!(created.id.0.get_version_num(), 4, "task ids are uuid v4");
    assert!(
        (before..=after).contains(&created.created_at),
        "created_at {} is now ({before}..={after}), in microseconds",
        created.created_at
    );
    assert_eq!(created.updated_at, created.created_at);

    let stored = get(&*s, created.id).await;
    assert_eq!(stored, created, "what create returns is what get returns");
}

async fn minimal_task_round_trips(s: Arc<dyn TaskStore>) {
    let created = create(&*s, "bare").await;
    assert_eq!(created.description, "");
    assert_eq!(created.command, None);
    assert!(created.requirements.is_empty());
    assert_eq!(created.input, None);
    assert_eq!(get(&*s, created.id).await, created);

    // An explicit JSON null input is kept apart from no input at all; an empty
    // command is kept apart from none.
    let with_null = s
        .create(NewTask {
            title: "null input".into(),
            input: Some(serde_json::Value::Null),
            command: Some(Vec::new()),
            ..NewTask::default()
        })
        .await
        .expect("create");
    let stored = get(&*s, with_null.id).await;
    assert_eq!(stored.input, Some(serde_json::Value::Null));
    assert_eq!(stored.command, Some(Vec::new()));
    assert_eq!(stored, with_null);
}

async fn create_trims_and_validates_title(s: Arc<dyn TaskStore>) {
    for bad in ["", "   ", "\t\n "] {
        let err = s.create(titled(bad)).await.expect_err("empty title");
        assert!(
            matches!(err, StoreError::Invalid(_)),
            "{bad:?}: got {err:?}"
        );
    }
    let too_long = "x".repeat(201);
    let err = s.create(titled(&too_long)).await.expect_err("201 chars");
    assert!(matches!(err, StoreError::Invalid(_)), "got {err:?}");
    let err = s
        .create(titled("nul\0inside"))
        .await
        .expect_err("NUL in title");
    assert!(matches!(err, StoreError::Invalid(_)), "got {err:?}");
    let err = s
        .create(NewTask {
            title: "ok".into(),
            description: "nul\0inside".into(),
            ..NewTask::default()
        })
        .await
        .expect_err("NUL in description");
    assert!(matches!(err, StoreError::Invalid(_)), "got {err:?}");
    assert_eq!(s.stats().await.expect("stats").total, 0, "nothing stored");

    // 200 characters is fine even when they are several bytes each.
    let longest = "é".repeat(200);
    let task = create(&*s, &longest).await;
    assert_eq!(task.title, longest);
    // Surrounding whitespace is not part of the title, nor of its length.
    let padded = format!("  {}  ", "y".repeat(200));
    let task = create(&*s, &padded).await;
    assert_eq!(task.title, "y".repeat(200));
    assert_eq!(get(&*s, task.id).await.title, "y".repeat(200));
}

async fn get_unknown_is_none(s: Arc<dyn TaskStore>) {
    create(&*s, "someone else").await;
    assert_eq!(s.get(TaskId::new()).await.expect("get"), None);
}

// ---------------------------------------------------------------------------------------
// Listing and pagination
// ---------------------------------------------------------------------------------------

async fn list_is_newest_first(s: Arc<dyn TaskStore>) {
    let empty = s
        .list(&TaskFilter::default(), None, 10)
        .await
        .expect("list");
    assert!(empty.tasks.is_empty());
    assert_eq!(empty.next, None);

    let mut created = Vec::new();
    for i in 0..5 {
        created.push(create(&*s, &format!("task {i}")).await);
    }
    let page = s
        .list(&TaskFilter::default(), None, 10)
        .await
        .expect("list");
    assert_eq!(ids(&page.tasks), newest_first(&created));
    assert_eq!(page.next, None, "a page that is not full has no next");
    assert_eq!(page.tasks[0], created[4], "listed tasks carry every field");

    let full = s.list(&TaskFilter::default(), None, 5).await.expect("list");
    assert_eq!(ids(&full.tasks), newest_first(&created));
    assert_eq!(
        full.next,
        Some(position(&created[0])),
        "a full page may have more"
    );
    let rest = s
        .list(&TaskFilter::default(), full.next, 5)
        .await
        .expect("list");
    assert!(rest.tasks.is_empty());
    assert_eq!(rest.next, None);
}

async fn list_limit_is_validated_and_capped(s: Arc<dyn TaskStore>) {
    let err = s
        .list(&TaskFilter::default(), None, 0)
        .await
        .expect_err("limit 0");
    assert!(matches!(err, StoreError::Invalid(_)), "got {err:?}");

    for i in 0..(MAX_PAGE + 3) {
        create(&*s, &format!("task {i}")).await;
    }
    let page = s
        .list(&TaskFilter::default(), None, u32::MAX)
        .await
        .expect("list");
    assert_eq!(page.tasks.len(), MAX_PAGE as usize, "capped at MAX_PAGE");
    assert_eq!(page.next, page.tasks.last().map(position));
    let rest = s
        .list(&TaskFilter::default(), page.next, u32::MAX)
        .await
        .expect("list");
    assert_eq!(rest.tasks.len(), 3);
    assert_eq!(rest.next, None);
}

async fn pagination_visits_every_task_once_in_order(s: Arc<dyn TaskStore>) {
    let mut created = Vec::new();
    for i in 0..1000 {
        created.push(create(&*s, &format!("task {i}")).await);
    }
    let mut pages = 0;
    let mut seen = Vec::new();
    let mut after = None;
    loop {
        let page = s
            .list(&TaskFilter::default(), after, 37)
            .await
            .expect("list");
        pages += 1;
        seen.extend(ids(&page.tasks));
        match page.next {
            Some(next) => after = Some(next),
            None => break,
        }
    }
    assert_eq!(
        pages, 28,
        "1000 tasks make 27 full pages of 37 and one of 1"
    );
    assert_eq!(seen.len(), 1000);
    assert_eq!(seen, newest_first(&created), "each task once, newest first");
}

async fn pagination_is_stable_while_tasks_are_added(s: Arc<dyn TaskStore>) {
    let mut existing = Vec::new();
    for i in 0..100 {
        existing.push(create(&*s, &format!("old {i}")).await);
    }
    let mut added = HashSet::new();
    let mut seen = Vec::new();
    let mut after = None;
    let mut round = 0;
    loop {
        let page = s
            .list(&TaskFilter::default(), after, 7)
            .await
            .expect("list");
        seen.extend(ids(&page.tasks));
        // New tasks land between page fetches.
        for j in 0..3 {
            added.insert(create(&*s, &format!("new {round}.{j}")).await.id);
        }
        round += 1;
        match page.next {
            Some(next) => after = Some(next),
            None => break,
        }
    }
    assert!(
        seen.iter().all(|id| !added.contains(id)),
        "tasks added after the first page never show up in later pages"
    );
    assert_eq!(
        seen,
        newest_first(&existing),
        "no duplicates, nothing skipped, newest first"
    );
}

async fn position_compares_id_within_one_instant(s: Arc<dyn TaskStore>) {
    let older = create(&*s, "older").await;
    let task = create(&*s, "middle").await;
    create(&*s, "newer").await;
    let all = TaskFilter::default();
    // A position at the task's instant with a larger id: the task comes after it.
    let above = Position {
        created_at: task.created_at,
        id: TaskId(uuid::Uuid::max()),
    };
    let page = s.list(&all, Some(above), 10).await.expect("list");
    assert_eq!(ids(&page.tasks), vec![task.id, older.id]);
    // With a smaller id: the task is before it, only older ones follow.
    let below = Position {
        created_at: task.created_at,
        id: TaskId(uuid::Uuid::nil()),
    };
    let page = s.list(&all, Some(below), 10).await.expect("list");
    assert_eq!(ids(&page.tasks), vec![older.id]);
    // Exactly at the task: strictly after it.
    let page = s.list(&all, Some(position(&task)), 10).await.expect("list");
    assert_eq!(ids(&page.tasks), vec![older.id]);
}

async fn filter_by_status(s: Arc<dyn TaskStore>) {
    let a = create(&*s, "a").await;
    let b = create(&*s, "b").await;
    let c = create(&*s, "c").await;
    let d = create(&*s, "d").await;
    set_status(&*s, b.id, TaskStatus::Running).await;
    set_status(&*s, d.id, TaskStatus::Running).await;
    set_status(&*s, c.id, TaskStatus::Cancelled).await;

    let only = |status| TaskFilter {
        status: Some(status),
        ..TaskFilter::default()
    };
    assert_eq!(
        ids(&list_all(&*s, &only(TaskStatus::Running), 10).await),
        vec![d.id, b.id]
    );
    assert_eq!(
        ids(&list_all(&*s, &only(TaskStatus::Pending), 10).await),
        vec![a.id]
    );
    assert_eq!(
        ids(&list_all(&*s, &only(TaskStatus::Cancelled), 10).await),
        vec![c.id]
    );
    assert!(list_all(&*s, &only(TaskStatus::Failed), 10)
        .await
        .is_empty());
}

async fn filter_by_text_matches_title_or_description_ignoring_case(s: Arc<dyn TaskStore>) {
    create_described(&*s, "Build the Kernel", "").await;
    create_described(&*s, "deploy", "after the kernel BUILD").await;
    create_described(&*s, "unrelated", "nothing here").await;
    create_described(&*s, "KERNEL panic", "debug it").await;

    assert_eq!(
        titles_matching(&*s, &text_filter("kernel")).await,
        ["Build the Kernel", "KERNEL panic", "deploy"]
    );
    assert_eq!(
        titles_matching(&*s, &text_filter("BUILD")).await,
        ["Build the Kernel", "deploy"]
    );
    assert_eq!(
        titles_matching(&*s, &text_filter("the kernel b")).await,
        ["deploy"],
        "substring across words, in the description"
    );
    assert!(titles_matching(&*s, &text_filter("absent"))
        .await
        .is_empty());
    assert_eq!(
        titles_matching(&*s, &text_filter("")).await.len(),
        4,
        "empty text filters nothing"
    );
}

async fn filter_by_creation_window(s: Arc<dyn TaskStore>) {
    let mut created = Vec::new();
    for i in 0..5 {
        created.push(create(&*s, &format!("task {i}")).await);
    }
    let window = |from: Option<i64>, to: Option<i64>| TaskFilter {
        created_from: from,
        created_to: to,
        ..TaskFilter::default()
    };
    let t = |i: usize| created[i].created_at;

    let from = list_all(&*s, &window(Some(t(2)), None), 10).await;
    assert_eq!(ids(&from), newest_first(&created[2..]), "from is inclusive");
    let to = list_all(&*s, &window(None, Some(t(2))), 10).await;
    assert_eq!(ids(&to), newest_first(&created[..2]), "to is exclusive");
    let both = list_all(&*s, &window(Some(t(1)), Some(t(4))), 10).await;
    assert_eq!(ids(&both), newest_first(&created[1..4]));
    let empty = list_all(&*s, &window(Some(t(3)), Some(t(3))), 10).await;
    assert!(empty.is_empty(), "an empty window matches nothing");
    let inverted = list_all(&*s, &window(Some(t(4)), Some(t(1))), 10).await;
    assert!(inverted.is_empty(), "an inverted window matches nothing");
}

async fn filters_combine_and_paginate(s: Arc<dyn TaskStore>) {
    let mut expected = Vec::new();
    let mut first_match_at = None;
    for i in 0..30 {
        let title = if i % 3 == 0 {
            format!("Report {i}")
        } else {
            format!("chore {i}")
        };
        let task = create(&*s, &title).await;
        if i % 2 == 0 {
            set_status(&*s, task.id, TaskStatus::Running).await;
        }
        // Matches: a report, running, created at or after the 6th task.
        if i >= 6 && i % 3 == 0 && i % 2 == 0 {
            expected.push(task.clone());
        }
        if i == 6 {
            first_match_at = Some(task.created_at);
        }
    }
    let filter = TaskFilter {
        status: Some(TaskStatus::Running),
        text: Some("rEpOrT".into()),
        created_from: first_match_at,
        created_to: None,
    };
    let found = list_all(&*s, &filter, 2).await;
    assert_eq!(ids(&found), newest_first(&expected));
    assert_eq!(found.len(), 4, "reports 6, 12, 18, 24");
    assert!(found.iter().all(|t| t.status == TaskStatus::Running));

    let to = TaskFilter {
        created_to: Some(expected[2].created_at),
        ..filter
    };
    assert_eq!(
        ids(&list_all(&*s, &to, 1).await),
        newest_first(&expected[..2])
    );
}

async fn like_wildcards_in_search_text_are_literal(s: Arc<dyn TaskStore>) {
    for title in [
        "100% done",
        "1000 done",
        "snake_case",
        "snakeXcase",
        "back\\slash",
        "backslash",
        "b%_\\",
    ] {
        create(&*s, title).await;
    }
    assert_eq!(
        titles_matching(&*s, &text_filter("%")).await,
        ["100% done", "b%_\\"]
    );
    assert_eq!(
        titles_matching(&*s, &text_filter("0% d")).await,
        ["100% done"]
    );
    assert_eq!(
        titles_matching(&*s, &text_filter("_")).await,
        ["b%_\\", "snake_case"]
    );
    assert_eq!(
        titles_matching(&*s, &text_filter("e_c")).await,
        ["snake_case"]
    );
    assert_eq!(
        titles_matching(&*s, &text_filter("\\")).await,
        ["b%_\\", "back\\slash"]
    );
    assert_eq!(titles_matching(&*s, &text_filter("%_\\")).await, ["b%_\\"]);
    assert!(titles_matching(&*s, &text_filter("%%")).await.is_empty());
}

async fn stats_count_every_status(s: Arc<dyn TaskStore>) {
    let stats = s.stats().await.expect("stats");
    assert_eq!(stats.total, 0);
    assert_eq!(stats.by_status.len(), TaskStatus::ALL.len());
    assert!(stats.by_status.values().all(|n| *n == 0));

    let mut tasks = Vec::new();
    for i in 0..7 {
        tasks.push(create(&*s, &format!("task {i}")).await);
    }
    set_status(&*s, tasks[0].id, TaskStatus::Running).await;
    set_status(&*s, tasks[1].id, TaskStatus::Running).await;
    set_status(&*s, tasks[1].id, TaskStatus::Completed).await;
    set_status(&*s, tasks[2].id, TaskStatus::Failed).await;
    set_status(&*s, tasks[3].id, TaskStatus::Failed).await;
    set_status(&*s, tasks[4].id, TaskStatus::Cancelled).await;

    let stats = s.stats().await.expect("stats");
    let count = |st| stats.by_status.get(&st).copied();
    assert_eq!(count(TaskStatus::Pending), Some(2));
    assert_eq!(count(TaskStatus::Running), Some(1));
    assert_eq!(count(TaskStatus::Completed), Some(1));
    assert_eq!(count(TaskStatus::Failed), Some(2));
    assert_eq!(count(TaskStatus::Cancelled), Some(1));
    assert_eq!(stats.total, 7);
}

// ---------------------------------------------------------------------------------------
// Updates and transitions
// ---------------------------------------------------------------------------------------

async fn legal_transitions_are_applied(s: Arc<dyn TaskStore>) {
    let task = create(&*s, "run me").await;
    let running = set_status(&*s, task.id, TaskStatus::Running).await;
    assert_eq!(running.status, TaskStatus::Running);
    assert_eq!(
        get(&*s, task.id).await,
        running,
        "update returns the stored task"
    );
    // Asking for the current status is a no-op, not an error.
    let still = set_status(&*s, task.id, TaskStatus::Running).await;
    assert_eq!(still.status, TaskStatus::Running);
    let done = set_status(&*s, task.id, TaskStatus::Completed).await;
    assert_eq!(done.status, TaskStatus::Completed);
    assert_eq!(get(&*s, task.id).await, done);

    let pending = create(&*s, "cancel me").await;
    let cancelled = set_status(&*s, pending.id, TaskStatus::Cancelled).await;
    assert_eq!(cancelled.status, TaskStatus::Cancelled);

    let direct = create(&*s, "done without running").await;
    assert_eq!(
        set_status(&*s, direct.id, TaskStatus::Completed)
            .await
            .status,
        TaskStatus::Completed
    );
    let failing = create(&*s, "fails while running").await;
    set_status(&*s, failing.id, TaskStatus::Running).await;
    assert_eq!(
        set_status(&*s, failing.id, TaskStatus::Failed).await.status,
        TaskStatus::Failed
    );
}

async fn final_tasks_refuse_every_update(s: Arc<dyn TaskStore>) {
    for final_status in [
        TaskStatus::Completed,
        TaskStatus::Failed,
        TaskStatus::Cancelled,
    ] {
        let task = create(&*s, "finish me").await;
        set_status(&*s, task.id, TaskStatus::Running).await;
        let finished = set_status(&*s, task.id, final_status).await;

        let err = s
            .update(task.id, status_update(TaskStatus::Running))
            .await
            .expect_err("a final task does not run again");
        match err {
            StoreError::InvalidTransition { id, from, to } => {
                assert_eq!((id, from, to), (task.id, final_status, TaskStatus::Running));
            }
            other => panic!("expected InvalidTransition, got {other:?}"),
        }
        let err = s
            .update(task.id, status_update(final_status))
            .await
            .expect_err("not even to the same status");
        assert!(
            matches!(err, StoreError::InvalidTransition { .. }),
            "got {err:?}"
        );
        let err = s
            .update(
                task.id,
                TaskUpdate {
                    title: Some("renamed".into()),
                    output: Some(json!(1)),
                    ..TaskUpdate::default()
                },
            )
            .await
            .expect_err("nor any other field");
        match err {
            StoreError::InvalidTransition { from, to, .. } => {
                assert_eq!((from, to), (final_status, final_status));
            }
            other => panic!("expected InvalidTransition, got {other:?}"),
        }
        assert_eq!(get(&*s, task.id).await, finished, "the row is unchanged");
    }
}

async fn illegal_transitions_leave_the_task_unchanged(s: Arc<dyn TaskStore>) {
    let task = create(&*s, "no way back").await;
    let running = set_status(&*s, task.id, TaskStatus::Running).await;
    let err = s
        .update(
            task.id,
            TaskUpdate {
                status: Some(TaskStatus::Pending),
                title: Some("changed".into()),
                exit_code: Some(9),
                ..TaskUpdate::default()
            },
        )
        .await
        .expect_err("running -> pending");
    match err {
        StoreError::InvalidTransition { id, from, to } => {
            assert_eq!(
                (id, from, to),
                (task.id, TaskStatus::Running, TaskStatus::Pending)
            );
        }
        other => panic!("expected InvalidTransition, got {other:?}"),
    }
    assert_eq!(
        get(&*s, task.id).await,
        running,
        "nothing of the refused update was applied"
    );
}

async fn update_records_fields_and_bumps_updated_at(s: Arc<dyn TaskStore>) {
    let task = create(&*s, "original").await;
    let updated = s
        .update(
            task.id,
            TaskUpdate {
                status: Some(TaskStatus::Running),
                title: Some("  renamed  ".into()),
                description: Some("now described".into()),
                output: Some(json!({"rows": 42, "files": ["a", "b"]})),
                exit_code: Some(-1),
                error: Some("partial".into()),
            },
        )
        .await
        .expect("update");
    assert_eq!(updated.status, TaskStatus::Running);
    assert_eq!(updated.title, "renamed");
    assert_eq!(updated.description, "now described");
    assert_eq!(
        updated.output,
        Some(json!({"rows": 42, "files": ["a", "b"]}))
    );
    assert_eq!(updated.exit_code, Some(-1));
    assert_eq!(updated.error, Some("partial".into()));
    assert_eq!(
        updated.created_at, task.created_at,
        "created_at never moves"
    );
    assert!(updated.updated_at >= task.updated_at);
    assert_eq!(updated.device_id, None);
    assert_eq!(get(&*s, task.id).await, updated);

    // An empty update changes nothing but updated_at, which never goes back.
    let touched = s
        .update(task.id, TaskUpdate::default())
        .await
        .expect("empty update");
    assert!(touched.updated_at >= updated.updated_at);
    assert_eq!(
        Task {
            updated_at: updated.updated_at,
            ..touched.clone()
        },
        updated
    );
    assert_eq!(get(&*s, task.id).await, touched);
}

async fn update_with_bad_title_is_invalid(s: Arc<dyn TaskStore>) {
    let task = create(&*s, "keep me").await;
    for bad in ["  ".to_owned(), "z".repeat(201)] {
        let err = s
            .update(
                task.id,
                TaskUpdate {
                    title: Some(bad),
                    status: Some(TaskStatus::Running),
                    ..TaskUpdate::default()
                },
            )
            .await
            .expect_err("bad title");
        assert!(matches!(err, StoreError::Invalid(_)), "got {err:?}");
    }
    assert_eq!(get(&*s, task.id).await, task, "unchanged, status included");
}

async fn unknown_task_is_not_found(s: Arc<dyn TaskStore>) {
    create(&*s, "someone else").await;
    let ghost = TaskId::new();
    let err = s
        .update(ghost, status_update(TaskStatus::Running))
        .await
        .expect_err("update unknown");
    assert!(
        matches!(err, StoreError::NotFound(id) if id == ghost),
        "got {err:?}"
    );
    let err = s
        .append_log(ghost, LogStream::Stdout, "hello")
        .await
        .expect_err("append to unknown");
    assert!(
        matches!(err, StoreError::NotFound(id) if id == ghost),
        "got {err:?}"
    );
    let err = s.read_logs(ghost, 0, 10).await.expect_err("read unknown");
    assert!(
        matches!(err, StoreError::NotFound(id) if id == ghost),
        "got {err:?}"
    );
    let err = s
        .read_logs(ghost, 0, 0)
        .await
        .expect_err("read unknown, limit 0");
    assert!(matches!(err, StoreError::NotFound(_)), "got {err:?}");
    assert!(!s.delete(ghost).await.expect("delete unknown"));
}

async fn delete_removes_task_and_logs(s: Arc<dyn TaskStore>) {
    let doomed = create(&*s, "doomed").await;
    let kept = create(&*s, "kept").await;
    for i in 0..3 {
        s.append_log(doomed.id, LogStream::Stdout, &format!("doomed {i}"))
            .await
            .expect("append");
        s.append_log(kept.id, LogStream::Stdout, &format!("kept {i}"))
            .await
            .expect("append");
    }
    assert!(s.delete(doomed.id).await.expect("delete"));
    assert_eq!(s.get(doomed.id).await.expect("get"), None);
    let err = s
        .read_logs(doomed.id, 0, 10)
        .await
        .expect_err("its logs are gone with it");
    assert!(matches!(err, StoreError::NotFound(_)), "got {err:?}");
    assert!(!s.delete(doomed.id).await.expect("second delete"));
    assert_eq!(s.read_logs(kept.id, 0, 10).await.expect("read").len(), 3);
    assert_eq!(s.stats().await.expect("stats").total, 1);
    assert_eq!(
        ids(&list_all(&*s, &TaskFilter::default(), 10).await),
        vec![kept.id]
    );

    // A new task can never pick up the deleted task's log lines.
    let fresh = create(&*s, "fresh").await;
    assert!(s.read_logs(fresh.id, 0, 10).await.expect("read").is_empty());
    assert_eq!(
        s.append_log(fresh.id, LogStream::System, "first")
            .await
            .expect("append"),
        1
    );
}

// ---------------------------------------------------------------------------------------
// Logs
// ---------------------------------------------------------------------------------------

async fn append_log_numbers_lines_from_one(s: Arc<dyn TaskStore>) {
    let a = create(&*s, "a").await;
    let b = create(&*s, "b").await;
    assert!(s.read_logs(a.id, 0, 10).await.expect("read").is_empty());
    assert_eq!(
        s.append_log(a.id, LogStream::Stdout, "a1")
            .await
            .expect("append"),
        1
    );
    assert_eq!(
        s.append_log(a.id, LogStream::Stderr, "a2")
            .await
            .expect("append"),
        2
    );
    assert_eq!(
        s.append_log(b.id, LogStream::System, "b1")
            .await
            .expect("append"),
        1,
        "each task counts from 1"
    );
    assert_eq!(
        s.append_log(a.id, LogStream::System, "a3")
            .await
            .expect("append"),
        3
    );
    // Logs do not depend on the task's status: a finished task's log can still grow
    // (the runner's last line lands after the final status only by mistake, but it
    // must not be lost).
    set_status(&*s, b.id, TaskStatus::Completed).await;
    assert_eq!(
        s.append_log(b.id, LogStream::System, "b2")
            .await
            .expect("append"),
        2
    );
}

async fn concurrent_appends_get_distinct_gapless_sequence(s: Arc<dyn TaskStore>) {
    let task = create(&*s, "noisy").await;
    let workers: Vec<_> = (0..8)
        .map(|w| {
            let s = s.clone();
            tokio::spawn(async move {
                let mut seqs = Vec::new();
                for i in 0..50 {
                    let seq = s
                        .append_log(task.id, LogStream::Stdout, &format!("w{w} line {i}"))
                        .await
                        .expect("append");
                    seqs.push(seq);
                }
                seqs
            })
        })
        .collect();
    let mut all = Vec::new();
    for worker in workers {
        let seqs = worker.await.expect("worker");
        assert!(
            seqs.windows(2).all(|p| p[0] < p[1]),
            "one writer's lines are numbered in the order it wrote them"
        );
        all.extend(seqs);
    }
    all.sort_unstable();
    assert_eq!(all, (1..=400).collect::<Vec<u64>>(), "exactly 1..=400");

    let lines = s.read_logs(task.id, 0, MAX_LOG_PAGE).await.expect("read");
    assert_eq!(
        lines.iter().map(|l| l.seq).collect::<Vec<_>>(),
        (1..=400).collect::<Vec<u64>>()
    );
    for w in 0..8 {
        let prefix = format!("w{w} ");
        let mine: Vec<&str> = lines
            .iter()
            .filter(|l| l.text.starts_with(&prefix))
            .map(|l| l.text.as_str())
            .collect();
        let expected: Vec<String> = (0..50).map(|i| format!("w{w} line {i}")).collect();
        assert_eq!(mine, expected, "worker {w}'s lines, in its order");
    }
}

async fn read_logs_pages_by_sequence(s: Arc<dyn TaskStore>) {
    let task = create(&*s, "paged").await;
    let total = MAX_LOG_PAGE as u64 + 5;
    for i in 1..=total {
        s.append_log(task.id, LogStream::Stdout, &format!("line {i}"))
            .await
            .expect("append");
    }
    let seqs = |lines: &[adi_protocol::tasks::LogLine]| -> Vec<u64> {
        lines.iter().map(|l| l.seq).collect()
    };
    let first = s.read_logs(task.id, 0, 10).await.expect("read");
    assert_eq!(seqs(&first), (1..=10).collect::<Vec<_>>());
    assert_eq!(first[0].text, "line 1");
    let second = s.read_logs(task.id, 10, 10).await.expect("read");
    assert_eq!(seqs(&second), (11..=20).collect::<Vec<_>>());
    let capped = s.read_logs(task.id, 0, u32::MAX).await.expect("read");
    assert_eq!(
        capped.len(),
        MAX_LOG_PAGE as usize,
        "capped at MAX_LOG_PAGE"
    );
    let tail = s.read_logs(task.id, total - 2, 100).await.expect("read");
    assert_eq!(seqs(&tail), vec![total - 1, total]);
    assert!(s
        .read_logs(task.id, total, 100)
        .await
        .expect("read")
        .is_empty());
    assert!(s
        .read_logs(task.id, u64::MAX, 100)
        .await
        .expect("read")
        .is_empty());
    assert!(
        s.read_logs(task.id, 0, 0)
            .await
            .expect("limit 0")
            .is_empty(),
        "limit 0 reads nothing"
    );
}

async fn log_text_round_trips_and_nul_is_replaced(s: Arc<dyn TaskStore>) {
    let task = create(&*s, "texts").await;
    let before = micros_now();
    let long = "x".repeat(64 * 1024);
    let texts = [
        (LogStream::Stdout, String::new()),
        (
            LogStream::Stderr,
            "  leading and trailing spaces  ".to_owned(),
        ),
        (
            LogStream::System,
            "unicode: ünïcödé 日本 🚀 \u{FFFD}".to_owned(),
        ),
        (
            LogStream::Stdout,
            "quotes ' \" and backslash \\ and %_".to_owned(),
        ),
        (LogStream::Stdout, long.clone()),
    ];
    for (stream, text) in &texts {
        s.append_log(task.id, *stream, text).await.expect("append");
    }
    s.append_log(task.id, LogStream::Stdout, "a\0b")
        .await
        .expect("append with NUL");
    let after = micros_now();
    let lines = s.read_logs(task.id, 0, 100).await.expect("read");
    assert_eq!(lines.len(), texts.len() + 1);
    for (line, (stream, text)) in lines.iter().zip(texts.iter()) {
        assert_eq!(line.stream, *stream);
        assert_eq!(&line.text, text);
        assert!(
            (before..=after).contains(&line.at),
            "at is now, in microseconds"
        );
    }
    assert_eq!(lines[texts.len()].text, "a\u{FFFD}b", "NUL becomes U+FFFD");
}

// ---------------------------------------------------------------------------------------
// Restart recovery and creation times
// ---------------------------------------------------------------------------------------

async fn fail_interrupted_fails_running_tasks_once(s: Arc<dyn TaskStore>) {
    assert!(s
        .fail_interrupted()
        .await
        .expect("nothing to do")
        .is_empty());

    let pending = create(&*s, "pending").await;
    let first = create(&*s, "running 1").await;
    let second = create(&*s, "running 2").await;
    let done = create(&*s, "done").await;
    let first = set_status(&*s, first.id, TaskStatus::Running).await;
    let second = set_status(&*s, second.id, TaskStatus::Running).await;
    s.append_log(first.id, LogStream::Stdout, "working")
        .await
        .expect("append");
    set_status(&*s, done.id, TaskStatus::Running).await;
    let done = set_status(&*s, done.id, TaskStatus::Completed).await;

    let mut failed = s.fail_interrupted().await.expect("fail_interrupted");
    failed.sort();
    let mut expected = vec![first.id, second.id];
    expected.sort();
    assert_eq!(failed, expected, "exactly the running tasks");

    for (before, log_len) in [(&first, 2), (&second, 1)] {
        let after = get(&*s, before.id).await;
        assert_eq!(after.status, TaskStatus::Failed);
        assert_eq!(after.error.as_deref(), Some(INTERRUPTED));
        assert_eq!(after.exit_code, None);
        assert!(after.updated_at >= before.updated_at);
        let lines = s.read_logs(before.id, 0, 100).await.expect("read");
        assert_eq!(lines.len(), log_len);
        let last = lines.last().expect("a line");
        assert_eq!(last.stream, LogStream::System);
        assert!(last.text.contains("interrupted"), "got {:?}", last.text);
        assert_eq!(
            last.seq, log_len as u64,
            "appended after the task's own lines"
        );
    }
    assert_eq!(get(&*s, pending.id).await, pending, "pending tasks wait on");
    assert_eq!(get(&*s, done.id).await, done, "final tasks are untouched");
    assert!(
        s.fail_interrupted().await.expect("again").is_empty(),
        "a second pass finds nothing"
    );
}

async fn created_at_strictly_increases_over_rapid_creates(s: Arc<dyn TaskStore>) {
    let mut previous = i64::MIN;
    for i in 0..1000 {
        let task = create(&*s, &format!("rapid {i}")).await;
        assert!(
            task.created_at > previous,
            "task {i}: created_at {} after {previous}",
            task.created_at
        );
        previous = task.created_at;
    }
    // The listing agrees: newest first is exactly reverse creation order.
    let listed = list_all(&*s, &TaskFilter::default(), MAX_PAGE).await;
    assert!(listed.windows(2).all(|p| p[0].created_at > p[1].created_at));
}

async fn created_at_is_unique_under_concurrent_creates(s: Arc<dyn TaskStore>) {
    let workers: Vec<_> = (0..8)
        .map(|w| {
            let s = s.clone();
            tokio::spawn(async move {
                let mut times = Vec::new();
                for i in 0..25 {
                    let task = s
                        .create(titled(&format!("w{w} {i}")))
                        .await
                        .expect("create");
                    times.push(task.created_at);
                }
                times
            })
        })
        .collect();
    let mut all = Vec::new();
    for worker in workers {
        let times = worker.await.expect("worker");
        assert!(times.windows(2).all(|p| p[0] < p[1]));
        all.extend(times);
    }
    let distinct: HashSet<i64> = all.iter().copied().collect();
    assert_eq!(distinct.len(), 200, "no two tasks share a created_at");
}

// ---------------------------------------------------------------------------------------
// Backend-specific: data and schema survive a reopen
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn sqlite_reopen_keeps_data() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let path = dir.path().join("tasks.db");
    let first = SqliteTaskStore::open(&path).await.expect("open");
    let task = first.create(titled("survives")).await.expect("create");
    first
        .append_log(task.id, LogStream::Stdout, "line")
        .await
        .expect("append");
    first.close().await;

    let second = SqliteTaskStore::open(&path)
        .await
        .expect("reopen runs migrations again");
    assert_eq!(second.get(task.id).await.expect("get"), Some(task.clone()));
    assert_eq!(
        second
            .append_log(task.id, LogStream::Stdout, "next")
            .await
            .expect("append"),
        2
    );
    let later = second.create(titled("later")).await.expect("create");
    assert!(later.created_at > task.created_at);
    second.close().await;
}

#[tokio::test]
async fn sqlite_files_are_owner_only_and_loose_ones_tightened() {
    use std::os::unix::fs::PermissionsExt;
    let mode = |p: &std::path::Path| {
        std::fs::metadata(p)
            .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
            .permissions()
            .mode()
            & 0o777
    };
    let dir = tempfile::tempdir().expect("temporary directory");
    let data = dir.path().join("data");
    let path = data.join("tasks.db");
    let files = ["tasks.db", "tasks.db-wal", "tasks.db-shm"].map(|f| data.join(f));
    let store = SqliteTaskStore::open(&path).await.expect("open");
    store.create(titled("a write")).await.expect("create");
    assert_eq!(mode(&data), 0o700);
    for f in &files {
        assert_eq!(mode(f), 0o600, "{}", f.display());
    }
    for f in &files {
        std::fs::set_permissions(f, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    }
    let again = SqliteTaskStore::open(&path).await.expect("reopen");
    for f in &files {
        assert_eq!(mode(f), 0o600, "{}", f.display());
    }
    again.close().await;
    store.close().await;
}

#[tokio::test]
async fn a_write_the_database_refuses_is_an_outage_not_a_failure() {
    let e = StoreError::from(read_only_write_error().await);
    assert!(
        matches!(
            e,
            StoreError::Unavailable {
                outage: crate::Outage::ReadOnly,
                ..
            }
        ),
        "{e}"
    );
}

#[tokio::test]
async fn a_write_to_a_read_only_task_file_is_an_outage_not_a_failure() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let path = dir.path().join("tasks.db");
    SqliteTaskStore::open(&path)
        .await
        .expect("open")
        .close()
        .await;
    let read_only =
        rusqlite::Connection::open_with_flags(&path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .expect("open read-only");
    let e = StoreError::from(
        read_only
            .execute("DELETE FROM tasks", [])
            .expect_err("a read-only connection refuses writes"),
    );
    assert!(
        matches!(
            e,
            StoreError::Unavailable {
                outage: crate::Outage::ReadOnly,
                ..
            }
        ),
        "{e}"
    );
}

#[tokio::test]
async fn a_closed_sqlite_store_is_unavailable() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let store = SqliteTaskStore::open(&dir.path().join("tasks.db"))
        .await
        .expect("open");
    store.close().await;
    let e = store.create(titled("too late")).await.expect_err("closed");
    assert!(
        matches!(
            e,
            StoreError::Unavailable {
                outage: crate::Outage::Unreachable,
                ..
            }
        ),
        "{e}"
    );
}

#[tokio::test]
async fn open_picks_backend_from_url() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let default = crate::open(None, dir.path()).await.expect("default store");
    default.create(titled("in tasks.db")).await.expect("create");
    assert!(dir.path().join("tasks.db").exists());

    let path = dir.path().join("nested").join("other.db");
    let url = format!("sqlite:{}", path.display());
    let named = crate::open(Some(&url), dir.path())
        .await
        .expect("sqlite: URL");
    assert_eq!(named.stats().await.expect("stats").total, 0);
    assert!(path.exists());

    let err = crate::open(Some("mysql://nope"), dir.path())
        .await
        .err()
        .expect("unsupported URL");
    assert!(matches!(err, StoreError::UnsupportedUrl), "got {err:?}");
}

#[tokio::test]
async fn postgres_reconnect_keeps_data() {
    with_postgres(SUITE, |options| async move {
        let first = PgTaskStore::connect_with(options.clone())
            .await
            .expect("connect");
        let task = first.create(titled("survives")).await.expect("create");
        first.close().await;
        // Two cocoons starting at once both run the migrator; it must not fail. They
        // then share the database, and still hand out distinct creation times.
        let (a, b) = tokio::join!(
            PgTaskStore::connect_with(options.clone()),
            PgTaskStore::connect_with(options)
        );
        let (a, b) = (a.expect("second store"), b.expect("third store"));
        assert_eq!(a.get(task.id).await.expect("get"), Some(task.clone()));
        let (x, y) = tokio::join!(a.create(titled("from a")), b.create(titled("from b")));
        let (x, y) = (x.expect("create on a"), y.expect("create on b"));
        assert_ne!(x.created_at, y.created_at);
        assert!(x.created_at > task.created_at && y.created_at > task.created_at);
        a.close().await;
        b.close().await;
    })
    .await;
}
