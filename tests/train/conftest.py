"""Trainer tests run their tiny models on one intra-op thread.

The models here are a few tens of thousands of parameters: a second OpenMP thread only adds
synchronisation, and on a machine shared with other jobs spinning threads make each step ~30x
slower. The bitwise resume tests also need a fixed thread count (reduction order).
"""

import pytest


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    """Module scope, so module-scoped fixtures (trained models shared by tests) run on it too."""
