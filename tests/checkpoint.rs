//! Checkpoints in safetensors with PyTorch's names and shapes: round trip, and clear errors for
//! files of another model, damaged files and unwritable paths.

use incept::backend::cpu::Cpu;
use incept::checkpoint::{load_model, save, save_model, OwnedTensor, TensorFile};
use incept::model::net::Net;
use incept::model::{ModelSpec, TensorKind};
use std::collections::HashMap;
use std::path::PathBuf;

fn tmpdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("incept-test-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn net(seed: u64) -> Net<f32, Cpu> {
    Net::new(ModelSpec::inception_net_small(), Cpu, seed).unwrap()
}

fn batch() -> Vec<f32> {
    (0..4 * 32 * 32 * 3).map(|i| ((i * 37 % 101) as f32 / 50.0) - 1.0).collect()
}

#[test]
fn save_then_load_is_exact() {
    let dir = tmpdir("roundtrip");
    let path = dir.join("m.safetensors");
    let mut a = net(1);
    // Give the running statistics and counters non-default values first.
    a.forward(&batch(), 4, true).unwrap();
    save_model(&mut a, &path).unwrap();
    let mut b = net(2);
    assert_ne!(a.state(), b.state(), "two seeds give two models");
    load_model(&mut b, &TensorFile::open(&path).unwrap(), "").unwrap();
    assert_eq!(a.state(), b.state());
    let (la, lb) = (a.forward(&batch(), 4, false).unwrap(), b.forward(&batch(), 4, false).unwrap());
    assert_eq!(la, lb);
    // Names, dtypes and shapes are PyTorch's.
    let file = TensorFile::open(&path).unwrap();
    let st = file.tensors().unwrap();
    let w = st.tensor("block3.0.branch4_conv.0.weight").unwrap();
    assert_eq!(w.shape(), &[64, 128, 3, 3]);
    let c = st.tensor("block1.1.num_batches_tracked").unwrap();
    assert_eq!((c.dtype(), c.shape()), (safetensors::Dtype::I64, &[][..]));
    assert_eq!(file.read_f64("block1.1.num_batches_tracked").unwrap().0, vec![1.0]);
    assert_eq!(st.len(), ModelSpec::inception_net_small().tensors().len());
    // No temporary file is left behind.
    let left: Vec<_> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(left.len(), 1, "{left:?}");
}

#[test]
fn parameter_count_matches_pytorch() {
    // The fixture's param/* tensors are the PyTorch model's state_dict.
    let file = TensorFile::open(
        &PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/seed_inception_small.safetensors"),
    )
    .unwrap();
    let st = file.tensors().unwrap();
    let spec = ModelSpec::inception_net_small();
    let mut pytorch: Vec<(String, Vec<usize>)> = st
        .iter()
        .filter_map(|(n, v)| n.strip_prefix("param/").map(|n| (n.to_string(), v.shape().to_vec())))
        .collect();
    pytorch.sort();
    let mut ours: Vec<(String, Vec<usize>)> =
        spec.tensors().into_iter().map(|t| (t.name, t.shape)).collect();
    ours.sort();
    assert_eq!(ours, pytorch, "names and shapes of the state_dict");
    let trained: usize =
        spec.tensors().iter().filter(|t| t.kind == TensorKind::Param).map(|t| t.numel()).sum();
    assert_eq!(trained, spec.param_count());
    assert!((570_000..580_000).contains(&trained), "{trained} parameters");
}

#[test]
fn checkpoint_of_another_model_is_refused_and_changes_nothing() {
    let dir = tmpdir("other");
    let path = dir.join("other.safetensors");
    let mut a = net(1);
    let mut tensors = incept::checkpoint::model_tensors(&mut a);
    for (name, t) in tensors.iter_mut() {
        if name == "fc.weight" {
            *t = OwnedTensor::f32(vec![100, 384], vec![0.0; 38400]);
        }
    }
    save(&path, &tensors, HashMap::new()).unwrap();
    let mut b = net(2);
    let before = b.state();
    let err = load_model(&mut b, &TensorFile::open(&path).unwrap(), "").unwrap_err();
    let msg = format!("{err:#}");
    assert!(
        msg.contains("fc.weight") && msg.contains("[100, 384]") && msg.contains("another model"),
        "{msg}"
    );
    assert_eq!(b.state(), before, "a refused load leaves the model untouched");

    // A file without the model's tensors at all.
    let path2 = dir.join("empty.safetensors");
    save(&path2, &[("foo".into(), OwnedTensor::f32(vec![1], [1.0]))], HashMap::new()).unwrap();
    let msg =
        format!("{:#}", load_model(&mut b, &TensorFile::open(&path2).unwrap(), "").unwrap_err());
    assert!(msg.contains("no tensor block1.0.weight"), "{msg}");
}

#[test]
fn damaged_files_and_bad_paths_are_clear_errors() {
    let dir = tmpdir("damaged");
    let path = dir.join("m.safetensors");
    save_model(&mut net(1), &path).unwrap();
    let bytes = std::fs::read(&path).unwrap();
    let cut = dir.join("cut.safetensors");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    let msg = format!("{:#}", TensorFile::open(&cut).err().expect("truncated file accepted"));
    assert!(msg.contains("cut.safetensors") && msg.contains("truncated"), "{msg}");
    let garbage = dir.join("garbage.safetensors");
    std::fs::write(&garbage, b"not a safetensors file at all").unwrap();
    assert!(TensorFile::open(&garbage).is_err());
    let msg = format!("{:#}", TensorFile::open(&dir.join("missing.safetensors")).err().unwrap());
    assert!(msg.contains("missing.safetensors"), "{msg}");

    // NaN weights are refused.
    let mut tensors = incept::checkpoint::model_tensors(&mut net(1));
    tensors[0].1 = OwnedTensor::f32(tensors[0].1.shape.clone(), vec![f32::NAN; 64 * 3 * 7 * 7]);
    let nan = dir.join("nan.safetensors");
    save(&nan, &tensors, HashMap::new()).unwrap();
    let msg =
        format!("{:#}", load_model(&mut net(2), &TensorFile::open(&nan).unwrap(), "").unwrap_err());
    assert!(msg.contains("block1.0.weight") && msg.contains("NaN"), "{msg}");

    // An unwritable destination fails cleanly and leaves the old file intact.
    let msg = format!(
        "{:#}",
        save_model(&mut net(1), &dir.join("no/such/dir/m.safetensors")).unwrap_err()
    );
    assert!(msg.contains("cannot write"), "{msg}");
    assert_eq!(std::fs::read(&path).unwrap(), bytes);
}
