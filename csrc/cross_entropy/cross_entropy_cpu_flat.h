// Flat backward kernel of the CPU cross-entropy, for class-index targets and rows of few classes
// (W <= C <= kCEFlatMaxC) that lie back to back in memory, as the input and its gradient do for
// dense (N, C) logits and channels_last images: element (r, c) at r * C + c.
//
// A run of rows is one flat array, walked a full vector at a time. With C >= W a vector holds the
// end of one row and the start of the next at most, so each per-row quantity (max, log-sum,
// scales, target) becomes a vector by one blend of two broadcasts, and the target's term by one
// lane compare. Why it is fast: the row kernel pays per row for a partial last vector (a masked
// load and a scalar tail store) and for setting up its broadcasts, which for C = 10 costs more
// than the exps; here every load and store is a full vector and the per-row work is a few
// scalars. Same formulas as row_backward_index.
#pragma once

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cstdint>

#include "common/cpu_opmath_vec.h"
#include "cross_entropy/cross_entropy_cpu_args.h"
#include "cross_entropy/cross_entropy_cpu_rows.h"

namespace dlext {
namespace cpu {

// Rows of more classes take the row kernel: their per-row cost is spread over enough vectors.
constexpr int64_t kCEFlatMaxC = 64;
// Rows whose scalars are set up at a time.
constexpr int64_t kCEFlatRows = 64;

// Whether rows (n, d) of t lie at (n * D + d) * C: the flat kernel's condition.
inline bool rows_are_flat(int64_t N, int64_t C, int64_t D, int64_t sn, int64_t sc, int64_t sd) {
  return (C <= 1 || sc == 1) && (D <= 1 || sd == C) && (N <= 1 || sn == C * D);
}

// Backward of rows [r0, r1) with class-index targets, input and gradient flat (see above).
template <typename scalar_t, bool kSmooth, bool kWeighted>
void flat_backward_index(const CEArgs<scalar_t>& A, const CEBackwardArgs<scalar_t>& B,
                         int64_t r0, int64_t r1) {
  using OV = OpmathVec<scalar_t>;
  using Vec = typename OV::Vec;
  using acc_t = typename OV::acc_t;
  using IVec = at::vec::Vectorized<at::vec::int_same_size_t<acc_t>>;
  constexpr int64_t W = OV::kSize;
  const int64_t C = A.C;
  const Vec iota = Vec::arange(0, 1), vC(static_cast<acc_t>(C)), zero(0);
  // Per-row scalars of up to kCEFlatRows rows, plus one past the end for a vector's second row.
  acc_t M[kCEFlatRows + 1], L[kCEFlatRows + 1], sA[kCEFlatRows + 1], sB[kCEFlatRows + 1],
      sT[kCEFlatRows + 1], tc[kCEFlatRows + 1];
  RowCursor cur(r0, A.D);
  for (int64_t q0 = r0; q0 < r1; q0 += kCEFlatRows) {
    const int64_t m = std::min(kCEFlatRows, r1 - q0);
    for (int64_t i = 0; i < m; ++i, cur.next()) {
      const int64_t r = q0 + i;
      const int64_t t = A.target(cur.n, cur.d);
      M[i] = A.lse_max[r];
      L[i] = A.lse_log_sum[r];
      const acc_t nan_if_bad = L[i] - L[i];  // see vexp
      if (t == A.ignore_index) {
        sA[i] = nan_if_bad;  // p * 0
        sB[i] = sT[i] = 0;
        tc[i] = -1;
        continue;
      }
      check_target(t, C);
      const acc_t s = B.row_scale(cur.n, cur.d);
      const acc_t wt = kWeighted ? A.w[t] : acc_t(1);
      sA[i] = s * (kSmooth ? A.a * wt + A.b * A.w_sum : wt) + nan_if_bad;
      sB[i] = kSmooth ? s * A.b : acc_t(0);
      sT[i] = s * (kSmooth ? A.a : acc_t(1)) * wt;
      tc[i] = static_cast<acc_t>(t);  // exact: t < C <= kCEFlatMaxC
    }
    M[m] = L[m] = sA[m] = sB[m] = sT[m] = 0;
    tc[m] = -1;
    const int64_t n_elems = m * C;
    const scalar_t* x = A.x + q0 * C;
    scalar_t* g = B.gx + q0 * C;
    int64_t row = 0, c0 = 0;  // the row and class of the vector's first lane
    for (int64_t k = 0; k < n_elems; k += W) {
      // Lanes c0 + i < C belong to `row`, the others to row + 1 (class c0 + i - C).
      const Vec cls = iota + Vec(static_cast<acc_t>(c0));
      const Vec first = cls < vC;
      auto pick = [&](const acc_t* v) { return Vec::blendv(Vec(v[row + 1]), Vec(v[row]), first); };
      const Vec col = Vec::blendv(cls - vC, cls, first);
      Vec gv = vexp((OV::load(x + k, n_elems - k) - pick(M)) - pick(L)) * pick(sA);
      if constexpr (kSmooth) {
        if constexpr (kWeighted) {
          const IVec ci = at::vec::convert_to_int_of_same_size(col);
          gv = gv - pick(sB) * at::vec::gather<sizeof(acc_t)>(A.w, ci);
        } else {
          gv = gv - pick(sB);
        }
      }
      gv = gv - (pick(sT) & (col == pick(tc)));
      OV::store(g + k, gv, n_elems - k);
      c0 += W;
      if (c0 >= C) {
        c0 -= C;
        ++row;
      }
    }
  }
}

}  // namespace cpu
}  // namespace dlext
