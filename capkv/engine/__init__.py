"""The engine: what evicts inside a model (the method interface, budgets, allocations, the
compression of each layer's cache at prefill, decoding from it, streaming eviction).

May import only capkv.models (which models are supported) and the standard libraries; never the
methods, tasks, results, harness or figures. A new eviction method is not written here: it is a
dataclass on :class:`capkv.engine.method.EvictionMethod` in baselines/ (or capkv/cap.py).
"""
