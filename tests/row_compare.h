// Comparing logits rows: how far a row is from a reference, and how clear its greedy pick is.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <vector>

namespace ringllama::test {

struct RowDiff {
  double ratio = 0;   // max|got - ref| / max|ref|; infinite when got holds a NaN or an infinity
  double max_diff = 0;
  bool finite = true;
};

// The first n values of got against ref.
inline RowDiff compare_row(const std::vector<float>& got, const float* ref, size_t n) {
  RowDiff r;
  double max_ref = 0;
  for (size_t i = 0; i < n; ++i) {
    if (!std::isfinite(got[i])) r.finite = false;
    r.max_diff = std::max(r.max_diff, std::fabs(static_cast<double>(got[i]) - ref[i]));
    max_ref = std::max(max_ref, std::fabs(static_cast<double>(ref[i])));
  }
  r.ratio = r.finite ? r.max_diff / std::max(max_ref, 1e-30) : INFINITY;
  return r;
}

// max|got - ref| / max|ref|; infinite when got holds a NaN or an infinity.
inline double row_ratio(const std::vector<float>& got, const std::vector<float>& ref) {
  return compare_row(got, ref.data(), got.size()).ratio;
}

// (top-1 - top-2) / max|x|.
inline double top2_gap(const float* x, size_t n) {
  double a = -INFINITY, b = -INFINITY, mx = 0;
  for (size_t i = 0; i < n; ++i) {
    if (x[i] > a) {
      b = a;
      a = x[i];
    } else if (x[i] > b) {
      b = x[i];
    }
    mx = std::max(mx, std::fabs(static_cast<double>(x[i])));
  }
  return (a - b) / std::max(mx, 1e-30);
}

inline double top2_gap(const std::vector<float>& x) { return top2_gap(x.data(), x.size()); }

}  // namespace ringllama::test
