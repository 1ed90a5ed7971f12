"""The joint model: a base causal LM interpolated with a trained MLP memory.

    interpolation   the formula (also the kNN-LM's), the memory's log-probabilities and gold-token log-probabilities
    hooks           the memory attached to an unmodified HF model by hooks: `attach_memory`, `JointLM`
    perplexity      base, memory-alone and joint perplexity over a preprocessed split (evaluate_joint.py)
    token_memory    Memory Decoder memories (a causal LM over tokens) beside the MLP memory
    causal_lm       the joint model as one HF causal LM (MLPMemoryForCausalLM), and a joint directory for the entry points
    build           python -m models.convert --joint: build a joint model directory
"""

from models.joint.hooks import JointLM, attach_memory, check_memory_fits, load_checked_memory, memory_layer
from models.joint.interpolation import (check_joint_settings, check_lmbdas, gold_log_probs, interpolate_log_probs,
                                        memory_gold_log_probs, memory_log_probs)

__all__ = ["JointLM", "attach_memory", "check_joint_settings", "check_lmbdas", "check_memory_fits", "gold_log_probs",
           "interpolate_log_probs", "load_checked_memory", "memory_gold_log_probs", "memory_layer", "memory_log_probs"]
