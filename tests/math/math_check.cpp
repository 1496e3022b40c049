// Test-only ops (tests/test_math.py): kdfused_math.h's CPU exp and log applied
// elementwise to a float32 tensor, compiled for both of the CPU kernel's
// instruction sets (baseline x86-64, and AVX2 + FMA, where a * b + c may be
// contracted), so that their accuracy is checked directly, not only through a
// loss whose tolerance can hide a few ulp.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <string>

#include "kdfused_math.h"

namespace {

using Loop = void (*)(float*, const float*, int64_t);

#define KDFUSED_MATH_LOOPS(NAME, ...)                                         \
  __VA_ARGS__ void NAME##_exp(float* out, const float* x, int64_t n) {        \
    for (int64_t k = 0; k < n; ++k) out[k] = kdfused::kd_exp(x[k]);           \
  }                                                                           \
  __VA_ARGS__ void NAME##_exp_nonpos(float* out, const float* x, int64_t n) { \
    for (int64_t k = 0; k < n; ++k) out[k] = kdfused::kd_exp_nonpos(x[k]);    \
  }                                                                           \
  __VA_ARGS__ void NAME##_log_prob(float* out, const float* x, int64_t n) {   \
    for (int64_t k = 0; k < n; ++k) out[k] = kdfused::kd_log_prob(x[k]);      \
  }

KDFUSED_MATH_LOOPS(baseline)
#if defined(__x86_64__)
KDFUSED_MATH_LOOPS(avx2, __attribute__((target("avx2,fma"))))
#endif

Loop pick(const std::string& fn, bool avx2) {
#if defined(__x86_64__)
  if (avx2) {
    if (fn == "exp") return avx2_exp;
    if (fn == "exp_nonpos") return avx2_exp_nonpos;
    if (fn == "log_prob") return avx2_log_prob;
  }
#else
  TORCH_CHECK(!avx2, "no AVX2 build on this architecture");
#endif
  if (fn == "exp") return baseline_exp;
  if (fn == "exp_nonpos") return baseline_exp_nonpos;
  if (fn == "log_prob") return baseline_log_prob;
  TORCH_CHECK(false, "unknown function ", fn);
}

at::Tensor apply(const std::string& fn, const at::Tensor& x, bool avx2) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.device().is_cpu(), "float32 CPU tensors only");
  const at::Tensor in = x.contiguous();
  at::Tensor out = at::empty_like(in);
  pick(fn, avx2)(out.data_ptr<float>(), in.const_data_ptr<float>(), in.numel());
  return out;
}

}  // namespace

TORCH_LIBRARY(kdfused_math_check, m) { m.def("apply(str fn, Tensor x, bool avx2) -> Tensor"); }

TORCH_LIBRARY_IMPL(kdfused_math_check, CPU, m) { m.impl("apply", apply); }
