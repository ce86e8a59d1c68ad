//! Limits on guessing: how many failed sign-ins, share claims and enrolments one source
//! may make, and how many failures one account (an API key, a token) may take.
//!
//! - Every failed attempt from a source costs one cell of that source's budget
//!   ([`PER_SOURCE`]); once spent, the source is answered `429` with `Retry-After`
//!   before anything is checked, until the budget refills. A source is an IPv4 address
//!   or an IPv6 /64.
//! - Every failed attempt on an account costs one cell of the account's budget
//!   ([`FAILURES_PER_ACCOUNT`]). Once spent, the account is locked for the sources that
//!   failed on it (they get `429` before anything is checked) but not for others: a
//!   correct sign-in from another source is never locked out by someone else's failures.
//!
//! Only failures count: an office behind one address signing in all morning, or a fleet
//! enrolled by script from one host, is never held back, while a guesser is. The
//! secrets are 256-bit, so the limits are not what keeps them from being guessed; they
//! keep floods of wrong attempts from costing the catalog reads and hashing that
//! checking needs, and make a key or token under attack stand out in the log. Device
//! reconnects (a known secret, no token) are never counted.

use std::net::IpAddr;
use std::num::NonZeroU32;
use std::time::{Duration, Instant};

use dashmap::DashMap;
use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota};

/// Failed attempts one source may make, per minute, with as many at once.
pub const PER_SOURCE: u32 = 60;
/// Failures one account may take, per minute, with as many at once.
pub const FAILURES_PER_ACCOUNT: u32 = 10;
/// How long a source that failed on an account counts as having failed there.
const FAILED_FOR: Duration = Duration::from_secs(600);
/// Entries kept before stale ones are swept.
const SWEEP_AT: usize = 10_000;

/// Where an attempt came from, coarse enough that one host cannot rotate addresses
/// within its own IPv6 prefix to escape its budget.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Source(IpAddr);

impl From<IpAddr> for Source {
    fn from(ip: IpAddr) -> Self {
        match ip {
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => Source(IpAddr::V4(v4)),
                None => {
                    let bits = u128::from(v6) & !((1u128 << 64) - 1);
                    Source(IpAddr::V6(bits.into()))
                }
            },
            v4 => Source(v4),
        }
    }
}

/// The hub's limits on sign-in, claims and enrolment.
pub struct Throttle {
    clock: DefaultClock,
    sources: DefaultKeyedRateLimiter<Source>,
    accounts: DefaultKeyedRateLimiter<String>,
    /// Sources whose failure budget is spent, until when.
    sources_locked: DashMap<Source, Instant>,
    /// Accounts whose failure budget is spent, until when.
    locked: DashMap<String, Instant>,
    /// When each source last failed on each account.
    failed: DashMap<(String, Source), Instant>,
}

impl Default for Throttle {
    fn default() -> Self {
        Throttle::new(PER_SOURCE, FAILURES_PER_ACCOUNT)
    }
}

impl Throttle {
    /// Limits of `per_source` failures from a source and `failures_per_account` failures
    /// on an account, a minute.
    pub fn new(per_source: u32, failures_per_account: u32) -> Self {
        let per_minute =
            |n: u32| Quota::per_minute(NonZeroU32::new(n.max(1)).unwrap_or(NonZeroU32::MIN));
        Throttle {
            clock: DefaultClock::default(),
            sources: DefaultKeyedRateLimiter::dashmap(per_minute(per_source)),
            accounts: DefaultKeyedRateLimiter::dashmap(per_minute(failures_per_account)),
            sources_locked: DashMap::new(),
            locked: DashMap::new(),
            failed: DashMap::new(),
        }
    }

    /// Whether an attempt from `source` on `account` may be checked; `Err` says how
    /// long to wait.
    pub fn admit(&self, source: impl Into<Source>, account: Option<&str>) -> Result<(), Duration> {
        let source = source.into();
        let now = Instant::now();
        self.sweep(now);
        if let Some(until) = self.sources_locked.get(&source).map(|u| *u) {
            if until > now {
                return Err(until - now);
            }
        }
        if let Some(account) = account {
            let until = self.locked.get(account).map(|u| *u).filter(|u| *u > now);
            if let Some(until) = until {
                let failed_here = self
                    .failed
                    .get(&(account.to_owned(), source))
                    .is_some_and(|at| now.duration_since(*at) < FAILED_FOR);
                if failed_here {
                    return Err(until - now);
                }
            }
        }
        Ok(())
    }

    /// Records a failed attempt from `source` on `account`.
    pub fn failed(&self, source: impl Into<Source>, account: Option<&str>) {
        let source = source.into();
        let now = Instant::now();
        if let Err(not_until) = self.sources.check_key(&source) {
            let wait = not_until.wait_time_from(self.clock.now());
            self.sources_locked.insert(source, now + wait);
            tracing::warn!(source = ?source.0, "failed attempts from this address are being limited");
        }
        let Some(account) = account else { return };
        self.failed.insert((account.to_owned(), source), now);
        if let Err(not_until) = self.accounts.check_key(&account.to_owned()) {
            let wait = not_until.wait_time_from(self.clock.now());
            self.locked.insert(account.to_owned(), now + wait);
            tracing::warn!(account, "failed attempts on this account are being limited");
        }
    }

    /// Forgets stale entries once there are many.
    fn sweep(&self, now: Instant) {
        if self.sources.len() > SWEEP_AT {
            self.sources.retain_recent();
        }
        if self.accounts.len() > SWEEP_AT {
            self.accounts.retain_recent();
        }
        if self.sources_locked.len() > SWEEP_AT {
            self.sources_locked.retain(|_, until| *until > now);
        }
        if self.locked.len() > SWEEP_AT {
            self.locked.retain(|_, until| *until > now);
        }
        if self.failed.len() > SWEEP_AT {
            self.failed
                .retain(|_, at| now.duration_since(*at) < FAILED_FOR);
        }
    }
}

/// Seconds for `Retry-After`, rounded up so a client that waits them is admitted.
pub fn retry_after_secs(wait: Duration) -> u64 {
    wait.as_secs() + u64::from(wait.subsec_nanos() > 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("address")
    }

    #[test]
    fn a_source_is_refused_once_its_failures_are_spent_and_others_are_not() {
        let t = Throttle::new(3, 100);
        for _ in 0..100 {
            assert!(
                t.admit(ip("10.0.0.1"), None).is_ok(),
                "successes cost nothing"
            );
        }
        for _ in 0..4 {
            assert!(t.admit(ip("10.0.0.1"), None).is_ok());
            t.failed(ip("10.0.0.1"), None);
        }
        let wait = t.admit(ip("10.0.0.1"), None).expect_err("over budget");
        assert!(
            wait > Duration::ZERO && wait <= Duration::from_secs(60),
            "{wait:?}"
        );
        assert!(t.admit(ip("10.0.0.2"), None).is_ok(), "another source");
    }

    #[test]
    fn an_ipv6_prefix_is_one_source_and_mapped_ipv4_is_its_ipv4() {
        assert_eq!(
            Source::from(ip("2001:db8:1:2::1")),
            Source::from(ip("2001:db8:1:2:ffff::9"))
        );
        assert_ne!(
            Source::from(ip("2001:db8:1:2::1")),
            Source::from(ip("2001:db8:1:3::1"))
        );
        assert_eq!(
            Source::from(ip("::ffff:10.0.0.1")),
            Source::from(ip("10.0.0.1"))
        );
    }

    #[test]
    fn failures_lock_an_account_for_the_failing_sources_only() {
        let t = Throttle::new(1000, 3);
        let attacker = ip("203.0.113.7");
        for _ in 0..4 {
            assert!(t.admit(attacker, Some("key1")).is_ok());
            t.failed(attacker, Some("key1"));
        }
        let wait = t
            .admit(attacker, Some("key1"))
            .expect_err("the attacker is locked out of key1");
        assert!(wait > Duration::ZERO);
        assert!(
            t.admit(ip("198.51.100.1"), Some("key1")).is_ok(),
            "the owner, elsewhere, is not"
        );
        assert!(
            t.admit(attacker, Some("key2")).is_ok(),
            "nor is another account"
        );
        assert_eq!(retry_after_secs(Duration::from_millis(1500)), 2);
        assert_eq!(retry_after_secs(Duration::from_secs(3)), 3);
    }
}
