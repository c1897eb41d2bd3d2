"""Group advantages: GRPO / Dr.GRPO and FADE's focal advantage + controller (docs/algorithms.md, sections 1 and 5).

One implementation of per-group statistics (``group_stats``) serves every advantage here. Groups are given
either as a regular layout (``group_size`` G: each prompt's G responses contiguous, or ``rewards`` shaped
(num_prompts, G)) or ragged, by a (N,) integer ``group_ids`` tensor (any ids, any order). Statistics are
computed in float64; advantages come back in the rewards' float dtype (float32 for integer/bool rewards).

    GRPO     A_i = (r_i - mean_g) / (std_g + eps)        (unbiased std; a group of one gets 0)
    Dr.GRPO  A_i = r_i - mean_g                          (scale="none")
    batch    A_i = (r_i - mean_g) / (std_batch + eps)    (scale="batch": TRL's scale_rewards="batch", the unbiased
                                                          std of all N rewards)
    FADE     A_i = (1 - mean_g)^(alpha - 1) * (r_i - mean_g), divided by delta when r_i < mean_g
             (binary rewards; alpha = delta = 1 is Dr.GRPO)

These are O(N) gathers/scatters over a few thousand rewards per step, negligible next to the loss and the
model, so there is deliberately no fused kernel.
"""
from __future__ import annotations

import math
from typing import Dict, Mapping, NamedTuple, Optional

import torch

from ._utils import check_same_device, check_scalar, check_tensor, normalize_mask

SCALES = ("std", "batch", "none")
EMA_CONVENTIONS = ("slow", "fast")


class GroupStats(NamedTuple):
    mean: torch.Tensor   # (N,) float64, each element's group mean
    std: torch.Tensor    # (N,) float64, unbiased group std (0 for a group of one)
    count: torch.Tensor  # (N,) int64, each element's group size


def group_stats(rewards: torch.Tensor, group_size: Optional[int] = None,
                group_ids: Optional[torch.Tensor] = None) -> GroupStats:
    """Per-element group mean, unbiased std and size, for a regular or ragged grouping.

    Args:
        rewards: (N,) or (num_prompts, G) rewards (float, int or bool).
        group_size: G for a regular layout (N must be a multiple); inferred from a 2-D ``rewards`` if None.
        group_ids: (N,) integer group id per reward (ragged groups); exclusive with ``group_size``.

    Returns: GroupStats of flat (N,) float64/int64 tensors in the flattened rewards order.
    Raises ValueError on NaN/inf rewards, and on finite ones whose statistics overflow float64 (spread > ~1e154).
    """
    return _group_moments(rewards, group_size, group_ids)[0]


def _group_moments(rewards: torch.Tensor, group_size: Optional[int], group_ids: Optional[torch.Tensor]):
    """(``group_stats``'s GroupStats, (N,) float64 rewards less their group mean). The moments are those of the
    rewards less their group's minimum, and so is the centred reward: r - mean with the mean rounded to the
    rewards' magnitude lost a spread of a few ulps ([0.7, 0.7, 0.7 + 1 ulp] centred to [0, 0, 1 ulp])."""
    check_tensor(rewards, "rewards")   # a tensor, dense (a sparse one failed inside PyTorch's reshape)
    if rewards.dim() not in (1, 2):
        raise ValueError(f"rewards must be (N,) or (num_prompts, G), got shape {tuple(rewards.shape)}")
    if rewards.numel() == 0:
        raise ValueError("rewards is empty: need at least one group with at least one response")
    if rewards.is_complex():
        raise TypeError(f"rewards must be real, got {rewards.dtype}")
    r = rewards.reshape(-1).double()
    if not bool(torch.isfinite(r).all()):
        raise ValueError("rewards contains NaN or inf")
    N = r.numel()
    if group_ids is not None:
        if group_size is not None:
            raise ValueError("pass either group_size or group_ids, not both")
        check_tensor(group_ids, "group_ids")
        if group_ids.dtype.is_floating_point or \
                group_ids.dtype == torch.bool or group_ids.is_complex():
            raise TypeError("group_ids must be an integer torch.Tensor")
        if tuple(group_ids.shape) != (N,):
            raise ValueError(f"group_ids must have shape ({N},) (one id per reward), got {tuple(group_ids.shape)}")
        if group_ids.device != rewards.device:
            raise ValueError(f"group_ids is on {group_ids.device} but rewards is on {rewards.device}")
        _, inv = torch.unique(group_ids, return_inverse=True)   # dense 0..K-1 labels, any ids allowed
        K = int(inv.max()) + 1
        count = torch.zeros(K, dtype=torch.float64, device=r.device).index_add_(0, inv, torch.ones_like(r))
        # moments of the rewards less their group's minimum: a constant group is then exactly 0 - 0 (a plain
        # float mean is not exact, and its ~1e-17 std turned equal rewards into advantages of order 1)
        low = torch.full((K,), math.inf, dtype=torch.float64, device=r.device).scatter_reduce_(0, inv, r, "amin")
        d = r - low[inv]
        dmean = torch.zeros(K, dtype=torch.float64, device=r.device).index_add_(0, inv, d) / count
        centred = d - dmean[inv]
        ss = torch.zeros(K, dtype=torch.float64, device=r.device).index_add_(0, inv, centred * centred)
        std = torch.where(count > 1, (ss / (count - 1).clamp(min=1)).sqrt(), torch.zeros_like(ss))
        return _finite_stats(GroupStats((low + dmean)[inv], std[inv], count[inv].long()), r), centred
    if group_size is None:
        if rewards.dim() != 2:
            raise ValueError("pass group_size (or group_ids) for 1-D rewards, or rewards shaped (num_prompts, G)")
        group_size = rewards.shape[1]
    group_size = check_scalar(group_size, "group_size", "[1, inf)", integer=True)   # (numpy / 0-d tensor ints too)
    if rewards.dim() == 2 and rewards.shape[1] != group_size:
        raise ValueError(f"group_size={group_size} disagrees with rewards of shape {tuple(rewards.shape)}")
    if N % group_size:
        raise ValueError(f"rewards has {N} elements, not a multiple of group_size={group_size}")
    g = r.view(-1, group_size)
    low = g.amin(-1, keepdim=True)          # as above: a constant group gets exactly mean = r, std = 0
    d = g - low
    dmean = d.mean(-1, keepdim=True)
    std = d.std(-1, unbiased=True, keepdim=True) if group_size > 1 else torch.zeros_like(dmean)
    count = torch.full_like(g, group_size, dtype=torch.int64)
    st = GroupStats((low + dmean).expand_as(g).reshape(-1), std.expand_as(g).reshape(-1), count.reshape(-1))
    return _finite_stats(st, r), (d - dmean).reshape(-1)


def _finite_stats(st: GroupStats, r: torch.Tensor) -> GroupStats:
    """``st``, or a ValueError when finite rewards spread so wide (above ~1e154) that float64 overflowed: the
    statistics would be inf/NaN and the advantages silently 0 or -inf."""
    if not bool(torch.isfinite(st.mean).all() & torch.isfinite(st.std).all()):
        raise ValueError(f"rewards (|r| up to {float(r.abs().max()):.3g}) overflow float64 group statistics; "
                         "rescale them")
    return st


def _out_dtype(rewards: torch.Tensor) -> torch.dtype:
    return rewards.dtype if rewards.is_floating_point() else torch.float32


def _cast_out(adv: torch.Tensor, rewards: torch.Tensor) -> torch.Tensor:
    """float64 advantages in the rewards' float dtype and shape; a ValueError when one overflows that dtype."""
    out = adv.to(_out_dtype(rewards))
    if not bool(torch.isfinite(out).all()):
        raise ValueError(f"advantages (|A| up to {float(adv.abs().max()):.3g}) overflow {out.dtype}, the rewards' "
                         "dtype: pass float64 rewards")
    return out.view(rewards.shape)


def group_advantages(rewards: torch.Tensor, group_size: Optional[int] = None,
                     group_ids: Optional[torch.Tensor] = None, scale: str = "std", eps: float = 1e-6) -> torch.Tensor:
    """GRPO (``scale="std"``: (R - mean) / (unbiased std + eps)) or Dr.GRPO (``"none"``: R - mean) advantages.

    ``scale="batch"`` divides R - mean (group mean) by the unbiased std of all the rewards instead of the group's,
    as TRL's ``scale_rewards="batch"`` does (its ``"group"`` is ``"std"`` here, ``"none"`` the same). TRL's ``eps``
    is 1e-4; pass it to match TRL's numbers.

    Args: see ``group_stats`` for ``rewards`` / ``group_size`` / ``group_ids``; ``eps`` >= 0.
    Returns: advantages with the shape of ``rewards``; a group of one gets 0 (and with ``"batch"`` so does a
    batch of one reward or of equal rewards).
    Raises ValueError when the statistics overflow float64 or an advantage overflows the rewards' dtype.

    Example:
        >>> group_advantages(torch.tensor([1., 0., 0., 1., 1., 1.]), group_size=3)
        >>> group_advantages(rewards, group_ids=torch.tensor([0, 0, 0, 1, 1]), scale="none")   # ragged
    """
    if scale not in SCALES:
        raise ValueError(f"scale must be one of {SCALES}, got {scale!r}")
    eps = check_scalar(eps, "eps", "[0, inf)")
    st, adv = _group_moments(rewards, group_size, group_ids)
    if scale == "std":
        # a constant group (all right / all wrong) has R - mean = 0 and std = 0: its advantage is 0, also at eps=0
        denom = st.std + eps
        adv = torch.where((st.count > 1) & (denom > 0), adv / torch.where(denom > 0, denom, 1.0), torch.zeros_like(adv))
    elif scale == "batch":
        r = rewards.reshape(-1).double()
        # the std of the rewards less their minimum (as for the groups' moments: a constant batch is exactly 0)
        denom = float((r - r.min()).std()) + eps if r.numel() > 1 else 0.0
        if not math.isfinite(denom):
            raise ValueError(f"rewards (|r| up to {float(r.abs().max()):.3g}) overflow the float64 batch std; "
                             "rescale them")
        adv = adv / denom if denom > 0 else torch.zeros_like(adv)
    return _cast_out(adv, rewards)


def fade_advantages(rewards: torch.Tensor, group_size: Optional[int] = None,
                    group_ids: Optional[torch.Tensor] = None, alpha: float = 1.0, delta: float = 1.0) -> torch.Tensor:
    """FADE focal advantage: A_i = (1 - rbar)^(alpha - 1) * (r_i - rbar), divided by ``delta`` when r_i < rbar.

    Args:
        rewards: binary rewards in {0, 1} (float, int or bool), (N,) or (num_prompts, G).
        group_size / group_ids: the grouping (see ``group_stats``).
        alpha: focal exponent >= 1 (hard prompts, low rbar, get up-weighted); 1 disables the focal factor.
        delta: > 0, divides the negative advantages (delta < 1 strengthens them).
    Returns: advantages with the shape of ``rewards``; all-correct / all-wrong groups and groups of one get 0.
    Raises ValueError on non-binary rewards (FADE is defined for verifiable 0/1 rewards).
    """
    alpha = check_scalar(alpha, "alpha", "[1, inf)")  # 0**(alpha-1) is undefined below 1
    delta = check_scalar(delta, "delta", "(0, inf)")
    st, centred = _group_moments(rewards, group_size, group_ids)
    r = rewards.reshape(-1).double()
    if not bool(((r == 0) | (r == 1)).all()):
        bad = r[(r != 0) & (r != 1)][:3].tolist()
        raise ValueError(f"fade_advantages needs binary rewards in {{0, 1}}; found e.g. {bad}")
    adv = torch.pow(1.0 - st.mean, alpha - 1.0) * centred    # 0**0 == 1, and centred == 0 there anyway
    adv = torch.where(r < st.mean, adv / delta, adv)
    return _cast_out(adv, rewards)


def sign_ratio(advantages: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Positive advantage mass over negative mass, sum(max(A, 0)) / sum(max(-A, 0)), for logging (0-d fp64).

    ``advantages``: a float tensor of any shape, e.g. (B,) or (B, T). ``mask`` (same shape, bool or 0/1) selects
    the entries counted. inf when there is no negative mass (nan if both 0).
    """
    check_tensor(advantages, "advantages", floating=True)   # dense too (sparse failed inside PyTorch)
    a = advantages.detach().double()
    if mask is not None:
        # (``mask.bool()`` read a weight such as 0.5 as 1: the one mask rule of the library instead)
        check_same_device(a, "advantages", mask=mask)
        a = torch.where(normalize_mask(mask, a.shape, a.device), a, torch.zeros_like(a))
    return a.clamp(min=0).sum() / (-a).clamp(min=0).sum()


def _scalar(x, name) -> float:
    """An observation (a batch's mean reward or entropy), read as a number: a tensor still attached to the graph
    it was computed in (e.g. ``entropy.mean()`` of the training forward) is read as its value, by design."""
    return check_scalar(x.detach() if isinstance(x, torch.Tensor) else x, name)


def _check_float64(value, name: str) -> None:
    """Refuse a floating value held in less than float64 (a float32 tensor, ``np.float32``): its low bits are gone."""
    if isinstance(value, torch.Tensor):
        narrow = value.is_floating_point() and value.dtype != torch.float64
    else:   # a numpy scalar has a dtype; Python numbers have none
        dtype = getattr(value, "dtype", None)
        narrow = getattr(dtype, "kind", None) == "f" and dtype.itemsize < 8
    if narrow:
        raise TypeError(f"{name} is a {value.dtype} value: a float64 statistic stored in less than float64 has lost "
                        "precision; pass the state as state_dict() returns it (Python floats)")


class FADEController:
    """FADE's controllers for alpha (focal exponent) and delta (negative-advantage divisor) (docs/algorithms.md, section 5).

    Each step call ``update(mean_reward, mean_entropy)`` once, then use ``alpha`` / ``delta`` in
    ``fade_advantages``:

        p_hat <- EMA(batch-mean reward), starts at p0          alpha = clip(3 (1 - p_hat) / (2 p_hat), 1, alpha_max)
        H_hat <- EMA(mean token entropy), starts at the first   delta = clip(1 + H_hat - H*, delta_min, delta_max)

    ``ema_convention="slow"`` (default, our choice): x <- (1 - ema) x + ema * new (horizon ~ 1/ema steps);
    ``"fast"`` (the transcribed form): x <- ema * x + (1 - ema) * new. ``target_entropy`` H* defaults to half
    the first observed entropy (our choice; the paper's tables use 1.0). Before the first update alpha comes from
    p0 and delta is delta_max.
    """

    def __init__(self, alpha_max: float = 3.0, target_entropy: Optional[float] = None, ema: float = 0.02,
                 ema_convention: str = "slow", p0: float = 0.5, delta_min: float = 0.3, delta_max: float = 1.0):
        alpha_max = check_scalar(alpha_max, "alpha_max", "[1, inf)")
        target_entropy = check_scalar(target_entropy, "target_entropy", "[0, inf)", optional=True)
        ema = check_scalar(ema, "ema", "(0, 1]")
        if ema_convention not in EMA_CONVENTIONS:
            raise ValueError(f"ema_convention must be one of {EMA_CONVENTIONS}, got {ema_convention!r}")
        p0 = check_scalar(p0, "p0", "[0, 1]")
        delta_min = check_scalar(delta_min, "delta_min", "(0, 1]")
        delta_max = check_scalar(delta_max, "delta_max", f"[{delta_min}, inf)")
        self.alpha_max, self.ema, self.ema_convention = float(alpha_max), float(ema), ema_convention
        self.p0, self.delta_min, self.delta_max = float(p0), float(delta_min), float(delta_max)
        self.target_entropy = None if target_entropy is None else float(target_entropy)
        self.p_hat: float = float(p0)
        self.h_hat: Optional[float] = None
        self.steps = 0

    def _ema(self, old: float, new: float) -> float:
        if self.ema_convention == "slow":
            return (1.0 - self.ema) * old + self.ema * new
        return self.ema * old + (1.0 - self.ema) * new

    @property
    def alpha(self) -> float:
        if self.p_hat <= 0:           # no successes yet: maximal focus on hard prompts
            return self.alpha_max
        return min(max(3.0 * (1.0 - self.p_hat) / (2.0 * self.p_hat), 1.0), self.alpha_max)

    @property
    def delta(self) -> float:
        if self.h_hat is None:
            return self.delta_max
        return min(max(1.0 + self.h_hat - self.target_entropy, self.delta_min), self.delta_max)

    def update(self, mean_reward, mean_entropy) -> Dict[str, float]:
        """Fold in one step's batch-mean reward (in [0, 1]) and mean token entropy (>= 0); return the new state.

        Returns dict(alpha, delta, p_hat, h_hat) (python floats) for this step's advantages and logging.
        """
        r, h = _scalar(mean_reward, "mean_reward"), _scalar(mean_entropy, "mean_entropy")
        if not 0 <= r <= 1:
            raise ValueError(f"mean_reward must be in [0, 1] (binary rewards), got {r}")
        if h < 0:
            raise ValueError(f"mean_entropy must be >= 0, got {h}")
        self.p_hat = self._ema(self.p_hat, r)
        if self.h_hat is None:
            self.h_hat = h
            if self.target_entropy is None:
                self.target_entropy = 0.5 * h
        else:
            self.h_hat = self._ema(self.h_hat, h)
        self.steps += 1
        return {"alpha": self.alpha, "delta": self.delta, "p_hat": self.p_hat, "h_hat": self.h_hat}

    def settings(self) -> Dict[str, object]:
        """The hyper-parameters (``__init__``'s arguments; ``target_entropy`` as set, by the caller or by the
        first update)."""
        return {"alpha_max": self.alpha_max, "target_entropy": self.target_entropy, "ema": self.ema,
                "ema_convention": self.ema_convention, "p0": self.p0, "delta_min": self.delta_min,
                "delta_max": self.delta_max}

    def state_dict(self) -> Dict[str, object]:
        return {**self.settings(), "p_hat": self.p_hat, "h_hat": self.h_hat, "steps": self.steps}

    def load_state_dict(self, state: Dict[str, object]) -> None:
        """Restore hyperparameters and state saved by ``state_dict`` (the same ten keys in every version of this
        library). Strict, as torch's loading: a missing or unknown key (a typo, another object's state) raises
        ValueError naming it. Lossless: a float held in less than float64 (a float32 tensor, ``np.float32``)
        raises TypeError naming the key, since the EMA statistics it stood for were float64. Everything is
        validated (the hyperparameters through ``__init__``) before anything changes: a bad state raises and
        leaves the controller as it was."""
        if not isinstance(state, Mapping):
            raise TypeError(f"state must be a dict (from state_dict()), got {type(state).__name__}")
        names = list(self.settings())
        keys = {*names, "p_hat", "h_hat", "steps"}
        missing, unknown = keys - set(state), set(state) - keys
        if missing or unknown:
            raise ValueError("FADEController state: " + "; ".join(
                f"{what} keys {sorted(ks, key=repr)}" for what, ks in (("missing", missing), ("unknown", unknown))
                if ks) + f" (expected exactly {sorted(keys)})")
        for k in sorted(keys):
            _check_float64(state[k], k)
        new = FADEController(**{k: state[k] for k in names})
        new.p_hat = check_scalar(state["p_hat"], "p_hat", "[0, 1]")
        new.h_hat = check_scalar(state["h_hat"], "h_hat", "[0, inf)", optional=True)
        new.steps = check_scalar(state["steps"], "steps", "[0, inf)", integer=True)
        if new.h_hat is not None and new.target_entropy is None:   # update() sets both at the first step
            raise ValueError("state has h_hat but no target_entropy (delta would be undefined)")
        self.__dict__.update(new.__dict__)

    def __repr__(self) -> str:
        return (f"FADEController(alpha={self.alpha:.4g}, delta={self.delta:.4g}, p_hat={self.p_hat:.4g}, "
                f"h_hat={self.h_hat}, target_entropy={self.target_entropy}, ema={self.ema}, "
                f"ema_convention={self.ema_convention!r})")
