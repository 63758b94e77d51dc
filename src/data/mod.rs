//! CIFAR-10 in its binary format: loading (memory-mapped, validated; `cifar`), batches with
//! augmentation (`augment`), a synthetic stand-in for tests (`synth`), `incept data check`
//! (`check`), and the download (`download`). This file holds what they share: the format's
//! constants, the splits and the seeded random streams.
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

pub const CLASSES: [&str; 10] =
    ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"];
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

mod augment;
mod check;
mod cifar;
mod download;
mod synth;

pub use augment::{augment_view, epoch_order, make_batch, Augment};
pub use check::check;
pub use cifar::Cifar10;
pub use download::{download, is_empty_location, Source};
pub use synth::write_synthetic;

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
