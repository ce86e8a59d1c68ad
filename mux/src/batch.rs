//! How the writer of a socket that carries streams batches its frames, the same on the
//! hub and on the device: after one frame it takes whatever else is ready, up to
//! [`BATCH`] frames, then flushes once. When nothing more is ready it may yield once
//! first, so that frames other tasks on this thread are about to queue join the same
//! write: under load one system call then carries many frames, and the peer reads them
//! in one. It owns that policy only; the writer owns its socket and its queues.
//!
//! A yield is not free: the runtime polls the socket driver once more (a system call)
//! and the task goes round the scheduler again. When frames do not meet (one request at
//! a time on the socket), that is pure cost on every write, in the latency each request
//! waits for. So the writer keeps a [`Pacing`]: it yields while yielding finds frames
//! to join, stops after [`MISSES`] yields in a row found none, and then yields only on
//! every [`PROBE`]th write, to notice when traffic picks up; a write that finds several
//! frames ready without yielding says so too.

/// Frames written before one flush when several are ready.
pub const BATCH: usize = 32;
/// Yields in a row that found nothing to join before the writer stops yielding.
pub const MISSES: u8 = 2;
/// While it does not yield, the writer still yields on one write in this many.
pub const PROBE: u8 = 16;

/// What one socket's writer remembers between writes: whether frames have been meeting.
#[derive(Debug, Default, Clone)]
pub struct Pacing {
    misses: u8,
    since_probe: u8,
}

impl Pacing {
    /// A write that holds its first frame, yielding when it runs dry if frames have
    /// been meeting (or to probe whether they do again).
    pub fn start(&mut self) -> WriteBatch {
        let may_yield = self.yields();
        if may_yield {
            self.since_probe = 0;
        } else {
            self.since_probe += 1;
        }
        WriteBatch {
            fed: 1,
            may_yield,
            yielded: false,
        }
    }

    /// Learns from a finished write: several frames met in it, or a yield found none.
    pub fn finished(&mut self, batch: &WriteBatch) {
        if batch.fed > 1 {
            self.misses = 0;
        } else if batch.yielded {
            self.misses = self.misses.saturating_add(1).min(MISSES);
        }
    }

    /// Whether the next write yields when it runs dry.
    pub fn yields(&self) -> bool {
        self.misses < MISSES || self.since_probe + 1 >= PROBE
    }
}

/// One write in progress: how many frames it holds, and whether it may yield or has.
#[derive(Debug)]
pub struct WriteBatch {
    fed: usize,
    may_yield: bool,
    yielded: bool,
}

impl WriteBatch {
    /// Counts one more frame in this write.
    pub fn fed(&mut self) {
        self.fed += 1;
    }

    /// Whether to look for another ready frame. `ran_dry` says the last look found
    /// nothing: then, if it may, it yields once and looks once more; otherwise, or
    /// the second time, it stops.
    pub async fn more(&mut self, ran_dry: bool) -> bool {
        if self.fed >= BATCH {
            return false;
        }
        if ran_dry {
            if self.yielded || !self.may_yield {
                return false;
            }
            self.yielded = true;
            tokio::task::yield_now().await;
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs one write that finds `frames` ready in all (the first included), the rest
    /// found after its yield if it yields, and says whether it yielded.
    async fn write(pacing: &mut Pacing, frames: usize) -> bool {
        let mut batch = pacing.start();
        let mut left = frames - 1;
        let mut ran_dry = false;
        while batch.more(ran_dry).await {
            ran_dry = left == 0 || !batch.yielded;
            if !ran_dry {
                left -= 1;
                batch.fed();
            }
        }
        pacing.finished(&batch);
        batch.yielded
    }

    #[tokio::test]
    async fn a_write_takes_at_most_a_batch_and_looks_once_more_after_running_dry() {
        let mut batch = Pacing::default().start();
        assert!(batch.more(false).await);
        for _ in 1..BATCH {
            batch.fed();
        }
        assert!(!batch.more(false).await, "a full batch is flushed");

        let mut batch = Pacing::default().start();
        assert!(batch.more(true).await, "dry once: yield and look again");
        assert!(batch.more(false).await, "something came: go on");
        assert!(!batch.more(true).await, "dry twice: flush");
    }

    #[tokio::test]
    async fn a_writer_whose_frames_never_meet_stops_yielding_but_probes() {
        let mut pacing = Pacing::default();
        assert!(write(&mut pacing, 1).await, "a new writer yields");
        assert!(write(&mut pacing, 1).await);
        let yields = writes(&mut pacing, 3 * usize::from(PROBE)).await;
        let count = yields.iter().filter(|y| **y).count();
        assert_eq!(count, 3, "one write in {PROBE} probes: {yields:?}");
        assert!(
            !yields[0],
            "two yields that found nothing stop the yielding"
        );
    }

    async fn writes(pacing: &mut Pacing, writes: usize) -> Vec<bool> {
        let mut yields = Vec::with_capacity(writes);
        for _ in 0..writes {
            yields.push(write(pacing, 1).await);
        }
        yields
    }

    #[tokio::test]
    async fn frames_that_meet_again_bring_the_yield_back() {
        let mut pacing = Pacing::default();
        write(&mut pacing, 1).await;
        write(&mut pacing, 1).await;
        assert!(!pacing.yields(), "quiet: no yield");
        // A probe's yield finds frames to join: yielding pays again.
        while !write(&mut pacing, 3).await {}
        assert!(pacing.yields(), "busy again: every write yields");
        assert!(write(&mut pacing, 2).await);
        assert!(
            write(&mut pacing, 1).await,
            "one miss is not enough to stop"
        );

        // Several frames ready at once, without a yield, say the same.
        let mut pacing = Pacing::default();
        write(&mut pacing, 1).await;
        write(&mut pacing, 1).await;
        let mut batch = pacing.start();
        batch.fed();
        assert!(!batch.more(true).await);
        pacing.finished(&batch);
        assert!(pacing.yields());
    }
}
