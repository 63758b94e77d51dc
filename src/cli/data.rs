//! `incept data`: a synthetic dataset in the CIFAR-10 format, and a check of a CIFAR-10 folder.

use anyhow::Result;
use clap::Subcommand;
use std::path::PathBuf;

#[derive(Subcommand)]
pub enum DataCommand {
    /// Write a small synthetic dataset with learnable classes, in the CIFAR-10 binary format.
    Synth {
        /// Folder to write data_batch_1..5.bin and test_batch.bin into.
        #[arg(long)]
        out: PathBuf,
        /// Training images (spread over the five batch files).
        #[arg(long, default_value_t = 5000)]
        train: usize,
        /// Test images.
        #[arg(long, default_value_t = 1000)]
        test: usize,
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
    /// Print the images per class of a CIFAR-10 folder and any problem found.
    Check {
        #[arg(default_value = "data/cifar-10-batches-bin")]
        dir: PathBuf,
    },
}

pub fn run(command: DataCommand) -> Result<()> {
    match command {
        DataCommand::Synth { out, train, test, seed } => {
            incept::data::write_synthetic(&out, train, test, seed)?;
            println!("wrote {train} training and {test} test images to {}", out.display());
        }
        DataCommand::Check { dir } => print!("{}", incept::data::check(&dir)?),
    }
    Ok(())
}
