//! Readiness: whether the catalog can be read and written right now, proven by a
//! committed write of one tiny row ([`Catalog::probe_write`]).
//!
//! `/readyz` is unauthenticated, so a flood of it must not become a flood of catalog
//! writes: a probe runs at most once per [`MAX_AGE`], its result is cached and shared,
//! and callers that arrive while one runs wait for it instead of starting another. The
//! probe runs in a task of its own, so a caller that goes away cannot leave it half done.
//! A change of state is logged once, not once per probe.
//!
//! [`Catalog::probe_write`]: crate::catalog::Catalog::probe_write

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use adi_protocol::ErrorCode;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::catalog::CatalogError;

/// How long a probe's result stands before the next request probes again.
pub const MAX_AGE: Duration = Duration::from_secs(1);
/// How long a probe may take before the catalog counts as not ready.
const PROBE_TIMEOUT: Duration = Duration::from_secs(3);

/// Why the hub is not ready, as `/readyz` answers it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unready {
    /// The protocol code.
    pub code: ErrorCode,
    /// The reason, safe to show.
    pub message: String,
}

#[derive(Clone)]
struct Checked {
    at: Instant,
    outcome: Result<(), Unready>,
}

struct Inner {
    last: watch::Sender<Option<Checked>>,
    probing: AtomicBool,
}

/// The cached readiness of one hub's catalog.
#[derive(Clone)]
pub struct Readiness {
    inner: Arc<Inner>,
}

impl Default for Readiness {
    fn default() -> Self {
        Readiness {
            inner: Arc::new(Inner {
                last: watch::Sender::new(None),
                probing: AtomicBool::new(false),
            }),
        }
    }
}

/// Clears the probing flag however the probe ends, so a panicking probe cannot stop
/// every later one.
struct Probing(Arc<Inner>);

impl Drop for Probing {
    fn drop(&mut self) {
        self.0.probing.store(false, Ordering::Release);
    }
}

impl Readiness {
    /// The catalog's readiness, at most [`MAX_AGE`] old: `probe` runs only when the
    /// cached result is older and no other probe is running.
    pub async fn check<F, Fut>(&self, probe: F) -> Result<(), Unready>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<(), CatalogError>> + Send + 'static,
    {
        let mut seen = self.inner.last.subscribe();
        if let Some(outcome) = fresh(&seen.borrow_and_update()) {
            return outcome;
        }
        let ours = self
            .inner
            .probing
            .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
            .is_ok();
        if ours {
            let guard = Probing(self.inner.clone());
            // A probe that finished just now counts.
            if let Some(outcome) = fresh(&self.inner.last.borrow()) {
                return outcome;
            }
            let probe = probe();
            tokio::spawn(async move {
                let outcome = match tokio::time::timeout(PROBE_TIMEOUT, probe).await {
                    Ok(Ok(())) => Ok(()),
                    Ok(Err(e)) => Err((unready(&e), format!("{e:#}"))),
                    Err(_) => Err((
                        timed_out(),
                        format!("a write probe got no answer within {PROBE_TIMEOUT:?}"),
                    )),
                };
                guard.publish(outcome);
            });
        }
        match tokio::time::timeout(PROBE_TIMEOUT + MAX_AGE, seen.changed()).await {
            Ok(Ok(())) => seen
                .borrow()
                .as_ref()
                .map(|c| c.outcome.clone())
                .unwrap_or_else(|| Err(timed_out())),
            _ => Err(timed_out()),
        }
    }
}

impl Probing {
    /// Shares a probe's outcome; `Err` carries the detail for the log.
    fn publish(self, outcome: Result<(), (Unready, String)>) {
        let before = self.0.last.borrow().as_ref().map(|c| c.outcome.clone());
        match (&outcome, &before) {
            (Err((unready, detail)), before)
                if before.as_ref().and_then(|b| b.as_ref().err()) != Some(unready) =>
            {
                tracing::warn!("not ready: the catalog failed a write probe: {detail}");
            }
            (Ok(()), Some(Err(_))) => tracing::info!("ready: the catalog writes again"),
            _ => {}
        }
        self.0.last.send_replace(Some(Checked {
            at: Instant::now(),
            outcome: outcome.map_err(|(unready, _)| unready),
        }));
    }
}

/// What `/readyz` says for a failed probe: the outage when it is one, else only that
/// the catalog failed (the detail goes to the log).
fn unready(e: &CatalogError) -> Unready {
    Unready {
        code: e.code(),
        message: match e {
            CatalogError::Unavailable { .. } => e.public_message(),
            _ => "the hub's catalog failed; the hub's log says why".to_owned(),
        },
    }
}

fn fresh(last: &Option<Checked>) -> Option<Result<(), Unready>> {
    last.as_ref()
        .filter(|c| c.at.elapsed() < MAX_AGE)
        .map(|c| c.outcome.clone())
}

fn timed_out() -> Unready {
    Unready {
        code: ErrorCode::Unavailable,
        message: format!(
            "the hub's catalog did not answer within {} s",
            PROBE_TIMEOUT.as_secs()
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    fn counting(
        calls: &Arc<AtomicUsize>,
        result: fn() -> Result<(), CatalogError>,
    ) -> impl FnOnce() -> std::pin::Pin<
        Box<dyn Future<Output = Result<(), CatalogError>> + Send + 'static>,
    > {
        let calls = calls.clone();
        move || {
            calls.fetch_add(1, Ordering::SeqCst);
            Box::pin(async move {
                tokio::time::sleep(Duration::from_millis(50)).await;
                result()
            })
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_flood_of_checks_probes_once_per_interval() {
        let readiness = Readiness::default();
        let calls = Arc::new(AtomicUsize::new(0));
        let checks: Vec<_> = (0..100)
            .map(|_| {
                let r = readiness.clone();
                let probe = counting(&calls, || Ok(()));
                tokio::spawn(async move { r.check(probe).await })
            })
            .collect();
        for c in checks {
            assert_eq!(c.await.expect("task"), Ok(()));
        }
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        for _ in 0..10 {
            assert_eq!(readiness.check(counting(&calls, || Ok(()))).await, Ok(()));
        }
        assert_eq!(calls.load(Ordering::SeqCst), 1, "the result is cached");
        tokio::time::advance(MAX_AGE).await;
        assert_eq!(readiness.check(counting(&calls, || Ok(()))).await, Ok(()));
        assert_eq!(
            calls.load(Ordering::SeqCst),
            2,
            "a stale result probes again"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_probe_says_why_until_one_succeeds() {
        let readiness = Readiness::default();
        let calls = Arc::new(AtomicUsize::new(0));
        let full = || {
            Err(CatalogError::Unavailable {
                outage: crate::catalog::Outage::DiskFull,
                detail: sqlx::Error::Io(std::io::ErrorKind::StorageFull.into()),
            })
        };
        let unready = readiness
            .check(counting(&calls, full))
            .await
            .expect_err("not ready");
        assert_eq!(unready.code, ErrorCode::Unavailable);
        assert!(unready.message.contains("disk full"), "{unready:?}");
        tokio::time::advance(MAX_AGE).await;
        assert_eq!(readiness.check(counting(&calls, || Ok(()))).await, Ok(()));
    }

    #[tokio::test(start_paused = true)]
    async fn a_probe_that_hangs_is_not_ready() {
        let readiness = Readiness::default();
        let unready = readiness
            .check(std::future::pending::<Result<(), CatalogError>>)
            .await
            .expect_err("not ready");
        assert_eq!(unready.code, ErrorCode::Unavailable);
        tokio::time::advance(MAX_AGE).await;
        let calls = Arc::new(AtomicUsize::new(0));
        assert_eq!(readiness.check(counting(&calls, || Ok(()))).await, Ok(()));
    }
}
