"""Histogram exemplars that stay until a newer measurement replaces them.

The SDK's aligned-bucket reservoir hands each exemplar to one export and then forgets it. The
collector's `prometheus` exporter serves only the latest data point's exemplars, so an exemplar
lives there for one export interval and is lost whenever Prometheus does not scrape within it
(or the collector's batch processor merges two exports). Prometheus client libraries keep the
last exemplar of each bucket instead; this reservoir does the same, and Prometheus ignores the
repeats (same series, value and timestamp).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from opentelemetry.sdk.metrics import (
    AlignedHistogramBucketExemplarReservoir,
    Exemplar,
    ExemplarReservoir,
    SimpleFixedSizeExemplarReservoir,
)
from opentelemetry.util.types import Attributes


class LastExemplarPerBucketReservoir(AlignedHistogramBucketExemplarReservoir):
    """The last sampled measurement of each histogram bucket, kept across exports."""

    def __init__(self, boundaries: Sequence[float], **kwargs: Any) -> None:
        super().__init__(boundaries, **kwargs)
        self._kept: dict[int, Exemplar] = {}

    def collect(self, point_attributes: Attributes) -> list[Exemplar]:
        with self._lock:
            for index, bucket in self._reservoir_storage.items():
                exemplar = bucket.collect(point_attributes)  # also empties the bucket
                if exemplar is not None:
                    self._kept[index] = exemplar
            return [self._kept[index] for index in sorted(self._kept)]


def _reservoir(**aggregation: Any) -> ExemplarReservoir:
    # Explicit-bucket histograms pass their boundaries; other aggregations keep the SDK's default.
    if "boundaries" in aggregation:
        return LastExemplarPerBucketReservoir(**aggregation)
    return SimpleFixedSizeExemplarReservoir(**aggregation)


def sticky_exemplar_reservoirs(aggregation_type: type) -> Callable[..., ExemplarReservoir]:
    """A View's ``exemplar_reservoir_factory``: histogram buckets keep their last exemplar."""
    return _reservoir
