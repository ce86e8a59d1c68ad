//! How the writer of a socket that carries streams batches its frames, the same on the
//! hub and on the device: after one frame it takes whatever else is ready, up to
//! [`BATCH`] frames, then flushes once; when nothing more is ready it yields once first,
//! so that frames other tasks on this thread are about to queue join the same write.
//! Under load one system call then carries many frames, and the peer reads them in one.
//! It owns that policy only; the writer owns its socket and its queues.

/// Frames written before one flush when several are ready.
pub const BATCH: usize = 32;

/// One write in progress: how many frames it holds, and whether it already yielded.
#[derive(Debug)]
pub struct WriteBatch {
    fed: usize,
    yielded: bool,
}

impl WriteBatch {
    /// A write that holds its first frame.
    pub fn started() -> Self {
        WriteBatch {
            fed: 1,
            yielded: false,
        }
    }

    /// Counts one more frame in this write.
    pub fn fed(&mut self) {
        self.fed += 1;
    }

    /// Whether to look for another ready frame. `ran_dry` says the last look found
    /// nothing: then it yields once and looks once more, and the second time stops.
    pub async fn more(&mut self, ran_dry: bool) -> bool {
        if self.fed >= BATCH {
            return false;
        }
        if ran_dry {
            if self.yielded {
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

    #[tokio::test]
    async fn a_write_takes_at_most_a_batch_and_looks_once_more_after_running_dry() {
        let mut batch = WriteBatch::started();
        assert!(batch.more(false).await);
        for _ in 1..BATCH {
            batch.fed();
        }
        assert!(!batch.more(false).await, "a full batch is flushed");

        let mut batch = WriteBatch::started();
        assert!(batch.more(true).await, "dry once: yield and look again");
        assert!(batch.more(false).await, "something came: go on");
        assert!(!batch.more(true).await, "dry twice: flush");
    }
}
