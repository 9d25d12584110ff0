"""What the memory governor reads from a model replica, of either kind (chat: `ModelServer`,
embedding: `EmbeddingServer`): its measured footprint, how long it has been idle, whether an
operator asked to unload it, and its node (deployments.governor places replicas node by node)."""

from __future__ import annotations

import os
import time
from typing import Any

import ray

from .governor import NODE_METRIC


class GovernedReplica:
    """A mixin for the model deployments. The subclass calls `_init_governed()` in its constructor,
    sets `name` and `engine` (anything with a measured `footprint`), and counts the requests it is
    serving in `active`, stamping `last_active` when one ends."""

    name: str
    engine: Any

    def _init_governed(self) -> None:
        self.active = 0
        self.last_active = time.monotonic()
        self.unload_requested = False
        self._node_id: str | None = None

    def _loaded(self, started: float, memory_share_bytes: int | None) -> None:
        """Once `engine` is loaded: cap MLX's memory at the larger of the builder's share and the
        measured footprint (engine.memory.apply_process_limits), and keep what `info` reports."""
        from engine.memory import apply_process_limits

        footprint = self.engine.footprint
        self.limits = apply_process_limits(max(memory_share_bytes or 0, footprint.total))
        self.loaded_info = {
            "pid": os.getpid(),
            "loaded_at": time.time(),
            "cold_start_s": round(time.monotonic() - started, 3),
            "footprint": footprint.to_dict(),
        }

    def idle_s(self) -> float:
        return 0.0 if self.active else time.monotonic() - self.last_active

    @property
    def node_id(self) -> str:
        """This replica's Ray node (asked once, when Ray first asks for stats: asking in a process
        without Ray, as local testing mode is, would start one)."""
        if self._node_id is None:
            self._node_id = ray.get_runtime_context().get_node_id()
        return self._node_id

    def record_autoscaling_stats(self) -> dict[str, float]:
        """Ray Serve's custom autoscaling metrics, read by the memory governor; none once the engine
        is shut down (Ray may still ask while the replica stops)."""
        if self.engine is None:
            return {}
        return {
            "footprint_bytes": float(self.engine.footprint.total),
            "idle_s": self.idle_s(),
            "unload_requested": float(self.unload_requested),
            "active": float(self.active),
            NODE_METRIC + self.node_id: 1.0,
        }

    def request_unload(self) -> dict[str, Any]:
        """An operator asked to unload this model: the governor stops this replica once it is idle."""
        self.unload_requested = True
        return {"name": self.name, "unload_requested": True, "active": self.active}
