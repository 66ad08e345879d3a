"""Layer 5: every score the lab reports, each a small function (FID-analogue, CLIP-analogue, character
and style accuracy, LPIPS, MiniLM similarity, perplexity, repetition).
"""
