// Host/device portability for math shared by the C++ CPU kernels and the CUDA kernels.
// Headers that use FAST3D_HD compile as plain C++ in the CPU build (and are tested there, in CI)
// and as __host__ __device__ code under nvcc.
#pragma once

#include <cmath>

#ifdef __CUDACC__
#define FAST3D_HD __host__ __device__ __forceinline__
#else
#define FAST3D_HD inline
#endif

namespace fast3d {

template <typename T>
FAST3D_HD T exp_(T x) {
#ifdef __CUDA_ARCH__
  return exp(x);
#else
  return std::exp(x);
#endif
}

}  // namespace fast3d
