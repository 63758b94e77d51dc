//! Training batches: the epoch's order, the random crop and flip, and the planar bytes to
//! normalised NHWC floats.

use super::*;

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
    pub const NONE: Augment = Augment { crop: false, flip: false };
    pub const TRAIN: Augment = Augment { crop: true, flip: true };
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
    ds: &Cifar10, indices: &[usize], aug: Augment, seed: u64, epoch: u64, first_pos: u64,
    x: &mut Vec<f32>, y: &mut Vec<u32>,
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
    x.par_chunks_mut(PIXELS).zip(indices.par_iter()).enumerate().for_each(|(j, (out, &i))| {
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
            return View { dy: 0, dx: 0, flip: false };
        }
        let mut rng = stream(STREAM_AUGMENT, seed, epoch, pos);
        // All three are always drawn, so turning crop off leaves the flips as they were.
        let span = 2 * PAD as u64 + 1;
        let dy = below(&mut rng, span) as isize - PAD as isize;
        let dx = below(&mut rng, span) as isize - PAD as isize;
        let heads = rng.next_u32() & 1 == 1;
        let (dy, dx) = if aug.crop { (dy, dx) } else { (0, 0) };
        View { dy, dx, flip: aug.flip && heads }
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
