"""Backends: thin launchers that implement the op contract (attnctl.reference defines it)."""
