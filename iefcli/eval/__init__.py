"""Evaluation and reports over runs.

- :mod:`iefcli.eval.gamma_eval`: the gamma framework (pure: model + batches -> rows, statistics, sanity)
- :mod:`iefcli.eval.gamma_run`: eval-gamma over a run's checkpoints (``eval_gamma``, the command's one call)
- :mod:`iefcli.eval.gamma_output`: its table, CSV and --out directory
- :mod:`iefcli.eval.figures`: every figure, in one house style; ``save_figure`` (png/pdf/svg)
- :mod:`iefcli.eval.reports`: run directories -> compare rows
"""
