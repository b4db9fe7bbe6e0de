"""Compatibility layers: other libraries' names and semantics translated onto cdeq.

- :mod:`cdeq.compat.torchdeq`: TorchDEQ 0.1.0's API (``get_deq``, ``norm``, ``utils``, ``loss``,
  ``dropout``, ``solver``); replace the import prefix ``torchdeq`` by ``cdeq.compat.torchdeq``.
"""
