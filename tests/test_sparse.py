import io
import json
import os
import random
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from pipeline.model import ell_native, kernel_choice
from pipeline.model.sparse import SparseLinear, SparsityError, draw_connectivity, fan_in_for

KERNELS = ("dense", "gather", "csr", "bag")


def random_valid_shapes(count: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    shapes = []
    while len(shapes) < count:
        n_in, n_out = int(rng.integers(1, 300)), int(rng.integers(1, 300))
        valid = [f for f in range(1, n_out + 1) if (n_in * f) % n_out == 0]
        shapes.append((n_in, n_out, int(rng.choice(valid)), int(rng.integers(0, 1 << 30))))
    return shapes


@pytest.mark.parametrize("n_in,n_out,fan_out,seed", random_valid_shapes(200))
def test_degrees_are_exact_and_edges_distinct(n_in, n_out, fan_out, seed):
    rows = draw_connectivity(n_in, n_out, fan_out, seed)
    d_in = n_in * fan_out // n_out
    assert rows.shape == (n_out, d_in)
    assert np.all(np.bincount(rows.ravel(), minlength=n_in) == fan_out)  # out-degree
    assert all(len(np.unique(r)) == d_in for r in rows)  # in-degree, no duplicate edges
    assert rows.min() >= 0 and rows.max() < n_in


def test_pattern_is_a_pure_function_of_the_seed():
    a = draw_connectivity(800, 40, 2, seed=7)
    assert np.array_equal(a, draw_connectivity(800, 40, 2, seed=7))
    assert not np.array_equal(a, draw_connectivity(800, 40, 2, seed=8))


def test_pattern_is_mixed_not_banded():
    # Different outputs must not all read the same contiguous band of a permutation.
    rows = draw_connectivity(800, 40, 2, seed=0)
    overlaps = [len(np.intersect1d(rows[i], rows[j])) for i in range(40) for j in range(i)]
    assert max(overlaps) < 10  # 20 random inputs of 800 each: ~0.5 expected in common


@pytest.mark.parametrize("n_in,n_out,fan_out", [(784, 40, 2), (800, 30, 2), (10, 4, 3)])
def test_impossible_fan_out_names_valid_ones_and_padding(n_in, n_out, fan_out):
    with pytest.raises(SparsityError) as e:
        fan_in_for(n_in, n_out, fan_out)
    msg = str(e.value)
    assert "\n" not in msg and "valid fan-outs nearby" in msg and "pad the input" in msg
    pad = int(msg.split("pad the input to ")[1].split()[0])
    fan_in_for(pad, n_out, fan_out)  # the suggested padding works
    suggested = [int(f) for f in msg.split("nearby are ")[1].split(",")[:-1] if f.strip()]
    for f in suggested:
        fan_in_for(n_in, n_out, f)  # every suggested fan-out works


def test_paper_padding_message():
    with pytest.raises(SparsityError, match="pad the input to 800"):
        fan_in_for(784, 40, 2)


@pytest.mark.parametrize("fan_out", [0, 41, -1])
def test_fan_out_out_of_range(fan_out):
    with pytest.raises(SparsityError, match="between 1 and 40"):
        fan_in_for(800, 40, fan_out)


def masked_dense_reference(layer: SparseLinear, x: torch.Tensor, g: torch.Tensor):
    """Float64 masked dense: y = x (W*M)^T + b, grads wrt x and the real-edge values."""
    w = layer.dense_weight().double().requires_grad_(True)
    mask = torch.zeros_like(w).scatter(1, layer.indices.long(), 1.0)
    x = x.detach().clone().requires_grad_(True)
    y = x @ (w * mask).t() + layer.bias.detach().double()
    y.backward(g)
    return y.detach(), x.grad, w.grad.gather(1, layer.indices.long())


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("batch", [1, 7, 64])
@pytest.mark.parametrize("n_in,n_out,fan_out", [(800, 40, 2), (40, 40, 9), (300, 500, 25)])
def test_forward_and_gradients_match_masked_dense(kernel, batch, n_in, n_out, fan_out):
    torch.manual_seed(0)
    layer = SparseLinear(n_in, n_out, fan_out, seed=3).double()
    layer.force = kernel
    x = torch.randn(batch, n_in, dtype=torch.float64, requires_grad=True)
    y = layer(x)
    g = torch.randn_like(y)
    y.backward(g)
    y_ref, gx_ref, gv_ref = masked_dense_reference(layer, x, g)
    torch.testing.assert_close(y.detach(), y_ref)
    torch.testing.assert_close(x.grad, gx_ref)
    torch.testing.assert_close(layer.weight.grad, gv_ref)
    torch.testing.assert_close(layer.bias.grad, g.sum(0))
    with torch.inference_mode():  # the inference paths (cached dense, gather) agree too
        torch.testing.assert_close(layer(x.detach()), y_ref)


def test_automatic_kernel_choice_is_correct_at_every_batch():
    torch.manual_seed(0)
    layer = SparseLinear(2048, 512, 25, seed=1)
    for batch in (1, 31, 32, 100):
        x = torch.randn(batch, 2048)
        expected = x @ layer.dense_weight().t() + layer.bias.detach()
        torch.testing.assert_close(layer(x).detach(), expected, rtol=1e-4, atol=1e-4)


def test_cached_dense_copy_follows_weight_updates():
    layer = SparseLinear(800, 40, 2)
    x = torch.randn(1, 800)
    with torch.no_grad():
        before = layer(x) - layer.bias
        layer.weight.mul_(2.0)  # an optimizer step changes values in place
        torch.testing.assert_close(layer(x) - layer.bias, 2 * before)


def test_state_dict_holds_edges_not_the_dense_matrix():
    layer = SparseLinear(2048, 2048, 102)
    sd = layer.state_dict()
    assert set(sd) == {"weight", "indices", "bias"}
    edges = 2048 * 102
    assert sd["weight"].numel() == edges and sd["indices"].numel() == edges
    assert sd["indices"].dtype == torch.int16  # 2 bytes an index while N_in fits
    buf = io.BytesIO()
    torch.save(sd, buf)
    assert buf.tell() < 1.02 * (edges * (4 + 2) + 2048 * 4) + 4096  # ∝ |W|, tiny overhead
    assert buf.tell() < 0.1 * 2048 * 2048 * 4  # vs a dense float32 matrix


def test_stored_bytes_grow_linearly_with_edges():
    sizes = []
    for fan_out in (4, 8, 16):
        buf = io.BytesIO()
        torch.save(SparseLinear(1024, 1024, fan_out).state_dict(), buf)
        sizes.append(buf.tell())
    step1, step2 = sizes[1] - sizes[0], sizes[2] - sizes[1]
    assert step1 == pytest.approx(1024 * 4 * 6, rel=0.02)  # 4 more edges per input, 6 B each
    assert step2 == pytest.approx(2 * step1, rel=0.02)


def test_gradients_exist_only_for_real_edges():
    layer = SparseLinear(800, 40, 2)
    layer(torch.randn(256, 800)).sum().backward()
    assert layer.weight.grad.shape == (40, 40)  # [N_out, d_in], no dense gradient anywhere


def test_loading_a_state_dict_replaces_the_pattern():
    a, b = SparseLinear(800, 40, 2, seed=1), SparseLinear(800, 40, 2, seed=2)
    x = torch.randn(3, 800)
    b(x)  # builds b's kernel plan for its own pattern
    b.load_state_dict(a.state_dict())
    torch.testing.assert_close(b(x), a(x))


# --- the native ELL kernel (pipeline/model/ell_kernel.c) and its fallback ---

needs_native = pytest.mark.skipif(ell_native.library() is None, reason=ell_native.status())


@needs_native
@pytest.mark.parametrize("batch", [1, 7, 64, 100, 200])
@pytest.mark.parametrize("n_in,n_out,fan_out", [(800, 40, 2), (40, 40, 9), (300, 500, 25),
                                                (2048, 512, 25), (35, 21, 3)])
def test_native_kernel_matches_masked_dense(batch, n_in, n_out, fan_out):
    # Batches cross the kernel's 64-sample and 16-sample blocks, full and partial, and its
    # 8x8 transposes (feature counts that are not multiples of 8 leave edges).
    torch.manual_seed(0)
    layer = SparseLinear(n_in, n_out, fan_out, seed=3)
    layer.force = "native"
    x = torch.randn(batch, n_in, requires_grad=True)
    y = layer(x)
    g = torch.randn_like(y)
    y.backward(g)
    y_ref, gx_ref, gv_ref = masked_dense_reference(layer, x.double(), g.double())
    close = dict(rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(y.detach().double(), y_ref, **close)
    torch.testing.assert_close(x.grad.double(), gx_ref, **close)
    torch.testing.assert_close(layer.weight.grad.double(), gv_ref, **close)
    torch.testing.assert_close(layer.bias.grad, g.sum(0))
    with torch.inference_mode():
        torch.testing.assert_close(layer(x.detach()), y.detach())


@needs_native
def test_native_kernel_is_forced_or_kept_out_by_the_environment(monkeypatch, choices):
    big = SparseLinear(2048, 512, 25)
    monkeypatch.setenv("SPLITEXIT_NATIVE", "1")
    for batch, training in ((1, False), (256, True)):
        assert big.kernel_for(batch, training) == "native"
    assert not choices.exists()  # forced: nothing was timed
    assert big.double().kernel_for(256, training=True) != "native"  # float32 only
def train_steps(seed: int = 0) -> list[torch.Tensor]:
    """Three AdamW steps of a sparse two-layer net on a fixed batch; returns the weights."""
    torch.manual_seed(seed)
    net = torch.nn.Sequential(SparseLinear(800, 40, 2, seed=1), torch.nn.ReLU(),
                              SparseLinear(40, 100, 5, seed=2))
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2)
    x, y = torch.randn(96, 800), torch.randint(0, 100, (96,))
    for _ in range(3):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
    return [p.detach() for p in net.parameters()]


@pytest.fixture
def fresh_native(monkeypatch, tmp_path):
    """ell_native as on first use in a new process, with its cache under tmp_path."""
    monkeypatch.setattr(ell_native.KERNEL, "_state", {})
    monkeypatch.setenv("SPLITEXIT_CACHE", str(tmp_path / "cache"))
    return monkeypatch


def broken_compiler(tmp_path) -> str:
    cc = tmp_path / "cc"
    cc.write_text("#!/bin/sh\necho 'cc: error: unsupported target' >&2\nexit 1\n")
    cc.chmod(0o755)
    return str(cc)


@pytest.mark.parametrize("why,env,message", [
    ("disabled", {"SPLITEXIT_NATIVE": "0"}, "SPLITEXIT_NATIVE=0"),
    ("no compiler", {"CC": "/nonexistent/cc"}, "no C compiler: install gcc or set CC"),
    ("build fails", {"CC": broken_compiler}, "could not build ell_kernel.c: cc: error: unsupported"),
])
def test_without_the_native_kernel_training_falls_back_to_pytorch(
        why, env, message, fresh_native, tmp_path):
    native = train_steps() if ell_native.library() is not None else None
    fresh_native.setattr(ell_native.KERNEL, "_state", {})
    for name, value in env.items():
        fresh_native.setenv(name, value(tmp_path) if callable(value) else value)
    assert ell_native.library() is None
    status = ell_native.status()
    assert status.startswith("PyTorch kernels") and message in status and "\n" not in status
    assert "native" not in SparseLinear(2048, 512, 25).candidates(256, training=True)
    fallback = train_steps()
    if native is not None:  # both paths train the same network
        for a, b in zip(native, fallback):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@needs_native
def test_the_kernel_is_built_once_then_loaded_from_the_cache(fresh_native, tmp_path):
    log = tmp_path / "builds.log"
    cc = tmp_path / "logging-cc"
    cc.write_text(f"#!/bin/sh\necho build >> {log}\nexec {shutil.which('cc')} \"$@\"\n")
    cc.chmod(0o755)
    fresh_native.setenv("CC", str(cc))
    assert ell_native.library() is not None
    assert log.read_text().count("build") == 1
    fresh_native.setattr(ell_native.KERNEL, "_state", {})  # a new process, same machine
    assert ell_native.library() is not None
    assert log.read_text().count("build") == 1
    assert len(list((tmp_path / "cache").glob("ell_kernel-*.so"))) == 1


@needs_native
def test_native_threads_split_the_batch_without_changing_the_answer():
    torch.manual_seed(0)
    layer = SparseLinear(2048, 1024, 50, seed=4)  # 300 x 1024 x 100 MACs: worth threads
    layer.force = "native"
    x = torch.randn(300, 2048, requires_grad=True)
    results = []
    threads = torch.get_num_threads()
    try:
        for n in (1, 3):
            torch.set_num_threads(n)
            layer.zero_grad()
            x.grad = None
            y = layer(x)
            y.backward(torch.ones_like(y))
            results.append((y.detach(), x.grad.clone(), layer.weight.grad.clone()))
    finally:
        torch.set_num_threads(threads)
    (y1, gx1, gv1), (y3, gx3, gv3) = results
    # Chunks are fixed by the batch, gv sums one accumulator per chunk in chunk order.
    assert torch.equal(y1, y3) and torch.equal(gx1, gx3) and torch.equal(gv1, gv3)


# --- the kernel chosen by measurement (pipeline/model/kernel_choice.py) ---

@pytest.fixture
def choices(monkeypatch, tmp_path):
    """A machine on which no kernel was chosen yet: empty cache dir, nothing in memory; one
    torch thread (on a busy machine, two threads make every multi-threaded op 10-100x slower
    at random, which would blur 'clearly slower' kernels)."""
    monkeypatch.setenv("SPLITEXIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("SPLITEXIT_NATIVE", raising=False)
    kernel_choice.forget()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield kernel_choice.choices_file()
    finally:
        torch.set_num_threads(threads)
        kernel_choice.forget()


class WithLoopKernel(SparseLinear):
    """A layer with one more candidate: a Python loop over outputs and samples, which computes
    the same y (and gradients, through autograd) many times slower than any real kernel."""

    loop_calls = 0  # on the class: timing runs on a copy of the layer

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        WithLoopKernel.loop_calls = 0

    def candidates(self, batch, training):
        return ["loop", "bag"]

    def run(self, kernel, x):
        if kernel != "loop":
            return super().run(kernel, x)
        WithLoopKernel.loop_calls += 1
        col = self.indices.long()
        rows = [torch.stack([(x[b, col[o]] * self.weight[o]).sum()
                             for o in range(self.out_features)]) for b in range(x.shape[0])]
        return torch.stack(rows) + self.bias


def test_the_faster_kernel_is_chosen_and_runs(choices):
    layer = WithLoopKernel(200, 50, 5, seed=1)
    x = torch.randn(16, 200, requires_grad=True)
    y = layer(x)  # first use: times both, keeps bag
    assert layer.kernel_for(16, training=True) == "bag" and WithLoopKernel.loop_calls >= 1
    timed = json.loads(choices.read_text())
    entry = timed["200->50/20 batch<=16 float32 threads=1 step+dx"]
    assert entry["kernel"] == "bag" and entry["seconds"]["loop"] > entry["seconds"]["bag"]
    layer.force = "loop"  # and the loop kernel is a real one: same answer
    torch.testing.assert_close(layer(x), y, rtol=1e-5, atol=1e-5)


def test_a_choice_is_reused_without_timing_again(choices):
    layer = WithLoopKernel(200, 50, 5, seed=1)
    with torch.no_grad():
        layer(torch.randn(3, 200))
    assert WithLoopKernel.loop_calls >= 1 and choices.exists()
    kernel_choice.forget()  # a second process on the same machine
    again = WithLoopKernel(200, 50, 5, seed=2)
    with torch.no_grad():
        again(torch.randn(4, 200))  # same shape, same batch bucket (<= 4)
        assert WithLoopKernel.loop_calls == 0
        again(torch.randn(5, 200))  # another bucket (<= 8): timed
        assert WithLoopKernel.loop_calls >= 1


def test_a_choice_is_per_thread_count(choices):
    layer = WithLoopKernel(200, 50, 5, seed=1)
    threads = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            with torch.no_grad():
                layer(torch.randn(2, 200))
    finally:
        torch.set_num_threads(threads)
    assert sorted(k.split()[3] for k in json.loads(choices.read_text())) == [
        "threads=1", "threads=2"]


def test_choosing_leaves_gradients_and_random_numbers_alone(choices):
    layer = SparseLinear(800, 40, 2, seed=1)
    torch.manual_seed(0)
    x = torch.randn(64, 800)
    expected = torch.randn(3)
    torch.manual_seed(0)
    torch.randn(64, 800)
    state = random.getstate()
    layer(x).sum().backward()  # first use: timing runs on a copy, in shuffled rounds
    torch.testing.assert_close(torch.randn(3), expected)
    assert random.getstate() == state
    grad = layer.weight.grad.clone()
    layer.zero_grad()
    layer(x).sum().backward()  # chosen already: one plain step
    torch.testing.assert_close(layer.weight.grad, grad)


@pytest.mark.parametrize("batch", [1, 64])
def test_every_candidate_gives_the_same_answer(batch, choices):
    torch.manual_seed(0)
    layer = SparseLinear(160, 200, 50, seed=3)  # 32 000 weights: dense and gather run too
    x = torch.randn(batch, 160, requires_grad=True)
    kernels = layer.candidates(batch, training=True)
    assert {"csr", "bag", "dense", "gather"} <= set(kernels)
    results = []
    for kernel in [None, *kernels]:  # None: the automatic choice
        layer.force = kernel
        layer.zero_grad()
        x.grad = None
        y = layer(x)
        y.backward(torch.arange(y.numel(), dtype=y.dtype).view_as(y) / y.numel())
        results.append((y.detach(), x.grad, layer.weight.grad, layer.bias.grad))
    for kernel, result in zip(kernels, results[1:]):
        for got, want in zip(result, results[0]):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5, msg=kernel)


def test_an_unknown_forced_kernel_is_named():
    layer = SparseLinear(800, 40, 2)
    layer.force = "fast"
    with pytest.raises(ValueError, match="unknown sparse kernel 'fast': one of native, csr"):
        layer(torch.randn(2, 800))


@pytest.mark.parametrize("policy,spin_count", [(None, "0"), ("ACTIVE", None)])
def test_openmp_threads_sleep_unless_the_user_says_otherwise(policy, spin_count):
    """`import pipeline` before torch makes torch's OpenMP threads sleep between parallel
    regions instead of spinning (beside other torch processes a spinning thread holds the core
    its sibling needs: 2-thread steps 1.3-15x slower); a policy the user set is kept. libgomp's own
    report of what it read (OMP_DISPLAY_ENV) is the evidence."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    env["OMP_DISPLAY_ENV"] = "VERBOSE"
    if policy:
        env["OMP_WAIT_POLICY"] = policy
    out = subprocess.run([sys.executable, "-c", "import pipeline, torch; torch.ones(1)"],
                         env=env, capture_output=True, text=True, timeout=120, check=True)
    reported = {line.split("=")[0].strip(): line.split("=", 1)[1].strip().strip("'")
                for line in out.stderr.splitlines() if "=" in line}
    assert reported["OMP_WAIT_POLICY"] == (policy or "PASSIVE")
    if spin_count is not None:
        assert reported["GOMP_SPINCOUNT"] == spin_count
    else:
        assert int(reported["GOMP_SPINCOUNT"]) > 0
