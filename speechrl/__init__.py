"""speechrl: reinforcement learning (GRPO, DAPO, Dr. GRPO) for LLM-based speech recognition.

Dimension legend used in shape comments across the package:
    B batch, G group (candidates per audio), T tokens, L prompt length, N frames,
    F features, S samples, V vocabulary, D hidden size.
"""

__version__ = "0.1.0"
