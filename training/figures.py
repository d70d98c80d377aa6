"""
Figures: matplotlib without a display (pyplot), written whole or not at all (save_figure).
"""

from .files import atomic_write


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend (no display needed)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save_figure(fig, path, **savefig):
    """Writes fig to path (its suffix the format) whole or not at all, then closes it."""
    try:
        with atomic_write(path) as tmp:
            fig.savefig(tmp, **savefig)
    finally:
        pyplot().close(fig)
