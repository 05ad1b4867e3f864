// at::Tensor -> the raw-pointer message-passing kernel (csrc/cpu/message_passing.h).
// Argument checking lives in pyvl/ops/message_passing.py; these TORCH_CHECKs only guard memory safety.
#include <torch/library.h>

#include "bindings/common.h"
#include "cpu/message_passing.h"

namespace pyvl {
namespace {

// Rows of d elements with unit column stride (a row-sliced view is kept as it is), in the compute dtype.
at::Tensor unit_column_stride(const at::Tensor& t, at::ScalarType ct) {
  at::Tensor r = t.to(ct);
  return (r.stride(1) == 1 && r.stride(0) >= 0) ? r : r.contiguous();
}

at::Tensor gather_scatter_add_cpu(const at::Tensor& x, const at::Tensor& src, const at::Tensor& dst,
                                  const std::optional<at::Tensor>& edge_attr, int64_t num_out) {
  TORCH_CHECK(x.dim() == 2, "pyvl::gather_scatter_add: x must be [N, d]");
  TORCH_CHECK(src.dim() == 1 && dst.dim() == 1 && src.numel() == dst.numel() && src.scalar_type() == at::kLong &&
                  dst.scalar_type() == at::kLong, "pyvl::gather_scatter_add: src and dst must be int64 [E]");
  TORCH_CHECK(num_out >= 0, "pyvl::gather_scatter_add: num_out must be >= 0");
  const int64_t E = src.numel(), d = x.size(1);
  const auto ct = compute_dtype(x.scalar_type());
  at::Tensor xc = unit_column_stride(x, ct);
  at::Tensor ec;
  if (edge_attr.has_value()) {
    TORCH_CHECK(edge_attr->dim() == 2 && edge_attr->size(0) == E && edge_attr->size(1) == d,
                "pyvl::gather_scatter_add: edge_attr must be [E, d]");
    ec = unit_column_stride(*edge_attr, ct);
  }
  at::Tensor sc = src.contiguous(), dc = dst.contiguous();
  at::Tensor out = at::empty({num_out, d}, xc.options().memory_format(at::MemoryFormat::Contiguous));
  int64_t bad = -1;
  AT_DISPATCH_FLOATING_TYPES(ct, "pyvl::gather_scatter_add", [&] {
    bad = cpu::gather_scatter_add<scalar_t>(
        xc.const_data_ptr<scalar_t>(), xc.stride(0), x.size(0),
        ec.defined() ? ec.const_data_ptr<scalar_t>() : nullptr, ec.defined() ? ec.stride(0) : 0,
        sc.const_data_ptr<int64_t>(), dc.const_data_ptr<int64_t>(), E, num_out, d, out.mutable_data_ptr<scalar_t>());
  });
  TORCH_CHECK(bad < 0, "pyvl::gather_scatter_add: edge ", bad, " has an index out of range (", x.size(0),
              " source rows, ", num_out, " output rows)");
  return out.to(x.scalar_type());
}

}  // namespace

TORCH_LIBRARY_IMPL(pyvl, CPU, m) {
  m.impl("gather_scatter_add", &gather_scatter_add_cpu);
}

}  // namespace pyvl
