//! Learning-rate schedules, evaluated per optimizer step.

use serde::{Deserialize, Serialize};

/// Which schedule `--sched` selects.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Sched {
    /// PyTorch's `OneCycleLR` (cosine annealing): lr/25 up to lr over the warm-up fraction
    /// (30% by default), then down to lr/25/1e4.
    Onecycle,
    /// Linear warm-up over `--warmup-epochs`, then cosine decay to 0.
    Cosine,
    /// Linear warm-up, then ×`--decay-rate` every `--decay-epochs` epochs.
    Step,
}

/// A schedule bound to a run's length.
#[derive(Clone, Copy, Debug)]
pub struct LrSchedule {
    pub sched: Sched,
    pub lr: f64,
    pub total_steps: u64,
    pub steps_per_epoch: u64,
    pub warmup_epochs: f64,
    pub decay_epochs: f64,
    pub decay_rate: f64,
}

/// Cosine interpolation from `start` (pct 0) to `end` (pct 1), as OneCycleLR anneals.
fn cos_anneal(start: f64, end: f64, pct: f64) -> f64 {
    end + (start - end) / 2.0 * ((std::f64::consts::PI * pct).cos() + 1.0)
}

impl LrSchedule {
    /// Learning rate of optimizer step `step` (0-based).
    pub fn lr(&self, step: u64) -> f64 {
        let s = step as f64;
        let warmup = (self.warmup_epochs * self.steps_per_epoch as f64).round();
        match self.sched {
            Sched::Onecycle => {
                let (initial, min) = (self.lr / 25.0, self.lr / 25.0 / 1e4);
                let total = self.total_steps.max(2) as f64;
                // OneCycleLR: phase 1 ends at pct_start·total − 1, phase 2 at total − 1.
                let pct_start =
                    if self.warmup_epochs > 0.0 { (warmup / total).clamp(0.0, 1.0) } else { 0.3 };
                let end1 = (pct_start * total - 1.0).max(0.0);
                let end2 = total - 1.0;
                if s <= end1 {
                    let pct = if end1 > 0.0 { s / end1 } else { 1.0 };
                    cos_anneal(initial, self.lr, pct)
                } else {
                    cos_anneal(self.lr, min, ((s - end1) / (end2 - end1)).min(1.0))
                }
            }
            Sched::Cosine | Sched::Step if s < warmup => self.lr * (s + 1.0) / warmup,
            Sched::Cosine => {
                let rest = (self.total_steps as f64 - warmup).max(1.0);
                cos_anneal(self.lr, 0.0, ((s - warmup) / rest).min(1.0))
            }
            Sched::Step => {
                let epoch = (s / self.steps_per_epoch.max(1) as f64).floor();
                self.lr * self.decay_rate.powf((epoch / self.decay_epochs.max(1.0)).floor())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sched(sched: Sched, warmup_epochs: f64) -> LrSchedule {
        LrSchedule {
            sched,
            lr: 0.1,
            total_steps: 1000,
            steps_per_epoch: 100,
            warmup_epochs,
            decay_epochs: 3.0,
            decay_rate: 0.1,
        }
    }

    #[test]
    fn onecycle_matches_pytorch_endpoints() {
        // torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=1000): step 0 is
        // 0.004, step 299 is the peak 0.1, step 999 is 4e-7.
        let s = sched(Sched::Onecycle, 0.0);
        assert!((s.lr(0) - 0.004).abs() < 1e-12);
        assert!((s.lr(299) - 0.1).abs() < 1e-12);
        assert!((s.lr(999) - 4e-7).abs() < 1e-15);
        assert!(s.lr(150) > 0.004 && s.lr(150) < 0.1);
    }

    #[test]
    fn cosine_and_step_warm_up_then_decay() {
        let c = sched(Sched::Cosine, 1.0);
        assert!((c.lr(0) - 0.001).abs() < 1e-12);
        assert!((c.lr(99) - 0.1).abs() < 1e-12);
        assert!((c.lr(100) - 0.1).abs() < 1e-12);
        assert!(c.lr(999) < 1e-5);
        let st = sched(Sched::Step, 0.0);
        assert_eq!(st.lr(0), 0.1);
        assert!((st.lr(299) - 0.1).abs() < 1e-12);
        assert!((st.lr(300) - 0.01).abs() < 1e-12);
    }
}
