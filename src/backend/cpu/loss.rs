//! Softmax cross-entropy with label smoothing, as PyTorch's `CrossEntropyLoss`.

use super::*;

impl<T: Elem> LossOps<T> for Cpu {
    fn cross_entropy_forward(
        &self, probs: &mut Vec<T>, logits: &Vec<T>, labels: &[u32], k: usize, smoothing: f64,
    ) -> f64 {
        let n = labels.len();
        let mut total = 0.0;
        for (i, &label) in labels.iter().enumerate() {
            let z = &logits[i * k..(i + 1) * k];
            let zmax = z.iter().fold(f64::NEG_INFINITY, |m, v| m.max(v.as_f64()));
            let sum_exp: f64 = z.iter().map(|v| (v.as_f64() - zmax).exp()).sum();
            let lse = zmax + sum_exp.ln();
            let label = label as usize;
            assert!(label < k, "cross_entropy: label {label} out of range 0..{k}");
            // −log p_y, and with smoothing the mean of −log p over all classes too.
            let nll = lse - z[label].as_f64();
            let mean_nll = lse - z.iter().map(|v| v.as_f64()).sum::<f64>() / k as f64;
            total += (1.0 - smoothing) * nll + smoothing * mean_nll;
            for (p, v) in probs[i * k..(i + 1) * k].iter_mut().zip(z) {
                *p = T::cast((v.as_f64() - lse).exp());
            }
        }
        total / n as f64
    }

    fn cross_entropy_backward(
        &self, dlogits: &mut Vec<T>, probs: &Vec<T>, labels: &[u32], k: usize, smoothing: f64,
    ) {
        let n = labels.len() as f64;
        for (i, &label) in labels.iter().enumerate() {
            for j in 0..k {
                let target =
                    smoothing / k as f64 + if j == label as usize { 1.0 - smoothing } else { 0.0 };
                dlogits[i * k + j] = T::cast((probs[i * k + j].as_f64() - target) / n);
            }
        }
    }
}
