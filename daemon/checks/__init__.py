"""One section end to end: the check (``pipeline``), the Stream consumer and its ``settlement``, the outbox
sender (``outbox``) and the retention ``pruner``."""
