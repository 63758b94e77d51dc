//! Launch geometries of the CUDA backend's grid-wide per-channel reductions
//! (`cuda/reduce.cuh`), as pure functions of the shape and the GPU's multiprocessor count. The
//! backend launches exactly these, and the emulated-kernel tests (`tests/kernels.rs`) launch
//! the same for every SM count they try, so "the geometries the backend can use" is one
//! function, not two copies of a formula. Built without `--features cudnn` too, for the tests.

/// One launch of a per-channel reduction over a `[P, C]` tensor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Reduction {
    /// Blocks: (channel groups, row chunks).
    pub grid: (u32, u32),
    /// Threads per block: (channels, rows).
    pub block: (u32, u32),
    /// Doubles of partial-sum workspace.
    pub workspace: usize,
    /// Ints of arrival counters (one per channel group).
    pub counters: usize,
}

/// Block (32, 16), or (16, 32) for up to 16 channels so that fewer threads idle.
fn block(c: usize) -> (u32, u32) {
    if c <= 16 {
        (16, 32)
    } else {
        (32, 16)
    }
}

/// The BatchNorm reductions (`batch_norm_stats_*`, `batch_norm_relu_backward_reduce_*`) as
/// batch_norm.cu recommends: about two blocks per SM, each thread keeping at least ~8 rows.
pub fn batch_norm(p: usize, c: usize, sms: u32) -> Reduction {
    let (bx, by) = block(c);
    let gx = (c as u32).div_ceil(bx).max(1);
    let g = (2 * sms.max(1)).div_ceil(gx).min((p as u32 / (8 * by)).max(1)).max(1);
    Reduction {
        grid: (gx, g),
        block: (bx, by),
        workspace: 2 * g as usize * c,
        counters: gx as usize,
    }
}

/// Rows per tile of `bias_grad_*`: the tiles fix its summation order, so this constant (with
/// the block shape, a function of C) decides its bits: 32 or 64 float terms per thread, and
/// few enough tiles that the merge stays short.
pub const BIAS_GRAD_TILE_ROWS: usize = 1024;

/// `bias_grad_*`: about two blocks per SM, no more blocks than tiles. Whatever `sms`, the
/// result is the same bits: only the tiles and the block shape order the sums.
pub fn bias_grad(p: usize, c: usize, sms: u32) -> Reduction {
    let (bx, by) = block(c);
    let gx = (c as u32).div_ceil(bx).max(1);
    let tiles = p.div_ceil(BIAS_GRAD_TILE_ROWS);
    let g = (2 * sms.max(1)).div_ceil(gx).min(tiles.min(u32::MAX as usize) as u32).max(1);
    Reduction { grid: (gx, g), block: (bx, by), workspace: tiles * c, counters: gx as usize }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bias_grad_has_one_workspace_slot_per_tile_and_channel_and_no_idle_chunks() {
        // block1's output at batch 512: 100352 rows in 98 tiles, 64 channels.
        let r = bias_grad(512 * 14 * 14, 64, 132);
        assert_eq!(r.block, (32, 16));
        assert_eq!(r.grid, (2, 98)); // 98 tiles < ceil(264 / 2) blocks per channel group
        assert_eq!(r.workspace, 98 * 64);
        assert_eq!(r.counters, 2);
        // block4's branches at batch 512: 8 tiles, 3 channel groups, 8 blocks each.
        let r = bias_grad(512 * 4 * 4, 96, 132);
        assert_eq!((r.grid, r.workspace), ((3, 8), 8 * 96));
        // The linear head at batch 8: one tile, one block.
        let r = bias_grad(8, 10, 132);
        assert_eq!((r.grid, r.block, r.workspace), ((1, 1), (16, 32), 10));
    }

    #[test]
    fn batch_norm_matches_the_kernel_comment() {
        // G = max(1, min(ceil(2·SMs / gridDim.x), P / (8·BY))).
        let r = batch_norm(128 * 14 * 14, 64, 132);
        assert_eq!(r.grid, (2, 132));
        assert_eq!(r.workspace, 2 * 132 * 64);
        let r = batch_norm(8 * 7 * 7, 16, 132);
        assert_eq!((r.grid, r.block), ((1, 1), (16, 32)));
    }
}
