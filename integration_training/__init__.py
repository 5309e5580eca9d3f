"""integration-training: explicit-config SFT and RL post-training for Hugging Face causal LMs."""
