"""Layer 4: running trained models. Long-story generation under a KV-cache policy, teacher-forced
long-context scoring, attention analysis and attention_sinks-style streaming evaluation.
"""
