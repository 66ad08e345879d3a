"""Layer 2: the paper's networks. The visual tokenizer (stage 0), the judges that score pictures, the
resamplers, the MLLM (stage 2), the SDXL-architecture de-tokenizer (stage 1) and loaders for the released weights.
"""
