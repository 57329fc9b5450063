"""The curriculum: the run's state (CurriculumActor) and TAPIR's round planning."""

from tapir_ray.curriculum.actor import CurriculumActor, RunBusyError, curriculum_actor, read_state
from tapir_ray.curriculum.plan import quotas, round_sizes, select_round

__all__ = [
    "CurriculumActor",
    "RunBusyError",
    "curriculum_actor",
    "quotas",
    "read_state",
    "round_sizes",
    "select_round",
]
