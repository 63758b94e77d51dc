//! NCCL without a GPU: the communicator's id, drawn by rank 0 through incept's own bindings of
//! the real `libnccl.so.2` and sent to the other ranks over their TCP group, arrives intact.
//! Needs INCEPT_CUDA13_PYTHON, the python of a venv holding nvidia-nccl-cu13 (.ci/run makes
//! one); reported skipped otherwise. What needs a GPU (joining, the all-reduce) is for the GPU
//! check.

#[cfg(feature = "cudnn")]
#[test]
fn rank_0_draws_the_nccl_id_and_every_rank_receives_it() {
    use incept::dist::{Collective, Place, TcpGroup};
    use std::path::PathBuf;
    use std::time::Duration;
    let Some(python) = std::env::var_os("INCEPT_CUDA13_PYTHON") else {
        eprintln!("skipped: INCEPT_CUDA13_PYTHON is not set (scripts/cuda-venv.sh makes the venv; see .ci/run)");
        return;
    };
    // The venv's NCCL, named before anything opens the NVIDIA libraries (once per process: this
    // file holds one test).
    let venv = PathBuf::from(python).parent().and_then(|b| b.parent()).unwrap().to_path_buf();
    let lib = std::fs::read_dir(venv.join("lib"))
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.path().join("site-packages/nvidia/nccl/lib"))
        .find(|p| p.join("libnccl.so.2").exists())
        .expect("the venv holds nvidia-nccl-cu13");
    std::env::set_var("INCEPT_CUDA_LIBS", &lib);
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let handles: Vec<_> = (0..3)
        .map(|rank| {
            std::thread::spawn(move || {
                let place = Place::local(rank, 3, port);
                let mut g = TcpGroup::join(&place, &[], Duration::from_secs(30)).unwrap();
                assert_eq!(g.rank(), rank);
                incept::backend::cuda::comm::nccl_id(&mut g).map_err(|e| format!("{e:#}"))
            })
        })
        .collect();
    let ids: Vec<[u8; 128]> =
        handles.into_iter().map(|h| h.join().unwrap().expect("an NCCL id")).collect();
    assert!(ids.iter().all(|id| id == &ids[0]), "the ranks received different ids");
    // An id is a bootstrap address and a magic number: never all zeros.
    assert!(ids[0].iter().any(|&b| b != 0), "an all-zero NCCL id");
}
