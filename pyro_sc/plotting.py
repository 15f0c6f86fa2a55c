"""Plots (matplotlib). Every function returns its Figure or Axes and never calls ``show()``."""

from __future__ import annotations

from typing import Sequence

import matplotlib

import numpy as np
import pandas as pd
from matplotlib import pyplot as plt

__all__ = [
    "plot_history", "plot_embedding", "embed_2d", "plot_heatmap", "plot_confusion_matrix", "plot_lisi", "plot_trace",
    "plot_embeddings", "plot_posterior_predictive",
]


def plot_history(
    history: pd.DataFrame,
    *,
    metric: str | None = None,
    ax: matplotlib.axes.Axes | None = None,
    title: str | None = None,
) -> matplotlib.figure.Figure:
    """Training and validation loss per epoch; ``metric`` (a history column, e.g. ``"ari"``) on a twin axis."""
    if ax is None:
        fig, ax = plt.subplots(figsize=(5.5, 3.5))
    else:
        fig = ax.figure
    ax.plot(history["epoch"], history["train_loss"], label="train")
    if "validation_loss" in history and history["validation_loss"].notna().any():
        ax.plot(history["epoch"], history["validation_loss"], label="validation")
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss per cell (negative ELBO)")
    lines, labels = ax.get_legend_handles_labels()
    if metric is not None:
        twin = ax.twinx()
        twin.plot(history["epoch"], history[metric], color="tab:red", label=metric)
        twin.set_ylabel(metric)
        more_lines, more_labels = twin.get_legend_handles_labels()
        lines, labels = lines + more_lines, labels + more_labels
    ax.legend(lines, labels, loc="best", frameon=False)
    if title:
        ax.set_title(title)
    fig.tight_layout()
    return fig


def embed_2d(representation_nk: np.ndarray, *, method: str = "umap", seed: int = 0) -> np.ndarray:
    """A 2-D embedding (UMAP via umap-learn, or t-SNE via scikit-learn) of any representation."""
    if representation_nk.shape[1] == 2:
        return np.asarray(representation_nk)
    if method == "umap":
        try:
            import umap
        except ImportError as err:  # pragma: no cover - depends on the environment
            raise ImportError("UMAP needs umap-learn: pip install pyro_sc[analysis]") from err
        return umap.UMAP(n_neighbors=15, min_dist=0.3, random_state=seed).fit_transform(representation_nk)
    if method == "tsne":
        try:
            from sklearn.manifold import TSNE
        except ImportError as err:  # pragma: no cover
            raise ImportError("t-SNE needs scikit-learn: pip install pyro_sc[analysis]") from err
        return TSNE(n_components=2, random_state=seed, init="pca").fit_transform(representation_nk)
    raise ValueError(f"method must be 'umap' or 'tsne', got {method!r}")


def plot_embedding(
    coords_n2: np.ndarray,
    colors: dict[str, Sequence] | Sequence,
    *,
    point_size: float = 4.0,
    title: str | None = None,
) -> matplotlib.figure.Figure:
    """Scatter of 2-D coordinates, one panel per colouring (``{"cell type": labels, "batch": batches}``)."""
    panels = colors if isinstance(colors, dict) else {"": colors}
    fig, axes = plt.subplots(1, len(panels), figsize=(5.0 * len(panels), 4.2), squeeze=False)
    for ax, (name, values) in zip(axes[0], panels.items()):
        values = pd.Categorical(np.asarray(values).astype(str))
        cmap = plt.get_cmap("tab20" if len(values.categories) > 10 else "tab10")
        for i, category in enumerate(values.categories):
            mask = values == category
            ax.scatter(*coords_n2[mask].T, s=point_size, color=cmap(i % cmap.N), label=category, linewidths=0)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(name)
        ax.legend(markerscale=3, fontsize=7, frameon=False, loc="center left", bbox_to_anchor=(1, 0.5))
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot_heatmap(
    matrix: pd.DataFrame,
    *,
    row_groups: Sequence | None = None,
    cmap: str = "viridis",
    vmin: float | None = None,
    vmax: float | None = None,
    colorbar_label: str = "",
    ax: matplotlib.axes.Axes | None = None,
    title: str | None = None,
) -> matplotlib.figure.Figure:
    """Heatmap of a DataFrame (e.g. cells x types probabilities, cells x topics, genes x types).

    With ``row_groups`` (one label per row, e.g. the true cell type) rows are sorted by group and the
    groups are marked on the left; many rows are drawn without row labels.
    """
    values = matrix
    groups = None
    if row_groups is not None:
        groups = pd.Series(np.asarray(row_groups).astype(str), index=matrix.index)
        order = np.argsort(groups.to_numpy(), kind="stable")
        values, groups = matrix.iloc[order], groups.iloc[order]
    if ax is None:
        fig, ax = plt.subplots(figsize=(1.0 + 0.6 * values.shape[1], 4.5))
    else:
        fig = ax.figure
    image = ax.imshow(values.to_numpy(), aspect="auto", interpolation="nearest", cmap=cmap, vmin=vmin, vmax=vmax)
    ax.set_xticks(range(values.shape[1]), [str(c) for c in values.columns], rotation=45, ha="right")
    if groups is not None:
        codes = groups.to_numpy()
        bounds = np.flatnonzero(codes[1:] != codes[:-1]) + 1
        for b in bounds:
            ax.axhline(b - 0.5, color="white", linewidth=1)
        starts = np.r_[0, bounds]
        stops = np.r_[bounds, len(codes)]
        ax.set_yticks((starts + stops - 1) / 2, [codes[i] for i in starts])
    elif values.shape[0] <= 60:
        ax.set_yticks(range(values.shape[0]), [str(i) for i in values.index])
    else:
        ax.set_yticks([])
    fig.colorbar(image, ax=ax, label=colorbar_label)
    if title:
        ax.set_title(title)
    fig.tight_layout()
    return fig


def plot_confusion_matrix(
    y_true: Sequence,
    y_pred: Sequence,
    *,
    normalize: str | None = "true",
    ax: matplotlib.axes.Axes | None = None,
    title: str | None = None,
) -> matplotlib.figure.Figure:
    """Confusion matrix (rows true, columns predicted), annotated; ``normalize`` as in
    :func:`pyro_sc.metrics.confusion_matrix`."""
    from .metrics import confusion_matrix

    table = confusion_matrix(y_true, y_pred, normalize=normalize)
    if ax is None:
        fig, ax = plt.subplots(figsize=(1.5 + 0.7 * table.shape[1], 1.2 + 0.6 * table.shape[0]))
    else:
        fig = ax.figure
    ax.imshow(table.to_numpy(), cmap="Blues", vmin=0)
    ax.set_xticks(range(table.shape[1]), table.columns, rotation=45, ha="right")
    ax.set_yticks(range(table.shape[0]), table.index)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    peak = table.to_numpy().max() or 1
    for (i, j), value in np.ndenumerate(table.to_numpy()):
        text = f"{value:.2f}" if normalize else f"{int(value)}"
        ax.text(j, i, text, ha="center", va="center", color="white" if value > 0.6 * peak else "black", fontsize=8)
    if title:
        ax.set_title(title)
    fig.tight_layout()
    return fig


def plot_lisi(
    lisi_by_model: dict[str, np.ndarray] | pd.DataFrame,
    *,
    kind: str = "iLISI",
    ax: matplotlib.axes.Axes | None = None,
    title: str | None = None,
) -> matplotlib.figure.Figure:
    """Per-cell LISI of several models side by side: one violin per model, its median marked and written.

    ``lisi_by_model`` maps a model's name to its per-cell values (e.g. :func:`pyro_sc.metrics.ilisi` of
    its latent), or is a DataFrame with one column per model (NaNs dropped). ``kind`` labels the axis
    (``"iLISI"``: higher is better mixed; ``"cLISI"``: lower is purer).
    """
    if isinstance(lisi_by_model, pd.DataFrame):
        columns = {str(name): lisi_by_model[name].dropna().to_numpy() for name in lisi_by_model.columns}
    else:
        columns = {str(name): np.asarray(v, dtype=float).ravel() for name, v in lisi_by_model.items()}
    if not columns:
        raise ValueError("lisi_by_model is empty")
    empty = [name for name, values in columns.items() if values.size == 0]
    if empty:
        raise ValueError(f"no LISI values for {empty}")
    names, values = list(columns), list(columns.values())
    if ax is None:
        fig, ax = plt.subplots(figsize=(1.5 + 1.1 * len(names), 3.8))
    else:
        fig = ax.figure
    positions = np.arange(1, len(names) + 1)
    parts = ax.violinplot(values, positions=positions, showmedians=True, showextrema=False)
    for body in parts["bodies"]:
        body.set_alpha(0.6)
    for x, v in zip(positions, values):
        ax.annotate(f"{np.median(v):.2f}", (x, np.median(v)), xytext=(0, 4), textcoords="offset points",
                    ha="center", va="bottom", fontsize=8)
    ax.set_xticks(positions, names, rotation=30 if max(map(len, names)) > 8 else 0, ha="center")
    ax.set_ylabel(f"{kind} per cell")
    if title:
        ax.set_title(title)
    fig.tight_layout()
    return fig


def plot_trace(
    history: pd.DataFrame,
    *,
    y: str,
    x: str = "iteration",
    metric: str | None = "ari",
    ylabel: str | None = None,
    ax: matplotlib.axes.Axes | None = None,
    title: str | None = None,
) -> matplotlib.figure.Figure:
    """An objective per iteration (column ``y`` against ``x``) and, on a twin axis, a ``metric`` recorded
    on some iterations only (NaN elsewhere; drawn as points joined over the gaps), e.g. NMF's objective
    and ARI, or ETM's ``train_loss`` and ARI per ``epoch``."""
    if ax is None:
        fig, ax = plt.subplots(figsize=(5.5, 3.5))
    else:
        fig = ax.figure
    ax.plot(history[x], history[y], label=ylabel or y)
    ax.set_xlabel(x)
    ax.set_ylabel(ylabel or y)
    lines, labels = ax.get_legend_handles_labels()
    if metric is not None and metric in history:
        recorded = history[[x, metric]].dropna()
        twin = ax.twinx()
        twin.plot(recorded[x], recorded[metric], color="tab:red", marker=".", label=metric)
        twin.set_ylabel(metric)
        more_lines, more_labels = twin.get_legend_handles_labels()
        lines, labels = lines + more_lines, labels + more_labels
    ax.legend(lines, labels, loc="best", frameon=False)
    if title:
        ax.set_title(title)
    fig.tight_layout()
    return fig


def plot_embeddings(
    coords: dict[str, np.ndarray],
    labels: Sequence,
    *,
    point_size: float = 4.0,
    title: str | None = None,
) -> matplotlib.figure.Figure:
    """Several 2-D embeddings of the same cells side by side (``{"ETM theta": coords_n2, ...}``), one panel
    each, coloured by the same ``labels`` (one legend)."""
    if not coords:
        raise ValueError("coords is empty")
    values = pd.Categorical(np.asarray(labels).astype(str))
    cmap = plt.get_cmap("tab20" if len(values.categories) > 10 else "tab10")
    fig, axes = plt.subplots(1, len(coords), figsize=(4.2 * len(coords) + 1.8, 4.2), squeeze=False)
    for ax, (name, coords_n2) in zip(axes[0], coords.items()):
        if len(coords_n2) != len(values):
            raise ValueError(f"{name!r} has {len(coords_n2)} cells, labels {len(values)}")
        for i, category in enumerate(values.categories):
            mask = values == category
            ax.scatter(*np.asarray(coords_n2)[mask].T, s=point_size, color=cmap(i % cmap.N), label=category,
                       linewidths=0)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(name)
    axes[0, -1].legend(markerscale=3, fontsize=7, frameon=False, loc="center left", bbox_to_anchor=(1, 0.5))
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def _per_gene_statistics(x_ng: np.ndarray) -> dict[str, np.ndarray]:
    """Per-gene mean, variance and fraction of zeros of a cells x genes matrix (over the last but one axis)."""
    return {"mean": x_ng.mean(-2), "variance": x_ng.var(-2), "zero fraction": (x_ng == 0).mean(-2)}


def plot_posterior_predictive(
    x_observed_ng,
    x_simulated_sng,
    *,
    interval: float = 0.9,
    point_size: float = 8.0,
    title: str | None = None,
) -> matplotlib.figure.Figure:
    """A posterior predictive check: per-gene mean, variance and zero fraction of the observed counts
    (x axis) against those of counts simulated from the fitted model (y axis: median over the replicates,
    bars: their central ``interval``), one panel each, with the diagonal.

    ``x_observed_ng`` is cells x genes; ``x_simulated_sng`` is replicates x the same cells x genes (e.g.
    ``Predictive(poutine.uncondition(m.model), guide=m.guide, num_samples=20)(mb)["x"]``); arrays or
    tensors. Each panel's title gives the share of genes whose observed statistic lies in the interval.
    """
    observed = np.asarray(x_observed_ng.toarray() if hasattr(x_observed_ng, "toarray") else x_observed_ng, float)
    simulated = np.asarray(x_simulated_sng, dtype=float)
    if observed.ndim != 2 or simulated.ndim != 3 or simulated.shape[1:] != observed.shape:
        raise ValueError(
            f"expected observed (cells, genes) and simulated (replicates, cells, genes) of the same cells and "
            f"genes, got {observed.shape} and {simulated.shape}"
        )
    if not 0 < interval < 1:
        raise ValueError(f"interval must be in (0, 1), got {interval}")
    stats_obs, stats_sim = _per_gene_statistics(observed), _per_gene_statistics(simulated)
    fig, axes = plt.subplots(1, 3, figsize=(13.0, 4.0))
    for ax, name in zip(axes, stats_obs):
        obs_g, sim_sg = stats_obs[name], stats_sim[name]
        low_g, mid_g, high_g = np.quantile(sim_sg, [(1 - interval) / 2, 0.5, (1 + interval) / 2], axis=0)
        inside = np.mean((obs_g >= low_g) & (obs_g <= high_g))
        ax.errorbar(obs_g, mid_g, yerr=[mid_g - low_g, high_g - mid_g], fmt="none", ecolor="0.7", linewidth=0.8)
        ax.scatter(obs_g, mid_g, s=point_size, linewidths=0)
        lo, hi = min(obs_g.min(), low_g.min()), max(obs_g.max(), high_g.max())
        if name != "zero fraction":
            positive = np.concatenate([obs_g, low_g])[np.concatenate([obs_g, low_g]) > 0]
            lo = positive.min() if positive.size else 1e-3
            ax.set_xscale("log")
            ax.set_yscale("log")
        ax.plot([lo, hi], [lo, hi], color="tab:red", linewidth=1)
        ax.set_xlabel(f"observed {name}")
        ax.set_ylabel(f"simulated {name}")
        ax.set_title(f"{name}: {inside:.0%} of genes in the {interval:.0%} interval", fontsize=9)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig
