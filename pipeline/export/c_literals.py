"""C literals for the generated sources: the head's tables (export_c.py) and the edge step's
code tables (export_edge.py) are written the same way, so both import this."""

from __future__ import annotations

import numpy as np

__all__ = ["c_float", "c_array"]

PER_LINE = 8   # values a line in a generated table


def c_float(v: float) -> str:
    """A C float literal that round-trips float32 exactly (9 significant digits)."""
    if not np.isfinite(v):
        raise ValueError(f"the head holds a non-finite value ({v}); retrain it")
    text = f"{float(v):.9g}"
    return text + ("f" if any(c in text for c in ".en") else ".0f")


def c_array(ctype: str, name: str, values: np.ndarray) -> str:
    """`values` as a `static const` C array named `name`, PER_LINE values a line."""
    if values.dtype.kind == "f":
        items = [c_float(v) for v in values.ravel()]
    else:
        items = [str(int(v)) for v in values.ravel()]
    lines = [", ".join(items[i:i + PER_LINE]) for i in range(0, len(items), PER_LINE)]
    body = ",\n    ".join(lines)
    return f"static const {ctype} {name}[{len(items)}] = {{\n    {body}\n}};\n"
