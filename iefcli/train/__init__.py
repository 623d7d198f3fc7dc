"""The impure shell around the core: recipes, task building, the training loop, the run directory."""
