"""Offline training of every registered network: ``python -m train <name>|all`` (see ``train/__main__.py``).

``train.data`` loads the verified MNIST copy and the seeded generated data sets; ``train.trainer`` trains
one :class:`~models.registry.ModelSpec` and writes ``weights/<name>.pt`` (a state_dict), ``<name>.json``
(metrics) and PNG plots; ``train.trainer.load_trained`` loads those weights back into ``spec.build()``.
"""
