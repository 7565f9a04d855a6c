"""Decoding core (torch only): item trie, constrained beam search, speculative beam search."""
