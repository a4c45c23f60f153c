import math

import pytest
import torch
import torch.nn as nn

from tinyddpm.config import GANConfig
from tinyddpm.dcgan import (GAN, Discriminator, Generator, discriminator_loss, gan_train_step, generator_loss,
                            init_weights, instance_noise_std, make_optimizers, sample_z)
from tinyddpm.errors import UserError

SMALL = GANConfig(z_dim=16, g_channels=8, d_channels=8)  # narrow nets: fast, same structure


@pytest.mark.parametrize("size", [16, 32, 64, 128])
def test_shapes(size):
    torch.manual_seed(0)
    G, D = Generator(SMALL, size), Discriminator(SMALL, size)
    x = G(torch.randn(3, SMALL.z_dim))
    assert x.shape == (3, 3, size, size)
    assert x.min() >= -1 and x.max() <= 1
    assert D(x).shape == (3,)
    assert Generator(SMALL, size, channels=1)(torch.randn(2, SMALL.z_dim)).shape == (2, 1, size, size)


def test_paper_widths_and_layers():
    G, D = Generator(GANConfig(), 64), Discriminator(GANConfig(), 64)
    g_convs = [m for m in G.modules() if isinstance(m, nn.ConvTranspose2d)]
    assert [m.out_channels for m in g_convs] == [512, 256, 128, 64, 3]  # Radford et al., fig. 1
    assert isinstance(G.net[-1], nn.Tanh)
    # D: conv → LeakyReLU (no BatchNorm) first; BatchNorm after every later conv; no pooling, no Linear.
    assert isinstance(D.features[0], nn.Conv2d) and isinstance(D.features[1], nn.LeakyReLU)
    assert D.features[1].negative_slope == 0.2
    assert sum(isinstance(m, nn.BatchNorm2d) for m in D.modules()) == 3
    assert not any(isinstance(m, (nn.Linear, nn.MaxPool2d, nn.AvgPool2d)) for m in [*G.modules(), *D.modules()])


@pytest.mark.parametrize("size", [8, 24, 48])
def test_bad_image_size_is_user_error(size):
    with pytest.raises(UserError, match="power of two"):
        Generator(SMALL, size)
    with pytest.raises(UserError, match="power of two"):
        Discriminator(SMALL, size)


def test_init_statistics():
    torch.manual_seed(0)
    G = Generator(GANConfig(), 64)
    big = G.net[3].weight  # 512×256×4×4 = 2.1 M weights
    assert big.numel() > 1_000_000
    assert abs(big.std().item() - 0.02) < 2e-4 and abs(big.mean().item()) < 1e-4
    bn = torch.cat([m.weight for m in G.modules() if isinstance(m, nn.BatchNorm2d)])
    assert abs(bn.mean().item() - 1) < 0.005 and abs(bn.std().item() - 0.02) < 0.005
    assert all((m.bias == 0).all() for m in G.modules() if isinstance(m, nn.BatchNorm2d))
    lin = nn.Linear(1000, 1000)
    init_weights(lin)
    assert abs(lin.weight.std().item() - 0.02) < 2e-4 and (lin.bias == 0).all()


def _params(net):
    return torch.cat([p.detach().flatten().clone() for p in net.parameters()])


@pytest.mark.parametrize("cond_kind", ["none", "class"])
def test_train_step_updates_both_networks(cond_kind):
    torch.manual_seed(0)
    num = 10 if cond_kind == "class" else 0
    G = Generator(SMALL, 16, cond_kind=cond_kind, num_cond=num)
    D = Discriminator(SMALL, 16, cond_kind=cond_kind, num_cond=num)
    opt_g, opt_d = make_optimizers(G, D, SMALL)
    assert opt_g.param_groups[0]["betas"] == (0.5, 0.999) and opt_g.param_groups[0]["lr"] == 2e-4
    real = torch.rand(8, 3, 16, 16) * 2 - 1
    cond = torch.randint(0, 10, (8,)) if cond_kind == "class" else None
    g0, d0 = _params(G), _params(D)
    gen = torch.Generator().manual_seed(0)
    for step in range(2):
        out = gan_train_step(GAN(G, D, opt_g, opt_d), real, cond, SMALL, step, 100, gen)
        assert set(out) == {"d_loss", "g_loss", "d_real", "d_fake"}
        assert all(torch.is_tensor(v) and torch.isfinite(v) and not v.requires_grad for v in out.values())
        assert 0 < out["d_real"] < 1 and 0 < out["d_fake"] < 1
    assert not torch.equal(_params(G), g0) and not torch.equal(_params(D), d0)
    assert all(p.requires_grad for p in D.parameters())  # unfrozen again after the G update


def test_train_step_is_reproducible():
    def run():
        torch.manual_seed(1)
        G, D = Generator(SMALL, 16), Discriminator(SMALL, 16)
        opt_g, opt_d = make_optimizers(G, D, SMALL)
        real = torch.linspace(-1, 1, 4 * 3 * 16 * 16).reshape(4, 3, 16, 16)
        out = gan_train_step(GAN(G, D, opt_g, opt_d), real, None, SMALL, 0, 10, torch.Generator().manual_seed(5))
        return out["d_loss"], _params(G)

    (l1, p1), (l2, p2) = run(), run()
    assert torch.equal(l1, l2) and torch.equal(p1, p2)


def _bce(logit, target):  # written out: -[t log σ(l) + (1-t) log(1-σ(l))]
    s = 1 / (1 + math.exp(-logit))
    return -(target * math.log(s) + (1 - target) * math.log(1 - s))


@pytest.mark.parametrize("smoothing,real_t,fake_t", [("none", 1.0, 0.0), ("one", 0.9, 0.0), ("two", 0.9, 0.1)])
def test_discriminator_loss_label_smoothing(smoothing, real_t, fake_t):
    real, fake = [2.0, -0.5], [-1.0, 3.0]
    want = (sum(_bce(l, real_t) for l in real) / 2 + sum(_bce(l, fake_t) for l in fake) / 2)
    got = discriminator_loss(torch.tensor(real), torch.tensor(fake), GANConfig(label_smoothing=smoothing))
    assert got.item() == pytest.approx(want, rel=1e-6)


def test_generator_loss_non_saturating():
    logits = torch.tensor([-3.0, 0.0, 4.0])
    assert generator_loss(logits).item() == pytest.approx(sum(-math.log(1 / (1 + math.exp(-l))) for l in logits) / 3)
    assert generator_loss(torch.tensor([0.0])).item() == pytest.approx(math.log(2))


def test_instance_noise_schedule():
    cfg = GANConfig(instance_noise=0.2, noise_anneal_steps=0)  # 0: anneal over half of the 1000 steps
    assert instance_noise_std(cfg, 0, 1000) == pytest.approx(0.2)
    assert instance_noise_std(cfg, 250, 1000) == pytest.approx(0.1)
    assert instance_noise_std(cfg, 500, 1000) == 0 and instance_noise_std(cfg, 999, 1000) == 0
    cfg = GANConfig(instance_noise=0.2, noise_anneal_steps=100)
    assert instance_noise_std(cfg, 50, 1000) == pytest.approx(0.1) and instance_noise_std(cfg, 100, 1000) == 0
    assert instance_noise_std(GANConfig(instance_noise=0.0), 0, 1000) == 0


def _cond_nets(kind, num):
    torch.manual_seed(0)
    G = Generator(SMALL, 16, cond_kind=kind, num_cond=num).eval()  # eval: no batch coupling through BatchNorm
    D = Discriminator(SMALL, 16, cond_kind=kind, num_cond=num).eval()
    return G, D


@pytest.mark.parametrize("kind,num,y1,y2", [
    ("class", 10, torch.tensor([3, 3]), torch.tensor([3, 7])),
    ("multilabel", 24, torch.zeros(2, 24), torch.stack([torch.zeros(24), torch.eye(24)[5] + torch.eye(24)[17]])),
])
def test_conditioning_changes_outputs(kind, num, y1, y2):
    G, D = _cond_nets(kind, num)
    z = torch.randn(1, SMALL.z_dim).repeat(2, 1)  # the same z twice
    with torch.no_grad():
        a, b = G(z, y1), G(z, y2)
        assert torch.equal(a[0], b[0])  # same label, same image
        assert (a[1] - b[1]).abs().max() > 1e-4  # other label, other image
        x = a[:1].repeat(2, 1, 1, 1)
        da, db = D(x, y1), D(x, y2)
        assert da[0] == db[0] and (da[1] - db[1]).abs() > 1e-6


def test_conditioning_errors():
    G, D = _cond_nets("class", 10)
    with pytest.raises(ValueError, match="cond"):
        G(torch.randn(2, SMALL.z_dim))
    with pytest.raises(ValueError, match="cond"):
        Generator(SMALL, 16)(torch.randn(2, SMALL.z_dim), torch.tensor([1, 2]))
    with pytest.raises(UserError, match="condition kind"):
        Discriminator(SMALL, 16, cond_kind="text")
    with pytest.raises(UserError, match="num_cond"):
        Generator(SMALL, 16, cond_kind="class")


def test_sample_z_per_image_seeds():
    z8 = sample_z(8, 100)
    assert z8.shape == (8, 100)
    assert torch.equal(sample_z(3, 100), z8[:3])  # independent of the batch size
    assert torch.equal(sample_z([5, 2], 100)[1], z8[2])  # and of the other seeds in the batch
    assert not torch.equal(z8[0], z8[1])
    assert sample_z([], 100).shape == (0, 100)
