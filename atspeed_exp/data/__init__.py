"""Data layer: the AtSpeed on-disk format, synthetic data, prompts, tokenizer, DataModules, teacher data store.

Kept import-free so that ``import atspeed_exp.data.<module>`` loads only what that module needs.
"""
