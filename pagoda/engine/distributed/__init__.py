"""One engine over several ranks (torch.distributed: gloo on CPUs, NCCL on GPUs).

Tensor parallelism (`--tensor-parallel-size N`, vLLM's meaning): every rank holds a shard of each
layer and its own KV cache of its heads. Rank 0 is the engine: it schedules, samples and talks to
the bus; it starts the other local ranks itself (`launcher.py`, each `follower.py` in a process of
its own) and drives them with a small step protocol (`protocol.py`): for each model call it sends
the call's inputs, and the followers run their shard in lockstep, meeting rank 0 in the
collectives the layers make (`tensor_parallel.py`: one all-reduce after each row-parallel
projection and after the embedding, a gather of the logits' vocabulary shards to rank 0).
Weights are sharded as they load (`sharding.py`), dense or quantized.

Pipeline parallelism (`--pipeline-parallel-size N`) puts consecutive layers on N stages, each with
its TP ranks (`pipeline.py`: the layout and the hidden states' send/recv; `pipeline_model.py`: a
stage's part of the model; `pipeline_ranks.py`: starting and joining the ranks). Several nodes
(`--nnodes`) meet at node 0's rendezvous store; each other node runs only its ranks (`nodes.py`).

Mixture-of-experts models split their experts whole with `--enable-expert-parallel`
(`expert_parallel.py`); `--data-parallel-size N` runs N engines meeting at the MoE layers, each
of `--tensor-parallel-size` ranks, the experts split over all of them (`data_parallel.py`,
`data_parallel_group.py`).
"""
