"""Group advantages (GRPO / Dr.GRPO), FADE's focal advantage and its controller.

Guards: group_advantages vs group_advantages_ref (regular groups, both scales, groups of one) and vs a
per-group loop (ragged, unordered ids); the FADE formula on hand-worked groups (all-correct / all-wrong give
0); alpha = delta = 1 equals Dr.GRPO; the controller's alpha/delta trajectories against a closed-form EMA
(both conventions), clipping at every bound, state_dict round trip; sign_ratio; bad input.
"""
import math

import numpy as np
import pytest
import torch

from gxpo_kernels.advantages import FADEController, fade_advantages, group_advantages, group_stats, sign_ratio
from gxpo_kernels.ops.grpo.reference import group_advantages_ref


@pytest.mark.parametrize("scale", ["std", "none"])
@pytest.mark.parametrize("G", [1, 4, 5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_group_advantages_vs_ref(scale, G, dtype):
    rewards = torch.randn(6 * G).to(dtype)
    rewards[:G] = 1.0                          # a constant group: std 0 -> advantage 0 (eps keeps it finite)
    got = group_advantages(rewards, group_size=G, scale=scale)
    want = group_advantages_ref(rewards, G, scale=scale)
    assert got.dtype == dtype and got.shape == rewards.shape
    torch.testing.assert_close(got.double(), want, rtol=1e-6 if dtype == torch.float32 else 1e-12, atol=1e-6)
    # the (num_prompts, G) layout needs no group_size
    torch.testing.assert_close(group_advantages(rewards.view(6, G), scale=scale), got.view(6, G))


@pytest.mark.parametrize("scale", ["std", "none"])
def test_group_advantages_ragged(scale):
    rewards = torch.rand(11)
    ids = torch.tensor([7, 3, 7, 3, 3, -2, 7, 9, 9, 3, 7])   # interleaved, non-contiguous ids, one singleton
    got = group_advantages(rewards, group_ids=ids, scale=scale)
    want = torch.empty(11, dtype=torch.float64)
    for g in ids.unique():
        sel = ids == g
        want[sel] = group_advantages_ref(rewards[sel], int(sel.sum()), scale=scale)
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-6)
    assert got[5] == 0                          # group of one
    st = group_stats(rewards, group_ids=ids)
    assert st.count.tolist() == [int((ids == i).sum()) for i in ids]


@pytest.mark.parametrize("eps", [0.0, 1e-6])
def test_equal_rewards_get_exactly_zero_advantage(eps):
    """A group whose rewards are all equal gets 0, whatever the value: a plain float mean is not exact, and its
    ~1e-17 std made (R - mean) / std of order 1 (e.g. seven rewards of 0.7 at eps=0 gave -0.93 each)."""
    g = torch.Generator().manual_seed(0)
    for G in (2, 3, 5, 7, 16):
        vals = torch.randn(40, generator=g, dtype=torch.float64) * 10 ** torch.randint(-3, 8, (40,), generator=g)
        r = vals[:, None].expand(40, G).contiguous()          # 40 constant groups
        r[::2, 0] += 1.0                                       # half of them not constant
        ids = torch.arange(40).repeat_interleave(G)
        for adv in (group_advantages(r, eps=eps), group_advantages(r.reshape(-1), group_ids=ids, eps=eps).view(40, G),
                    group_advantages(r, scale="none")):
            assert bool((adv[1::2] == 0).all())
            assert bool((adv[::2].abs().sum(-1) > 0).all())
        assert group_stats(r).std.view(40, G)[1::2].eq(0).all()


def _exact_advantages(r, ids, scale, eps):
    """Exact rational reference (fractions.Fraction of the float64 inputs), rounded once at the end."""
    from fractions import Fraction
    out = [0.0] * len(r)
    for g in set(ids):
        idx = [i for i, x in enumerate(ids) if x == g]
        v = [Fraction(r[i]) for i in idx]
        mean = sum(v) / len(v)
        std = math.sqrt(sum((x - mean) ** 2 for x in v) / (len(v) - 1)) if len(v) > 1 else 0.0
        for i, x in zip(idx, v):
            if len(v) > 1 and (scale == "none" or std + eps > 0):
                out[i] = float(x - mean) if scale == "none" else float(x - mean) / (std + eps)
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("eps", [0.0, 1e-6])
def test_near_constant_groups_against_exact_arithmetic(eps):
    """Groups whose spread is a few ulps of their magnitude: the advantage's numerator is r - mean with the mean
    rounded to the rewards' magnitude, which lost the spread (float64 [0.7, 0.7, 0.7 + 1 ulp] at eps=0 gave
    [0, 0, 1.73]; exact: [-0.577, -0.577, 1.155]). Ragged and regular layouts, against exact rationals."""
    up = math.nextafter(0.7, 1.0)
    got = group_advantages(torch.tensor([0.7, 0.7, up], dtype=torch.float64), group_size=3, eps=0.0)
    torch.testing.assert_close(got, torch.tensor([-1, -1, 2], dtype=torch.float64) / math.sqrt(3), rtol=1e-12, atol=0)
    g = torch.Generator().manual_seed(3)
    for _ in range(40):
        n = int(torch.randint(2, 24, (1,), generator=g))
        ids = torch.randint(0, 4, (n,), generator=g)
        base = float(10.0 ** torch.randint(-2, 8, (1,), generator=g))
        r = base + torch.randint(-3, 4, (n,), generator=g).double() * base * 2.0 ** -50   # a few ulps apart
        for scale in ("std", "none"):
            want = _exact_advantages(r.tolist(), ids.tolist(), scale, eps)
            torch.testing.assert_close(group_advantages(r, group_ids=ids, scale=scale, eps=eps), want,
                                       rtol=1e-9, atol=1e-300)
        reg = r[: n - n % 2]
        want = _exact_advantages(reg.tolist(), [i // 2 for i in range(reg.numel())], "std", eps)
        torch.testing.assert_close(group_advantages(reg, group_size=2, eps=eps), want, rtol=1e-9, atol=1e-300)


def test_fade_hand_worked():
    # G=4: [1,0,0,1] rbar=.5 -> factor (1-.5)^(2-1)=.5; + : .5*.5=.25; - : .5*(-.5)/.5=-.5 ; all-1 / all-0 -> 0
    r = torch.tensor([1, 0, 0, 1, 1, 1, 1, 1, 0, 0, 0, 0], dtype=torch.float32)
    got = fade_advantages(r, group_size=4, alpha=2.0, delta=0.5)
    torch.testing.assert_close(got, torch.tensor([.25, -.5, -.5, .25] + [0.0] * 8))
    # G=3, [1,0,0]: rbar=1/3, factor (2/3)^2=4/9; +: 4/9*2/3=8/27; -: 4/9*(-1/3)/0.5=-8/27
    got = fade_advantages(torch.tensor([1.0, 0.0, 0.0]), group_size=3, alpha=3.0, delta=0.5)
    torch.testing.assert_close(got, torch.tensor([8 / 27, -8 / 27, -8 / 27]))
    # integer / bool rewards are accepted and give float32
    got_int = fade_advantages(torch.tensor([[1, 0, 0]]), alpha=3.0, delta=0.5)
    assert got_int.dtype == torch.float32 and got_int.shape == (1, 3)
    torch.testing.assert_close(got_int.flatten(), got)
    torch.testing.assert_close(fade_advantages(torch.tensor([True, False, False]), 3, alpha=3.0, delta=0.5), got)


def test_fade_ragged_and_reduces_to_dr_grpo():
    rewards = torch.randint(0, 2, (13,)).float()
    ids = torch.tensor([0, 1, 0, 2, 1, 0, 2, 2, 1, 3, 0, 1, 4])
    alpha, delta = 2.3, 0.6
    got = fade_advantages(rewards, group_ids=ids, alpha=alpha, delta=delta)
    for g in ids.unique():
        sel = ids == g
        r = rewards[sel].double()
        rbar = r.mean()
        want = (1 - rbar) ** (alpha - 1) * (r - rbar)
        want = torch.where(r < rbar, want / delta, want)
        torch.testing.assert_close(got[sel].double(), want, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(fade_advantages(rewards, group_ids=ids),
                               group_advantages(rewards, group_ids=ids, scale="none"))
    reg = torch.randint(0, 2, (4, 6)).float()
    torch.testing.assert_close(fade_advantages(reg), group_advantages(reg, scale="none"))


def _closed_form_ema(x0, xs, decay):
    """x_k = decay^k x0 + (1 - decay) sum_j decay^(k-j) xs_j: the EMA unrolled, independent of the loop."""
    k = len(xs)
    return decay ** k * x0 + (1 - decay) * sum(decay ** (k - 1 - j) * x for j, x in enumerate(xs))


@pytest.mark.parametrize("convention", ["slow", "fast"])
def test_controller_trajectory(convention):
    ema = 0.3 if convention == "slow" else 0.6                      # large enough that the trajectory moves
    rewards = [0.2, 0.1, 0.5, 0.8, 0.05, 0.9, 0.3]
    entropies = [2.0, 1.6, 1.9, 0.4, 0.3, 2.5, 1.2]
    c = FADEController(alpha_max=2.5, ema=ema, ema_convention=convention)
    assert c.alpha == pytest.approx(1.5) and c.delta == 1.0      # p0 = 0.5 before any update
    decay = 1 - ema if convention == "slow" else ema
    target = 0.5 * entropies[0]
    for k in range(1, len(rewards) + 1):
        out = c.update(torch.tensor(rewards[k - 1], dtype=torch.float64), entropies[k - 1])  # 0-d tensors ok
        p = _closed_form_ema(0.5, rewards[:k], decay)
        h = _closed_form_ema(entropies[0], entropies[1:k], decay)
        assert out["p_hat"] == pytest.approx(p, rel=1e-12)
        assert out["h_hat"] == pytest.approx(h, rel=1e-12)
        assert out["alpha"] == pytest.approx(min(max(1.5 * (1 - p) / p, 1.0), 2.5), rel=1e-12)
        assert out["delta"] == pytest.approx(min(max(1 + h - target, 0.3), 1.0), rel=1e-12)
        assert (c.alpha, c.delta) == (out["alpha"], out["delta"])
    assert c.target_entropy == target and c.steps == len(rewards)


def test_controller_clips():
    c = FADEController(alpha_max=3.0, target_entropy=1.0, ema=0.5)
    for _ in range(3):
        out = c.update(0.0, 5.0)                   # all wrong: p_hat -> 0.0625, raw alpha 22.5 -> alpha_max
    assert out["alpha"] == 3.0 and out["delta"] == 1.0     # 1 + 5 - 1 = 5 -> clipped to 1
    for _ in range(8):
        out = c.update(1.0, 0.0)                   # all right: raw alpha < 1 -> 1; 1 + ~0.02 - 1 -> ~0.02 -> 0.3
    assert out["alpha"] == 1.0 and out["delta"] == 0.3
    assert out["p_hat"] > 0.6 and 0 < out["h_hat"] < 0.3
    # p_hat = 0 exactly (p0 = 0) must not divide by zero
    assert FADEController(p0=0.0).alpha == 3.0
    # default target entropy is half the first observed entropy, 1 + H - H/2 clipped to 1
    c = FADEController()
    assert c.update(0.5, 1.0)["delta"] == 1.0 and c.target_entropy == 0.5


def test_controller_state_dict_round_trip():
    a = FADEController(alpha_max=2.0, ema=0.1, ema_convention="fast")
    for r, h in [(0.3, 1.5), (0.6, 1.1), (0.1, 0.9)]:
        a.update(r, h)
    b = FADEController()
    b.load_state_dict(a.state_dict())
    assert b.state_dict() == a.state_dict()
    for r, h in [(0.4, 0.7), (0.9, 0.2)]:
        assert a.update(r, h) == b.update(r, h)
    with pytest.raises(ValueError, match="missing"):
        b.load_state_dict({"p_hat": 0.5})


def test_sign_ratio():
    a = torch.tensor([1.0, 2.0, -0.5, -1.5, 4.0])
    assert float(sign_ratio(a)) == pytest.approx(7.0 / 2.0)
    m = torch.tensor([True, True, True, True, False])
    assert float(sign_ratio(a, m)) == pytest.approx(3.0 / 2.0)
    assert math.isinf(float(sign_ratio(torch.tensor([1.0, 0.0]))))
    assert float(sign_ratio(a, m.float())) == float(sign_ratio(a, m.long())) == pytest.approx(3.0 / 2.0)
    with pytest.raises(ValueError, match="0/1"):       # a weight mask was read as mask.bool(): 0.5 counted fully
        sign_ratio(a, m * 0.5)
    with pytest.raises(ValueError, match="mask"):
        sign_ratio(a, m.to("meta"))
    with pytest.raises(ValueError, match="mask"):
        sign_ratio(a, m[:4])


def test_group_size_follows_the_scalar_rule():
    """numpy and 0-d tensor integers are accepted like every other scalar argument (they were refused)."""
    r = torch.rand(12)
    want = group_advantages(r, group_size=4)
    for g in (np.int64(4), torch.tensor(4), 4.0):
        assert torch.equal(group_advantages(r, group_size=g), want)
        assert torch.equal(fade_advantages((r > 0.5).float(), group_size=g),
                           fade_advantages((r > 0.5).float(), group_size=4))
    with pytest.raises(TypeError, match="group_size"):
        group_advantages(r, group_size=True)
    with pytest.raises(TypeError, match="group_size"):
        group_advantages(r, group_size=2.5)


def test_bad_input():
    with pytest.raises(ValueError, match="binary"):
        fade_advantages(torch.tensor([1.0, 0.5, 0.0, 1.0]), group_size=2)
    with pytest.raises(ValueError, match="binary"):
        fade_advantages(torch.tensor([2, 0]), group_size=2)
    with pytest.raises(ValueError, match="empty"):
        group_advantages(torch.tensor([]), group_size=4)
    with pytest.raises(ValueError, match="empty"):
        fade_advantages(torch.zeros(3, 0))
    with pytest.raises(ValueError, match="multiple of group_size"):
        group_advantages(torch.rand(10), group_size=4)
    with pytest.raises(ValueError, match="group_size"):
        group_advantages(torch.rand(8), group_size=0)
    with pytest.raises(ValueError, match="group_size"):
        group_advantages(torch.rand(8))
    with pytest.raises(ValueError, match="not both"):
        group_advantages(torch.rand(4), group_size=2, group_ids=torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="group_ids"):
        group_advantages(torch.rand(4), group_ids=torch.zeros(3, dtype=torch.long))
    with pytest.raises(TypeError, match="group_ids"):
        group_advantages(torch.rand(4), group_ids=torch.zeros(4))
    with pytest.raises(ValueError, match="scale"):
        group_advantages(torch.rand(4), 2, scale="mad")
    with pytest.raises(ValueError, match="NaN"):
        group_advantages(torch.tensor([1.0, float("nan")]), 2)
    with pytest.raises(ValueError, match="alpha"):
        fade_advantages(torch.tensor([1.0, 0.0]), 2, alpha=0.5)
    with pytest.raises(ValueError, match="delta"):
        fade_advantages(torch.tensor([1.0, 0.0]), 2, delta=0.0)
    with pytest.raises(ValueError, match="ema_convention"):
        FADEController(ema_convention="medium")
    with pytest.raises(ValueError, match="alpha_max"):
        FADEController(alpha_max=0.5)
    with pytest.raises(ValueError, match="ema"):
        FADEController(ema=0.0)
    c = FADEController()
    with pytest.raises(ValueError, match="mean_reward"):
        c.update(1.5, 1.0)
    with pytest.raises(ValueError, match="mean_entropy"):
        c.update(0.5, float("nan"))
    with pytest.raises(ValueError, match="mean_entropy"):
        c.update(0.5, -1.0)
    assert c.steps == 0


def test_overflowing_statistics_or_advantages_are_an_error():
    """Finite rewards whose group statistics overflow float64 (spread above ~1e154), or whose advantage does not
    fit the rewards' dtype, are a clear error. They used to come back silently wrong: [-1e308, 1e308] gave GRPO
    advantages [0, 0] (right: [-0.707, 0.707]) and Dr.GRPO [-inf, -inf]; fp16 rewards [65504, -65504 x 3] gave a
    Dr.GRPO advantage of inf (the true 98256 exceeds fp16's range)."""
    for r in ([-1e308, 1e308], [1.7e308, 1.7e308, -1.7e308], [1e200, -1e200, 0.0]):
        t = torch.tensor(r, dtype=torch.float64)
        for scale in ("std", "none"):
            with pytest.raises(ValueError, match="overflow"):
                group_advantages(t, group_size=len(r), scale=scale)
            with pytest.raises(ValueError, match="overflow"):
                group_advantages(t, group_ids=torch.zeros(len(r), dtype=torch.long), scale=scale)
    half = torch.tensor([65504.0, -65504.0, -65504.0, -65504.0], dtype=torch.float16)
    with pytest.raises(ValueError, match="overflow.*float16"):
        group_advantages(half, group_size=4, scale="none")
    torch.testing.assert_close(group_advantages(half, group_size=4).float(), torch.tensor([1.5, -0.5, -0.5, -0.5]))
    # large but representable: exact against a float64 reference
    big = torch.tensor([1e150, -1e150, 3e149, 0.0], dtype=torch.float64)
    torch.testing.assert_close(group_advantages(big, group_size=4, eps=0.0),
                               (big - big.mean()) / big.std(), rtol=1e-12, atol=0)


def test_controller_bad_state_changes_nothing_and_numpy_scalars_are_accepted():
    import numpy as np
    c = FADEController(alpha_max=2.0, ema=np.float32(0.25), p0=torch.tensor(0.4))   # like every other option
    for r, h in ((0.2, 1.5), (0.6, 1.2), (0.5, 1.4)):
        c.update(r, h)
    before = c.state_dict()
    for bad in ({**before, "p_hat": "oops"}, {**before, "p_hat": math.nan}, {**before, "steps": -2},
                {**before, "ema": 2.0, "p_hat": 0.1}):
        with pytest.raises((TypeError, ValueError)):
            c.load_state_dict(bad)
        assert c.state_dict() == before
    c2 = FADEController()
    c2.load_state_dict(before)
    assert c2.state_dict() == before and c2.alpha == c.alpha and c2.delta == c.delta


def test_controller_reads_observations_that_require_grad():
    """mean_reward / mean_entropy are observations the controller reads as numbers: an entropy computed in the
    training forward (it requires grad) is read as its value, not refused like a learnable hyperparameter."""
    torch.manual_seed(7)
    logits = torch.randn(3, 5, 11, requires_grad=True)
    p = logits.softmax(-1)
    ent = -(p * p.log()).sum(-1).mean()          # requires grad, as computed in the training forward
    reward = torch.rand(6, requires_grad=True).mean()
    a, b = FADEController(p0=0.3), FADEController(p0=0.3)
    assert a.update(reward, ent) == b.update(reward.item(), ent.item())
    assert a.state_dict() == b.state_dict()


def test_controller_state_without_target_entropy_is_refused():
    """h_hat set with target_entropy None cannot come from update() (the first step sets both); loading it used
    to succeed and leave a controller whose delta raised a TypeError at the next step."""
    c = FADEController()
    c.update(0.5, 1.2)
    before = c.state_dict()
    with pytest.raises(ValueError, match="target_entropy"):
        c.load_state_dict({**before, "target_entropy": None})
    assert c.state_dict() == before and c.delta == 1.0


def test_trainer_fade_advantages_change_nothing_on_error():
    """The trainer's compute_advantages: non-binary rewards raise, and the FADE controller is as it was (it used
    to fold in the step before the advantages failed). On binary rewards it matches update + fade_advantages."""
    from gxpo_kernels.trainer.config import TrainConfig
    from gxpo_kernels.trainer.loop import compute_advantages
    cfg = TrainConfig(advantage="fade", group=3)
    ctl, ref = FADEController(p0=0.3), FADEController(p0=0.3)
    before = ctl.state_dict()
    with pytest.raises(ValueError, match="binary"):
        compute_advantages(cfg, torch.tensor([1.0, 0.5, 0.0]), 1.3, ctl)
    assert ctl.state_dict() == before and ctl.steps == 0
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 0.0])
    adv, st = compute_advantages(cfg, rewards, 1.3, ctl, mean_reward=0.4)
    want = ref.update(0.4, 1.3)
    assert ctl.state_dict() == ref.state_dict() and {k: st[k] for k in want} == want
    assert torch.equal(adv, fade_advantages(rewards, 3, alpha=want["alpha"], delta=want["delta"]))


@pytest.mark.parametrize("G", [1, 3, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_batch_scale_is_trls_scale_rewards_batch(G, dtype):
    """scale="batch" is TRL's scale_rewards="batch": R less its group's mean over the unbiased std of the whole
    batch (+ eps), restated here from TRL 1.16's GRPOTrainer in float64; equal rewards everywhere give 0."""
    g = torch.Generator().manual_seed(G)
    for rewards in (torch.randn(5 * G, generator=g) * 3 + 1, (torch.rand(7 * G, generator=g) > 0.5).double()):
        rewards = rewards.to(dtype)
        r = rewards.double()
        want = (r - r.view(-1, G).mean(1).repeat_interleave(G)) / (r.std() + 1e-4)
        got = group_advantages(rewards, group_size=G, scale="batch", eps=1e-4)
        assert got.dtype == dtype
        torch.testing.assert_close(got.double(), want, rtol=1e-6 if dtype == torch.float32 else 1e-12, atol=1e-7)
    assert not group_advantages(torch.full((6,), 0.7), group_size=3, scale="batch", eps=0.0).any()
    assert not group_advantages(torch.tensor([2.0]), group_size=1, scale="batch").any()
    with pytest.raises(ValueError, match="batch std"):           # constant groups, a batch spread of 2e300
        group_advantages(torch.tensor([1e300, 1e300, -1e300, -1e300], dtype=torch.float64), group_size=2,
                         scale="batch")


def test_controller_load_is_strict_lossless_and_atomic():
    """load_state_dict ignored unknown keys (a typo'd "p_hatt" or another object's state loaded silently, as
    torch's strict loading would not) and took a float32 tensor for a float64 statistic (p_hat lost its low
    bits). Now: a missing or unknown key is a ValueError naming it, a float held in less than float64 a TypeError
    naming the key, and a refused load changes nothing. The ten keys every version of the library saved (the
    literal below, from the first release) still load, as do float64 tensors and numpy float64."""
    import numpy as np
    c = FADEController(ema=0.1)
    for r, h in ((0.3, 1.37), (0.61, 1.1), (0.27, 0.93)):
        c.update(r, h)
    before = c.state_dict()
    bad_keys = ({**before, "p_hatt": 0.1}, {**before, "alpha": 2.0, "p_hat": 0.9},
                {k: v for k, v in before.items() if k != "steps"} | {"step": 3})
    for bad, names in zip(bad_keys, (["'p_hatt'"], ["'alpha'"], ["missing keys ['steps']", "unknown keys ['step']"])):
        with pytest.raises(ValueError, match="FADEController state") as e:
            c.load_state_dict(bad)
        assert all(n in str(e.value) for n in names), str(e.value)
        assert c.state_dict() == before
    for key, value in (("p_hat", torch.tensor(before["p_hat"])), ("h_hat", np.float32(before["h_hat"])),
                       ("ema", torch.tensor(0.1, dtype=torch.bfloat16)), ("p_hat", np.array(0.3, np.float16))):
        with pytest.raises(TypeError, match=f"{key} is a .*float.*lost precision"):
            c.load_state_dict({**before, key: value})
        assert c.state_dict() == before
    with pytest.raises(TypeError, match="state must be a dict"):
        c.load_state_dict([("p_hat", 0.5)])
    exact = FADEController()
    exact.load_state_dict({**before, "p_hat": torch.tensor(before["p_hat"], dtype=torch.float64),
                           "h_hat": np.float64(before["h_hat"]), "steps": torch.tensor(3)})
    assert exact.state_dict() == before   # bit for bit
    first_release = {"alpha_max": 3.0, "target_entropy": 0.6, "ema": 0.02, "ema_convention": "slow", "p0": 0.5,
                     "delta_min": 0.3, "delta_max": 1.0, "p_hat": 0.41, "h_hat": 1.2, "steps": 7}
    exact.load_state_dict(first_release)
    assert exact.state_dict() == first_release


def test_sparse_rewards_and_advantages_are_refused_by_name():
    """A sparse rewards / group_ids / advantages tensor failed inside PyTorch ("reshape is not implemented for
    sparse tensors", "Could not run 'aten::clamp' ... 'SparseCPU'"); they now go through the ops' check_tensor
    and name the argument and the fix (to_dense), COO and CSR alike."""
    g = torch.Generator().manual_seed(34)
    rewards = (torch.rand(3, 5, generator=g) > 0.5).float()
    ids = torch.randint(0, 4, (15,), generator=g)
    calls = {
        "rewards": [lambda: group_advantages(rewards.to_sparse(), group_size=5),
                    lambda: group_advantages(rewards.to_sparse_csr()),
                    lambda: fade_advantages(rewards.reshape(-1).to_sparse(), group_size=5, alpha=2.0),
                    lambda: group_stats(rewards.to_sparse())],
        "group_ids": [lambda: group_advantages(rewards.reshape(-1), group_ids=ids.to_sparse())],
        "advantages": [lambda: sign_ratio(torch.randn(3, 5, generator=g).to_sparse()),
                       lambda: sign_ratio(torch.randn(3, 5, generator=g).to_sparse_csr())],
    }
    for name, fns in calls.items():
        for fn in fns:
            with pytest.raises(TypeError, match=rf"^{name} must be a dense \(strided\) tensor.*to_dense"):
                fn()
    # the dense tensors still work (and a non-float advantages tensor is still refused by name)
    assert group_advantages(rewards).shape == (3, 5)
    with pytest.raises(TypeError, match="advantages must be a floating-point tensor"):
        sign_ratio(torch.ones(3, dtype=torch.int64))
