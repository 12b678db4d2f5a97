"""Controllers attached to a pipeline for one tool call (trace, p2p.edit, build_hrv,
Attend-and-Excite, regional prompting).

The call installs attnctl if it is not installed and, when it ends, removes what it
added and uninstalls what it installed. When it ends by an exception it also gives an
installation that was there before the backend and the generation it had (the generation
a controller added later is told of: a generation the failed call started would reach it
with prompts that are not its own): a call that raises leaves the pipeline as it was.
"""
from __future__ import annotations

from typing import List, Optional

from .controller import Controller
from .install import Installation, install, installation_of


class Attachment:
    """``with Attachment(pipe, backend=...) as attached: attached.add(controller)``."""

    def __init__(self, target, *controllers: Controller, backend: Optional[str] = None):
        self.previous = installation_of(target)
        self._backend = self.previous.backend if self.previous is not None else None
        self._generation = self.previous.generation if self.previous is not None else None
        before = list(self.previous.controllers) if self.previous is not None else []
        # install validates, and leaves all as it was if it raises
        self.installation: Installation = install(target, *controllers, backend=backend)
        self._added: List[Controller] = []
        for controller in controllers:
            if controller not in before and controller not in self._added:
                self._added.append(controller)

    def add(self, controller: Controller) -> Controller:
        """Attach ``controller`` until :meth:`close` (one attached before stays attached)."""
        attached = controller in self.installation.controllers
        install(self.installation.model, controller)   # validates; leaves all as it was if it raises
        if not attached:
            self._added.append(controller)
        return controller

    def close(self, failed: bool = False) -> None:
        for controller in self._added:
            self.installation.remove(controller)
        self._added.clear()
        if self.previous is None:
            self.installation.uninstall()
        elif failed:
            self.installation.backend = self._backend
            self.installation.generation = self._generation

    def __enter__(self) -> "Attachment":
        return self

    def __exit__(self, kind, value, traceback) -> None:
        self.close(failed=kind is not None)
