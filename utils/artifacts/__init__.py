"""The on-disk formats the pipeline stages exchange: one module per artifact, each reading, writing and
checking its own directory layout, importable without the code that produces the artifact.

    dataset       utils/preprocess_dataset.py's output: token streams and scoring windows per split
    released_dataset  the released preprocessing's save_to_disk layout, read back into token streams
    datastore     train_base --save_knnlm_dstore's output: keys and values per scored row
    knn_targets   knn_utils.saveKNNMulti's output: the sparse kNN distribution of every row (CSR)
    index         knn_utils.build_index's output: a FAISS index over a datastore (imports FAISS)

The memory directory (train_mlpmem_*'s output) is a Hugging Face model directory: `models.memory_directory`.
Submodules are not imported here, so reading kNN targets never loads FAISS.
"""
