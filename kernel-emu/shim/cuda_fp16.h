// Host stand-in for the CUDA toolkit's cuda_fp16.h: kernel-emu compiles cuda/*.cu for the CPU,
// where cuda/emu.h supplies __half and the other CUDA built-ins.
#pragma once
#include "emu.h"
