"""The KL coefficient beta of the reward ``-beta * (log pi - log pi_ref)``: fixed or adaptive."""

from __future__ import annotations

from dataclasses import dataclass

from textenv.config import check_float, check_int


@dataclass
class FixedKLController:
    value: float

    def update(self, kl: float, n_steps: int) -> None:
        """A fixed coefficient ignores the measured KL."""


@dataclass
class AdaptiveKLController:
    """Ziegler et al. 2019, section 2.2: steer the measured KL towards ``target``.

    ``beta *= 1 + clip(KL / target - 1, -0.2, 0.2) * n_steps / horizon``, where KL is
    the mean per-episode KL of the last rollout and ``n_steps`` the episodes in it.
    """

    value: float
    target: float
    horizon: int

    def update(self, kl: float, n_steps: int) -> None:
        error = min(max(kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon


@dataclass
class KLConfig:
    """How the KL coefficient beta moves during training (its starting value is the env's ``kl_coef``)."""

    adaptive_kl: bool = True
    """Adapt beta towards kl_target (Ziegler et al. 2019); else beta stays fixed."""
    kl_target: float = 3.0
    """Target KL per response, in nats, of the adaptive controller."""
    kl_horizon: int = 1000
    """Horizon of the adaptive controller, in episodes."""

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        check_float("kl_target", self.kl_target, "> 0", lambda v: v > 0)
        check_int("kl_horizon", self.kl_horizon, minimum=1)

    def controller(self, initial: float) -> FixedKLController | AdaptiveKLController:
        if self.adaptive_kl:
            return AdaptiveKLController(initial, self.kl_target, self.kl_horizon)
        return FixedKLController(initial)
