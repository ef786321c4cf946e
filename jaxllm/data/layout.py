"""Data iterator states across a change of process count (restore 2 -> 1 or 1 -> 4 processes).

A checkpoint holds one grain iterator state per process (`data/process_{i}-of-{n}.json`, grain's
checkpoint handler). A restore on the same process count reads its own file. On another count,
the checkpointer reads every saved state and asks the iterator to build this process's state from
them (`it.remap_state(states)`, states in process order), so the global batch sequence goes on
exactly where it stopped. Two kinds of iterator can:

  global-index   every process holds the same state (the index of the next global batch) and
                 slices its own rows out of each batch: synthetic tokens, preference rankings,
                 RL prompts. Any process's state is everyone's (checked equal).
  logical shards the text/chat pipeline (pipeline.py): S logical shards, process p of n reads
                 shards [p*S/n, (p+1)*S/n). Its state lists one state per shard, so the saved
                 shard states are concatenated in process order and re-split for the new count.

An iterator without `remap_state` cannot move; the checkpointer refuses in one line.
"""
from __future__ import annotations

import json

from jaxllm.data.sources import DataError


def global_index(it):
    """Mark a global-index iterator (see above) as restorable on any process count."""
    it.remap_state = same_on_every_process
    return it


def same_on_every_process(states: list) -> dict:
    """The one state every process of a global-index iterator saved."""
    first = json.dumps(states[0], sort_keys=True)
    for i, s in enumerate(states[1:], 1):
        if json.dumps(s, sort_keys=True) != first:
            raise DataError(f"the saved data states of process 0 and process {i} differ, but this "
                            f"iterator keeps one global position: the checkpoint's data is inconsistent")
    return states[0]
