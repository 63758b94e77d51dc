//! `incept data check`: images per class of a CIFAR-10 folder, and any problem found.

use super::*;

/// What `incept data check DIR` prints: per split, record count and per-class counts, and any
/// problem found. Returns `Err` with the first problem that makes the data unusable.
pub fn check(dir: &Path) -> Result<String> {
    let mut report = format!("CIFAR-10 binary data in {}\n", dir.display());
    let mut problems = Vec::new();
    for split in [Split::Train, Split::Test] {
        let ds = Cifar10::open(dir, split)?;
        let mut first = 0;
        let per_file: Vec<String> = ds
            .files
            .iter()
            .zip(&ds.ends)
            .map(|(file, &end)| {
                let text = format!("{} {}", file.name, end - first);
                first = end;
                text
            })
            .collect();
        let _ =
            writeln!(report, "{}: {} records ({})", split.name(), ds.len(), per_file.join(", "));
        let counts = ds.class_counts();
        for (name, count) in CLASSES.iter().zip(counts) {
            let _ = writeln!(report, "  {name:<10} {count:>6}");
        }
        if ds.len() != split.official_len() {
            problems.push(format!(
                "{}: {} records where CIFAR-10 has {} (synthetic or partial data)",
                split.name(),
                ds.len(),
                split.official_len()
            ));
        }
        for (name, &count) in CLASSES.iter().zip(&counts) {
            if count == 0 {
                problems.push(format!("{}: no records of class {name}", split.name()));
            }
        }
        let (min, max) = (counts.iter().min(), counts.iter().max());
        if let (Some(&min), Some(&max)) = (min, max) {
            if min > 0 && max > 2 * min {
                problems.push(format!(
                    "{}: unbalanced classes ({min} to {max} records per class)",
                    split.name()
                ));
            }
        }
    }
    if problems.is_empty() {
        report.push_str("no problems found\n");
    } else {
        report.push_str("usable, but:\n");
        for problem in problems {
            let _ = writeln!(report, "  - {problem}");
        }
    }
    Ok(report)
}
