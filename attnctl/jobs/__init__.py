"""Dataset-scale jobs: ``attnctl maps``, ``attnctl hrv --prompts FILE`` and ``attnctl edit``
over prompt files, one process or many under ``accelerate launch``.

Work is cut into global batches (batch g holds items [g·size, (g+1)·size) of the file), so
what a batch computes never depends on the number of processes. Each process takes a
contiguous share of the batches not yet done (accelerate's PartialState), writes every
batch to files named by its global index, then appends one line to its own manifest part:
that line is the batch's commit. A rerun skips committed batches and redoes the rest; a
killed process loses at most the batch it was running. Process 0 merges the parts into
``manifest.jsonl`` and writes ``summary.json``.

Modules: ``inputs`` (prompt and pair files), ``ranks`` (PartialState or one process),
``store`` (the output directory), ``runner`` (the batch loop, progress, summary) and one
module per command (``maps``, ``hrv``, ``edit``).
"""
