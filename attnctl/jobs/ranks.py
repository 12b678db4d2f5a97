"""Which process this is: accelerate's PartialState when accelerate is installed (under
``accelerate launch`` that is one of many processes), else one process on its own."""
from __future__ import annotations

import logging
from typing import List, Sequence

log = logging.getLogger("attnctl.jobs")


class Ranks:
    """rank, world size, a barrier and the share of a list this process takes."""

    def __init__(self):
        try:
            from accelerate import PartialState
        except ImportError:
            self._state = None
            self.rank, self.world, self.local_rank = 0, 1, 0
            self.reason = "accelerate is not installed (pip install attnctl[dist]): running as one process"
            log.warning(self.reason)
        else:
            self._state = PartialState(cpu=_cpu_only())
            self.rank, self.world = self._state.process_index, self._state.num_processes
            self.local_rank = self._state.local_process_index
            self.reason = f"accelerate PartialState: process {self.rank} of {self.world}"

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def device(self) -> str:
        return str(self._state.device) if self._state is not None else _default_device()

    def barrier(self) -> None:
        if self._state is not None and self.world > 1:
            self._state.wait_for_everyone()

    def share(self, items: Sequence) -> List:
        """This process's contiguous share of ``items`` (PartialState.split_between_processes;
        the first ``len % world`` processes take one more)."""
        items = list(items)
        if self._state is None or self.world == 1:
            return items
        with self._state.split_between_processes(items) as mine:
            return list(mine)


def _cpu_only() -> bool:
    import torch

    return not torch.cuda.is_available()


def _default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"
