"""NoProp-DT's math (strategies.noprop.diffusion) and one block (strategies.noprop.denoiser),
checked against independent derivations: plain Gaussian conditioning, telescoping sums,
torch's own KL, and sampling."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from orchestrator.data.spec import InputSpec
from orchestrator.errors import ConfigError
from strategies.config import MLPConfig
from strategies.noprop import diffusion
from strategies.noprop.config import NoPropConfig
from strategies.noprop.denoiser import (
    Denoiser,
    DenoiserSpec,
    DenoisingBlock,
    check_denoiser,
    initial_embedding,
)


def test_the_cosine_schedule_starts_at_the_prior_and_rises_below_one():
    for blocks in (1, 2, 10, 50):
        alpha_bar = diffusion.cosine_alpha_bar(blocks)
        assert alpha_bar.shape == (blocks + 1,)
        assert alpha_bar[0] == 0.0
        assert torch.all(alpha_bar[1:] > alpha_bar[:-1])
        assert alpha_bar[-1] < 1.0
    with pytest.raises(ValueError, match="blocks must be >= 1"):
        diffusion.cosine_alpha_bar(0)


def test_snr_is_zero_at_the_prior_and_rises():
    alpha_bar = diffusion.cosine_alpha_bar(10)
    ratio = diffusion.snr(alpha_bar)
    assert ratio[0] == 0.0
    assert torch.all(ratio[1:] > ratio[:-1])
    assert torch.isclose(ratio[5], alpha_bar[5] / (1 - alpha_bar[5]))


def test_the_denoising_weights_are_eq8_summands_and_telescope():
    alpha_bar = torch.tensor([0.0, 0.2, 0.5, 0.8], dtype=torch.float64)
    snr = [a / (1 - a) for a in alpha_bar.tolist()]
    weights = diffusion.denoising_weights(alpha_bar, eta=0.1)
    by_hand = [3 / 2 * 0.1 * (snr[t] - snr[t - 1]) for t in (1, 2, 3)]
    assert torch.allclose(weights, torch.tensor(by_hand, dtype=torch.float64))
    # The mean over blocks (Eq. 8's expectation over t) telescopes to η/2 · SNR(T).
    assert math.isclose(float(weights.mean()), 0.1 / 2 * snr[-1])
    assert torch.all(diffusion.denoising_weights(diffusion.cosine_alpha_bar(10), 0.1) > 0)


def conditioned(alpha_bar: torch.Tensor, t: int) -> tuple[float, float, float]:
    """(a_t, b_t, c_t) by conditioning the joint Gaussian of (z_t, z_{t-1}) given u (per
    dimension): z_t ~ N(√ᾱ_t u, 1 - ᾱ_t), z_{t-1} = √α z_t + √(1-α) ε, α = ᾱ_{t-1}/ᾱ_t."""
    now, before = float(alpha_bar[t]), float(alpha_bar[t - 1])
    alpha = before / now
    var_now, var_before = 1 - now, alpha * (1 - now) + (1 - alpha)
    cov = math.sqrt(alpha) * var_now
    b = cov / var_before
    a = math.sqrt(now) - b * math.sqrt(alpha) * math.sqrt(now)
    c = var_now - cov**2 / var_before
    return a, b, c


@settings(max_examples=100, deadline=None)
@given(st.lists(st.floats(0.01, 0.99), min_size=1, max_size=12, unique=True))
def test_the_posterior_coefficients_are_gaussian_conditioning(values):
    alpha_bar = torch.tensor([0.0, *sorted(values)], dtype=torch.float64)
    a, b, c = diffusion.posterior_coefficients(alpha_bar)
    for t in range(1, alpha_bar.numel()):
        expected = conditioned(alpha_bar, t)
        got = (float(a[t - 1]), float(b[t - 1]), float(c[t - 1]))
        assert got == pytest.approx(expected, rel=1e-9, abs=1e-12)


def test_the_first_step_draws_from_q_itself():
    alpha_bar = diffusion.cosine_alpha_bar(10)
    a, b, c = diffusion.posterior_coefficients(alpha_bar)
    assert math.isclose(float(a[0]), math.sqrt(float(alpha_bar[1])))
    assert float(b[0]) == 0.0
    assert math.isclose(float(c[0]), 1 - float(alpha_bar[1]))


def test_the_posterior_coefficients_match_samples():
    """Regress z_t on z_{t-1} over noised samples (u fixed): slope b, intercept a·u,
    residual variance c."""
    generator = torch.Generator().manual_seed(0)
    alpha_bar = diffusion.cosine_alpha_bar(10)
    a, b, c = diffusion.posterior_coefficients(alpha_bar)
    u, n = 0.7, 400_000
    for t in (2, 5, 9):
        now, alpha = float(alpha_bar[t]), float(alpha_bar[t - 1] / alpha_bar[t])
        z_now = math.sqrt(now) * u + math.sqrt(1 - now) * torch.randn(n, generator=generator)
        noise = torch.randn(n, generator=generator)
        z_before = math.sqrt(alpha) * z_now + math.sqrt(1 - alpha) * noise
        zc, yc = z_before - z_before.mean(), z_now - z_now.mean()
        slope = float((zc * yc).sum() / (zc * zc).sum())
        intercept = float(z_now.mean() - slope * z_before.mean())
        residual = float((yc - slope * zc).var())
        assert slope == pytest.approx(float(b[t - 1]), abs=0.01)
        assert intercept == pytest.approx(float(a[t - 1]) * u, abs=0.01)
        assert residual == pytest.approx(float(c[t - 1]), rel=0.02, abs=1e-4)


def test_sample_q_has_the_marginal_moments():
    generator = torch.Generator().manual_seed(1)
    u = torch.tensor([[2.0, -1.0]]).expand(200_000, 2)
    z = diffusion.sample_q(u, 0.36, generator)
    assert torch.allclose(z.mean(dim=0), torch.tensor([1.2, -0.6]), atol=0.01)
    assert torch.allclose(z.var(dim=0), torch.tensor([0.64, 0.64]), atol=0.01)


def test_the_chain_with_perfect_denoisers_keeps_q_and_lands_at_the_label():
    """û = u_y at every block: each z_t is distributed as q(z_t | y), and z_T sits next to
    u_y, nearer to it than to any other class's embedding."""
    blocks, classes = 10, 10
    alpha_bar = diffusion.cosine_alpha_bar(blocks)
    embedding = torch.eye(classes, dtype=torch.float64)
    y = torch.arange(classes).repeat(20_000)
    u = embedding[y]
    generator = torch.Generator().manual_seed(2)
    z0 = torch.randn(u.shape, generator=generator, dtype=torch.float64)
    for steps in (1, 4, blocks):
        z = diffusion.infer_chain([lambda z: u] * steps, alpha_bar[: steps + 1], z0, generator)
        now = float(alpha_bar[steps])
        residual = z - math.sqrt(now) * u
        along_label = float((residual * u).sum(dim=1).mean())  # the mean where u_y is
        assert along_label == pytest.approx(0.0, abs=0.01)
        assert float(residual.var()) == pytest.approx(1 - now, rel=0.01, abs=1e-4)
    nearest = torch.cdist(z, embedding).argmin(dim=1)
    assert torch.equal(nearest, y)


def test_the_losses():
    u = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    u_hat = torch.tensor([[0.5, 0.5], [0.0, 1.0]])
    assert float(diffusion.denoising_loss(u_hat, u, 4.0)) == pytest.approx(4.0 * 0.5 / 2)
    assert float(diffusion.kl_to_prior(u, 0.0)) == 0.0
    q = torch.distributions.Normal(math.sqrt(0.3) * u, math.sqrt(0.7))
    prior = torch.distributions.Normal(torch.zeros(2), torch.ones(2))
    expected = torch.distributions.kl_divergence(q, prior).sum(dim=1).mean()
    assert float(diffusion.kl_to_prior(u, 0.3)) == pytest.approx(float(expected), rel=1e-6)
    classifier = torch.nn.Linear(2, 2)
    loss, correct = diffusion.classifier_loss(classifier, u, torch.tensor([0, 1]), 0.99)
    assert loss.shape == () and 0 <= int(correct) <= 2


@pytest.mark.parametrize(
    "spec",
    [
        InputSpec("image", (1, 8, 8), 10),
        InputSpec("image", (3, 32, 32), 10),
        InputSpec("table", (64,), 3),
    ],
    ids=["digits-images", "cifar-shaped", "table"],
)
def test_a_denoiser_predicts_a_point_in_the_embeddings_hull(spec):
    net = Denoiser(spec, [32], embedding_dim=spec.num_classes, width=16, dropout=0.2)
    x, z = torch.randn(4, *spec.shape), torch.randn(4, spec.num_classes)
    logits = net(x, z)
    assert logits.shape == (4, spec.num_classes)
    u_hat = torch.softmax(logits, dim=1) @ torch.eye(spec.num_classes)
    assert torch.allclose(u_hat.sum(dim=1), torch.ones(4)) and torch.all(u_hat >= 0)


def test_images_too_small_for_the_papers_cnn_are_refused():
    with pytest.raises(ConfigError, match="at least 8x8"):
        check_denoiser(NoPropConfig(), MLPConfig(), InputSpec("image", (1, 4, 4), 10))


def block(t: int, embedding: str = "onehot", blocks: int = 2) -> DenoisingBlock:
    config = NoPropConfig(blocks=blocks, width=16, embedding=embedding, embedding_dim=None)
    spec = DenoiserSpec(t, config, MLPConfig(hidden=[16]), InputSpec("table", (4,), 3), seed=0)
    return DenoisingBlock(spec)


def test_only_the_last_block_holds_the_classifier_and_trains_a_learned_embedding():
    first, last = block(1, "learned"), block(2, "learned")
    assert first.net.classifier is None and last.net.classifier is not None
    names = {n for n, _ in last.net.named_parameters()}
    assert "embedding" in names and "embedding" not in {n for n, _ in first.net.named_parameters()}
    assert torch.equal(first.net.embedding, last.net.embedding)  # one seed, one W_Embed
    assert torch.equal(block(1).net.embedding, initial_embedding("onehot", 3, 3, 0))


def test_a_block_learns_to_denoise_its_own_samples():
    torch.manual_seed(0)
    learner = block(2)
    x = torch.randn(64, 4)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
    before = learner.loss(x, y)[1].mse
    for _ in range(150):
        learner.train_step(x, y)
    after = learner.loss(x, y)[1].mse
    assert after < 0.5 * before
    z = learner.denoise(x, torch.randn(64, 3), torch.Generator().manual_seed(0))
    assert z.shape == (64, 3)
