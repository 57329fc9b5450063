"""Evaluation: held-out NLL of teacher answers (judge-free, every round)."""

from tapir_ray.eval.nll import heldout_nll

__all__ = ["heldout_nll"]
