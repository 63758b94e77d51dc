//! The Inception block's joins: channel concatenation and its split, and the sum of the
//! gradients of an input its branches share.

use super::*;

impl<T: Elem> ConcatOps<T> for Cpu {
    fn fork_backward(&self, dx: &mut Vec<T>, parts: &[&Vec<T>]) {
        dx.par_chunks_mut(4096).enumerate().for_each(|(i, chunk)| {
            let start = i * 4096;
            chunk.copy_from_slice(&parts[0][start..start + chunk.len()]);
            for part in &parts[1..] {
                for (d, s) in chunk.iter_mut().zip(&part[start..]) {
                    *d += *s;
                }
            }
        });
    }

    fn concat_forward(&self, y: &mut Vec<T>, parts: &[&Vec<T>], channels: &[usize]) {
        let total: usize = channels.iter().sum();
        y.par_chunks_mut(total).enumerate().for_each(|(p, row)| {
            let mut off = 0;
            for (part, &c) in parts.iter().zip(channels) {
                row[off..off + c].copy_from_slice(&part[p * c..(p + 1) * c]);
                off += c;
            }
        });
    }

    fn concat_backward(&self, dparts: &mut [&mut Vec<T>], dy: &Vec<T>, channels: &[usize]) {
        let total: usize = channels.iter().sum();
        let mut off = 0;
        for (part, &c) in dparts.iter_mut().zip(channels) {
            part.par_chunks_mut(c)
                .zip(dy.par_chunks(total))
                .for_each(|(d, row)| d.copy_from_slice(&row[off..off + c]));
            off += c;
        }
    }
}
