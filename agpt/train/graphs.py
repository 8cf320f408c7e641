"""CUDA graphs of units' forward and backward passes (GPU runs of `agpt train`).

A small unit's forward and backward are ~300 kernel launches from Python, which take longer
than the GPU's work on them; replayed as one graph they cost ~0.1 ms of host time. A graph
replays fixed kernels on fixed addresses, so there are two kinds:

- a unit cached on the device gets its own graph, captured on its own arrays (no copies, no
  padding);
- a streamed unit (staged again every epoch, at new addresses) is staged padded to a capacity
  class (`agpt.train.batches.padded_unit_batch`). Each class has one graph, captured on input
  buffers of that class, and a unit's arrays are copied over those buffers before its replay.

Replays run one at a time on the trainer's stream, so the copies for the next unit of a class
cannot overtake the replay before it, and the graphs can share their temporaries
(`CupyBackend.capture`).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

from agpt.model.gpt import Batch
from agpt.train.batches import batch_arrays


class UnitGraphs:
    """The graphs of a run: `run(batch)` queues one unit's forward and backward (adding into
    the run's gradient) and returns its loss as a device scalar."""

    def __init__(self, be: Any, run: Callable[[Batch], Any]):
        self.be = be
        self._run = run
        self._own: dict[int, tuple[Any, Any]] = {}                   # unit -> (graph, loss)
        self._classes: dict[tuple, tuple[Batch, Any, Any]] = {}      # shapes -> (inputs, ...)

    @property
    def n_own(self) -> int:
        return len(self._own)

    @property
    def n_classes(self) -> int:
        return len(self._classes)

    def own(self, unit: int, batch: Batch) -> Any:
        """Replay cached unit `unit`'s graph (captured on first use); its loss."""
        if unit not in self._own:
            self._own[unit] = self.be.capture(lambda: self._run(batch))
        graph, loss = self._own[unit]
        graph.launch()
        return loss.copy()          # the buffer is rewritten by the next replay

    def padded(self, batch: Batch) -> Any:
        """Replay the graph of a padded batch's class on a copy of its arrays; its loss."""
        arrays = batch_arrays(batch)
        key = tuple((a.shape, a.dtype.str) for a in arrays)
        if key not in self._classes:
            inputs = copy.deepcopy(batch)              # the class's buffers, holding this unit
            self._classes[key] = (inputs, *self.be.capture(lambda: self._run(inputs)))
        else:
            self.be.copy_arrays(batch_arrays(self._classes[key][0]), arrays)
        _, graph, loss = self._classes[key]
        graph.launch()
        return loss.copy()
