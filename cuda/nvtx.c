/* NVTX 3 ranges for the CUDA backend (src/backend/cuda/nvtx.rs).
 *
 * NVTX 3 is header-only: the first call reads NVTX_INJECTION64_PATH, which Nsight Systems and
 * Nsight Compute set to their own injection library, and loads it; without a profiler every
 * call returns at once. So ranges reach the profiler with no NVIDIA library installed, which
 * matters from CUDA 13 on, where libnvToolsExt (NVTX 2) no longer ships. */
#include <nvtx3/nvToolsExt.h>

int incept_nvtx_range_push(const char *name) { return nvtxRangePushA(name); }

int incept_nvtx_range_pop(void) { return nvtxRangePop(); }
