"""The joint model: a base causal LM interpolated with a trained memory.

    settings        the settings of a memory in use (MemoryArguments) and the default policy for lmbda
    loading         the one loader: a base and any memory (or a joint directory) as one checked `LoadedJoint`
    memories        the one interface the joint code calls (`JointMemory`), and the MLP memory behind it
    token_memory    Memory Decoder memories (a causal LM over tokens) behind the same interface
    interpolation   the formula (also the kNN-LM's), the memory's log-probabilities and gold-token log-probabilities
    hooks           the memory attached to an unmodified HF model by hooks: `attach_memory`, `JointLM`
    perplexity      base, memory-alone and joint perplexity over a preprocessed split (evaluate_joint.py)
    causal_lm       the joint model as one HF causal LM (MLPMemoryForCausalLM)
    build           python -m models.convert --joint: build a joint model directory
"""

from models.joint.hooks import JointLM, attach_memory, check_memory_fits, load_checked_memory
from models.joint.interpolation import (check_joint_settings, gold_log_probs, interpolate_log_probs,
                                        memory_gold_log_probs, memory_log_probs)
from models.joint.memories import JointMemory, as_joint_memory
from models.joint.settings import MemoryArguments, check_lmbdas

__all__ = ["JointLM", "JointMemory", "MemoryArguments", "as_joint_memory", "attach_memory", "check_joint_settings",
           "check_lmbdas", "check_memory_fits", "gold_log_probs", "interpolate_log_probs", "load_checked_memory",
           "memory_gold_log_probs", "memory_log_probs"]
