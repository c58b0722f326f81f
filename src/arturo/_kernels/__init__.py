"""Optional fused implementations of the arTuRO step, imported lazily by ``functional``."""
