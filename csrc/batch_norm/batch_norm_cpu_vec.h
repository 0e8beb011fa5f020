// Vector building blocks of the CPU BatchNorm kernels: loads and stores that widen to the
// accumulation type, and Chan et al.'s merge of two partial (count, mean, M2) moments.
//
// Every kernel computes in acc_t = at::opmath_type<T> (float for bfloat16/float16/float32,
// double for float64) on at::vec::Vectorized<acc_t>, W lanes at a time: a bfloat16/float16 load
// reads W 16-bit values and widens them, a store narrows them back.
#pragma once

#include <ATen/OpMathType.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <cstdint>
#include <type_traits>

namespace dlext {
namespace bn_cpu {

template <typename T>
using acc_type = at::opmath_type<T>;

template <typename T>
using AccVec = at::vec::Vectorized<acc_type<T>>;

// Values of T per AccVec.
template <typename T>
constexpr int64_t kW = AccVec<T>::size();

template <typename T>
inline AccVec<T> load_acc(const T* p) {
  if constexpr (std::is_same_v<T, acc_type<T>>) {
    return AccVec<T>::loadu(p);
  } else {
    at::vec::Vectorized<float> v;
    at::vec::load_to_float<T>(p, v);
    return v;
  }
}

template <typename T>
inline void store_acc(T* p, const AccVec<T>& v) {
  if constexpr (std::is_same_v<T, acc_type<T>>) {
    v.store(p);
  } else {
    at::vec::convert_from_float<T>(v, v).store(p, static_cast<int>(kW<T>));
  }
}

// Sum of the lanes, in lane order (a fixed order, so results do not depend on anything else).
template <typename V>
inline typename V::value_type lane_sum(const V& v) {
  __at_align__ typename V::value_type lanes[V::size()];
  v.store(lanes);
  typename V::value_type s = 0;
  for (int64_t i = 0; i < V::size(); ++i) s += lanes[i];
  return s;
}

// Count, mean and sum of squared deviations (M2) of a set of values.
template <typename acc_t>
struct Moments {
  acc_t mean = 0;
  acc_t m2 = 0;
  int64_t n = 0;
};

// a <- a U b by the parallel-variance formula (Chan, Golub, LeVeque 1979): exact in exact
// arithmetic, and stable in floating point because it only ever adds squared deviations.
template <typename acc_t>
inline void merge(Moments<acc_t>& a, const Moments<acc_t>& b) {
  if (b.n == 0) return;
  if (a.n == 0) {
    a = b;
    return;
  }
  const int64_t n = a.n + b.n;
  const acc_t delta = b.mean - a.mean;
  const acc_t fb = static_cast<acc_t>(b.n) / static_cast<acc_t>(n);
  a.mean += delta * fb;
  a.m2 += b.m2 + delta * delta * (static_cast<acc_t>(a.n) * fb);
  a.n = n;
}

// The same merge for W channels at once, all with counts na and nb.
template <typename V>
inline void merge(V& mean_a, V& m2_a, int64_t na, const V& mean_b, const V& m2_b, int64_t nb) {
  using acc_t = typename V::value_type;
  const acc_t fb = static_cast<acc_t>(nb) / static_cast<acc_t>(na + nb);
  const V delta = mean_b - mean_a;
  mean_a = at::vec::fmadd(delta, V(fb), mean_a);
  m2_a = m2_a + at::vec::fmadd(delta * delta, V(static_cast<acc_t>(na) * fb), m2_b);
}

}  // namespace bn_cpu
}  // namespace dlext
