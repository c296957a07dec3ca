"""Spark engines for the offline side (``pip install avrec[spark]``, Java 17).

Each module is the Spark twin of a single-machine engine and writes the same tables:

* :mod:`avrec.spark.behaviour_features`: the polars job of :mod:`avrec.behaviour_features`,
* :mod:`avrec.spark.pit_join`: the DuckDB point-in-time join of :mod:`avrec.pit_join`,
* :mod:`avrec.spark.materialize`: Feast's Spark compute engine writing to Redis,

all on one session from :func:`avrec.spark.session.spark_session`. Nothing here is
imported by the serving core (``tests/test_import_layers.py``).
"""
