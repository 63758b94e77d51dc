//! CIFAR-10 in its binary format: loading (memory-mapped, validated), batches with
//! augmentation, a synthetic stand-in for tests, `incept data check`, and the download.
//!
//! A record is one label byte followed by 3072 image bytes: the R plane, then G, then B, each
//! 32×32 row-major. The network takes NHWC `f32`, so [`make_batch`] interleaves the planes
//! while it normalises.
//!
//! Everything random here (epoch order, augmentation, synthetic images) is a pure function of
//! its seed and position, drawn from ChaCha8 keyed directly with those numbers: a batch is the
//! same whatever thread builds it, and a run can be resumed at any epoch.

use anyhow::{anyhow, bail, Context, Result};
use md5::{Digest, Md5};
use memmap2::Mmap;
use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use sha2::Sha256;
use std::fmt::Write as _;
use std::fs::{self, File};
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::ops::Range;
use std::path::{Component, Path, PathBuf};
use std::time::Duration;

pub const CLASSES: [&str; 10] = [
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
];
/// Per-channel mean of the CIFAR-10 training images (RGB, pixel values scaled to [0, 1]).
pub const MEAN: [f32; 3] = [0.4914, 0.4822, 0.4465];
/// Per-channel standard deviation of the CIFAR-10 training images.
pub const STD: [f32; 3] = [0.2470, 0.2435, 0.2616];
/// Bytes per record: 1 label byte + 3072 image bytes (R, G, B planes of 32×32, row-major).
pub const RECORD: usize = 3073;
pub const TRAIN_FILES: [&str; 5] = [
    "data_batch_1.bin",
    "data_batch_2.bin",
    "data_batch_3.bin",
    "data_batch_4.bin",
    "data_batch_5.bin",
];
pub const TEST_FILE: &str = "test_batch.bin";
const TEST_FILES: [&str; 1] = [TEST_FILE];

const SIDE: usize = 32;
const PLANE: usize = SIDE * SIDE;
const PIXELS: usize = 3 * PLANE;
/// Zero padding of the random crop, on each side.
const PAD: usize = 4;

const OFFICIAL_URL: &str = "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz";
/// The folder inside the official archive that holds the files.
const ARCHIVE_DIR: &str = "cifar-10-batches-bin";
/// Every member taken from the archive; the first six are the data, the rest documentation.
const MEMBERS: [&str; 8] = [
    "data_batch_1.bin",
    "data_batch_2.bin",
    "data_batch_3.bin",
    "data_batch_4.bin",
    "data_batch_5.bin",
    "test_batch.bin",
    "batches.meta.txt",
    "readme.html",
];
const DATA_FILES: usize = 6;

/// Keys for the random streams, so that equal seeds never give correlated streams for
/// different purposes.
const STREAM_ORDER: u64 = 1;
const STREAM_AUGMENT: u64 = 2;
const STREAM_SYNTHETIC: u64 = 3;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Split {
    Train,
    Test,
}

impl Split {
    fn files(self) -> &'static [&'static str] {
        match self {
            Split::Train => &TRAIN_FILES,
            Split::Test => &TEST_FILES,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Split::Train => "train",
            Split::Test => "test",
        }
    }

    /// Records in the official data set.
    fn official_len(self) -> usize {
        match self {
            Split::Train => 50_000,
            Split::Test => 10_000,
        }
    }
}

/// One split, memory-mapped (memmap2), never copied into memory.
pub struct Cifar10 {
    files: Vec<MappedFile>,
    /// `ends[k]`: records in files `0..=k`, so record `i` lives in the first file whose end
    /// exceeds `i`.
    ends: Vec<usize>,
    counts: [usize; 10],
}

struct MappedFile {
    name: &'static str,
    map: Mmap,
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
            bail!(
                "{}: the {} split has no records",
                dir.display(),
                split.name()
            );
        }
        Ok(Cifar10 {
            files,
            ends,
            counts,
        })
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
        assert!(
            i < self.len(),
            "record {i} out of range: the split has {} records",
            self.len()
        );
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
    let meta = file
        .metadata()
        .with_context(|| format!("cannot read the size of {}", path.display()))?;
    if !meta.is_file() {
        bail!("{} is not a regular file", path.display());
    }
    let size = meta.len();
    if size == 0 {
        bail!(
            "{} is empty (0 bytes): it is truncated or not CIFAR-10 binary",
            path.display()
        );
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

/// Random augmentation of training images, as torchvision's `RandomCrop(32, padding=4)`
/// followed by `RandomHorizontalFlip()`.
#[derive(Clone, Copy, Debug)]
pub struct Augment {
    /// A random 32×32 window of the image zero-padded by 4 on each side; padding is byte 0,
    /// so it is normalised like a black pixel.
    pub crop: bool,
    /// Mirror left-right with probability 1/2.
    pub flip: bool,
}

impl Augment {
    pub const NONE: Augment = Augment {
        crop: false,
        flip: false,
    };
    pub const TRAIN: Augment = Augment {
        crop: true,
        flip: true,
    };
}

/// A ChaCha8 stream keyed with the four numbers verbatim: distinct inputs give distinct keys,
/// with no hash to collide.
fn stream(kind: u64, a: u64, b: u64, c: u64) -> ChaCha8Rng {
    let mut key = [0u8; 32];
    for (bytes, v) in key.chunks_exact_mut(8).zip([kind, a, b, c]) {
        bytes.copy_from_slice(&v.to_le_bytes());
    }
    ChaCha8Rng::from_seed(key)
}

/// A uniform integer in `0..n` (`n > 0`), by Lemire's multiply-and-reject on raw 64-bit
/// draws. Written out instead of `Rng::random_range` so that orders and augmentations depend
/// only on the ChaCha stream, not on the sampling algorithm of a given `rand` release.
fn below(rng: &mut ChaCha8Rng, n: u64) -> u64 {
    debug_assert!(n > 0);
    // 2^64 mod n: products whose low half falls below it would bias the high half.
    let reject_below = n.wrapping_neg() % n;
    loop {
        let product = u128::from(rng.next_u64()) * u128::from(n);
        if product as u64 >= reject_below {
            return (product >> 64) as u64;
        }
    }
}

/// A uniform `f32` in `[0, 1)`, from 24 random bits (exact in `f32`).
fn unit(rng: &mut ChaCha8Rng) -> f32 {
    (rng.next_u32() >> 8) as f32 / (1u32 << 24) as f32
}

/// Permutation of `0..n` for an epoch: a pure function of `(seed, epoch)` (ChaCha8 keyed with
/// both, Fisher-Yates).
pub fn epoch_order(n: usize, seed: u64, epoch: u64) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n).collect();
    let mut rng = stream(STREAM_ORDER, seed, epoch, 0);
    for i in (1..n).rev() {
        let j = below(&mut rng, i as u64 + 1) as usize;
        order.swap(i, j);
    }
    order
}

/// Fills `x` (resized to `indices.len()·32·32·3`, NHWC, `(pixel/255 - MEAN[c]) / STD[c]`) and
/// `y` (the labels) for the records `indices`. The augmentation of the image at position
/// `first_pos + j` of the epoch is a pure function of `(seed, epoch, first_pos + j)`, so the
/// batch is the same whatever thread builds it and however the epoch is cut into batches.
/// Parallel over images with rayon. Panics if an index is out of range.
#[allow(clippy::too_many_arguments)]
pub fn make_batch(
    ds: &Cifar10,
    indices: &[usize],
    aug: Augment,
    seed: u64,
    epoch: u64,
    first_pos: u64,
    x: &mut Vec<f32>,
    y: &mut Vec<u32>,
) {
    // 256 values per channel: the same expression as written in the doc, evaluated once.
    let mut table = [[0f32; 256]; 3];
    for (c, row) in table.iter_mut().enumerate() {
        for (v, out) in row.iter_mut().enumerate() {
            *out = (v as f32 / 255.0 - MEAN[c]) / STD[c];
        }
    }
    y.clear();
    y.extend(indices.iter().map(|&i| u32::from(ds.label(i))));
    x.resize(indices.len() * PIXELS, 0.0);
    x.par_chunks_mut(PIXELS)
        .zip(indices.par_iter())
        .enumerate()
        .for_each(|(j, (out, &i))| {
            let view = View::draw(aug, seed, epoch, first_pos + j as u64);
            view.render(ds.image(i), &table, out);
        });
}

/// The crop offsets `(dy, dx)` (each in −4..=4) and the flip of the image at position `pos` of
/// epoch `epoch`: what [`make_batch`] renders it with, for a device that renders the batch
/// itself (`cuda/data.cu`). Output pixel `(oy, ox)` shows source pixel `(oy + dy, ox' + dx)`,
/// `ox' = 31 − ox` when flipped.
pub fn augment_view(aug: Augment, seed: u64, epoch: u64, pos: u64) -> (i32, i32, bool) {
    let v = View::draw(aug, seed, epoch, pos);
    (v.dy as i32, v.dx as i32, v.flip)
}

/// Where one augmented image comes from: output pixel `(oy, ox)` shows source pixel
/// `(oy + dy, ox' + dx)`, where `ox' = 31 - ox` when flipped and `ox` otherwise.
struct View {
    dy: isize,
    dx: isize,
    flip: bool,
}

impl View {
    fn draw(aug: Augment, seed: u64, epoch: u64, pos: u64) -> View {
        if !aug.crop && !aug.flip {
            return View {
                dy: 0,
                dx: 0,
                flip: false,
            };
        }
        let mut rng = stream(STREAM_AUGMENT, seed, epoch, pos);
        // All three are always drawn, so turning crop off leaves the flips as they were.
        let span = 2 * PAD as u64 + 1;
        let dy = below(&mut rng, span) as isize - PAD as isize;
        let dx = below(&mut rng, span) as isize - PAD as isize;
        let heads = rng.next_u32() & 1 == 1;
        let (dy, dx) = if aug.crop { (dy, dx) } else { (0, 0) };
        View {
            dy,
            dx,
            flip: aug.flip && heads,
        }
    }

    /// Writes `image` (planar bytes) into `out` (NHWC, normalised through `table`).
    fn render(&self, image: &[u8], table: &[[f32; 256]; 3], out: &mut [f32]) {
        let inside = |v: isize| (0..SIDE as isize).contains(&v);
        for oy in 0..SIDE {
            let sy = oy as isize + self.dy;
            for ox in 0..SIDE {
                let cx = if self.flip { SIDE - 1 - ox } else { ox };
                let sx = cx as isize + self.dx;
                let pixel = &mut out[(oy * SIDE + ox) * 3..][..3];
                if inside(sy) && inside(sx) {
                    let at = sy as usize * SIDE + sx as usize;
                    for (c, v) in pixel.iter_mut().enumerate() {
                        *v = table[c][usize::from(image[c * PLANE + at])];
                    }
                } else {
                    for (c, v) in pixel.iter_mut().enumerate() {
                        *v = table[c][0];
                    }
                }
            }
        }
    }
}

/// Writes a small synthetic dataset in the exact CIFAR-10 binary format: `train` records
/// spread evenly over `data_batch_1..5.bin` (so `train >= 5`), `test >= 1` records in
/// `test_batch.bin`. Classes are balanced (record `i` of a split has class `i % 10`) and
/// deterministic in `seed`. Creates `dir` if missing.
///
/// Class `k` is a colour tint (`k % 5`) crossed with a stripe texture: horizontal stripes for
/// `k < 5`, vertical for `k >= 5`, with a period of `4 + k % 5` pixels. Both survive crops
/// (the stripes have a random phase anyway) and flips (horizontal and vertical stripes are
/// their own mirror images), so augmentation does not destroy the labels. Random tint
/// strength, stripe contrast, brightness and per-pixel noise keep any single pixel from
/// giving the class away.
pub fn write_synthetic(dir: &Path, train: usize, test: usize, seed: u64) -> Result<()> {
    let files = TRAIN_FILES.len();
    if train < files {
        bail!("synthetic data needs at least {files} training records (one per data_batch file), got {train}");
    }
    if test == 0 {
        bail!("synthetic data needs at least one test record");
    }
    fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let (per_file, extra) = (train / files, train % files);
    let mut first = 0;
    for (k, name) in TRAIN_FILES.iter().enumerate() {
        let count = per_file + usize::from(k < extra);
        write_synthetic_file(&dir.join(name), first..first + count, Split::Train, seed)?;
        first += count;
    }
    write_synthetic_file(&dir.join(TEST_FILE), 0..test, Split::Test, seed)
}

fn write_synthetic_file(path: &Path, records: Range<usize>, split: Split, seed: u64) -> Result<()> {
    let file = File::create(path).with_context(|| format!("cannot create {}", path.display()))?;
    let mut out = BufWriter::new(file);
    let mut record = [0u8; RECORD];
    for i in records {
        let label = (i % CLASSES.len()) as u8;
        let mut rng = stream(STREAM_SYNTHETIC, seed, split as u64, i as u64);
        record[0] = label;
        synthetic_image(label, &mut rng, &mut record[1..]);
        out.write_all(&record)
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    out.flush()
        .with_context(|| format!("cannot write {}", path.display()))
}

/// One synthetic image of class `label` into `image` (planar RGB bytes).
fn synthetic_image(label: u8, rng: &mut ChaCha8Rng, image: &mut [u8]) {
    // Tint directions in RGB; neighbours overlap once strength and noise vary.
    const TINTS: [[f32; 3]; 5] = [
        [1.0, -0.5, -0.5],
        [-0.5, 1.0, -0.5],
        [-0.5, -0.5, 1.0],
        [0.7, 0.7, -1.0],
        [0.7, -1.0, 0.7],
    ];
    let group = usize::from(label) % TINTS.len();
    let vertical = usize::from(label) >= TINTS.len();
    let period = (4 + group) as f32;
    let tint = 20.0 + 30.0 * unit(rng);
    let contrast = 15.0 + 25.0 * unit(rng);
    let brightness = 90.0 + 80.0 * unit(rng);
    let phase = unit(rng);
    for y in 0..SIDE {
        for x in 0..SIDE {
            let along = if vertical { x } else { y } as f32;
            // A triangle wave in [-1, 1]: basic float operations only, so the bytes are the
            // same on every platform (a libm `sin` need not be).
            let t = along / period + phase;
            let wave = 1.0 - 4.0 * (t - t.floor() - 0.5).abs();
            for (c, direction) in TINTS[group].iter().enumerate() {
                // Sum of two uniforms: noise in [-30, 30], denser near 0.
                let noise = 30.0 * (unit(rng) + unit(rng) - 1.0);
                let v = brightness + tint * direction + contrast * wave + noise;
                image[c * PLANE + y * SIDE + x] = v.round().clamp(0.0, 255.0) as u8;
            }
        }
    }
}

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
        let _ = writeln!(
            report,
            "{}: {} records ({})",
            split.name(),
            ds.len(),
            per_file.join(", ")
        );
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

/// Where to download from and what to expect.
#[derive(Clone, Debug)]
pub struct Source {
    pub url: String,
    pub size: u64,
    /// Lowercase hex.
    pub md5: String,
    /// Lowercase hex.
    pub sha256: String,
}

impl Source {
    /// The archive published by the authors of CIFAR-10.
    pub fn official() -> Source {
        Source {
            url: OFFICIAL_URL.to_string(),
            size: 170_052_171,
            md5: "c32a1d4ab5d03f1284b67883e8d87530".to_string(),
            sha256: "c4a38c50a1bc5f3a1c5537f2155ab9d68f9f25eb1ed8d9ddda3db29a59bca1dd".to_string(),
        }
    }
}

/// True when `dir` holds none of the data files (so training may download automatically).
pub fn is_empty_location(dir: &Path) -> bool {
    !MEMBERS[..DATA_FILES]
        .iter()
        .any(|name| dir.join(name).symlink_metadata().is_ok())
}

/// Downloads the archive, verifies its size, MD5 and SHA-256, unpacks only the expected
/// members of `cifar-10-batches-bin/` and moves them into `dir` (the folder that will hold
/// `data_batch_1.bin` ...), replacing files of the same names.
///
/// The archive and the unpacked files live in temporary entries of `dir`'s parent until
/// everything succeeded, including opening both splits; on any failure these are removed and
/// `dir` is left as it was.
pub fn download(dir: &Path, source: &Source) -> Result<()> {
    let parent = match dir.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    fs::create_dir_all(parent).with_context(|| format!("cannot create {}", parent.display()))?;
    let stem = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "cifar-10".to_string());
    let manual = || {
        format!(
            "If this machine is offline, download {} elsewhere, unpack it and put the files of \
             its {ARCHIVE_DIR}/ folder ({} ... {}, {TEST_FILE}) under {}",
            source.url,
            TRAIN_FILES[0],
            TRAIN_FILES[4],
            dir.display()
        )
    };

    let (archive, file) = Temp::new_file(parent, &format!(".{stem}.download"))?;
    fetch(source, file, &archive.path).map_err(|e| anyhow!("{e:#}. {}", manual()))?;

    let staging = Temp::new_dir(parent, &format!(".{stem}.unpack"))?;
    unpack(&archive.path, &staging.path, &source.url)?;
    drop(archive);
    for split in [Split::Train, Split::Test] {
        Cifar10::open(&staging.path, split).with_context(|| {
            format!(
                "the archive from {} is not usable CIFAR-10 data",
                source.url
            )
        })?;
    }
    install(&staging.path, dir)?;
    tracing::info!("CIFAR-10 is in {}", dir.display());
    Ok(())
}

/// A temporary file or folder, removed when dropped, so every early return of [`download`]
/// cleans up after itself.
struct Temp {
    path: PathBuf,
    is_dir: bool,
}

impl Temp {
    /// A new, unique name in `parent`, created by `create` (which must fail if it exists).
    fn create<T>(
        parent: &Path,
        prefix: &str,
        mut create: impl FnMut(&Path) -> io::Result<T>,
    ) -> Result<(PathBuf, T)> {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        for attempt in 0..100u32 {
            let path = parent.join(format!(
                "{prefix}-{}-{nanos}-{attempt}.tmp",
                std::process::id()
            ));
            match create(&path) {
                Ok(made) => return Ok((path, made)),
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(e) => {
                    return Err(e).with_context(|| {
                        format!("cannot create a temporary file in {}", parent.display())
                    })
                }
            }
        }
        bail!("cannot find a free temporary name in {}", parent.display())
    }

    fn new_file(parent: &Path, prefix: &str) -> Result<(Temp, File)> {
        let (path, file) = Temp::create(parent, prefix, |p| {
            File::options().write(true).create_new(true).open(p)
        })?;
        Ok((
            Temp {
                path,
                is_dir: false,
            },
            file,
        ))
    }

    fn new_dir(parent: &Path, prefix: &str) -> Result<Temp> {
        let (path, ()) = Temp::create(parent, prefix, |p| fs::create_dir(p))?;
        Ok(Temp { path, is_dir: true })
    }
}

impl Drop for Temp {
    fn drop(&mut self) {
        let removed = if self.is_dir {
            fs::remove_dir_all(&self.path)
        } else {
            fs::remove_file(&self.path)
        };
        if let Err(e) = removed {
            tracing::warn!("cannot remove {}: {e}", self.path.display());
        }
    }
}

/// Streams `source.url` into `file` while hashing, then checks size and checksums.
fn fetch(source: &Source, file: File, path: &Path) -> Result<()> {
    let url = &source.url;
    // Connection and stalls time out; the transfer as a whole does not, since 170 MB can
    // take long on a slow line.
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_connect(Some(Duration::from_secs(30)))
        .timeout_recv_response(Some(Duration::from_secs(60)))
        .timeout_per_read(Some(Duration::from_secs(60)))
        .build()
        .into();
    tracing::info!("downloading {url} ({} MB)", source.size / 1_000_000);
    let mut response = agent
        .get(url)
        .call()
        .map_err(|e| anyhow!("cannot download {url}: {e}"))?;
    if let Some(len) = response.body().content_length() {
        if len != source.size {
            bail!(
                "{url} offers {len} bytes where {} were expected: it is not the expected file",
                source.size
            );
        }
    }
    let mut body = response.body_mut().as_reader();
    let mut out = BufWriter::new(file);
    let (mut md5, mut sha256) = (Md5::new(), Sha256::new());
    let mut buf = vec![0u8; 1 << 16];
    let mut got: u64 = 0;
    let mut next_tenth = 1;
    loop {
        let n = match body.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => bail!("download of {url} failed after {got} bytes: {e}"),
        };
        got += n as u64;
        if got > source.size {
            bail!(
                "{url} sent more than the expected {} bytes: it is not the expected file",
                source.size
            );
        }
        md5.update(&buf[..n]);
        sha256.update(&buf[..n]);
        out.write_all(&buf[..n])
            .with_context(|| format!("cannot write {} (disk full?)", path.display()))?;
        while next_tenth <= 10 && got * 10 >= next_tenth * source.size {
            tracing::info!("downloaded {}% of {url}", next_tenth * 10);
            next_tenth += 1;
        }
    }
    out.flush()
        .with_context(|| format!("cannot write {} (disk full?)", path.display()))?;
    if got != source.size {
        bail!(
            "download of {url} stopped after {got} of {} bytes; try again",
            source.size
        );
    }
    for (what, got, want) in [
        ("MD5", hex(&md5.finalize()), &source.md5),
        ("SHA-256", hex(&sha256.finalize()), &source.sha256),
    ] {
        if !got.eq_ignore_ascii_case(want) {
            bail!(
                "{what} checksum mismatch for {url}: got {got}, expected {want}; the download is \
                 corrupt or the file on the server changed"
            );
        }
    }
    Ok(())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

/// Extracts the expected members of the archive at `archive` into `staging`.
fn unpack(archive: &Path, staging: &Path, url: &str) -> Result<()> {
    let file = File::open(archive).with_context(|| format!("cannot open {}", archive.display()))?;
    let mut tar = tar::Archive::new(flate2::read::GzDecoder::new(BufReader::new(file)));
    let damaged = || format!("the archive from {url} is damaged");
    for entry in tar.entries().with_context(damaged)? {
        let mut entry = entry.with_context(damaged)?;
        let Some(name) = expected_member(&entry) else {
            let shown = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
            tracing::warn!("skipping archive member {shown}");
            continue;
        };
        // The name on disk is our constant, never the archive's bytes, and `create_new`
        // refuses to write through anything already there.
        let dest = staging.join(name);
        let mut out = File::options()
            .write(true)
            .create_new(true)
            .open(&dest)
            .with_context(|| {
                format!(
                    "cannot create {} (is {name} twice in the archive?)",
                    dest.display()
                )
            })?;
        io::copy(&mut entry, &mut out)
            .with_context(|| format!("cannot unpack {name} from the archive of {url}"))?;
    }
    for name in &MEMBERS[..DATA_FILES] {
        if !staging.join(name).is_file() {
            bail!("the archive from {url} has no {ARCHIVE_DIR}/{name}: it is not the CIFAR-10 binary archive");
        }
    }
    Ok(())
}

/// The file name to extract `entry` as, or `None` to skip it. Only regular files named exactly
/// `cifar-10-batches-bin/<one of MEMBERS>` qualify: links, folders, absolute paths and `..`
/// never do.
fn expected_member<R: Read>(entry: &tar::Entry<R>) -> Option<&'static str> {
    let kind = entry.header().entry_type();
    if !(kind.is_file() || kind == tar::EntryType::Continuous) {
        return None;
    }
    let path = entry.path().ok()?;
    let mut parts = Vec::new();
    for component in path.components() {
        match component {
            Component::Normal(part) => parts.push(part),
            Component::CurDir => {}
            Component::RootDir | Component::Prefix(_) | Component::ParentDir => return None,
        }
    }
    match parts[..] {
        [folder, file] if folder == ARCHIVE_DIR => {
            MEMBERS.iter().copied().find(|&member| file == member)
        }
        _ => None,
    }
}

/// Moves the files of `staging` into `dir`. Files of the same names already in `dir` are first
/// moved aside into `staging`, so a failure part-way can put everything back.
fn install(staging: &Path, dir: &Path) -> Result<()> {
    let created = !dir.exists();
    fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let aside = staging.join("previous");
    let names: Vec<&str> = MEMBERS
        .iter()
        .copied()
        .filter(|name| staging.join(name).is_file())
        .collect();
    let mut moved_aside = Vec::new();
    let mut moved_in = Vec::new();
    let mut moves = || -> io::Result<()> {
        fs::create_dir(&aside)?;
        for &name in &names {
            if dir.join(name).symlink_metadata().is_ok() {
                fs::rename(dir.join(name), aside.join(name))?;
                moved_aside.push(name);
            }
        }
        for &name in &names {
            fs::rename(staging.join(name), dir.join(name))?;
            moved_in.push(name);
        }
        Ok(())
    };
    if let Err(e) = moves() {
        for name in moved_in {
            let _ = fs::remove_file(dir.join(name));
        }
        for name in moved_aside {
            let _ = fs::rename(aside.join(name), dir.join(name));
        }
        if created {
            let _ = fs::remove_dir(dir);
        }
        bail!(
            "cannot move the downloaded files into {} ({e}); it was left as it was",
            dir.display()
        );
    }
    Ok(())
}
