"""tapir-ray: distil a teacher LLM's instruction following into a student with TAPIR and CITING on Ray."""

__version__ = "0.1.0"
