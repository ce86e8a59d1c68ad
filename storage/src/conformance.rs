//! The harness both stores' conformance suites run on: each suite writes its behaviours
//! once, against its store's trait, and [`conformance_tests!`](crate::conformance_tests)
//! declares every one as a test on SQLite and on PostgreSQL; [`run_then_close`] runs one
//! test on an opened store and closes the store after it, whatever the test did.
//!
//! This module must never open a store: each suite opens its own, on the databases
//! [`test_database`](crate::test_database) makes.

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::time::Duration;

use futures_util::FutureExt;

/// How long closing a store after a test may wait for connections still in use.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

/// Runs `test` on `store`, then `close`s the store, also when `test` panics (the panic
/// goes on after the close). Tasks a failed test left behind may hold connections, so
/// the close waits for them five seconds at most.
pub async fn run_then_close<S, T, TestFut, C, CloseFut>(store: S, test: T, close: C)
where
    S: Clone,
    T: FnOnce(S) -> TestFut,
    TestFut: Future<Output = ()>,
    C: FnOnce(S) -> CloseFut,
    CloseFut: Future<Output = ()>,
{
    let outcome = AssertUnwindSafe(test(store.clone())).catch_unwind().await;
    let _ = tokio::time::timeout(CLOSE_TIMEOUT, close(store)).await;
    if let Err(panic) = outcome {
        std::panic::resume_unwind(panic);
    }
}

/// Declares each named suite function as a test on both backends, `sqlite::NAME` and
/// `postgres::NAME`, run by the calling module's `on_sqlite(NAME)` and
/// `on_postgres(NAME)` on a multi-threaded runtime, so that races between a store's
/// callers really race.
#[macro_export]
macro_rules! conformance_tests {
    ($($name:ident),+ $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $name() {
                    super::on_sqlite(super::$name).await;
                }
            )+
        }

        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $name() {
                    super::on_postgres(super::$name).await;
                }
            )+
        }
    };
}
