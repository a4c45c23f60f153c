"""The fast FID Inception path (BN folded into the convs, channels-last, conv+ReLU as one oneDNN op, resize in
channels-last) gives the plain path's numbers: the features to float tolerance and the FID to 1e-4 relative."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from test_fid_inception import cifar_uint8, ts_path
from tinyddpm import inception as inc
from tinyddpm.distance import frechet_distance
from tinyddpm.statistics import features_from_uint8, statistics_from_features

pytestmark = pytest.mark.filterwarnings("ignore:.*torch.jit.load:DeprecationWarning")
N_IMAGES = 6  # 3 + 3 for an FID; the CPU Inception is slow
FEATURE_ATOL = 1e-4  # the limit the TorchScript reference check uses too
FID_RTOL = 1e-4


def plain_model(path):
    """The network as written: BN layers, NCHW weights, separate ReLU."""
    state, flavour = inc.read_weights(path)
    model = inc.FIDInceptionV3(flavour)
    model.load_state_dict({k: v for k, v in state.items() if k in model.state_dict()}, strict=False)
    return model.eval().requires_grad_(False)


@pytest.fixture(scope="module")
def images_and_models(cifar_root):
    images = np.concatenate([cifar_uint8(cifar_root, N_IMAGES // 2),
                             cifar_uint8(cifar_root, N_IMAGES // 2, batch="data_batch_1")])
    return images, plain_model(ts_path()), inc.load_inception(ts_path(), "cpu")


def test_fast_path_is_what_load_inception_gives(images_and_models):
    _, _, fast = images_and_models
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fast.modules())
    assert fast.Conv2d_1a_3x3.conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert inc._fused_conv_relu_works()  # oneDNN's fused op is there on the CPU torch builds we support


def test_fast_features_and_fid_equal_plain(images_and_models, one_thread):
    images, plain, fast = images_and_models
    f_plain = features_from_uint8(images, plain, batch_size=N_IMAGES)
    f_fast = features_from_uint8(images, fast, batch_size=4)  # another batching, a last partial batch
    assert np.abs(f_fast - f_plain).max() <= FEATURE_ATOL and np.abs(f_plain).max() > 1
    half = N_IMAGES // 2
    with pytest.warns(UserWarning):  # 3 images ≪ 2048 features: the small-N warning, expected here
        fids = [frechet_distance(*statistics_from_features(f[:half]), *statistics_from_features(f[half:]))
                for f in (f_plain, f_fast)]
    assert fids[1] == pytest.approx(fids[0], rel=FID_RTOL) and fids[0] > 0


def test_fused_conv_relu_equals_conv_then_relu():
    """Every conv shape of the network's kinds (strided, asymmetric kernels, padding) and both layouts."""
    torch.manual_seed(0)
    for cin, cout, k, stride, pad in [(3, 8, (3, 3), 2, (0, 0)), (8, 16, (1, 7), 1, (0, 3)),
                                      (16, 8, (7, 1), 1, (3, 0)), (8, 8, (1, 1), 1, (0, 0))]:
        conv = torch.nn.Conv2d(cin, cout, k, stride=stride, padding=pad).requires_grad_(False)
        for fmt in (torch.contiguous_format, torch.channels_last):
            x = torch.randn(3, cin, 13, 13).contiguous(memory_format=fmt)
            with torch.inference_mode():
                assert torch.allclose(inc.conv_relu(conv, x), F.relu(conv(x)), rtol=1e-5, atol=1e-6)


def test_conv_relu_keeps_autograd():
    """With gradients wanted the plain ops run (the fused op has no backward)."""
    conv = torch.nn.Conv2d(4, 4, 3, padding=1)
    x = torch.randn(1, 4, 5, 5, requires_grad=True)
    inc.conv_relu(conv, x).sum().backward()
    assert x.grad is not None and conv.weight.grad is not None


def test_without_the_fused_op_the_plain_ops_run(monkeypatch):
    monkeypatch.setattr(inc, "_fused_conv_relu_works", lambda: False)
    conv = torch.nn.Conv2d(4, 4, 3, padding=1).requires_grad_(False)
    x = torch.randn(2, 4, 6, 6)
    with torch.inference_mode():
        assert torch.equal(inc.conv_relu(conv, x), F.relu(conv(x)))


def test_channels_last_resize_is_the_same_resize():
    x = torch.rand(2, 3, 32, 32)
    model = inc.FIDInceptionV3()
    assert torch.equal(model.preprocess(x), model.preprocess(x.contiguous(memory_format=torch.channels_last)))
    assert torch.equal(model.preprocess(x), 2 * F.interpolate(x, size=(299, 299), mode="bilinear") - 1)


def test_bench_fid_runs_at_toy_size(cifar_root, tmp_path, capsys, one_thread):
    """benchmarks/bench_fid.py end to end (pytorch-fid left out: it needs its own environment)."""
    import importlib.util
    import json
    import os

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "bench_fid.py")
    spec = importlib.util.spec_from_file_location("bench_fid", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "figures.json"
    bench.main(["--cifar", cifar_root, "--images", "4", "--batch-size", "2", "--repeats", "1", "--fd-dim", "48",
                "--fd-repeats", "1", "--weights", ts_path(), "--json", str(out)])
    figures = json.loads(out.read_text())
    fids = figures["extractor"]["fid"]
    assert fids["TorchScript"] == pytest.approx(fids["ours"], rel=FID_RTOL)
    assert figures["fd"]["fd"] == pytest.approx(figures["fd"]["sqrtm_fd"], rel=1e-10)
    assert "ours is" in capsys.readouterr().out
