"""The core: everything that works for every method and knows none.

``dispatch`` (the one backend choice, autocast, input checks), ``layer`` (the adapter
layer base), ``method`` (the Method protocol and registry), ``inject`` (with undo),
``state`` (set/delete/merge/unload, trainability, mixed batches), ``targets``,
``checkpoint`` (the one PEFT reader/writer), ``batch`` (per-row batch plans),
``config`` (the fields every config shares), ``modules_to_save``.
"""
