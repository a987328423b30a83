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

// Math functions that resolve to CUDA's device versions under nvcc and to <cmath> on the host.
#ifdef __CUDA_ARCH__
#define FAST3D_UNARY(name)   \
  template <typename T>      \
  FAST3D_HD T name##_(T x) { \
    return name(x);          \
  }
#else
#define FAST3D_UNARY(name)   \
  template <typename T>      \
  FAST3D_HD T name##_(T x) { \
    return std::name(x);     \
  }
#endif
FAST3D_UNARY(exp)
FAST3D_UNARY(expm1)  // e^x - 1, accurate near 0 (not a fast-math intrinsic under nvcc)
FAST3D_UNARY(log)
FAST3D_UNARY(sqrt)
FAST3D_UNARY(floor)
FAST3D_UNARY(ceil)
#undef FAST3D_UNARY

template <typename T>
FAST3D_HD T min_(T a, T b) {
  return a < b ? a : b;
}
template <typename T>
FAST3D_HD T max_(T a, T b) {
  return a > b ? a : b;
}

}  // namespace fast3d
