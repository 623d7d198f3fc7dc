"""Evaluation over checkpoints: the gamma framework (:mod:`iefcli.eval.gamma_eval`) and reports."""
