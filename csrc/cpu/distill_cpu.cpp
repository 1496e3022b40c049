// The C++ CPU kernel: one task per block of rows (at::parallel_for), and per
// row an online softmax over the logits streamed in chunks (pass 1: maxima,
// normalisers and the KL sums), a second pass for JSD's mixture sums, and the
// gradient pass. All accumulation is float32; the math is kdfused_math.h.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>

#include "../distill_op.h"

namespace kdfused {
namespace {

// Elements per chunk of pass 1: the chunk's max is taken first, so the running
// sums are rescaled once per chunk instead of at every new maximum.
constexpr int64_t kChunk = 512;
// Each chunk is summed in kLanes interleaved partial sums, combined as a tree,
// then added to the row total: float32 sums over V = 128k terms then stay as
// accurate as PyTorch's own (cascade) summation, and the loop is SIMD-shaped.
constexpr int kLanes = 8;

// Pairwise tree over the lanes with the given merge.
template <typename Acc, typename Merge>
Acc tree_sum(Acc* lanes, Merge merge) {
  for (int width = kLanes / 2; width > 0; width /= 2) {
    for (int l = 0; l < width; ++l) lanes[l] = merge(lanes[l], lanes[l + width]);
  }
  return lanes[0];
}

void check_label_range(const int64_t* y, int64_t n, int64_t v, int64_t ignore_index) {
  for (int64_t i = 0; i < n; ++i) {
    TORCH_CHECK_VALUE(y[i] == ignore_index || (y[i] >= 0 && y[i] < v), "kdfused: labels[", text(i),
                      "] = ", text(y[i]), " is outside [0, V) with V = ", text(v),
                      " and is not ignore_index = ", text(ignore_index));
  }
}

template <typename student_t, typename teacher_t>
void distill_rows(const DistillProblem& prob, float grad_scale, float* hard, float* soft,
                  student_t* grad) {
  const LossParams p = prob.params;
  const int64_t v = prob.v;
  const student_t* s_base = prob.student.const_data_ptr<student_t>();
  const teacher_t* t_base = prob.teacher.const_data_ptr<teacher_t>();
  const int64_t s_stride = prob.student.stride(0);
  const int64_t t_stride = prob.teacher.stride(0);
  const int64_t* y = prob.labels ? prob.labels->const_data_ptr<int64_t>() : nullptr;
  // Enough rows per task to amortise the scheduling for small V.
  const int64_t grain = std::max<int64_t>(1, 16384 / v);

  const auto merge_stats = [&p](RowStats a, RowStats b) { return stats_merge(a, b, p.inv_t); };

  at::parallel_for(0, prob.n, grain, [&](int64_t begin, int64_t end) {
    float sbuf[kChunk];
    float tbuf[kChunk];
    for (int64_t i = begin; i < end; ++i) {
      const int64_t label = y ? y[i] : -1;
      student_t* g = grad ? grad + i * v : nullptr;
      if (y && label == p.ignore_index) {
        hard[i] = 0.f;
        soft[i] = 0.f;
        if (g) std::fill(g, g + v, student_t(0));
        continue;
      }
      const student_t* s = s_base + i * s_stride;
      const teacher_t* t = t_base + i * t_stride;

      RowStats st = stats_empty();
      for (int64_t j0 = 0; j0 < v; j0 += kChunk) {
        const int64_t len = std::min(kChunk, v - j0);
        for (int64_t k = 0; k < len; ++k) {
          sbuf[k] = static_cast<float>(s[j0 + k]);
          tbuf[k] = static_cast<float>(t[j0 + k]);
        }
        stats_raise(st, sbuf, tbuf, len, p.inv_t);
        RowStats lanes[kLanes];
        for (int l = 0; l < kLanes; ++l) lanes[l] = stats_anchored(st);
        for (int64_t k = 0; k < len; ++k) {
          stats_accumulate(lanes[k % kLanes], sbuf[k], tbuf[k], p.inv_t, p.has_labels);
        }
        st = merge_stats(st, tree_sum(lanes, merge_stats));
      }
      RowConsts c = row_consts(st, p);
      if (p.div == Divergence::kJSD) {
        JsdSums acc{0.f, 0.f};
        for (int64_t j0 = 0; j0 < v; j0 += kChunk) {
          const int64_t len = std::min(kChunk, v - j0);
          JsdSums lanes[kLanes] = {};
          for (int64_t k = 0; k < len; ++k) {
            jsd_accumulate(lanes[k % kLanes], static_cast<float>(s[j0 + k]),
                           static_cast<float>(t[j0 + k]), c, p);
          }
          acc = jsd_merge(acc, tree_sum(lanes, jsd_merge));
        }
        jsd_finish(c, acc, p);
      }
      hard[i] = y ? hard_loss(static_cast<float>(s[label]), c) : 0.f;
      soft[i] = p.soft_scale * c.div;
      if (g) {
        for (int64_t j = 0; j < v; ++j) {
          const float gj =
              grad_element(static_cast<float>(s[j]), static_cast<float>(t[j]), j == label, c, p);
          g[j] = static_cast<student_t>(grad_scale * gj);
        }
      }
    }
  });
}

}  // namespace

DistillResult distill_forward_cpu(const at::Tensor& student, const at::Tensor& teacher,
                                  const std::optional<at::Tensor>& labels,
                                  const std::optional<at::Tensor>& grad_scale, double temperature,
                                  double alpha, c10::string_view divergence, double beta,
                                  int64_t ignore_index, bool scale_by_t2, bool compute_grad) {
  const DistillProblem prob = prepare_problem(student, teacher, labels, grad_scale, temperature,
                                              alpha, divergence, beta, ignore_index, scale_by_t2);
  TORCH_CHECK_VALUE(student.device().is_cpu(), "kdfused: distill_forward_cpu got ",
                    student.device().str(), " tensors");
  if (prob.labels) {
    check_label_range(prob.labels->const_data_ptr<int64_t>(), prob.n, prob.v, ignore_index);
  }
  auto [hard, soft, grad] = allocate_outputs(prob, compute_grad);
  const float scale = grad_scale ? grad_scale->item<float>() : 1.f;

  KDFUSED_DISPATCH_LOGITS(prob.student.scalar_type(), "kdfused_distill_cpu", [&] {
    using student_t = scalar_t;
    KDFUSED_DISPATCH_LOGITS(prob.teacher.scalar_type(), "kdfused_distill_cpu", [&] {
      using teacher_t = scalar_t;
      distill_rows<student_t, teacher_t>(prob, scale, hard.data_ptr<float>(),
                                         soft.data_ptr<float>(),
                                         compute_grad ? grad.data_ptr<student_t>() : nullptr);
    });
  });
  return {hard, soft, grad};
}

}  // namespace kdfused
