"""The raw-event archive: every valid event once, in time-partitioned Parquet files.

``pulse archive`` (:mod:`pipeline.archive.command`) writes it; :func:`pipeline.archive.read.
read_range` returns the events of a kind in ``[t1, t2)`` as columns and
:func:`pipeline.archive.read.extent` tells which range the archive holds. The layout and the
exactly-once rules are in :mod:`pipeline.archive.layout`. Nothing is imported here, so building
the ``pulse`` parser does not load pyarrow.
"""
