"""atspeed-exp: experiment framework for speculative beam search in LLM-based generative recommendation."""

__version__ = "0.1.0"
