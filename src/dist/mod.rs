//! Data parallelism: where this process stands in a job ([`place`]), and the collective
//! operations the ranks use to train as one ([`Collective`]), over TCP ([`tcp`]), and the
//! data-parallel step built on them ([`ddp`]).

pub mod ddp;
pub mod place;
pub mod tcp;

pub use place::{Launcher, Place};
pub use tcp::TcpGroup;

/// The settings every rank must share, as (setting, value) pairs in a fixed order: the ranks
/// compare them when they meet.
pub type Config = Vec<(String, String)>;

/// The collectives of a data-parallel step. Every rank calls the same operations in the same
/// order; each returns an error naming the rank that left or stopped answering.
pub trait Collective: Send {
    fn rank(&self) -> usize;
    fn world(&self) -> usize;
    /// Element-wise sum over the ranks, the same bits on every rank.
    fn all_reduce_sum(&mut self, data: &mut [f32]) -> anyhow::Result<()>;
    /// [`Collective::all_reduce_sum`] for the step metrics, in `f64`.
    fn all_reduce_sum_f64(&mut self, data: &mut [f64]) -> anyhow::Result<()>;
    /// Rank 0's values on every rank.
    fn broadcast(&mut self, data: &mut [f32]) -> anyhow::Result<()>;
}

/// One group shared by the parts of a step that talk to the other ranks (the stepper's
/// gradient all-reduce, SyncBatchNorm's statistics): each call holds the group alone.
#[derive(Clone)]
pub struct SharedGroup(std::sync::Arc<std::sync::Mutex<Box<dyn Collective>>>);

impl SharedGroup {
    pub fn new(group: Box<dyn Collective>) -> Self {
        SharedGroup(std::sync::Arc::new(std::sync::Mutex::new(group)))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Box<dyn Collective>> {
        // A panic elsewhere leaves the group as it was between two calls.
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Collective for SharedGroup {
    fn rank(&self) -> usize {
        self.lock().rank()
    }
    fn world(&self) -> usize {
        self.lock().world()
    }
    fn all_reduce_sum(&mut self, data: &mut [f32]) -> anyhow::Result<()> {
        self.lock().all_reduce_sum(data)
    }
    fn all_reduce_sum_f64(&mut self, data: &mut [f64]) -> anyhow::Result<()> {
        self.lock().all_reduce_sum_f64(data)
    }
    fn broadcast(&mut self, data: &mut [f32]) -> anyhow::Result<()> {
        self.lock().broadcast(data)
    }
}

/// How long a rank waits for the others (to meet, then at each collective) before it gives up
/// on them: `INCEPT_DIST_TIMEOUT` seconds, 300 by default (a rank that exits is noticed at
/// once; this bounds a hung one).
pub fn timeout() -> anyhow::Result<std::time::Duration> {
    let secs = match std::env::var("INCEPT_DIST_TIMEOUT") {
        Err(_) => 300.0,
        Ok(v) => match v.trim().parse::<f64>() {
            Ok(s) if s > 0.0 && s.is_finite() => s,
            _ => anyhow::bail!("INCEPT_DIST_TIMEOUT={v:?}: give the seconds as a positive number"),
        },
    };
    Ok(std::time::Duration::from_secs_f64(secs))
}

/// How long a rank waits without a heartbeat from a peer before giving up on it:
/// `INCEPT_DIST_HEARTBEAT` seconds, 15 by default (never more than the timeout). The heartbeat
/// runs on a thread of its own, so a long step, evaluation or checkpoint does not silence it.
pub fn heartbeat() -> anyhow::Result<std::time::Duration> {
    let secs = match std::env::var("INCEPT_DIST_HEARTBEAT") {
        Err(_) => 15.0,
        Ok(v) => match v.trim().parse::<f64>() {
            Ok(s) if s >= 2.0 && s.is_finite() => s,
            _ => anyhow::bail!(
                "INCEPT_DIST_HEARTBEAT={v:?}: give the seconds as a number of at least 2"
            ),
        },
    };
    Ok(std::time::Duration::from_secs_f64(secs))
}
