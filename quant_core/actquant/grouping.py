"""DGQ's distribution-aware groups: which axis to group along and which slices share a range.

A quantized tensor is seen as rows × channels (tokens/pixels × input channels; for a Conv2d input the
im2col rows, so a "channel" is one (input channel, kernel tap) column). Each slice along an axis is
summarised by its (min, max) over everything else. The axis whose slices are more spread,
D = (max − min of the slice maxima) + (max − min of the slice minima), is grouped; its slices are clustered
by k-means on their (min, max) pairs, and each cluster gets one asymmetric range covering its members
(min of their minima, max of their maxima). Outliers are not kept in full precision: they form their own
wide clusters.

K-means here is deterministic (no random restarts): farthest-point initialisation from the slice nearest
the coordinate-wise median, then Lloyd iterations until the assignment is stable; clusters are numbered
by increasing width. The paper's implementation uses scikit-learn's k-means++ (random_state=0); both put
isolated outliers in clusters of their own.
"""
from dataclasses import dataclass
from typing import Optional

import torch

AXIS_TENSOR, AXIS_CHANNEL, AXIS_TOKEN = 0, 1, 2


def spread(lo: torch.Tensor, hi: torch.Tensor) -> float:
    """D of slices with minima `lo` and maxima `hi`."""
    return float((hi.max() - hi.min()) + (lo.max() - lo.min()))


@dataclass
class SliceGroups:
    """The slices along one axis, clustered: group label per slice and range per group."""
    labels: torch.Tensor   # int64 [slices]
    lo: torch.Tensor       # fp32 [groups]
    hi: torch.Tensor       # fp32 [groups]
    spread: float          # D of the slices


def choose_axis(channels: SliceGroups, tokens: Optional[SliceGroups]) -> int:
    """AXIS_CHANNEL or AXIS_TOKEN, whichever has the larger spread D (channels on a tie or without tokens)."""
    return AXIS_TOKEN if tokens is not None and tokens.spread > channels.spread else AXIS_CHANNEL


def kmeans_pairs(points: torch.Tensor, k: int, max_iterations: int = 100) -> torch.Tensor:
    """Cluster labels (int64 [S]) of S points [S, 2] into at most k clusters, deterministically."""
    pts = points.double()
    n = pts.shape[0]
    distinct = torch.unique(pts, dim=0)
    k = min(k, distinct.shape[0])
    median = pts.median(dim=0).values
    centers = [pts[(pts - median).pow(2).sum(1).argmin()]]
    nearest = (pts - centers[0]).pow(2).sum(1)
    while len(centers) < k:
        far = nearest.argmax()
        centers.append(pts[far])
        nearest = torch.minimum(nearest, (pts - pts[far]).pow(2).sum(1))
    centers = torch.stack(centers)
    labels = torch.full((n,), -1, dtype=torch.int64)
    for _ in range(max_iterations):
        new = (pts[:, None, :] - centers[None]).pow(2).sum(-1).argmin(dim=1)
        if torch.equal(new, labels):
            break
        labels = new
        counts = torch.bincount(labels, minlength=k)
        sums = torch.zeros_like(centers).index_add_(0, labels, pts)
        filled = counts > 0  # an emptied cluster keeps its center
        centers[filled] = sums[filled] / counts[filled, None]
    used = torch.unique(labels)
    order = used[torch.argsort(centers[used, 1] - centers[used, 0], stable=True)]
    relabel = torch.empty(k, dtype=torch.int64)
    relabel[order] = torch.arange(len(order))
    return relabel[labels]


def group_ranges(lo: torch.Tensor, hi: torch.Tensor, labels: torch.Tensor, groups: int):
    """(lo [groups], hi [groups]): per cluster the min of its slices' minima and max of their maxima
    (0, 0 for an unused group)."""
    glo = torch.zeros(groups, dtype=torch.float32).scatter_reduce(0, labels, lo.float(), "amin",
                                                                    include_self=False)
    ghi = torch.zeros(groups, dtype=torch.float32).scatter_reduce(0, labels, hi.float(), "amax",
                                                                    include_self=False)
    return glo, ghi


def cluster_slices(lo: torch.Tensor, hi: torch.Tensor, groups: int) -> SliceGroups:
    """S slices with minima `lo` [S] and maxima `hi` [S] clustered into at most `groups` ranges."""
    labels = kmeans_pairs(torch.stack([lo, hi], dim=1), groups)
    return SliceGroups(labels, *group_ranges(lo, hi, labels, groups), spread(lo, hi))
