//! Memory layouts: PyTorch stores activations NCHW, the backends compute NHWC.

use crate::backend::Nhwc;

/// `[N,C,H,W] → [N,H,W,C]`.
pub fn nchw_to_nhwc<T: Copy>(x: &[T], n: usize, c: usize, h: usize, w: usize) -> Vec<T> {
    assert_eq!(x.len(), n * c * h * w, "nchw_to_nhwc: length");
    let mut out = Vec::with_capacity(x.len());
    for ni in 0..n {
        for yi in 0..h {
            for xi in 0..w {
                for ci in 0..c {
                    out.push(x[((ni * c + ci) * h + yi) * w + xi]);
                }
            }
        }
    }
    out
}

/// `[N,H,W,C] → [N,C,H,W]`.
pub fn nhwc_to_nchw<T: Copy>(x: &[T], s: Nhwc) -> Vec<T> {
    assert_eq!(x.len(), s.len(), "nhwc_to_nchw: length");
    let mut out = Vec::with_capacity(x.len());
    for ni in 0..s.n {
        for ci in 0..s.c {
            for yi in 0..s.h {
                for xi in 0..s.w {
                    out.push(x[((ni * s.h + yi) * s.w + xi) * s.c + ci]);
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let x: Vec<u32> = (0..2 * 3 * 4 * 5).collect();
        let nhwc = nchw_to_nhwc(&x, 2, 3, 4, 5);
        // element (n=1, c=2, y=3, x=4) sits at the end of both layouts
        assert_eq!(nhwc[nhwc.len() - 1], x[x.len() - 1]);
        // (n=0, c=1, y=0, x=0) is NCHW index 20 and NHWC index 1
        assert_eq!(nhwc[1], 20);
        assert_eq!(nhwc_to_nchw(&nhwc, Nhwc::new(2, 4, 5, 3)), x);
    }
}
