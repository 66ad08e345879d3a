"""Layer 7: the lab's experiments. A story-ablation cell, the sink-emergence study, cache traces and
benchmarks.
"""
