"""Bounds on what a study file or a command may ask for, in one place (README's study-file reference lists them).

A study file is written by one person and often run by others (a shared fleet, a course): a value that would hang a
command or exhaust a machine's memory is refused in one line naming the field, before anything is read in full or
written. Lower bounds protect the other workers of a study (a grace period shorter than two heartbeats makes workers
fail each other's live trials).
"""

from __future__ import annotations

#: Largest study file read (bytes); a bigger one is refused before it is read.
MAX_FILE_BYTES = 256 * 1024
#: Values (scalars, lists, mappings) a study file may hold once its YAML aliases (``*name``) are expanded.
MAX_YAML_NODES = 50_000
#: Parameters in a study's search space.
MAX_PARAMS = 100
#: Choices of one categorical parameter (each trial stores its parameter's choices).
MAX_CHOICES = 1_000
#: Trials a ``design:`` enqueues (sweep points x ``seeds`` + ``sample.n``), and ``enqueue:`` entries.
MAX_DESIGN_TRIALS = 10_000
#: Points of a grid sampler's grid (the product of the sizes of its lists; Optuna builds every point in memory).
MAX_GRID_POINTS = 100_000
#: Trials one population-mode worker trains at once (``population.size``, ``--population``).
MAX_POPULATION = 1_024
#: Shortest heartbeat interval (seconds) a worker takes (``--heartbeat``).
MIN_HEARTBEAT_S = 1
#: Shortest grace period (seconds): two of the shortest heartbeats. A grace period must also be at least two of the
#: workers' heartbeat interval (``hpo grace`` assumes the default 10 s unless told ``--heartbeat``).
MIN_GRACE_S = 2.0 * MIN_HEARTBEAT_S
