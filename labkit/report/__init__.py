"""Layer 8: `labkit report`: papermill runs over the ablation grid, the paper's tables beside the lab's,
verdicts, the index pages, and `--retrain`.
"""
