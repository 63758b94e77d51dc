//! Checkpoints: the model (PyTorch-loadable) and beside it the training state (momentum
//! buffers, step counters, seed, running sums), written atomically; and resuming from them.

use super::*;

/// Where a run stands: what a checkpoint needs besides the model.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Progress {
    /// Epoch being trained (0-based).
    pub epoch: u64,
    /// Steps of that epoch already done.
    pub step_in_epoch: u64,
    /// Optimizer steps done in the whole run.
    pub global_step: u64,
    pub best_acc: f64,
    /// Running sums of the epoch so far (summed loss, correct and seen images), so an epoch
    /// interrupted and resumed still reports its whole training loss and accuracy.
    pub epoch_loss_sum: f64,
    pub epoch_correct: u64,
    pub epoch_seen: u64,
}

/// Paths of a checkpoint: the model (PyTorch-loadable) and its training state beside it.
pub fn state_path(model: &Path) -> PathBuf {
    let name = model.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default();
    let stem = name.strip_suffix(".safetensors").unwrap_or(&name);
    model.with_file_name(format!("{stem}.state.safetensors"))
}

/// Writes `<name>.safetensors` (the model's state_dict, loadable by PyTorch with strict=True)
/// and `<name>.state.safetensors` (momentum buffers, step counters, seed, batch size).
pub(super) fn save_checkpoint<B: Backend<f32>>(
    net: &mut Net<f32, B>, dir: &Path, name: &str, p: &Progress, cfg: &TrainConfig, world: usize,
) -> Result<PathBuf> {
    let model_path = dir.join(format!("{name}.safetensors"));
    let meta = HashMap::from([
        ("model".to_string(), net.spec.name.clone()),
        ("format".to_string(), "pytorch state_dict".to_string()),
        ("global_step".to_string(), p.global_step.to_string()),
        ("epoch".to_string(), p.epoch.to_string()),
    ]);
    let mut state: Vec<(String, OwnedTensor)> = net
        .momentum()
        .into_iter()
        .map(|(n, v)| (format!("optimizer.momentum.{n}"), OwnedTensor::f32(vec![v.len()], v)))
        .collect();
    let scalar = |v: u64| OwnedTensor::i64(vec![], [v as i64]);
    state.push(("train.epoch".into(), scalar(p.epoch)));
    state.push(("train.step_in_epoch".into(), scalar(p.step_in_epoch)));
    state.push(("train.global_step".into(), scalar(p.global_step)));
    state.push(("train.sgd_steps".into(), scalar(net.sgd_steps)));
    // All randomness derives from the seed and the position, so the seed is the RNG state.
    state.push(("train.rng_seed".into(), scalar(cfg.seed)));
    state.push(("train.batch_size".into(), scalar(cfg.batch_size as u64)));
    // The ranks of a data-parallel run: its steps are global batches of batch_size × world.
    state.push(("train.world_size".into(), scalar(world as u64)));
    state.push(("train.best_acc".into(), OwnedTensor::f64(vec![], [p.best_acc])));
    state.push(("train.epoch_loss_sum".into(), OwnedTensor::f64(vec![], [p.epoch_loss_sum])));
    state.push(("train.epoch_correct".into(), scalar(p.epoch_correct)));
    // Mixed precision: the dynamic loss scale, so a resumed run does not restart at 2^16 and
    // skip steps finding its way back.
    if let Some((scale, _)) = net.backend().loss_scale()? {
        state.push(("train.loss_scale".into(), OwnedTensor::f64(vec![], [scale])));
    }
    state.push(("train.epoch_seen".into(), scalar(p.epoch_seen)));
    // The state goes first: if the model write fails, the step counters of the pair disagree
    // and a resume refuses the pair instead of mixing two steps.
    save(&state_path(&model_path), &state, meta.clone())?;
    save(&model_path, &model_tensors(net), meta)?;
    Ok(model_path)
}

pub(super) fn scalar(file: &TensorFile, name: &str) -> Result<f64> {
    let (v, _) = file.read_f64(name)?;
    v.first().copied().with_context(|| format!("{}: {name} is empty", file.path().display()))
}

/// Loads a checkpoint pair written by [`save_checkpoint`] and returns where the run stood.
pub(super) fn resume_from<B: Backend<f32>>(
    net: &mut Net<f32, B>, path: &Path, cfg: &TrainConfig, (world, steps_per_epoch): (usize, u64),
) -> Result<Progress> {
    let model = TensorFile::open(path)?;
    let sp = state_path(path);
    if !sp.exists() {
        bail!(
            "{} has no training state beside it (expected {}); to start a new run from these weights use --initial-checkpoint",
            path.display(),
            sp.display()
        );
    }
    let state = TensorFile::open(&sp)?;
    let mut p = Progress {
        epoch: scalar(&state, "train.epoch")? as u64,
        step_in_epoch: scalar(&state, "train.step_in_epoch")? as u64,
        global_step: scalar(&state, "train.global_step")? as u64,
        best_acc: scalar(&state, "train.best_acc")?,
        epoch_loss_sum: scalar(&state, "train.epoch_loss_sum")?,
        epoch_correct: scalar(&state, "train.epoch_correct")? as u64,
        epoch_seen: scalar(&state, "train.epoch_seen")? as u64,
    };
    let model_step = model.metadata()?.get("global_step").cloned().unwrap_or_default();
    if model_step != p.global_step.to_string() {
        bail!(
            "{} (step {model_step}) and {} (step {}) are from different steps; the last save was interrupted — resume from another checkpoint",
            path.display(),
            sp.display(),
            p.global_step
        );
    }
    let batch = scalar(&state, "train.batch_size")? as usize;
    if batch != cfg.batch_size {
        bail!(
            "{} was trained with --batch-size {batch}; resume with the same batch size",
            path.display()
        );
    }
    // Written since data-parallel training; a checkpoint without it is of one process.
    let saved_world = if state.tensors()?.names().contains(&"train.world_size") {
        scalar(&state, "train.world_size")? as usize
    } else {
        1
    };
    if saved_world != world {
        // The steps were global batches of the saved world's size: continue from the same
        // image of the epoch, with the learning rate where this run's schedule has it.
        p.step_in_epoch = steps_for_world(p.step_in_epoch, batch, saved_world, world)
            .with_context(|| format!("resuming {}", path.display()))?;
        p.global_step = p.epoch * steps_per_epoch + p.step_in_epoch;
        tracing::info!(
            saved_ranks = saved_world,
            ranks = world,
            step_in_epoch = p.step_in_epoch,
            "resuming with another number of ranks"
        );
    }
    let seed = scalar(&state, "train.rng_seed")? as u64;
    if seed != cfg.seed {
        bail!("{} was trained with --seed {seed}; resume with the same seed", path.display());
    }
    load_model(net, &model, "")?;
    net.set_momentum(|name, _| Ok(state.read::<f32>(&format!("optimizer.momentum.{name}"))?.0))?;
    net.sgd_steps = scalar(&state, "train.sgd_steps")? as u64;
    // Present when the run was in mixed precision; a run resumed in fp32 has no use for it.
    if state.tensors()?.names().contains(&"train.loss_scale") {
        let scale = scalar(&state, "train.loss_scale")?;
        if !(scale.is_finite() && scale > 0.0) {
            bail!("{}: train.loss_scale is {scale}, not a positive number", sp.display());
        }
        net.backend_mut().restore_loss_scale(scale)?;
    }
    Ok(p)
}

/// The step of an epoch at which `world` ranks of `batch` images each stand where `saved_world`
/// ranks stood after `step` steps: the same number of images done. An error if that number
/// falls inside a global batch of the new size.
pub(super) fn steps_for_world(
    step: u64, batch: usize, saved_world: usize, world: usize,
) -> Result<u64> {
    let images = step * (batch * saved_world) as u64;
    let global = (batch * world) as u64;
    if !images.is_multiple_of(global) {
        bail!(
            "it stopped after {images} images of its epoch ({step} steps of {saved_world} rank(s) × {batch}), inside a global batch of {world} rank(s) × {batch}: resume with {saved_world} rank(s), or from a checkpoint taken at the end of an epoch"
        );
    }
    Ok(images / global)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_resume_with_other_ranks_continues_from_the_same_image() {
        assert_eq!(steps_for_world(6, 16, 2, 1).unwrap(), 12);
        assert_eq!(steps_for_world(6, 16, 1, 2).unwrap(), 3);
        assert_eq!(steps_for_world(0, 16, 3, 4).unwrap(), 0);
        let err = format!("{:#}", steps_for_world(5, 16, 1, 2).unwrap_err());
        assert!(err.contains("after 80 images") && err.contains("resume with 1 rank(s)"), "{err}");
    }
}
