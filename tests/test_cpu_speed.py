"""CPU speed work keeps the numbers: the channels_last U-Net gives the old outputs, gradients and loss trajectory to
float tolerance with the old state-dict keys; and the CPU policy (tinyddpm/cpu.py) picks threads from the free cores,
obeys an explicit count and keeps big tensors out of mmap. No timings here: benchmarks/ measures speed."""
import copy
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import train
from tests.helpers import MICRO_FLAGS, make_image_folder
from tinyddpm import cpu, statistics
from tinyddpm.config import ATTEND_COARSEST, build_config
from tinyddpm.diffusion import GaussianDiffusion
from tinyddpm.errors import EXIT_USAGE, UserError, run_cli
from tinyddpm.generate import LoadedModel, SamplingOptions
from tinyddpm.samplers import SamplerOptions
from tinyddpm.schedules import get_betas
from tinyddpm.unet import UNet

pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/conftest.py

# The U-Net's state dicts (names, shapes, order) as main wrote them before the layout change: what every checkpoint
# written since holds, so a key renamed or reshaped would stop them loading.
FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")
with open(os.path.join(FIXTURES, "unet_state_dicts.json")) as _f:
    OLD_STATE_DICTS = {tuple(name.split("/")): [(k, tuple(shape)) for k, shape in keys]
                       for name, keys in json.load(_f).items()}
IMAGE = 32
TOL = dict(rtol=1e-4, atol=1e-5)  # float32 rounding of a different summation order in the convolutions
LR = 1e-3  # the tiny preset's


def build(preset="tiny", cond_kind="none", **unet):
    # The recorded names, shapes and losses are those of the network before tiny gained attention at its coarsest
    # level (config.ATTEND_COARSEST), so that attention stays off here unless a test asks for it.
    if preset in ATTEND_COARSEST:
        unet.setdefault("attn_resolutions", ())
    cfg = build_config(preset, {"unet": unet}).unet
    torch.manual_seed(0)
    kw = dict(cond_kind=cond_kind, num_cond=2) if cond_kind != "none" else {}
    model = UNet(cfg, IMAGE, **kw)
    with torch.no_grad():  # the zero-initialised output layers would make every output 0
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def contiguous_copy(model):
    """The same network in the old NCHW layout."""
    return copy.deepcopy(model).to(memory_format=torch.contiguous_format)


def inputs(n=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, IMAGE, IMAGE, generator=g), torch.randint(0, 1000, (n,), generator=g)


# ------------------------------------------------------------------------------------------ the U-Net's numbers

@pytest.mark.parametrize("preset,cond_kind", sorted(OLD_STATE_DICTS))
def test_state_dict_names_and_shapes_are_the_old_ones(preset, cond_kind):
    got = [(k, tuple(v.shape)) for k, v in build(preset, cond_kind).state_dict().items()]
    want = OLD_STATE_DICTS[(preset, cond_kind)]
    got_shapes, want_shapes = dict(got), dict(want)
    missing, new = sorted(set(want_shapes) - set(got_shapes)), sorted(set(got_shapes) - set(want_shapes))
    reshaped = [f"{k} {want_shapes[k]} → {got_shapes[k]}" for k in sorted(set(want_shapes) & set(got_shapes))
                if want_shapes[k] != got_shapes[k]]
    assert not (missing or new or reshaped), f"missing {missing}; new {new}; reshaped {reshaped}"
    assert [k for k, _ in got] == [k for k, _ in want]  # the same order as well


def test_weights_and_activations_are_channels_last():
    model = build()
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(c.weight.is_contiguous(memory_format=torch.channels_last) for c in convs)
    x, t = inputs()
    assert model(x, t).is_contiguous(memory_format=torch.channels_last)  # an NCHW input is fine


@pytest.mark.parametrize("unet", [{}, dict(scale_shift_norm=True, attn_resolutions=(16,), num_heads=2)])
def test_outputs_and_gradients_match_the_contiguous_layout(unet):
    model = build(**unet)
    old = contiguous_copy(model)
    x, t = inputs()
    out, ref = model(x, t), old(x, t)
    assert ref.abs().max() > 0.1  # a real signal, not the zero-initialised output
    torch.testing.assert_close(out, ref, **TOL)
    out.square().mean().backward()
    ref.square().mean().backward()
    for (name, p), q in zip(model.named_parameters(), old.parameters()):
        torch.testing.assert_close(p.grad, q.grad, **TOL, msg=name)


def test_a_checkpoint_in_the_old_layout_loads_and_gives_the_same_outputs():
    old = contiguous_copy(build(cond_kind="class"))
    state = old.state_dict()
    assert all(v.is_contiguous() for v in state.values())  # what today's checkpoints hold
    model = UNet(old.cfg, IMAGE, cond_kind="class", num_cond=2)
    model.load_state_dict(state)  # strict: same names
    x, t = inputs()
    c = torch.tensor([0, 1, 2, 1])
    torch.testing.assert_close(model(x, t, c), old(x, t, c), **TOL)
    assert model.conv_in.weight.is_contiguous(memory_format=torch.channels_last)  # the new layout is kept


def test_training_loss_trajectory_is_unchanged():
    """Five AdamW steps of the diffusion loss from the same weights and batches: the same losses and weights."""
    diffusion = GaussianDiffusion(get_betas("linear", 1000))
    model = build()
    old = contiguous_copy(model)
    opts = [torch.optim.AdamW(m.parameters(), lr=LR, foreach=True) for m in (model, old)]
    g = torch.Generator().manual_seed(2)
    for _ in range(5):
        x0 = torch.rand(4, 3, IMAGE, IMAGE, generator=g) * 2 - 1
        t = torch.randint(0, 1000, (4,), generator=g)
        noise = torch.randn(x0.shape, generator=g)
        losses = []
        for m, opt in zip((model, old), opts):
            loss = diffusion.training_losses(m, x0, t, noise)["loss"].mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
        assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    # Adam divides by √v: where a gradient is ~0, float noise moves a weight by up to lr, so compare at 0.1·lr.
    for p, q in zip(model.parameters(), old.parameters()):
        torch.testing.assert_close(p, q, rtol=TOL["rtol"], atol=0.1 * LR)


# ------------------------------------------------------------------------------------------------ the CPU policy

STAT = "cpu  {busy} 0 0 {idle} 0 0 0 0 0 0\ncpu0 1 2 3 4\n"


@pytest.fixture
def threads_restored():
    before = torch.get_num_threads()
    yield
    cpu.configure(env={cpu.THREADS_ENV: str(before)})  # also drops any hook a test installed
    torch.set_num_threads(before)


@pytest.mark.parametrize("others,cores,max_threads,want", [
    (0.0, 2, 2, 2), (0.1, 2, 2, 2), (0.29, 2, 2, 2),  # noise: a shell, a daemon
    (0.3, 2, 2, 1), (0.66, 2, 2, 1), (1.0, 2, 2, 1),  # one busy neighbour (even when our spinning starves it)
    (2.0, 2, 2, 1), (5.0, 8, 8, 3), (1.0, 8, 4, 4),  # never below 1, never above torch's default
])
def test_threads_follow_the_free_cores(others, cores, max_threads, want):
    assert cpu.threads_for(others, cores, max_threads) == want


def test_busy_seconds_reads_the_summed_cpu_line():
    text = "cpu  100 5 20 900 7 1 2 3 40 0\ncpu0 50 0 10 450 0 0 0 0 0 0\nintr 1\n"
    assert cpu.busy_seconds(text, 100) == pytest.approx((100 + 5 + 20 + 1 + 2 + 3) / 100)  # not idle, iowait


class FakeMachine:
    """/proc/stat, a clock and our own CPU time, advanced by hand."""

    def __init__(self):
        self.now, self.busy, self.ours = 0.0, 0, 0.0

    def run(self, seconds, others_cores, our_cores):
        self.now += seconds
        self.ours += seconds * our_cores
        self.busy += round(100 * seconds * (others_cores + our_cores))

    def stat(self):
        return STAT.format(busy=self.busy, idle=0)


def test_policy_drops_to_the_free_cores_and_comes_back(threads_restored):
    m = FakeMachine()
    policy = cpu.ThreadPolicy(2, cores=2, interval=2.0, read_stat=m.stat, clock=lambda: m.now, own_cpu=lambda: m.ours)
    m.run(2.0, others_cores=0.0, our_cores=2.0)  # alone: our own busy time is not a neighbour's
    assert policy.update() == 2
    m.run(2.0, others_cores=0.7, our_cores=1.3)  # a neighbour starts, starved a little by our spinning threads
    assert policy.update() == 1
    m.run(1.0, others_cores=0.0, our_cores=1.0)  # within the interval: nothing re-measured yet
    assert policy.update() == 1
    m.run(2.0, others_cores=0.0, our_cores=1.0)  # the neighbour has stopped
    assert policy.update() == 2 and torch.get_num_threads() == 2


def test_an_optimizer_step_re_measures(threads_restored, monkeypatch):
    monkeypatch.delenv(cpu.THREADS_ENV, raising=False)
    monkeypatch.setattr(cpu, "PROBE_S", 0.0)
    policy = cpu.configure(env={})
    if policy is None:
        pytest.skip("no /proc/stat here")
    calls = []
    monkeypatch.setattr(policy, "update", lambda force=False: calls.append(force))
    w = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.SGD([w], lr=0.1)
    w.sum().backward()
    opt.step()
    assert calls == [False]


def a_neighbour_started_after_the_probe(monkeypatch):
    """Install (as `configure` would) a policy whose next measurement finds another process on one of 2 cores."""
    m = FakeMachine()
    policy = cpu.ThreadPolicy(2, cores=2, interval=2.0, read_stat=m.stat, clock=lambda: m.now, own_cpu=lambda: m.ours)
    m.run(2.0, others_cores=1.0, our_cores=1.0)
    monkeypatch.setattr(cpu, "_policy", policy)
    torch.set_num_threads(2)  # what the start-up probe chose on the then idle machine


def test_follow_free_cores_without_a_policy_changes_nothing(threads_restored, monkeypatch):
    monkeypatch.setattr(cpu, "_policy", None)
    torch.set_num_threads(2)
    assert cpu.follow_free_cores() == 2 and torch.get_num_threads() == 2


def test_a_feature_pass_follows_the_free_cores(threads_restored, monkeypatch):
    a_neighbour_started_after_the_probe(monkeypatch)
    seen = []

    def features(x):  # stands in for the Inception network: [B, 3, H, W] -> [B, 4]
        seen.append(torch.get_num_threads())
        return torch.zeros(x.shape[0], 4)

    statistics.features_from_uint8(np.zeros((3, 8, 8, 3), np.uint8), features, batch_size=2)
    assert seen == [1, 1]


def test_sampling_follows_the_free_cores(threads_restored, monkeypatch, tmp_path):
    data = make_image_folder(str(tmp_path / "imgs"))
    flags = ["--dataset", "folder", "--data-dir", data, "--image-size", "16", "--out", str(tmp_path / "run"),
             "--steps", "1", *MICRO_FLAGS]
    assert run_cli(train.main, flags) == 0
    gen = LoadedModel(str(tmp_path / "run" / "ckpt.pt"), torch.device("cpu"))
    seen, forward = [], gen.net.forward

    def recording(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return forward(*args, **kwargs)

    monkeypatch.setattr(gen.net, "forward", recording)
    a_neighbour_started_after_the_probe(monkeypatch)
    gen.sample([0, 1], None, SamplingOptions(sampler=SamplerOptions("ddim", steps=3)))
    assert seen == [1, 1, 1]


def test_an_explicit_thread_count_wins(threads_restored):
    assert cpu.configure(env={cpu.THREADS_ENV: "1"}) is None and torch.get_num_threads() == 1
    torch.set_num_threads(2)
    assert cpu.configure(env={"OMP_NUM_THREADS": "2"}) is None and torch.get_num_threads() == 2  # torch's own


@pytest.mark.parametrize("value", ["0", "-1", "two", "1.5"])
def test_a_bad_thread_count_is_a_one_line_error(value, monkeypatch, capsys, threads_restored):
    monkeypatch.setenv(cpu.THREADS_ENV, value)
    with pytest.raises(UserError, match=cpu.THREADS_ENV):
        cpu.explicit_threads(os.environ)
    assert run_cli(lambda argv: 0, [], setup=cpu.configure) == EXIT_USAGE
    err = capsys.readouterr().err
    assert err.startswith(f"error: {cpu.THREADS_ENV}=") and err.count("\n") == 1


PAGE_FAULTS = """
import resource, sys, torch
torch.set_num_threads(1)
if sys.argv[1] == "heap":
    from tinyddpm.cpu import keep_big_allocations_in_heap
    assert keep_big_allocations_in_heap()
x = torch.ones(BIG)
for _ in range(WARMUP):  # warm-up: the heap grows to its working size, which can take more than a few rounds
    x = x * 0.5 + 1
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(ITERS):  # each op makes a new tensor and frees the old one, as a network's activations do
    x = x * 0.5 + 1
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
""".replace("BIG", str(10 << 20)).replace("WARMUP", "20").replace("ITERS", "5")
# BIG float32 = 40 MiB, above glibc's mmap threshold (≤ 32 MiB)
PAGES = 10 * (40 << 20) // 4096  # the measured 10 new tensors of 40 MiB, in 4 KiB pages


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_big_tensors_are_reused_from_the_heap_not_faulted_in_again():
    """The old behaviour faults in every page of every big tensor again; the heap reuses most of them."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    faults = {}
    for mode in ("mmap", "heap"):
        out = subprocess.run([sys.executable, "-c", PAGE_FAULTS, mode], cwd=root, capture_output=True, text=True,
                             env={**os.environ, "OMP_NUM_THREADS": "1"}, check=True)
        faults[mode] = int(out.stdout.split()[-1])
    assert faults["mmap"] > 0.9 * PAGES
    assert faults["heap"] < 0.5 * PAGES  # most are reused; a stray heap extension faults in one tensor
