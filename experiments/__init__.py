"""The experiments beside the trainer: multi-seed comparisons of losses, and their report.

  compare      `python -m experiments.compare`: trains a grid of (dataset, configuration, seed)
               runs with `train.train_and_evaluate`, then writes the report.
  sweeps       the grids, as data: named config overrides of `train/configs/compare_short.py`.
  report       tables.md, the plots and the README splice, from the stored runs alone:
    runs         reading the stored runs (`results.json`, `config.json`, `metrics.jsonl`, ...)
    statistics   Welch's t-test against softmax, Holm-Bonferroni over a table's comparisons
    tables       the tables of the runs on a whole training split
    small_data   the tables and figures of the runs on a training subset
    plots        the saturation and test-error figures, and what every figure shares
"""
