"""torch.compile(fullgraph=True) over every single-process cell of the grid
(student logits or hidden states + weight, against dense logits, teacher
hidden states + weight, or a SparseTeacher), with every option away from its
default in some bundle, with automatic and with dynamic=True shapes: no graph
break, and the eager loss and gradients. The bundles run with the aot_eager
backend (dynamo's trace, the fakes, AOT autograd: what a graph break or a
fake that drifts from its op would break); one case per cell also runs the
default inductor backend, as users run it."""

import pytest
import torch

import kdfused
from kdfused import SparseTeacher, ops

pytestmark = pytest.mark.skipif(not ops.has_kernel("cpu"), reason="needs kdfused's CPU kernel")

V, HS, HT = 61, 12, 10

# Bundles: together every option of the logits loss away from its default.
LOGITS_BUNDLES = {
    "jsd-sum-truncate": dict(
        temperature=1.5,
        alpha=0.3,
        divergence="jsd",
        beta=0.3,
        reduction="sum",
        ignore_index=-1,
        scale_by_t2=False,
        label_smoothing=0.1,
        teacher_vocab="truncate",
    ),
    "reverse-none": dict(temperature=3.0, divergence="reverse_kl", reduction="none", alpha=1.0),
    "num-items-int": dict(num_items_in_batch=23, label_smoothing=0.2, alpha=0.0),
    "num-items-tensor": dict(num_items_in_batch="tensor", divergence="jsd", beta=0.7),
}
SPARSE_BUNDLES = {
    "ghost-jsd-none": dict(tail="ghost", divergence="jsd", beta=0.2, reduction="none", alpha=0.2),
    "renormalize-sum": dict(tail="renormalize", reduction="sum", label_smoothing=0.1),
    "ghost-reverse-num-items": dict(
        tail="ghost", divergence="reverse_kl", num_items_in_batch="tensor", temperature=1.0
    ),
}
# The fused-linear loss's own options, on top of a logits bundle.
LINEAR_OPTIONS = dict(
    chunk_size=5,
    student_softcap=4.0,
    teacher_softcap=6.0,
    student_logit_scale=0.7,
    teacher_logit_scale=1.3,
)


def _inputs(n, seed=0, ignore_index=-100):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, V, (n,), generator=g)
    y[::4] = ignore_index
    return g, y


def _teacher(kind, n, g, *, wide=False, tail="ghost"):
    if kind == "logits":
        return {"teacher_logits": 3 * torch.randn(n, V + (3 if wide else 0), generator=g)}
    if kind == "hidden":
        return {
            "teacher_hidden": torch.randn(n, HT, generator=g),
            "teacher_weight": torch.randn(V + (3 if wide else 0), HT, generator=g),
            "teacher_bias": torch.randn(V + (3 if wide else 0), generator=g),
        }
    logits = 3 * torch.randn(n, V, generator=g)
    top = kdfused.sparse.topk(logits, 7, temperature=1.5)
    return {"teacher": SparseTeacher(top.indices, top.logprobs, tail, top.store_temperature)}


def _options(bundle, n):
    opts = dict(bundle)
    opts.pop("tail", None)
    if opts.get("num_items_in_batch") == "tensor":
        opts["num_items_in_batch"] = torch.tensor(n + 3)
    return opts


def _run(fn, leaves):
    for x in leaves:
        x.grad = None
    loss = fn()
    (loss.sum() if loss.dim() else loss).backward()
    return [loss.detach()] + [x.grad.clone() for x in leaves]


def _check(make_call, leaves_of, dynamic, backend="aot_eager", sizes=(9, 13)):
    """Eager and compiled, on inputs of two sizes (dynamic shapes: one graph
    may serve both)."""
    torch._dynamo.reset()
    compiled = torch.compile(lambda c: c(), fullgraph=True, dynamic=dynamic, backend=backend)
    for n in sizes:
        call, leaves = make_call(n)
        eager = _run(call, leaves)
        got = _run(lambda c=call: compiled(c), leaves)
        for a, b in zip(got, eager, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def _logits_call(teacher_kind, bundle):
    def make(n):
        ignore = bundle.get("ignore_index", -100)
        g, y = _inputs(n, ignore_index=ignore)
        s = (3 * torch.randn(n, V, generator=g)).requires_grad_()
        wide = bundle.get("teacher_vocab") == "truncate"
        t = _teacher(teacher_kind, n, g, wide=wide, tail=bundle.get("tail", "ghost"))
        teacher = t.get("teacher", t.get("teacher_logits"))
        opts = _options(bundle, n)
        labels = y
        return (lambda: kdfused.fused_distill_loss(s, teacher, labels, **opts)), [s]

    return make


def _linear_call(teacher_kind, bundle):
    def make(n):
        ignore = bundle.get("ignore_index", -100)
        g, y = _inputs(n, seed=1, ignore_index=ignore)
        h = torch.randn(n, HS, generator=g).requires_grad_()
        w = torch.randn(V, HS, generator=g).requires_grad_()
        b = torch.randn(V, generator=g).requires_grad_()
        wide = bundle.get("teacher_vocab") == "truncate" and teacher_kind != "sparse"
        t = _teacher(teacher_kind, n, g, wide=wide, tail=bundle.get("tail", "ghost"))
        opts = dict(_options(bundle, n), **LINEAR_OPTIONS)
        if teacher_kind == "sparse":
            opts.pop("teacher_vocab", None)

        def call():
            return kdfused.fused_linear_distill_loss(h, w, y, student_bias=b, **t, **opts)

        return call, [h, w, b]

    return make


@pytest.mark.parametrize("dynamic", [None, True], ids=["automatic", "dynamic"])
@pytest.mark.parametrize("bundle", sorted(LOGITS_BUNDLES))
def test_logits_dense(bundle, dynamic):
    _check(_logits_call("logits", LOGITS_BUNDLES[bundle]), None, dynamic)


@pytest.mark.parametrize("dynamic", [None, True], ids=["automatic", "dynamic"])
@pytest.mark.parametrize("bundle", sorted(SPARSE_BUNDLES))
def test_logits_sparse(bundle, dynamic):
    _check(_logits_call("sparse", SPARSE_BUNDLES[bundle]), None, dynamic)


# One bundle per kind of teacher (the logits cells above cover every bundle
# of the shared options; the chunk loop adds LINEAR_OPTIONS, in every case).
LINEAR_CASES = {
    "hidden": LOGITS_BUNDLES["jsd-sum-truncate"],
    "logits": LOGITS_BUNDLES["num-items-tensor"],
    "sparse": SPARSE_BUNDLES["renormalize-sum"],
}


@pytest.mark.parametrize("dynamic", [None, True], ids=["automatic", "dynamic"])
@pytest.mark.parametrize("teacher_kind", sorted(LINEAR_CASES))
def test_linear(teacher_kind, dynamic):
    _check(_linear_call(teacher_kind, LINEAR_CASES[teacher_kind]), None, dynamic)


@pytest.mark.parametrize(
    "cell",
    ["logits-dense", "logits-sparse", "linear-hidden"],
)
def test_inductor(cell):
    """The default backend, as users run it, once per kind of call."""
    if cell == "logits-dense":
        make = _logits_call("logits", LOGITS_BUNDLES["jsd-sum-truncate"])
    elif cell == "logits-sparse":
        make = _logits_call("sparse", SPARSE_BUNDLES["ghost-jsd-none"])
    else:
        make = _linear_call("hidden", LOGITS_BUNDLES["reverse-none"])
    _check(make, None, None, backend="inductor", sizes=(9,))


def _with_entropy(make):
    """A call's loss and its student entropy in one tensor (so that _check
    compares both): the ops' trailing result and its fakes, traced."""

    def make_entropy(n):
        call, leaves = make(n)

        def both():
            out = call()
            return torch.cat([out.loss.reshape(-1), out.student_entropy.reshape(-1)])

        return both, leaves

    return make_entropy


@pytest.mark.parametrize("dynamic", [None, True], ids=["automatic", "dynamic"])
@pytest.mark.parametrize("kind", ["logits", "linear-hidden", "linear-logits"])
def test_student_entropy(kind, dynamic):
    bundle = dict(LOGITS_BUNDLES["jsd-sum-truncate"], student_entropy=True)
    if kind == "logits":
        make = _logits_call("logits", bundle)
    else:
        make = _linear_call(kind.split("-")[1], bundle)
    _check(_with_entropy(make), None, dynamic)
