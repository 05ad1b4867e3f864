// Checks the gather-scatter-add kernel (float and double; random graphs with isolated rows, duplicate edges,
// self-loops, no edges, a row stride larger than d, no edge term) against a naive double loop written here, and
// that an out-of-range index is reported without writing. Exits non-zero on the first mismatch.
#include <cstdio>
#include <random>
#include <vector>

#include "cpu/message_passing.h"
#include "tests/check.h"

namespace {

using pyvl_test::close;

template <typename T>
bool run(int64_t n_in, int64_t n_out, int64_t E, int64_t d, int64_t stride, bool with_edge, std::mt19937& rng) {
  std::normal_distribution<double> normal;
  std::uniform_int_distribution<int64_t> pick_src(0, n_in - 1), pick_dst(0, n_out - 1);
  std::vector<T> x(static_cast<size_t>(n_in * stride)), edge(static_cast<size_t>(E * d));
  for (auto& v : x) v = T(normal(rng));
  for (auto& v : edge) v = T(normal(rng));
  std::vector<int64_t> src(E), dst(E);
  for (int64_t e = 0; e < E; ++e) {
    src[e] = pick_src(rng);
    dst[e] = e % 7 == 3 && e > 0 ? dst[e - 1] : pick_dst(rng);  // some repeated destinations
  }
  std::vector<double> want(static_cast<size_t>(n_out * d), 0.0);
  for (int64_t e = 0; e < E; ++e)
    for (int64_t j = 0; j < d; ++j)
      want[dst[e] * d + j] += double(x[src[e] * stride + j]) + (with_edge ? double(edge[e * d + j]) : 0.0);
  std::vector<T> out(static_cast<size_t>(n_out * d), T(-7));
  const int64_t bad = pyvl::cpu::gather_scatter_add<T>(x.data(), stride, n_in, with_edge ? edge.data() : nullptr, d,
                                                       src.data(), dst.data(), E, n_out, d, out.data());
  if (bad != -1) {
    std::printf("  unexpected bad index %lld\n", static_cast<long long>(bad));
    return false;
  }
  return close("gather_scatter_add", out, want, sizeof(T) == 4 ? 1e-5 : 1e-12);
}

bool out_of_range_is_reported() {
  std::vector<float> x(6, 1.0f), out(4, -7.0f);
  std::vector<int64_t> src = {0, 2, 1}, dst = {1, 0, 2};  // dst 2 is outside the 2 output rows
  const int64_t bad = pyvl::cpu::gather_scatter_add<float>(x.data(), 2, 3, nullptr, 0, src.data(), dst.data(), 3, 2,
                                                           2, out.data());
  if (bad != 2 || out[0] != -7.0f) {
    std::printf("  out-of-range edge: got %lld\n", static_cast<long long>(bad));
    return false;
  }
  return true;
}

}  // namespace

int main() {
  std::mt19937 rng(1234);
  bool ok = true;
  // (n_in, n_out, E, d, row stride, edge term): large enough for the threaded path, a graph without edges, more
  // rows than edges (isolated rows), a row stride above d.
  ok &= run<float>(300, 300, 700, 64, 64, true, rng);
  ok &= run<double>(300, 250, 700, 33, 40, true, rng);
  ok &= run<float>(5, 9, 0, 3, 3, true, rng);
  ok &= run<double>(40, 40, 12, 7, 7, false, rng);
  ok &= run<float>(1, 3, 5, 1, 2, true, rng);
  ok &= out_of_range_is_reported();
  std::printf("%s\n", ok ? "test_message_passing: ok" : "test_message_passing: FAILED");
  return ok ? 0 : 1;
}
