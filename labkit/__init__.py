"""SEED-Story Lab: a runnable, measurable, teachable reproduction of SEED-Story (arXiv 2407.08683).

Every paper concept lives in a module named after it: ``labkit.data`` (StoryStream format and the
StoryStream-mini story world), and, as the lab grows, the visual tokenizer, the MLLM, the KV-cache
policies, the de-tokenizer, the training stages, generation, metrics and reports.
"""

__version__ = "0.1.0"
