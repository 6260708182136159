"""The sections of experiments/bench_all.py, one module each (not scripts: nothing here is run
with `python -m`).

* `throughput`: images/s of every algorithm, NCHW and channels_last model (section 1);
* `peak`: the LeNet forward's GFLOP/s against a float32 matmul, torch.compile and its cold
  compile time, thread settings, the op profile of the forward (section 2);
* `hot_paths`: the op profile of the learning steps and of `drm.exact_map` (section 2);
* `memory`: analytic activation and latent sizes, measured peak increases (section 3);
* `scaling`: max_sum's cost against image size, depth and width, and its plot (section 4);
* `imported`: max_sum of networks imported by `to_drm` against their own forward (section 5);
* `tables`: the markdown tables bench_all prints.

Each section is a function `(args, [data,] device) -> rows` of JSON-ready values; the timing
helpers they share live in experiments/_bench.py.
"""
