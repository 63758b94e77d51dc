//! The `incept` binary: logging, Ctrl-C, and the command line of [`cli`].

use clap::Parser;
use incept::train;
use std::process::ExitCode;
use std::sync::atomic::Ordering;

mod cli;

use cli::{Cli, LogFormat};

fn main() -> ExitCode {
    incept::keep_freed_memory();
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    match cli.log_format {
        LogFormat::Text => logs.init(),
        LogFormat::Json => logs.json().init(),
    }
    // First Ctrl-C (or SIGTERM, as a launcher or scheduler sends): finish the step, save, exit
    // 130. Second: exit at once (checkpoints are written atomically, so none is left
    // half-written).
    let _ = ctrlc::set_handler(|| {
        if train::STOP.swap(true, Ordering::SeqCst) {
            std::process::exit(130);
        }
        eprintln!(
            "\nstop requested (Ctrl-C or SIGTERM): finishing the current step and saving a checkpoint (again to quit now)"
        );
    });
    match cli::run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
