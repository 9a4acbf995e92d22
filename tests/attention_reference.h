// The double-precision decode attention reference the attention kernel tests share.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

namespace ringllama::test {

// out[h, :] for one query at position pos over keys [0, pos], double precision.
inline std::vector<double> attention_ref(const std::vector<double>& q, const std::vector<double>& k,
                                  const std::vector<double>& v, int64_t pos, int64_t n_heads, int64_t n_kv_heads,
                                  int64_t hd) {
  const int64_t group = n_heads / n_kv_heads, kv_dim = n_kv_heads * hd;
  const double scale = 1.0 / std::sqrt(static_cast<double>(hd));
  std::vector<double> out(n_heads * hd), p(pos + 1);
  for (int64_t h = 0; h < n_heads; ++h) {
    const int64_t g = h / group;
    double mx = -INFINITY;
    for (int64_t j = 0; j <= pos; ++j) {
      double dot = 0;
      for (int64_t d = 0; d < hd; ++d) dot += q[h * hd + d] * k[j * kv_dim + g * hd + d];
      mx = std::max(mx, p[j] = dot * scale);
    }
    double sum = 0;
    for (auto& x : p) sum += (x = std::exp(x - mx));
    for (int64_t d = 0; d < hd; ++d) {
      double acc = 0;
      for (int64_t j = 0; j <= pos; ++j) acc += p[j] * v[j * kv_dim + g * hd + d];
      out[h * hd + d] = acc / sum;
    }
  }
  return out;
}

}  // namespace ringllama::test
