"""The HQ-SAM point-sampled BCE + Dice loss, on cases whose values are known by hand."""

import math

import pytest
import torch

from finesam.training.loss import bce_dice_loss, point_sample, point_sampled_loss, uncertain_points


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_point_sample_reads_pixel_centres_exactly():
    values = torch.rand(2, 3, 3, 5, generator=seeded(0))  # not square: (x, y) order matters
    rows, cols = torch.meshgrid(torch.arange(3), torch.arange(5), indexing="ij")
    points = torch.stack([(cols + 0.5) / 5, (rows + 0.5) / 3], dim=-1).reshape(1, 15, 2).expand(2, -1, -1)
    read = point_sample(values, points)
    assert read.shape == (2, 3, 15)
    torch.testing.assert_close(read, values.reshape(2, 3, 15), rtol=0, atol=1e-6)


def test_point_sample_is_bilinear_between_centres():
    values = torch.tensor([[[[0.0, 4.0]]]])
    # a quarter of the way from the first centre (x = 0.25) to the second (x = 0.75)
    assert point_sample(values, torch.tensor([[[0.375, 0.5]]])).item() == pytest.approx(1.0)


def test_confident_correct_logits_give_almost_no_loss():
    targets = torch.stack([torch.ones(1, 32, 32), torch.zeros(1, 32, 32)])
    logits = (targets * 2 - 1) * 20
    loss = point_sampled_loss(logits, targets, seeded(0), num_points=500)
    assert loss.total.item() < 1e-3
    assert bce_dice_loss(logits, targets).total.item() < 1e-3


def test_zero_logits():
    targets = torch.stack([torch.ones(1, 16, 16), torch.zeros(1, 16, 16)])
    loss = point_sampled_loss(torch.zeros(2, 1, 8, 8), targets, seeded(0), num_points=100)
    assert loss.bce.item() == pytest.approx(math.log(2), abs=1e-6)  # BCE(0, t) = ln 2 for any t
    # every p = 1/2 over 100 points: all-ones target 1 - (100 + 1) / (50 + 100 + 1), all-zeros 1 - 1 / (50 + 1)
    expected_dice = ((1 - 101 / 151) + (1 - 1 / 51)) / 2
    assert loss.dice.item() == pytest.approx(expected_dice, abs=1e-6)
    assert loss.total.item() == pytest.approx(math.log(2) + expected_dice, abs=1e-6)


@pytest.mark.parametrize("targets", [[[1.0, 0.0]], [[1.0, 1.0, 0.0, 0.0], [1.0, 1.0, 0.0, 0.0]]])
def test_dense_loss_by_hand(targets):
    logits = torch.tensor([[[[0.0, math.log(3)]]]])  # p = 1/2, 3/4
    loss = bce_dice_loss(logits, torch.tensor([[targets]]))  # a 2x4 target is read at the logits' centres: 1, 0
    assert loss.bce.item() == pytest.approx((math.log(2) + math.log(4)) / 2)
    assert loss.dice.item() == pytest.approx(1 - (2 * 0.5 + 1) / (0.5 + 0.75 + 1 + 1))


def test_importance_sampling_picks_the_uncertain_stripe():
    logits = torch.full((1, 1, 32, 32), 10.0)
    logits[..., 8:24] = 0.0  # columns 8..23: logits read for x in [8.5/32, 23.5/32] are exactly 0
    num_points = 1000
    points = uncertain_points(logits, seeded(0), num_points=num_points)
    assert points.shape == (1, num_points, 2)
    inside = (points[0, :, 0] >= 8.5 / 32) & (points[0, :, 0] <= 23.5 / 32)
    # 3000 candidates, about 47% of them in the stripe: the 750 most uncertain all lie there
    assert inside[:750].all()
    assert inside.float().mean().item() >= 0.75
    assert not inside[750:].all()  # the rest are uniform
    # y is not constrained
    assert points[0, :750, 1].min().item() < 0.1 and points[0, :750, 1].max().item() > 0.9


def test_same_generator_seed_same_loss():
    logits = torch.randn(3, 1, 16, 16, generator=seeded(1))
    targets = (torch.rand(3, 1, 64, 64, generator=seeded(2)) > 0.5).float()
    first = point_sampled_loss(logits, targets, seeded(7), num_points=200)
    again = point_sampled_loss(logits, targets, seeded(7), num_points=200)
    other = point_sampled_loss(logits, targets, seeded(8), num_points=200)
    assert torch.equal(first.total, again.total) and torch.equal(first.bce, again.bce)
    assert first.total != other.total


def test_one_generator_per_mask_makes_masks_independent():
    logits = torch.randn(2, 1, 16, 16, generator=seeded(1))
    targets = (torch.rand(2, 1, 16, 16, generator=seeded(2)) > 0.5).float()
    together = point_sampled_loss(logits, targets, [seeded(10), seeded(11)], num_points=300)
    alone = [
        point_sampled_loss(logits[i : i + 1], targets[i : i + 1], [seeded(10 + i)], num_points=300) for i in (0, 1)
    ]
    torch.testing.assert_close(together.bce, (alone[0].bce + alone[1].bce) / 2)
    torch.testing.assert_close(together.dice, (alone[0].dice + alone[1].dice) / 2)


def test_global_rng_is_not_used():
    logits, targets = torch.randn(1, 1, 8, 8), torch.ones(1, 1, 8, 8)
    state = torch.get_rng_state()
    point_sampled_loss(logits, targets, seeded(0), num_points=50)
    point_sampled_loss(logits, targets, None, num_points=50)
    assert torch.equal(torch.get_rng_state(), state)


def test_gradient_reaches_the_logits_only():
    logits = torch.randn(2, 1, 8, 8, generator=seeded(3), requires_grad=True)
    targets = (torch.rand(2, 1, 8, 8, generator=seeded(4)) > 0.5).float().requires_grad_()
    point_sampled_loss(logits, targets, seeded(0), num_points=64).total.backward()
    assert logits.grad is not None and logits.grad.abs().sum().item() > 0
    assert targets.grad is None


def test_more_points_than_pixels():
    loss = point_sampled_loss(torch.randn(1, 1, 2, 2), torch.ones(1, 1, 2, 2), seeded(0), num_points=5000)
    assert torch.isfinite(loss.total)
    assert len(uncertain_points(torch.randn(1, 1, 2, 2), seeded(0), num_points=5000)[0]) == 5000


def test_bad_inputs_are_refused():
    logits, targets = torch.zeros(2, 1, 8, 8), torch.zeros(2, 1, 16, 16)
    cases = [
        (torch.zeros(2, 8, 8), targets, "logits must be"),
        (torch.zeros(2, 3, 8, 8), targets, "logits must be"),
        (logits, torch.zeros(3, 1, 16, 16), "targets must be"),
        (logits, torch.zeros(2, 16, 16), "targets must be"),
        (logits, torch.full((2, 1, 16, 16), 255.0), r"\[0, 1\]"),
        (logits, torch.zeros(2, 1, 16, 16, dtype=torch.long), "float"),
    ]
    for bad_logits, bad_targets, message in cases:
        with pytest.raises(ValueError, match=message):
            point_sampled_loss(bad_logits, bad_targets, seeded(0), num_points=10)
        with pytest.raises(ValueError, match=message):
            bce_dice_loss(bad_logits, bad_targets)
    with pytest.raises(ValueError, match="2 masks"):
        point_sampled_loss(logits, targets, [seeded(0)], num_points=10)
    with pytest.raises(ValueError, match="num_points"):
        point_sampled_loss(logits, targets, seeded(0), num_points=0)
    with pytest.raises(ValueError, match="oversample_ratio"):
        point_sampled_loss(logits, targets, seeded(0), num_points=10, oversample_ratio=0.5)
    with pytest.raises(ValueError, match="importance_sample_ratio"):
        point_sampled_loss(logits, targets, seeded(0), num_points=10, importance_sample_ratio=1.5)
