"""Executors: where the pipeline's work runs. ``local`` is ``runner.pipeline.Pipeline`` with its own
render pool and one engine; ``ray`` (``runner.executors.ray_executor``) keeps the same scheduler on
the driver and moves rendering to Ray tasks and generation to a pool of Ray engine actors.

Nothing here imports Ray at import time."""
