"""Supervised training: the transformers-Trainer loop (dapt, sft, reward), the reward model, shared start/save."""
