// Comparing logits rows: how far a row is from a reference, and how clear its greedy pick is.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <vector>

namespace ringllama::test {

// max|got - ref| / max|ref|; infinite when got holds a NaN or an infinity.
inline double row_ratio(const std::vector<float>& got, const std::vector<float>& ref) {
  double d = 0, mx = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    if (!std::isfinite(got[i])) return INFINITY;
    d = std::max(d, std::fabs(static_cast<double>(got[i]) - ref[i]));
    mx = std::max(mx, std::fabs(static_cast<double>(ref[i])));
  }
  return d / std::max(mx, 1e-30);
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
