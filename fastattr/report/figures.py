"""Figures for the HTML report: matplotlib (the ``report`` extra) without a display, PNGs embedded
as base64, each with its caption."""
from __future__ import annotations

import base64
import html
import importlib
import io

# What the report extra (pip install "fastattr[report]") brings: the figures, and the tables.
EXTRA_MODULES = ("matplotlib", "pandas", "pyarrow")


def missing_extras() -> list[str]:
    """The modules of the ``report`` extra that cannot be imported here."""
    missing = []
    for name in EXTRA_MODULES:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    return missing


def pyplot():
    """``matplotlib.pyplot`` on the Agg backend, or an ImportError saying how to install it."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise ImportError('fastattr report needs matplotlib: pip install "fastattr[report]"') from exc
    return plt


def png(fig) -> str:
    """The figure as a base64 PNG (the figure is closed)."""
    plt = pyplot()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def figure(image: str, alt: str, caption: str) -> str:
    """An HTML figure of a base64 PNG with its caption."""
    return (f"<figure><img alt='{html.escape(alt)}' src='data:image/png;base64,{image}'>"
            f"<figcaption>{html.escape(caption)}</figcaption></figure>")
