//! `incept train`: the flags are [`TrainConfig`], the loop is `incept::train`.

use anyhow::Result;
use incept::train::{self, Outcome, TrainConfig};
use std::process::ExitCode;

/// Trains; exits 130 after Ctrl-C, once the checkpoint to resume from is saved.
pub fn run(cfg: &TrainConfig) -> Result<ExitCode> {
    super::set_threads(cfg.threads)?;
    let (run_dir, outcome) = train::train(cfg)?;
    if outcome == Outcome::Interrupted {
        eprintln!(
            "interrupted; continue with: incept train --resume {}",
            run_dir.join("last.safetensors").display()
        );
        return Ok(ExitCode::from(130));
    }
    println!("run folder: {}", run_dir.display());
    Ok(ExitCode::SUCCESS)
}
