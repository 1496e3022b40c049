// What the CPU kernels (distill_cpu.cpp, sparse_cpu.cpp) share: the chunk
// and lane sizes, lane sums, 16-bit float conversions per instruction set, the
// label range check and the huge-page hint for a fresh gradient buffer.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <type_traits>

#if defined(__linux__)
#include <sys/mman.h>
#endif
#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "../distill_op.h"

namespace kdfused {
namespace cpu {

// Elements per chunk: the chunk's maxima are taken first, so the running sums
// are rescaled once per chunk instead of at every new maximum.
constexpr int64_t kChunk = 512;
// Each chunk is summed in kLanes interleaved partial sums (SIMD lanes: the
// loops over l below are what the compiler vectorises; 16 lanes, two AVX2
// registers, ran 2x slower here), combined as a tree, then added to the row
// total: float32 sums over V = 128k terms stay as accurate as PyTorch's own
// (cascade) summation.
constexpr int kLanes = 8;

// The hot loops are instantiated per instruction set (see row_range), so they
// must be inlined into their caller, whose target they then take.
#define KDFUSED_INLINE inline __attribute__((always_inline))
// The chunk's arrays never overlap one another (nor the row's constants):
// without that promise GCC re-checks aliasing and reloads every constant for
// each 8-element step.
#define KD_R __restrict__

KDFUSED_INLINE float lane_sum(const float* x) {
  float a[kLanes];
  for (int l = 0; l < kLanes; ++l) a[l] = x[l];
  for (int width = kLanes / 2; width > 0; width /= 2) {
    for (int l = 0; l < width; ++l) a[l] += a[l + width];
  }
  return a[0];
}

// A logit as the chunk kernels read it: a float as it is, bfloat16 bits
// widened in the loop that reads them (the bits are the float's upper half).
KDFUSED_INLINE float widen(float x) { return x; }
KDFUSED_INLINE float widen(uint16_t bits) {
  return host::from_bits(static_cast<int32_t>(uint32_t{bits} << 16));
}

// float -> bfloat16 bits, rounded to nearest even with NaN kept a quiet NaN:
// c10::BFloat16's conversion, bit for bit, but in a loop the compiler
// vectorises (c10's branches kept the gradient's store scalar).
KDFUSED_INLINE void store_bf16(uint16_t* out, const float* x, int64_t len) {
  for (int64_t k = 0; k < len; ++k) {
    const uint32_t bits = static_cast<uint32_t>(host::to_bits(x[k]));
    const uint32_t rounded = (bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16;
    out[k] = x[k] != x[k] ? uint16_t{0x7fc0} : static_cast<uint16_t>(rounded);
  }
}

// bfloat16 bits -> float (widen) for a chunk. In the table, so that it
// vectorises with the instruction set of the loops that read the result.
KDFUSED_INLINE void load_bf16(float* KD_R out, const uint16_t* KD_R x, int64_t len) {
  for (int64_t k = 0; k < len; ++k) out[k] = widen(x[k]);
}

// 16-bit floats (bfloat16 or float16, as their bits) <-> float.
using Load16Fn = void (*)(float*, const uint16_t*, int64_t);
using Store16Fn = void (*)(uint16_t*, const float*, int64_t);
using SumFn = float (*)(const float*, int64_t, float);  // sum_below_chunk
static_assert(sizeof(c10::BFloat16) == sizeof(uint16_t) && sizeof(c10::Half) == sizeof(uint16_t),
              "16-bit floats are their 16 bits");

// float16 bits <-> float. The portable pair is c10's (scalar); the AVX2 table's
// uses F16C (8 per instruction, the same values: both round to nearest even,
// and NaN stays NaN). float16 logits had taken 1.45x bfloat16's time.

inline void baseline_load_f16(float* out, const uint16_t* x, int64_t len) {
  for (int64_t k = 0; k < len; ++k) out[k] = c10::detail::fp16_ieee_to_fp32_value(x[k]);
}

inline void baseline_store_f16(uint16_t* out, const float* x, int64_t len) {
  for (int64_t k = 0; k < len; ++k) out[k] = c10::detail::fp16_ieee_from_fp32_value(x[k]);
}

// The bfloat16 pair of one instruction set's table (NAME: baseline or avx2),
// load_bf16 and store_bf16 compiled for its target.
#define KDFUSED_BF16_CONVERSIONS(NAME, ...)                                               \
  __VA_ARGS__ inline void NAME##_load_bf16(float* out, const uint16_t* x, int64_t len) {  \
    load_bf16(out, x, len);                                                               \
  }                                                                                       \
  __VA_ARGS__ inline void NAME##_store_bf16(uint16_t* out, const float* x, int64_t len) { \
    store_bf16(out, x, len);                                                              \
  }

KDFUSED_BF16_CONVERSIONS(baseline)

#if defined(__x86_64__)
#define KDFUSED_AVX2 __attribute__((target("avx2,fma,f16c")))

KDFUSED_BF16_CONVERSIONS(avx2, KDFUSED_AVX2)

KDFUSED_AVX2 inline void avx2_load_f16(float* out, const uint16_t* x, int64_t len) {
  int64_t k = 0;
  for (; k + 8 <= len; k += 8) {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(x + k));
    _mm256_storeu_ps(out + k, _mm256_cvtph_ps(h));
  }
  baseline_load_f16(out + k, x + k, len - k);
}

KDFUSED_AVX2 inline void avx2_store_f16(uint16_t* out, const float* x, int64_t len) {
  int64_t k = 0;
  for (; k + 8 <= len; k += 8) {
    const __m128i h = _mm256_cvtps_ph(_mm256_loadu_ps(x + k), _MM_FROUND_TO_NEAREST_INT);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + k), h);
  }
  baseline_store_f16(out + k, x + k, len - k);
}
#endif

// A chunk as float: float logits are used in place, others converted into buf.
template <typename T, typename Kernels>
const float* as_float(const T* x, int64_t len, float* buf, const Kernels& kernels) {
  if constexpr (std::is_same_v<T, float>) {
    return x;
  } else if constexpr (std::is_same_v<T, c10::BFloat16>) {
    kernels.load_bf16(buf, reinterpret_cast<const uint16_t*>(x), len);
    return buf;
  } else {
    static_assert(std::is_same_v<T, c10::Half>, "float, bfloat16 or float16 logits");
    kernels.load_f16(buf, reinterpret_cast<const uint16_t*>(x), len);
    return buf;
  }
}

inline void check_label_range(const int64_t* y, int64_t n, int64_t v, int64_t ignore_index) {
  for (int64_t i = 0; i < n; ++i) {
    TORCH_CHECK_VALUE(y[i] == ignore_index || (y[i] >= 0 && y[i] < v), "kdfused: labels[", text(i),
                      "] = ", text(y[i]), " is outside [0, V) with V = ", text(v),
                      " and is not ignore_index = ", text(ignore_index));
  }
}

// The gradient is a fresh N x V buffer, so writing it first costs one page
// fault per 4 KiB page: about 0.2 s for 500 MB here, as much as the whole
// gradient pass's arithmetic. Transparent huge pages make that 512x fewer
// faults. Like torch's THP_MEM_ALLOC_ENABLE, but for this one buffer; a hint
// only, and ignored where the kernel does not offer it.
inline void advise_huge_pages(void* ptr, size_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t{2} << 20;
  const uintptr_t begin = (reinterpret_cast<uintptr_t>(ptr) + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t end = (reinterpret_cast<uintptr_t>(ptr) + bytes) & ~(kHuge - 1);
  if (end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
#endif
}

// Label smoothing's row sum over a chunk: sum (s - ms) (smooth_term), in lanes.
// For a finite ms, s - ms is smooth_term without its select (-inf - ms is
// -inf); a row whose max is -inf sums to -inf without a loop.
KDFUSED_INLINE float sum_below_chunk(const float* KD_R s, int64_t len, float ms) {
  if (ms == neg_inf()) return len > 0 ? neg_inf() : 0.f;
  float acc[kLanes] = {};
  int64_t k = 0;
  for (; k + kLanes <= len; k += kLanes) {
    for (int l = 0; l < kLanes; ++l) acc[l] += s[k + l] - ms;
  }
  for (int l = 0; k + l < len; ++l) acc[l] += s[k + l] - ms;
  return lane_sum(acc);
}

// Which gradient variant a problem needs: 2 * hard + soft, or the hard and
// soft terms with q from p_s (T = 1, T = 2); label smoothing (with a hard
// term) adds kSmoothed to the hard variants 2 to 5.
constexpr int kHardSoftT1 = 4, kHardSoftT2 = 5, kSmoothed = 4, kGradVariants = 10;

inline int grad_variant(const LossParams& p) {
  return with_grad_variant(p, [](auto variant) {
    using V = decltype(variant);
    const int smoothed = V::kSmoothed ? kSmoothed : 0;
    if (V::kHardQ == HardQ::kPs) return kHardSoftT1 + smoothed;
    if (V::kHardQ == HardQ::kPsSquared) return kHardSoftT2 + smoothed;
    return 2 * V::kHasHard + V::kHasSoft + smoothed;
  });
}

// A table of FN's instantiations indexed by grad_variant(): FN<LEAD kHard,
// kSoft, kQ, kSmooth> for the variants 0 to kGradVariants - 1, where LEAD is
// the template arguments before those (none, or e.g. "D," for a divergence).
#define KDFUSED_GRAD_VARIANTS(FN, ...)                   \
  {FN<__VA_ARGS__ false, false, HardQ::kExp, false>,     \
   FN<__VA_ARGS__ false, true, HardQ::kExp, false>,      \
   FN<__VA_ARGS__ true, false, HardQ::kExp, false>,      \
   FN<__VA_ARGS__ true, true, HardQ::kExp, false>,       \
   FN<__VA_ARGS__ true, true, HardQ::kPs, false>,        \
   FN<__VA_ARGS__ true, true, HardQ::kPsSquared, false>, \
   FN<__VA_ARGS__ true, false, HardQ::kExp, true>,       \
   FN<__VA_ARGS__ true, true, HardQ::kExp, true>,        \
   FN<__VA_ARGS__ true, true, HardQ::kPs, true>,         \
   FN<__VA_ARGS__ true, true, HardQ::kPsSquared, true>}

// Whether a variant's hard term takes softmax(s) from the logits (2 * hard +
// soft with hard set), rather than from p_s as kHardSoftT1 and T2 do.
inline bool hard_from_logits(int variant) {
  const int base = variant >= 2 + kSmoothed ? variant - kSmoothed : variant;
  return base == 2 || base == 3;
}

}  // namespace cpu
}  // namespace kdfused
