// at::Tensor -> the raw-pointer BFS kernel for shortest paths. Argument checking lives in
// pyvl/ops/shortest_paths.py; these TORCH_CHECKs only guard memory safety.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "cpu/shortest_paths.h"

namespace pyvl {
namespace {

std::tuple<at::Tensor, at::Tensor> shortest_paths_cpu(const at::Tensor& adj) {
  TORCH_CHECK(adj.dim() == 3 && adj.size(1) == adj.size(2) && adj.scalar_type() == at::kBool,
              "pyvl::shortest_paths: adj must be a bool [B, N, N] tensor");
  const int64_t B = adj.size(0), N = adj.size(1);
  at::Tensor a = adj.contiguous();
  at::Tensor dist = at::empty({B, N, N}, adj.options().dtype(at::kLong));
  at::Tensor path = at::empty({B, N, N}, adj.options().dtype(at::kLong));
  cpu::shortest_paths(a.const_data_ptr<bool>(), B, N, dist.mutable_data_ptr<int64_t>(),
                      path.mutable_data_ptr<int64_t>());
  return {dist, path};
}

}  // namespace

TORCH_LIBRARY_IMPL(pyvl, CPU, m) { m.impl("shortest_paths", &shortest_paths_cpu); }

}  // namespace pyvl
