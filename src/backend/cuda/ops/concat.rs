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
            let args =
                [Ptr(yp), I32(ld), I32(off), Ptr(self.ptr(part)), I32(pixels), I32(c as i32)];
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
            let args =
                [Ptr(self.ptr(part)), Ptr(dyp), I32(ld), I32(off), I32(pixels), I32(c as i32)];
            self.launch(&name, self.strided(pixels as usize * c), &args);
            off += c as i32;
        }
    }
}

impl ConcatOps<f32> for Gpu {
    fn fork_backward(&self, dx: &mut Buf, parts: &[&Buf]) {
        // The kernel sums up to four parts in order; more are folded in four at a time.
        let n = dx.len as i32;
        let name = typed("fork_backward", dx.dtype);
        let dxp = self.ptr(dx);
        let mut first = true;
        for chunk in parts.chunks(4) {
            let mut p = [0u64; 4];
            for (slot, part) in p.iter_mut().zip(chunk) {
                *slot = self.ptr(part);
            }
            if !first {
                // dx = dx + next parts: dx itself is the first summand.
                p.rotate_right(1);
                p[0] = dxp;
                if chunk.len() == 4 {
                    self.record("fork_backward", "more than 7 branches");
                }
            }
            first = false;
            let args = [Ptr(dxp), Ptr(p[0]), Ptr(p[1]), Ptr(p[2]), Ptr(p[3]), I32(n)];
            self.launch(&name, elementwise(dx.len), &args);
        }
    }

    fn concat_forward(&self, y: &mut Buf, parts: &[&Buf], channels: &[usize]) {
        self.concat(y, parts, channels);
    }

    fn concat_backward(&self, dparts: &mut [&mut Buf], dy: &Buf, channels: &[usize]) {
        self.split(dparts, dy, channels);
    }
}
