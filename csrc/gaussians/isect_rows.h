// The deterministic reduction of the CUDA rasterization backward, shared with the CPU (which runs
// it in gs_reduce_isect_rows_cpu, so that tests check it without a GPU).
//
// The blend backward works per tile, and a Gaussian meets several tiles: with atomics, the order
// in which the tiles' gradients reach a Gaussian changes from run to run. Deterministic mode
// instead writes one gradient row per intersection (8 + D floats: means2d x, y; conic A, B, C;
// opacity; |means2d| x, y; the D features) and sums each Gaussian's rows in a fixed order.
//
// Memory is bounded by doing it in passes over the sorted intersections: pass [j0, j1) writes the
// rows of the sorted intersections j0 <= j < j1 into a buffer of j1 - j0 rows, then every Gaussian
// adds those of its rows that fall in the pass into its gradients. A Gaussian's intersections have
// pre-sort indices k = gauss_offsets[g] ... gauss_offsets[g + 1] - 1 (emitted in row-major tile
// order), and the sort orders them by image | tile | depth, so their sorted positions sorted_of[k]
// increase with k: the rows a pass holds for g are one run of consecutive k, found by binary search.
// Each gradient component is a float sum over k in increasing order, started from 0 and continued
// across passes through the stored value (a store and a load are exact), so the result is
// bit-identical for every pass size, and from run to run.
#pragma once

#include <cstdint>

#include "common/hd.h"

namespace fast3d {
namespace gs {

// Floats of an intersection's gradient row with D feature channels.
FAST3D_HD int isect_row_size(int D) { return 8 + D; }

// The first k in [lo, hi) with sorted_of[k] >= j (hi if none); sorted_of increases on [lo, hi).
FAST3D_HD int64_t first_sorted_at_least(const int32_t* sorted_of, int64_t lo, int64_t hi, int64_t j) {
  while (lo < hi) {
    const int64_t mid = lo + (hi - lo) / 2;
    if (sorted_of[mid] < j)
      lo = mid + 1;
    else
      hi = mid;
  }
  return lo;
}

// One pass for Gaussian g: rows [j1 - j0, 8 + D] hold the gradient rows of the sorted
// intersections [j0, j1); sorted_of [capacity] maps a pre-sort index to its sorted position;
// gauss_offsets [G + 1] (only k < capacity were binned). ADDS g's rows of the pass, in increasing
// k, into g_means2d [G, 2], g_conics [G, 3], g_opac [G], g_feats [G, D], absgrad [G, 2].
template <typename T>
FAST3D_HD void reduce_isect_rows_pass(const T* rows, const int32_t* sorted_of, const int64_t* gauss_offsets,
                                      int64_t capacity, int64_t g, int D, int64_t j0, int64_t j1, T* g_means2d,
                                      T* g_conics, T* g_opac, T* g_feats, T* absgrad) {
  const int64_t k_begin = min_(gauss_offsets[g], capacity), k_end = min_(gauss_offsets[g + 1], capacity);
  if (k_begin >= k_end || sorted_of[k_begin] >= j1 || sorted_of[k_end - 1] < j0) return;
  const int64_t lo = first_sorted_at_least(sorted_of, k_begin, k_end, j0);
  const int64_t hi = first_sorted_at_least(sorted_of, lo, k_end, j1);
  if (lo >= hi) return;
  const int R = isect_row_size(D);
  // The 8 geometric components, then the features one channel at a time: each a sum in k order.
  T* const geo[8] = {g_means2d + g * 2,    g_means2d + g * 2 + 1, g_conics + g * 3,
                     g_conics + g * 3 + 1, g_conics + g * 3 + 2,  g_opac + g,
                     absgrad + g * 2,      absgrad + g * 2 + 1};
  for (int r = 0; r < 8; ++r) {
    T acc = *geo[r];
    for (int64_t k = lo; k < hi; ++k) acc += rows[(sorted_of[k] - j0) * R + r];
    *geo[r] = acc;
  }
  for (int d = 0; d < D; ++d) {
    T acc = g_feats[g * D + d];
    for (int64_t k = lo; k < hi; ++k) acc += rows[(sorted_of[k] - j0) * R + 8 + d];
    g_feats[g * D + d] = acc;
  }
}

}  // namespace gs
}  // namespace fast3d
