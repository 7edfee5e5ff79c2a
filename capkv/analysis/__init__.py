"""Analysis: what probes a compression (capacity retained and attention error per layer, the
unification of the baselines as capacity objectives, continuations of a long generation).

May import the engine and the methods (capkv.cap, capkv.capacity); never tasks, results, the
harness or figures.
"""
