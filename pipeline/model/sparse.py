"""Predefined-sparse linear layers stored as ELL tables.

A junction N_in -> N_out with fan-out d_out (every input feeds exactly d_out outputs) and
fan-in d_in (every output reads exactly d_in inputs) has |W| = N_in*d_out = N_out*d_in real
edges. Fixed fan-in means the weights fit a dense [N_out, d_in] value table plus an
[N_out, d_in] index table (ELLPACK), so storage, multiply-adds and gradients scale with |W|,
never with N_in*N_out. Fixed fan-out means the transposed pattern is also fixed-width, which
is what makes the backward pass to the input as cheap as the forward.

Kernels: the native ELL kernel (ell_kernel.c, built on first use; see ell_native.py) for
float32 on CPU; `csr` (CSR `torch.sparse.mm`) and `bag` (`embedding_bag`, one fused
gather-multiply-sum); a dense matrix expanded from the ELL table (cached at inference) for
small junctions; an index_select `gather` for small batches. Which one runs a shape is
measured, not ruled: the first call of a shape, batch size (rounded up to a power of two),
dtype, thread count and mode (inference, training step, training step with grad-input)
times every kernel that can run it and keeps the fastest (kernel_choice.py, remembered on
disk per machine). SPLITEXIT_NATIVE=1 forces the native kernel wherever it can run,
SPLITEXIT_NATIVE=0 keeps it out; `SparseLinear.force` pins one kernel (tests, benchmarks).
Backward of the PyTorch ELL kernels: grad-input through the transposed pattern, grad-values
with `torch.sparse.sampled_addmm`, which computes grad_y^T @ x only at real edges.
"""

from __future__ import annotations

import copy
import math
import os
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.model import ell_native, kernel_choice

__all__ = ["SparsityError", "fan_in_for", "nearby_fan_outs", "draw_connectivity", "SparseLinear",
           "make_junction"]

KERNELS = ("native", "csr", "bag", "dense", "gather")
# Candidates worth timing, bounded so that first use stays cheap and small in memory:
# - the dense matrix of a junction up to this many weights (256 KB in float32);
DENSE_MAX_ELEMENTS = 65536
# - the gather, which materializes (B, N_out, d_in), up to this many elements (16 MB);
GATHER_MAX_ELEMENTS = 1 << 22
# - timed at the batch rounded up to a power of two, and at most this batch.
TIMED_MAX_BATCH = 1024
# Without a choice to measure against (a GPU tensor), the PyTorch kernels by batch size.
EMBEDDING_BAG_MIN_BATCH = 32

warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")


class SparsityError(ValueError):
    """A junction's degrees are impossible; the message names nearby valid choices."""


def nearby_fan_outs(n_in: int, n_out: int, fan_out: int) -> list[int]:
    """The valid fan-outs closest to an impossible one: two below it, two above."""
    valid = [f for f in range(1, n_out + 1) if (n_in * f) % n_out == 0]
    return [f for f in valid if f < fan_out][-2:] + [f for f in valid if f > fan_out][:2]


def fan_in_for(n_in: int, n_out: int, fan_out: int, input_layer: bool = True) -> int:
    """Return the exact fan-in d_in = N_in*d_out/N_out, or raise SparsityError saying why not.

    The fix offered for an indivisible pair is zero-padding when N_in is the network input,
    and a wider previous layer otherwise.
    """
    if n_in < 1 or n_out < 1:
        raise SparsityError(f"junction {n_in}->{n_out}: layer widths must be positive")
    if not 1 <= fan_out <= n_out:
        raise SparsityError(
            f"junction {n_in}->{n_out}: fan-out {fan_out} must be between 1 and {n_out} "
            f"(each input feeds distinct outputs; {n_out} means dense)"
        )
    if (n_in * fan_out) % n_out == 0:
        return n_in * fan_out // n_out
    pad = next(p for p in range(n_in + 1, n_in + n_out + 1) if (p * fan_out) % n_out == 0)
    widen = (f"pad the input to {pad} (input_pad = {pad})" if input_layer
             else f"make the layer before it {pad} wide")
    raise SparsityError(
        f"junction {n_in}->{n_out} cannot have fan-out {fan_out}: {n_in}*{fan_out} is not "
        f"divisible by {n_out}; valid fan-outs nearby are "
        f"{', '.join(map(str, nearby_fan_outs(n_in, n_out, fan_out)))}"
        f", or {widen} to keep fan-out {fan_out}"
    )


def draw_connectivity(n_in: int, n_out: int, fan_out: int, seed: int) -> np.ndarray:
    """Draw a random pattern with exact degrees; returns indices [n_out, d_in], rows sorted.

    Start from a pattern that is valid by construction -- a random permutation of the inputs
    tiled d_out times and cut into n_out windows of d_in; a window no longer than n_in over a
    periodic sequence never repeats an input -- then mix it with degree-preserving edge swaps
    (a Markov chain whose states are exactly the valid patterns). Pure function of the seed.
    """
    d_in = fan_in_for(n_in, n_out, fan_out)
    rng = np.random.default_rng(seed)
    rows = np.tile(rng.permutation(n_in), fan_out).reshape(n_out, d_in)
    rows = rows[rng.permutation(n_out)]
    if 1 < d_in < n_in and n_out > 1:
        _mix(rows, rng, n_swaps=2 * n_out * d_in)
    rows.sort(axis=1)
    return rows


def _mix(rows: np.ndarray, rng: np.random.Generator, n_swaps: int) -> None:
    """Swap endpoints of random edge pairs in place when the swap keeps rows duplicate-free."""
    n_out, d_in = rows.shape
    members = [set(r.tolist()) for r in rows]
    table = rows.tolist()
    a_rows = rng.integers(0, n_out, n_swaps).tolist()
    b_rows = rng.integers(0, n_out, n_swaps).tolist()
    a_cols = rng.integers(0, d_in, n_swaps).tolist()
    b_cols = rng.integers(0, d_in, n_swaps).tolist()
    for a, b, p, q in zip(a_rows, b_rows, a_cols, b_cols):
        i, j = table[a][p], table[b][q]
        if a == b or i == j or j in members[a] or i in members[b]:
            continue
        table[a][p], table[b][q] = j, i
        members[a].remove(i)
        members[a].add(j)
        members[b].remove(j)
        members[b].add(i)
    rows[:] = np.asarray(table, dtype=rows.dtype)


class _Plan:
    """Index tensors derived from the ELL table, built once per pattern (not stored on disk)."""

    def __init__(self, indices: torch.Tensor, n_in: int):
        n_out, d_in = indices.shape
        edges = n_out * d_in
        fan_out = edges // n_in
        self.col = indices.reshape(-1).long()  # input of each edge, row-major ELL order
        self.bags = self.col.view(n_out, d_in)
        self.crow = torch.arange(0, edges + 1, d_in, dtype=torch.long)
        # Transposed pattern: edges sorted by input; exactly fan_out per input.
        self.order = torch.argsort(self.col, stable=True)
        row_of_edge = torch.arange(n_out).repeat_interleave(d_in)
        self.t_col = row_of_edge[self.order]
        self.t_bags = self.t_col.view(n_in, fan_out)
        self.t_crow = torch.arange(0, edges + 1, fan_out, dtype=torch.long)
        self.shape = (n_out, n_in)
        self.fan_out = fan_out
        # The native kernel's tables: int32, row-major, forward and transposed.
        self.idx32 = indices.to(torch.int32).contiguous()
        self.t_idx32 = self.t_bags.to(torch.int32).contiguous()

    def matmul(self, values: torch.Tensor, x: torch.Tensor, kernel: str) -> torch.Tensor:
        """y[b, o] = sum_k values[o, k] * x[b, col[o, k]]  (B, N_out)."""
        return _ell_mm(self.crow, self.col, self.bags, values.reshape(-1), x, self.shape, kernel)

    def matmul_t(self, values: torch.Tensor, g: torch.Tensor, kernel: str) -> torch.Tensor:
        """gx[b, i] = sum over edges (o, i) of values[o, k] * g[b, o]  (B, N_in)."""
        t_values = values.reshape(-1)[self.order]
        shape = (self.shape[1], self.shape[0])
        return _ell_mm(self.t_crow, self.t_col, self.t_bags, t_values, g, shape, kernel)

    def grad_values(self, g: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """gv[o, k] = sum_b g[b, o] * x[b, col[o, k]], computed only at real edges."""
        n_out, d_in = self.bags.shape
        if g.shape[0] == 1:
            return (g[0].unsqueeze(1) * x[0][self.bags]).contiguous()
        pattern = torch.sparse_csr_tensor(
            self.crow, self.col, torch.zeros(self.col.numel(), dtype=g.dtype), self.shape,
            check_invariants=False)
        sampled = torch.sparse.sampled_addmm(pattern, g.t().contiguous(), x.contiguous(), beta=0.0)
        return sampled.values().view(n_out, d_in)


def _ell_mm(crow, col, bags, flat_values, x, shape, kernel: str) -> torch.Tensor:
    n_rows, n_cols = shape
    if kernel == "bag":
        # Bags are output rows: gather x columns, weight them, sum -- one fused kernel.
        xt = x.t().contiguous()  # (N_cols, B)
        out = F.embedding_bag(bags, xt, per_sample_weights=flat_values.view_as(bags), mode="sum")
        return out.t()  # (B, N_rows)
    w = torch.sparse_csr_tensor(crow, col, flat_values, (n_rows, n_cols), check_invariants=False)
    return torch.sparse.mm(w, x.t()).t()  # (B, N_rows)


class _EllFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, values, plan, kernel):
        ctx.save_for_backward(x, values)
        ctx.plan, ctx.kernel = plan, kernel
        return plan.matmul(values, x, kernel)

    @staticmethod
    def backward(ctx, g):
        x, values = ctx.saved_tensors
        plan = ctx.plan
        g = g.contiguous()
        gx = plan.matmul_t(values, g, ctx.kernel) if ctx.needs_input_grad[0] else None
        gv = plan.grad_values(g, x) if ctx.needs_input_grad[1] else None
        return gx, gv, None, None


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _native_forward(lib, plan: _Plan, x: torch.Tensor, values: torch.Tensor,
                    bias: torch.Tensor) -> torch.Tensor:
    n_out, n_in = plan.shape
    y = x.new_empty(x.shape[0], n_out)
    if lib.ell_forward(_ptr(x), x.shape[0], n_in, n_out, values.shape[1], _ptr(plan.idx32),
                       _ptr(values), _ptr(bias), _ptr(y), torch.get_num_threads()):
        raise MemoryError("native ELL kernel: out of memory for its scratch buffer")
    return y


class _NativeEllFunction(torch.autograd.Function):
    """y = x W^T + b through ell_kernel.c; x, values and bias are contiguous float32."""

    @staticmethod
    def forward(ctx, x, values, bias, plan, lib):
        ctx.save_for_backward(x, values)
        ctx.plan, ctx.lib = plan, lib
        return _native_forward(lib, plan, x, values, bias)

    @staticmethod
    def backward(ctx, g):
        x, values = ctx.saved_tensors
        plan, lib = ctx.plan, ctx.lib
        need_x, need_values, need_bias = ctx.needs_input_grad[:3]
        g = g.contiguous()
        gx = torch.empty_like(x) if need_x else None
        gv = torch.empty_like(values) if need_values else None
        t_values = values.reshape(-1)[plan.order].contiguous() if need_x else None
        n_out, n_in = plan.shape
        if (need_x or need_values) and lib.ell_backward(
                _ptr(x), _ptr(g), x.shape[0], n_in, n_out, values.shape[1], _ptr(plan.idx32),
                plan.fan_out, _ptr(plan.t_idx32), _ptr(t_values), _ptr(gx), _ptr(gv),
                torch.get_num_threads()):
            raise MemoryError("native ELL kernel: out of memory for its scratch buffer")
        return gx, gv, g.sum(0) if need_bias else None, None, None


class SparseLinear(nn.Module):
    """y = W x + b with W predefined-sparse; state_dict holds |W| values + |W| indices.

    `weight` is the ELL value table [N_out, d_in]; `indices` the ELL index table (int16 when
    N_in fits, so an edge costs 6 bytes on disk instead of a dense row's N_in*4).
    """

    def __init__(self, in_features: int, out_features: int, fan_out: int, seed: int = 0):
        super().__init__()
        d_in = fan_in_for(in_features, out_features, fan_out)
        self.in_features, self.out_features, self.fan_out, self.fan_in = (
            in_features, out_features, fan_out, d_in)
        index_dtype = torch.int16 if in_features <= torch.iinfo(torch.int16).max else torch.int32
        pattern = draw_connectivity(in_features, out_features, fan_out, seed)
        self.register_buffer("indices", torch.from_numpy(pattern).to(index_dtype))
        self.weight = nn.Parameter(torch.empty(out_features, d_in))
        self.bias = nn.Parameter(torch.empty(out_features))
        self._plan: _Plan | None = None
        self._dense_cache: tuple[int, torch.Tensor] | None = None
        self.force: str | None = None  # one of KERNELS: pins the kernel (tests, benchmarks)
        self._chosen: dict[tuple, str] = {}
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # He-normal on the *real* fan-in: a dense-fan-in init (what the reference does)
        # starts the first sparse layer with ~1/20 of the variance it needs.
        nn.init.normal_(self.weight, std=math.sqrt(2.0 / self.fan_in))
        nn.init.zeros_(self.bias)

    @property
    def plan(self) -> _Plan:
        if self._plan is None:
            with torch.inference_mode(False):  # the plan must serve training calls too
                self._plan = _Plan(self.indices, self.in_features)
        return self._plan

    def _apply(self, *args, **kwargs):
        self._chosen = {}  # .double(), .to(device): the choices were for another dtype or device
        self._dense_cache = None
        return super()._apply(*args, **kwargs)

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._plan = None  # indices may have changed
        self._dense_cache = None

    def kernel_for(self, batch: int, training: bool, input_grad: bool = True) -> str:
        """Which kernel runs a batch: `force` if set, native where SPLITEXIT_NATIVE=1 asks
        for it, else the fastest of `candidates` as measured on first use (kernel_choice).
        Remembered by the layer (a small junction's call costs tens of µs, so the lookup must
        be a dict's): SPLITEXIT_NATIVE is read when a layer first meets a batch size."""
        if self.force is not None:
            return self.force
        key = (batch, training, input_grad, torch.get_num_threads(), kernel_choice.generation)
        kernel = self._chosen.get(key)
        if kernel is None:
            if len(self._chosen) > 1024:
                self._chosen.clear()
            kernel = self._chosen[key] = self._choose(batch, training, input_grad)
        return kernel

    def _choose(self, batch: int, training: bool, input_grad: bool) -> str:
        kernels = self.candidates(batch, training)
        if self.weight.device.type != "cpu":
            return "bag" if batch >= EMBEDDING_BAG_MIN_BATCH else "gather"
        if "native" in kernels and os.environ.get(ell_native.DISABLE_ENV) == "1":
            return "native"
        if len(kernels) == 1:
            return kernels[0]
        timed = min(1 << max(batch - 1, 0).bit_length(), TIMED_MAX_BATCH)
        mode = "step+dx" if training and input_grad else "step" if training else "forward"
        key = (f"{self.in_features}->{self.out_features}/{self.fan_in} batch<={timed} "
               f"{str(self.weight.dtype).removeprefix('torch.')} "
               f"threads={torch.get_num_threads()} {mode}")
        return kernel_choice.choose(key, kernels, lambda: self._timed_step(timed, mode))

    def candidates(self, batch: int, training: bool) -> list[str]:
        """The kernels worth timing for a batch (bounded in memory: see the constants)."""
        kernels = ["native"] if self._native_ok() else []
        kernels += ["csr", "bag"]
        if self.in_features * self.out_features <= DENSE_MAX_ELEMENTS:
            kernels.append("dense")
        if batch * self.edges <= GATHER_MAX_ELEMENTS:
            kernels.append("gather")
        return kernels

    def _timed_step(self, batch: int, mode: str):
        """run(kernel): one call as the layer will make it, on a copy (its gradients and the
        global RNG stay untouched)."""
        plan = self.plan
        with torch.inference_mode(False), torch.no_grad():
            probe = copy.deepcopy(self, {id(plan): plan, id(self._dense_cache): None})
            probe.weight.requires_grad_(mode != "forward")
            probe.bias.requires_grad_(mode != "forward")
            gen = torch.Generator().manual_seed(0)
            x = torch.randn(batch, self.in_features, generator=gen, dtype=self.weight.dtype)
        x.requires_grad_(mode == "step+dx")

        def run(kernel: str) -> None:
            probe.force = kernel
            if mode == "forward":
                with torch.inference_mode():
                    probe(x)
                return
            with torch.enable_grad():
                probe.weight.grad = probe.bias.grad = x.grad = None
                probe(x).sum().backward()
        return run

    def _native_ok(self) -> bool:
        weight = self.weight
        return (weight.dtype == torch.float32 and weight.device.type == "cpu"
                and ell_native.library() is not None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        training = torch.is_grad_enabled() and (x.requires_grad or any(
            p.requires_grad for p in self._parameters.values()))
        return self.run(self.kernel_for(x.shape[0], training, x.requires_grad), x)

    def run(self, kernel: str, x: torch.Tensor) -> torch.Tensor:
        """y = W x + b through one kernel (all give the same result, within rounding)."""
        training = torch.is_grad_enabled()
        if kernel == "dense":
            if training:
                return F.linear(x, self.dense_weight(differentiable=True), self.bias)
            weight = self.weight
            cache = self._dense_cache  # rebuilt when an in-place update bumps the version
            if cache is None or cache[0] != weight._version:
                cache = self._dense_cache = (weight._version, self.dense_weight())
            return F.linear(x, cache[1], self.bias)
        if kernel == "native":
            lib = ell_native.library()
            if lib is None or x.dtype != torch.float32 or self.weight.dtype != torch.float32:
                raise ValueError("the native ELL kernel runs float32 on CPU only; "
                                 f"got {x.dtype} input and {self.weight.dtype} weights")
            x, weight = x.contiguous(), self.weight.contiguous()
            if training:
                return _NativeEllFunction.apply(x, weight, self.bias, self.plan, lib)
            return _native_forward(lib, self.plan, x, weight, self.bias)
        if kernel == "gather":
            gathered = x.index_select(1, self.plan.col).view(-1, *self.weight.shape)
            return torch.linalg.vecdot(gathered, self.weight) + self.bias
        if kernel in ("csr", "bag"):
            return _EllFunction.apply(x, self.weight, self.plan, kernel) + self.bias
        raise ValueError(f"unknown sparse kernel {kernel!r}: one of {', '.join(KERNELS)}")

    def dense_weight(self, differentiable: bool = False) -> torch.Tensor:
        """The equivalent dense [N_out, N_in] matrix; gradients reach only real edges."""
        values = self.weight if differentiable else self.weight.detach()
        w = torch.zeros(self.out_features, self.in_features, dtype=values.dtype)
        return w.scatter(1, self.indices.long(), values)

    @property
    def edges(self) -> int:
        return self.out_features * self.fan_in

    def extra_repr(self) -> str:
        return (f"{self.in_features}->{self.out_features}, fan_out={self.fan_out}, "
                f"fan_in={self.fan_in}, density={self.fan_in / self.in_features:.3f}")


def make_junction(in_features: int, out_features: int, fan_out: int, seed: int) -> nn.Module:
    """A dense nn.Linear when fan-out is the full width, else a SparseLinear."""
    if fan_out == out_features:
        layer = nn.Linear(in_features, out_features)
        nn.init.normal_(layer.weight, std=math.sqrt(2.0 / in_features))
        nn.init.zeros_(layer.bias)
        return layer
    return SparseLinear(in_features, out_features, fan_out, seed)
