//! Evaluation: the loss, accuracy and confusion matrix of a network over a data set.

use super::*;
use crate::dist::Collective;

/// Loss, accuracy and confusion matrix over a dataset.
#[derive(Clone, Debug)]
pub struct EvalResult {
    pub loss: f64,
    pub accuracy: f64,
    pub images: usize,
    /// `confusion[true][predicted]`.
    pub confusion: [[u64; 10]; 10],
}

pub(super) fn argmax<T: Elem>(row: &[T]) -> usize {
    let mut best = 0;
    for (i, v) in row.iter().enumerate() {
        if *v > row[best] {
            best = i;
        }
    }
    best
}

/// Eval-mode pass over the whole dataset (no augmentation).
pub fn evaluate<B: Backend<f32>>(
    net: &mut Net<f32, B>, ds: &Cifar10, batch: usize,
) -> Result<EvalResult> {
    Ok(eval_sums(net, ds, batch, 0..ds.len())?.result(ds.len()))
}

/// [`evaluate`] shared among the ranks of a data-parallel run: each evaluates its contiguous
/// share of the images and the sums are all-reduced, so every rank gets the same result.
pub fn evaluate_shared<B: Backend<f32>>(
    net: &mut Net<f32, B>, ds: &Cifar10, batch: usize, group: &mut dyn Collective,
) -> Result<EvalResult> {
    let (r, w, n) = (group.rank(), group.world(), ds.len());
    let sums = eval_sums(net, ds, batch, r * n / w..(r + 1) * n / w)?;
    // Counts are exact in f64 (far below 2^53).
    let mut flat = vec![sums.loss_sum, sums.correct as f64];
    flat.extend(sums.confusion.iter().flatten().map(|&c| c as f64));
    group.all_reduce_sum_f64(&mut flat)?;
    let mut confusion = [[0u64; 10]; 10];
    for (c, v) in confusion.iter_mut().flatten().zip(&flat[2..]) {
        *c = *v as u64;
    }
    Ok(EvalSums { loss_sum: flat[0], correct: flat[1] as u64, confusion }.result(n))
}

/// The summed loss, the correct count and the confusion matrix of a pass over some images.
struct EvalSums {
    loss_sum: f64,
    correct: u64,
    confusion: [[u64; 10]; 10],
}

impl EvalSums {
    fn result(self, n: usize) -> EvalResult {
        EvalResult {
            loss: self.loss_sum / n as f64,
            accuracy: self.correct as f64 / n as f64,
            images: n,
            confusion: self.confusion,
        }
    }
}

/// Eval-mode pass over the images `range` of `ds`, in batches of `batch`.
fn eval_sums<B: Backend<f32>>(
    net: &mut Net<f32, B>, ds: &Cifar10, batch: usize, range: std::ops::Range<usize>,
) -> Result<EvalSums> {
    let (mut x, mut y) = (Vec::new(), Vec::new());
    let mut sums = EvalSums { loss_sum: 0.0, correct: 0, confusion: [[0u64; 10]; 10] };
    let k = net.spec.classes;
    for start in range.clone().step_by(batch) {
        let idx: Vec<usize> = (start..(start + batch).min(range.end)).collect();
        data::make_batch(ds, &idx, Augment::NONE, 0, 0, start as u64, &mut x, &mut y);
        let logits = net.forward(&x, idx.len(), false)?;
        sums.loss_sum += net.loss(&y, 0.0)? * idx.len() as f64;
        for (row, &label) in logits.chunks(k).zip(&y) {
            let p = argmax(row);
            sums.correct += (p == label as usize) as u64;
            sums.confusion[label as usize][p] += 1;
        }
    }
    Ok(sums)
}
