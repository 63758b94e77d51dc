//! A synthetic stand-in for CIFAR-10 with learnable classes, in the same binary format, for
//! tests and for trying the trainer without the download.

use super::*;

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
        out.write_all(&record).with_context(|| format!("cannot write {}", path.display()))?;
    }
    out.flush().with_context(|| format!("cannot write {}", path.display()))
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
