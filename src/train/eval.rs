//! Evaluation: the loss, accuracy and confusion matrix of a network over a data set.

use super::*;

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
    let (mut x, mut y) = (Vec::new(), Vec::new());
    let mut confusion = [[0u64; 10]; 10];
    let (mut loss_sum, mut correct) = (0.0, 0usize);
    let k = net.spec.classes;
    for start in (0..ds.len()).step_by(batch) {
        let idx: Vec<usize> = (start..(start + batch).min(ds.len())).collect();
        data::make_batch(ds, &idx, Augment::NONE, 0, 0, start as u64, &mut x, &mut y);
        let logits = net.forward(&x, idx.len(), false)?;
        loss_sum += net.loss(&y, 0.0)? * idx.len() as f64;
        for (row, &label) in logits.chunks(k).zip(&y) {
            let p = argmax(row);
            correct += (p == label as usize) as usize;
            confusion[label as usize][p] += 1;
        }
    }
    let n = ds.len();
    Ok(EvalResult {
        loss: loss_sum / n as f64,
        accuracy: correct as f64 / n as f64,
        images: n,
        confusion,
    })
}
