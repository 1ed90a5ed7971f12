"""Training an MLP memory to imitate a kNN-LM (pipeline step 5), shared by train_mlpmem_offline and train_mlpmem_online.

    arguments     the argument dataclasses: the memory, the shared training flags, each mode's inputs
    losses        the sparse KL + CE loss, straight from the sparse kNN targets
    rows          the row sources: datastore keys (offline) or the frozen base model's hidden states (online)
    checkpoints   the schedule (units -> optimizer steps) and checkpoints that resume exactly
    loop          validation, the training loop and saving the memory (rows, units and steps explained there)
    modes         each mode's set-up: inputs, checks, the memory, the accelerator; `run_offline` / `run_online`

What the training writes is the memory directory of `models.memory_directory`. Submodules are not
imported here: import the one you need.
"""
