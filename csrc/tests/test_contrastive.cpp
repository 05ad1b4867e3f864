// Checks the similarity-logits and contrastive-statistics kernels (float and double; shapes that leave ragged
// tiles, d not a multiple of 16, a broadcast batch) against naive double loops written here.
// Exits non-zero on the first mismatch.
#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

#include "cpu/contrastive.h"
#include "tests/check.h"
#include "cpu/similarity.h"

using pyvl::cpu::ContrastiveKind;

namespace {

using pyvl_test::close;

std::vector<double> randn(size_t n, std::mt19937& rng) {
  std::normal_distribution<double> dist;
  std::vector<double> v(n);
  for (auto& x : v) x = dist(rng);
  return v;
}

template <typename T>
std::vector<T> cast(const std::vector<double>& v) {
  return std::vector<T>(v.begin(), v.end());
}

template <typename T>
bool check_similarity(int64_t B, int64_t N, int64_t M, int64_t d, bool broadcast_b, bool normalize, double tol) {
  std::mt19937 rng(static_cast<unsigned>(B * 1000 + N * 10 + M + d));
  const int64_t nb = broadcast_b ? 1 : B;
  auto a = randn(B * N * d, rng), b = randn(nb * M * d, rng);
  const double scale = 3.5, bias = -0.25;
  std::vector<double> want(B * N * M);
  for (int64_t bi = 0; bi < B; ++bi)
    for (int64_t i = 0; i < N; ++i)
      for (int64_t j = 0; j < M; ++j) {
        const double* u = &a[(bi * N + i) * d];
        const double* v = &b[((broadcast_b ? 0 : bi) * M + j) * d];
        double dot = 0, nu = 0, nv = 0;
        for (int64_t k = 0; k < d; ++k) {
          dot += u[k] * v[k];
          nu += u[k] * u[k];
          nv += v[k] * v[k];
        }
        if (normalize) dot /= std::max(std::sqrt(nu), 1e-12) * std::max(std::sqrt(nv), 1e-12);
        want[(bi * N + i) * M + j] = scale * dot + bias;
      }
  auto at = cast<T>(a), bt = cast<T>(b);
  std::vector<T> out(B * N * M);
  pyvl::cpu::similarity_logits_forward<T>(at.data(), bt.data(), out.data(), B, N, M, d, N * d,
                                          broadcast_b ? 0 : M * d, T(scale), T(bias), normalize, 1e-12);
  return close("similarity", out.data(), want, tol);
}

template <typename T>
bool check_stats(int64_t n, int64_t m, int64_t d, int64_t offset, ContrastiveKind kind, double tol) {
  std::mt19937 rng(static_cast<unsigned>(n * 100 + m + d));
  auto x = randn(n * d, rng), y = randn(m * d, rng), gr = randn(n, rng), gc = randn(m, rng), gd = randn(n, rng);
  const double scale = 1.5 / std::sqrt(double(d)), bias = -0.5;
  const bool softmax = kind == ContrastiveKind::Softmax;
  std::vector<double> L(n * m), row(n), col(m), diag(n, 0.0), gx(n * d, 0.0), gy(m * d, 0.0);
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < m; ++j) {
      double dot = 0;
      for (int64_t k = 0; k < d; ++k) dot += x[i * d + k] * y[j * d + k];
      L[i * m + j] = scale * dot + bias;
      if (j == i + offset) diag[i] = L[i * m + j];
    }
  for (int64_t i = 0; i < n; ++i) {
    double mx = -INFINITY, s = 0;
    for (int64_t j = 0; j < m; ++j) mx = std::max(mx, L[i * m + j]);
    for (int64_t j = 0; j < m; ++j) s += softmax ? std::exp(L[i * m + j] - mx) : std::log1p(std::exp(L[i * m + j]));
    row[i] = softmax ? mx + std::log(s) : s;
  }
  for (int64_t j = 0; j < m; ++j) {
    double mx = -INFINITY, s = 0;
    for (int64_t i = 0; i < n; ++i) mx = std::max(mx, L[i * m + j]);
    for (int64_t i = 0; i < n; ++i) s += std::exp(L[i * m + j] - mx);
    col[j] = mx + std::log(s);
  }
  double gs = 0, gb = 0;
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < m; ++j) {
      const double l = L[i * m + j];
      const double g = (softmax ? gr[i] * std::exp(l - row[i]) + gc[j] * std::exp(l - col[j])
                                : gr[i] / (1.0 + std::exp(-l))) + (j == i + offset ? gd[i] : 0.0);
      gs += g * (l - bias) / scale;
      gb += g;
      for (int64_t k = 0; k < d; ++k) {
        gx[i * d + k] += g * scale * y[j * d + k];
        gy[j * d + k] += g * scale * x[i * d + k];
      }
    }
  auto xt = cast<T>(x), yt = cast<T>(y), grt = cast<T>(gr), gct = cast<T>(gc), gdt = cast<T>(gd);
  std::vector<T> row_t(n), col_t(m), diag_t(n), gx_t(n * d), gy_t(m * d);
  pyvl::cpu::contrastive_stats_forward<T>(xt.data(), yt.data(), n, m, d, T(scale), T(bias), kind, offset,
                                          row_t.data(), softmax ? col_t.data() : nullptr, diag_t.data());
  bool ok = close("row", row_t.data(), row, tol) && close("diag", diag_t.data(), diag, tol);
  if (softmax) ok = ok && close("col", col_t.data(), col, tol);
  double gs_t = 0, gb_t = 0;
  pyvl::cpu::contrastive_stats_backward<T>(xt.data(), yt.data(), n, m, d, T(scale), T(bias), kind, offset,
                                           row_t.data(), softmax ? col_t.data() : nullptr, grt.data(),
                                           softmax ? gct.data() : nullptr, gdt.data(), gx_t.data(), gy_t.data(),
                                           &gs_t, &gb_t);
  ok = ok && close("grad_x", gx_t.data(), gx, tol) && close("grad_y", gy_t.data(), gy, tol);
  ok = ok && close("grad_scale", &gs_t, std::vector<double>{gs}, tol) &&
       close("grad_bias", &gb_t, std::vector<double>{gb}, tol);
  return ok;
}

}  // namespace

int main() {
  bool ok = true;
  // {n, m, d, diag_offset}: a rank's rows against all columns has m = world * n and offset = rank * n.
  const int64_t shapes[][4] = {{1, 1, 1, 0}, {5, 7, 3, 2}, {97, 100, 17, 0}, {100, 200, 32, 100}, {13, 193, 40, 150}};
  for (const auto& s : shapes) {
    for (ContrastiveKind kind : {ContrastiveKind::Softmax, ContrastiveKind::Sigmoid}) {
      ok = ok && check_stats<double>(s[0], s[1], s[2], s[3], kind, 1e-11);
      ok = ok && check_stats<float>(s[0], s[1], s[2], s[3], kind, 2e-4);
    }
    for (bool normalize : {true, false}) {
      ok = ok && check_similarity<double>(2, s[0], s[1], s[2], false, normalize, 1e-12);
      ok = ok && check_similarity<float>(3, s[0], s[1], s[2], true, normalize, 1e-4);
    }
  }
  std::printf(ok ? "test_contrastive: all passed\n" : "test_contrastive: FAILED\n");
  return ok ? 0 : 1;
}
