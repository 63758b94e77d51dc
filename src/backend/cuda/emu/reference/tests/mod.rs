//! Every call against a direct f64 loop over the definition.
//!
//! Tolerances. The oracle sums exact products of the same (widened) inputs in f64, so the
//! only error is the emulation's f32 arithmetic. A sum of `t` products accumulated in f32
//! is off by at most t·u·Σ|terms| (u = 2⁻²⁴ ≈ 6e-8), and in practice by about √t·u·Σ|terms|;
//! the check allows 1e-5·√t·Σ|terms| (about 170 units of roundoff per √t, generous, yet a
//! wrong tap or index is off by a whole term). `alpha` and `beta·old` scale the magnitudes
//! and add one f32 rounding, inside the same bound. A 16-bit output is that f32 value
//! rounded once more: within its unit roundoff (2⁻¹¹ for f16, 2⁻⁸ for bf16) of the value,
//! plus half f16's subnormal spacing.

mod conv;
mod pool;
mod validation;

use super::*;

/// Host memory standing in for a device allocation: 16-byte aligned like the emulated
/// device's.
struct Buf(Vec<u128>);

impl Buf {
    fn zeroed(bytes: usize) -> Buf {
        Buf(vec![0; bytes.div_ceil(16).max(1)])
    }
    /// `values` rounded to `dtype`.
    fn of(dtype: DType, values: &[f32]) -> Buf {
        let mut b = Buf::zeroed(values.len() * dtype.size());
        // SAFETY: the buffer holds values.len() elements of dtype.
        unsafe { store(b.ptr(), dtype, values, 1.0, 0.0) };
        b
    }
    fn ptr(&mut self) -> u64 {
        self.0.as_mut_ptr() as u64
    }
    fn bytes(&self) -> &[u8] {
        // SAFETY: a u128 slice viewed as its bytes.
        unsafe { std::slice::from_raw_parts(self.0.as_ptr() as *const u8, self.0.len() * 16) }
    }
    fn read(&self, dtype: DType, len: usize) -> Vec<f64> {
        assert!(len * dtype.size() <= self.bytes().len());
        // SAFETY: checked just above.
        unsafe { load(self.0.as_ptr() as u64, dtype, len) }.into_iter().map(f64::from).collect()
    }
}

/// splitmix64: reproducible inputs without a dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    /// Uniform in [-1, 1).
    fn uniform(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }
    fn values(&mut self, len: usize) -> Vec<f32> {
        (0..len).map(|_| self.uniform()).collect()
    }
}

/// The exact result of an output element, the sum of the magnitudes of its terms and their
/// count, from which its tolerance follows.
#[derive(Clone, Default)]
struct Exact {
    value: Vec<f64>,
    magnitude: Vec<f64>,
    terms: Vec<usize>,
}

impl Exact {
    fn new(len: usize) -> Exact {
        Exact { value: vec![0.0; len], magnitude: vec![0.0; len], terms: vec![0; len] }
    }
    fn add(&mut self, i: usize, term: f64) {
        self.value[i] += term;
        self.magnitude[i] += term.abs();
        self.terms[i] += 1;
    }
}

/// Checks `got` = alpha·exact + beta·old within the tolerances of the module comment.
fn check(what: &str, dtype: DType, got: &[f64], old: &[f64], e: &Exact, alpha: f32, beta: f32) {
    let (alpha, beta) = (f64::from(alpha), f64::from(beta));
    let (unit, tiny) = match dtype {
        DType::F32 => (0.0, 1e-38),
        DType::F16 => (2f64.powi(-11), 2f64.powi(-25)),
        DType::Bf16 => (2f64.powi(-8), 1e-38),
    };
    assert_eq!(got.len(), e.value.len(), "{what}: length");
    for i in 0..got.len() {
        let blended = if beta == 0.0 { 0.0 } else { beta * old[i] };
        let expected = alpha * e.value[i] + blended;
        if expected.is_nan() {
            assert!(got[i].is_nan(), "{what}[{i}]: {} where NaN is expected", got[i]);
            continue;
        }
        let scale = alpha.abs() * e.magnitude[i] + blended.abs();
        let tol32 = 1e-5 * (e.terms[i].max(1) as f64).sqrt() * scale;
        let tol = tol32 + unit * (expected.abs() + tol32) + tiny;
        assert!(
            (got[i] - expected).abs() <= tol,
            "{what}[{i}]: got {}, expected {expected} (tolerance {tol:e}, {} terms)",
            got[i],
            e.terms[i]
        );
    }
}
