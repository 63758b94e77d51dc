//! The CPU backend against the PyTorch reference state in `tests/fixtures/` (the checks are
//! in `tests/common/golden.rs`). The model runs twice: in f32 (what training uses) and in f64
//! (which removes our rounding, so the tolerances can be near float32's storage precision).

mod common;

use common::golden::{fixtures, run_fixture, tols_f32, tols_f64, Tols};
use incept::backend::cpu::Cpu;
use incept::backend::Elem;

fn run_golden<T: Elem>(tols: &Tols, what: &str) {
    for path in fixtures() {
        run_fixture::<T, Cpu>(&path, tols, what, &|| Cpu);
    }
}

#[test]
fn golden_f32() {
    run_golden::<f32>(&tols_f32(), "golden f32");
}

#[test]
fn golden_f64() {
    run_golden::<f64>(&tols_f64(), "golden f64");
}
