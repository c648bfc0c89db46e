"""Serving many adapters over one base model: ``pool`` (AdapterPool: slots, LRU, pin),
``staging`` (reading and checking an adapter for a slot), ``engine`` (ServingEngine)."""
