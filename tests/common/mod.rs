//! Helpers shared by the integration tests.
#![allow(dead_code)]

pub mod golden;
pub mod kernels;

use std::fmt::Write;

/// Tolerance `atol + rtol·|want|` for one tensor, with the reason it is what it is.
#[derive(Clone, Copy, Debug)]
pub struct Tol {
    pub atol: f64,
    pub rtol: f64,
    /// Added to `atol` as a fraction of the tensor's largest |value|: for elements that are
    /// small only because terms cancelled.
    pub scale: f64,
    pub why: &'static str,
}

impl Tol {
    pub const fn new(atol: f64, rtol: f64, why: &'static str) -> Tol {
        Tol { atol, rtol, scale: 0.0, why }
    }
    pub const fn scaled(atol: f64, rtol: f64, scale: f64, why: &'static str) -> Tol {
        Tol { atol, rtol, scale, why }
    }
}

/// The worst element of a comparison: index, got, want, and its error over the tolerance.
pub struct Worst {
    pub index: usize,
    pub got: f64,
    pub want: f64,
    pub ratio: f64,
}

/// Compares element by element; `Err` carries a report with the first values and the worst
/// difference, so a failure shows what went wrong.
pub fn compare(name: &str, got: &[f64], want: &[f64], tol: Tol) -> Result<Worst, String> {
    if got.len() != want.len() {
        return Err(format!("{name}: {} values, expected {}", got.len(), want.len()));
    }
    let max_abs = want.iter().fold(0.0f64, |m, v| m.max(v.abs()));
    let atol = tol.atol + tol.scale * max_abs;
    let mut worst = Worst { index: 0, got: f64::NAN, want: f64::NAN, ratio: 0.0 };
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let diff = (g - w).abs();
        // An exact match passes even with a zero tolerance (integers).
        let ratio = if diff == 0.0 { 0.0 } else { diff / (atol + tol.rtol * w.abs()) };
        if ratio > worst.ratio || ratio.is_nan() {
            worst = Worst {
                index: i,
                got: g,
                want: w,
                ratio: if ratio.is_nan() { f64::INFINITY } else { ratio },
            };
        }
    }
    if worst.ratio <= 1.0 {
        return Ok(worst);
    }
    let mut msg = String::new();
    let _ = writeln!(
        msg,
        "{name}: mismatch beyond atol {:e} + rtol {:e}·|ref| ({})",
        atol, tol.rtol, tol.why
    );
    let _ = writeln!(
        msg,
        "  worst at [{}]: got {:.8e}, want {:.8e}, |diff| {:.3e} = {:.2}x tolerance",
        worst.index,
        worst.got,
        worst.want,
        (worst.got - worst.want).abs(),
        worst.ratio
    );
    let n = got.len().min(6);
    let _ = writeln!(msg, "  first got:  {:?}", &got[..n]);
    let _ = writeln!(msg, "  first want: {:?}", &want[..n]);
    Err(msg)
}

/// Relative L2 error ‖got − want‖ / ‖want‖.
pub fn rel_l2(got: &[f64], want: &[f64]) -> f64 {
    let num: f64 = got.iter().zip(want).map(|(g, w)| (g - w) * (g - w)).sum();
    let den: f64 = want.iter().map(|w| w * w).sum();
    (num / den.max(f64::MIN_POSITIVE)).sqrt()
}

/// Collects comparison failures so one run reports every mismatching tensor.
#[derive(Default)]
pub struct Report {
    pub failures: Vec<String>,
    pub checked: usize,
    pub lines: Vec<String>,
}

impl Report {
    pub fn check(&mut self, name: &str, got: &[f64], want: &[f64], tol: Tol) {
        self.checked += 1;
        match compare(name, got, want, tol) {
            Ok(w) => self.lines.push(format!("{name}: worst {:.3} of tolerance", w.ratio)),
            Err(e) => self.failures.push(e),
        }
    }

    /// Checks the relative L2 error of a whole tensor against `max_rel`.
    pub fn check_l2(&mut self, name: &str, got: &[f64], want: &[f64], max_rel: f64, why: &str) {
        self.checked += 1;
        let e = if got.len() == want.len() { rel_l2(got, want) } else { f64::INFINITY };
        if e <= max_rel {
            self.lines.push(format!("{name}: relative L2 error {e:.2e} (bound {max_rel:e})"));
        } else {
            let n = got.len().min(6);
            self.failures.push(format!(
                "{name}: relative L2 error {e:.3e} exceeds {max_rel:e} ({why})\n  first got:  {:?}\n  first want: {:?}",
                &got[..n],
                &want[..n.min(want.len())]
            ));
        }
    }

    pub fn finish(self, what: &str) {
        for l in &self.lines {
            eprintln!("  {l}");
        }
        assert!(self.checked > 0, "{what}: nothing was compared");
        if !self.failures.is_empty() {
            panic!(
                "{what}: {} of {} tensors differ:\n{}",
                self.failures.len(),
                self.checked,
                self.failures.join("\n")
            );
        }
        eprintln!("{what}: {} tensors match", self.checked);
    }
}
