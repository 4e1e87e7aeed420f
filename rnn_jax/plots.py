"""Plots of runs: learning curves of one run and comparisons of several, ready for a draft.

Conventions, the same in every figure:

* a fixed colour per split (train blue, valid orange, test green) and per compared run;
* the training loss is always drawn, the x axis is the training step, axes are labelled,
  and the title names the experiment and its key settings;
* a metric whose values span more than a decade gets a log scale;
* at most four panels in a row; a metric with a single point gets no panel of its own:
  final test figures go into the title instead;
* a published reference value is a labelled dashed line; resume points are dotted lines.

matplotlib is imported on first use, so importing rnn_jax never loads it.
"""

from __future__ import annotations

import math
import os
from typing import Mapping, Optional, Sequence

from rnn_jax.rundir import read_metrics

SPLIT_COLORS = {"train": "tab:blue", "valid": "tab:orange", "test": "tab:green"}
RUN_COLORS = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown", "tab:pink",
              "tab:gray", "tab:olive", "tab:cyan")
NOT_PLOTTED = {"step", "split", "time_s", "epoch", "tokens_per_s", "learning_rate", "cell", "run", "objective"}
MAX_COLUMNS = 4
REFERENCE_STYLES = ("--", ":", "-.", (0, (5, 1, 1, 1, 1, 1)))

Reference = Mapping[str, tuple]  # {metric: (value, label)}


def _pyplot():
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  return plt


def save_figure(fig, path: str, dpi: int = 110) -> str:
  """Lay out, save as PNG (through a temporary file), close; returns ``path``.

  In a multi-process run only process 0 writes the file; the others just close the figure."""
  from rnn_jax import mesh
  plt = _pyplot()
  if not mesh.is_primary():
    plt.close(fig)
    return path
  fig.tight_layout()
  tmp = f"{path}.tmp{os.getpid()}.png"
  fig.savefig(tmp, dpi=dpi)
  plt.close(fig)
  os.replace(tmp, path)
  return path


def _numeric(value) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _strip_split(record: dict) -> dict:
  """{metric: value} of a record, a "<split>_" prefix removed so that valid_bpc joins bpc."""
  split = record.get("split", "train")
  out = {}
  for key, value in record.items():
    if key in NOT_PLOTTED or not _numeric(value):
      continue
    out[key[len(split) + 1:] if key.startswith(split + "_") else key] = value
  return out


FRACTIONS = ("accuracy", "f1", "precision", "recall", "bleu", "exact_match", "probability")


def use_log_scale(values: Sequence[float], metric: str = "") -> bool:
  """True when positive values span more than a decade (perplexity, gradient norms); a fraction
  in [0, 1] (accuracy, F1, BLEU, ...) keeps a linear axis."""
  positive = [v for v in values if v > 0]
  if any(name in metric for name in FRACTIONS) and values and max(values) <= 1.0:
    return False
  return len(positive) == len(values) and len(values) > 1 and max(positive) / min(positive) > 10.0


def _decorate(axis, metric: str, values, reference: Optional[Reference], labels: Mapping[str, str]):
  if reference and metric in reference:
    value, text = reference[metric]
    axis.axhline(value, color="black", linestyle="--", linewidth=1.0, label=text)
    values = [*values, value]
  if use_log_scale(values, metric):
    axis.set_yscale("log")
  axis.set_xlabel("step")
  axis.set_ylabel(labels.get(metric, metric))
  axis.grid(alpha=0.3)
  axis.legend(fontsize=8)


def _grid(count: int, width: float = 4.3, height: float = 3.3):
  plt = _pyplot()
  columns = min(MAX_COLUMNS, count)
  rows = math.ceil(count / columns)
  fig, axes = plt.subplots(rows, columns, figsize=(width * columns, height * rows + 0.4), squeeze=False)
  flat = [axis for row in axes for axis in row]
  for axis in flat[count:]:
    axis.set_visible(False)
  return fig, flat[:count]


def curve_metrics(records: list[dict], metrics: Optional[Sequence[str]] = None) -> list[str]:
  """The panels of a run's plot: "loss" first, then every metric with more than one point."""
  counts: dict[str, int] = {}
  for record in records:
    if record.get("split") == "resume":
      continue
    for key in _strip_split(record):
      counts[key] = counts.get(key, 0) + 1
  if metrics is None:
    metrics = sorted(counts, key=lambda k: (k != "loss", k == "grad_norm", k))
  return [m for m in metrics if counts.get(m, 0) > 1]


def plot_run(workdir: str, title: str, *, metrics: Optional[Sequence[str]] = None,
             reference: Optional[Reference] = None, labels: Optional[Mapping[str, str]] = None,
             final: Optional[Mapping[str, float]] = None, filename: str = "curves.png") -> str:
  """Learning curves of <workdir>/metrics.jsonl, one panel per metric, one line per split.

  final: figures for the title (e.g. {"test bpc": 1.57}); reference: published values drawn
  as labelled lines; labels: y-axis label per metric. Returns the PNG's path.
  """
  records = read_metrics(workdir)
  if not records:
    raise ValueError(f"plot_run: {workdir}/metrics.jsonl has no records to plot")
  panels = curve_metrics(records, metrics)
  if not panels:
    raise ValueError(f"plot_run: no metric in {workdir}/metrics.jsonl has more than one point")
  resumes = [r["step"] for r in records if r.get("split") == "resume"]
  splits = [s for s in SPLIT_COLORS if any(r.get("split") == s for r in records)]
  splits += sorted({r.get("split", "train") for r in records} - set(SPLIT_COLORS) - {"resume"})
  fig, axes = _grid(len(panels))
  for axis, metric in zip(axes, panels):
    values = []
    for index, split in enumerate(splits):
      points = [(r["step"], _strip_split(r)[metric]) for r in records
                if r.get("split", "train") == split and metric in _strip_split(r)]
      if not points:
        continue
      steps, ys = zip(*points)
      values.extend(ys)
      color = SPLIT_COLORS.get(split, RUN_COLORS[(index + 3) % len(RUN_COLORS)])
      axis.plot(steps, ys, color=color, marker="o" if len(points) < 25 else None, markersize=3,
                linewidth=1.4, label=split)
    for step in resumes:
      axis.axvline(step, color="gray", linestyle=":", linewidth=1.0)
    if resumes:
      axis.plot([], [], color="gray", linestyle=":", label="resumed")
    _decorate(axis, metric, values, reference, labels or {})
  suffix = ""
  if final:
    suffix = " | " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in final.items())
  fig.suptitle(title + suffix, fontsize=11)
  return save_figure(fig, os.path.join(workdir, filename))


def plot_comparison(runs: Mapping[str, str], metrics: Sequence[str], title: str, path: str, *,
                    split: str = "valid", labels: Optional[Mapping[str, str]] = None,
                    reference: Optional[Mapping[str, Reference]] = None,
                    final: Optional[Mapping[str, str]] = None) -> str:
  """One panel per metric, one line per run ({name: workdir}) of that metric on ``split``,
  plus every run's training loss in its own first panel.

  reference: {metric: {run_name_or_label: (value, label)}} published figures as dashed lines, in
  the run's colour when keyed by a run's name, else black (dashed, dotted, dash-dotted in turn);
  final: {run name: "test 8.61"} appended to that run's legend entry.
  """
  panels = ["loss", *[m for m in metrics if m != "loss"]]
  fig, axes = _grid(len(panels))
  for axis, metric in zip(axes, panels):
    values = []
    for index, (name, workdir) in enumerate(runs.items()):
      wanted = "train" if metric == "loss" else split
      points = [(r["step"], _strip_split(r)[metric]) for r in read_metrics(workdir)
                if r.get("split", "train") == wanted and metric in _strip_split(r)]
      if not points:
        continue
      steps, ys = zip(*points)
      values.extend(ys)
      label = name + (f" ({final[name]})" if final and name in final and metric != "loss" else "")
      axis.plot(steps, ys, color=RUN_COLORS[index % len(RUN_COLORS)], label=label,
                marker="o" if len(points) < 25 else None, markersize=3, linewidth=1.4)
    task_lines = 0
    for name, (value, text) in ((reference or {}).get(metric) or {}).items():
      if name in runs:   # a run's published figure, in the run's colour
        color, style = RUN_COLORS[list(runs).index(name) % len(RUN_COLORS)], "--"
      else:              # a figure of the task itself (a baseline, a threshold): black
        color, style = "black", REFERENCE_STYLES[task_lines % len(REFERENCE_STYLES)]
        task_lines += 1
      axis.axhline(value, color=color, linestyle=style, linewidth=1.0, label=text)
      values.append(value)
    if use_log_scale(values, metric):
      axis.set_yscale("log")
    axis.set_title("training loss" if metric == "loss" else f"{split} {metric}", fontsize=10)
    axis.set_xlabel("step")
    axis.set_ylabel((labels or {}).get(metric, metric))
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
  fig.suptitle(title, fontsize=11)
  return save_figure(fig, path)
