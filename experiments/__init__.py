"""The paper's experiments: configurations (configs.py) and the runner (run.py)."""
