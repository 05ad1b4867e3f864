// Shared by the C++ unit tests: compare a kernel's result with a float64 reference.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <vector>

namespace pyvl_test {

// |got - want| <= tol * max(1, max|want|) elementwise; prints the first mismatch (with `what`) and returns false.
template <typename T>
bool close(const char* what, const T* got, const std::vector<double>& want, double tol) {
  double scale = 1.0;
  for (double w : want) scale = std::max(scale, std::fabs(w));
  for (size_t i = 0; i < want.size(); ++i) {
    if (!(std::fabs(double(got[i]) - want[i]) <= tol * scale)) {
      std::printf("  %s mismatch at %zu: got %.9g want %.9g\n", what, i, double(got[i]), want[i]);
      return false;
    }
  }
  return true;
}

template <typename T>
bool close(const char* what, const std::vector<T>& got, const std::vector<double>& want, double tol) {
  return close(what, got.data(), want, tol);
}

}  // namespace pyvl_test
