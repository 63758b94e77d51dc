//! A CIFAR-10 split, memory-mapped and validated: every expected file present, a whole number
//! of records, every label below 10; errors name the file and say what to do.

use super::*;

/// One split, memory-mapped (memmap2), never copied into memory.
pub struct Cifar10 {
    pub(super) files: Vec<MappedFile>,
    /// `ends[k]`: records in files `0..=k`, so record `i` lives in the first file whose end
    /// exceeds `i`.
    pub(super) ends: Vec<usize>,
    counts: [usize; 10],
}

pub(super) struct MappedFile {
    pub(super) name: &'static str,
    pub(super) map: Mmap,
}

impl Cifar10 {
    /// Opens and validates: each expected file exists, its size is a non-zero multiple of
    /// [`RECORD`], and every label is below 10. Errors name the file and say what to do.
    pub fn open(dir: &Path, split: Split) -> Result<Cifar10> {
        let mut files = Vec::new();
        let mut ends = Vec::new();
        let mut counts = [0usize; 10];
        let mut total = 0;
        for &name in split.files() {
            let path = dir.join(name);
            let map = map_records(&path, dir)?;
            // Reading every label touches every page once; it is the only way to know that
            // `label()` can never hand out a class that does not exist.
            for (r, record) in map.chunks_exact(RECORD).enumerate() {
                let label = record[0];
                if usize::from(label) >= CLASSES.len() {
                    bail!(
                        "{}: record {r} has label {label}, but CIFAR-10 labels are 0 to 9: the \
                         file is damaged or not CIFAR-10 binary",
                        path.display()
                    );
                }
                counts[usize::from(label)] += 1;
            }
            total += map.len() / RECORD;
            ends.push(total);
            files.push(MappedFile { name, map });
        }
        if total == 0 {
            // Unreachable while every file must be non-empty; kept so an empty set can never
            // reach training as a division by zero.
            bail!("{}: the {} split has no records", dir.display(), split.name());
        }
        Ok(Cifar10 { files, ends, counts })
    }

    pub fn len(&self) -> usize {
        self.ends.last().copied().unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The class of record `i`, below 10. Panics when `i >= len()`.
    pub fn label(&self, i: usize) -> u8 {
        self.record(i)[0]
    }

    /// The 3072 image bytes of record `i` (R, G, B planes). Panics when `i >= len()`.
    pub fn image(&self, i: usize) -> &[u8] {
        &self.record(i)[1..]
    }

    /// The raw records ([`RECORD`] bytes each: label, then the R, G, B planes), file by file
    /// in record order: what a device copies once to build batches itself.
    pub fn record_chunks(&self) -> impl Iterator<Item = &[u8]> {
        self.files.iter().map(|f| &f.map[..])
    }

    /// Records per class.
    pub fn class_counts(&self) -> [usize; 10] {
        self.counts
    }

    fn record(&self, i: usize) -> &[u8] {
        assert!(i < self.len(), "record {i} out of range: the split has {} records", self.len());
        let k = self.ends.partition_point(|&end| end <= i);
        let first = if k == 0 { 0 } else { self.ends[k - 1] };
        let offset = (i - first) * RECORD;
        &self.files[k].map[offset..offset + RECORD]
    }
}

/// Maps one data file after checking that it is a whole number of records.
fn map_records(path: &Path, dir: &Path) -> Result<Mmap> {
    let file = match File::open(path) {
        Ok(file) => file,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            let what = if dir.is_dir() {
                format!("{} not found", path.display())
            } else {
                format!(
                    "{} not found (the folder {} does not exist)",
                    path.display(),
                    dir.display()
                )
            };
            bail!(
                "{what}. Get CIFAR-10 with `incept train --download`, or download {OFFICIAL_URL}, \
                 unpack it and put the files of its {ARCHIVE_DIR}/ folder ({} ... {}, {TEST_FILE}) \
                 under {}",
                TRAIN_FILES[0],
                TRAIN_FILES[4],
                dir.display()
            );
        }
        Err(e) => return Err(e).with_context(|| format!("cannot open {}", path.display())),
    };
    let meta =
        file.metadata().with_context(|| format!("cannot read the size of {}", path.display()))?;
    if !meta.is_file() {
        bail!("{} is not a regular file", path.display());
    }
    let size = meta.len();
    if size == 0 {
        bail!("{} is empty (0 bytes): it is truncated or not CIFAR-10 binary", path.display());
    }
    if size % RECORD as u64 != 0 {
        bail!(
            "{} has {size} bytes, not a multiple of the {RECORD}-byte CIFAR-10 record: it is \
             truncated or not CIFAR-10 binary (the official files have 10000 records, {} bytes)",
            path.display(),
            10_000 * RECORD
        );
    }
    // SAFETY: the map is read-only and lives inside `Cifar10`; the data files are not
    // written while training reads them, and another process truncating them under us is
    // outside what this program defends against.
    unsafe { Mmap::map(&file) }.with_context(|| format!("cannot map {}", path.display()))
}
