//! The branch scheduler: the branches of an Inception block are independent units of work.
//!
//! On the CPU they run either one after another or concurrently on the rayon pool. Every op
//! of the CPU backend computes the same bits whatever thread runs it, and the block's join
//! (concat forward, gradient sum backward) happens in branch order after all branches are
//! done, so both schedules give bitwise identical results; `tests/schedule.rs` checks that.

use rayon::prelude::*;

/// How the branches of a block are run.
#[derive(
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    Eq,
    clap::ValueEnum,
    serde::Serialize,
    serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum BranchSchedule {
    /// One branch after another, in order.
    Sequential,
    /// All branches at once, each on its own rayon task (ops inside keep their own parallelism).
    #[default]
    Concurrent,
}

/// Runs `f` on every branch and returns the results in branch order.
pub fn run_branches<I, R, F>(mode: BranchSchedule, branches: &mut [I], f: F) -> Vec<R>
where
    I: Send,
    R: Send,
    F: Fn(usize, &mut I) -> R + Sync + Send,
{
    match mode {
        BranchSchedule::Sequential => {
            branches.iter_mut().enumerate().map(|(i, b)| f(i, b)).collect()
        }
        BranchSchedule::Concurrent => {
            branches.par_iter_mut().enumerate().map(|(i, b)| f(i, b)).collect()
        }
    }
}
