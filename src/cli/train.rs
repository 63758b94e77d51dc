//! `incept train`: the flags are [`TrainConfig`], the loop is `incept::train`.

use anyhow::Result;
use incept::train::{self, Outcome, TrainConfig};
use std::process::ExitCode;

/// Trains; exits 130 after Ctrl-C, once the checkpoint to resume from is saved.
pub fn run(cfg: &TrainConfig) -> Result<ExitCode> {
    super::set_threads(cfg.threads)?;
    let (run_dir, outcome) = train::train(cfg)?;
    // In a data-parallel run rank 0 alone writes the run folder.
    let rank = incept::dist::place::from_env(|k| std::env::var(k).ok())?.map_or(0, |p| p.rank);
    if rank != 0 {
        if outcome == Outcome::Interrupted {
            eprintln!("interrupted; rank 0 saved the checkpoint to resume from");
            return Ok(ExitCode::from(130));
        }
        println!("rank {rank} done; rank 0 wrote the run folder");
        return Ok(ExitCode::SUCCESS);
    }
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
