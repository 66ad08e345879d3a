"""Layer 6: the Accelerate training loop and one module per stage (0: visual tokenizer + judges,
1: VAE + de-tokenizer, 2: MLLM, 3: de-tokenizer adaptation), and the artifact registry.
"""
