// The kdfused op library: schema, per-device implementations, and an empty
// Python module so that `import kdfused._C` loads this shared object (whose
// static initialisers run the registrations below).
#include <Python.h>
#include <torch/library.h>
#include <torch/version.h>

#include "distill_op.h"
#include "parallel_op.h"
#include "sparse_op.h"
#include "sparse_shard_op.h"

extern "C" {
PyMODINIT_FUNC PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}
}

TORCH_LIBRARY(kdfused, m) {
  m.def(kdfused::kDistillForwardSchema, {at::Tag::pt2_compliant_tag});
  m.def(kdfused::kDistillForwardOutSchema, {at::Tag::pt2_compliant_tag});
  m.def(kdfused::kDistillForwardInplaceSchema, {at::Tag::pt2_compliant_tag});
  m.def(kdfused::kSparseForwardSchema, {at::Tag::pt2_compliant_tag});
  m.def(kdfused::kSparseForwardOutSchema, {at::Tag::pt2_compliant_tag});
  m.def(kdfused::kSparseTopkSchema, {at::Tag::pt2_compliant_tag});
  m.def(kdfused::kDistillStatsSchema, {at::Tag::pt2_compliant_tag});
  m.def(kdfused::kDistillJsdSumsSchema, {at::Tag::pt2_compliant_tag});
  m.def(kdfused::kDistillGradSchema, {at::Tag::pt2_compliant_tag});
  m.def(kdfused::kDistillMergeSchema, {at::Tag::pt2_compliant_tag});
  m.def(kdfused::kDistillJsdFinishSchema, {at::Tag::pt2_compliant_tag});
  m.def(kdfused::kSparseShardStatsSchema, {at::Tag::pt2_compliant_tag});
  m.def(kdfused::kSparseShardMergeSchema, {at::Tag::pt2_compliant_tag});
  m.def(kdfused::kSparseShardGradSchema, {at::Tag::pt2_compliant_tag});
  // Which instruction set the CPU kernel uses in this process.
  m.def("cpu_capability() -> str", &kdfused::cpu_capability);
  m.def("build_config() -> str", &kdfused::build_config);
}

std::string kdfused::build_config() {
  std::string config = "torch=" TORCH_VERSION;
#ifdef KDFUSED_WITH_CUDA
  config += ";" + cuda_build_config();
#endif
  return config;
}

TORCH_LIBRARY_IMPL(kdfused, CPU, m) {
  m.impl("distill_forward", &kdfused::distill_forward_op<kdfused::distill_cpu>);
  m.impl("distill_forward_out", &kdfused::distill_forward_out_op<kdfused::distill_cpu>);
  m.impl("distill_forward_inplace", &kdfused::distill_forward_inplace_cpu);
  m.impl("sparse_distill_forward", &kdfused::sparse_forward_op<kdfused::sparse_cpu>);
  m.impl("sparse_distill_forward_out", &kdfused::sparse_forward_out_op<kdfused::sparse_cpu>);
  m.impl("sparse_topk", &kdfused::sparse_topk_cpu);
  m.impl("distill_stats", &kdfused::distill_stats_cpu);
  m.impl("distill_jsd_sums", &kdfused::distill_jsd_sums_cpu);
  m.impl("distill_grad", &kdfused::distill_grad_cpu);
  m.impl("distill_merge", &kdfused::distill_merge_cpu);
  m.impl("distill_jsd_finish", &kdfused::distill_jsd_finish_cpu);
  m.impl("sparse_shard_stats", &kdfused::sparse_shard_stats_cpu);
  m.impl("sparse_shard_merge", &kdfused::sparse_shard_merge_cpu);
  m.impl("sparse_shard_grad", &kdfused::sparse_shard_grad_cpu);
}

#ifdef KDFUSED_WITH_CUDA  // defined by setup.py when it compiles csrc/cuda/
TORCH_LIBRARY_IMPL(kdfused, CUDA, m) {
  m.impl("distill_forward", &kdfused::distill_forward_op<kdfused::distill_cuda>);
  m.impl("distill_forward_out", &kdfused::distill_forward_out_op<kdfused::distill_cuda>);
  m.impl("sparse_distill_forward", &kdfused::sparse_forward_op<kdfused::sparse_cuda>);
  m.impl("sparse_distill_forward_out", &kdfused::sparse_forward_out_op<kdfused::sparse_cuda>);
  m.impl("sparse_topk", &kdfused::sparse_topk_cuda);
  m.impl("distill_stats", &kdfused::distill_stats_cuda);
  m.impl("distill_jsd_sums", &kdfused::distill_jsd_sums_cuda);
  m.impl("distill_grad", &kdfused::distill_grad_cuda);
  m.impl("distill_merge", &kdfused::distill_merge_cuda);
  m.impl("distill_jsd_finish", &kdfused::distill_jsd_finish_cuda);
  m.impl("sparse_shard_stats", &kdfused::sparse_shard_stats_cuda);
  m.impl("sparse_shard_merge", &kdfused::sparse_shard_merge_cuda);
  m.impl("sparse_shard_grad", &kdfused::sparse_shard_grad_cuda);
}
#endif
