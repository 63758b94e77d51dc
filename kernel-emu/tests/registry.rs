//! The kernel registry: every `__global__` kernel of `../cuda/*.cu` is registered, exactly
//! those, and `launch` refuses what does not fit a kernel's signature.

use kernel_emu::{kernel, kernels, launch, Arg, Param};
use std::collections::BTreeSet;
use std::path::PathBuf;

/// The kernel names the sources define: three per `INCEPT_INSTANTIATE_3(name, ...)`, two per
/// `INCEPT_INSTANTIATE_16`, one per `INCEPT_INSTANTIATE_ONE(name, suffix, ...)` and per
/// `extern "C" __global__ void name(`.
fn names_in_sources() -> BTreeSet<String> {
    let cuda = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../cuda");
    let mut names = BTreeSet::new();
    let mut files = 0;
    for entry in std::fs::read_dir(&cuda).expect("../cuda") {
        let path = entry.expect("entry").path();
        if path.extension().is_none_or(|e| e != "cu") {
            continue;
        }
        files += 1;
        let text = std::fs::read_to_string(&path).expect("read a .cu");
        let ident = |rest: &str| -> String {
            rest.trim_start()
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect()
        };
        // All three types, the 16-bit ones, or one given type.
        for (mac, suffixes) in [
            ("INCEPT_INSTANTIATE_3(", &["f32", "f16", "bf16"][..]),
            ("INCEPT_INSTANTIATE_16(", &["f16", "bf16"][..]),
            ("INCEPT_INSTANTIATE_ONE(", &[][..]),
        ] {
            for (i, _) in text.match_indices(mac) {
                let rest = &text[i + mac.len()..];
                let name = ident(rest);
                assert!(!name.is_empty(), "{}: {mac} without a name", path.display());
                if suffixes.is_empty() {
                    let after = rest.split_once(',').map_or("", |(_, r)| r);
                    let suffix = ident(after);
                    assert!(names.insert(format!("{name}_{suffix}")), "{name} twice");
                }
                for suffix in suffixes {
                    assert!(names.insert(format!("{name}_{suffix}")), "{name} twice");
                }
            }
        }
        for (i, _) in text.match_indices("__global__ void ") {
            // `extern "C" __global__ void NAME(` outside the instantiation macro.
            let line_start = text[..i].rfind('\n').map_or(0, |n| n + 1);
            if !text[line_start..i].trim_start().starts_with("extern \"C\"") {
                continue;
            }
            let name = ident(&text[i + "__global__ void ".len()..]);
            if name.ends_with("##_##suffix") || name.is_empty() {
                continue;
            }
            assert!(names.insert(name.clone()), "{name} twice");
            assert!(
                text.contains(&format!("INCEPT_REGISTER({name})")),
                "{}: {name} is not followed by INCEPT_REGISTER({name})",
                path.display()
            );
        }
    }
    assert!(files >= 7, "only {files} .cu files found in {}", cuda.display());
    names
}

#[test]
fn every_kernel_of_the_sources_is_registered_and_nothing_else() {
    let sources = names_in_sources();
    let registered: BTreeSet<String> = kernels().iter().map(|k| k.name.to_string()).collect();
    let missing: Vec<_> = sources.difference(&registered).collect();
    let extra: Vec<_> = registered.difference(&sources).collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "not registered: {missing:?}; registered but not in the sources: {extra:?}"
    );
    assert_eq!(kernels().len(), sources.len());
    assert!(sources.len() >= 50, "{} kernels", sources.len());
    // Sorted by name, as `kernel` relies on.
    assert!(kernels().windows(2).all(|w| w[0].name < w[1].name));
}

#[test]
fn parameters_come_from_the_function_types() {
    let k = kernel("concat_forward_f16").expect("concat_forward_f16");
    assert_eq!(
        k.params,
        vec![
            Param::MutPtr { elem: "__half" },
            Param::Int,
            Param::Int,
            Param::ConstPtr { elem: "__half" },
            Param::Int,
            Param::Int,
        ]
    );
    let k = kernel("batch_norm_stats_bf16").expect("batch_norm_stats_bf16");
    assert_eq!(k.params[4], Param::MutPtr { elem: "double" });
    assert_eq!(k.params[5], Param::MutPtr { elem: "int" });
    assert_eq!(k.params[6], Param::ConstPtr { elem: "__nv_bfloat16" });
    assert_eq!(k.params[9], Param::Float);
    let k = kernel("augment_batch_f32").expect("augment_batch_f32");
    assert_eq!(k.params[1], Param::ConstPtr { elem: "unsigned char" });
    let k = kernel("sgd_step").expect("sgd_step");
    assert_eq!(k.to_string(), "sgd_step(float*, const float*, float*, int, const float*, float, float, int, int, const int*)");
}

#[test]
fn launch_by_name_runs_the_kernel() {
    let x = [-1.0f32, 2.0, -0.0, 3.5, f32::NAN];
    let mut y = [7.0f32; 5];
    let args = [Arg::Ptr(y.as_mut_ptr() as u64), Arg::Ptr(x.as_ptr() as u64), Arg::I32(5)];
    // SAFETY: both buffers hold the 5 elements the kernel touches.
    unsafe { launch("relu_forward_f32", [2, 1, 1], [4, 1, 1], 0, 0, &args) }.expect("launch");
    assert_eq!(&y[..4], &[0.0, 2.0, -0.0, 3.5]);
    assert!(y[4].is_nan());
}

fn err(name: &str, grid: [u32; 3], block: [u32; 3], shared: u32, args: &[Arg]) -> String {
    // SAFETY: every call below is refused before anything runs (the pointers are dangling).
    unsafe { launch(name, grid, block, shared, 0, args) }.expect_err("must be refused")
}

#[test]
fn launch_refuses_what_does_not_fit() {
    let ok = [Arg::Ptr(8), Arg::Ptr(8), Arg::I32(0)];
    // Unknown name: the message lists near names.
    let e = err("relu_forward_f64", [1; 3], [32, 1, 1], 0, &ok);
    assert!(e.contains("relu_forward_f64") && e.contains("relu_forward_f32"), "{e}");
    let e = err("rleu_fowrard_f16", [1; 3], [32, 1, 1], 0, &ok);
    assert!(e.contains("no kernel named") && e.contains("relu_forward_f16"), "{e}");
    let e = err("no_such_thing_anywhere_at_all", [1; 3], [32, 1, 1], 0, &ok);
    assert!(e.contains("no kernel named"), "{e}");
    // Arity.
    let e = err("relu_forward_f32", [1; 3], [32, 1, 1], 0, &ok[..2]);
    assert!(
        e.contains("relu_forward_f32") && e.contains("2 arguments") && e.contains("takes 3"),
        "{e}"
    );
    // Kind of an argument: index and expected type named.
    let e =
        err("relu_forward_f32", [1; 3], [32, 1, 1], 0, &[Arg::Ptr(8), Arg::I32(0), Arg::I32(0)]);
    assert!(
        e.contains("relu_forward_f32")
            && e.contains("argument 1")
            && e.contains("const float*")
            && e.contains("Arg::Ptr"),
        "{e}"
    );
    let e =
        err("relu_forward_f32", [1; 3], [32, 1, 1], 0, &[Arg::Ptr(8), Arg::Ptr(8), Arg::F32(0.0)]);
    assert!(e.contains("parameter 2 is int") && e.contains("Arg::I32"), "{e}");
    let e = err(
        "batch_norm_eval_invstd",
        [1; 3],
        [32, 1, 1],
        0,
        &[Arg::Ptr(8), Arg::Ptr(8), Arg::I32(1), Arg::I32(1)],
    );
    assert!(e.contains("parameter 3 is float") && e.contains("Arg::F32"), "{e}");
    // Geometry.
    let e = err("relu_forward_f32", [1; 3], [1025, 1, 1], 0, &ok);
    assert!(e.contains("1024"), "{e}");
    let e = err("relu_forward_f32", [1; 3], [32, 32, 2], 0, &ok);
    assert!(e.contains("1024"), "{e}");
    let e = err("relu_forward_f32", [0, 1, 1], [32, 1, 1], 0, &ok);
    assert!(e.contains("empty grid"), "{e}");
    let e = err("relu_forward_f32", [1; 3], [32, 0, 1], 0, &ok);
    assert!(e.contains("empty grid"), "{e}");
    // Dynamic shared memory is not emulated.
    let e = err("relu_forward_f32", [1; 3], [32, 1, 1], 16, &ok);
    assert!(e.contains("dynamic shared memory"), "{e}");
}
