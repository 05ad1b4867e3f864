// A/B harness for the C++ depthwise kernels alone (no torch, no Python): MobileNetV1's 9 depthwise shapes at
// batch 8, one op and layout per run, the median time in microseconds per shape on one line. Build one binary per
// version of csrc/cpu/depthwise_conv2d.cpp and run them interleaved, several rounds, comparing medians; this
// machine-noise-robust A/B produced the kernel speedups quoted in the commits and in the source comments.
//
//   g++ -O3 -march=native -fopenmp -fno-math-errno -std=c++17 -Icsrc benchmarks/cpu_harness/depthwise_ab.cpp
//       csrc/cpu/depthwise_conv2d.cpp -o /tmp/dw_ab                                 (one command, from the root)
//   /tmp/dw_ab fwd nchw        # ops: fwd, grad_x, grad_w; layouts: nchw, nhwc; optional third argument: repeats
//   PYVL_AB_MIN=1 /tmp/dw_ab fwd nchw     # the fastest repeat instead of the median
//
// Shapes, in order: C32 112x112 s1, C64 112x112 s2, C128 56x56 s1, C128 56x56 s2, C256 28x28 s1, C256 28x28 s2,
// C512 14x14 s1, C512 14x14 s2, C1024 7x7 s1 (3x3 kernel, padding 1).
#include "cpu/depthwise_conv2d.h"

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

int main(int argc, char** argv) {
  using pyvl::Conv2dShape;
  using pyvl::Layout;
  if (argc < 3) {
    std::fprintf(stderr, "usage: %s {fwd|grad_x|grad_w} {nchw|nhwc} [repeats]\n", argv[0]);
    return 2;
  }
  const std::string op = argv[1];
  const Layout layout = std::strcmp(argv[2], "nhwc") == 0 ? Layout::NHWC : Layout::NCHW;
  const int repeats = argc > 3 ? std::atoi(argv[3]) : 15;
  // PYVL_AB_MIN=1 prints the fastest repeat instead of the median: steadier on a VM whose host adds noise.
  const char* min_env = std::getenv("PYVL_AB_MIN");
  const bool use_min = min_env && std::strcmp(min_env, "1") == 0;
  if (op != "fwd" && op != "grad_x" && op != "grad_w") {
    std::fprintf(stderr, "op must be fwd, grad_x or grad_w, got %s\n", argv[1]);
    return 2;
  }
  const int shapes[][3] = {{32, 112, 1}, {64, 112, 2}, {128, 56, 1}, {128, 56, 2}, {256, 28, 1},
                           {256, 28, 2}, {512, 14, 1}, {512, 14, 2}, {1024, 7, 1}};
  std::mt19937 rng(0);
  std::uniform_real_distribution<float> uniform(-1.f, 1.f);
  for (const auto& sh : shapes) {
    Conv2dShape s{8, sh[0], sh[1], sh[1], 3, 3, 0, 0, sh[2], sh[2], 1, 1, 1, 1};
    s.OH = (s.H + 2 - 3) / s.stride_h + 1;
    s.OW = (s.W + 2 - 3) / s.stride_w + 1;
    std::vector<float> x(s.N * s.C * s.H * s.W), w(s.C * 9), b(s.C), y(s.N * s.C * s.OH * s.OW);
    for (auto* v : {&x, &w, &b, &y})
      for (float& e : *v) e = uniform(rng);
    std::vector<double> t;
    for (int r = 0; r < repeats; ++r) {
      const auto t0 = std::chrono::steady_clock::now();
      if (op == "fwd")
        pyvl::cpu::depthwise_conv2d_forward(x.data(), w.data(), b.data(), y.data(), s, layout);
      else if (op == "grad_x")
        pyvl::cpu::depthwise_conv2d_backward_input(y.data(), w.data(), x.data(), s, layout);
      else
        pyvl::cpu::depthwise_conv2d_backward_weight(y.data(), x.data(), w.data(), s, layout);
      t.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
    }
    std::sort(t.begin(), t.end());
    std::printf("%.1f ", (use_min ? t[0] : t[t.size() / 2]) * 1e6);
  }
  std::printf("\n");
  return 0;
}
