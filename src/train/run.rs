//! The epochs of a run: its folder (new, or the one resumed), then per epoch the steps in the
//! epoch's order with the learning rate of each, the losses read back as they come, an
//! evaluation, a row of metrics and a checkpoint. Ctrl-C stops after the current step with a
//! checkpoint that resumes exactly.

use super::*;
use crate::dist::ddp::{average_running_stats, broadcast_state};

/// Where the last good checkpoint is, for a message about stopping without saving.
fn last_good(run_dir: &Path) -> String {
    let last = run_dir.join("last.safetensors");
    if last.exists() {
        format!("the last good checkpoint is {}", last.display())
    } else {
        "no checkpoint was saved yet".to_string()
    }
}

/// The run folder and where the run stands: the resumed checkpoint's, or a new folder (with
/// the initial weights loaded, if given) at the start.
fn open_run<B: Backend<f32>>(
    cfg: &TrainConfig, net: &mut Net<f32, B>, (rank, world): (usize, usize), steps_per_epoch: u64,
) -> Result<(PathBuf, Progress)> {
    if let Some(path) = &cfg.resume {
        let p = resume_from(net, path, cfg, (world, steps_per_epoch))?;
        let dir = path
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or(Path::new("."))
            .to_path_buf();
        info!(checkpoint = %path.display(), epoch = p.epoch + 1, step = p.step_in_epoch, "resuming");
        return Ok((dir, p));
    }
    if let Some(init) = &cfg.initial_checkpoint {
        load_model(net, &TensorFile::open(init)?, "")?;
        info!(checkpoint = %init.display(), "initial weights loaded");
    }
    let name = cfg.experiment.clone().unwrap_or_else(timestamp);
    let dir = cfg.output.join(name);
    let p = Progress {
        epoch: 0,
        step_in_epoch: 0,
        global_step: 0,
        best_acc: f64::NEG_INFINITY,
        epoch_loss_sum: 0.0,
        epoch_correct: 0,
        epoch_seen: 0,
    };
    // Rank 0 alone writes the run folder.
    if rank != 0 {
        return Ok((dir, p));
    }
    if dir.join("summary.csv").exists() {
        bail!(
            "{} already holds a run; choose another --experiment or continue it with --resume {}",
            dir.display(),
            dir.join("last.safetensors").display()
        );
    }
    std::fs::create_dir_all(&dir)
        .with_context(|| format!("cannot create the run folder {}", dir.display()))?;
    append(&dir.join("summary.csv"), CSV_HEADER)?;
    Ok((dir, p))
}

/// Writes the run's flags to `args.json` (rewritten on resume, with the flags given then).
fn write_args(cfg: &TrainConfig, run_dir: &Path) -> Result<()> {
    let mut args = serde_json::to_value(cfg)?;
    args["nesterov"] = cfg.nesterov().into();
    let path = run_dir.join("args.json");
    std::fs::write(&path, serde_json::to_string_pretty(&args)? + "\n")
        .with_context(|| format!("cannot write {}", path.display()))
}

/// Steps per epoch over `n` images. The last partial batch is kept (as PyTorch's DataLoader
/// does) unless it has one image, which BatchNorm cannot normalise in training, or the steps
/// replay a CUDA graph of one batch size (`drop_last`).
fn steps_per_epoch(cfg: &TrainConfig, n: usize, world: usize, drop_last: bool) -> Result<u64> {
    let b = cfg.batch_size * world;
    let steps = if n % b == 1 || drop_last { n / b } else { n.div_ceil(b) } as u64;
    if steps == 0 {
        bail!(
            "{} has {n} training images, fewer than one global batch of {b} ({world} rank(s) of --batch-size {})",
            cfg.data_dir.display(),
            cfg.batch_size
        );
    }
    Ok(steps)
}

/// What an epoch's training steps leave for its summary.
struct EpochTrained {
    /// The learning rate of its last step.
    lr: f64,
    /// Images this process trained in the epoch (for images/s).
    seen_now: usize,
}

/// A run in progress.
struct Run<'a, B: Backend<f32>> {
    cfg: &'a TrainConfig,
    net: Net<f32, B>,
    stepper: &'a mut dyn Stepper<B>,
    run_dir: PathBuf,
    progress: Progress,
    schedule: LrSchedule,
    opt: Sgd,
    /// Global steps inside the profiler's capture (empty: none).
    profile: std::ops::Range<u64>,
    steps_per_epoch: u64,
    /// Training images.
    n: usize,
    /// This process's rank and the number of ranks (0 and 1 alone).
    rank: usize,
    world: usize,
}

impl<B: Backend<f32>> Run<'_, B> {
    /// Trains the rest of the current epoch; `None` if Ctrl-C stopped it (after saving).
    fn train_epoch(&mut self, started: Instant) -> Result<Option<EpochTrained>> {
        let (cfg, epoch) = (self.cfg, self.progress.epoch);
        // The global batch: this rank trains its slice of it.
        let b = self.cfg.batch_size * self.world;
        let order = data::epoch_order(self.n, cfg.seed, epoch);
        let reporter = Reporter::new(
            epoch,
            cfg.epochs,
            self.steps_per_epoch,
            self.progress.step_in_epoch,
            cfg.log_interval,
        );
        let mut seen_now = 0usize;
        let mut lr = self.schedule.lr(self.progress.global_step);
        // Images of the steps whose loss is still on the device.
        let mut pending: Vec<u64> = Vec::new();
        for step in self.progress.step_in_epoch..self.steps_per_epoch {
            let start = step as usize * b;
            let idx = &order[start..(start + b).min(self.n)];
            lr = self.schedule.lr(self.progress.global_step);
            let out = self.step(idx, start as u64, lr);
            if let Err(e) = self.count(out, idx.len() as u64, &mut pending, step) {
                reporter.finish();
                return Err(e);
            }
            self.progress.step_in_epoch = step + 1;
            seen_now += idx.len();
            let seen = self.progress.epoch_seen.max(1) as f64;
            reporter.step(
                step,
                &Running {
                    loss: self.progress.epoch_loss_sum / seen,
                    acc: self.progress.epoch_correct as f64 / seen,
                    img_s: seen_now as f64 / started.elapsed().as_secs_f64(),
                    lr,
                },
            );
            // Data-parallel ranks stop together, at the step where any of them was asked to.
            let stop = self.stepper.agreed_stop().unwrap_or_else(|| STOP.load(Ordering::SeqCst));
            if stop {
                STOP.store(true, Ordering::SeqCst);
                reporter.finish();
                let path = self.save("last")?;
                let path = path.map_or_else(|| "rank 0's".to_string(), |p| p.display().to_string());
                warn!(checkpoint = %path, epoch = epoch + 1, step = step + 1, "interrupted: checkpoint saved; continue with --resume");
                return Ok(None);
            }
        }
        reporter.finish();
        self.stepper.end_epoch();
        Ok(Some(EpochTrained { lr, seen_now }))
    }

    /// One optimizer step on the images `idx` (the epoch's images from `start` on), inside the
    /// profiler's capture where `--profile-steps` asks.
    fn step(&mut self, idx: &[usize], start: u64, lr: f64) -> Result<Option<(f64, u64)>> {
        let global = self.progress.global_step;
        if self.profile.start == global {
            self.net.backend().profiler(true)?;
            info!(step = global, "profiler capture started");
        }
        self.opt.lr = lr;
        self.net.backend().range_push(&format!("step {global}"));
        let out = self.stepper.step(
            &mut self.net,
            idx,
            self.progress.epoch,
            start,
            &self.opt,
            self.cfg.smoothing,
        );
        self.net.backend().range_pop();
        let out = out?;
        self.progress.global_step += 1;
        if self.profile.end == self.progress.global_step {
            self.net.backend().profiler(false)?;
            info!(step = global, "profiler capture stopped");
        }
        Ok(out)
    }

    /// Adds a step's loss and correct count to the epoch's sums, or holds the step as pending
    /// while they stay on the device: read back every `--log-interval` steps, at the end of the
    /// epoch and before stopping. A loss that is not finite stops the run without saving.
    fn count(
        &mut self, out: Result<Option<(f64, u64)>>, images: u64, pending: &mut Vec<u64>, step: u64,
    ) -> Result<()> {
        let p = &mut self.progress;
        match out? {
            Some((loss, _)) if !loss.is_finite() => bail!(
                "the loss became {loss} at epoch {} step {} (global step {}); stopping without saving ({}). Lower --lr, or check the data",
                p.epoch + 1,
                step + 1,
                p.global_step,
                last_good(&self.run_dir),
            ),
            Some((loss, correct)) => {
                p.epoch_loss_sum += loss * images as f64;
                p.epoch_correct += correct;
                p.epoch_seen += images;
            }
            None => pending.push(images),
        }
        let last = step + 1 == self.steps_per_epoch;
        if pending.is_empty()
            || !(pending.len() >= self.cfg.log_interval || last || STOP.load(Ordering::SeqCst))
        {
            return Ok(());
        }
        let (loss_sum, correct) = self.stepper.drain(&self.net)?;
        let p = &mut self.progress;
        if !loss_sum.is_finite() {
            bail!(
                "the loss became {loss_sum} within global steps {}..{} (epoch {}); stopping without saving ({}). Lower --lr, or check the data",
                p.global_step + 1 - pending.len() as u64,
                p.global_step,
                p.epoch + 1,
                last_good(&self.run_dir),
            );
        }
        p.epoch_loss_sum += loss_sum;
        p.epoch_correct += correct;
        p.epoch_seen += pending.iter().sum::<u64>();
        pending.clear();
        Ok(())
    }

    /// Evaluates, records the epoch's row, and saves `last` (and `best` when it improved).
    fn end_epoch(
        &mut self, test_set: &Cifar10, trained: EpochTrained, started: Instant,
    ) -> Result<()> {
        let train_secs = started.elapsed().as_secs_f64();
        // The ranks evaluate the one model (the running statistics averaged over them), each
        // its share of the test set.
        let batch = self.cfg.eval_batch_size;
        let ev = match self.stepper.group() {
            Some(group) => {
                average_running_stats(&mut self.net, group)?;
                evaluate_shared(&mut self.net, test_set, batch, group)?
            }
            None => evaluate(&mut self.net, test_set, batch)?,
        };
        let p = &self.progress;
        let per_image = |v: f64| {
            if p.epoch_seen > 0 {
                v / p.epoch_seen as f64
            } else {
                f64::NAN
            }
        };
        let row = EpochRow {
            epoch: p.epoch + 1,
            lr: trained.lr,
            train_loss: per_image(p.epoch_loss_sum),
            train_acc: per_image(p.epoch_correct as f64),
            test_loss: ev.loss,
            test_acc: ev.accuracy,
            img_per_s: trained.seen_now as f64 / train_secs,
            seconds: started.elapsed().as_secs_f64(),
        };
        info!(
            epoch = row.epoch,
            train_loss = row.train_loss,
            train_acc = row.train_acc,
            test_loss = row.test_loss,
            test_acc = row.test_acc,
            img_s = row.img_per_s,
            seconds = row.seconds,
            "epoch done"
        );
        if let Some((scale, skipped)) = self.net.backend().loss_scale()? {
            info!(loss_scale = scale, skipped_steps = skipped, "mixed precision");
        }
        if self.rank == 0 {
            append(&self.run_dir.join("summary.csv"), &row.csv())?;
            append(&self.run_dir.join("metrics.jsonl"), &serde_json::to_string(&row)?)?;
        }
        let p = &mut self.progress;
        p.epoch += 1;
        p.step_in_epoch = 0;
        p.epoch_loss_sum = 0.0;
        p.epoch_correct = 0;
        p.epoch_seen = 0;
        let improved = ev.accuracy > p.best_acc;
        if improved {
            p.best_acc = ev.accuracy;
        }
        // The running statistics were averaged for the evaluation just now.
        if self.rank == 0 {
            let world = self.world;
            save_checkpoint(&mut self.net, &self.run_dir, "last", &self.progress, self.cfg, world)?;
            if improved {
                crate::checkpoint::save_model(
                    &mut self.net,
                    &self.run_dir.join("best.safetensors"),
                )?;
            }
        }
        Ok(())
    }

    /// Saves the checkpoint `name` on rank 0 (after averaging the ranks' running statistics,
    /// which every rank takes part in); `None` on the other ranks.
    fn save(&mut self, name: &str) -> Result<Option<PathBuf>> {
        if let Some(group) = self.stepper.group() {
            average_running_stats(&mut self.net, group)?;
        }
        if self.rank != 0 {
            return Ok(None);
        }
        let world = self.world;
        save_checkpoint(&mut self.net, &self.run_dir, name, &self.progress, self.cfg, world)
            .map(Some)
    }
}

/// The epochs of [`train`] on an already built network.
pub(super) fn train_loop<B: Backend<f32>>(
    cfg: &TrainConfig, mut net: Net<f32, B>, stepper: &mut dyn Stepper<B>, train_set: &Cifar10,
    test_set: &Cifar10,
) -> Result<(PathBuf, Outcome)> {
    let (rank, world) = stepper.group().map_or((0, 1), |g| (g.rank(), g.world()));
    let n = train_set.len();
    let steps_per_epoch = steps_per_epoch(cfg, n, world, stepper.drop_last())?;
    let (run_dir, progress) = open_run(cfg, &mut net, (rank, world), steps_per_epoch)?;
    if let Some(group) = stepper.group() {
        // Every rank starts from rank 0's weights (and a resumed run from the one checkpoint).
        broadcast_state(&mut net, group)?;
    }
    if rank == 0 {
        write_args(cfg, &run_dir)?;
    }
    info!(
        run = %run_dir.display(), train = n, test = test_set.len(), epochs = cfg.epochs,
        batch = cfg.batch_size, ranks = world, steps_per_epoch, threads = rayon::current_num_threads(),
        "training {}", net.spec.name
    );
    let mut run = Run {
        cfg,
        net,
        stepper,
        run_dir,
        progress,
        schedule: LrSchedule {
            sched: cfg.sched,
            lr: cfg.lr,
            total_steps: steps_per_epoch * cfg.epochs as u64,
            steps_per_epoch,
            warmup_epochs: cfg.warmup_epochs,
            decay_epochs: cfg.decay_epochs,
            decay_rate: cfg.decay_rate,
        },
        opt: Sgd {
            lr: cfg.lr,
            momentum: cfg.momentum,
            weight_decay: cfg.weight_decay,
            nesterov: cfg.nesterov(),
        },
        // Validated with the flags; an empty range (no capture) without the flag.
        profile: match &cfg.profile_steps {
            Some(r) => parse_steps(r)?,
            None => u64::MAX..u64::MAX,
        },
        steps_per_epoch,
        n,
        rank,
        world,
    };
    while (run.progress.epoch as usize) < cfg.epochs {
        let started = Instant::now();
        let Some(trained) = run.train_epoch(started)? else {
            return Ok((run.run_dir, Outcome::Interrupted));
        };
        run.end_epoch(test_set, trained, started)?;
        if STOP.load(Ordering::SeqCst) {
            return Ok((run.run_dir, Outcome::Interrupted));
        }
    }
    if rank == 0 {
        info!(run = %run.run_dir.display(), best_acc = run.progress.best_acc, "training finished");
    } else {
        info!(best_acc = run.progress.best_acc, "training finished");
    }
    Ok((run.run_dir, Outcome::Finished))
}
