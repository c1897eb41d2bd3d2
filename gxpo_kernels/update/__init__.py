"""Update rules that wrap a torch optimizer: GXPO (three-pass retention-scaled extrapolation) and SFPO."""
from .base import ExtrapolationRule
from .gates import EMAGate, EntropyGate, Gate, NoGate, WindowGate, make_gate
from .gxpo import GXPO
from .sfpo import SFPO

__all__ = ["ExtrapolationRule", "GXPO", "SFPO", "Gate", "NoGate", "EMAGate", "WindowGate", "EntropyGate",
           "make_gate"]
