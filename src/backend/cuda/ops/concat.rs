//! The Inception block's joins: its branches' outputs concatenated along channels
//! (`cuda/concat.cu`), and the sum of the gradients of the input its branches share.

use super::*;

impl Gpu {
    pub(super) fn concat(&self, y: &mut Buf, parts: &[&Buf], channels: &[usize]) {
        let ld: i32 = channels.iter().sum::<usize>() as i32;
        let pixels = (y.len / ld.max(1) as usize) as i32;
        let name = typed("concat_forward", y.dtype);
        let yp = self.ptr(y);
        let mut off = 0i32;
        for (part, &c) in parts.iter().zip(channels) {
            let args = [
                Ptr(yp),
                I32(ld),
                I32(off),
                Ptr(self.ptr(part)),
                I32(pixels),
                I32(c as i32),
            ];
            self.launch(&name, self.strided(pixels as usize * c), &args);
            off += c as i32;
        }
    }

    pub(super) fn split(&self, dparts: &mut [&mut Buf], dy: &Buf, channels: &[usize]) {
        let ld: i32 = channels.iter().sum::<usize>() as i32;
        let pixels = (dy.len / ld.max(1) as usize) as i32;
        let name = typed("concat_backward", dy.dtype);
        let dyp = self.ptr(dy);
        let mut off = 0i32;
        for (part, &c) in dparts.iter_mut().zip(channels) {
            let args = [
                Ptr(self.ptr(part)),
                Ptr(dyp),
                I32(ld),
                I32(off),
                I32(pixels),
                I32(c as i32),
            ];
            self.launch(&name, self.strided(pixels as usize * c), &args);
            off += c as i32;
        }
    }
}

pub(super) fn fork_backward(gpu: &Gpu, dx: &mut Buf, parts: &[&Buf]) {
    // The kernel sums up to four parts in order; more are folded in four at a time.
    let n = dx.len as i32;
    let name = typed("fork_backward", dx.dtype);
    let dxp = gpu.ptr(dx);
    let mut first = true;
    for chunk in parts.chunks(4) {
        let mut p = [0u64; 4];
        for (slot, part) in p.iter_mut().zip(chunk) {
            *slot = gpu.ptr(part);
        }
        if !first {
            // dx = dx + next parts: dx itself is the first summand.
            p.rotate_right(1);
            p[0] = dxp;
            if chunk.len() == 4 {
                gpu.record("fork_backward", "more than 7 branches");
            }
        }
        first = false;
        let args = [Ptr(dxp), Ptr(p[0]), Ptr(p[1]), Ptr(p[2]), Ptr(p[3]), I32(n)];
        gpu.launch(&name, elementwise(dx.len), &args);
    }
}

pub(super) fn concat_forward(gpu: &Gpu, y: &mut Buf, parts: &[&Buf], channels: &[usize]) {
    gpu.concat(y, parts, channels);
}

pub(super) fn concat_backward(gpu: &Gpu, dparts: &mut [&mut Buf], dy: &Buf, channels: &[usize]) {
    gpu.split(dparts, dy, channels);
}
