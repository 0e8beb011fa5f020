// Vector loads and stores between scalar_t memory and registers of its accumulation type
// (at::opmath_type: float for float, half and bfloat16; double for double), for CPU kernels that
// compute in that type. One register per call: Vectorized<acc_t>::size() lanes (8 floats or 4
// doubles under AVX2). Half and bfloat16 are widened on load and rounded once on store, so no
// intermediate result is rounded to 16 bits. The partial variants cover row tails: a load
// fills lanes [n, size) with zeros, a store writes lanes [0, n) only (n >= size: a full one).
#pragma once

#include <ATen/OpMathType.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

namespace dlext {
namespace cpu {

template <typename scalar_t>
struct OpmathVec {
  using acc_t = at::opmath_type<scalar_t>;
  using Vec = at::vec::Vectorized<acc_t>;
  static constexpr int64_t kSize = Vec::size();
  static constexpr bool kWidened = !std::is_same_v<acc_t, scalar_t>;

  static Vec load(const scalar_t* p) {
    if constexpr (kWidened) {
      Vec out;
      at::vec::load_to_float(p, out);
      return out;
    } else {
      return Vec::loadu(p);
    }
  }

  // Lanes [0, n), the rest zero. Through a small zeroed buffer rather than a masked load, which
  // some ATen versions use and which is slow on AMD cores.
  static Vec load(const scalar_t* p, int64_t n) {
    if (n >= kSize) return load(p);
    alignas(64) scalar_t tmp[kSize] = {};
    std::copy(p, p + std::max<int64_t>(n, 0), tmp);
    return load(tmp);
  }

  static void store(scalar_t* p, const Vec& v) {
    if constexpr (kWidened) {
      at::vec::convert_from_float<scalar_t>(v, v).store(p, kSize);
    } else {
      v.store(p);
    }
  }

  // Lanes [0, n) only. Through a small buffer and scalar copies rather than a masked store,
  // which is microcoded and slow on AMD cores.
  static void store(scalar_t* p, const Vec& v, int64_t n) {
    if (n >= kSize) {
      store(p, v);
      return;
    }
    alignas(64) acc_t tmp[kSize];
    v.store(tmp);
    for (int64_t i = 0; i < n; ++i) p[i] = static_cast<scalar_t>(tmp[i]);
  }
};

}  // namespace cpu
}  // namespace dlext
