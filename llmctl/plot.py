"""``llmctl logs JOB --plot FILE``: a training job's train and validation loss against steps
(and a fine-tune's validation scores, accuracy and F1 or exact match and chrF, on a second axis).

matplotlib is an optional extra (``pip install 'llmosd[plot]'``); it is imported only here and
only when a plot is asked for.  The picture is drawn on a Figure of its own (no pyplot state),
and written atomically: a PNG (or whatever the name's suffix says:
.svg, .pdf) that a person would rather look at than a table.
"""
from __future__ import annotations

import os
import tempfile

from .errors import EX_UNAVAILABLE, LlmosdError

TRAIN, VAL, BEST = "#4c72b0", "#dd8452", "#c44e52"


class PlotUnavailable(LlmosdError):
    """matplotlib is not installed (client side only; never on the wire)."""
    code, name, exit_status = 53, "plot_unavailable", EX_UNAVAILABLE
    default_hint = "install the plotting extra: pip install 'llmosd[plot]' (or pip install matplotlib)"


def series(metrics: list[dict]) -> tuple[list[tuple[int, float]], list[tuple[int, float]]]:
    """(train points, validation points) as (step, loss), each step once (its last report:
    a resumed job may report a step again), in step order."""
    train, val = {}, {}
    for m in metrics:
        step = m.get("step")
        if step is None:
            continue
        if m.get("loss") is not None:
            train[step] = float(m["loss"])
        if m.get("val_loss") is not None:
            val[step] = float(m["val_loss"])
    return sorted(train.items()), sorted(val.items())


# A fine-tune's validation scores, drawn on a second axis from 0 to 1: (key, label, scale).
SCORES = (("accuracy", "accuracy", 1.0), ("f1", "macro-F1", 1.0),
          ("exact_match", "exact match", 1.0), ("chrf", "chrF / 100", 0.01))
SCORE_COLORS = ("#55a868", "#8172b3", "#937860", "#da8bc3")     # in the order drawn


def scores(metrics: list[dict]) -> dict[str, list[tuple[int, float]]]:
    """{label: [(step, value on 0..1)]} of the validation scores the reports hold (accuracy
    and macro-F1 of a classifier; exact match and chrF of a generative fine-tune), each step
    once, in step order; only the scores that have points."""
    out = {}
    for key, label, scale in SCORES:
        pts = {}
        for m in metrics:
            v = m.get(key)
            if m.get("step") is not None and isinstance(v, (int, float)) and not isinstance(v, bool):
                pts[m["step"]] = float(v) * scale
        if pts:
            out[label] = sorted(pts.items())
    return out


def loss_label(metrics: list[dict]) -> str:
    """The loss axis' label: a classifier's loss is its head's cross entropy per example
    (its reports have accuracy), any other's per (trained) token."""
    if any(m.get("accuracy") is not None for m in metrics):
        return "loss (cross entropy per example, nats)"
    return "loss (nats per token)"


def smooth(values: list[float], window: int) -> list[float]:
    """Centred moving average over ``window`` points, narrowing symmetrically towards the ends
    (the first and last points are their own): unlike an exponential average it neither lags
    behind a falling curve nor bends its ends."""
    half, out = max(0, window // 2), []
    prefix = [0.0]
    for v in values:
        prefix.append(prefix[-1] + v)
    n = len(values)
    for i in range(n):
        h = min(half, i, n - 1 - i)
        lo, hi = i - h, i + h + 1
        out.append((prefix[hi] - prefix[lo]) / (hi - lo))
    return out


def plot_losses(metrics: list[dict], path: str, *, title: str = "", subtitle: str = "") -> dict:
    """Draw train and validation loss against steps into ``path`` (a fine-tune's validation
    scores too, on a 0..1 axis; the legend under the plot); returns a summary {points,
    val_points, last_loss, best_val_loss, best_val_step, scores: {label: last value}}.  PlotUnavailable without
    matplotlib; ValueError when there is nothing to draw; OSError when ``path`` cannot be written."""
    train, val = series(metrics)
    if not train and not val:
        raise ValueError("the job has reported no losses yet")
    try:
        from matplotlib.figure import Figure      # no pyplot: no global state, no GUI backend
        from matplotlib.ticker import MaxNLocator
    except ImportError:
        raise PlotUnavailable("--plot needs matplotlib, which is not installed") from None

    fig = Figure(figsize=(9, 5), dpi=120, layout="constrained")
    ax = fig.add_subplot()
    summary = {"points": len(train), "val_points": len(val), "last_loss": None,
               "best_val_loss": None, "best_val_step": None}
    summary.update(_draw(ax, train, val, legend=True))
    score = scores(metrics)
    summary["scores"] = {label: pts[-1][1] for label, pts in score.items()}
    _frame(ax, train, val, MaxNLocator, loss_label(metrics))
    extra = _draw_scores(ax, score) if score else []
    _legend(fig, ax, extra)
    if not score:                          # an inset would sit on the score curves
        _zoom(ax, train, val, MaxNLocator)
    if title:
        fig.suptitle(title, fontsize=13, fontweight="bold")
    if subtitle:
        ax.set_title(subtitle, fontsize=9, color="#555555")
    _save(fig, path)
    return summary


def _draw(ax, train, val, legend: bool) -> dict:
    """The curves: raw train loss faint with its smoothed trend over it when noisy,
    validation loss with markers, the best validation loss starred."""
    out = {}
    label = (lambda text: text) if legend else (lambda text: None)
    if train:
        xs, ys = zip(*train)
        out["last_loss"] = ys[-1]
        if len(ys) >= 50:                  # noisy: the raw curve faint, its trend drawn over it
            ax.plot(xs, ys, color=TRAIN, alpha=0.25, linewidth=0.8)
            ax.plot(xs, smooth(list(ys), max(5, len(ys) // 25)), color=TRAIN, linewidth=2,
                    label=label(f"train (smoothed; last {ys[-1]:.3f})"))
        else:
            ax.plot(xs, ys, color=TRAIN, linewidth=2, marker=".", label=label(f"train (last {ys[-1]:.3f})"))
    if val:
        vx, vy = zip(*val)
        best = min(range(len(vy)), key=vy.__getitem__)
        out.update(best_val_loss=vy[best], best_val_step=vx[best])
        ax.plot(vx, vy, color=VAL, linewidth=2, marker="o", markersize=4,
                label=label(f"validation (last {vy[-1]:.3f})"))
        ax.plot([vx[best]], [vy[best]], linestyle="none", marker="*", markersize=14, color=BEST,
                label=label(f"best validation {vy[best]:.3f} at step {vx[best]}"), zorder=5)
    return out


def _draw_scores(ax, score: dict) -> list:
    """The validation scores on a second y axis (0..1, right), dashed; returns their lines
    for the legend."""
    right = ax.twinx()
    lines = []
    for (label, pts), color in zip(score.items(), SCORE_COLORS):
        xs, ys = zip(*pts)
        lines += right.plot(xs, ys, color=color, linestyle="--", linewidth=1.6, marker="s", markersize=3,
                            label=f"{label} (last {ys[-1]:.3f})")
    right.set_ylim(0, 1.02)
    right.set_ylabel("validation score (0 to 1)")
    right.spines["top"].set_visible(False)
    return lines


def _legend(fig, ax, extra: list) -> None:
    """One legend for every curve (both axes), under the plot: never over a curve."""
    handles, labels = ax.get_legend_handles_labels()
    handles += extra
    labels += [h.get_label() for h in extra]
    if handles:
        fig.legend(handles, labels, loc="outside lower center", ncols=min(3, len(handles)), frameon=False)


INSET = (0.42, 0.30, 0.55, 0.40)      # x, y, width, height in axes coordinates


def _zoom(ax, train, val, locator) -> None:
    """When the curves have flattened (their second half spans under a quarter of the whole
    range), an inset shows that second half close up, where train and validation part ways.
    It goes above the curves, under the legend, and only where no curve passes behind it.
    Called after ``_frame`` has set the axes' ranges."""
    pts = train + val
    if len(pts) < 8:
        return
    first, last = min(x for x, _ in pts), max(x for x, _ in pts)
    mid = first + (last - first) / 2
    tail = [y for x, y in pts if x >= mid]
    whole = max(y for _, y in pts) - min(y for _, y in pts)
    if not tail or whole <= 0 or (max(tail) - min(tail)) > whole / 4:
        return
    if any(_behind(ax, series) for series in (train, val)):
        return
    inset = ax.inset_axes(list(INSET))
    _draw(inset, [p for p in train if p[0] >= mid], [p for p in val if p[0] >= mid], legend=False)
    lo, hi = min(tail), max(tail)
    pad = 0.08 * (hi - lo or 1)
    inset.set_ylim(lo - pad, hi + pad)
    inset.set_xlim(mid, last + 0.01 * (last - first))
    inset.xaxis.set_major_locator(locator(nbins=5, integer=True))
    inset.tick_params(labelsize=8)
    inset.grid(True, color="#eeeeee", linewidth=0.5)
    inset.set_title("second half, close up", fontsize=8, color="#555555")
    ax.indicate_inset_zoom(inset, edgecolor="#999999")


def _behind(ax, series: list[tuple[int, float]], margin: float = 0.04) -> bool:
    """Would the inset's box (with a margin) hide part of this curve?  Checks the points and
    the lines between them (a few places along each)."""
    (x0, x1), (y0, y1) = ax.get_xlim(), ax.get_ylim()
    bx, by, bw, bh = INSET
    left, right = bx - margin, bx + bw + margin
    bottom, top = by - margin, by + bh + margin + 0.05          # + the inset's title
    for (xa, ya), (xb, yb) in zip(series, series[1:] or series):
        for t in (0.0, 0.25, 0.5, 0.75, 1.0):
            u = ((xa + t * (xb - xa)) - x0) / ((x1 - x0) or 1)
            v = ((ya + t * (yb - ya)) - y0) / ((y1 - y0) or 1)
            if left <= u <= right and bottom <= v <= top:
                return True
    return False


def _frame(ax, train, val, locator, ylabel: str = "loss (nats per token)") -> None:
    """Axes and grid; the y range shows the first report but not a spike above it."""
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.xaxis.set_major_locator(locator(integer=True))
    ax.grid(True, color="#dddddd", linewidth=0.6)
    ax.set_axisbelow(True)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    ys = [y for _, y in train[len(train) // 20:]] + [y for _, y in val]
    if ys:
        lo, hi = min(ys), max(ys)
        first = max([y for _, y in train[:1]] + [y for _, y in val[:1]])
        top = max(first, hi) if first <= hi + (hi - lo) else hi
        ax.set_ylim(lo - 0.05 * (top - lo or 1), top + 0.04 * (top - lo or 1))


def _save(fig, path: str) -> None:
    """Write the figure atomically (a reader never sees half a file); the format follows the
    name's suffix, PNG when it has none that matplotlib knows."""
    folder = os.path.dirname(os.path.abspath(path))
    ext = os.path.splitext(path)[1].lower().lstrip(".")
    fmt = ext if ext in fig.canvas.get_supported_filetypes() else "png"
    fd, tmp = tempfile.mkstemp(prefix=".plot-", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            fig.savefig(f, format=fmt)
        os.chmod(tmp, 0o644 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
