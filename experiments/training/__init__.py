"""Training a rendering model, as a library: `run(RunConfig(...)) -> dict` (the metrics, paths).

`python -m experiments.train` is the command line over it; other scripts build a `RunConfig`
and call `run` directly. The modules, each one concept:

    config.py      RunConfig (the settings), their per-algorithm defaults, ESSENTIAL settings
    data.py        loading the data, the defaults that depend on them, their fingerprint
    trainers.py    the model and the trainer of a run
    loop.py        run(): the epoch loop, minibatch order, resume, the result table
    evaluation.py  the test metrics of each epoch
    rundir.py      the run directory: atomic writes, checkpoint, lock, resume checks
    plots.py       curves.png
    launch.py      torchrun: devices, failures every rank hears of, SIGTERM

Example (the 8x8 digits, the small model, one epoch: about a second on 2 CPU cores):

    from pathlib import Path
    from experiments.training import RunConfig, run
    result = run(RunConfig(data="digits", epochs=1, out=Path("runs/digits")))
    result["final"]["test_accuracy"]  # 0.77 (seed 0)
"""

from experiments.training.config import RunConfig, RunError
from experiments.training.loop import format_table, run

__all__ = ["RunConfig", "RunError", "format_table", "run"]
