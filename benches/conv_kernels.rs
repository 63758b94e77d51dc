//! Every convolution of the seed model (batch 128) through each CPU implementation: the
//! im2col + GEMM reference, the direct AVX-512 kernels, and Winograd F(4×4, 3×3) where it
//! applies; forward, weight gradient and input gradient, median of 7 runs, with GFLOP/s
//! counted as a direct convolution's multiply-adds (so Winograd can exceed the GEMM ceiling).
//!
//!     cargo bench --bench conv_kernels
//!
//! What `incept bench --profile` shows per layer inside a training step, this shows per
//! kernel in isolation, so a change to one kernel can be measured on its own.

#[cfg(target_arch = "x86_64")]
fn main() {
    use incept::backend::cpu::{self, direct, winograd};
    use incept::backend::Conv2d;
    use std::time::Instant;

    incept::keep_freed_memory();
    if !direct::available() {
        println!("skipped: this CPU has no AVX-512F, so only the reference runs");
        return;
    }
    let median_ms = |f: &mut dyn FnMut()| {
        f();
        let mut t: Vec<f64> = (0..7)
            .map(|_| {
                let s = Instant::now();
                f();
                s.elapsed().as_secs_f64() * 1e3
            })
            .collect();
        t.sort_by(f64::total_cmp);
        t[3]
    };
    println!(
        "{:<26} {:<9} {:>9} {:>9} {:>9} {:>7}",
        "layer", "kernel", "fwd ms", "dw ms", "dx ms", "GF/s"
    );
    let convolutions = incept::model::ModelSpec::inception_net_small()
        .convolutions(128)
        .expect("the seed model's shapes fit");
    for (name, xs, conv) in convolutions {
        let Conv2d { cin, cout, k, stride, .. } = conv;
        let ys = conv.out_shape(xs);
        let fill = |len: usize, m: usize| -> Vec<f32> {
            (0..len).map(|i| ((i * m) % 1000) as f32 / 500.0 - 1.0).collect()
        };
        let (x, w, b, dy) = (
            fill(xs.len(), 7919),
            fill(conv.weight_len(), 104_729),
            fill(cout, 13),
            fill(ys.len(), 31),
        );
        let (mut y, mut dw, mut dx) =
            (vec![0.0f32; ys.len()], vec![0.0f32; w.len()], vec![0.0f32; xs.len()]);
        let flop = 2.0 * (ys.pixels() * cout * k * k * cin) as f64;
        let row = |kernel: &str, f: f64, g: f64, d: Option<f64>| {
            let total = f + g + d.unwrap_or(0.0);
            let work = flop * if d.is_some() { 3.0 } else { 2.0 };
            let d = d.map_or("-".to_string(), |d| format!("{d:.2}"));
            println!("{name:<26} {kernel:<9} {f:>9.2} {g:>9.2} {d:>9} {:>7.0}", work / total / 1e6);
        };
        let f = median_ms(&mut || cpu::conv2d_forward_reference(&mut y, &x, &w, &b, xs, &conv));
        let g =
            median_ms(&mut || cpu::conv2d_backward_weight_reference(&mut dw, &dy, &x, xs, &conv));
        let d = median_ms(&mut || cpu::conv2d_backward_data_reference(&mut dx, &dy, &w, xs, &conv));
        row("reference", f, g, Some(d));
        if !direct::supports(&conv) {
            continue;
        }
        let f = median_ms(&mut || direct::conv_forward(&mut y, &x, &w, Some(&b), xs, &conv, false));
        let g = median_ms(&mut || direct::conv_backward_weight(&mut dw, &dy, &x, xs, &conv));
        let d = if stride == 1 && cin % 16 == 0 {
            median_ms(&mut || direct::conv_backward_data(&mut dx, &dy, &w, xs, &conv))
        } else {
            median_ms(&mut || direct::conv_backward_data_scatter(&mut dx, &dy, &w, xs, &conv))
        };
        row("direct", f, g, Some(d));
        if winograd::supports(&conv) {
            let f = median_ms(&mut || {
                winograd::conv_forward(&mut y, &x, &w, Some(&b), xs, &conv, false)
            });
            let g = median_ms(&mut || winograd::conv_backward_weight(&mut dw, &dy, &x, xs, &conv));
            let d = winograd::supports(&winograd::backward_data_conv(&conv)).then(|| {
                median_ms(&mut || winograd::conv_backward_data(&mut dx, &dy, &w, xs, &conv))
            });
            row("winograd", f, g, d);
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
fn main() {
    println!("skipped: the direct and Winograd kernels are x86-64 (AVX-512) only");
}
