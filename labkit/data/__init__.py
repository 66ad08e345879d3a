"""Layer 1: the StoryStream format, the procedural story world (StoryStream-mini), the text tokenizer, the
official random-length sampler and the sequence layout.
"""
