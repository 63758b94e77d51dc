//! `incept report`: a run's loss and accuracy curves as an SVG.

use anyhow::Result;
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct ReportArgs {
    /// The run folder (holds summary.csv).
    run: PathBuf,
}

pub fn run(args: ReportArgs) -> Result<()> {
    println!("{}", incept::report::report(&args.run)?.display());
    Ok(())
}
