//! What a run reports: a live bar or log lines during an epoch, and a row of summary.csv and
//! metrics.jsonl after it.

use super::*;

/// `YYYYmmdd-HHMMSS` in UTC, for run folder names.
pub(super) fn timestamp() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let (days, rem) = (secs / 86400, secs % 86400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + (m <= 2) as i64;
    format!("{y:04}{m:02}{d:02}-{:02}{:02}{:02}", rem / 3600, rem % 3600 / 60, rem % 60)
}

/// One row of summary.csv / metrics.jsonl.
#[derive(Serialize)]
pub(super) struct EpochRow {
    pub(super) epoch: u64,
    pub(super) lr: f64,
    pub(super) train_loss: f64,
    pub(super) train_acc: f64,
    pub(super) test_loss: f64,
    pub(super) test_acc: f64,
    pub(super) img_per_s: f64,
    pub(super) seconds: f64,
}

impl EpochRow {
    /// The row of summary.csv ([`CSV_HEADER`]'s columns).
    pub(super) fn csv(&self) -> String {
        format!(
            "{},{:.6e},{:.6},{:.6},{:.6},{:.6},{:.1},{:.2}",
            self.epoch,
            self.lr,
            self.train_loss,
            self.train_acc,
            self.test_loss,
            self.test_acc,
            self.img_per_s,
            self.seconds
        )
    }
}

pub(super) fn append(path: &Path, line: &str) -> Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .with_context(|| format!("cannot write {}", path.display()))?;
    writeln!(f, "{line}").with_context(|| format!("cannot write {}", path.display()))
}

pub(super) const CSV_HEADER: &str =
    "epoch,lr,train_loss,train_acc,test_loss,test_acc,img_per_s,seconds";

/// Running figures of the epoch so far.
pub(super) struct Running {
    pub(super) loss: f64,
    pub(super) acc: f64,
    pub(super) img_s: f64,
    pub(super) lr: f64,
}

/// Live progress: a bar on a terminal, periodic log lines elsewhere.
pub(super) struct Reporter {
    pub(super) bar: Option<indicatif::ProgressBar>,
    pub(super) interval: u64,
    pub(super) epoch: u64,
    pub(super) steps: u64,
}

impl Reporter {
    pub(super) fn new(epoch: u64, epochs: usize, steps: u64, done: u64, interval: usize) -> Self {
        let bar = std::io::stderr().is_terminal().then(|| {
            let b = indicatif::ProgressBar::new(steps);
            b.set_style(
                indicatif::ProgressStyle::with_template(
                    "{prefix} [{bar:30.cyan/blue}] {pos}/{len} {msg} ETA {eta}",
                )
                .expect("valid template")
                .progress_chars("=> "),
            );
            b.set_prefix(format!("epoch {}/{epochs}", epoch + 1));
            b.set_position(done);
            b
        });
        Reporter { bar, interval: interval as u64, epoch, steps }
    }

    /// Called after step `step` (0-based) of the epoch.
    pub(super) fn step(&self, step: u64, r: &Running) {
        let done = step + 1;
        match &self.bar {
            Some(b) => {
                b.set_position(done);
                b.set_message(format!(
                    "loss {:.4} acc {:.2}% {:.0} img/s lr {:.4}",
                    r.loss,
                    r.acc * 100.0,
                    r.img_s,
                    r.lr
                ));
            }
            None if done.is_multiple_of(self.interval) || done == self.steps => {
                info!(
                    epoch = self.epoch + 1,
                    step = done,
                    steps = self.steps,
                    loss = r.loss,
                    acc = r.acc,
                    img_s = r.img_s,
                    lr = r.lr,
                    "train"
                );
            }
            None => {}
        }
    }

    pub(super) fn finish(&self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
    }
}
