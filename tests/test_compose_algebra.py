"""The algebra of combining weight updates (compose/algebra.py): each combination's defining
property on random updates, no model needed."""
from __future__ import annotations

import math

import pytest
import torch

from peftlab.compose import algebra
from peftlab.compose.algebra import LowRank
from peftlab.errors import ConfigError


def update(out=12, inp=10, r=3, seed=0) -> LowRank:
    g = torch.Generator().manual_seed(seed)
    return LowRank(torch.randn(out, r, generator=g, dtype=torch.float64),
                   torch.randn(r, inp, generator=g, dtype=torch.float64))


def close(a, b, atol=1e-10):
    torch.testing.assert_close(a, b, rtol=0, atol=atol)


def test_linear_is_exactly_the_weighted_sum_of_the_updates():
    parts = [update(seed=i, r=2 + i) for i in range(3)]
    for weights in ([1.0, 1.0, 1.0], [1.0, -1.0, 0.5], [0.3, 0.0, -2.0]):
        summed = algebra.linear(parts, weights)
        close(summed.dense(), sum(w * p.dense() for w, p in zip(weights, parts)))
        assert summed.rank == sum(p.rank for p in parts)  # cat: nothing lost, ranks add


def test_an_update_minus_itself_is_nothing():
    u = update()
    assert algebra.compress(algebra.linear([u, u], [1.0, -1.0]))[0].dense().abs().max() < 1e-12


def test_compress_is_exact_at_full_rank_and_the_best_rank_k_below_it():
    summed = algebra.linear([update(seed=1, r=4), update(seed=2, r=4)], [1.0, 0.7])
    dense = summed.dense()
    exact, dropped = algebra.compress(summed)
    close(exact.dense(), dense)
    assert exact.rank == 8 and dropped == pytest.approx(0.0, abs=1e-12)
    singular = torch.linalg.svdvals(dense)
    for k in (1, 3, 5):
        approx, dropped = algebra.compress(summed, rank=k)
        assert approx.rank == k
        # Eckart-Young: the error of the best rank-k approximation is the dropped singular values
        assert torch.linalg.norm(dense - approx.dense()) == pytest.approx(float(singular[k:].norm()), rel=1e-9)
        assert dropped == pytest.approx(float((singular[k:] ** 2).sum() / (singular ** 2).sum()), rel=1e-9)


def test_compress_drops_the_directions_a_rank_deficient_sum_does_not_have():
    u = update(r=3)
    twice, dropped = algebra.compress(algebra.linear([u, u], [1.0, 1.0]))
    assert twice.rank == 3 and dropped == pytest.approx(0.0, abs=1e-12)
    close(twice.dense(), 2 * u.dense())


def test_a_float32_update_factorizes_at_its_numerical_rank():
    """fp32 rounding leaves singular values near 1e-7 of the largest where the true ones are 0;
    the rank test's threshold follows the dtype, so a rank-3 update stays rank 3."""
    dense = update(out=64, inp=48, r=3).dense().float()
    low, dropped = algebra.factorize(dense)
    assert low.rank == 3 and dropped < 1e-10
    torch.testing.assert_close(low.dense(), dense, rtol=0, atol=1e-5)


def test_ties_at_full_density_over_agreeing_updates_is_their_mean():
    a = torch.rand(6, 5, dtype=torch.float64) + 0.1
    b = torch.rand(6, 5, dtype=torch.float64) + 0.1
    close(algebra.ties([a, b], [1.0, 1.0], density=1.0), (a + b) / 2)
    close(algebra.ties([-a, -b], [1.0, 1.0], density=1.0), -(a + b) / 2)


def test_ties_keeps_the_elected_sign_and_averages_only_the_agreeing_values():
    a = torch.tensor([[3.0, -1.0, 2.0]], dtype=torch.float64)
    b = torch.tensor([[1.0, 4.0, -1.0]], dtype=torch.float64)
    # column 0: both positive -> mean 2; column 1: -1 + 4 > 0 -> only b's 4; column 2: 2 - 1 > 0 -> only a's 2
    close(algebra.ties([a, b], [1.0, 1.0], density=1.0), torch.tensor([[2.0, 4.0, 2.0]], dtype=torch.float64))
    # density 1/3 keeps each update's single largest entry: a's 3 (col 0), b's 4 (col 1)
    close(algebra.ties([a, b], [1.0, 1.0], density=1 / 3), torch.tensor([[3.0, 4.0, 0.0]], dtype=torch.float64))


def test_magnitude_prune_keeps_exactly_floor_density_n_entries():
    delta = torch.randn(7, 9, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    for density in (0.1, 0.25, 0.5, 0.99):
        kept = algebra.magnitude_prune([delta], [1.0], density)
        assert int((kept != 0).sum()) == math.floor(density * delta.numel())
        survivors = kept[kept != 0].abs()
        assert survivors.min() >= delta.abs()[kept == 0].max()  # the largest ones


def test_dare_is_deterministic_per_seed_and_unbiased():
    a = torch.randn(8, 8, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    b = torch.randn(8, 8, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    close(algebra.dare_linear([a, b], [1.0, 0.5], 0.3, seed=7), algebra.dare_linear([a, b], [1.0, 0.5], 0.3, seed=7))
    assert not torch.equal(algebra.dare_linear([a, b], [1.0, 0.5], 0.3, seed=7),
                           algebra.dare_linear([a, b], [1.0, 0.5], 0.3, seed=8))
    mean = sum(algebra.dare_linear([a, b], [1.0, 0.5], 0.3, seed=s) for s in range(2000)) / 2000
    target = a + 0.5 * b
    # each entry is a mean of 2000 draws of a rescaled Bernoulli: its error is a few standard errors at most
    spread = ((a ** 2 + 0.25 * b ** 2) * (1 / 0.3 - 1) / 2000).sqrt()
    assert ((mean - target).abs() <= 5 * spread + 1e-12).all()
    # dare_ties: the same drop, then TIES's election; at density 1 it is TIES itself
    close(algebra.dare_ties([a, b], [1.0, 1.0], 1.0, seed=0), algebra.ties([a, b], [1.0, 1.0], 1.0))


@pytest.mark.parametrize("call,message", [
    (lambda: algebra.ties([torch.ones(2, 2)], [1.0], density=0.0), "density must be in"),
    (lambda: algebra.dare_linear([torch.ones(2, 2)], [1.0], density=1.5, seed=0), "density must be in"),
    (lambda: algebra.linear([update(), update()], [1.0]), "2 updates but 1 weights"),
    (lambda: algebra.linear([update(out=4), update(out=5)], [1.0, 1.0]), "shapes differ"),
    (lambda: algebra.compress(update(), rank=0), "rank must be a positive integer"),
])
def test_bad_arguments_are_clear_errors(call, message):
    with pytest.raises(ConfigError, match=message):
        call()
